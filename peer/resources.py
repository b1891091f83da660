"""What this peer's device can hold: free and total memory, device kind and name.

CUDA reports free VRAM through `torch.cuda.mem_get_info`; MPS through its driver's allocation
limit; otherwise the free memory is the host's *available* RAM (what can be allocated without
swapping, per the kernel), via psutil. `--max-memory` caps what the peer uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceMemory:
    kind: str  # torch device type: "cuda", "mps", "cpu"
    name: str  # human-readable device name
    free_bytes: int  # memory this peer may still use, after any --max-memory cap
    total_bytes: int  # the device's total memory


def probe_device(device: str | torch.device, max_memory: int | None = None) -> DeviceMemory:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
    elif device.type == "mps":
        total = int(torch.mps.recommended_max_memory())
        free = max(0, total - int(torch.mps.driver_allocated_memory()))
        name = "Apple MPS"
    else:
        import platform

        import psutil

        vm = psutil.virtual_memory()
        free, total = int(vm.available), int(vm.total)
        name = platform.processor() or platform.machine() or "cpu"
    if max_memory is not None:
        free = min(free, int(max_memory))
    return DeviceMemory(kind=device.type, name=name, free_bytes=int(free), total_bytes=int(total))


def parse_size(text: str) -> int:
    """'12GiB', '500MB', '1.5G', '1024' (bytes) -> bytes. Binary units for both spellings of G/M/K."""
    s = text.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 2**40, "GB": 2**30, "MB": 2**20,
             "KB": 2**10, "T": 2**40, "G": 2**30, "M": 2**20, "K": 2**10, "B": 1}
    for suffix, factor in units.items():
        if s.endswith(suffix):
            number = s[: -len(suffix)]
            break
    else:
        number, factor = s, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 8GiB, 512MiB or a number of bytes") from None
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return int(value * factor)
