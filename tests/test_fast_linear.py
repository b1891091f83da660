"""oneDNN for linear layers over several rows (swarm/fast_linear.py).

Which kernel ran is read from torch's profiler (the op names it records), not assumed. The timing rule is a
pure function and is tested with given timings; the measurement itself runs for real on a real layer.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.profiler import profile

from peer.server import PeerConfig
from swarm.client import ClientConfig
from swarm.fast_linear import (KERNELS, MEASURED_ROWS, FastLinear, available, fewest_rows, min_rows_for,
                                speed_up_linears)
from swarm.shared_head import SharedHead

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN (mkldnn) linear kernel")

ONEDNN = "mkldnn::_linear_pointwise"


def ops(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {event.name for event in prof.events()}


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16, bias=False))


def test_fewest_rows_from_given_timings():
    # (torch's seconds, oneDNN's) by rows
    assert fewest_rows({2: (1.0, 1.2), 4: (2.0, 1.5), 8: (3.0, 2.0)}) == 4
    assert fewest_rows({2: (1.0, 0.5), 4: (2.0, 1.5), 8: (3.0, 2.0)}) == 2
    assert fewest_rows({2: (1.0, 0.5), 4: (2.0, 2.5), 8: (3.0, 2.0)}) == 8  # lost at 4: not below it either
    assert fewest_rows({2: (1.0, 0.5), 4: (2.0, 1.0), 8: (3.0, 3.1)}) is None  # lost at the most rows
    assert fewest_rows({8: (1.0, 0.95)}) is None  # within the margin: noise, not a win
    assert fewest_rows({8: (1.0, 0.95)}, margin=1.0) == 8
    assert fewest_rows({}) is None


def test_measured_on_a_real_layer():
    layer = nn.Linear(256, 512)
    rows = min_rows_for(layer.weight.detach(), layer.bias.detach())
    assert rows is None or rows in MEASURED_ROWS


def test_switched_layers_use_onednn_from_their_rows_and_equal_torch():
    model = two_layers()
    plain = copy.deepcopy(model)
    calls = []
    shapes = speed_up_linears(model, measure=lambda w, b: calls.append(tuple(w.shape)) or 4)
    assert shapes == {(64, 32): 4, (16, 64): 4} and calls == [(64, 32), (16, 64)]
    with torch.no_grad():
        for shape in [(1, 32), (3, 32), (1, 3, 32), (4, 32), (2, 4, 32), (8, 1, 32), (5, 7, 32)]:
            x = torch.randn(shape)
            ran = ops(lambda: model(x))
            rows = x.numel() // 32
            assert (ONEDNN in ran) == (rows >= 4), (shape, ran)
            got, want = model(x), plain(x)
            assert got.shape == want.shape
            if rows < 4:
                assert torch.equal(got, want)  # torch's own kernel: the very same numbers
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        x = torch.randn(3, 6, 32).transpose(0, 1)  # not contiguous
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)
        assert isinstance(model[0], FastLinear) and isinstance(model[0], nn.Linear)
        # copies and pickles keep working, each copy computing with its own weights
        copied = copy.deepcopy(model)
        copied[2].weight.zero_()
        assert torch.equal(copied(torch.randn(8, 32)), torch.zeros(8, 16))
        assert not torch.equal(model(torch.randn(8, 32)), torch.zeros(8, 16))
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        x = torch.randn(8, 32)
        assert ONEDNN in ops(lambda: loaded(x)) and torch.equal(loaded(x), model(x))
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # torch's message, not oneDNN's
            model(torch.randn(8, 31))
        assert model(torch.randn(0, 32)).shape == (0, 16)


def test_autograd_other_dtypes_subclasses_and_replaced_forwards_keep_torch():
    model = two_layers()
    speed_up_linears(model, measure=lambda w, b: 2)
    x = torch.randn(8, 32, requires_grad=True)
    assert ONEDNN not in ops(lambda: model(x).sum().backward())  # autograd: torch's kernel, and gradients flow
    assert x.grad is not None and x.grad.abs().sum() > 0

    class Custom(nn.Linear):
        pass

    replaced = nn.Linear(32, 32)
    replaced.forward = lambda input: input  # someone else's forward: left alone
    others = nn.ModuleList([nn.Linear(32, 32).double(), Custom(32, 32), replaced])
    measured = []
    assert speed_up_linears(others, measure=lambda w, b: measured.append(w.shape) or 2) == {}
    assert measured == [] and [type(m) for m in others] == [nn.Linear, Custom, nn.Linear]


def test_each_shape_is_measured_once():
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)], nn.Linear(16, 8))
    measured = []
    shapes = speed_up_linears(model, measure=lambda w, b: measured.append(tuple(w.shape)) or None)
    assert measured == [(16, 16), (8, 16)] and shapes == {(16, 16): None, (8, 16): None}
    assert all(type(m) is nn.Linear for m in model)  # None: not faster, nothing switched
    with torch.no_grad():
        assert ONEDNN not in ops(lambda: model(torch.randn(8, 16)))


def test_the_shared_head_shares_a_switched_layer():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(32, 100, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, x):
            return self.lm_head(x)

    model = LM()
    speed_up_linears(model, measure=lambda w, b: 2)
    shared = SharedHead.attach(model)
    assert shared is not None  # a FastLinear is still an nn.Linear
    with torch.no_grad():
        assert ONEDNN in ops(lambda: model(torch.randn(1, 2, 32)))  # through the shared head, still oneDNN
        shared.detach()
        assert ONEDNN in ops(lambda: model(torch.randn(1, 2, 32)))


def test_client_and_peer_configs_check_the_setting():
    assert KERNELS == ("auto", "torch")
    ClientConfig(linear_kernel="torch")
    PeerConfig(model="m", linear_kernel="torch")
    with pytest.raises(ValueError, match="linear_kernel must be one of auto, torch"):
        ClientConfig(linear_kernel="mkl")
    with pytest.raises(ValueError, match="linear_kernel must be one of auto, torch"):
        PeerConfig(model="m", linear_kernel="mkl")
