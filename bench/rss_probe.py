"""CPU peak-memory probe shared by the benchmarks (Linux).

torch's CPU allocator keeps no statistics, so a benchmark reads the process's resident-set high-water mark
(``VmHWM``) after resetting it to the current RSS through ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import ctypes


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not allow it.

    Also makes freed big buffers really leave the process (glibc otherwise keeps them mapped and raises
    its mmap threshold), so the high-water mark measures one call's working set.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD, fixed
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); 0 if absent."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0
