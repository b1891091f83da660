"""Model weights moved into one block of anonymous memory backed by transparent huge pages (CPU).

Why: a decode step of a model too big for the CPU's caches reads every weight once per token, so it is
bound by memory and by address translation. `from_pretrained` leaves the weights in the safetensors
file's memory map, 4 KiB pages of the page cache: the medium benchmark model (615 MB of fp32) touches
~150,000 pages per token, and after the other processes of a swarm have run, most of their translations
are cold. Copied into one private anonymous region that asks for 2 MiB pages (`madvise(MADV_HUGEPAGE)`),
the same token touches ~300 pages. Measured on this project's 2-core machine (medium model, local
`generate()`, one thread, in one process alternating the two placements): 0.91x the time per token,
against 0.94x for the same region in 4 KiB pages and 0.97x for torch's own copy (`docs/performance.md`).

The rules:
- only CPU tensors of parameters move (buffers are small and some are recomputed); a parameter shared by
  several modules (tied embeddings) stays shared, as one copy;
- values are copied bit for bit: outputs are identical, not just close;
- where the kernel has no transparent huge pages (not Linux, or the mode is ``never``) the region is still
  one private anonymous block in normal pages, which measured faster than the file map too;
- if the memory cannot be mapped, nothing moves and a warning says why.

The region lives as long as a tensor in it does (each holds the `mmap` object through the buffer protocol).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge page size
ALIGN = 64  # each tensor starts on a cache line
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_MODE) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None where it has none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[") and word.endswith("]")]
    return chosen[0] if chosen else None


@dataclass(frozen=True)
class Placement:
    """What `move_to_huge_pages` did: how many bytes moved, and whether huge pages were asked for."""

    bytes_moved: int
    tensors: int
    huge_pages: bool  # madvise(MADV_HUGEPAGE) was applied (the kernel still decides, page by page)
    reason: str = ""  # why nothing moved, when nothing did

    def describe(self) -> str:
        if not self.bytes_moved:
            return f"weights left in place ({self.reason or 'nothing to move'})"
        pages = "huge pages" if self.huge_pages else "normal pages (no transparent huge pages here)"
        return f"{self.bytes_moved / 2**20:.1f} MiB of weights ({self.tensors} tensors) in one region of {pages}"


def _aligned(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def private_file_maps(maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """The ``[start, end)`` address ranges of this process's private maps of files (where safetensors' weights are)."""
    ranges = []
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return ranges
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1][3] == "p" and fields[4] != "0" and fields[5].startswith("/"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


class _PageDropper:
    """Drops the pages of a copied tensor from this process's private file map (`madvise(MADV_DONTNEED)`).

    Why: the copy reads every weight through the file's map, which counts each page it touches in the
    process's memory until the map goes, i.e. until the last weight is copied: the peak would be twice the
    weights. Dropped as each tensor is copied, the peak stays at the weights plus one tensor. Only whole pages
    inside one copied tensor and inside a private file map are dropped; such a page reads back the file's bytes if
    anything touches it again, so another view of the same bytes keeps its data. The one exception is a page
    written in place after loading (a private copy of the file's page): the moved tensor has its bytes, another
    view of it would read the file's again. Loaders do not write weights in place; transformers' conversions
    make new tensors, which are not in the file's map and are never dropped.
    """

    def __init__(self) -> None:
        self.maps = private_file_maps() if sys.platform == "linux" else []
        self.madvise = None
        if self.maps and hasattr(mmap, "MADV_DONTNEED"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                self.madvise = libc.madvise
                self.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            except (OSError, AttributeError):
                self.madvise = None

    def drop(self, pointer: int, nbytes: int) -> None:
        if self.madvise is None:
            return
        page = mmap.PAGESIZE
        lo, hi = _aligned(pointer, page), (pointer + nbytes) // page * page
        if hi > lo and any(start <= lo and hi <= end for start, end in self.maps):
            self.madvise(lo, hi - lo, mmap.MADV_DONTNEED)  # a failure leaves the pages mapped: only memory, no harm


def move_to_huge_pages(module: nn.Module) -> Placement:
    """Copy every CPU parameter of `module` into one anonymous region asking for huge pages, in place."""
    params: list[nn.Parameter] = []
    seen: dict[tuple, int] = {}  # (pointer, dtype, shape, strides) -> index in params: views of one tensor stay one
    aliases: list[tuple[nn.Parameter, int]] = []
    for p in module.parameters():  # distinct Parameter objects (tied ones come once)
        if p.device.type != "cpu" or p.numel() == 0:
            continue
        key = (p.data_ptr(), p.dtype, tuple(p.shape), p.stride())
        if key in seen:
            aliases.append((p, seen[key]))
            continue
        seen[key] = len(params)
        params.append(p)
    if not params:
        return Placement(0, 0, False, "no CPU parameters")
    if not (hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")):  # Windows: no anonymous private maps
        return Placement(0, 0, False, "no anonymous private memory maps on this system")
    nbytes = [p.numel() * p.element_size() for p in params]
    sizes = [_aligned(n, ALIGN) for n in nbytes]
    total = sum(sizes)
    mode = thp_mode()
    huge = mode in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")
    try:
        # private and anonymous: shared anonymous memory is shmem, which has its own (usually off) huge page mode
        region = mmap.mmap(-1, _aligned(total, HUGE_PAGE) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError) as exc:
        logger.warning("weights stay where they were loaded: could not map %d bytes (%s)", total, exc)
        return Placement(0, 0, False, f"mmap failed: {exc}")
    if huge:
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError as exc:  # a kernel built without THP answers EINVAL
            huge = False
            logger.info("no huge pages for the weights (%s); one region of normal pages instead", exc)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % HUGE_PAGE  # the region's first huge page boundary
    dropper = _PageDropper()
    moved = []
    with torch.no_grad():
        for p, n, size in zip(params, nbytes, sizes):
            target = raw[offset:offset + n].view(p.dtype).view(p.shape)
            target.copy_(p.data)
            moved.append(target)
            if p.is_contiguous():
                dropper.drop(p.data_ptr(), n)
            offset += size
        for p, target in zip(params, moved):
            p.data = target
        for p, index in aliases:
            p.data = moved[index]
    return Placement(sum(nbytes), len(params), huge)


__all__ = ["HUGE_PAGE", "Placement", "move_to_huge_pages", "thp_mode"]
