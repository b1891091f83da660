"""All DHT access for swarm records: where they live, who may write them, how they are read.

The shapes of the records are in `swarm.records`; the scheme is described in `docs/records.md`.

DHT keys (each a hivemind dictionary value: one subkey per writer, each with its own expiration):

- ``swarm.peers.<model_key>``: one subkey per peer, the peer's owner marker ``[owner:<RSA key>]``;
  value: a `PeerRecord`. Reading a model's whole swarm is one ``dht.get``.
- ``swarm.control.<model_key>``: coordinator claims (subkey ``lease[owner:...]``, value a
  `CoordinatorLease`) and plans (subkey ``plan:<model_key>[owner:...]``, value a `PlanRecord`).
- ``swarm.models``: the index of served models; subkey: the model key; value: a `ModelEntry`.

Who may write: every DHT made by `make_dht` uses the same RSA key for its libp2p identity and for
hivemind's `RSASignatureValidator`, so a subkey's owner marker names exactly one peer id, and only
the holder of that key can write under that subkey (other DHT nodes reject unsigned or mis-signed
writes). Readers drop a record whose ``peer_id`` / ``coordinator_id`` differs from the id of the key
that signed it. `SwarmRecordValidator` also runs on every node: it rejects plain (non-dictionary)
values, unsigned subkeys outside the model index, oversized values and far-future expirations.

Reads never raise on bad data: malformed or mis-signed records are skipped with a debug log.
Writes return False when no DHT node accepted the record. `RegistryError` is raised for misuse:
a DHT that cannot sign (not made with `make_dht`), a record that claims another peer's id.

Blocking calls. From async code, run them in a thread (``await asyncio.to_thread(get_peers, ...)``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Collection, Sequence
from typing import Any, Optional

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.records import (
    CoordinatorLease,
    ModelEntry,
    PeerRecord,
    PlanRecord,
    RecordError,
    is_model_key,
    model_key_name,
    public_model_name,
)

__all__ = [
    "RegistryError",
    "MODELS_KEY",
    "peers_key",
    "control_key",
    "SwarmRecordValidator",
    "make_dht",
    "load_or_create_identity",
    "peer_id_from_public_key",
    "local_peer_id",
    "announce_peer",
    "withdraw_peer",
    "get_peers",
    "ControlState",
    "read_control",
    "try_acquire_lease",
    "renew_lease",
    "release_lease",
    "get_lease",
    "publish_plan",
    "get_plan",
    "list_models",
    "DEFAULT_PEER_EXPIRATION_S",
    "DEFAULT_LEASE_TTL_S",
    "DEFAULT_PLAN_EXPIRATION_S",
    "MAX_EXPIRATION_S",
]

logger = logging.getLogger(__name__)

MODELS_KEY = "swarm.models"
DEFAULT_PEER_EXPIRATION_S = 60.0  # peers refresh every ~30 s; a record outlives one missed refresh
DEFAULT_LEASE_TTL_S = 30.0  # a coordinator renews every ttl/3
DEFAULT_PLAN_EXPIRATION_S = 600.0  # a plan outlives its coordinator by this much at most
MAX_EXPIRATION_S = 3600.0  # DHT nodes reject records that expire later than now + this

# Limits enforced by SwarmRecordValidator on every DHT node (values measured without the signature).
MAX_VALUE_BYTES = 8 * 1024  # a peer record, a lease claim
MAX_PLAN_BYTES = 512 * 1024  # a plan (~55 bytes per assigned peer)
MAX_MODEL_ENTRY_BYTES = 1024  # an entry of the model index
MAX_SUBKEY_BYTES = 1024  # an owner marker of a 2048-bit RSA key is 388 bytes

_OWNER_RE = re.compile(r"\[owner:(ssh-rsa [A-Za-z0-9+/]+={0,2})\]$")
_LEASE_PREFIX = "lease"
_PLAN_PREFIX = "plan:"


class RegistryError(RuntimeError):
    """The registry was used in a way that cannot work (the message says why and what to do)."""


def peers_key(model_key: str) -> str:
    """DHT key holding the peer records of one model."""
    return f"swarm.peers.{_checked_model_key(model_key)}"


def control_key(model_key: str) -> str:
    """DHT key holding the coordinator lease claims and plans of one model."""
    return f"swarm.control.{_checked_model_key(model_key)}"


def _checked_model_key(model_key: str) -> str:
    if not is_model_key(model_key):
        raise ValueError(f"{model_key!r} is not a model key; build one with swarm.records.model_key(name, config)")
    return model_key


# ---------------------------------------------------------------------------------------------------
# Identity and signing


def peer_id_from_public_key(public_key: RSAPublicKey) -> str:
    """The libp2p peer id (base58) of an RSA public key, as the p2p daemon computes it."""
    return _peer_id_from_ssh(public_key.to_bytes().decode("ascii"))


@functools.lru_cache(maxsize=16384)
def _peer_id_from_ssh(ssh_public_key: str) -> Optional[str]:
    # libp2p peer id of an RSA key: multihash(sha2-256, protobuf PublicKey{RSA, DER SubjectPublicKeyInfo})
    try:
        public_key = serialization.load_ssh_public_key(ssh_public_key.encode("ascii"))
        der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        protobuf = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
        digest = multihash.encode(hashlib.sha256(protobuf).digest(), multihash.coerce_code("sha2-256"))
        return PeerID(digest).to_base58()
    except Exception as exc:  # malformed key material from the network
        logger.debug(f"Cannot derive a peer id from owner key {ssh_public_key[:40]!r}...: {exc}")
        return None


def _signer_of(subkey: object, prefix: str) -> Optional[str]:
    """Peer id of the key in a subkey of the exact form ``prefix + "[owner:<key>]"``, else None."""
    if not isinstance(subkey, str) or len(subkey) > MAX_SUBKEY_BYTES or not subkey.startswith(prefix):
        return None
    match = _OWNER_RE.fullmatch(subkey, len(prefix))
    return None if match is None else _peer_id_from_ssh(match.group(1))


def load_or_create_identity(path: str | os.PathLike) -> RSAPrivateKey:
    """The RSA key in a libp2p identity file (protobuf PrivateKey, as hivemind writes it); the file is
    created (mode 0400) with a new key if missing. The same file gives the same peer id every run."""
    path = os.fspath(path)
    if os.path.exists(path):
        with open(path, "rb") as file:
            data = file.read()
        try:
            protobuf = crypto_pb2.PrivateKey.FromString(data)
        except Exception as exc:
            raise RegistryError(f"{path} is not a libp2p identity file ({exc}); delete it to make a new one") from exc
        if protobuf.key_type != crypto_pb2.KeyType.RSA:
            raise RegistryError(
                f"{path} holds a {crypto_pb2.KeyType.Name(protobuf.key_type)} key; swarm signs records with RSA keys, "
                f"so the identity must be RSA (delete the file to make a new one)"
            )
        return _rsa_key_from_der(protobuf.data)
    private_key = RSAPrivateKey()
    _write_identity(path, private_key)
    return private_key


def _rsa_key_from_der(der: bytes) -> RSAPrivateKey:
    private_key = RSAPrivateKey.__new__(RSAPrivateKey)  # __init__ would generate a new key
    private_key.__setstate__({"_private_key": der})
    return private_key


def _write_identity(path: str, private_key: RSAPrivateKey) -> None:
    protobuf = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=private_key.to_bytes())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError as exc:
        raise RegistryError(f"cannot create identity file {path}: the directory does not exist") from exc
    with os.fdopen(fd, "wb") as file:
        file.write(protobuf.SerializeToString())
    os.chmod(path, 0o400)


class SwarmRecordValidator(RecordValidatorBase):
    """Checks every record a DHT node stores or receives, after `RSASignatureValidator` has checked the
    signature. It rejects:

    - plain (non-dictionary) values: all swarm records are subkeys of dictionaries, and a plain value
      with a late expiration would otherwise replace a whole dictionary and block its subkeys;
    - subkeys without an owner marker, except in the model index (`MODELS_KEY`), whose subkeys must
      be model keys;
    - values over `MAX_VALUE_BYTES` (a plan under its own model's control key may take `MAX_PLAN_BYTES`;
      a model-index entry `MAX_MODEL_ENTRY_BYTES`), so no single writer can push a model's peer
      dictionary past the transport's 4 MiB message limit;
    - expirations later than now + `MAX_EXPIRATION_S`.

    All nodes of a swarm must run the same rules: hivemind drops a whole dictionary read from a node
    if any one of its subkeys fails validation.
    """

    _MODELS_KEY_ID = DHTID.generate(source=MODELS_KEY).to_bytes()

    def __init__(
        self,
        max_value_bytes: int = MAX_VALUE_BYTES,
        max_plan_bytes: int = MAX_PLAN_BYTES,
        max_model_entry_bytes: int = MAX_MODEL_ENTRY_BYTES,
        max_expiration_s: float = MAX_EXPIRATION_S,
    ):
        self.max_value_bytes, self.max_plan_bytes = max_value_bytes, max_plan_bytes
        self.max_model_entry_bytes, self.max_expiration_s = max_model_entry_bytes, max_expiration_s

    def validate(self, record: DHTRecord) -> bool:
        reason = self._rejection(record)
        if reason is not None:
            logger.debug(f"Rejected DHT record: {reason}")
            return False
        return True

    def _rejection(self, record: DHTRecord) -> Optional[str]:
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            return "plain (non-dictionary) values are not used by swarm"
        if record.expiration_time > get_dht_time() + self.max_expiration_s:
            return f"expires more than {self.max_expiration_s:.0f} s from now"
        if len(record.subkey) > MAX_SUBKEY_BYTES:
            return f"subkey of {len(record.subkey)} bytes (at most {MAX_SUBKEY_BYTES})"
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:
            return "undecodable subkey"
        if not isinstance(subkey, str):
            return f"subkey of type {type(subkey).__name__}, swarm uses str"
        size = len(record.value)
        if record.key == self._MODELS_KEY_ID:
            if not is_model_key(subkey):
                return f"model index subkey {subkey[:80]!r} is not a model key"
            if size > self.max_model_entry_bytes:
                return f"model index entry of {size} bytes (at most {self.max_model_entry_bytes})"
            return None
        if "[owner:" not in subkey:
            return "unsigned subkey (no owner marker)"
        limit = self.max_value_bytes
        if subkey.startswith(_PLAN_PREFIX):
            plan_model_key = subkey[len(_PLAN_PREFIX) : subkey.find("[owner:")]
            if is_model_key(plan_model_key) and record.key == _key_id(control_key(plan_model_key)):
                limit = self.max_plan_bytes
        if size > limit:
            return f"value of {size} bytes (at most {limit})"
        return None

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SwarmRecordValidator)  # one instance is enough


@functools.lru_cache(maxsize=4096)
def _key_id(key: str) -> bytes:
    return DHTID.generate(source=key).to_bytes()


def make_dht(
    initial_peers: Sequence[str] = (),
    *,
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    announce_maddrs: Optional[Sequence[str]] = None,
    identity_path: Optional[str | os.PathLike] = None,
    private_key: Optional[RSAPrivateKey] = None,
    client_mode: bool = False,
    record_validators: Sequence[RecordValidatorBase] = (),
    **dht_kwargs: Any,
) -> DHT:
    """Start a hivemind DHT node that can sign and check swarm records; returns once it is ready.

    :param initial_peers: multiaddrs of running nodes to join (none: start a new swarm)
    :param host_maddrs: where to listen; the default is loopback only (``/ip4/0.0.0.0/tcp/PORT`` to
      accept other machines)
    :param announce_maddrs: addresses other peers should dial (behind NAT or in containers)
    :param identity_path: libp2p identity file (created if missing) for a peer id that survives restarts
    :param private_key: an RSA key to use instead (not with identity_path); default: a new key
    :param client_mode: dial out only (clients, the dashboard): the node stores nothing for others
    :param record_validators: extra hivemind validators, after `RSASignatureValidator` and
      `SwarmRecordValidator`
    :param dht_kwargs: passed to `hivemind.dht.DHT` (and from there to DHTNode and P2P)

    The node's peer id is the id of its signing key (`local_peer_id(dht) == str(dht.peer_id)`).
    Without identity_path the key is written to a private temporary file for the p2p daemon to read at
    start, and removed once the node is up. Shut the node down with ``dht.shutdown()``.
    """
    if identity_path is not None and private_key is not None:
        raise ValueError("pass identity_path or private_key, not both")
    if dht_kwargs.pop("await_ready", True) is not True or dht_kwargs.pop("start", True) is not True:
        raise ValueError("make_dht always starts the node and waits until it is ready")
    temporary_dir = None
    if identity_path is not None:
        private_key = load_or_create_identity(identity_path)
        path = os.fspath(identity_path)
    else:
        private_key = private_key if private_key is not None else RSAPrivateKey()
        temporary_dir = tempfile.mkdtemp(prefix="swarm-identity-")
        path = os.path.join(temporary_dir, "identity.key")
        _write_identity(path, private_key)
        dht_kwargs.setdefault("check_if_identity_free", False)  # a fresh key is never in use
    if announce_maddrs is not None:
        dht_kwargs["announce_maddrs"] = [str(maddr) for maddr in announce_maddrs]
    validators = [RSASignatureValidator(private_key), SwarmRecordValidator(), *record_validators]
    try:
        dht = DHT(
            initial_peers=[str(maddr) for maddr in initial_peers] or None,
            start=True,
            host_maddrs=[str(maddr) for maddr in host_maddrs],
            identity_path=path,
            client_mode=client_mode,
            record_validators=validators,
            **dht_kwargs,
        )
    finally:
        if temporary_dir is not None:
            shutil.rmtree(temporary_dir, ignore_errors=True)
    _owner_marker(dht)  # also makes large requests to the DHT process safe (see _prepare_dht_process)
    return dht


_owner_markers: "weakref.WeakKeyDictionary[DHT, str]" = weakref.WeakKeyDictionary()


def _owner_marker(dht: DHT) -> str:
    """``[owner:<key>]`` of the key this DHT node signs with (asks the DHT process once)."""
    marker = _owner_markers.get(dht)
    if marker is None:
        found = dht.run_coroutine(_prepare_dht_process)
        if found is None:
            raise RegistryError(
                "this DHT node cannot sign records (it has no RSASignatureValidator); create it with "
                "swarm.registry.make_dht(...)"
            )
        marker = _owner_markers[dht] = found.decode("ascii")
    return marker


async def _prepare_dht_process(dht: DHT, node: Any) -> Optional[bytes]:
    """Runs in the DHT process: returns the owner marker of its signing key, and makes its command pipe
    blocking. hivemind 1.1.12 watches that pipe with uvloop's add_reader, which makes it non-blocking;
    a request over 16 KiB (a plan, a big record) is written in two parts, and if the DHT process reads
    between them, recv() raises BlockingIOError and the DHT process dies ("Ran out of input"). A
    blocking pipe makes recv() wait for the rest of a message the parent is already writing."""
    os.set_blocking(dht._inner_pipe.fileno(), True)
    validator = node.protocol.record_validator
    for item in getattr(validator, "_validators", [validator]):
        if isinstance(item, RSASignatureValidator):
            return item.local_public_key
    return None


def local_peer_id(dht: DHT) -> str:
    """The peer id of the key this DHT node signs with: put it in your records' peer_id /
    coordinator_id. Equals ``str(dht.peer_id)`` for nodes made by `make_dht`."""
    peer_id = _signer_of(_owner_marker(dht), "")
    if peer_id is None:
        raise RegistryError("cannot derive a peer id from this DHT node's signing key")
    return peer_id


def _require_own_id(dht: DHT, claimed: str, what: str) -> None:
    own = local_peer_id(dht)
    if claimed != own:
        raise RegistryError(
            f"{what} is {claimed}, but this DHT node signs as {own}: readers would drop the record. "
            f"Use swarm.registry.local_peer_id(dht) (and create the DHT with make_dht, "
            f"whose peer id is its signing key)"
        )


# ---------------------------------------------------------------------------------------------------
# Peers


def announce_peer(
    dht: DHT,
    model_key: str,
    record: PeerRecord,
    expiration_s: float = DEFAULT_PEER_EXPIRATION_S,
    *,
    model_name: Optional[str] = None,
) -> bool:
    """Publish (or refresh) this peer's record for a model; `updated_at` is set to now.

    :param expiration_s: the record disappears this long after the last refresh (at most 1 h)
    :param model_name: if given, also refreshes the model's entry in the model index (`list_models`)
      in the same DHT round; a local directory is published as its last component only
    :returns: whether a DHT node accepted the record
    """
    _require_own_id(dht, record.peer_id, "record.peer_id")
    _check_expiration(expiration_s)
    now = get_dht_time()
    record = record.model_copy(update={"updated_at": now})
    keys, subkeys, values = [peers_key(model_key)], [_owner_marker(dht)], [record.to_dht()]
    if model_name is not None:
        if model_key_name(model_name) != model_key.rsplit("@", 1)[0]:
            raise ValueError(f"model_name {model_name!r} does not give the name part of model key {model_key!r}")
        entry = ModelEntry.build(model_name=public_model_name(model_name), num_blocks=record.num_blocks, updated_at=now)
        keys.append(MODELS_KEY)
        subkeys.append(model_key)
        values.append(entry.to_dht())
    results = dht.run_coroutine(
        functools.partial(
            _store_many_in_dht_process,
            keys=keys,
            subkeys=subkeys,
            values=values,
            expiration_time=now + expiration_s,
        )
    )
    return results[0]


async def _store_many_in_dht_process(
    _dht: DHT, node: Any, keys: list, subkeys: list, values: list, expiration_time: float
) -> list[bool]:
    stored = await node.store_many(keys, values, expiration_time, subkeys=subkeys)
    return [bool(stored.get((key, subkey))) for key, subkey in zip(keys, subkeys)]


def withdraw_peer(
    dht: DHT, model_key: str, record: PeerRecord, expiration_s: float = DEFAULT_PEER_EXPIRATION_S
) -> bool:
    """Announce that this peer is leaving: its record turns `draining` (clients open no new sessions
    on it) and then expires after `expiration_s` unless refreshed. A DHT entry cannot be deleted
    early; `expiration_s` must be at least the one used by the last announce, or the DHT keeps the
    older (later-expiring) record."""
    return announce_peer(dht, model_key, record.model_copy(update={"state": "draining"}), expiration_s)


def get_peers(dht: DHT, model_key: str) -> dict[str, PeerRecord]:
    """All valid, unexpired peer records of a model, by peer id, in one DHT lookup.

    Records that fail the schema, are signed by a key other than their peer_id's, or sit under a
    malformed subkey are skipped (logged at debug level).
    """
    entries = _dictionary(dht, peers_key(model_key))
    peers: dict[str, PeerRecord] = {}
    for subkey, value in entries.items():
        signer = _signer_of(subkey, "")
        if signer is None:
            logger.debug(f"Skipped a peer record of {model_key} under a malformed subkey {str(subkey)[:60]!r}")
            continue
        try:
            record = PeerRecord.from_dht(value)
        except RecordError as exc:
            logger.debug(f"Skipped the peer record of {signer} for {model_key}: {exc}")
            continue
        if record.peer_id != signer:
            logger.debug(f"Skipped a peer record of {model_key} claiming {record.peer_id} but signed by {signer}")
            continue
        peers[record.peer_id] = record
    return peers


def _dictionary(dht: DHT, key: str, with_expiration: bool = False) -> dict[Any, Any]:
    """One latest-value lookup of a dictionary key: {subkey: value} (or (value, expiration)) of live entries."""
    found = dht.get(key, latest=True)
    if found is None:
        return {}
    if not isinstance(found.value, dict):
        logger.debug(f"DHT key {key} holds a {type(found.value).__name__}, not a dictionary; ignored")
        return {}
    now = get_dht_time()
    result = {}
    for subkey, item in found.value.items():
        value, expiration_time = getattr(item, "value", None), getattr(item, "expiration_time", None)
        if isinstance(expiration_time, bool) or not isinstance(expiration_time, (int, float)) or expiration_time <= now:
            continue
        result[subkey] = (value, expiration_time) if with_expiration else value
    return result


def _check_expiration(expiration_s: float) -> None:
    if not 0 < expiration_s <= MAX_EXPIRATION_S:
        raise ValueError(f"expiration_s must be in (0, {MAX_EXPIRATION_S:.0f}] seconds, got {expiration_s}")


# ---------------------------------------------------------------------------------------------------
# Coordinator lease and plans


@dataclasses.dataclass(frozen=True)
class ControlState:
    """What one read of a model's control key says.

    - lease: the claim holding the lease now (the earliest-acquired live claim among trusted
      coordinators), or None if no coordinator holds it
    - plan: the plan signed by the lease holder, or None
    - claims: every live, validly signed claim, by coordinator id
    - plans: every validly signed plan, by coordinator id (a new holder continues the epoch count
      from ``max(plan.epoch for plan in plans.values())``)
    """

    lease: Optional[CoordinatorLease]
    plan: Optional[PlanRecord]
    claims: dict[str, CoordinatorLease]
    plans: dict[str, PlanRecord]
    claim_expirations: dict[str, float]  # DHT expiration of each coordinator's claim entry (live or not)

    @property
    def max_epoch(self) -> int:
        """The highest epoch of any valid plan seen, or -1."""
        return max((plan.epoch for plan in self.plans.values()), default=-1)


def read_control(dht: DHT, model_key: str, *, trusted: Optional[Collection[str]] = None) -> ControlState:
    """Read the coordinator lease and plans of a model (one DHT lookup).

    :param trusted: if given, only coordinators with these peer ids can hold the lease (and so have
      their plans accepted); None accepts any coordinator.
    """
    entries = _dictionary(dht, control_key(model_key), with_expiration=True)
    now = get_dht_time()
    claims, plans, claim_expirations = {}, {}, {}
    plan_prefix = f"{_PLAN_PREFIX}{model_key}"
    for subkey, (value, expiration_time) in entries.items():
        if isinstance(subkey, str) and subkey.startswith(_LEASE_PREFIX):
            signer = _signer_of(subkey, _LEASE_PREFIX)
            parsed = _parse_signed(CoordinatorLease, value, signer, model_key)
            if parsed is not None:
                claim_expirations[signer] = expiration_time
                if parsed.expires_at > now:
                    claims[signer] = parsed
        elif isinstance(subkey, str) and subkey.startswith(plan_prefix):
            signer = _signer_of(subkey, plan_prefix)
            parsed = _parse_signed(PlanRecord, value, signer, model_key)
            if parsed is not None:
                plans[signer] = parsed
        else:
            logger.debug(f"Skipped an unknown subkey {str(subkey)[:60]!r} under {control_key(model_key)}")
    candidates = [claim for claim in claims.values() if trusted is None or claim.coordinator_id in trusted]
    holder = min(candidates, key=lambda claim: (claim.acquired_at, claim.coordinator_id), default=None)
    plan = plans.get(holder.coordinator_id) if holder is not None else None
    return ControlState(lease=holder, plan=plan, claims=claims, plans=plans, claim_expirations=claim_expirations)


def _parse_signed(cls: type, value: object, signer: Optional[str], model_key: str) -> Any:
    """The record if it parses and names its signer as coordinator_id, else None (logged)."""
    if signer is None:
        logger.debug(f"Skipped a {cls.__name__} of {model_key} under a malformed subkey")
        return None
    try:
        parsed = cls.from_dht(value)
    except RecordError as exc:
        logger.debug(f"Skipped a {cls.__name__} of {model_key} signed by {signer}: {exc}")
        return None
    if parsed.coordinator_id != signer:
        logger.debug(
            f"Skipped a {cls.__name__} of {model_key} claiming coordinator {parsed.coordinator_id} "
            f"but signed by {signer}"
        )
        return None
    return parsed


def get_lease(dht: DHT, model_key: str, *, trusted: Optional[Collection[str]] = None) -> Optional[CoordinatorLease]:
    """The claim holding a model's coordinator lease now, or None."""
    return read_control(dht, model_key, trusted=trusted).lease


def get_plan(dht: DHT, model_key: str, *, trusted: Optional[Collection[str]] = None) -> Optional[PlanRecord]:
    """The plan of the coordinator holding the lease, or None (no holder, or the holder has no plan).
    Plans signed by any other coordinator are ignored, whatever their epoch."""
    return read_control(dht, model_key, trusted=trusted).plan


def try_acquire_lease(
    dht: DHT,
    model_key: str,
    coordinator_id: str,
    ttl_s: float = DEFAULT_LEASE_TTL_S,
    *,
    trusted: Optional[Collection[str]] = None,
) -> bool:
    """Take or renew a model's coordinator lease; returns whether this coordinator holds it now.

    If another coordinator holds a live claim, returns False without writing. Otherwise writes (or
    renews, keeping `acquired_at`) this coordinator's claim until now + ttl_s, reads back, and returns
    whether this claim is the earliest live one. Call it every ttl_s / 3; act as coordinator only
    while it returns True. Best effort: see docs/records.md for the guarantee.
    """
    _require_own_id(dht, coordinator_id, "coordinator_id")
    _check_expiration(ttl_s)
    state = read_control(dht, model_key, trusted=trusted)
    if state.lease is not None and state.lease.coordinator_id != coordinator_id:
        return False
    own = state.claims.get(coordinator_id)
    return _write_claim(dht, model_key, coordinator_id, ttl_s, own, state, trusted)


def renew_lease(
    dht: DHT,
    model_key: str,
    coordinator_id: str,
    ttl_s: float = DEFAULT_LEASE_TTL_S,
    *,
    trusted: Optional[Collection[str]] = None,
) -> bool:
    """Extend the lease if this coordinator holds it now; False (and no write) otherwise, e.g. after
    its claim expired while it was stalled. A coordinator that gets False must stop acting."""
    _require_own_id(dht, coordinator_id, "coordinator_id")
    _check_expiration(ttl_s)
    state = read_control(dht, model_key, trusted=trusted)
    if state.lease is None or state.lease.coordinator_id != coordinator_id:
        return False
    return _write_claim(dht, model_key, coordinator_id, ttl_s, state.lease, state, trusted)


def _write_claim(
    dht: DHT,
    model_key: str,
    coordinator_id: str,
    ttl_s: float,
    own: Optional[CoordinatorLease],
    state: ControlState,
    trusted: Optional[Collection[str]],
) -> bool:
    now = get_dht_time()
    claim = CoordinatorLease.build(
        coordinator_id=coordinator_id, acquired_at=own.acquired_at if own is not None else now, expires_at=now + ttl_s
    )
    expiration_time = max(now + ttl_s, state.claim_expirations.get(coordinator_id, 0.0) + 1e-3)
    stored = dht.store(
        control_key(model_key), claim.to_dht(), expiration_time, subkey=_LEASE_PREFIX + _owner_marker(dht)
    )
    if not stored:
        return False
    holder = read_control(dht, model_key, trusted=trusted).lease
    return holder is not None and holder.coordinator_id == coordinator_id


def release_lease(dht: DHT, model_key: str, coordinator_id: str) -> bool:
    """Give the lease up now (e.g. on shutdown) so a standby can take over without waiting for expiry.
    Returns whether the release was stored (False if this coordinator had no claim)."""
    _require_own_id(dht, coordinator_id, "coordinator_id")
    state = read_control(dht, model_key)
    own = state.claims.get(coordinator_id)
    if own is None:
        return False
    now = get_dht_time()
    released = CoordinatorLease.build(
        coordinator_id=coordinator_id, acquired_at=min(own.acquired_at, now), expires_at=now
    )
    # a DHT entry only gives way to one that expires later, so the dead claim lingers until then
    expiration_time = max(state.claim_expirations.get(coordinator_id, now) + 1e-3, now + 1.0)
    return dht.store(
        control_key(model_key), released.to_dht(), expiration_time, subkey=_LEASE_PREFIX + _owner_marker(dht)
    )


def publish_plan(
    dht: DHT, model_key: str, plan: PlanRecord, expiration_s: float = DEFAULT_PLAN_EXPIRATION_S
) -> bool:
    """Publish this coordinator's plan for a model (replacing its previous one). Readers accept it only
    while this coordinator holds the lease; publishing does not check that."""
    _require_own_id(dht, plan.coordinator_id, "plan.coordinator_id")
    _check_expiration(expiration_s)
    return dht.store(
        control_key(model_key),
        plan.to_dht(),
        get_dht_time() + expiration_s,
        subkey=f"{_PLAN_PREFIX}{model_key}{_owner_marker(dht)}",
    )


# ---------------------------------------------------------------------------------------------------
# Model index


def list_models(dht: DHT) -> dict[str, ModelEntry]:
    """Models with at least one peer that announced with `model_name` recently, by model key.

    Entries are unsigned hints: each must be a valid `ModelEntry` whose model_name gives its key's
    name part; `num_blocks` is what the last writer said (read the peer records for the truth).
    """
    models = {}
    for subkey, value in _dictionary(dht, MODELS_KEY).items():
        if not is_model_key(subkey):
            logger.debug(f"Skipped a model index entry under a malformed subkey {str(subkey)[:60]!r}")
            continue
        try:
            entry = ModelEntry.from_dht(value)
        except RecordError as exc:
            logger.debug(f"Skipped the model index entry of {subkey}: {exc}")
            continue
        if model_key_name(entry.model_name) != subkey.rsplit("@", 1)[0]:
            logger.debug(f"Skipped the model index entry of {subkey}: name {entry.model_name!r} does not match")
            continue
        models[subkey] = entry
    return models
