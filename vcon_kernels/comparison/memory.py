"""Peak memory of a block of code: CUDA allocator stats on GPUs, sampled RSS on the CPU.

PyTorch keeps no allocator statistics for CPU tensors, so on the CPU the peak is the
highest resident set size (RSS) of the process seen by a background thread sampling
``/proc/self/statm`` every few milliseconds, minus the RSS at the start of the block.
Before the block, freed heap memory is handed back to the OS (glibc ``malloc_trim``),
so that a later block does not look cheaper by reusing memory an earlier one left in the
allocator. The result is an estimate (sampling can miss a peak shorter than the period),
good for comparing methods run the same way, not for exact accounting.

Example usage::

    with PeakMemory("cpu") as mem:
        train()
    print(mem.peak_mib)
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from typing import Optional

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The resident set size of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager measuring the peak memory increase (bytes, MiB) during its block."""

    def __init__(self, device="cpu", interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.kind = "cuda allocator" if self.device.type == "cuda" else "sampled RSS"
        self._stop: Optional[threading.Event] = None

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, rss_bytes())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _trim_heap()
        self._base = self._max = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return False
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, rss_bytes())
        self.peak_bytes = max(0, self._max - self._base)
        return False

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


__all__ = ["PeakMemory", "rss_bytes"]
