"""The client's shared output layer (swarm/shared_head.py): concurrent sessions' calls merged into one product.

The first tests drive `SharedHead` with plain modules and threads (no network); the last runs 4 concurrent
`generate` calls through real peer processes and compares every score with the local model's.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from swarm.shared_head import SharedHead
from tests.processes import SwarmProcesses
from tests.tiny_models import save_test_llama


class Sleepy(nn.Module):
    """Row-wise (each row doubled), but a call of n rows takes n^2 x 20 ms: merging never pays."""

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        time.sleep(0.02 * rows * rows)
        return x * 2


class Model(nn.Module):
    """Calls its head once per forward, after every thread given to it is inside (`barrier`)."""

    def __init__(self, head: nn.Module, threads: int):
        super().__init__()
        self.head = head
        self.barrier = threading.Barrier(threads)

    def forward(self, x):
        self.barrier.wait(timeout=30)
        return self.head(x)


def run_together(model: nn.Module, inputs: list[torch.Tensor], grad: bool = False) -> list:
    """model(input) for each input, each in its own thread, all at once; outputs or the exceptions raised."""
    out: list = [None] * len(inputs)

    def work(k: int) -> None:
        try:
            with torch.set_grad_enabled(grad):
                out[k] = model(inputs[k])
        except Exception as exc:  # noqa: BLE001 - returned to the test
            out[k] = exc

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return out


def test_concurrent_calls_share_one_product_and_get_their_own_rows():
    torch.manual_seed(0)
    head = nn.Linear(32, 50)
    inputs = [torch.randn(1, 1, 32), torch.randn(3, 1, 32), torch.randn(1, 2, 32), torch.randn(2, 1, 32)]
    with torch.no_grad():
        want = [head(x) for x in inputs]
    model = Model(head, len(inputs))
    shared = SharedHead(model, head, wait_s=30)  # waits until every thread inside the model has come (or 30 s)
    got = run_together(model, inputs)
    assert shared.merges == 1 and shared.merged_calls == 4
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-5)


def test_a_lone_caller_never_waits():
    head = nn.Linear(8, 8)
    model = Model(head, 1)
    shared = SharedHead(model, head, wait_s=30)
    start = time.monotonic()
    with torch.no_grad():
        out = model(torch.ones(1, 8))
    assert time.monotonic() - start < 10  # it would wait the whole 30 s if it waited at all
    assert shared.merges == 0 and torch.allclose(out, head.weight.sum(1) + head.bias)


def test_with_autograd_each_caller_computes_its_own():
    head = nn.Linear(8, 4)
    model = Model(head, 2)
    shared = SharedHead(model, head, wait_s=30)
    out = run_together(model, [torch.randn(1, 8), torch.randn(1, 8)], grad=True)
    assert shared.merges == 0
    sum(o.sum() for o in out).backward()
    assert head.weight.grad is not None


def test_a_caller_that_does_not_fit_meets_its_own_error_and_the_others_are_served():
    torch.manual_seed(1)
    head = nn.Linear(16, 10)
    inputs = [torch.randn(1, 16), torch.randn(1, 15), torch.randn(2, 16)]
    with torch.no_grad():
        want = [head(inputs[0]), None, head(inputs[2])]
    model = Model(head, 3)
    SharedHead(model, head, wait_s=2)
    got = run_together(model, inputs)
    assert isinstance(got[1], RuntimeError) and "15" in str(got[1])
    for k in (0, 2):
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=1e-5)


class Picky(nn.Module):
    """Row-wise, but fails on more than one row (as an out-of-memory error would on a merged product)."""

    def forward(self, x):
        if x.numel() // x.shape[-1] > 1:
            raise RuntimeError("out of memory (simulated)")
        return x + 1


def test_a_merged_product_that_fails_lets_every_caller_compute_its_own():
    head = Picky()
    model = Model(head, 3)
    shared = SharedHead(model, head, wait_s=30)
    got = run_together(model, [torch.zeros(1, 4), torch.ones(1, 4), torch.full((1, 4), 2.0)])
    assert shared.merges == 0
    assert [g.tolist() for g in got] == [[[1.0] * 4], [[2.0] * 4], [[3.0] * 4]]


def test_groups_measured_not_worth_merging_are_computed_separately():
    head = Sleepy()
    model = Model(head, 2)
    shared = SharedHead(model, head, wait_s=30)
    with torch.no_grad():
        model.barrier = threading.Barrier(1)
        model(torch.ones(1, 4))  # one row alone: 20 ms, measured
        model.barrier = threading.Barrier(2)
        first = run_together(model, [torch.ones(1, 4), torch.full((1, 4), 3.0)])  # unknown: merged, 80 ms measured
        second = run_together(model, [torch.ones(1, 4), torch.full((1, 4), 3.0)])  # 80 > 2 x 20: each alone
    assert shared.merges == 1 and shared.merged_calls == 2
    for out in (first, second):
        assert torch.equal(out[0], torch.full((1, 4), 2.0)) and torch.equal(out[1], torch.full((1, 4), 6.0))


def test_attach_shares_only_a_linear_output_layer_and_detach_restores_it():
    class NoHead(nn.Module):
        def get_output_embeddings(self):
            return None

    assert SharedHead.attach(NoHead()) is None

    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 6)

        def get_output_embeddings(self):
            return self.lm_head

    model = WithHead()
    shared = SharedHead.attach(model)
    assert shared is not None and model.lm_head.forward == shared.forward
    shared.detach()
    assert "forward" not in vars(model.lm_head) and not model._forward_pre_hooks and not model._forward_hooks


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_test_llama(tmp_path_factory.mktemp("shared_head"), 4)


def test_concurrent_generations_through_real_peers_equal_the_local_model(llama):
    from swarm import AutoDistributedModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(llama).eval()
    prompts = [torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    want = [local.generate(p, **gen) for p in prompts]
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        launched = [procs.start_peer(llama, dht, blocks, wait=False) for blocks in ("0:2", "2:4")]
        for proc in launched:
            SwarmProcesses.wait_ready(proc)
        client = AutoDistributedModelForCausalLM.from_pretrained(llama, initial_peers=[dht])
        try:
            shared = client.swarm_head
            assert shared is not None
            shared.wait_s = 10.0  # the test's sessions wait for each other, so that they surely merge
            got = run_together(lambda p: client.generate(p, **gen), prompts)
        finally:
            client.swarm_connection.close()
    assert not [g for g in got if isinstance(g, Exception)], got
    assert shared.merges > 0, "the sessions' output layers never ran merged"
    for g, w in zip(got, want):
        assert torch.equal(g.sequences, w.sequences)
        for a, b in zip(g.scores, w.scores):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
