"""``spotrun doctor``: check that a deployment can hear a preemption notice and act on it.

Each check returns a :class:`Check` with status ``ok``, ``warn`` or ``fail``, a detail a
person can read and, when something is wrong, the fix. ``main`` prints them (text or JSON)
and returns 1 when any check failed; warnings do not fail. The checks are read-only: the
database is not migrated, the checkpoint probe deletes what it wrote, and no network call
is made except to the endpoints this deployment asked for, with timeouts of at most 1 s
(the checkpoint store, a real network store, gets a longer bound).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from spotrun import checkpoints, migrations, watchers
from spotrun.config import ConfigError, Settings
from spotrun.shutdown import ShutdownCoordinator
from spotrun.store import DatabaseUnavailable, JobStore, normalize_url, password_of, redact

Status = Literal["ok", "warn", "fail"]
T = TypeVar("T")

#: The fix for the ``sh -c`` trap, shared by the text and the tests.
SHELL_FIX = ('use the exec form ENTRYPOINT ["tini", "--", "spotrun", "worker"] (or '
             '["spotrun", "worker"]), or `exec spotrun worker` as the last line of the script')

# Shells never pass SIGTERM on to their children; as PID 1 they do not even die of it.
SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh", "ksh", "mksh", "yash", "fish",
                    "csh", "tcsh"})
# Container inits and supervisors that forward SIGTERM to the process they started.
FORWARDING_INITS = frozenset({"tini", "tini-static", "dumb-init", "catatonit", "docker-init",
                              "s6-svscan", "runsvdir", "supervisord"})
# The init of a whole OS (a VM, a laptop): services get SIGTERM from it at shutdown.
OS_INITS = frozenset({"systemd", "init", "launchd", "openrc-init"})

CHECKPOINT_PROBE_SECONDS = 20.0
METADATA_TIMEOUT_SECONDS = 1.0
PG_CONNECT_TIMEOUT_SECONDS = 5


@dataclass(frozen=True)
class Check:
    """The outcome of one check: what was checked, how it went, and the fix if any."""

    check: str
    status: Status
    detail: str
    fix: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return asdict(self)


@dataclass(frozen=True)
class Proc:
    """What /proc says about one process."""

    pid: int
    comm: str
    argv: tuple[str, ...]
    ppid: int = 0

    @property
    def name(self) -> str:
        """The program's name: argv[0]'s base name (``-bash`` for login shells too)."""
        if self.argv:
            return os.path.basename(self.argv[0]).lstrip("-")
        return self.comm

    def show(self) -> str:
        text = " ".join(self.argv) if self.argv else self.comm
        return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------- signal path


def read_proc(pid: int, proc_root: Path = Path("/proc")) -> Proc | None:
    """The process ``pid`` as /proc shows it, or None when it cannot be read."""
    base = proc_root / str(pid)
    try:
        comm = (base / "comm").read_text().strip()
        raw = (base / "cmdline").read_bytes()
        status = (base / "status").read_text()
    except OSError:
        return None
    argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    ppid = 0
    for line in status.splitlines():
        if line.startswith("PPid:"):
            with contextlib.suppress(ValueError):
                ppid = int(line.split()[1])
            break
    return Proc(pid=pid, comm=comm, argv=argv, ppid=ppid)


def ancestors(pid: int, proc_root: Path = Path("/proc")) -> list[Proc]:
    """The parent chain of ``pid``, nearest first; ends at PID 1 when ``pid`` descends
    from it, or earlier at a parent outside this PID namespace (``kubectl exec``)."""
    chain: list[Proc] = []
    me = read_proc(pid, proc_root)
    ppid = me.ppid if me else 0
    while ppid > 0 and len(chain) < 64:
        parent = read_proc(ppid, proc_root)
        if parent is None:
            break
        chain.append(parent)
        if parent.pid == 1:
            break
        ppid = parent.ppid
    return chain


def is_shell(p: Proc) -> bool:
    """Whether ``p`` is a shell (``sh -c ...`` or a ``#!/bin/sh`` script, whose comm is the
    script's name but whose argv[0] is the shell)."""
    return p.comm in SHELLS or p.name in SHELLS


def children(pid: int, proc_root: Path = Path("/proc")) -> list[Proc]:
    """The processes whose parent is ``pid`` (in a container, a handful to scan)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in proc_root.iterdir():
            if entry.name.isdigit():
                p = read_proc(int(entry.name), proc_root)
                if p is not None and p.ppid == pid:
                    found.append(p)
    return sorted(found, key=lambda p: p.pid)


def _forwards(p: Proc) -> bool:
    return p.comm in FORWARDING_INITS or p.name in FORWARDING_INITS


def _is_spotrun(p: Proc) -> bool:
    return any(os.path.basename(a) == "spotrun" for a in p.argv[:3])


def classify_signal_path(self_pid: int, pid1: Proc | None, chain: Sequence[Proc],
                         init_children: Sequence[Proc] = ()) -> Check:
    """Judge whether a SIGTERM sent to the container reaches spotrun.

    The runtime (docker stop, the kubelet, a preempted VM's shutdown) signals PID 1 of the
    container. ``chain`` is our parent chain, nearest first (see :func:`ancestors`);
    ``init_children`` are PID 1's children, which is where the worker sits when the doctor
    runs beside it (``kubectl exec``).
    """
    name = "signal path"
    if self_pid == 1:
        return Check(name, "ok", "spotrun is PID 1 and installs its own SIGTERM handler "
                     "(a PID 1 without one would ignore SIGTERM)")
    if pid1 is None:
        return Check(name, "warn", "cannot read /proc/1: not Linux, or /proc is hidden, so "
                     "the signal path is unknown",
                     "make sure the container starts spotrun in exec form, e.g. "
                     'ENTRYPOINT ["tini", "--", "spotrun", "worker"]')
    if is_shell(pid1):
        return Check(name, "fail", f"PID 1 is a shell ({pid1.show()}): it does not pass "
                     "SIGTERM on, so spotrun never hears the notice and is SIGKILLed when "
                     "the grace period ends", SHELL_FIX)
    reaches_pid1 = bool(chain) and chain[-1].pid == 1
    if _forwards(pid1):
        between = [p for p in chain if p.pid != 1 and is_shell(p)] if reaches_pid1 else []
        between += [p for p in init_children if is_shell(p) and p not in between]
        if between:
            return Check(name, "fail", f"PID 1 is {pid1.name}, but spotrun runs under a shell "
                         f"({between[-1].show()}): {pid1.name} sends SIGTERM to its child, "
                         "the shell, which does not pass it on", SHELL_FIX)
        return Check(name, "ok", f"PID 1 is {pid1.name}, an init that forwards SIGTERM to "
                     "the process it started")
    if _is_spotrun(pid1):
        return Check(name, "ok", f"PID 1 is spotrun itself ({pid1.show()}); it installs its "
                     "own SIGTERM handler")
    if pid1.comm in OS_INITS or pid1.name in OS_INITS:
        # A whole OS: our parent chain is a terminal or a service manager, not the path a
        # notice takes, so it is not judged here.
        return Check(name, "ok", f"PID 1 is {pid1.name}: a full OS, not a container; run the "
                     "worker as a service, which gets SIGTERM at shutdown (and preemption)")
    if pid1.name == "pause" or pid1.comm == "pause":
        return Check(name, "warn", "PID 1 is the pod's pause process (shareProcessNamespace): "
                     "the runtime signals each container's first process, which this check "
                     "cannot see", "make sure the worker container starts spotrun in exec "
                     "form, with no shell in between")
    return Check(name, "warn", f"PID 1 is {pid1.show()}, which is not known to forward "
                 "SIGTERM to spotrun", 'run spotrun as PID 1 or under tini, in exec form: '
                 'ENTRYPOINT ["tini", "--", "spotrun", "worker"]')


def check_signal_path(proc_root: Path = Path("/proc")) -> Check:
    me = os.getpid()
    pid1 = read_proc(1, proc_root)
    # Only an init's children matter, and scanning /proc is not free on a big host.
    kids = children(1, proc_root) if pid1 is not None and _forwards(pid1) else []
    return classify_signal_path(me, pid1, ancestors(me, proc_root), kids)


# --------------------------------------------------------------------- database


@contextlib.contextmanager
def _pg_connect_timeout() -> Iterator[None]:
    # libpq waits for the OS's TCP timeout (minutes) on a black-holed host; a doctor must
    # answer in seconds. PGCONNECT_TIMEOUT is read by libpq at connect time.
    old = os.environ.get("PGCONNECT_TIMEOUT")
    if old is None:
        os.environ["PGCONNECT_TIMEOUT"] = str(PG_CONNECT_TIMEOUT_SECONDS)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PGCONNECT_TIMEOUT", None)


def _scrub(text: str, url: str) -> str:
    """``text`` with the URL's password removed, whatever printed it."""
    password = password_of(url)
    return text.replace(str(password), "***") if password else text


def check_database(settings: Settings) -> Check:
    name = "database"
    url = normalize_url(settings.database_url)
    shown = redact(url)
    if shown.startswith("<"):
        # Never echo a URL that cannot be parsed: its password cannot be told apart.
        return Check(name, "fail", "SPOTRUN_DATABASE_URL is not a database URL",
                     "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB")
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            return Check(name, "warn", f"no database yet at {shown}; the first spotrun "
                         "command creates it", "run `spotrun jobs` once, or start a worker")
    fix = ("check SPOTRUN_DATABASE_URL, that the database (or the Cloud SQL Auth Proxy) is "
           "running, and the network path to it")
    try:
        with _pg_connect_timeout():
            store = JobStore.open(url, migrate=False, pool_size=1)
            try:
                current = store.current_revision()
            finally:
                store.close()
    except DatabaseUnavailable as exc:
        return Check(name, "fail", _scrub(str(exc), url), fix)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return Check(name, "fail", _scrub(f"cannot use the database at {shown}: "
                                          f"{type(exc).__name__}: {first}", url), fix)
    head = migrations.head_revision()
    if current == head:
        return Check(name, "ok", f"{shown} answers; schema at the newest revision ({head})")
    if current is None:
        return Check(name, "warn", f"{shown} answers but has no spotrun schema yet",
                     "start a worker or run `spotrun jobs` once: they create it")
    return Check(name, "warn", f"{shown} answers; schema at revision {current}, this spotrun "
                 f"expects {head}", "run any spotrun command of the newest version (it "
                 "upgrades the schema), or upgrade spotrun if the database is newer")


# ------------------------------------------------------------------ checkpoints


def redact_location(url: str) -> str:
    """A storage URL without credentials (``s3://key:secret@bucket`` happens)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _scrub_location(text: str, url: str) -> str:
    """``text`` without the credentials of the storage URL, whatever printed it."""
    netloc = urlsplit(url).netloc
    if "@" not in netloc:
        return text
    userinfo = netloc.rsplit("@", 1)[0]
    for secret in (userinfo, *userinfo.split(":")[1:]):
        if secret:
            text = text.replace(secret, "***")
    return text


def _with_timeout(fn: Callable[[], T], seconds: float) -> T:
    """``fn()``, or TimeoutError after ``seconds`` (the call is left on a daemon thread)."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(fn())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, name="spotrun-doctor-probe", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if errors:
        raise errors[0]
    return results[0]


def check_checkpoints(settings: Settings, *, remote_expected: bool = False) -> Check:
    name = "checkpoint store"
    url = settings.checkpoint_url
    shown = redact_location(url)
    try:
        # Looked up on the module at each call, so a test can stand in for the library.
        seconds = _with_timeout(lambda: checkpoints.CheckpointStore(url).probe(),
                                CHECKPOINT_PROBE_SECONDS)
    except ImportError as exc:
        extra = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "s3a": "s3"}.get(
            urlsplit(url).scheme, "")
        fix = f"pip install 'spotrun[{extra}]'" if extra else "install the fsspec backend " \
            "for this URL"
        return Check(name, "fail", f"cannot use {shown}: {_scrub_location(str(exc), url)}",
                     fix)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return Check(name, "fail", f"cannot write to {shown}: {type(exc).__name__}: "
                     + _scrub_location(first, url),
                     "check SPOTRUN_CHECKPOINT_URL and that this machine's identity may "
                     "write there")
    local = "://" not in url or url.startswith("file://")
    if local and remote_expected:
        return Check(name, "warn", f"{shown} is writable ({seconds:.2f} s round trip), but "
                     "on this machine's disk: a preempted VM's disk goes with it, so no "
                     "other worker can resume from these checkpoints",
                     "set SPOTRUN_CHECKPOINT_URL to a bucket (gs://..., s3://...)")
    return Check(name, "ok", f"{shown} is writable ({seconds:.2f} s round trip)")


# ------------------------------------------------------------------------- GPUs


def _gpu_models(proc_root: Path) -> list[str]:
    # The NVIDIA driver lists its GPUs here; reading it needs no torch and no CUDA init.
    models: list[str] = []
    gpus = proc_root / "driver" / "nvidia" / "gpus"
    with contextlib.suppress(OSError):
        for info in sorted(gpus.glob("*/information")):
            model = next((line.split(":", 1)[1].strip()
                          for line in info.read_text().splitlines()
                          if line.startswith("Model:")), "unknown model")
            models.append(model)
    return models


def check_gpus(dev_root: Path = Path("/dev"), proc_root: Path = Path("/proc")) -> Check:
    import importlib.util

    name = "GPUs"
    if not (dev_root / "nvidiactl").exists():
        return Check(name, "warn", "no GPU visible (no /dev/nvidiactl): this worker runs "
                     "CPU jobs only and never claims jobs that need CUDA",
                     "on a GPU node, request nvidia.com/gpu in the pod's resources")
    models = _gpu_models(proc_root)
    listed = f"{len(models)} GPU(s): {', '.join(models)}" if models else "/dev/nvidiactl present"
    if importlib.util.find_spec("torch") is None:
        return Check(name, "warn", f"{listed}, but torch is not installed",
                     "pip install 'spotrun[ml]' (a CUDA build of torch)")
    import torch

    if not torch.cuda.is_available():
        return Check(name, "fail", f"{listed}, but torch {torch.__version__} cannot use CUDA "
                     f"(built for CUDA {torch.version.cuda})",
                     "install a torch build for this driver's CUDA version")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return Check(name, "ok", f"torch {torch.__version__} sees {len(names)} GPU(s): "
                 + ", ".join(names))


# ----------------------------------------------------------- preemption notices

DMI_DIR = Path("/sys/class/dmi/id")
_AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"


def detect_cloud(dmi_dir: Path = DMI_DIR) -> str | None:
    """``gce``, ``aws`` or ``azure`` from the DMI strings the hypervisor sets, else None.
    No network. (The fallback for a watchers module without ``detect_clouds``.)"""
    dmi: dict[str, str] = {}
    for key in ("sys_vendor", "product_name", "bios_vendor", "chassis_asset_tag"):
        with contextlib.suppress(OSError):
            dmi[key] = (dmi_dir / key).read_text().strip()
    if dmi.get("product_name") == "Google Compute Engine" or dmi.get("bios_vendor") == "Google":
        return "gce"
    if "amazon" in (dmi.get("sys_vendor", "") + dmi.get("bios_vendor", "")).lower():
        return "aws"
    if dmi.get("chassis_asset_tag") == _AZURE_ASSET_TAG:
        return "azure"
    return None


def detect_clouds(dmi_dir: Path = DMI_DIR) -> list[str]:
    """The clouds this machine seems to run on, as the watchers judge it (no network)."""
    detect = getattr(watchers, "detect_clouds", None)
    if detect is not None:
        return list(detect(None, dmi_dir))
    cloud = detect_cloud(dmi_dir)
    return [cloud] if cloud else []


def _request(endpoint: Any, method: str, path: str, headers: dict[str, str]
             ) -> tuple[int, str]:
    # http.client, not urllib: a metadata server must never be asked through a proxy.
    cls = (http.client.HTTPSConnection if endpoint.scheme == "https"
           else http.client.HTTPConnection)
    conn = cls(endpoint.host, endpoint.port, timeout=METADATA_TIMEOUT_SECONDS)
    try:
        conn.request(method, endpoint.prefix + path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(200).decode(errors="replace").strip()
    finally:
        conn.close()


def probe_watcher(watcher: Any) -> str:
    """Ask a watcher's metadata server about preemption once, each request bounded by 1 s;
    return what it said. Raises OSError (or TimeoutError) when it does not answer."""
    source, ep = watcher.source, watcher.endpoint
    if source == "gce":
        headers = dict(getattr(watcher, "HEADERS", {"Metadata-Flavor": "Google"}))
        code, body = _request(ep, "GET", "/computeMetadata/v1/instance/preempted", headers)
        return f"instance/preempted={body or '?'} (HTTP {code})"
    if source == "aws":
        code, token = _request(ep, "PUT", "/latest/api/token",
                               {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        if code != 200:
            return f"token request answered HTTP {code}"
        path = getattr(watcher, "ACTION_PATH", "/latest/meta-data/spot/instance-action")
        code, body = _request(ep, "GET", path, {"X-aws-ec2-metadata-token": token})
        return "spot/instance-action: nothing pending" if code == 404 else \
            f"spot/instance-action: HTTP {code} {body[:80]}"
    if source == "azure":
        path = getattr(watcher, "EVENTS_PATH", "/metadata/scheduledevents?api-version=2020-07-01")
        code, _ = _request(ep, "GET", path, dict(getattr(watcher, "HEADERS", {"Metadata": "true"})))
        return f"scheduled events: HTTP {code}"
    return "no probe for this source"


def check_preemption_sources(dmi_dir: Path = DMI_DIR) -> Check:
    name = "preemption notices"
    raw = os.environ.get("SPOTRUN_PREEMPTION_SOURCES")
    clouds = detect_clouds(dmi_dir)
    parts = [f"SPOTRUN_PREEMPTION_SOURCES={raw if raw is not None else '(unset: auto)'}",
             "SIGTERM always heard",
             f"cloud: {', '.join(clouds)}" if clouds else "no cloud detected"]
    build = getattr(watchers, "watchers_from_env", None)
    if build is None:
        return Check(name, "warn", "; ".join([*parts, "this spotrun has no metadata watchers"]),
                     "upgrade spotrun to hear the clouds' notices ahead of SIGTERM")
    try:
        # Built, never started: the doctor only asks each metadata server once.
        built = build(ShutdownCoordinator(), None, dmi_dir)
    except ConfigError as exc:
        return Check(name, "fail", str(exc), "correct SPOTRUN_PREEMPTION_SOURCES")
    silent: list[str] = []
    for w in built:
        try:
            # The bound covers the name lookup too, which has no timeout of its own.
            said = _with_timeout(functools.partial(probe_watcher, w),
                                 2 * METADATA_TIMEOUT_SECONDS)
            parts.append(f"{w.source} at {w.endpoint} answers: {said}")
        except (OSError, http.client.HTTPException) as exc:
            silent.append(f"{w.source} at {w.endpoint} does not answer "
                          f"({type(exc).__name__}: {exc})")
    detail = "; ".join(parts + silent)
    if silent:
        return Check(name, "warn", detail, "drop the sources that do not answer from "
                     "SPOTRUN_PREEMPTION_SOURCES, or fix the path to the metadata server "
                     "(EC2 containers need a hop limit of 2; Azure's first answer can take "
                     "minutes)")
    watched = {w.source for w in built}
    missing = [c for c in clouds if c in ("aws", "azure") and c not in watched]
    if missing:
        ahead = {"aws": "2 minutes", "azure": "30 s or more"}
        return Check(name, "warn", detail + "; " + "; ".join(
            f"on {c} the notice comes {ahead[c]} ahead through the metadata server only, "
            "SIGTERM only at the very end" for c in missing),
            f"add {','.join(missing)} (or auto) to SPOTRUN_PREEMPTION_SOURCES")
    if not built:
        parts.append("watching signals only")
    return Check(name, "ok", "; ".join(parts))


# ------------------------------------------------------------------ grace budget


def check_grace_budget(settings: Settings) -> Check:
    name = "grace budget"
    budget = settings.grace_seconds
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return Check(name, "ok", f"SPOTRUN_GRACE_SECONDS={budget:g}; not in Kubernetes, so "
                     "no pod grace period to compare it with")
    raw = os.environ.get("SPOTRUN_POD_TERMINATION_GRACE_SECONDS")
    if not raw:
        return Check(name, "warn", f"SPOTRUN_GRACE_SECONDS={budget:g}, but the pod's "
                     "terminationGracePeriodSeconds is unknown",
                     "set the env var SPOTRUN_POD_TERMINATION_GRACE_SECONDS to the pod's "
                     "terminationGracePeriodSeconds (deploy/ does)")
    try:
        pod = float(raw)
    except ValueError:
        return Check(name, "warn", f"SPOTRUN_POD_TERMINATION_GRACE_SECONDS={raw!r} is not a "
                     "number", "set it to the pod's terminationGracePeriodSeconds")
    if budget > pod:
        return Check(name, "fail", f"SPOTRUN_GRACE_SECONDS={budget:g} is longer than the pod's "
                     f"terminationGracePeriodSeconds={pod:g}: the kubelet SIGKILLs the worker "
                     "before its budget ends, in the middle of a hand-back",
                     f"set SPOTRUN_GRACE_SECONDS to at most {pod:g} (a little less leaves "
                     "time for the exit and the sidecars)")
    note = (" (GKE Spot nodes give pods at most 15 s at preemption, whatever they ask)"
            if pod > 15 else "")
    return Check(name, "ok", f"SPOTRUN_GRACE_SECONDS={budget:g} fits in the pod's "
                 f"terminationGracePeriodSeconds={pod:g}{note}")


# ------------------------------------------------------------------------- main


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    """Run a check; a check that crashes is reported as a failure, not a traceback."""
    try:
        return fn()
    except Exception as exc:
        return Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}",
                     "report this as a bug in spotrun doctor")


def run_checks(settings: Settings) -> list[Check]:
    """Every check, in the order a notice travels: signal, database, storage, GPUs,
    notice sources, grace budget."""
    return [
        _guard("signal path", check_signal_path),
        _guard("database", lambda: check_database(settings)),
        # Checkpoints on a local disk are fine on a laptop, lost with a preempted VM.
        _guard("checkpoint store", lambda: check_checkpoints(settings, remote_expected=bool(
            os.environ.get("KUBERNETES_SERVICE_HOST") or detect_clouds()))),
        _guard("GPUs", check_gpus),
        _guard("preemption notices", check_preemption_sources),
        _guard("grace budget", lambda: check_grace_budget(settings)),
    ]


def format_check(c: Check) -> str:
    """One line: status, check, detail, and the fix when there is one."""
    line = f"{c.status.upper():<4}  {c.check}: {c.detail}"
    return f"{line}; fix: {c.fix}" if c.fix else line


def main(settings: Settings, *, as_json: bool, echo: Callable[[str], None]) -> int:
    """Print every check (text, or a JSON list of {check, status, detail, fix}); return 1
    when any failed, else 0."""
    start = time.monotonic()
    checks = run_checks(settings)
    if as_json:
        echo(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        for c in checks:
            echo(format_check(c))
        counts = {s: sum(c.status == s for c in checks) for s in ("fail", "warn", "ok")}
        warns = f"{counts['warn']} warning" + ("" if counts["warn"] == 1 else "s")
        echo(f"doctor: {counts['fail']} failed, {warns}, {counts['ok']} ok "
             f"({time.monotonic() - start:.1f} s)")
    return 1 if any(c.status == "fail" for c in checks) else 0
