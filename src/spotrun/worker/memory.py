"""The per-job memory limit of a CPU worker, and telling an allocation failure from a bug.

Pipelines run on threads of the worker process, so the limit is the process's: an
``RLIMIT_AS`` of the worker's own address space at start plus the job's allowance. An
allocation past it fails (``MemoryError``, torch's "can't allocate memory") inside the
pipeline, which fails the job with words that say so, instead of the kernel's OOM killer
taking the whole worker down. CUDA reserves far more address space than memory, so a
worker with CUDA refuses the limit: a GPU machine bounds memory with its container's
cgroup, and a job the kernel kills there is a poison job (see the store's sweep).
"""

from __future__ import annotations

import re
import resource

from spotrun.config import ConfigError

GB = 1024**3
# torch's prefix to its allocator's words: where in its C++ the check failed.
_ENFORCE = re.compile(r"\A\[enforce fail at [^\]]*\]\s*(?:err == 0\.\s*)?")


def address_space() -> int:
    """This process's virtual address space now, in bytes (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ConfigError("a job memory limit needs Linux (/proc/self/status)")


def apply_limit(job_gb: float, *, has_cuda: bool) -> int:
    """Limit this process's address space to what it maps now plus ``job_gb``; return
    the limit in bytes. The hard limit is kept, so a later call may move it."""
    if has_cuda:
        raise ConfigError(
            "a job memory limit (SPOTRUN_JOB_MEMORY_GB, --memory-limit) is for CPU workers: "
            "CUDA maps far more address space than memory; bound a GPU worker's memory with "
            "its container's limit instead")
    limit = address_space() + int(job_gb * GB)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and limit > hard:
        raise ConfigError(f"a job memory limit of {job_gb:g} GB is above this process's hard "
                          f"address-space limit ({hard / GB:.1f} GB)")
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed for want of memory (CPU)."""
    if isinstance(exc, MemoryError):
        return True
    # torch's CPU allocator: "DefaultCPUAllocator: can't allocate memory: you tried ..."
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def allocation_error(exc: BaseException) -> str:
    """What a failed allocation says, for the job's error (torch's C++ location dropped)."""
    return f"{type(exc).__name__}: {_ENFORCE.sub('', str(exc))}"[:300]
