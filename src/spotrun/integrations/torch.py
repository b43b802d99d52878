"""Capture and restore everything a PyTorch training step depends on, without pickle.

One :class:`TrainState` names the modules, optimizers, LR schedulers, ``GradScaler``,
extra random generators, the data position and user counters of a training loop.
:meth:`TrainState.capture` turns all of it, plus every global RNG (Python ``random``,
NumPy, torch CPU, each initialised CUDA device), into two files: ``tensors.safetensors``
(every tensor) and ``state.json`` (everything else). :meth:`TrainState.restore` puts it back
in place. An optimizer's or scheduler's state dict mixes tensors and plain values; they are
split, the tensors into safetensors and the rest, hyperparameters included, into JSON with
references to the tensors. Nothing is pickled, nothing is unpickled.

A resumed run is bit-identical to an uninterrupted one when it runs on the same device type
with the same library versions and thread count; the checkpoint records them
(:func:`environment`) and :meth:`TrainState.resume` adds a line to the job's history when
they differ.

:class:`EpochSampler` gives a ``DataLoader`` an order per epoch that derives from
(seed, epoch) alone and that can start at any batch of an epoch.

Imports torch (and NumPy when installed): only a running pipeline imports this module.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import random
import re
import sys
from array import array
from collections.abc import Iterator, Mapping, Sized
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from spotrun.pipelines.base import State

if TYPE_CHECKING:
    from spotrun.pipelines.base import JobContext

FORMAT = "spotrun.torch/2"
# The layouts restore() reads: /1 kept the Python and NumPy RNG states as JSON lists; /2
# keeps them as int32 tensors (the uint32 words, bit for bit) in the safetensors file.
READABLE = ("spotrun.torch/1", FORMAT)
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
# Keys of environment() that decide bit-identity; the others are recorded for the reader.
IDENTITY_KEYS = ("device", "torch", "numpy", "threads", "gpu", "cuda", "cudnn")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

Generator = Any  # torch.Generator | numpy.random.Generator | random.Random


class StateMismatch(ValueError):
    """A checkpoint does not fit the :class:`TrainState` it is restored into."""


@dataclass
class DataPosition:
    """Where the loop stands in its data: batches of ``epoch`` already consumed, and how many
    micro-steps of the current gradient accumulation are already in the gradients."""

    epoch: int = 0
    batch: int = 0
    micro: int = 0


@dataclass
class TrainState:
    """The state of one training loop, captured and restored as a whole.

    ``modules``, ``optimizers`` and ``schedulers`` map a name (letters, digits, ``_``, ``-``)
    to the object; ``generators`` to extra random generators the loop owns (a
    ``torch.Generator``, a ``numpy.random.Generator`` or a ``random.Random``). ``counters``
    holds JSON values (numbers, strings, lists, ...). The global RNGs are always captured.
    Gradients present on parameters are captured too, so a checkpoint taken in the middle of
    a gradient accumulation resumes it.
    """

    modules: Mapping[str, torch.nn.Module] = field(default_factory=dict)
    optimizers: Mapping[str, torch.optim.Optimizer] = field(default_factory=dict)
    schedulers: Mapping[str, Any] = field(default_factory=dict)
    scaler: Any = None  # torch.amp.GradScaler
    position: DataPosition = field(default_factory=DataPosition)
    counters: dict[str, Any] = field(default_factory=dict)
    generators: Mapping[str, Generator] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in ("modules", "optimizers", "schedulers", "generators"):
            for name in getattr(self, kind):
                if not _NAME.match(name):
                    raise ValueError(f"{kind} name {name!r}: use 1-64 letters, digits, _ or -")

    # ---------------------------------------------------------------- capture

    def capture(self) -> dict[str, bytes]:
        """Everything the next step depends on, as ``{file name: bytes}``."""
        return self._capture()[0]

    def as_state(self, step: int, meta: Mapping[str, Any] | None = None) -> State:
        """A checkpoint for ``ctx.set_state``: the captured files, the environment recorded
        in the manifest too."""
        files, env = self._capture()
        return State(step, files, {"format": FORMAT, "env": env, **(meta or {})})

    def _capture(self) -> tuple[dict[str, bytes], dict[str, Any]]:
        # One pass per module: its state dict, its gradients and its devices. A checkpoint
        # is taken at every notice, so the fixed cost here is kept to what must be read.
        tensors: dict[str, torch.Tensor] = {}
        types: set[str] = set()
        for name, module in self.modules.items():
            prefix, grad_prefix = f"module.{name}.", f"grad.{name}."
            for key, value in module.state_dict().items():
                tensors[prefix + key] = value
            for key, param in module.named_parameters():
                types.add(param.device.type)
                if param.grad is not None:
                    tensors[grad_prefix + key] = param.grad
        env = environment(_device_type(types))
        doc: dict[str, Any] = {
            "format": FORMAT, "env": env, "modules": sorted(self.modules),
            "optimizers": {name: _encode(opt.state_dict(), f"optim.{name}", tensors)
                           for name, opt in self.optimizers.items()},
            "schedulers": {name: _encode(s.state_dict(), f"sched.{name}", tensors)
                           for name, s in self.schedulers.items()},
            "scaler": (None if self.scaler is None
                       else _encode(self.scaler.state_dict(), "scaler", tensors)),
            "rng": _capture_global_rngs(tensors),
            "generators": {name: _capture_generator(g, f"gen.{name}", tensors)
                           for name, g in self.generators.items()},
            "position": asdict(self.position),
            "counters": self.counters,
        }
        try:
            text = json.dumps(doc, sort_keys=True, allow_nan=True)
        except TypeError as exc:
            raise TypeError(f"TrainState.counters must hold JSON values: {exc}") from None
        return {TENSORS_FILE: _serialize(tensors), STATE_FILE: text.encode()}, env

    # ---------------------------------------------------------------- restore

    def restore(self, files: Mapping[str, bytes]) -> None:
        """Put a captured state back in place: weights, gradients, optimizers, schedulers,
        scaler, generators, every global RNG, the position and the counters.

        Raises :class:`StateMismatch` naming what does not fit.
        """
        from safetensors.torch import load

        missing = [f for f in (TENSORS_FILE, STATE_FILE) if f not in files]
        if missing:
            raise StateMismatch(f"not a spotrun.torch checkpoint: no {', '.join(missing)}")
        doc = json.loads(files[STATE_FILE])
        if doc.get("format") not in READABLE:
            raise StateMismatch(f"checkpoint format {doc.get('format')!r} is not one of "
                                f"{', '.join(map(repr, READABLE))}")
        tensors = load(files[TENSORS_FILE])
        # Everything that can be checked is checked before anything changes.
        _same_names("modules", self.modules, doc["modules"])
        _same_names("optimizers", self.optimizers, doc["optimizers"])
        _same_names("schedulers", self.schedulers, doc["schedulers"])
        _same_names("generators", self.generators, doc["generators"])
        if (self.scaler is None) != (doc["scaler"] is None):
            raise StateMismatch("checkpoint has a GradScaler and this TrainState none, or the "
                                "other way round")
        for name, module in self.modules.items():
            _check_module(name, module, tensors)
        saved_opts = {name: _decode(doc["optimizers"][name], tensors)
                      for name in self.optimizers}
        for name, opt in self.optimizers.items():
            _check_optimizer(name, opt, saved_opts[name])
        for name, module in self.modules.items():
            _restore_module(name, module, tensors)
        for name, opt in self.optimizers.items():
            try:
                opt.load_state_dict(saved_opts[name])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise StateMismatch(f"optimizer {name!r} does not fit the checkpoint: "
                                    f"{_first_line(exc)}") from None
        for name, sched in self.schedulers.items():
            sched.load_state_dict(_decode(doc["schedulers"][name], tensors))
        if self.scaler is not None:
            self.scaler.load_state_dict(_decode(doc["scaler"], tensors))
        for name, gen in self.generators.items():
            _restore_generator(name, gen, doc["generators"][name], tensors)
        _restore_global_rngs(doc["rng"], tensors)
        for key, value in doc["position"].items():
            setattr(self.position, key, value)
        self.counters.clear()
        self.counters.update(doc["counters"])

    def resume(self, ctx: JobContext) -> bool:
        """Restore from ``ctx.resume`` if the job has a checkpoint; True if it had.

        Adds a line to the job's history when the resume will not be bit-identical.
        """
        if ctx.resume is None:
            return False
        self.restore(ctx.resume.files)
        note_if_not_identical(ctx, saved_environment(ctx.resume.files),
                              environment(self.device_type()))
        return True

    def device_type(self) -> str:
        """``cuda`` if any module has a parameter on a GPU, else the first device seen."""
        return _device_type({p.device.type for m in self.modules.values()
                             for p in m.parameters()})


def _device_type(types: set[str]) -> str:
    if "cuda" in types:
        return "cuda"
    return sorted(types)[0] if types else "cpu"


# ----------------------------------------------------------------- environment


def environment(device_type: str = "cpu") -> dict[str, Any]:
    """What bit-identity depends on (device type, versions, thread count), plus Python's
    version for the reader. Recorded in every checkpoint."""
    env: dict[str, Any] = {"device": device_type, "threads": torch.get_num_threads(),
                           **_versions()}
    if device_type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
    return env


@functools.cache
def _versions() -> dict[str, str]:
    """The versions environment() records: fixed for the life of the process."""
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import numpy

        versions["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover - numpy is in the ml extra
        pass
    return versions


def saved_environment(files: Mapping[str, bytes]) -> dict[str, Any]:
    """The environment a checkpoint was written in (empty if it did not record one)."""
    try:
        env = json.loads(files[STATE_FILE]).get("env", {})
    except (KeyError, ValueError, AttributeError):
        return {}
    return env if isinstance(env, dict) else {}


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``["threads 2 -> 1", ...]``: what differs among the keys that decide bit-identity.
    A key the checkpoint did not record is not counted (older checkpoints)."""
    return [f"{key} {saved[key]} -> {current.get(key)}" for key in IDENTITY_KEYS
            if key in saved and saved[key] != current.get(key)]


def note_if_not_identical(ctx: JobContext, saved: Mapping[str, Any],
                          current: Mapping[str, Any]) -> bool:
    """Tell the job's history when a resume will not be bit-identical; True if it told."""
    changed = differences(saved, current)
    if changed:
        ctx.note(f"resumed on different hardware or software ({', '.join(changed)}): the "
                 "result will be correct but not bit-identical to an uninterrupted run")
    return bool(changed)


def weights_sha256(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over a module's state dict (or any named tensors) in a canonical order:
    name, dtype, shape, bytes. Equal digests mean equal weights, bit for bit."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(json.dumps(list(t.shape)).encode())
        # Through a byte view: NumPy has no bfloat16.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# --------------------------------------------------------------------- data order


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``range(size)`` for ``epoch``: a function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=gen)


class EpochSampler(Sampler[int]):
    """Indices in an order that derives from (seed, epoch), starting at any batch.

    Call :meth:`set_epoch` before iterating each epoch (``start_batch`` skips the batches
    already consumed). Pass :attr:`generator` to the ``DataLoader`` too: without one, every
    ``iter(loader)`` draws its worker seed from the global torch RNG, which a resumed run
    would then consume at another moment than an uninterrupted one. With it, worker
    processes are seeded from (seed, epoch); randomness inside workers that must survive a
    mid-epoch resume has to derive from the sample's index, since a resumed epoch hands its
    batches to the workers in another rotation. :func:`data_loader` wires both (a
    ``DataLoader`` over this sampler with ``drop_last`` also works: the start is counted
    in whole batches).
    """

    def __init__(self, data: Sized | int, *, seed: int, batch_size: int,
                 shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.size = data if isinstance(data, int) else len(data)
        self.seed = seed
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate ``epoch`` from its batch ``start_batch`` on (0 is the epoch's start)."""
        if start_batch < 0:
            raise ValueError("start_batch must be non-negative")
        self.epoch, self.start_batch = epoch, start_batch
        self.generator.manual_seed((self.seed * 1_000_003 + epoch) ^ 0x5EED_5EED)

    def order(self, epoch: int) -> torch.Tensor:
        """Every index of ``epoch`` in its order."""
        if not self.shuffle:
            return torch.arange(self.size)
        return epoch_order(self.size, self.seed, epoch)

    def batches(self, drop_last: bool = False) -> int:
        """Batches in one epoch."""
        return self.size // self.batch_size if drop_last else -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start_batch * self.batch_size:].tolist())

    def __len__(self) -> int:
        return max(0, self.size - self.start_batch * self.batch_size)


class ResumableLoader(DataLoader[Any]):
    """A ``DataLoader`` over an :class:`EpochSampler` and its generator (see there).

    Call :meth:`set_epoch` before iterating each epoch; :meth:`batches_per_epoch` counts
    an epoch's batches (``drop_last`` included).
    """

    epoch_sampler: EpochSampler

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate ``epoch`` from its batch ``start_batch`` on."""
        self.epoch_sampler.set_epoch(epoch, start_batch)

    def batches_per_epoch(self) -> int:
        return self.epoch_sampler.batches(drop_last=self.drop_last)


def data_loader(dataset: Dataset[Any], *, seed: int, batch_size: int, shuffle: bool = True,
                **kwargs: Any) -> ResumableLoader:
    """A :class:`ResumableLoader` whose order derives from (seed, epoch).

    Any other ``DataLoader`` argument passes through (``num_workers``, ``drop_last``, ...).
    """
    for taken in ("sampler", "batch_sampler", "generator"):
        if taken in kwargs:
            raise TypeError(f"data_loader sets {taken} itself")
    sampler = EpochSampler(len(dataset), seed=seed,  # type: ignore[arg-type]
                           batch_size=batch_size, shuffle=shuffle)
    loader = ResumableLoader(dataset, batch_size=batch_size, sampler=sampler,
                             generator=sampler.generator, **kwargs)
    loader.epoch_sampler = sampler
    return loader


# ------------------------------------------------------------- the JSON + tensors tree


_PLAIN = frozenset({type(None), bool, int, float, str})


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON tree of ``obj`` whose tensors go into ``tensors`` by path, replaced by
    ``{"$tensor": name}``; tuples and non-string keys are kept exactly."""
    if type(obj) in _PLAIN:  # most leaves: checked first, by the cheapest test
        return obj
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"$tensor": path}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        if all(type(v) in _PLAIN for v in obj):  # a param group's ids: nothing to walk
            return list(obj)
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {"$items": [[_encode(k, f"{path}.k{i}", tensors),
                            _encode(v, f"{path}.{k}", tensors)]
                           for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"{path}: a {type(obj).__name__} cannot be stored without pickle")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"$tensor"}:
            try:
                return tensors[obj["$tensor"]]
            except KeyError:
                raise StateMismatch(f"checkpoint lacks the tensor {obj['$tensor']!r}") from None
        if set(obj) == {"$tuple"}:
            return tuple(_decode(v, tensors) for v in obj["$tuple"])
        if set(obj) == {"$items"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["$items"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: on the CPU, contiguous, no two sharing memory (tied
    weights, views) - a shared one is copied, the others are passed as they are."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if t.requires_grad:  # state dicts and optimizer slots are detached already
            t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel():
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key in seen:
                t = t.clone()
            else:
                seen.add(key)
        out[name] = t
    return out


def _serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors file of ``tensors``.

    Written by safetensors' own serializer from each tensor's memory: the same bytes as
    ``safetensors.torch.save``, without its per-tensor NumPy view and its second search for
    shared memory (``_for_safetensors`` has made every tensor contiguous, on the CPU and
    unshared). Where that serializer is not there (safetensors before 0.8) or the machine
    is big-endian (the format is little-endian), ``save`` itself.
    """
    ready = _for_safetensors(tensors)
    if _TensorSpec is None or sys.byteorder != "little":
        from safetensors.torch import save

        return save(ready)
    specs = {}
    for name, t in ready.items():
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            dtype = _DTYPE_NAMES[t.dtype] = str(t.dtype).split(".")[-1]
        size = t.nbytes
        # An empty tensor may have no memory: point at a live byte, with length 0.
        specs[name] = _TensorSpec(dtype=dtype, shape=t.shape, data_len=size,
                                  data_ptr=t.data_ptr() if size else _EMPTY_PTR)
    # ``ready`` holds every tensor alive until the bytes are copied out.
    data = bytes(_serialize_specs(specs))
    del ready
    return data


_TensorSpec: Any
try:
    from safetensors import TensorSpec as _TensorSpec
    from safetensors import serialize as _serialize_specs
except ImportError:  # pragma: no cover - safetensors before 0.8
    _TensorSpec = None
_DTYPE_NAMES: dict[torch.dtype, str] = {}
_EMPTY = torch.zeros(8, dtype=torch.uint8)
_EMPTY_PTR = _EMPTY.data_ptr()


def _same_names(kind: str, mine: Mapping[str, Any], saved: Any) -> None:
    if set(mine) != set(saved):
        raise StateMismatch(f"checkpoint has {kind} {sorted(saved)}, this TrainState has "
                            f"{sorted(mine)}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_module(name: str, module: torch.nn.Module,
                  tensors: Mapping[str, torch.Tensor]) -> None:
    prefix = f"module.{name}."
    saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    mine = module.state_dict()
    missing, unexpected = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or unexpected:
        raise StateMismatch(f"module {name!r} does not fit the checkpoint: missing "
                            f"{missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in mine.items():
        if tuple(value.shape) != tuple(saved[key].shape):
            raise StateMismatch(
                f"module {name!r} does not fit the checkpoint: {key} has shape "
                f"{list(value.shape)} here, {list(saved[key].shape)} in the checkpoint")


def _check_optimizer(name: str, opt: torch.optim.Optimizer, saved: Any) -> None:
    groups = saved.get("param_groups", []) if isinstance(saved, dict) else []
    mine = [len(g["params"]) for g in opt.param_groups]
    theirs = [len(g.get("params", [])) for g in groups]
    if mine != theirs:
        raise StateMismatch(f"optimizer {name!r} does not fit the checkpoint: parameters per "
                            f"group {mine} here, {theirs} in the checkpoint")


def _restore_module(name: str, module: torch.nn.Module,
                    tensors: Mapping[str, torch.Tensor]) -> None:
    prefix, grad_prefix = f"module.{name}.", f"grad.{name}."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise StateMismatch(f"module {name!r} does not fit the checkpoint: "
                            f"{_first_line(exc)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise StateMismatch(
            f"module {name!r} does not fit the checkpoint: missing "
            f"{list(result.missing_keys)[:5]}, unexpected {list(result.unexpected_keys)[:5]}")
    for key, param in module.named_parameters():
        grad = tensors.get(grad_prefix + key)
        param.grad = None if grad is None else grad.to(device=param.device, dtype=param.dtype)


def _capture_global_rngs(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    # The Mersenne Twister states (625 and 624 words) go into the safetensors file as int32
    # tensors, bit for bit: as JSON lists they were most of state.json and of the time a
    # small checkpoint took.
    version, internal, gauss = random.getstate()
    tensors["rng.python"] = _words_tensor(array("I", internal))
    rng: dict[str, Any] = {"python": {"version": version, "gauss": gauss}, "numpy": None}
    tensors["rng.torch"] = torch.get_rng_state()
    try:
        import numpy

        name, keys, pos, has_gauss, cached = numpy.random.get_state(legacy=True)
        words = numpy.asarray(keys, dtype=numpy.uint32)
        tensors["rng.numpy"] = torch.from_numpy(words.view(numpy.int32))
        rng["numpy"] = {"name": name, "pos": int(pos), "has_gauss": int(has_gauss),
                        "gauss": float(cached)}
    except ImportError:  # pragma: no cover - numpy is in the ml extra
        pass
    # Only devices already in use: asking an untouched GPU for its state would start CUDA.
    started = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    cuda = torch.cuda.get_rng_state_all() if started else []
    for i, state in enumerate(cuda):
        tensors[f"rng.cuda.{i}"] = state
    rng["cuda_devices"] = len(cuda)
    return rng


def _words_tensor(words: array[int]) -> torch.Tensor:
    """uint32 words as an int32 tensor holding the same bits (safetensors' torch side has no
    uint32 before torch 2.3)."""
    return torch.frombuffer(bytearray(words), dtype=torch.int32) if len(words) else \
        torch.zeros(0, dtype=torch.int32)


def _tensor_words(t: torch.Tensor) -> tuple[int, ...]:
    """The uint32 words an int32 tensor of :func:`_words_tensor` holds."""
    words = array("I")
    words.frombytes(t.contiguous().view(torch.uint8).numpy().tobytes())
    return tuple(words)


def _restore_global_rngs(rng: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    python = rng["python"]
    if isinstance(python, list):  # spotrun.torch/1: [version, words, gauss]
        version, internal, gauss = python
        random.setstate((version, tuple(internal), gauss))
    else:
        random.setstate((python["version"], _tensor_words(tensors["rng.python"]),
                         python["gauss"]))
    torch.set_rng_state(tensors["rng.torch"])
    saved = rng.get("numpy")
    if saved is not None:
        import numpy

        if isinstance(saved, list):  # spotrun.torch/1: [name, keys, pos, has_gauss, cached]
            name, keys, pos, has_gauss, cached = saved
            words = numpy.array(keys, dtype=numpy.uint32)
        else:
            name, pos, has_gauss, cached = (saved["name"], saved["pos"], saved["has_gauss"],
                                            saved["gauss"])
            words = tensors["rng.numpy"].numpy().view(numpy.uint32).copy()
        numpy.random.set_state((name, words, pos, has_gauss, cached))
    count = int(rng.get("cuda_devices", 0))
    if count and torch.cuda.is_available():
        # set_rng_state is lazy: it applies when CUDA starts. A machine with fewer GPUs
        # restores those it has (the environment note already says devices differ).
        for i in range(min(count, torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)


def _capture_generator(gen: Generator, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(gen, torch.Generator):
        tensors[path] = gen.get_state()
        return {"kind": "torch", "device": str(gen.device)}
    if isinstance(gen, random.Random):
        version, internal, gauss = gen.getstate()
        return {"kind": "python", "state": [version, list(internal), gauss]}
    state = getattr(getattr(gen, "bit_generator", None), "state", None)
    if isinstance(state, dict):
        return {"kind": "numpy", "state": _arrays_to_lists(state)}
    raise TypeError(f"{path}: a {type(gen).__name__} is not a torch, NumPy or Python "
                    "generator")


def _restore_generator(name: str, gen: Generator, saved: Mapping[str, Any],
                       tensors: Mapping[str, torch.Tensor]) -> None:
    kind = saved.get("kind")
    if isinstance(gen, torch.Generator) and kind == "torch":
        gen.set_state(tensors[f"gen.{name}"])
    elif isinstance(gen, random.Random) and kind == "python":
        version, internal, g = saved["state"]
        gen.setstate((version, tuple(internal), g))
    elif kind == "numpy" and hasattr(gen, "bit_generator"):
        gen.bit_generator.state = _lists_to_arrays(saved["state"])
    else:
        raise StateMismatch(f"generator {name!r} is a {type(gen).__name__}, the checkpoint "
                            f"holds a {kind} generator")


def _arrays_to_lists(obj: Any) -> Any:
    """A NumPy bit generator's state (a dict that may hold arrays) as JSON."""
    if isinstance(obj, dict):
        return {k: _arrays_to_lists(v) for k, v in obj.items()}
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):
        return {"$array": obj.tolist(), "dtype": str(obj.dtype)}
    return obj


def _lists_to_arrays(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"$array", "dtype"}:
            import numpy

            return numpy.array(obj["$array"], dtype=obj["dtype"])
        return {k: _lists_to_arrays(v) for k, v in obj.items()}
    return obj


__all__ = [
    "FORMAT",
    "READABLE",
    "DataPosition",
    "EpochSampler",
    "ResumableLoader",
    "StateMismatch",
    "TrainState",
    "data_loader",
    "differences",
    "environment",
    "epoch_order",
    "note_if_not_identical",
    "saved_environment",
    "weights_sha256",
]
