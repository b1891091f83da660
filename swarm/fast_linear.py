"""Linear layers over several rows run on oneDNN's kernel where it is measured faster (fp32, CPU).

Why: torch computes an fp32 `nn.Linear` on CPU with MKL's GEMM, which on some CPUs costs nearly as much per
row for a few rows as for one (this project's AMD EPYC: one 2816 x 1024 layer takes 204 µs for 1 row,
1132 µs for 8). A peer that merges the decode steps of 8 sessions (peer/merge.py), and a client that merges
their output layers (swarm/shared_head.py), compute exactly such few-row products. oneDNN, which torch
bundles and which `torch.compile` uses for CPU linear layers, computes them faster there (836 µs for 8 rows;
the 32,000-word output layer: 13.5 ms against 26.0 ms): `docs/performance.md`.

The rules, so that nothing gets slower or different where it did not gain:
- only plain `nn.Linear` layers with fp32 weights on the CPU, only without autograd; anything else calls
  the layer's own forward;
- for each weight shape both kernels are timed once, on the layer's own weights, at 2, 4 and 8 rows: oneDNN
  is used from the fewest rows from which it was faster (by `MARGIN`) at every larger measured size, and
  not at all if it did not win at 8 rows. One row never changes kernel, so a lone session's decode steps
  are computed exactly as before;
- where the kernel is missing (a torch built without oneDNN) or its result is not close to torch's, nothing
  changes.

Results equal torch's up to float rounding (a product summed in another order), like a matrix product of
more rows in MKL itself; the exactness tests compare with `allclose` and identical greedy tokens.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

KERNELS = ("auto", "torch")  # the settings: measure and switch where faster, or torch's kernel everywhere
MEASURED_ROWS = (2, 4, 8)
MARGIN = 0.9  # oneDNN must take at most this fraction of torch's time to count as faster (timing noise)
BUDGET_S = 0.01  # time spent measuring one kernel at one size, after a first call (at least 2 calls)
MAX_CALLS = 7


def available() -> bool:
    """Whether this torch has the oneDNN linear kernel (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` computed by oneDNN (fp32, CPU; any number of leading dims)."""
    return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")


def _fastest(fn: Callable[[], object], clock: Callable[[], float]) -> float:
    """Best of a few calls (the minimum: the least disturbed by other work on a shared machine)."""
    fn()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 2 or (spent < BUDGET_S and calls < MAX_CALLS):
        start = clock()
        fn()
        took = clock() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best


def fewest_rows(timings: dict[int, tuple[float, float]], margin: float = MARGIN) -> int | None:
    """From seconds (torch's, oneDNN's) by rows: the fewest rows from which oneDNN was faster (by `margin`)
    at every larger measured size; None: not faster at the largest."""
    found = None
    for rows in sorted(timings, reverse=True):
        theirs, ours = timings[rows]
        if ours > margin * theirs:
            break
        found = rows
    return found


def min_rows_for(weight: torch.Tensor, bias: torch.Tensor | None, rows: tuple[int, ...] = MEASURED_ROWS,
                 clock: Callable[[], float] = time.perf_counter) -> int | None:
    """Times both kernels on `weight` at `rows`, the most first, until oneDNN is not faster (see
    `fewest_rows`); None also where oneDNN fails or its result is not torch's."""
    timings = {}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in sorted(rows, reverse=True):
            x = torch.randn(n, weight.shape[1], generator=generator, dtype=weight.dtype)
            try:
                ours = onednn_linear(x, weight, bias)
            except RuntimeError as exc:
                logger.debug("oneDNN linear unavailable for %s: %s", tuple(weight.shape), exc)
                return None
            if not torch.allclose(ours, F.linear(x, weight, bias), rtol=1e-4, atol=1e-4):
                logger.warning("oneDNN linear differs from torch's for %s; not used", tuple(weight.shape))
                return None
            timings[n] = (_fastest(lambda: F.linear(x, weight, bias), clock),
                          _fastest(lambda: onednn_linear(x, weight, bias), clock))
            if timings[n][1] > MARGIN * timings[n][0]:  # not faster here: fewer rows do not matter
                break
    return fewest_rows(timings)


class FastLinear(nn.Linear):
    """An `nn.Linear` that computes inputs of `min_rows` rows or more on oneDNN (see the module docstring);
    anything else, a misfit input included (torch's error message is the clear one), goes to torch's.

    `speed_up_linears` turns layers into this class in place (their `__class__`), so that copies, pickles,
    state dicts and `isinstance(layer, nn.Linear)` work as before."""

    min_rows: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (input.dtype is torch.float32 and weight.dtype is torch.float32 and input.device.type == "cpu"
                and weight.device.type == "cpu" and input.dim() > 0 and input.shape[-1] == weight.shape[1]
                and input.numel() >= self.min_rows * input.shape[-1] and not torch.is_grad_enabled()):
            return onednn_linear(input, weight, self.bias)
        return super().forward(input)

    @classmethod
    def switch(cls, layer: nn.Linear, min_rows: int) -> None:
        layer.__class__ = cls
        layer.min_rows = min_rows


def _eligible(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return (type(layer) is nn.Linear and weight is not None and weight.dtype is torch.float32
            and weight.device.type == "cpu" and "forward" not in layer.__dict__)


_measured: dict[tuple[int, int, bool], int | None] = {}  # this process's measurements, by (out, in, bias)


def _measured_once(weight: torch.Tensor, bias: torch.Tensor | None) -> int | None:
    """`min_rows_for`, once per shape per process (a peer loads blocks again when it measures its throughput
    and when it moves to another range)."""
    key = (*weight.shape, bias is not None)
    if key not in _measured:
        _measured[key] = min_rows_for(weight, bias)
    return _measured[key]


def speed_up_linears(module: nn.Module, measure: Callable[..., int | None] = _measured_once
                     ) -> dict[tuple[int, int], int | None]:
    """Switch `module`'s eligible linear layers to oneDNN from the rows where it was measured faster (see the
    module docstring). Returns, by weight shape (out, in), those rows (None: kept on torch's kernel)."""
    found: dict[tuple[int, int, bool], int | None] = {}
    if not available():
        return {}
    for layer in module.modules():
        if not _eligible(layer):
            continue
        key = (*layer.weight.shape, layer.bias is not None)
        if key not in found:
            found[key] = measure(layer.weight, layer.bias)
        if found[key] is not None:
            FastLinear.switch(layer, found[key])
    shapes = {key[:2]: rows for key, rows in found.items()}
    if shapes:
        logger.info("linear layers on oneDNN from these rows (shape: rows; None: torch's kernel): %s", shapes)
    return shapes


__all__ = ["KERNELS", "FastLinear", "available", "fewest_rows", "min_rows_for", "onednn_linear", "speed_up_linears"]
