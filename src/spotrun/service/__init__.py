"""What the CLI, the HTTP API, the dashboard and the bus intake all do, written once.

``submission``: what a job request may ask for, its limits and the errors that name the
fields at fault (light: the CLI's options read its limits at start-up). ``queue``: submit
(every option) and cancel. ``auth``: who is calling and what they may see. ``preempt``:
the simulated preemption of a local worker. Each edge turns its own input into these
calls and their answers (and errors) into its own output; none checks or writes on its own.
"""
