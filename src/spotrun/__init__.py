"""spotrun: run machine-learning jobs on preemptible / spot GPUs without losing work."""

__version__ = "0.1.0"
