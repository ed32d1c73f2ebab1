"""Process memory: give freed heap back to the OS (glibc ``malloc_trim``) and read the resident size.

Used by the ROS node's periodic trim, the memory tests and the benches, so that all of them measure
resident memory the same way. Linux-specific reads return 0 / do nothing elsewhere.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os


def _load_malloc_trim():
    """glibc's ``malloc_trim`` (None where the C library has none, e.g. musl or macOS).

    glibc keeps freed blocks of an arena (many MB-sized image temporaries per frame) for reuse instead
    of returning them; ``malloc_trim(0)`` returns the free pages (a few ms)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _load_malloc_trim()


def _load_mallopt():
    """glibc's ``mallopt`` (None elsewhere)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
    except (OSError, AttributeError):
        return None


MALLOPT = _load_mallopt()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_heap(trim_mib: int = 128, mmap_mib: int = 32) -> bool:
    """Keep freed heap for reuse instead of returning it to the OS at every free (glibc ``mallopt``).

    By default glibc hands the top of the heap back whenever more than about twice the largest freed
    block is free there (~0.6 MB after a 320x240 float image), so the next image-sized temporary
    page-faults its memory in again: the segmentation stage took ~1300 faults and 3 ms of system time
    per frame that way (0 with this). Blocks up to ``mmap_mib`` come from the heap, which keeps up to
    ``trim_mib`` free at its top. Process-wide; what is kept is bounded by the peak use, and
    :func:`trim_heap` (the node's periodic trim) still returns it. False where there is no mallopt.
    """
    if MALLOPT is None:
        return False
    return bool(MALLOPT(_M_TRIM_THRESHOLD, trim_mib << 20)) and bool(MALLOPT(_M_MMAP_THRESHOLD, mmap_mib << 20))


def trim_heap() -> bool:
    """Hand freed heap pages back to the OS; False where malloc_trim is not available."""
    if MALLOC_TRIM is None:
        return False
    MALLOC_TRIM(0)
    return True


def resident_bytes() -> int:
    """This process's resident memory in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        return 0


def resident_mib() -> float:
    """:func:`resident_bytes` in MiB."""
    return resident_bytes() / 2 ** 20


def resident_after_trim() -> int:
    """Resident bytes right after :func:`trim_heap` (what the node logs after each periodic trim)."""
    trim_heap()
    return resident_bytes()
