"""Concurrent sessions of one client model share one call of its output layer.

Why: a client that serves several sessions from threads (one `generate` each) computes the output layer
once per session per token, and for a language model that is the largest matrix the client holds (32,000
words x 1,024 for the medium benchmark model: 7.5 ms for one row on this machine's CPU). The peers merge
the sessions' decode steps (peer/merge.py), so their replies come back together and the sessions reach
the output layer at nearly the same moment; one matrix product over all their rows reads the weights once
(8 rows: 25.7 ms against 8 x 7.5 ms). This is the client's half of batching across sessions.

The rules, so that nobody pays for it:
- only row-wise layers are shared (`nn.Linear`: each output row depends on its input row alone), and only
  without autograd (`generate` runs without it); anything else calls the layer as it is;
- a caller waits for others only while other threads are inside the model's forward (they are the ones
  that may come), never longer than its own rows take to compute alone; a lone session never waits;
- a group is merged only while merging that many rows is not measured slower than computing the rows of
  each caller separately (on this CPU two rows cost more than twice one: `docs/performance.md`); such a
  group computes separately, each caller in its own thread, and is tried merged again now and then;
- a merged product that fails (out of memory, say) lets every caller compute its own, and whatever happens
  to the caller that leads a group, no other caller is left waiting for it.

The results equal the per-caller ones up to float rounding: a matrix product of more rows may sum in a
different order (the exactness tests compare tokens and `allclose` logits against the local model).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

RETRY_EVERY = 16  # a group size measured not worth merging is merged again every this many groups, to re-measure
_ALONE = object()  # a member's result when its group was not merged: it computes its rows itself
_EMA = 0.2  # weight of the newest timing in the running averages


def _rows(x: torch.Tensor) -> int:
    """Rows a row-wise layer computes for `x`: every dim but the last."""
    return x.numel() // x.shape[-1]


@dataclass
class _Call:
    input: torch.Tensor
    result: object = None  # the output, or _ALONE

    @property
    def rows(self) -> int:
        return _rows(self.input)


@dataclass
class _Group:
    calls: list[_Call] = field(default_factory=list)

    def accepts(self, x: torch.Tensor) -> bool:
        first = self.calls[0].input
        return x.dtype == first.dtype and x.device == first.device and x.shape[-1] == first.shape[-1]


class SharedHead:
    """Replaces `head.forward` with one that merges concurrent threads' calls (see the module docstring).

    `model` is the module whose forward calls `head` (its threads are counted while inside it). `wait_s`
    bounds a caller's wait; None: the time its own rows take alone, as measured here.
    """

    def __init__(self, model: nn.Module, head: nn.Module, wait_s: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.head = head
        self.wait_s, self.clock = wait_s, clock
        self._forward = head.forward  # the layer's own forward, as it was
        self._cond = threading.Condition()
        self._inside = 0  # threads inside the model's forward: those that may call the head soon
        self._open: _Group | None = None  # the group a caller may still join
        self._cost: dict[int, float] = {}  # running average of seconds per call, by rows in the call
        self._declined: dict[int, int] = {}  # groups not merged, by rows in all
        self.merged_calls = 0  # calls that shared a merged product
        self.merges = 0  # merged products computed
        self._hooks = [model.register_forward_pre_hook(self._enter),
                       model.register_forward_hook(self._leave, always_call=True)]
        head.forward = self.forward

    @classmethod
    def attach(cls, model: nn.Module, **kwargs) -> "SharedHead | None":
        """Share `model`'s output layer if it is an `nn.Linear` (None: no such layer, nothing changed)."""
        get = getattr(model, "get_output_embeddings", None)
        head = get() if get is not None else None
        if not isinstance(head, nn.Linear):
            return None
        return cls(model, head, **kwargs)

    def detach(self) -> None:
        """Give the layer its own forward back."""
        for hook in self._hooks:
            hook.remove()
        self.head.__dict__.pop("forward", None)

    # ---- counting who may come --------------------------------------------------------------------

    def _enter(self, module, args) -> None:
        with self._cond:
            self._inside += 1

    def _leave(self, module, args, output) -> None:
        with self._cond:
            self._inside -= 1
            self._cond.notify_all()  # a leader may be waiting for this thread

    # ---- the shared forward ------------------------------------------------------------------------

    def forward(self, input, *args, **kwargs):
        if args or kwargs or not isinstance(input, torch.Tensor) or input.dim() == 0 or torch.is_grad_enabled():
            return self._forward(input, *args, **kwargs)
        call = _Call(input)
        group: _Group | None = None
        with self._cond:
            if self._open is not None and self._open.accepts(input):  # a leader is gathering: join it
                self._open.calls.append(call)
                self._cond.notify_all()
                while call.result is None:
                    self._cond.wait()
                if call.result is not _ALONE:
                    return call.result
            elif self._open is None and self._inside > 1:  # others may come: lead a group
                group = self._open = _Group([call])
        if group is None:
            return self._alone(input)
        try:
            self._gather(group)
            return self._run(group)
        finally:  # whatever happened to the leader, nobody stays waiting for it
            with self._cond:
                if self._open is group:
                    self._open = None
            self._release([c for c in group.calls[1:] if c.result is None], None)

    def _gather(self, group: _Group) -> None:
        """The leader's wait: until every thread inside the model's forward has joined, or the bound."""
        with self._cond:
            lone = self._cost.get(group.calls[0].rows)
            bound = self.wait_s if self.wait_s is not None else lone
            if bound:
                deadline = self.clock() + bound
                while len(group.calls) < self._inside:
                    left = deadline - self.clock()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            self._open = None  # later callers start the next group

    def _run(self, group: _Group) -> torch.Tensor:
        """The leader computes its group: merged, or each member alone when merging it does not pay
        (members not answered here compute their own: `forward`'s `finally`)."""
        calls = group.calls
        sizes = [c.rows for c in calls]
        if len(calls) == 1 or not self._worth_merging(sizes):
            self._release(calls[1:], None)
            return self._alone(calls[0].input)
        start = self.clock()
        try:
            out = self._forward(torch.cat([c.input.reshape(-1, c.input.shape[-1]) for c in calls]))
        except Exception:  # noqa: BLE001 - e.g. out of memory for the merged rows: each computes its own
            self._release(calls[1:], None)
            return self._alone(calls[0].input)
        self._note(sum(sizes), self.clock() - start)
        parts = [part.view(*c.input.shape[:-1], part.shape[-1]) for c, part in zip(calls, out.split(sizes))]
        self._release(calls[1:], parts[1:])
        self.merges += 1
        self.merged_calls += len(calls)
        return parts[0]

    def _release(self, calls: list[_Call], results: list[torch.Tensor] | None) -> None:
        with self._cond:
            for k, c in enumerate(calls):
                c.result = _ALONE if results is None else results[k]
            self._cond.notify_all()

    def _alone(self, input: torch.Tensor) -> torch.Tensor:
        start = self.clock()
        out = self._forward(input)
        self._note(_rows(input), self.clock() - start)
        return out

    def _note(self, rows: int, seconds: float) -> None:
        with self._cond:
            old = self._cost.get(rows)
            self._cost[rows] = seconds if old is None else (1 - _EMA) * old + _EMA * seconds

    def _worth_merging(self, sizes: list[int]) -> bool:
        """Merge unless measured: these rows together cost more than each caller's rows alone."""
        with self._cond:
            total = sum(sizes)
            merged, alone = self._cost.get(total), [self._cost.get(n) for n in sizes]
            if merged is None or None in alone or merged <= sum(alone):  # type: ignore[operator]
                return True
            self._declined[total] = self._declined.get(total, 0) + 1
            return self._declined[total] % RETRY_EVERY == 0


__all__ = ["SharedHead"]
