"""The floor of an extra hop on this machine: chains of bare relays, each running its blocks and nothing else.

`generate.py` measures what one more peer adds per token (the slope of TPOT over 1, 2, 3 peers). How much of
that is this machine (the transfers, the wake-ups, blocks run cold because every process of a chain waits for
its turn) and how much is the peer's own code? Here each relay is a process that does only what no design can
avoid: it reads a fixed-size frame from a blocking TCP socket (the position, the hidden state, the rotary
cos/sin), wraps the bytes as tensors, runs its contiguous blocks of the small Llama on its own `DynamicCache`
with the keyword arguments the model's forward passes, and writes the output to the next relay (the last one
to the client). No codec, no checks, no event loop, no sessions. The client keeps the embedding, rotary, norm
and head and decodes greedily; its tokens must equal the same model's run locally (checked, the run fails
otherwise).

Chains of every `--peers` count are up at once, with the blocks split as `generate.py` splits them; each round
runs the local model and every chain (order rotating), `--tokens` tokens each; a round's extra hop is the
least-squares slope of its TPOTs over the peer counts, and the figure printed is the median over rounds.

`--client-pause-ms` adds that much of a Python loop to the client between tokens: the swarm's client spends
~2-3 ms of its own there (`hop_trace.py`, "client, from a reply to the next send"), and how long each process
waits changes how cold it runs. The relays are not the product: they trust their input and serve one client.

`--generate` measures the floor on `generate.py`'s own terms: the client runs transformers' `generate()` (greedy,
`generate.py`'s 16-token prompt, TPOT = (full - TTFT) / (N - 1)) on the model with its layers replaced by stubs,
the last of which sends the hidden state to the chain and returns what comes back (the first `N - 1` pass it on),
and the local baseline is the same `generate()` on the whole model (linear layers on the kernels `speed_up_linears`
picks, in the relays too, as `generate.py`'s baseline and peers have them). That is what the swarm's client does, without
its codec, sessions, checks or fault tolerance: whatever the swarm measures above this floor is its own software.
`--swarm` also starts the real swarm of each split (`swarm run-peer` processes, as `generate.py` does) and measures
it in the same rounds: its ratio to the floor is the swarm's own cost, with this machine's drift taken out.

    python benchmarks/hop_floor.py                      # floor: extra hop, and 2 relays against local
    python benchmarks/hop_floor.py --client-pause-ms 2
    python benchmarks/hop_floor.py --generate           # the same chains under generate(), as generate.py measures
    python benchmarks/hop_floor.py --generate --swarm   # ... and the swarm of each split, in the same rounds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.generate import MODELS, even_ranges  # noqa: E402

POSITION = struct.Struct("<I")
HEADER = struct.Struct("<II")  # --generate frames: position of the first token, number of tokens


def small_model():
    """The small Llama of generate.py, built with the same seed in every process (so, the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **MODELS["small"])).eval()


def frame_bytes(config) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    return POSITION.size + 4 * (config.hidden_size + 2 * head_dim)


def read_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            return None
        got += k
    return buf


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def relay_ends(start: int, end: int, next_port: int, fast_linears: bool):
    """A relay's blocks [start, end) and its two sockets: in on its own port (printed, then accepted), out to
    `next_port`. `fast_linears`: on the kernels `speed_up_linears` picks, as the peers' default (`--linear-kernel
    auto`)."""
    torch.set_num_threads(1)
    model = small_model()
    layers, config = model.model.layers[start:end], model.config
    if fast_linears:
        from swarm.fast_linear import speed_up_linears
        from swarm.huge_pages import move_to_huge_pages

        move_to_huge_pages(layers)  # as a peer does (swarm.huge_pages)
        speed_up_linears(layers)
    server = listener()
    print(server.getsockname()[1], flush=True)
    inbound, _ = server.accept()
    return layers, config, inbound, connect(next_port)


def relay(start: int, end: int, next_port: int) -> None:
    """One relay: blocks [start, end), frames in on its own port (printed), out to `next_port`."""
    from transformers.cache_utils import DynamicCache

    layers, config, inbound, outbound = relay_ends(start, end, next_port, fast_linears=False)
    hidden, half = config.hidden_size, config.hidden_size // config.num_attention_heads
    size = frame_bytes(config)
    cache = DynamicCache(config=config)
    with torch.inference_mode():
        while (data := read_exactly(inbound, size)) is not None:
            (position,) = POSITION.unpack_from(data)
            if position == 0:
                cache = DynamicCache(config=config)
            values = torch.frombuffer(data, dtype=torch.float32, offset=POSITION.size)
            h = values[:hidden].view(1, 1, hidden)
            cos, sin = values[hidden:hidden + half].view(1, 1, half), values[hidden + half:].view(1, 1, half)
            position_ids = torch.tensor([[position]])
            for layer in layers:
                h = layer(h, attention_mask=None, position_embeddings=(cos, sin), position_ids=position_ids,
                          cache=cache, use_cache=True)
            outbound.sendall(data[:POSITION.size] + h.numpy().tobytes() + data[POSITION.size + 4 * hidden:])


def generate_relay(start: int, end: int, next_port: int) -> None:
    """A `--generate` relay: like `relay`, but frames carry a header and any number of tokens (the prefill too)."""
    from transformers.cache_utils import DynamicCache

    layers, config, inbound, outbound = relay_ends(start, end, next_port, fast_linears=True)
    hidden, half = config.hidden_size, config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    with torch.inference_mode():
        while (header := read_exactly(inbound, HEADER.size)) is not None:
            position, seq = HEADER.unpack(header)
            data = read_exactly(inbound, 4 * seq * (hidden + 2 * half))
            if data is None:
                return
            if position == 0:
                cache = DynamicCache(config=config)
            values = torch.frombuffer(data, dtype=torch.float32)
            h = values[:seq * hidden].view(1, seq, hidden)
            cos = values[seq * hidden:seq * (hidden + half)].view(1, seq, half)
            sin = values[seq * (hidden + half):].view(1, seq, half)
            position_ids = torch.arange(position, position + seq).unsqueeze(0)
            for layer in layers:
                h = layer(h, attention_mask=None, position_embeddings=(cos, sin), position_ids=position_ids,
                          cache=cache, use_cache=True)
            outbound.sendall(header + h.numpy().tobytes() + data[4 * seq * hidden:])


class Chain:
    """`k` relays in a row; the client sends to the first and reads from the last."""

    def __init__(self, k: int, num_layers: int, generate: bool = False):
        self.k = k
        back = listener()
        self.procs, port = [], back.getsockname()[1]
        for blocks in reversed(even_ranges(num_layers, k)):  # the last first: each relay's next is listening
            start, end = blocks.split(":")
            proc = subprocess.Popen([sys.executable, __file__, "--generate-relay" if generate else "--relay", start, end,
                                     str(port)],
                                    stdout=subprocess.PIPE, text=True)
            self.procs.append(proc)
            port = int(proc.stdout.readline())
        self.send = connect(port)
        self.recv, _ = back.accept()
        back.close()

    def close(self) -> None:
        self.send.close()
        self.recv.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def decode(model, tokens: int, pause_s: float, chain: Chain | None) -> tuple[float, list[int]]:
    """Greedy decode from token 5, one token per step: (median seconds per token after the first 4, the tokens)."""
    from transformers.cache_utils import DynamicCache

    inner, head = model.model, model.lm_head
    cache = DynamicCache(config=model.config)
    token, times, out = torch.tensor([[5]]), [], []
    size = frame_bytes(model.config)
    with torch.inference_mode():
        for position in range(tokens):
            t0 = time.perf_counter()
            h = inner.embed_tokens(token)
            position_ids = torch.tensor([[position]])
            cos, sin = inner.rotary_emb(h, position_ids)
            if chain is None:
                for layer in inner.layers:
                    h = layer(h, attention_mask=None, position_embeddings=(cos, sin), position_ids=position_ids,
                              cache=cache, use_cache=True)
            else:
                chain.send.sendall(POSITION.pack(position) + h.numpy().tobytes() + cos.numpy().tobytes()
                                   + sin.numpy().tobytes())
                data = read_exactly(chain.recv, size)
                if data is None:
                    raise RuntimeError(f"a relay of the {chain.k}-relay chain exited")
                h = torch.frombuffer(data, dtype=torch.float32, offset=POSITION.size)[:h.numel()].view(h.shape)
            token = head(inner.norm(h)).argmax(-1)
            out.append(int(token))
            until = time.perf_counter() + pause_s
            while time.perf_counter() < until:
                pass
            times.append(time.perf_counter() - t0)
    return statistics.median(times[4:]), out


class StubLayer(torch.nn.Module):
    """Stands in for decoder layer `index` under `generate()`: the last one sends the step to its `chain`."""

    def __init__(self, index: int, last: bool, hidden_size: int):
        super().__init__()
        self.index, self.last, self.hidden_size = index, last, hidden_size
        self.chain: Chain | None = None  # the last stub's, set by `ChainModel` before each generation

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, position_embeddings=None,
                **kwargs):
        from swarm.remote import advance_lengths

        if cache is None:
            raise RuntimeError("the model's layers got no cache: this transformers passes it under another name")
        advance_lengths([(self.index, cache)], hidden_states)  # the client's cache lengths, as the swarm's client keeps them
        if not self.last:
            return hidden_states
        chain = self.chain
        cos, sin = position_embeddings
        seq = hidden_states.shape[1]
        chain.send.sendall(HEADER.pack(int(position_ids[0, 0]), seq) + hidden_states.numpy().tobytes()
                           + cos.numpy().tobytes() + sin.numpy().tobytes())
        data = read_exactly(chain.recv, HEADER.size + 4 * seq * (self.hidden_size + 2 * cos.shape[-1]))
        if data is None:
            raise RuntimeError(f"a relay of the {chain.k}-relay chain exited")
        out = torch.frombuffer(data, dtype=torch.float32, offset=HEADER.size)[:hidden_states.numel()]
        return out.view(hidden_states.shape).clone()


def generate_main(args) -> None:
    """`--generate`: local `generate()` against the same `generate()` over stub layers and bare relays (and, with
    `--swarm`, over the real swarm of the same split), all in the same rounds."""
    import tempfile

    from benchmarks.generate import build, measure_rounds, paired
    from swarm.fast_linear import speed_up_linears
    from swarm.huge_pages import move_to_huge_pages

    torch.set_num_threads(1)
    local, client = small_model(), small_model()
    move_to_huge_pages(local)  # as the peers and the swarm's client (`ClientConfig.huge_pages`)
    move_to_huge_pages(client)
    speed_up_linears(local)  # as generate.py's local baseline and the swarm's client (`ClientConfig.linear_kernel`)
    speed_up_linears(client)
    num_layers = client.config.num_hidden_layers
    client.model.layers = torch.nn.ModuleList(
        StubLayer(i, i == num_layers - 1, client.config.hidden_size) for i in range(num_layers))
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    gen = dict(do_sample=False, pad_token_id=0, max_new_tokens=args.tokens)
    chains, swarms = {}, {}
    with contextlib.ExitStack() as stack:
        for k in args.peers:
            chains[k] = Chain(k, num_layers, generate=True)
            stack.callback(chains[k].close)
        if args.swarm:
            swarms = start_swarms(stack, args.peers, build("small", Path(stack.enter_context(tempfile.TemporaryDirectory()))))
        reference = local.generate(prompt, **gen)
        models = {"local": local}
        for k, chain in chains.items():
            models[k] = ChainModel(client, chain)
        for k, swarm in swarms.items():
            models[f"swarm {k}"] = swarm
        for label, model in models.items():
            if label != "local" and not torch.equal(model.generate(prompt, **gen), reference):
                raise SystemExit(f"{label!r}: greedy tokens differ from the local model's")
        samples = measure_rounds(models, prompt, args.tokens, args.rounds)
    tpots = {k: [tpot for _, tpot in samples[k]] for k in models}
    hops = [slope([(k, tpots[k][r] * 1e3) for k in chains]) for r in range(args.rounds)]
    print(f"small model, bare relays under generate(), {args.rounds} rounds of {args.tokens} tokens")
    print(f"  local: {statistics.median(tpots['local']) * 1e3:.2f} ms per token")
    ratios, over_floor = {}, {}
    for k in chains:
        ratios[k] = paired(samples, k)[3]
        print(f"  {k} relay{'s' * (k > 1)}: {statistics.median(tpots[k]) * 1e3:.2f} ms per token, {ratios[k]:.2f}x local")
    for k in swarms:
        label = f"swarm {k}"
        ratios[label] = paired(samples, label)[3]
        over_floor[k] = paired(samples, label, base=k)[3]
        print(f"  the swarm, {k} peer{'s' * (k > 1)}: {statistics.median(tpots[label]) * 1e3:.2f} ms per token, "
              f"{ratios[label]:.2f}x local, {over_floor[k]:.2f}x the {k}-relay floor")
    print(f"extra hop, bare relays under generate(): {statistics.median(hops):+.2f} ms per token (median of the "
          f"per-round slopes over {args.peers} relays)")
    print(json.dumps({"benchmark": "hop_floor", "generate": True, "rounds": args.rounds,
                      "tpot_ms": {str(k): round(statistics.median(v) * 1e3, 3) for k, v in tpots.items()},
                      "tpot_ratio": {str(k): round(v, 3) for k, v in ratios.items()},
                      "swarm_over_floor": {str(k): round(v, 3) for k, v in over_floor.items()},
                      "extra_hop_ms": round(statistics.median(hops), 3)}))


def start_swarms(stack: contextlib.ExitStack, peer_counts: list[int], path: Path) -> dict:
    """A real swarm per peer count (its own DHT and `swarm run-peer` processes, one torch thread each, the blocks split
    as the relays split them) and a client of each: generate.py's setup, on the same checkpoint."""
    from swarm import AutoDistributedModelForCausalLM, ClientConfig
    from tests.processes import SwarmProcesses

    clients = {}
    for k in peer_counts:
        procs = stack.enter_context(SwarmProcesses())
        dht = procs.start_dht()
        ranges = even_ranges(MODELS["small"]["num_hidden_layers"], k)
        for proc in [procs.start_peer(path, dht, r, "--num-threads", "1", wait=False) for r in ranges]:
            procs.wait_ready(proc)
        clients[k] = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[dht], client_config=ClientConfig())
        stack.callback(clients[k].swarm_connection.close)
    return clients


class ChainModel:
    """The stub-layer client bound to one chain: what `measure_rounds` calls `generate` on."""

    def __init__(self, client, chain: Chain):
        self.client, self.chain = client, chain

    def generate(self, *args, **kwargs):
        self.client.model.layers[-1].chain = self.chain
        return self.client.generate(*args, **kwargs)


def slope(points: list[tuple[int, float]]) -> float:
    mean_k = sum(k for k, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    return sum((k - mean_k) * (t - mean_t) for k, t in points) / sum((k - mean_k) ** 2 for k, _ in points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--client-pause-ms", type=float, default=0.0)
    parser.add_argument("--generate", action="store_true",
                        help="the client runs transformers' generate() over stub layers, as the swarm's client does")
    parser.add_argument("--swarm", action="store_true",
                        help="with --generate: the real swarm of each peer count too, in the same rounds")
    parser.add_argument("--relay", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--generate-relay", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        relay(*args.relay)
        return
    if args.generate_relay:
        generate_relay(*args.generate_relay)
        return
    if len(set(args.peers)) < 2:
        parser.error("--peers needs at least two different counts for a slope")
    if args.generate:
        generate_main(args)
        return
    torch.set_num_threads(1)
    model = small_model()
    pause = args.client_pause_ms / 1e3
    chains = {}
    try:
        for k in args.peers:
            chains[k] = Chain(k, model.config.num_hidden_layers)
        reference = decode(model, args.tokens, pause, None)[1]
        for k, chain in chains.items():
            if decode(model, args.tokens, pause, chain)[1] != reference:
                raise SystemExit(f"the {k}-relay chain's greedy tokens differ from the local model's")
        labels = ["local", *chains]
        samples: dict = {label: [] for label in labels}
        for r in range(args.rounds):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                samples[label].append(decode(model, args.tokens, pause, chains.get(label))[0])
    finally:
        for chain in chains.values():
            chain.close()
    hops = [slope([(k, samples[k][r] * 1e3) for k in chains]) for r in range(args.rounds)]
    print(f"small model, bare relays, client pause {args.client_pause_ms:g} ms, {args.rounds} rounds of {args.tokens} tokens")
    print(f"  local: {statistics.median(samples['local']) * 1e3:.2f} ms per token")
    ratios = {}
    for k in chains:
        ratios[k] = statistics.median(a / b for a, b in zip(samples[k], samples["local"]))
        print(f"  {k} relay{'s' * (k > 1)}: {statistics.median(samples[k]) * 1e3:.2f} ms per token, {ratios[k]:.2f}x local")
    quartiles = statistics.quantiles(hops, n=4)
    print(f"extra hop, bare relays: {statistics.median(hops):+.2f} ms per token (median of the per-round slopes over "
          f"{args.peers} relays; quartiles {quartiles[0]:.2f} / {quartiles[2]:.2f})")
    print(json.dumps({"benchmark": "hop_floor", "client_pause_ms": args.client_pause_ms, "rounds": args.rounds,
                      "tpot_ms": {str(k): round(statistics.median(v) * 1e3, 3) for k, v in samples.items()},
                      "tpot_ratio": {str(k): round(v, 3) for k, v in ratios.items()},
                      "extra_hop_ms": round(statistics.median(hops), 3)}))


if __name__ == "__main__":
    main()
