"""`wire_dtype`: hidden states travel at a lower precision when the user asks for it (never by default)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.inprocess import start_local_peers
from swarm.client import ClientConfig
from swarm.local import LocalTransport, local_router
from swarm.model import load_client_model
from swarm.protocol import StepRequest, StepResponse
from swarm.wire import decode_message
from tests.tiny_models import NUM_LAYERS, save_tiny


class Spy(LocalTransport):
    """Records the dtype of every hidden state sent and received, by the client and by peers forwarding pushed steps."""

    def __init__(self, peers):
        super().__init__(peers)
        self.sent: list[torch.dtype] = []
        self.received: list[torch.dtype] = []

    def call(self, peer_id: str, request: bytes, caller: str) -> bytes:
        self.sent.append(StepRequest.from_wire(decode_message(request)).hidden.dtype)
        reply = super().call(peer_id, request, caller)
        self.received.append(StepResponse.from_wire(decode_message(reply)).hidden.dtype)
        return reply


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_lower_precision_on_the_wire_is_close_and_only_when_asked(wire, tmp_path):
    path = save_tiny("llama", tmp_path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peers = start_local_peers(path, [(0, 2), (2, 4), (4, NUM_LAYERS)])
    spies = {}

    def model(wire_dtype):
        def make_router(layout, config):
            spies[wire_dtype] = Spy(peers)
            return local_router(peers, layout.num_blocks, seed=0, transport=spies[wire_dtype], wire_dtype=wire_dtype)
        return load_client_model(path, make_router, auto_class=AutoModelForCausalLM, dtype=torch.float32)

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    lossy_model = model(wire)
    with torch.no_grad():
        want = local(input_ids=ids).logits
        exact = model(None)(input_ids=ids).logits
        lossy = lossy_model(input_ids=ids).logits
    # a session too: its pushed steps go peer to peer at the lower precision
    calls = len(spies[wire].sent)
    out = lossy_model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 18) and len(spies[wire].sent) >= calls + 6 * 3
    torch.testing.assert_close(exact, want, rtol=1e-5, atol=1e-5)
    assert set(spies[None].sent) == set(spies[None].received) == {torch.float32}
    assert set(spies[wire].sent) == set(spies[wire].received) == {wire}  # every hop, both ways
    assert lossy.dtype == torch.float32
    assert not torch.equal(lossy, want)  # it did travel at a lower precision...
    torch.testing.assert_close(lossy, want, rtol=0.05, atol=0.05)  # ...and stays close
    assert (lossy.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_unknown_wire_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="wire_dtype must be one of float32, float16, bfloat16"):
        ClientConfig(wire_dtype="int8")
