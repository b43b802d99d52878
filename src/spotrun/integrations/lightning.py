"""PyTorch Lightning on spotrun: a stock ``Trainer.fit`` that a preemption stops at the next
batch boundary and that resumes, mid-epoch, bit-identically.

Add one callback and make the training data come from :func:`data_loader`::

    spot = SpotrunCheckpoint(ctx)
    trainer = L.Trainer(max_epochs=3, callbacks=[spot], logger=False)
    trainer.fit(model, data_loader(train_set, seed=p.seed, batch_size=32))

:class:`SpotrunCheckpoint` is a Lightning ``Checkpoint``, so Lightning runs it after the
other callbacks and adds no ``ModelCheckpoint`` of its own (no pickled ``.ckpt``). At each
batch boundary after an optimizer step it reports ``ctx.progress(global_step, total,
**logged metrics)``; when the worker wants a checkpoint there, Lightning's own checkpoint
dictionary (weights, optimizers, schedulers, loops, callbacks, precision plugin) is stored
as safetensors + JSON together with every global RNG. When the job must stop, the callback
unwinds ``fit`` with :class:`~spotrun.pipelines.base.JobStopped` right after that
checkpoint: nothing runs in a signal handler, and no code after ``fit`` mistakes a stopped
run for a finished one. On the next attempt the callback hands Lightning that dictionary
before ``fit`` restores anything, and puts the RNGs back just before the first batch.

Mid-epoch resume needs a resumable loader (Lightning saves its position in the checkpoint):
:func:`data_loader` gives one whose order derives from (seed, epoch) only. The random state
seen by training steps is held still across validation, so a resumed run does not depend
on when validation ran; randomness in epoch hooks outside the training steps is not
covered. Bit-identity holds on the same device type, library versions and thread count.

Imports Lightning (``pip install 'spotrun[lightning]'``): only a running pipeline imports
this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import lightning
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from torch.utils.data import DataLoader, Dataset

from spotrun.integrations._common import (
    RngSnapshot,
    scalar_metrics,
    tree_from_files,
    tree_to_files,
)
from spotrun.integrations.torch import (
    STATE_FILE,
    EpochSampler,
    StateMismatch,
    TrainState,
    environment,
    note_if_not_identical,
    saved_environment,
)
from spotrun.pipelines.base import JobContext, State

FORMAT = "spotrun.lightning/1"
_NAME = "lightning"
# Kept for Lightning's load_from_checkpoint only, and free-form: dropped when only pickle
# could store them (resuming never needs them).
_OPTIONAL = ("hyper_parameters", "datamodule_hyper_parameters", "hparams_name",
             "hparams_type")


class SpotrunCheckpoint(Checkpoint):
    """Checkpoints a Lightning ``fit`` through spotrun and stops it on a notice.

    ``ctx`` is the running job's context. The callback reports progress and the metrics
    logged with ``self.log`` at each optimizer step, and resumes from ``ctx.resume``.
    """

    def __init__(self, ctx: JobContext) -> None:
        super().__init__()
        self.ctx = ctx
        self._rng_files: dict[str, bytes] | None = None  # to restore before the next batch
        self._before_validation: RngSnapshot | None = None
        self._steps_seen = -1
        self._trainer: pl.Trainer | None = None
        self.resumed_from: int | None = None

    # ----------------------------------------------------------------- resume

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self.ctx.set_state(self._state)
        if stage != "fit" or self.ctx.resume is None:
            return
        files = self.ctx.resume.files
        checkpoint, doc = tree_from_files(files, _NAME, FORMAT)
        connector = getattr(trainer, "_checkpoint_connector", None)
        if connector is None or not hasattr(connector, "_loaded_checkpoint"):
            raise RuntimeError(f"this Lightning ({lightning.__version__}) cannot be resumed by "
                               "spotrun: its checkpoint connector changed")
        # fit() restores weights, optimizers, schedulers, loops and callbacks from this
        # dictionary, exactly as from a .ckpt file, but nothing is unpickled.
        connector._loaded_checkpoint = checkpoint
        self._rng_files = dict(files)
        self.resumed_from = int(doc.get("step", 0))
        note_if_not_identical(self.ctx, saved_environment(files),
                              environment(_device_type(trainer)))
        self.ctx.log.info("resuming Lightning fit from step %d", self.resumed_from)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps_seen = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._rng_files is not None:
            # Not at restore time: Lightning draws randomness between restoring and the
            # first batch (data loader iterators) that an uninterrupted run drew earlier.
            TrainState().restore(self._rng_files)
            self._rng_files = None

    # ------------------------------------------------------------- boundaries

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._before_validation = RngSnapshot()
        if trainer.global_step == self._steps_seen:
            return  # inside a gradient accumulation: not a boundary
        self._steps_seen = trainer.global_step
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # Lightning resumes from the end of an epoch's last batch, but a checkpoint
            # taken later in that resumed run restarts it wrongly (its epoch counters):
            # the next optimizer step's boundary serves instead.
            return
        metrics = scalar_metrics(trainer.callback_metrics)
        if isinstance(outputs, Mapping) and "loss" in outputs:
            metrics.setdefault("loss", scalar_metrics({"loss": outputs["loss"]})["loss"])
        metrics["epoch"] = trainer.current_epoch
        if self.ctx.progress(trainer.global_step, self._total(trainer), **metrics):
            trainer.should_stop = True
            self.ctx.stop()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation draws randomness (its loaders' seeds, the user's steps) that a resumed
        # run would draw at other moments: training steps never see it.
        if not trainer.sanity_checking and self._before_validation is not None:
            self._before_validation.restore()

    # -------------------------------------------------------------- capture

    def _state(self) -> State:
        trainer = self._trainer
        if trainer is None:  # pragma: no cover - set in setup()
            raise RuntimeError("SpotrunCheckpoint is not attached to a Trainer")
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        step = int(trainer.global_step)
        try:
            files = tree_to_files(checkpoint, _NAME, FORMAT, step=step)
        except TypeError:
            for key in _OPTIONAL:
                checkpoint.pop(key, None)
            files = tree_to_files(checkpoint, _NAME, FORMAT, step=step)
        rng = TrainState().capture()  # the global RNGs
        # The environment recorded there is that of a state without modules (the CPU's):
        # record the device the Trainer trains on instead.
        env = environment(_device_type(trainer))
        doc = json.loads(rng[STATE_FILE])
        doc["env"] = env
        rng[STATE_FILE] = json.dumps(doc, sort_keys=True, allow_nan=True).encode()
        return State(step, {**rng, **files}, {"format": FORMAT, "env": env})

    @staticmethod
    def _total(trainer: pl.Trainer) -> int | None:
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else None


def _device_type(trainer: pl.Trainer) -> str:
    return str(trainer.strategy.root_device.type)


class _ResumableSampler(EpochSampler):
    """An :class:`EpochSampler` whose epoch Lightning sets, that keeps a resumed start
    batch until it is iterated, and whose length is the whole epoch's (Lightning counts the
    batches already consumed itself)."""

    def __init__(self, size: int, *, seed: int, batch_size: int, shuffle: bool) -> None:
        self._resume: tuple[int, int] | None = None
        self.iterated: tuple[int, int] = (0, 0)
        super().__init__(size, seed=seed, batch_size=batch_size, shuffle=shuffle)

    def set_epoch(self, epoch: int, start_batch: int | None = None) -> None:
        if start_batch is None:
            start_batch = self._resume[1] if self._resume and self._resume[0] == epoch else 0
        super().set_epoch(epoch, start_batch)

    def resume_at(self, epoch: int, batch: int) -> None:
        """Start the next iteration at ``batch`` of ``epoch``."""
        if batch >= self.batches(drop_last=False):
            epoch, batch = epoch + 1, 0
        self._resume = (epoch, batch)
        self.set_epoch(epoch, batch)

    def __iter__(self) -> Iterator[int]:
        self._resume = None
        self.iterated = (self.epoch, self.start_batch)
        return super().__iter__()

    def __len__(self) -> int:
        return self.size


class LightningDataLoader(DataLoader[Any]):
    """A ``DataLoader`` over an order derived from (seed, epoch) that Lightning can stop and
    resume at any batch (it has ``state_dict``/``load_state_dict``). Make it with
    :func:`data_loader`."""

    sampler: _ResumableSampler

    def __init__(self, dataset: Dataset[Any], sampler: _ResumableSampler,
                 **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, generator=sampler.generator, **kwargs)
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the data stands: the epoch and the batches of it already handed out."""
        epoch, start = self.sampler.iterated
        return {"epoch": epoch, "batch": start + self._yielded}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.resume_at(int(state["epoch"]), int(state["batch"]))


def data_loader(dataset: Dataset[Any], *, seed: int, batch_size: int, shuffle: bool = True,
                **kwargs: Any) -> LightningDataLoader:
    """A resumable training loader: each epoch's order derives from (seed, epoch); other
    ``DataLoader`` arguments (``num_workers``, ``drop_last``, ...) pass through."""
    for taken in ("sampler", "batch_sampler", "generator", "shuffle"):
        if taken in kwargs:
            raise TypeError(f"data_loader sets {taken} itself")
    if kwargs.get("drop_last"):
        raise TypeError("data_loader resumes whole epochs only: drop_last is not supported")
    sampler = _ResumableSampler(len(dataset),  # type: ignore[arg-type]
                                seed=seed, batch_size=batch_size, shuffle=shuffle)
    return LightningDataLoader(dataset, sampler, batch_size=batch_size, **kwargs)


__all__ = ["FORMAT", "LightningDataLoader", "SpotrunCheckpoint", "StateMismatch",
           "data_loader"]
