"""Which GPUs each peer process of a multi-GPU host gets: pure functions, testable without a GPU.

`swarm run-peer ... --gpus-per-peer K` starts one peer process per group of K GPUs and hides the
others from it through `CUDA_VISIBLE_DEVICES`, as TorchServe hands GPUs to its workers: peer `i`
gets the K GPUs that follow peer `i - 1`'s, in order, wrapping around (round-robin) when more peers
than groups are asked for. Inside its process a peer then sees its GPUs as cuda:0, cuda:1, ...

GPU ids are strings because `CUDA_VISIBLE_DEVICES` may hold indices ("0,1") or UUIDs
("GPU-8f1e...,MIG-..."); a restriction the user already set is honoured: only those GPUs are handed out.
"""

from __future__ import annotations

from typing import Sequence


class GpuAssignmentError(ValueError):
    """The GPUs cannot be split as asked (the message has the numbers and the fix)."""


def visible_gpus(cuda_visible_devices: str | None, device_count: int) -> list[str]:
    """The GPUs this host lets us use: the ids in `CUDA_VISIBLE_DEVICES` if it is set, else 0..device_count-1.

    An empty or "-1" value hides every GPU (CUDA's own convention), giving [].
    """
    if cuda_visible_devices is None:
        return [str(i) for i in range(device_count)]
    ids = []
    for part in cuda_visible_devices.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("-"):  # CUDA stops at the first invalid (negative) id
            break
        ids.append(part)
    return ids


def assign_gpus(gpus: Sequence[str], per_peer: int, num_peers: int | None = None) -> list[list[str]]:
    """GPU groups, one per peer: peer i gets gpus[(i * per_peer + j) % len(gpus)] for j < per_peer.

    :param gpus: the GPUs to hand out, in order (see `visible_gpus`)
    :param per_peer: GPUs per peer process (K)
    :param num_peers: how many peers; default: as many as there are whole groups (len(gpus) // per_peer),
      so no GPU is shared. More peers than that share GPUs round-robin (give each a --max-memory then).
    """
    if per_peer < 1:
        raise GpuAssignmentError(f"--gpus-per-peer must be at least 1, got {per_peer}")
    if not gpus:
        raise GpuAssignmentError(
            "--gpus-per-peer needs GPUs, but none is visible (torch sees no CUDA device, or CUDA_VISIBLE_DEVICES hides "
            "them all). Check `nvidia-smi`, or leave out --gpus-per-peer to run one peer on this machine's CPU"
        )
    if per_peer > len(gpus):
        raise GpuAssignmentError(
            f"--gpus-per-peer {per_peer} asks for more GPUs than the {len(gpus)} visible ({','.join(gpus)}); "
            f"use --gpus-per-peer {len(gpus)} or less"
        )
    if num_peers is None:
        num_peers = len(gpus) // per_peer
    if num_peers < 1:
        raise GpuAssignmentError(f"the number of peers must be at least 1, got {num_peers}")
    return [[gpus[(i * per_peer + j) % len(gpus)] for j in range(per_peer)] for i in range(num_peers)]


def unused_gpus(gpus: Sequence[str], groups: Sequence[Sequence[str]]) -> list[str]:
    """GPUs no group uses (when len(gpus) is not a multiple of the group size)."""
    used = {g for group in groups for g in group}
    return [g for g in gpus if g not in used]
