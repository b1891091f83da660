"""swarm.records: schema, strict parsing, bounds and model keys. No network."""

import msgpack
import pytest

from swarm.records import (
    MAX_ADDRS,
    RECORD_VERSION,
    CoordinatorLease,
    ModelEntry,
    PeerRecord,
    PlanRecord,
    RecordError,
    is_model_key,
    model_key,
    model_key_name,
    public_model_name,
)

PEER_A = "QmcDDahr3A1jnWJBu9Ld33wPeKtFas7e8jY2Ar6MTJnpiG"
PEER_B = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "rope_theta": 10000.0,
    "_name_or_path": "/tmp/llama",
    "transformers_version": "5.0.0",
}


def make_peer(**overrides) -> PeerRecord:
    fields = dict(
        peer_id=PEER_A,
        state="online",
        start_block=2,
        end_block=6,
        num_blocks=8,
        device_kind="cuda",
        device_name="NVIDIA H100 80GB HBM3",
        dtype="bfloat16",
        free_memory_bytes=40 * 2**30,
        total_memory_bytes=80 * 2**30,
        capacity_blocks=20,
        throughput=812.5,
        prefill_throughput=15000.0,
        free_cache_tokens=65536,
        active_sessions=3,
        software_version="0.1.0",
        public_name="lab box",
        addrs=["/ip4/10.0.0.5/tcp/31337", "/ip4/10.0.0.5/udp/31337/quic-v1"],
        updated_at=1_700_000_000.25,
    )
    fields.update(overrides)
    return PeerRecord.build(**fields)


def test_peer_record_round_trips_through_msgpack():
    record = make_peer()
    wire = record.to_dht()
    assert wire["version"] == RECORD_VERSION and wire["state"] == "online"
    assert PeerRecord.from_dht(msgpack.unpackb(msgpack.packb(wire))) == record
    assert record.blocks == (2, 6)


def test_joining_peer_has_no_range():
    record = make_peer(state="joining", start_block=None, end_block=None)
    assert PeerRecord.from_dht(record.to_dht()).blocks is None


def test_plan_lease_and_model_entry_round_trip():
    plan = PlanRecord.build(
        epoch=7,
        num_blocks=8,
        assignments={PEER_A: (0, 5), PEER_B: (5, 8)},
        uncovered=[],
        coordinator_id=PEER_A,
        created_at=1.5,
    )
    wire = msgpack.unpackb(msgpack.packb(plan.to_dht()))
    assert wire["assignments"][PEER_A] == [0, 5]  # pairs travel as lists
    assert PlanRecord.from_dht(wire) == plan
    lease = CoordinatorLease.build(coordinator_id=PEER_A, acquired_at=10.0, expires_at=40.0)
    assert CoordinatorLease.from_dht(lease.to_dht()) == lease
    entry = ModelEntry.build(model_name="org/model", num_blocks=8, updated_at=3.0)
    assert ModelEntry.from_dht(entry.to_dht()) == entry


def test_tuples_from_hivemind_msgpack_are_accepted():
    # hivemind's serializer keeps tuples as tuples; the parser accepts either container
    wire = dict(make_peer().to_dht(), addrs=("/ip4/1.2.3.4/tcp/5",))
    assert PeerRecord.from_dht(wire).addrs == ["/ip4/1.2.3.4/tcp/5"]
    plan = dict(
        version=1, epoch=1, num_blocks=4, assignments={PEER_A: (0, 4)}, coordinator_id=PEER_A, created_at=0.0
    )
    assert PlanRecord.from_dht(plan).assignments[PEER_A] == (0, 4)


def test_unknown_fields_from_newer_peers_are_ignored():
    wire = dict(make_peer().to_dht(), gpu_temperature_c=71, features={"speculative": True})
    assert PeerRecord.from_dht(wire) == make_peer()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"start_block": 5, "end_block": 5}, "0 <= start_block < end_block <= num_blocks"),
        ({"start_block": 6, "end_block": 2}, "got [6, 2)"),
        ({"end_block": 9}, "num_blocks=8"),
        ({"start_block": -1}, "start_block: Input should be greater than or equal to 0"),
        ({"start_block": None}, "both be set or both be None"),
        ({"state": "online", "start_block": None, "end_block": None}, "online peer must announce its block range"),
        ({"state": "gone"}, "state: Input should be 'joining', 'online' or 'draining'"),
        ({"throughput": -1.0}, "throughput: Input should be greater than or equal to 0"),
        ({"throughput": float("nan")}, "throughput: Input should be a finite number"),
        ({"throughput": float("inf")}, "throughput"),
        ({"throughput": "fast"}, "throughput: Input should be a valid number"),
        ({"free_cache_tokens": "3"}, "free_cache_tokens: Input should be a valid integer (got '3')"),
        ({"free_cache_tokens": 3.0}, "free_cache_tokens: Input should be a valid integer"),
        ({"active_sessions": True}, "active_sessions: Input should be a valid integer (got True)"),
        ({"free_memory_bytes": -5}, "free_memory_bytes"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"public_name": "x" * 65}, "public_name: String should have at most 64 characters"),
        ({"public_name": "red\x1b[31m"}, "public_name: must contain only printable characters"),
        ({"device_name": "a\u202eb"}, "device_name: must contain only printable characters"),
        ({"software_version": "1" * 1_000_000}, "(1000002 chars)"),
        ({"addrs": ["/ip4/1.2.3.4/tcp/5"] * (MAX_ADDRS + 1)}, f"at most {MAX_ADDRS} items allowed"),
        ({"addrs": ["not a multiaddr"]}, "addrs.0"),
        ({"addrs": ["/" + "a" * 300]}, "addrs.0"),
        ({"addrs": "/ip4/1.2.3.4/tcp/5"}, "addrs: Input should be a valid list"),
        ({"peer_id": "0OIl"}, "peer_id"),
        ({"peer_id": 5}, "peer_id: Input should be a valid string"),
        ({"device_kind": "CUDA!"}, "device_kind"),
        ({"dtype": "torch.float16"}, "dtype"),
        ({"updated_at": -1.0}, "updated_at"),
        ({"version": RECORD_VERSION + 1}, f"record version {RECORD_VERSION + 1} is not supported"),
    ],
)
def test_malformed_peer_records_are_rejected_with_precise_messages(overrides, expected):
    wire = dict(make_peer().to_dht(), **overrides)
    with pytest.raises(RecordError) as info:
        PeerRecord.from_dht(wire)
    message = str(info.value)
    assert message.startswith("invalid PeerRecord: ")
    assert expected in message
    assert len(message) < 1000  # a huge value never makes a huge message


def test_missing_fields_and_non_dicts_are_rejected():
    wire = make_peer().to_dht()
    del wire["peer_id"], wire["num_blocks"]
    with pytest.raises(RecordError, match="peer_id: missing; num_blocks: missing"):
        PeerRecord.from_dht(wire)
    for junk in (None, b"\x00", [1, 2], "record", 5):
        with pytest.raises(RecordError, match="expected a dict"):
            PeerRecord.from_dht(junk)
    with pytest.raises(RecordError, match="at most 256 allowed"):
        PeerRecord.from_dht({f"extra{i}": i for i in range(1000)})


def test_record_error_is_a_value_error_and_build_raises_it():
    assert issubclass(RecordError, ValueError)
    with pytest.raises(RecordError, match="invalid PeerRecord"):
        make_peer(start_block=3, end_block=1)


def test_records_are_immutable():
    record = make_peer()
    with pytest.raises(Exception):
        record.state = "draining"
    assert record.model_copy(update={"state": "draining"}).state == "draining"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"assignments": {PEER_A: [0, 9]}}, "past num_blocks=8"),
        ({"assignments": {PEER_A: [4, 4]}}, "start < end"),
        ({"assignments": {PEER_A: [0, 1, 2]}}, "assignments"),
        ({"assignments": {PEER_A: ["0", "4"]}}, "assignments"),
        ({"assignments": {"not base58!": [0, 4]}}, "assignments"),
        ({"assignments": [[PEER_A, 0, 4]]}, "assignments: Input should be a valid dictionary"),
        ({"uncovered": [[7, 12]]}, "uncovered range [7, 12) is past num_blocks=8"),
        ({"epoch": -1}, "epoch"),
        ({"coordinator_id": ""}, "coordinator_id"),
        ({"note": "x" * 513}, "note"),
    ],
)
def test_malformed_plans_are_rejected(overrides, expected):
    wire = dict(
        version=1,
        epoch=1,
        num_blocks=8,
        assignments={PEER_A: [0, 8]},
        uncovered=[],
        coordinator_id=PEER_A,
        created_at=1.0,
    )
    wire.update(overrides)
    with pytest.raises(RecordError, match="invalid PlanRecord") as info:
        PlanRecord.from_dht(wire)
    assert expected in str(info.value)


def test_lease_must_not_expire_before_it_starts():
    with pytest.raises(RecordError, match="before acquired_at"):
        CoordinatorLease.from_dht(dict(version=1, coordinator_id=PEER_A, acquired_at=10.0, expires_at=5.0))


def test_model_key_depends_on_config_but_not_on_volatile_keys():
    key = model_key("meta-llama/Llama-2-7b-hf", CONFIG)
    assert is_model_key(key) and key.startswith("meta-llama--Llama-2-7b-hf@")
    assert model_key("meta-llama/Llama-2-7b-hf", dict(CONFIG)) == key
    # volatile keys, also nested, do not matter; neither does key order
    assert model_key("meta-llama/Llama-2-7b-hf", dict(CONFIG, _name_or_path="/elsewhere")) == key
    assert model_key("meta-llama/Llama-2-7b-hf", dict(CONFIG, transformers_version="5.9", torch_dtype="float16")) == key
    assert model_key("meta-llama/Llama-2-7b-hf", dict(reversed(list(CONFIG.items())))) == key
    nested = dict(CONFIG, text_config={"hidden_size": 8})
    nested_volatile = dict(CONFIG, text_config={"hidden_size": 8, "transformers_version": "4.0"})
    assert model_key("m", nested) == model_key("m", nested_volatile)
    # a real change to the config or the name changes the key
    assert model_key("meta-llama/Llama-2-7b-hf", dict(CONFIG, num_hidden_layers=9)) != key
    assert model_key("meta-llama/Llama-2-7b-hf", dict(CONFIG, rope_theta=10000.5)) != key
    assert model_key("meta-llama/Llama-2-7b", CONFIG) != key


def test_model_key_names_are_short_and_safe():
    # a local directory contributes its last component, wherever it lives
    assert model_key("/data/models/tiny-llama/", CONFIG) == model_key("./tiny-llama", CONFIG)
    assert model_key("/data/models/tiny-llama", CONFIG).startswith("tiny-llama@")
    weird = model_key("org/na me?<script>" + "x" * 200, CONFIG)
    assert is_model_key(weird) and len(weird) <= 64 + 1 + 16
    assert model_key_name("org/name") == "org--name"
    assert public_model_name("/home/alice/models/tiny-llama/") == "tiny-llama"
    assert public_model_name("org/name") == "org/name"
    assert is_model_key(model_key("???", CONFIG))
    for bad_name in ("", "   ", None):
        with pytest.raises(RecordError, match="model_name"):
            model_key(bad_name, CONFIG)
    with pytest.raises(RecordError, match="config must be"):
        model_key("m", "config.json")
    with pytest.raises(RecordError, match="not JSON-serialisable"):
        model_key("m", {"x": object()})
    assert not is_model_key("name@abc") and not is_model_key("a b@0123456789abcdef") and not is_model_key(5)
