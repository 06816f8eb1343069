"""Keep freed memory in the process: glibc's defaults cost CPU sampling a quarter of its time.

With glibc's defaults, blocks above a dynamic threshold (128 KiB up to 32 MiB) are mapped fresh on
each allocation, and free memory at the top of the heap is returned to the system once it exceeds
twice that threshold. A network call on the CPU allocates and frees the same few-megabyte tensors
over and over, so each comes back as fresh pages that fault in on first write: on the embedded video
teacher a call took 290 to 460 ms of thread CPU time this way, and 250 to 270 ms with the settings
below (``benchmarks/cache_speedup.py`` reports it). The same holds for the work feature caches do
on the calls they skip, which is why their measured speedup needs it. Values are unchanged: only
where memory comes from changes. ``BENCH_MALLOC=default`` leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
SETTINGS = {
    M_MMAP_THRESHOLD: 64 << 20,  # blocks up to 64 MiB come from the heap, and the threshold stays put
    M_TRIM_THRESHOLD: 1 << 30,  # free memory at the heap's top stays in the process up to 1 GiB
    M_TOP_PAD: 64 << 20,  # the heap grows 64 MiB at a time
}

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Applies :data:`SETTINGS` with glibc's ``mallopt`` once per process; False where there is no
    glibc (macOS, musl) or ``BENCH_MALLOC=default``."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux") and os.environ.get("BENCH_MALLOC", "") != "default":
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            _applied = all(mallopt(k, v) == 1 for k, v in SETTINGS.items())
    return _applied
