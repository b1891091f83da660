"""Model-agnostic splitting of a Hugging Face model into local parts and a list of blocks.

Nothing here knows an architecture by name. The blocks of any model are found in its skeleton
(built on the `meta` device, so it costs no memory) as the largest `nn.ModuleList` whose children
all share one class. Both sides then reuse transformers' own `from_pretrained` — and with it the
checkpoint key renaming, dtype handling and buffer initialisation of every architecture — on a
subclass of the model class that swaps the modules it must not hold for parameter-free stand-ins:

- the client keeps everything but the blocks (embeddings, masks, rotary, final norm, head);
- a peer keeps only blocks ``[start, end)`` and drops everything else, so loading a range never
  materialises the whole model.

The subclass keeps the model class's ``__name__`` and module, which is what transformers keys its
checkpoint conversions on.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


class SplittingError(ValueError):
    """The model cannot be split generically (no block list, unsupported layout, bad range)."""


@dataclass(frozen=True)
class BlockLayout:
    """Where a model keeps its blocks."""

    path: str  # dotted path of the block `nn.ModuleList` from the model root, e.g. "model.layers"
    num_blocks: int  # number of blocks in the list
    block_class: str  # class name of every block, e.g. "LlamaDecoderLayer"


class Placeholder(nn.Module):
    """A parameter-free stand-in for a module a process does not hold.

    Calling it is a bug in the splitting logic, so it fails loudly with the module's name.
    """

    def __init__(self, name: str):
        super().__init__()
        self.placeholder_for = name

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"module {self.placeholder_for!r} is not held by this process")

    def extra_repr(self) -> str:
        return f"placeholder_for={self.placeholder_for!r}"


def find_block_layout(model: nn.Module) -> BlockLayout:
    """Find the model's block list: the `nn.ModuleList` with the most parameters whose children share one class.

    Works on a meta-device skeleton (parameter counts need no storage). A nested list inside a block
    (e.g. MoE experts) never wins, because the list that holds the blocks holds those experts too.
    """
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        numel = sum(p.numel() for p in module.parameters())
        key = (numel, len(module))
        if best is None or key > best[:2]:
            best = (numel, len(module), name, module)
    if best is None or best[0] == 0:
        raise SplittingError(
            f"{type(model).__name__} has no nn.ModuleList of same-class blocks with parameters; "
            "swarm can only split models whose forward loops over one list of blocks"
        )
    _, count, name, module = best
    return BlockLayout(path=name, num_blocks=count, block_class=type(module[0]).__name__)


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def build_skeleton(model_class: type, config) -> nn.Module:
    """The model built on the meta device: shapes and structure, no memory, no weights."""
    with torch.device("meta"), _quiet_transformers():
        return model_class(config)


def block_bytes(block: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes one block's parameters and persistent buffers take at `dtype` (their own dtype if None).

    Works on meta tensors, so a peer can size a range before loading anything.
    """
    total = 0
    for tensor in list(block.parameters()) + list(block.buffers()):
        if dtype is not None and tensor.is_floating_point():
            total += tensor.numel() * torch.empty((), dtype=dtype).element_size()
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def partial_model_class(base: type, transform: Callable[[nn.Module], None], mixin: type | None = None) -> type:
    """A subclass of `base` that runs `transform(model)` right after `base.__init__`.

    Same `__name__`, `__qualname__` and `__module__` as `base`, so transformers treats it as the
    original class (checkpoint key conversions, auto-class lookups). `mixin`, if given, comes first
    in the method resolution order (extra methods for distributed models).
    """

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        transform(self)
        # tied-weight pairs whose modules were swapped out must not be tied during loading
        tied = getattr(self, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            names = {name for name, _ in self.named_parameters()}
            self.all_tied_weights_keys = {t: s for t, s in tied.items() if t in names and s in names}

    return type(
        base.__name__,
        (mixin, base) if mixin is not None else (base,),
        {"__init__": __init__, "__module__": base.__module__, "__qualname__": base.__qualname__},
    )


def replace_blocks(model: nn.Module, layout: BlockLayout, make: Callable[[int, nn.Module], nn.Module]) -> None:
    """Replace block ``i`` of the model's block list by ``make(i, block)``."""
    blocks = get_submodule(model, layout.path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) != layout.num_blocks:
        raise SplittingError(f"expected {layout.num_blocks} blocks at {layout.path!r}, found {type(blocks).__name__}")
    for i in range(len(blocks)):
        blocks[i] = make(i, blocks[i])


def strip_non_block_modules(model: nn.Module, layout: BlockLayout) -> None:
    """Swap every module outside the block list that holds parameters or buffers for a placeholder.

    Used by peers: embeddings, final norms and heads (often the biggest tensors of a model) are never loaded.
    """
    path_parts = layout.path.split(".") if layout.path else []

    def visit(module: nn.Module, prefix: str, depth: int) -> None:
        on_path = path_parts[depth] if depth < len(path_parts) else None
        for name, child in list(module.named_children()):
            full = f"{prefix}{name}"
            if name == on_path:
                if depth + 1 < len(path_parts):
                    visit(child, full + ".", depth + 1)
                continue  # the block list itself: handled by replace_blocks
            if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                setattr(module, name, Placeholder(full))

    visit(model, "", 0)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports: unexpected/missing keys are the point of partial loading."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def load_config(model_name_or_path: str | Path, **kwargs):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_name_or_path), **kwargs)


def resolve_class(config, auto_class=None) -> type:
    """The model class to instantiate for `config`.

    With `auto_class` (e.g. `AutoModelForCausalLM`), the class it maps the config to. Without, the
    checkpoint's own architecture (`config.architectures[0]`), so that checkpoint keys match exactly;
    falls back to `AutoModel`.
    """
    import transformers

    if auto_class is not None:
        return auto_class._model_mapping[type(config)]
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    return transformers.AutoModel._model_mapping[type(config)]


def load_partial(
    model_name_or_path: str | Path,
    model_class: type,
    transform: Callable[[nn.Module], None],
    *,
    config=None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    mixin: type | None = None,
    **kwargs,
) -> nn.Module:
    """`from_pretrained` on a subclass of `model_class` whose modules are transformed after construction."""
    cls = partial_model_class(model_class, transform, mixin)
    extra = dict(kwargs)
    if config is not None:
        extra["config"] = config
    if dtype is not None:
        extra["dtype"] = dtype
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    with _quiet_transformers():
        model = cls.from_pretrained(str(model_name_or_path), **extra)
    model.eval()
    return model


def read_config_json(model_name_or_path: str | Path) -> dict:
    """The model's `config.json` as parsed JSON (what `swarm.records.model_key` hashes).

    A local directory is read directly; a hub id goes through transformers' own file cache.
    """
    import json

    path = Path(model_name_or_path) / "config.json"
    if not path.is_file():
        from transformers.utils import cached_file

        resolved = cached_file(str(model_name_or_path), "config.json")
        if resolved is None:
            raise SplittingError(f"{model_name_or_path!r} has no config.json (not a model directory or hub id?)")
        path = Path(resolved)
    with open(path, encoding="utf-8") as f:
        return json.load(f)
