"""Checkpoints on any fsspec filesystem, committed by a manifest written last.

Layout under the store's root::

    jobs/<job id>/a<attempt>-s<step>/<data files...>, MANIFEST.json
    jobs/<job id>/a<attempt>-s<step>-<tag>/files/<relative paths...>, MANIFEST.json
    models/<job id>/a<attempt>/<data files...>, MANIFEST.json
    inputs/<name>          files users place there for pipelines to read (no manifest)

The second form is a directory checkpoint (a command job's ``SPOTRUN_CHECKPOINT_DIR``):
files are streamed from and to a local directory, never held in memory, and each commit
gets a path of its own, so a commit never writes over the one the job points to.

A checkpoint exists for readers only once its manifest is written. The manifest lists every
file's size and BLAKE3 digest (``sha256`` in manifests written before spotrun used BLAKE3,
which are still read); a load verifies both, so a truncated, corrupt or half-written
checkpoint is reported, never loaded. Paths carry the job and the attempt, so files a zombie
worker leaves behind can never be taken for the lease holder's: a job's model is the one of
the attempt whose result the store accepted (a fenced write), never the last one written.
Nothing here unpickles.

On object stores (``s3://``, ``gs://``) there is no atomic rename: each object is written by
one PUT (or a multipart upload that is aborted on failure), so an object is whole or absent,
and the manifest, written last, is the commit. Credentials come only from the provider's own
chain (environment, profile, instance identity); an S3 endpoint other than AWS comes from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, as in the AWS SDKs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import blake3

log = logging.getLogger("spotrun.checkpoints")

MANIFEST = "MANIFEST.json"
DIR_FILES = "files"  # a directory checkpoint's files live under this prefix
FORMAT_VERSION = 1
_CHUNK = 8 << 20
# Files from this size on are written past the page cache (O_DIRECT): copying a large
# state into fresh cache pages ran at 0.4-0.8 GB/s on our VMs, the direct write at 1.6 GB/s,
# and a notice's budget is what a large checkpoint is short of. Smaller ones gain nothing.
_DIRECT_MIN = 64 << 20
_DIRECT_ALIGN = 4096  # what O_DIRECT asks of offsets and lengths on common file systems
_FILE_THREADS = 4  # files of a directory checkpoint copied at once
# The digest new manifests record. BLAKE3 hashes at ~6 GB/s on one core against sha256's
# ~1.4 GB/s (with SHA-NI): hashed beside a 1.7 GB/s direct write, sha256 was what a
# notice's large checkpoint waited on. Manifests that name "sha256" are still verified.
DIGEST = "blake3"
_DIGESTS = ("blake3", "sha256")
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


class CheckpointExists(Exception):
    """A save aimed at a committed checkpoint, which is never written again."""


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
        if self.local and not os.path.exists(self.root):
            # Checkpoints hold users' models and data: a local root spotrun makes is
            # private to the user running it.
            with contextlib.suppress(OSError):  # reported at the first write instead
                os.makedirs(self.root, mode=0o700, exist_ok=True)

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r})"

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # ----------------------------------------------------------------- writing

    def save(
        self, job_id: str, attempt: int, step: int, files: Mapping[str, bytes],
        meta: Mapping[str, Any] | None = None,
    ) -> Saved:
        """Write a job's checkpoint and commit it; return its path relative to the root.

        Refuses (:class:`CheckpointExists`) to write into a committed checkpoint: a pointer
        may name it, and a reader may be loading it.
        """
        rel = f"jobs/{job_id}/a{attempt:04d}-s{step:09d}"
        if self.exists(rel):
            raise CheckpointExists(f"the checkpoint {rel} is committed already")
        return self._write(rel, step, files, meta or {}, {"job": job_id, "attempt": attempt})

    def save_model(self, job_id: str, files: Mapping[str, bytes],
                   meta: Mapping[str, Any] | None = None, *, attempt: int = 1) -> Saved:
        """Write an attempt's final model under models/, where any worker or host can load it.

        It becomes the job's model only if the store accepts this attempt's result.
        """
        return self._write(model_path(job_id, attempt), int((meta or {}).get("step", 0)),
                           files, meta or {}, {"job": job_id, "attempt": attempt})

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
            listing[name] = {"size": len(data), DIGEST: self._write_file(
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
        digest = _new_digest(DIGEST)
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
                if len(view) < _DIRECT_MIN or not _write_direct(path, view):
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

    # ------------------------------------------------- directory checkpoints

    def save_dir(self, job_id: str, attempt: int, step: int, source: str | os.PathLike[str],
                 meta: Mapping[str, Any] | None = None, *, final: bool = False) -> Saved:
        """Commit the regular files under the local directory ``source`` (nested paths
        kept, symlinks and other special files skipped) as a job's checkpoint.

        Each file is streamed and hashed chunk by chunk; the manifest, written last, is the
        commit. The caller must keep ``source`` still while this runs. With ``final``
        nothing writes to ``source`` ever again (its program has exited and the directory
        is about to be deleted): a store on the same local filesystem then hard-links
        each file instead of copying it, and only reads it to hash it.
        """
        start = time.perf_counter()
        rel = f"jobs/{job_id}/a{attempt:04d}-s{step:09d}-{secrets.token_hex(4)}"
        directory = self._abs(rel)
        files = [(f"{DIR_FILES}/{relpath}", path)
                 for relpath, path in _regular_files(os.fspath(source))]
        # Files in parallel: reading, hashing, writing and fsync all release the GIL.
        with ThreadPoolExecutor(_FILE_THREADS, "spotrun-checkpoint") as pool:
            done = list(pool.map(
                lambda f: self._put_file(f[1], f"{directory}/{f[0]}", link=final), files))
        listing = {name: {"size": size, DIGEST: digest}
                   for (name, _path), (size, digest) in zip(files, done, strict=True)}
        total = sum(size for size, _digest in done)
        manifest = {"format": FORMAT_VERSION, "job": job_id, "attempt": attempt,
                    "step": step, "kind": "directory", "files": listing,
                    "meta": dict(meta or {}), "created_at": time.time()}
        if not self.object_store:
            self.fs.makedirs(directory, exist_ok=True)
        self._write_file(f"{directory}/{MANIFEST}",
                         json.dumps(manifest, sort_keys=True).encode())
        return Saved(rel, step, total, time.perf_counter() - start)

    def restore_dir(self, rel: str, dest: str | os.PathLike[str]) -> Loaded:
        """Write the files of the directory checkpoint ``rel`` into the empty local
        directory ``dest``, verifying each file's size and digest as it streams.

        Raises :class:`CheckpointCorrupt` (``dest`` emptied again) if any file fails; the
        returned :class:`Loaded` has no files in memory, only the step and the meta.
        """
        directory = self._abs(rel)
        target = os.fspath(dest)
        raw = self._read(f"{directory}/{MANIFEST}", "its manifest",
                         missing="its manifest is missing (never committed)")
        try:
            manifest = json.loads(raw)
            files_meta = dict(manifest["files"])
            step = int(manifest["step"])
            fmt = manifest["format"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointCorrupt("its manifest is not valid JSON of the expected shape"
                                    ) from None
        if fmt != FORMAT_VERSION:
            raise CheckpointCorrupt(f"format version {fmt!r} is not {FORMAT_VERSION}")
        try:
            todo = [(name, os.path.join(target, _safe_relpath(name)),
                     info if isinstance(info, dict) else {})
                    for name, info in files_meta.items()]
            with ThreadPoolExecutor(_FILE_THREADS, "spotrun-restore") as pool:
                list(pool.map(lambda t: self._get_file(f"{directory}/{t[0]}", t[1], t[0],
                                                       t[2]), todo))
        except BaseException:
            _empty(target)
            raise
        return Loaded(rel, step, {}, dict(manifest.get("meta") or {}))

    def _put_file(self, src: str, dst: str, *, link: bool = False) -> tuple[int, str]:
        """Copy a local file to ``dst`` in the store: (bytes, digest of those bytes)."""
        digest = _new_digest(DIGEST)
        size = 0
        if self.local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if link and _hard_link(src, dst):
                # The same bytes, written to disk once (by the fsync) instead of twice.
                with open(dst, "rb") as fh:
                    for chunk in _chunks(fh):
                        size += len(chunk)
                        digest.update(chunk)
                    os.fsync(fh.fileno())
                return size, digest.hexdigest()
            with open(src, "rb") as fin, open(dst, "wb") as fout:
                for chunk in _chunks(fin):
                    size += len(chunk)
                    _hash_beside(digest, chunk, fout.write)
                fout.flush()
                os.fsync(fout.fileno())
            return size, digest.hexdigest()
        # Object stores: one upload (aborted on failure, so the object is whole or
        # absent), hashed from the local file beside it.
        hasher = threading.Thread(target=_hash_file, args=(src, digest),
                                  name="spotrun-checkpoint-hash")
        hasher.start()
        try:
            self.fs.put_file(src, dst)
        finally:
            hasher.join()
        return os.path.getsize(src), digest.hexdigest()

    def _get_file(self, src: str, dst: str, name: str, info: Mapping[str, Any]) -> None:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        algo = _digest_of(name, info)
        digest = _new_digest(algo)
        try:
            if self.local:
                with open(src, "rb") as fin, open(dst, "wb") as fout:
                    for chunk in _chunks(fin):
                        _hash_beside(digest, chunk, fout.write)
            else:
                self.fs.get_file(src, dst)
                _hash_file(dst, digest)
        except FileNotFoundError:
            raise CheckpointCorrupt(f"file {name} is missing") from None
        except OSError as exc:
            if self.local:
                raise CheckpointCorrupt(f"file {name} cannot be read "
                                        f"({exc.strerror or type(exc).__name__})") from None
            raise self._unavailable(f"file {name}", exc) from None
        except CheckpointCorrupt:
            raise
        except Exception as exc:
            raise self._unavailable(f"file {name}", exc) from None
        size = os.path.getsize(dst)
        if size != info.get("size"):
            raise CheckpointCorrupt(f"file {name} has {size} bytes, the manifest says "
                                    f"{info.get('size')} (truncated?)")
        if digest.hexdigest() != info[algo]:
            raise CheckpointCorrupt(f"file {name} fails its {algo} check (corrupted)")

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
            algo = _digest_of(name, info)
            data = self._read(f"{directory}/{name}", f"file {name}")
            if len(data) != info.get("size"):
                raise CheckpointCorrupt(
                    f"file {name} has {len(data)} bytes, the manifest says {info.get('size')}"
                    " (truncated?)")
            if _new_digest(algo, data).hexdigest() != info[algo]:
                raise CheckpointCorrupt(f"file {name} fails its {algo} check (corrupted)")
            files[name] = data
        return Loaded(rel, step, files, dict(manifest.get("meta") or {}))

    def _read(self, path: str, what: str, *, missing: str | None = None) -> bytes:
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            raise CheckpointCorrupt(missing or f"{what} is missing") from None
        except OSError as exc:
            # EIO, ESTALE, EACCES, a hung NFS mount timing out: the read failed, which says
            # nothing of the data. Only verified damage (size, checksum, a missing or
            # unreadable manifest) may make a worker drop a pointer for good.
            raise self._unavailable(f"{what}", exc) from None
        except Exception as exc:
            # Network errors of the object store's client (not OSErrors): an outage.
            raise self._unavailable(f"{what}", exc) from None

    def load_model(self, job_id: str, attempt: int = 1) -> Loaded:
        """The model of this attempt of the job (the job's attempt, once it succeeded)."""
        rel = model_path(job_id, attempt)
        if not self.exists(rel) and self.exists(f"models/{job_id}"):
            rel = f"models/{job_id}"  # written before models had an attempt of their own
        return self.load(rel)

    def delete_model(self, job_id: str, attempt: int) -> None:
        """Delete the model one attempt wrote (an attempt whose result was refused)."""
        self.delete(model_path(job_id, attempt))

    def delete_other_models(self, job_id: str, keep: int) -> None:
        """Delete the models of every attempt of a job but ``keep``, the one that won."""
        try:
            entries = self.fs.ls(self._abs(f"models/{job_id}"), detail=False)
        except FileNotFoundError:
            return
        mine = model_path(job_id, keep).rsplit("/", 1)[1]
        for entry in entries:
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("a") and name[1:].isdigit() and name != mine:
                self.delete(f"models/{job_id}/{name}")

    def read_input(self, rel: str) -> bytes:
        """Read a file a user placed under ``inputs/`` (with any tool: cp, aws s3 cp, gcloud
        storage cp); :class:`InputMissing` if it is not there."""
        path = self._abs(check_input_path(rel))
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            raise InputMissing(f"{rel} is not in the checkpoint store") from None
        except IsADirectoryError:
            raise InputMissing(f"{rel} in the checkpoint store is a directory, "
                               "not a file") from None
        except Exception as exc:
            raise self._unavailable(f"{rel}", exc) from None

    def _unavailable(self, what: str, exc: BaseException) -> CheckpointUnavailable:
        """The error for a read that failed: the store's URL and the client's words (which
        name endpoints, hosts and paths) go to this process's log, not into the job's
        history or error, which its user reads."""
        log.warning("%s cannot be read from %s: %s: %s", what, self.url,
                    type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
        return CheckpointUnavailable(f"{what} cannot be read from the checkpoint store "
                                     f"({type(exc).__name__})")

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


def model_path(job_id: str, attempt: int) -> str:
    """Where attempt ``attempt`` of a job writes its final model, relative to the root."""
    return f"models/{job_id}/a{attempt:04d}"


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
    elif os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default"):
        # A GCS emulator takes no credentials; looking for real ones would only find
        # something to send to it (or wait on a metadata server that is not there).
        options["token"] = "anon"
    return options


def _regular_files(root: str) -> Iterator[tuple[str, str]]:
    """(relative path with '/', absolute path) of every regular file under ``root``."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            yield os.path.relpath(path, root).replace(os.sep, "/"), path


def _write_direct(path: str, view: memoryview) -> bool:
    """Write ``view`` as the file ``path`` past the page cache, fsynced. False, with
    nothing lost, where the file system refuses O_DIRECT: the caller writes it plainly.

    Whole blocks go through one page-aligned buffer of ``_CHUNK`` bytes (the only copy);
    the last partial block, and anything after a short write, goes through the cache.
    """
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags | direct, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    try:
        whole = len(view) - len(view) % _DIRECT_ALIGN
        off = 0
        with mmap.mmap(-1, _CHUNK) as buf:
            aligned = memoryview(buf)
            try:
                while off < whole:
                    n = min(_CHUNK, whole - off)
                    aligned[:n] = view[off:off + n]
                    done = os.write(fd, aligned[:n])
                    off += done
                    if done != n:
                        break  # the rest may be unaligned now: through the cache
            except OSError as exc:
                if off or exc.errno != errno.EINVAL:
                    raise
                return False  # refused at the first write (some FUSE and network mounts)
            finally:
                aligned.release()
        if off < len(view):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~direct)
            while off < len(view):
                off += os.write(fd, view[off:off + _CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


class _Hasher(Protocol):
    """What hashlib's and blake3's hashers both offer."""

    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def _new_digest(algo: str, data: bytes = b"") -> _Hasher:
    """A fresh hasher of ``algo`` (one of ``_DIGESTS``), fed ``data``."""
    if algo == "blake3":
        return blake3.blake3(data)
    return hashlib.sha256(data)


def _digest_of(name: str, info: Any) -> str:
    """The digest a manifest's entry for file ``name`` records, or CheckpointCorrupt."""
    if isinstance(info, Mapping):
        for algo in _DIGESTS:
            if isinstance(info.get(algo), str):
                return algo
    raise CheckpointCorrupt(f"its manifest gives no checksum for file {name}")


def _hard_link(src: str, dst: str) -> bool:
    """Hard-link ``src`` at ``dst``; False where the filesystem cannot (another device,
    no links), so that the caller copies instead."""
    try:
        os.link(src, dst)
    except OSError:
        return False
    return True


def _safe_relpath(name: str) -> str:
    """A manifest's file name as a path inside the restored directory, or CheckpointCorrupt:
    a crafted manifest must not write outside it."""
    prefix = f"{DIR_FILES}/"
    rel = name[len(prefix):] if name.startswith(prefix) else ""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) \
            or "\0" in rel:
        raise CheckpointCorrupt(f"its manifest names a bad file path {name!r}")
    return os.path.join(*parts)


def _chunks(fh: Any) -> Iterator[bytes]:
    while True:
        chunk = fh.read(_CHUNK)
        if not chunk:
            return
        yield chunk


def _hash_beside(digest: _Hasher, chunk: bytes, write: Any) -> None:
    """Write ``chunk`` while another thread hashes it: both release the GIL."""
    if len(chunk) < _CHUNK:
        digest.update(chunk)
        write(chunk)
        return
    hasher = threading.Thread(target=digest.update, args=(chunk,),
                              name="spotrun-checkpoint-hash")
    hasher.start()
    try:
        write(chunk)
    finally:
        hasher.join()


def _hash_file(path: str, digest: _Hasher) -> None:
    with open(path, "rb") as fh:
        for chunk in _chunks(fh):
            digest.update(chunk)


def _empty(directory: str) -> None:
    """Remove what is inside ``directory``, keeping the directory itself."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _protocols(fs: Any) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)
