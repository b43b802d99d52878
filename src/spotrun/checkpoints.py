"""Checkpoints on any fsspec filesystem, committed by a manifest written last.

Layout under the store's root::

    jobs/<job id>/a<attempt>-s<step>/<data files...>, MANIFEST.json
    models/<job id>/<data files...>, MANIFEST.json
    inputs/<name>          files users place there for pipelines to read (no manifest)

A checkpoint exists for readers only once its manifest is written. The manifest lists every
file's size and sha256; a load verifies both, so a truncated, corrupt or half-written
checkpoint is reported, never loaded. Paths carry the job and the attempt, so files a zombie
worker leaves behind can never be taken for the lease holder's. Nothing here unpickles.

On object stores (``s3://``, ``gs://``) there is no atomic rename: each object is written by
one PUT (or a multipart upload that is aborted on failure), so an object is whole or absent,
and the manifest, written last, is the commit. Credentials come only from the provider's own
chain (environment, profile, instance identity); an S3 endpoint other than AWS comes from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, as in the AWS SDKs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1
_CHUNK = 8 << 20
# Object stores: no directories to make (making one can create the bucket), no rename.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs"})
INPUTS = "inputs/"
_INPUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class CheckpointConfigError(ValueError):
    """The checkpoint URL names a filesystem that cannot be used here."""


class CheckpointUnavailable(Exception):
    """The store could not be reached or refused access; the checkpoint may well be fine."""


class CheckpointCorrupt(Exception):
    """A checkpoint failed verification; the message says why."""


class InputMissing(LookupError):
    """A pipeline's input file is not in the checkpoint store."""


def check_input_path(rel: str) -> str:
    """``rel`` if it names a file under ``inputs/``, else ValueError saying why."""
    parts = rel.split("/")
    if not rel.startswith(INPUTS) or len(parts) < 2:
        raise ValueError(f"{rel!r} is not under {INPUTS} (e.g. {INPUTS}texts.txt)")
    for part in parts[1:]:
        if not _INPUT_NAME.match(part) or part in (".", ".."):
            raise ValueError(f"{rel!r}: each part of the path must be letters, digits, "
                             "'.', '_' or '-' (and not '.' or '..')")
    return rel


@dataclass(frozen=True)
class Saved:
    path: str
    step: int
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class Loaded:
    path: str
    step: int
    files: dict[str, bytes]
    meta: dict[str, Any]


class CheckpointStore:
    """Writes, verifies, loads and deletes checkpoints and final models under one URL."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **_storage_options(url))
        except (ValueError, ImportError) as exc:
            raise CheckpointConfigError(
                f"SPOTRUN_CHECKPOINT_URL={url!r} cannot be used: {exc} (s3:// needs "
                "`pip install spotrun[s3]`, gs:// needs `pip install spotrun[gcs]`)") from None
        self.root = root.rstrip("/")
        protocols = _protocols(self.fs)
        self.local = "file" in protocols
        self.object_store = bool(protocols & _OBJECT_STORES)

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r})"

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # ----------------------------------------------------------------- writing

    def save(
        self, job_id: str, attempt: int, step: int, files: Mapping[str, bytes],
        meta: Mapping[str, Any] | None = None,
    ) -> Saved:
        """Write a job's checkpoint and commit it; return its path relative to the root."""
        rel = f"jobs/{job_id}/a{attempt:04d}-s{step:09d}"
        return self._write(rel, step, files, meta or {}, {"job": job_id, "attempt": attempt})

    def save_model(self, job_id: str, files: Mapping[str, bytes],
                   meta: Mapping[str, Any] | None = None) -> Saved:
        """Write a job's final model under models/, where any worker or host can load it."""
        return self._write(f"models/{job_id}", int((meta or {}).get("step", 0)), files,
                           meta or {}, {"job": job_id})

    def _write(self, rel: str, step: int, files: Mapping[str, bytes],
               meta: Mapping[str, Any], extra: Mapping[str, Any]) -> Saved:
        for name in files:
            if name == MANIFEST or "/" in name or name.startswith("."):
                raise ValueError(f"bad checkpoint file name {name!r}")
        start = time.perf_counter()
        directory = self._abs(rel)
        if not self.object_store:
            self.fs.makedirs(directory, exist_ok=True)
        listing: dict[str, dict[str, Any]] = {}
        total = 0
        for name, data in files.items():
            listing[name] = {"size": len(data), "sha256": self._write_file(
                f"{directory}/{name}", data)}
            total += len(data)
        manifest = {
            "format": FORMAT_VERSION,
            **extra,
            "step": step,
            "files": listing,
            "meta": dict(meta),
            "created_at": time.time(),
        }
        # The manifest goes last: it is the commit, on object stores as on disks.
        self._write_file(f"{directory}/{MANIFEST}",
                         json.dumps(manifest, sort_keys=True).encode())
        return Saved(rel, step, total, time.perf_counter() - start)

    def _write_file(self, path: str, data: bytes) -> str:
        digest = hashlib.sha256()
        view = memoryview(data)
        # Hash on another thread while writing: both release the GIL, so a large checkpoint
        # costs the slower of the two instead of their sum.
        hasher: threading.Thread | None = None
        if len(view) >= _CHUNK:
            hasher = threading.Thread(target=digest.update, args=(view,),
                                      name="spotrun-checkpoint-hash")
            hasher.start()
        else:
            digest.update(view)
        try:
            if self.local:
                # Plain files, fsynced: on a local disk the manifest must not reach the disk
                # before the data it vouches for.
                with open(path, "wb") as fh:
                    for i in range(0, len(view), _CHUNK):
                        fh.write(view[i:i + _CHUNK])
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                # One call that writes the whole object or fails: a file object opened "wb"
                # would upload what it holds when an error leaves its `with` block.
                self.fs.pipe_file(path, data)
        finally:
            if hasher is not None:
                hasher.join()
        return digest.hexdigest()

    # ----------------------------------------------------------------- reading

    def load(self, rel: str) -> Loaded:
        """Read and verify a committed checkpoint, or raise :class:`CheckpointCorrupt`."""
        directory = self._abs(rel)
        raw = self._read(f"{directory}/{MANIFEST}", "its manifest",
                         missing="its manifest is missing (never committed)")
        try:
            manifest = json.loads(raw)
            files_meta = manifest["files"]
            step = int(manifest["step"])
            fmt = manifest["format"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointCorrupt("its manifest is not valid JSON of the expected shape"
                                    ) from None
        if fmt != FORMAT_VERSION:
            raise CheckpointCorrupt(f"format version {fmt!r} is not {FORMAT_VERSION}")
        files: dict[str, bytes] = {}
        for name, info in files_meta.items():
            data = self._read(f"{directory}/{name}", f"file {name}")
            if len(data) != info.get("size"):
                raise CheckpointCorrupt(
                    f"file {name} has {len(data)} bytes, the manifest says {info.get('size')}"
                    " (truncated?)")
            if hashlib.sha256(data).hexdigest() != info.get("sha256"):
                raise CheckpointCorrupt(f"file {name} fails its sha256 check (corrupted)")
            files[name] = data
        return Loaded(rel, step, files, dict(manifest.get("meta") or {}))

    def _read(self, path: str, what: str, *, missing: str | None = None) -> bytes:
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            raise CheckpointCorrupt(missing or f"{what} is missing") from None
        except OSError as exc:
            if self.local:  # a local read error is the disk's: treat the data as bad
                raise CheckpointCorrupt(f"{what} cannot be read: {exc}") from None
            raise CheckpointUnavailable(f"{what} cannot be read from {self.url}: "
                                        f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:
            # Network errors of the object store's client (not OSErrors): an outage.
            raise CheckpointUnavailable(f"{what} cannot be read from {self.url}: "
                                        f"{type(exc).__name__}: {exc}") from None

    def load_model(self, job_id: str) -> Loaded:
        return self.load(f"models/{job_id}")

    def read_input(self, rel: str) -> bytes:
        """Read a file a user placed under ``inputs/`` (with any tool: cp, aws s3 cp, gcloud
        storage cp); :class:`InputMissing` if it is not there."""
        path = self._abs(check_input_path(rel))
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            raise InputMissing(f"{rel} is not in the checkpoint store {self.url}") from None
        except IsADirectoryError:
            raise InputMissing(f"{rel} in the checkpoint store {self.url} is a directory, "
                               "not a file") from None
        except Exception as exc:
            raise CheckpointUnavailable(f"{rel} cannot be read from {self.url}: "
                                        f"{type(exc).__name__}: {exc}") from None

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(f"{self._abs(rel)}/{MANIFEST}"))

    # ---------------------------------------------------------------- deleting

    def delete(self, rel: str) -> None:
        """Delete one checkpoint: its manifest first, so it is never half-visible."""
        directory = self._abs(rel)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{directory}/{MANIFEST}")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(directory, recursive=True)

    def delete_job(self, job_id: str) -> None:
        """Delete every checkpoint of an ended job (its model under models/ stays)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._abs(f"jobs/{job_id}"), recursive=True)

    def probe(self) -> float:
        """Round-trip a small object; return the seconds it took (raises on failure)."""
        start = time.perf_counter()
        rel = f"probe/{os.getpid()}-{time.time_ns()}"
        saved = self._write(rel, 0, {"probe.bin": b"spotrun"}, {}, {})
        self.load(saved.path)
        self.delete(rel)
        return time.perf_counter() - start


def _storage_options(url: str) -> dict[str, Any]:
    """Options for the URL's filesystem: what S3 and GCS need, nothing else."""
    from fsspec.utils import get_protocol

    protocol = get_protocol(url)
    if protocol not in _OBJECT_STORES:
        return {}
    # Listings cached in this process could hide a manifest another worker just wrote.
    options: dict[str, Any] = {"use_listings_cache": False}
    if protocol in ("s3", "s3a"):
        # Recent botocore reads these by itself; older ones need them passed.
        ignore = os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"
        endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        if endpoint and not ignore:
            options["endpoint_url"] = endpoint
    return options


def _protocols(fs: Any) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)
