"""Hugging Face ``transformers.Trainer`` on spotrun: a stock ``Trainer.train`` that a
preemption stops at the next optimizer step and that resumes, mid-epoch, bit-identically.

Add the callback, and pass what it says to ``train``::

    spot = SpotrunCallback(ctx)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[spot])
    trainer.train(resume_from_checkpoint=spot.resume_from_checkpoint)

``resume_from_checkpoint`` is ``None`` on a job's first attempt; on a resumed one it is a
temporary directory holding only what the Trainer may read safely: ``trainer_state.json``
(JSON: the step, the epoch, the log history) and ``model.safetensors``. There is no
``optimizer.pt``, ``scheduler.pt`` or ``rng_state.pth`` for the Trainer to unpickle; the
callback restores the optimizer, the LR scheduler, the gradient scaler and every global RNG
from spotrun's own checkpoint (safetensors + JSON) just before the first resumed step,
after the Trainer has skipped the batches already trained on.

At each optimizer step's start the callback reports ``ctx.progress(global_step, max_steps,
**last logged values)``; a checkpoint taken there holds the weights, the optimizer, the
scheduler, the scaler, the Trainer's state and the RNGs as they are when that step begins,
its batches drawn. When the job must stop, the callback unwinds ``train`` with
:class:`~spotrun.pipelines.base.JobStopped` right after that checkpoint: nothing runs in a
signal handler (leave ``enable_jit_checkpoint`` off) and no code after ``train`` mistakes a
stopped run for a finished one.

Bit-identity holds on the same device type, library versions and thread count, with the
Trainer's own shuffling (``args.seed``/``data_seed``), for randomness drawn inside training
steps (dropout). Randomness a data collator draws in the main process (masking for
masked-language modelling) is drawn again for the first resumed step from another state;
stateful callbacks other than the Trainer's own control (``EarlyStoppingCallback``'s
counter) start afresh on each attempt.

Imports transformers (``pip install 'spotrun[hf]'``): only a running pipeline imports this
module.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, cast

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from spotrun.integrations._common import scalar_metrics
from spotrun.integrations.torch import (
    StateMismatch,
    TrainState,
    environment,
    note_if_not_identical,
    saved_environment,
)
from spotrun.pipelines.base import JobContext, State

FORMAT = "spotrun.hf/1"
TRAINER_STATE = "trainer_state.json"


class SpotrunCallback(TrainerCallback):
    """Checkpoints a ``Trainer.train`` through spotrun and stops it on a notice.

    ``ctx`` is the running job's context. Pass :attr:`resume_from_checkpoint` to
    ``Trainer.train``.
    """

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self._train: TrainState | None = None
        self._trainer_state: TrainerState | None = None
        self._control: TrainerControl | None = None
        self._pending: dict[str, bytes] | None = None  # restored before the first step
        self._resume_dir: str | None = None
        self._logged: dict[str, float] = {}
        self.resumed_from: int | None = None
        if ctx.resume is not None:
            files = ctx.resume.files
            if TRAINER_STATE not in files:
                raise StateMismatch(f"not a {FORMAT} checkpoint: no {TRAINER_STATE}")
            self._pending = dict(files)
            self.resumed_from = int(json.loads(files[TRAINER_STATE])["global_step"])

    @property
    def resume_from_checkpoint(self) -> str | None:
        """What to pass to ``Trainer.train(resume_from_checkpoint=...)``: ``None`` on a
        first attempt, else a directory with the Trainer's JSON state and the weights."""
        if self._pending is None:
            return None
        if self._resume_dir is None:
            self._resume_dir = _write_resume_dir(self._pending)
            weakref.finalize(self, shutil.rmtree, self._resume_dir, True)
        return self._resume_dir

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        scheduler = kwargs.get("lr_scheduler")
        self._train = TrainState(
            modules={"model": model}, optimizers={"optimizer": optimizer},
            schedulers={"scheduler": scheduler} if scheduler is not None else {},
            scaler=getattr(optimizer, "scaler", None))
        self._trainer_state, self._control = state, control
        self.ctx.set_state(self._state)
        if self._pending is not None:
            if state.global_step != self.resumed_from:
                raise RuntimeError(
                    "the job is resuming: pass resume_from_checkpoint="
                    "callback.resume_from_checkpoint to Trainer.train()")
            note_if_not_identical(self.ctx, saved_environment(self._pending),
                                  environment(self._train.device_type()))
            self.ctx.log.info("resuming Trainer.train from step %d", state.global_step)
        if self._resume_dir is not None:  # the Trainer has read it by now
            shutil.rmtree(self._resume_dir, ignore_errors=True)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        if self._pending is not None:
            # Now, not when train() starts: the Trainer draws randomness while it skips the
            # batches already trained on and draws this step's, and an uninterrupted run
            # drew none of that here.
            assert self._train is not None
            self._train.restore(self._pending)
            self._pending = None
        if self.ctx.progress(state.global_step, state.max_steps or None, **self._logged,
                             epoch=round(float(state.epoch or 0), 4)):
            control.should_training_stop = True
            self.ctx.stop()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._logged.update(scalar_metrics(logs or {}))
        self._logged.pop("epoch", None)

    # ----------------------------------------------------------------- capture

    def _state(self) -> State:
        if self._train is None or self._trainer_state is None:  # pragma: no cover
            raise RuntimeError("SpotrunCallback is not attached to a running Trainer")
        trainer_state = self._trainer_state
        if self._control is not None:
            # A dict once the Trainer made it (typed as the list it is made from).
            stateful = cast(dict[str, Any], trainer_state.stateful_callbacks)
            stateful["TrainerControl"] = self._control.state()
        with tempfile.TemporaryDirectory(prefix="spotrun-hf-") as tmp:
            path = Path(tmp) / TRAINER_STATE
            trainer_state.save_to_json(str(path))  # the Trainer's own JSON, as it writes it
            saved = path.read_bytes()
        step = int(trainer_state.global_step)
        state = self._train.as_state(step, {"format": FORMAT})
        return State(step, {**state.files, TRAINER_STATE: saved}, state.meta)


def _write_resume_dir(files: dict[str, bytes]) -> str:
    """A directory ``Trainer.train`` resumes from that holds nothing to unpickle."""
    from safetensors.torch import load, save_file

    tensors = load(files["tensors.safetensors"])
    prefix = "module.model."
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    path = tempfile.mkdtemp(prefix="spotrun-hf-resume-")
    save_file(_unshared(weights), str(Path(path) / "model.safetensors"),
              metadata={"format": "pt"})
    (Path(path) / TRAINER_STATE).write_bytes(files[TRAINER_STATE])
    return path


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if t.numel() and ptr in seen else t
        seen.add(ptr)
    return out


__all__ = ["FORMAT", "SpotrunCallback"]
