"""End to end over real processes: a DHT and peers started through the CLI, libp2p RPC on 127.0.0.1.

A small 8-block Llama is served as 0:3, 3:5, 5:8 (plus a replica of 3:5), a 6-block BERT as
0:2, 2:6. Every result is compared with the same checkpoint run locally in this process.
"""

from __future__ import annotations

import json
import signal
import threading

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, BertModel

from swarm import AutoDistributedModel, AutoDistributedModelForCausalLM
from swarm.client import SwarmConnection
from swarm.protocol import StepRequest
from swarm.wire import CacheRef, decode_message, encode_message
from tests.processes import SwarmProcesses, wait_until
from tests.tiny_models import save_test_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    save_test_llama(root, 8)
    torch.manual_seed(0)
    bert = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                      vocab_size=128, max_position_embeddings=128, pad_token_id=0)
    BertModel(bert).save_pretrained(root / "bert6")
    return root / "llama8", root / "bert6"


@pytest.fixture(scope="module")
def swarm(models):
    llama, bert = models
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        peers = {}
        starting = [("0:3", llama), ("3:5", llama), ("5:8", llama), ("3:5b", llama), ("0:2", bert), ("2:6", bert)]
        launched = [(name, procs.start_peer(model, dht, name.rstrip("b"), name=name, wait=False)) for name, model in starting]
        for name, proc in launched:
            peers[name] = SwarmProcesses.wait_ready(proc)
        yield procs, dht, peers


@pytest.fixture(scope="module")
def client(models, swarm):
    _, dht, _ = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(models[0], initial_peers=[dht])
    yield model
    model.swarm_connection.close()


@pytest.fixture(scope="module")
def local(models):
    return AutoModelForCausalLM.from_pretrained(models[0]).eval()


def padded_batch():
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    return ids, mask


def test_generation_equals_local(client, local, swarm):
    _, _, peers = swarm
    first = peers["0:3"].info["peer_id"]
    forwarded_before = client.swarm_connection.transport.info(first)["forwarded"]
    prompt = torch.tensor([[11, 22, 33, 44, 55]])
    greedy = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(client.generate(prompt, **greedy), local.generate(prompt, **greedy))

    ids, mask = padded_batch()
    assert torch.equal(client.generate(ids, attention_mask=mask, **greedy), local.generate(ids, attention_mask=mask, **greedy))

    beams = dict(max_new_tokens=10, num_beams=4, do_sample=False, pad_token_id=0)
    assert torch.equal(client.generate(prompt, **beams), local.generate(prompt, **beams))

    sample = dict(max_new_tokens=12, do_sample=True, top_k=30, pad_token_id=0)
    torch.manual_seed(7)
    want = local.generate(prompt, **sample)
    torch.manual_seed(7)
    assert torch.equal(client.generate(prompt, **sample), want)

    with torch.no_grad():
        torch.testing.assert_close(client(ids, attention_mask=mask).logits, local(ids, attention_mask=mask).logits)
    # session steps were pushed (ClientConfig.push is on by default): the first peer forwarded them along the route
    assert client.swarm_connection.transport.info(first)["forwarded"] - forwarded_before >= 50  # of 54 session steps


def test_inference_session_spans_generate_calls(client, local):
    prompt = torch.tensor([[9, 8, 7, 6]])
    with client.inference_session(max_length=32) as cache:
        first = client.generate(prompt, max_new_tokens=4, do_sample=False)
        second = client.generate(first, max_new_tokens=4, do_sample=False)
        session = cache._swarm_session
        assert cache.get_seq_length() == second.shape[1] - 1
    assert session.closed
    assert torch.equal(second, local.generate(prompt, max_new_tokens=8, do_sample=False))


def test_encoder_through_peers_equals_local(models, swarm):
    _, dht, _ = swarm
    bert = models[1]
    model = AutoDistributedModel.from_pretrained(bert, initial_peers=[dht])
    try:
        ids, mask = padded_batch()
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
            want = AutoModel.from_pretrained(bert).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, want)
    finally:
        model.swarm_connection.close()


def test_replicas_share_sessions(client, swarm):
    _, _, peers = swarm
    replicas = {peers["3:5"].info["peer_id"], peers["3:5b"].info["peer_id"]}
    used = set()
    for _ in range(12):
        with client.inference_session(max_length=16) as cache:
            client.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
            used |= {hop.peer_id for hop in cache._swarm_session.hops} & replicas
        if used == replicas:
            break
    assert used == replicas, "both peers serving 3:5 should have been chosen across sessions"


def test_generate_cli_streams_tokens(models, swarm, local):
    procs, dht, _ = swarm
    result = procs.run_cli("generate", str(models[0]), "--initial-peers", dht, "--input-ids", "5,6,7", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stdout + result.stderr
    tokens = [line for line in result.stdout.splitlines() if line.startswith("tokens:")][0].split()[1:]
    want = local.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, do_sample=False)[0, 3:].tolist()
    assert [int(t) for t in tokens] == want


def raw_step(conn: SwarmConnection, peer_id: str, request: bytes) -> dict:
    return decode_message(conn.transport.step(peer_id, request))


def step_bytes(start: int, end: int, *, session: str | None = None, new: bool = False, hidden=None) -> bytes:
    hidden = torch.zeros(1, 1, 64) if hidden is None else hidden
    rotary = (torch.ones(1, hidden.shape[1], 16), torch.zeros(1, hidden.shape[1], 16))  # (batch, seq, head_dim)
    kwargs = {"position_embeddings": rotary, **({"past_key_values": CacheRef(session)} if session else {})}
    req = StepRequest(start=start, end=end, hidden=hidden, calls=[((), kwargs)], layer_calls=[0] * (end - start),
                      session_id=session, new_session=new)
    return encode_message(req.to_wire())


def test_bad_requests_get_clear_errors_while_honest_session_continues(client, local, swarm):
    _, dht, peers = swarm
    peer = peers["0:3"].info["peer_id"]
    attacker, other = SwarmConnection([dht]), SwarmConnection([dht])
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    want = local.generate(prompt, max_new_tokens=24, do_sample=False)
    honest: dict = {}

    def generate():
        honest["out"] = client.generate(prompt, max_new_tokens=24, do_sample=False)

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        cases = {
            "unknown session": (step_bytes(0, 3, session="nope"), "unknown session"),
            "range not served": (step_bytes(3, 5), "this peer serves 0:3"),
            "oversized tensor": (step_bytes(0, 3, hidden=torch.zeros(1, 20000, 64)), "exceeds the limit"),
            "wrong hidden size": (step_bytes(0, 3, hidden=torch.zeros(1, 2, 65)), "the model has 64"),
            "malformed metadata": (b"\x00garbage\xff" * 10, ""),
        }
        for name, (request, expected) in cases.items():
            reply = raw_step(attacker, peer, request)
            assert "error" in reply, f"{name}: expected an error reply, got {reply}"
            assert expected in reply["error"]["message"], f"{name}: {reply['error']}"
        # another client's session
        assert "error" not in raw_step(other, peer, step_bytes(0, 3, session="theirs", new=True))
        reply = raw_step(attacker, peer, step_bytes(0, 3, session="theirs"))
        assert "belongs to another client" in reply["error"]["message"]
    finally:
        thread.join(120)
        attacker.close()
        other.close()
    assert torch.equal(honest["out"], want)


def status(procs, dht, model) -> dict:
    result = procs.run_cli("status", str(model), "--initial-peers", dht, "--json")
    return json.loads(result.stdout)["models"][0]


def test_status_reports_coverage_then_missing_blocks(models, swarm):
    procs, dht, peers = swarm
    llama = models[0]
    before = status(procs, dht, llama)
    assert before["num_blocks"] == 8 and before["missing"] == [] and before["coverage"] == [1, 1, 1, 2, 2, 1, 1, 1]
    assert before["health"] == "degraded"
    assert {p["peer_id"] for p in before["peers"]} >= {peers[n].info["peer_id"] for n in ("0:3", "3:5", "5:8", "3:5b")}

    peers["5:8"].stop(signal.SIGTERM)
    after = wait_until(lambda: (s := status(procs, dht, llama))["missing"] and s, 30, what="missing blocks reported")
    assert after["missing"] == [[5, 8]] and after["health"] == "broken"
