"""The records the swarm keeps in the DHT, and the rules a record must follow to be believed.

This module owns the *shape* of every DHT record; `swarm.registry` owns where they live and who may
write them. Nothing here touches the network. The field-by-field reference, with units, is
`docs/records.md`.

Records:

- `PeerRecord`: one per peer and model. What a peer serves and how much it can take.
- `PlanRecord`: one per coordinator and model. The block range the coordinator assigns to each peer.
- `CoordinatorLease`: one claim per coordinator and model; the earliest live claim holds the lease.
- `ModelEntry`: one per model in the swarm-wide index of served models.

Every record:

- has a `version` (the schema's major version, `RECORD_VERSION`). Additive changes (a new field
  with a default) keep the version; readers of an older release ignore the new field
  (`extra="ignore"`). A breaking change bumps it, and readers skip records of a version they do not
  know.
- is validated strictly when read back (`Record.from_dht`): no type conversions (the string "3" is
  not the integer 3, `True` is not 1), no NaN or infinity, every string and list bounded, so a
  hostile record costs a reader a bounded amount of work and never an exception other than
  `RecordError`.
- travels as a plain dict of str / int / float / list / None (`Record.to_dht`), which msgpack and
  JSON both carry.

Errors: `RecordError` (a `ValueError`) is the only exception `from_dht` raises; its message names
the record type, each offending field, what was wrong and a short repr of the value received.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "RECORD_VERSION",
    "RecordError",
    "PeerState",
    "PEER_STATES",
    "PeerRecord",
    "PlanRecord",
    "CoordinatorLease",
    "ModelEntry",
    "model_key",
    "model_key_name",
    "public_model_name",
    "is_model_key",
    "MAX_BLOCKS",
    "MAX_ADDRS",
    "MAX_PLAN_ASSIGNMENTS",
]

RECORD_VERSION = 1  # schema major version written by this release and the only one it reads

# Size bounds. They cap what one record can make a reader parse; see docs/records.md.
MAX_BLOCKS = 100_000  # blocks in a model (the largest models today have < 200)
MAX_PEER_ID_CHARS = 128  # libp2p peer ids in base58 are 46 (RSA/sha256) to 53 characters
MAX_ADDRS = 16  # multiaddrs per peer
MAX_ADDR_CHARS = 256  # characters per multiaddr
MAX_NAME_CHARS = 64  # public_name
MAX_DEVICE_NAME_CHARS = 128  # e.g. "NVIDIA H100 80GB HBM3"
MAX_VERSION_CHARS = 32  # software_version
MAX_MODEL_NAME_CHARS = 256  # ModelEntry.model_name
MAX_PLAN_ASSIGNMENTS = 4096  # peers in one plan
MAX_UNCOVERED_RANGES = 1024  # ranges in PlanRecord.uncovered
MAX_NOTE_CHARS = 512  # PlanRecord.note
MAX_FIELDS = 256  # keys in a record dict, known and unknown together
MAX_BYTES = 2**62  # memory sizes
MAX_COUNT = 2**40  # token and session counts
MAX_RATE = 1e12  # tokens per second
MAX_DHT_TIME = 1e11  # seconds since the epoch (year 5138)

MODEL_KEY_DIGEST_CHARS = 16  # hex characters of the config hash in a model key (64 bits)
MAX_MODEL_KEY_NAME_CHARS = 64
_MODEL_KEY_RE = re.compile(rf"^[A-Za-z0-9._-]{{1,{MAX_MODEL_KEY_NAME_CHARS}}}@[0-9a-f]{{{MODEL_KEY_DIGEST_CHARS}}}$")

# config.json keys that change when the same model is re-saved or loaded differently, not when the
# model changes. Removed (at every nesting level) before hashing.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "_commit_hash",
        "torch_dtype",  # storage dtype of the checkpoint; transformers 5 writes it as "dtype"
        "dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "use_cache",
    }
)


class RecordError(ValueError):
    """A record read from the DHT (or about to be written) breaks the schema. The message says where."""


# ---------------------------------------------------------------------------------------------------
# Model key


def model_key(model_name: str, config: Mapping[str, Any]) -> str:
    """The DHT-safe key of a model: ``"<name>@<16 hex chars of sha256(canonical config)>"``.

    :param model_name: the hub id (``"org/name"``) or a local directory. A path (it starts with
      ``/``, ``.`` or ``~``, contains a backslash, or has more than one ``/``) contributes only its
      last component, so the same checkpoint in different directories on different machines gets the
      same key. ``/`` becomes ``--`` and other characters outside ``[A-Za-z0-9._-]`` become ``-``;
      the name part is cut to 64 characters.
    :param config: the parsed ``config.json`` file (``json.load``), not ``PretrainedConfig.to_dict()``,
      whose output changes with the transformers version. Keys in `VOLATILE_CONFIG_KEYS` are removed
      at every nesting level; the rest is hashed as canonical JSON (sorted keys, no whitespace).

    Two peers get the same key exactly when they use the same name and an equivalent config; peers
    serving a different revision (different config) never mix. Weights are not hashed: two
    checkpoints with the same name and config but different weights share a key.
    """
    if not isinstance(model_name, str) or not model_name.strip():
        raise RecordError(f"model_name must be a non-empty string, got {_short_repr(model_name)}")
    if not isinstance(config, Mapping):
        raise RecordError(f"config must be the dict parsed from config.json, got {type(config).__name__}")
    try:
        canonical = json.dumps(
            _drop_volatile(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True
        )
    except (TypeError, ValueError) as exc:
        raise RecordError(f"config is not JSON-serialisable ({exc}); pass the dict parsed from config.json") from exc
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:MODEL_KEY_DIGEST_CHARS]
    return f"{_key_name(model_name)}@{digest}"


def is_model_key(value: object) -> bool:
    """Whether `value` has the form `model_key` produces."""
    return isinstance(value, str) and _MODEL_KEY_RE.match(value) is not None


def model_key_name(model_name: str) -> str:
    """The name part `model_key` derives from `model_name` (to check a `ModelEntry` against its key)."""
    return _key_name(model_name)


def public_model_name(model_name: str) -> str:
    """The name to publish for a model: a hub id as given, a local directory's last component only
    (its full path says nothing useful to other machines and may say too much about this one)."""
    name = model_name.strip().rstrip("/\\")
    looks_like_path = name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
    return re.split(r"[/\\]", name)[-1] if looks_like_path else name


def _key_name(model_name: str) -> str:
    name = public_model_name(model_name).replace("/", "--")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return name[:MAX_MODEL_KEY_NAME_CHARS].rstrip("-.") or "model"


def _drop_volatile(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_volatile(v) for k, v in value.items() if k not in VOLATILE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_drop_volatile(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# Field types


def _printable(value: str) -> str:
    # rejects control characters, bidi overrides and other format characters: a record's text is
    # shown in terminals (`swarm status`) and web pages (dashboard)
    if not value.isprintable():
        raise ValueError("must contain only printable characters (no control or format characters)")
    return value


def _pair_as_tuple(value: Any) -> Any:
    # msgpack and JSON carry a (start, end) pair as a 2-element list; accept that container only
    if isinstance(value, list) and len(value) == 2:
        return tuple(value)
    return value


def _seq_as_list(value: Any) -> Any:
    # hivemind's msgpack keeps tuples as tuples; accept either container for list fields
    return list(value) if isinstance(value, tuple) else value


def _at_most(max_items: int) -> BeforeValidator:
    # checked before the items are validated, so an oversized container costs one len() call
    def check(value: Any) -> Any:
        if isinstance(value, (list, tuple, dict)) and len(value) > max_items:
            raise ValueError(f"at most {max_items} items allowed, got {len(value)}")
        return value

    return BeforeValidator(check)


def _check_range(value: tuple[int, int]) -> tuple[int, int]:
    start, end = value
    if not start < end:
        raise ValueError(f"block range must satisfy start < end, got [{start}, {end})")
    return value


PeerId = Annotated[StrictStr, Field(min_length=1, max_length=MAX_PEER_ID_CHARS, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")]
BlockIndex = Annotated[StrictInt, Field(ge=0, le=MAX_BLOCKS)]
NumBlocks = Annotated[StrictInt, Field(ge=1, le=MAX_BLOCKS)]
Bytes = Annotated[StrictInt, Field(ge=0, le=MAX_BYTES)]
Count = Annotated[StrictInt, Field(ge=0, le=MAX_COUNT)]
Rate = Annotated[float, Field(ge=0.0, le=MAX_RATE, allow_inf_nan=False)]
DhtTime = Annotated[float, Field(ge=0.0, le=MAX_DHT_TIME, allow_inf_nan=False)]
Identifier = Annotated[StrictStr, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9_]+$")]
Multiaddr = Annotated[StrictStr, Field(min_length=2, max_length=MAX_ADDR_CHARS, pattern=r"^/[\x21-\x7e]+$")]
BlockRange = Annotated[
    tuple[BlockIndex, BlockIndex], BeforeValidator(_pair_as_tuple), AfterValidator(_check_range)
]


def _text(max_chars: int) -> Any:
    return Annotated[StrictStr, Field(max_length=max_chars), AfterValidator(_printable)]


DeviceName = _text(MAX_DEVICE_NAME_CHARS)
SoftwareVersion = _text(MAX_VERSION_CHARS)
PublicName = _text(MAX_NAME_CHARS)
PlanNote = _text(MAX_NOTE_CHARS)
ModelName = _text(MAX_MODEL_NAME_CHARS)


PeerState = Literal["joining", "online", "draining"]
"""joining: announced, no blocks loaded yet (waits for a plan, or loads a range it was given);
online: serves `[start_block, end_block)`; draining: leaving, takes no new sessions."""
PEER_STATES: tuple[str, ...] = ("joining", "online", "draining")

RecordT = TypeVar("RecordT", bound="Record")


# ---------------------------------------------------------------------------------------------------
# Records


class Record(BaseModel):
    """Common behaviour: strict, frozen, tolerant of unknown fields, versioned."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, allow_inf_nan=False)

    version: StrictInt = RECORD_VERSION


    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != RECORD_VERSION:
            raise ValueError(
                f"record version {value} is not supported by this release (it reads version {RECORD_VERSION}); "
                f"peers on both sides must run compatible swarm releases"
            )
        return value

    def to_dht(self) -> dict[str, Any]:
        """The record as a plain dict (str keys; str/int/float/bool/None/list values) to store in the DHT."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dht(cls: type[RecordT], data: object) -> RecordT:
        """Parse a record read from the DHT; raises `RecordError` naming every problem found."""
        if not isinstance(data, dict):
            raise RecordError(f"invalid {cls.__name__}: expected a dict, got {type(data).__name__}")
        if len(data) > MAX_FIELDS:
            raise RecordError(f"invalid {cls.__name__}: {len(data)} fields, at most {MAX_FIELDS} allowed")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecordError(_describe(cls.__name__, exc)) from None

    @classmethod
    def build(cls: type[RecordT], **fields: Any) -> RecordT:
        """Construct and validate a record in code; raises `RecordError` (not pydantic's error)."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise RecordError(_describe(cls.__name__, exc)) from None


class PeerRecord(Record):
    """What one peer serves for one model. Written by the peer, signed with its key, refreshed every
    ~30 s, expires after ~2 refresh periods. Units: bytes, tokens, tokens/s, seconds (DHT time)."""

    peer_id: PeerId  # libp2p peer id (base58) of the peer; must match the key that signed the record
    state: PeerState
    start_block: Optional[BlockIndex] = None  # first block served; None while the peer has no range
    end_block: Optional[BlockIndex] = None  # one past the last block served (exclusive)
    num_blocks: NumBlocks  # blocks in the whole model, as this peer sees it
    device_kind: Identifier  # "cuda", "cpu", "mps" (other torch device types are accepted)
    device_name: DeviceName = ""  # e.g. "NVIDIA H100 80GB HBM3"
    dtype: Identifier  # torch dtype name without "torch.", e.g. "float16"
    free_memory_bytes: Bytes = 0  # free device memory (RAM for cpu) when last measured
    total_memory_bytes: Bytes = 0  # total device memory (RAM for cpu)
    capacity_blocks: Count = 0  # blocks this peer can hold (see DESIGN.md section 4)
    throughput: Rate = 0.0  # decode tokens/s through ONE block (batch 1)
    prefill_throughput: Rate = 0.0  # prefill tokens/s through ONE block
    free_cache_tokens: Count = 0  # KV-cache tokens still free in the peer's budget
    active_sessions: Count = 0  # inference sessions open now
    software_version: SoftwareVersion = ""  # swarm release, e.g. "0.1.0"
    public_name: PublicName = ""  # shown on the dashboard; free text
    addrs: Annotated[list[Multiaddr], BeforeValidator(_seq_as_list), _at_most(MAX_ADDRS)] = []  # multiaddrs
    pinned: StrictBool = False  # the range was chosen by the peer's operator (--blocks): planners keep it as is
    updated_at: DhtTime = 0.0  # DHT time (hivemind.utils.get_dht_time) when announced


    @model_validator(mode="after")
    def _check_blocks(self) -> PeerRecord:
        if (self.start_block is None) != (self.end_block is None):
            raise ValueError(
                f"start_block and end_block must both be set or both be None, "
                f"got start_block={self.start_block}, end_block={self.end_block}"
            )
        if self.start_block is not None:
            if not 0 <= self.start_block < self.end_block <= self.num_blocks:
                raise ValueError(
                    f"block range must satisfy 0 <= start_block < end_block <= num_blocks, "
                    f"got [{self.start_block}, {self.end_block}) with num_blocks={self.num_blocks}"
                )
        elif self.state == "online":
            raise ValueError("an online peer must announce its block range (start_block, end_block)")
        return self

    @property
    def blocks(self) -> Optional[tuple[int, int]]:
        """``(start_block, end_block)`` or None."""
        return None if self.start_block is None else (self.start_block, self.end_block)


class PlanRecord(Record):
    """A coordinator's assignment of block ranges to peers for one model. Readers accept only the plan
    signed by the current lease holder (see `swarm.registry.get_plan`)."""

    epoch: Count  # increases with every plan a coordinator publishes (a new holder continues the count)
    num_blocks: NumBlocks  # blocks in the model
    assignments: Annotated[dict[PeerId, BlockRange], _at_most(MAX_PLAN_ASSIGNMENTS)]  # peer id -> [start, end)
    uncovered: Annotated[list[BlockRange], BeforeValidator(_seq_as_list), _at_most(MAX_UNCOVERED_RANGES)] = []
    note: PlanNote = ""  # why blocks stay uncovered, or other planner remarks
    coordinator_id: PeerId  # peer id of the coordinator; must match the key that signed the plan
    created_at: DhtTime  # DHT time when the plan was made


    @model_validator(mode="after")
    def _check_ranges(self) -> PlanRecord:
        for peer_id, (start, end) in self.assignments.items():
            if end > self.num_blocks:
                raise ValueError(
                    f"assignment of {peer_id} is [{start}, {end}), past num_blocks={self.num_blocks}"
                )
        for start, end in self.uncovered:
            if end > self.num_blocks:
                raise ValueError(f"uncovered range [{start}, {end}) is past num_blocks={self.num_blocks}")
        return self


class CoordinatorLease(Record):
    """One coordinator's claim on the coordinator lease of one model. Among live, validly signed
    claims the earliest `acquired_at` (ties: the smaller id) holds the lease."""

    coordinator_id: PeerId  # peer id of the claimant; must match the key that signed the claim
    acquired_at: DhtTime  # DHT time when this tenure began (kept across renewals)
    expires_at: DhtTime  # DHT time after which the claim is dead unless renewed


    @model_validator(mode="after")
    def _check_times(self) -> CoordinatorLease:
        if self.expires_at < self.acquired_at:
            raise ValueError(f"expires_at={self.expires_at} is before acquired_at={self.acquired_at}")
        return self


class ModelEntry(Record):
    """An entry of the swarm-wide model index (`swarm.registry.list_models`). Unsigned: a discovery
    hint. Readers check that `model_name` gives the name part of its key; `num_blocks` is not
    verifiable here, so trust the peers' own records for it."""

    model_name: ModelName  # as given to model_key (hub id or directory name)
    num_blocks: NumBlocks
    updated_at: DhtTime = 0.0



# ---------------------------------------------------------------------------------------------------
# Error messages


def _short_repr(value: object, limit: int = 60) -> str:
    if isinstance(value, (dict, list, tuple, set)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value)
    if len(text) > limit:
        return f"{text[:limit]}... ({len(text)} chars)"
    return text


def _describe(name: str, exc: ValidationError, max_errors: int = 5) -> str:
    parts = []
    errors = exc.errors(include_url=False)
    for error in errors[:max_errors]:
        location = ".".join(str(item) for item in error["loc"]) or "<record>"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            parts.append(f"{location}: missing")
        elif not error["loc"]:  # a check across fields: the message carries the numbers
            parts.append(message)
        else:
            parts.append(f"{location}: {message} (got {_short_repr(error.get('input'))})")
    if len(errors) > max_errors:
        parts.append(f"and {len(errors) - max_errors} more")
    return f"invalid {name}: " + "; ".join(parts)
