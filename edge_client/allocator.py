"""The device process's memory allocator: the C library's malloc, as Python starts with, or jemalloc.

A training step frees and reallocates activations of many sizes. glibc's malloc keeps what was freed in its heaps
(a process's resident size stays near its high-water mark, and fragments); jemalloc hands freed pages back on its
own and reuses sizes better. On SmolLM2 LoRA at 4 x 128 tokens with every memory lever on, jemalloc's steps
peaked ~120 MB lower and ran faster than glibc's (docs/reproduction.md, "The allocator, and a load that stays
under the step"). It is a system library (Debian and Ubuntu: `apt install libjemalloc2`; Ray ships a copy), not
a Python package, so it is chosen when the process starts: `edgelora client --allocator jemalloc` starts itself
again with the library preloaded (LD_PRELOAD), before torch is imported. $EDGELORA_JEMALLOC names the library
where the loader cannot find it.

A leaf of the device side: the standard library only.
"""
from __future__ import annotations

import ctypes.util
import importlib.util
import os
import sys
from pathlib import Path

ALLOCATORS = ("system", "jemalloc")
_STARTED_AGAIN = "EDGELORA_ALLOCATOR_RESTARTED"  # set on the restart: a preload that did not take is an error,
#                                                  not a loop


class AllocatorError(RuntimeError):
    pass


def jemalloc_path(env: dict | None = None) -> str | None:
    """The jemalloc library to preload: $EDGELORA_JEMALLOC where set, else what the dynamic loader finds, else the
    copy Ray ships (ray/core/libjemalloc.so, where Ray is installed)."""
    env = os.environ if env is None else env
    given = env.get("EDGELORA_JEMALLOC")
    if given:
        if not Path(given).is_file():
            raise AllocatorError(f"EDGELORA_JEMALLOC={given!r}: no such file")
        return given
    found = ctypes.util.find_library("jemalloc")
    if found:
        return found
    ray = importlib.util.find_spec("ray")
    for folder in (ray.submodule_search_locations or []) if ray else []:
        bundled = Path(folder) / "core" / "libjemalloc.so"
        if bundled.is_file():
            return str(bundled)
    return None


def in_use() -> str:
    """The allocator this process's malloc is: "jemalloc" where jemalloc's own entry point (mallctl) is among the
    process's global symbols, as a preloaded library's are, else "system"."""
    try:
        ctypes.CDLL(None).mallctl
    except (AttributeError, OSError):
        return "system"
    return "jemalloc"


def preloaded(env: dict, library: str) -> dict:
    """`env` with `library` first in LD_PRELOAD (what was preloaded before stays after it)."""
    rest = env.get("LD_PRELOAD", "")
    return {**env, "LD_PRELOAD": f"{library}:{rest}" if rest else library, _STARTED_AGAIN: "1"}


def restart_under(allocator: str, argv: list[str]) -> None:
    """Make sure this process allocates with `allocator`: nothing to do for "system" or where it is already in use;
    else start this command again (`python -m edgelora.cli ARGV`) with the library preloaded, in place of this
    process. An AllocatorError says why it cannot (no library, or a preload the loader refused)."""
    if allocator not in ALLOCATORS:
        raise AllocatorError(f"--allocator: unknown {allocator!r}; allowed: {', '.join(ALLOCATORS)}")
    if allocator == "system" or in_use() == allocator:
        return
    if os.environ.get(_STARTED_AGAIN):
        raise AllocatorError(f"--allocator {allocator}: preloaded {os.environ.get('LD_PRELOAD')!r}, but the "
                             f"process does not run on it (is the file a jemalloc library for this machine?)")
    library = jemalloc_library()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "edgelora.cli", *argv], preloaded(dict(os.environ), library))


def jemalloc_library() -> str:
    """jemalloc_path(), or an AllocatorError saying where to get one."""
    library = jemalloc_path()
    if library is None:
        raise AllocatorError("--allocator jemalloc: no jemalloc library found (Debian/Ubuntu: apt install "
                             "libjemalloc2; or set EDGELORA_JEMALLOC to its path)")
    return library
