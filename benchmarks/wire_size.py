"""Bytes on the wire per hop, against the hidden state's own bytes.

Two steps of a Llama-shaped model (hidden 1024, fp32) split over 2 in-process peers:
- a 512-token prefill of a left-padded batch of 2 (row 0 has 100 pad tokens), with a KV session;
- the decode step that follows (1 token per row).
For each, the request of one hop is parsed back into its tensor protos and metadata, and the
breakdown is printed: hidden state, masks, other tensors (rotary tables, positions), metadata.
A dense 4D mask on the wire would be reported as a failure: masks must travel bit-packed.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hivemind.proto import runtime_pb2  # noqa: E402

from peer.inprocess import start_local_peers  # noqa: E402
from swarm.local import local_router  # noqa: E402
from swarm.model import load_client_model  # noqa: E402


class Recorder:
    """Wraps a transport and keeps every request it sends."""

    def __init__(self, inner):
        self.inner, self.requests = inner, []

    def step(self, peer_id: str, request: bytes, timeout: float | None = None) -> bytes:
        self.requests.append(request)
        return self.inner.step(peer_id, request, timeout)

    def close_session(self, peer_id: str, session_id: str, wait: bool = True) -> None:
        self.inner.close_session(peer_id, session_id, wait)


def breakdown(request: bytes, hidden_shape: tuple[int, ...]) -> dict:
    msg = runtime_pb2.ExpertRequest.FromString(request)
    hidden_bytes = 4 * int(torch.Size(hidden_shape).numel())
    parts = {"total": len(request), "hidden_state": 0, "other_tensors": 0, "metadata": len(msg.metadata)}
    dense_4d = []
    for t in msg.tensors:
        size = len(t.buffer)
        if tuple(t.size) == tuple(hidden_shape) and t.dtype == "float32" and size == hidden_bytes and not parts["hidden_state"]:
            parts["hidden_state"] = size
        else:
            parts["other_tensors"] += size
        if len(t.size) == 4 and t.dtype in ("float32", "float16", "bfloat16") and size >= torch.Size(t.size).numel() * 2:
            dense_4d.append(tuple(t.size))
    parts["dense_4d_tensors"] = dense_4d
    parts["ratio_to_hidden"] = len(request) / hidden_bytes
    return parts


def main() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama"
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                             vocab_size=1000, max_position_embeddings=1024, pad_token_id=0)
        LlamaForCausalLM(config).save_pretrained(path)
        peers = start_local_peers(path, [(0, 2), (2, 4)])
        recorder = None

        def make_router(layout, cfg):
            nonlocal recorder
            router = local_router(peers, layout.num_blocks, seed=0)
            recorder = router.transport = Recorder(router.transport)
            return router

        model = load_client_model(path, make_router, auto_class=AutoModelForCausalLM)
        ids = torch.randint(3, 1000, (2, 512), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        ids[0, :100], mask[0, :100] = 0, 0
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)

    prefill, decode = recorder.requests[0], recorder.requests[len(peers)]  # first hop of each step
    rows = {"prefill 2x512 (left-padded)": breakdown(prefill, (2, 512, 1024)),
            "decode 2x1": breakdown(decode, (2, 1, 1024))}
    print(f"{'step':<30}{'total B':>12}{'hidden B':>12}{'other B':>12}{'meta B':>9}{'ratio':>8}")
    for name, r in rows.items():
        print(f"{name:<30}{r['total']:>12}{r['hidden_state']:>12}{r['other_tensors']:>12}{r['metadata']:>9}"
              f"{r['ratio_to_hidden']:>8.3f}")
    dense = [s for r in rows.values() for s in r["dense_4d_tensors"]]
    print("dense 4D float tensors on the wire:", dense or "none")
    print(json.dumps({"benchmark": "wire_size", **{k: round(v["ratio_to_hidden"], 4) for k, v in rows.items()}}))
    if dense:
        raise SystemExit("a dense 4D mask travelled on the wire")


if __name__ == "__main__":
    main()
