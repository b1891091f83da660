"""`swarm generate MODEL --prompt TEXT`: generate through the swarm, streaming tokens as they come."""

from __future__ import annotations

import argparse
import sys

from cli.common import add_initial_peers, check_model_files


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text through the swarm (tokens stream as produced)")
    p.add_argument("model", help="model directory or hub id (the client loads embeddings and head only)")
    add_initial_peers(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (needs the model's tokenizer)")
    src.add_argument("--input-ids", help="comma-separated token ids, for models without a tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--wire-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="send hidden states between peers at this precision (default: the model's own, exact); "
                        "bfloat16 halves the bytes of an fp32 model's activations at a small cost in accuracy")
    p.set_defaults(func=run)


class IdStreamer:
    """Prints token ids as `generate` produces them (the prompt first, on its own line)."""

    def __init__(self, out=sys.stdout):
        self.out, self.first = out, True

    def put(self, value) -> None:
        ids = value.reshape(-1).tolist()
        if self.first:
            self.first = False
            print("prompt:", ",".join(map(str, ids)), file=self.out, flush=True)
            print("tokens:", end="", file=self.out, flush=True)
            return
        print(" " + " ".join(map(str, ids)), end="", file=self.out, flush=True)

    def end(self) -> None:
        print(file=self.out, flush=True)


def run(args: argparse.Namespace) -> int:
    problem = check_model_files(args.model)
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    import torch

    from swarm.client import AutoDistributedModelForCausalLM, ClientConfig, SwarmConnection

    if args.seed is not None:
        torch.manual_seed(args.seed)
    config = ClientConfig(wire_dtype=args.wire_dtype)
    connection = SwarmConnection(args.initial_peers, config)
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers,
                                                                connection=connection, client_config=config)
        warn_if_uncovered(model)
        return _generate(args, model)
    finally:
        connection.close()


def warn_if_uncovered(model) -> None:
    """Say so before generating when some blocks have no peer: the client then waits for peers to join."""
    from swarm.status import collect_status

    key = model.swarm_model_key
    status = collect_status(model.swarm_connection.dht, {key: None})["models"][0]
    if not any(p["state"] == "online" for p in status["peers"]):
        print(f"note: no online peer serves {key} yet; waiting for peers to join. Peers must be started with the "
              "same model (a directory counts by its last component, plus its config.json: `swarm status` lists the "
              "models being served)", file=sys.stderr, flush=True)
    elif status["missing"]:
        missing = ", ".join(f"{a}..{b - 1}" for a, b in status["missing"])
        print(f"note: no peer serves block(s) {missing} of {status['num_blocks']} yet; waiting for peers to join "
              f"(`swarm status` shows coverage; start `swarm run-peer` for those blocks)", file=sys.stderr, flush=True)


def _generate(args: argparse.Namespace, model) -> int:
    import torch

    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample)
    if args.do_sample:
        kwargs["temperature"] = args.temperature
    if args.input_ids is not None:
        try:
            ids = torch.tensor([[int(x) for x in args.input_ids.split(",")]])
        except ValueError:
            print(f"error: --input-ids takes comma-separated integers, got {args.input_ids!r}", file=sys.stderr)
            return 2
        streamer = IdStreamer()
    else:
        from transformers import AutoTokenizer, TextStreamer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as exc:
            print(f"error: {args.model} has no usable tokenizer ({exc}); pass --input-ids instead", file=sys.stderr)
            return 2
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        streamer = TextStreamer(tokenizer)
        if tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id
    with model.inference_session(max_length=ids.shape[1] + args.max_new_tokens):
        model.generate(ids, streamer=streamer, **kwargs)
    return 0
