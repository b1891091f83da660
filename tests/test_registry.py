"""swarm.registry against real hivemind DHT processes on 127.0.0.1 (three nodes, no mocks)."""

import functools
import os
import time
import uuid

import base58
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.records import PeerRecord, PlanRecord, model_key
from swarm.registry import (
    MODELS_KEY,
    RegistryError,
    announce_peer,
    control_key,
    get_lease,
    get_peers,
    get_plan,
    list_models,
    local_peer_id,
    make_dht,
    peers_key,
    publish_plan,
    read_control,
    release_lease,
    renew_lease,
    try_acquire_lease,
    withdraw_peer,
)

WAIT_S = 15.0  # upper bound for anything that polls


def wait_for(predicate, timeout=WAIT_S, interval=0.05):
    """Poll until predicate() is truthy; return its value, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


class Node:
    def __init__(self, dht, key):
        self.dht, self.key = dht, key
        self.marker = RSASignatureValidator(key).local_public_key.decode()  # "[owner:ssh-rsa ...]"
        self.peer_id = str(dht.peer_id)

    def maddrs(self):
        return [str(maddr) for maddr in self.dht.get_visible_maddrs()]


@pytest.fixture(scope="module")
def nodes():
    """Three DHT nodes: b bootstraps from a, c from b."""
    started = []
    try:
        for _ in range(3):
            key = RSAPrivateKey()
            initial_peers = started[-1].maddrs() if started else ()
            started.append(Node(make_dht(initial_peers, private_key=key), key))
        yield started
    finally:
        for node in reversed(started):
            node.dht.shutdown()


@pytest.fixture
def mkey():
    """A fresh model key per test, so tests do not see each other's records."""
    return model_key(f"test-org/model-{uuid.uuid4().hex[:8]}", {"num_hidden_layers": 8})


def peer_record(node, **overrides) -> PeerRecord:
    fields = dict(
        peer_id=node.peer_id,
        state="online",
        start_block=0,
        end_block=4,
        num_blocks=8,
        device_kind="cpu",
        device_name="test cpu",
        dtype="float32",
        free_memory_bytes=2**30,
        total_memory_bytes=2**31,
        capacity_blocks=4,
        throughput=100.0,
        prefill_throughput=1000.0,
        free_cache_tokens=4096,
        software_version="0.1.0",
        public_name=f"node {node.peer_id[-4:]}",
        addrs=node.maddrs(),
    )
    fields.update(overrides)
    return PeerRecord.build(**fields)


def test_identity_is_the_signing_key(nodes):
    for node in nodes:
        assert local_peer_id(node.dht) == node.peer_id


def test_identity_path_gives_a_stable_peer_id(tmp_path):
    path = tmp_path / "identity.key"
    peer_ids = []
    for _ in range(2):
        dht = make_dht(identity_path=path)
        try:
            assert local_peer_id(dht) == str(dht.peer_id)
            peer_ids.append(str(dht.peer_id))
        finally:
            dht.shutdown()
    assert peer_ids[0] == peer_ids[1]
    assert os.stat(path).st_mode & 0o077 == 0  # the key is private


def test_announce_on_one_node_is_seen_from_another(nodes, mkey):
    a, b, c = nodes
    assert announce_peer(a.dht, mkey, peer_record(a))
    assert announce_peer(b.dht, mkey, peer_record(b, start_block=4, end_block=8))
    peers = wait_for(lambda: (found := get_peers(c.dht, mkey)) and len(found) == 2 and found)
    assert set(peers) == {a.peer_id, b.peer_id}
    assert peers[a.peer_id].blocks == (0, 4) and peers[b.peer_id].blocks == (4, 8)
    assert peers[a.peer_id].public_name == f"node {a.peer_id[-4:]}"
    assert abs(peers[a.peer_id].updated_at - get_dht_time()) < 30  # stamped by announce_peer
    assert get_peers(c.dht, model_key("other/model", {})) == {}


def test_a_peer_cannot_overwrite_another_peers_record(nodes, mkey):
    a, b, c = nodes
    original = peer_record(a)
    assert announce_peer(a.dht, mkey, original)
    wait_for(lambda: a.peer_id in get_peers(c.dht, mkey))
    forged = peer_record(a, state="draining", start_block=6, end_block=8).to_dht()
    # b writes under a's subkey: b cannot sign for a's key, so every node refuses it
    assert not b.dht.store(peers_key(mkey), forged, get_dht_time() + 30, subkey=a.marker)
    # b writes a record claiming a's peer id under its own subkey: stored, but readers drop it
    assert b.dht.store(peers_key(mkey), forged, get_dht_time() + 30, subkey=b.marker)
    # and the registry refuses to announce a record that names another peer
    with pytest.raises(RegistryError, match="signs as"):
        announce_peer(b.dht, mkey, peer_record(a))
    for reader in (a, b, c):
        peers = get_peers(reader.dht, mkey)
        assert set(peers) == {a.peer_id}
        assert peers[a.peer_id].state == "online" and peers[a.peer_id].blocks == (0, 4)


def test_malformed_records_are_skipped_and_valid_ones_returned(nodes, mkey):
    a, b, c = nodes
    assert announce_peer(a.dht, mkey, peer_record(a))
    expiration = get_dht_time() + 30
    # validly signed by their own writers, but break the schema
    bad_range = dict(peer_record(b).to_dht(), start_block=5, end_block=5)
    assert b.dht.store(peers_key(mkey), bad_range, expiration, subkey=b.marker)
    bad_types = dict(peer_record(c).to_dht(), throughput="fast", free_cache_tokens=-1)
    assert c.dht.store(peers_key(mkey), bad_types, expiration, subkey=c.marker)
    # refused by the DHT nodes themselves: too big, unsigned, a plain value, an absurd expiration
    huge = dict(peer_record(b).to_dht(), public_name="x" * 20_000)
    assert not b.dht.store(peers_key(mkey), huge, expiration + 1, subkey=b.marker)
    assert not b.dht.store(peers_key(mkey), {"junk": 1}, expiration, subkey="no-owner-marker")
    assert not b.dht.store(peers_key(mkey), {"junk": 1}, get_dht_time() + 10 * 24 * 3600, subkey=b.marker)
    assert not b.dht.store(peers_key(mkey), {"junk": 1}, expiration)
    for reader in (a, b, c):
        peers = get_peers(reader.dht, mkey)
        assert set(peers) == {a.peer_id}


def test_records_expire_unless_refreshed(nodes, mkey):
    a, b, c = nodes
    assert announce_peer(a.dht, mkey, peer_record(a), expiration_s=1.5)
    assert announce_peer(b.dht, mkey, peer_record(b), expiration_s=60)
    wait_for(lambda: len(get_peers(c.dht, mkey)) == 2)
    started = time.monotonic()
    wait_for(lambda: set(get_peers(c.dht, mkey)) == {b.peer_id})
    assert time.monotonic() - started < 10


def test_withdraw_marks_the_peer_draining(nodes, mkey):
    a, _, c = nodes
    record = peer_record(a)
    assert announce_peer(a.dht, mkey, record)
    assert withdraw_peer(a.dht, mkey, record)
    peer = wait_for(lambda: get_peers(c.dht, mkey).get(a.peer_id))
    assert peer.state == "draining" and peer.blocks == (0, 4)


def test_lease_is_held_by_one_coordinator_and_taken_over_after_expiry(nodes, mkey):
    a, b, c = nodes
    assert get_lease(c.dht, mkey) is None
    assert try_acquire_lease(a.dht, mkey, a.peer_id, ttl_s=2.0)
    assert not try_acquire_lease(b.dht, mkey, b.peer_id, ttl_s=2.0)
    assert not renew_lease(b.dht, mkey, b.peer_id, ttl_s=2.0)
    lease = get_lease(c.dht, mkey)
    assert lease.coordinator_id == a.peer_id
    assert renew_lease(a.dht, mkey, a.peer_id, ttl_s=2.0)
    assert get_lease(c.dht, mkey).acquired_at == lease.acquired_at  # renewal keeps the tenure
    with pytest.raises(RegistryError):
        try_acquire_lease(b.dht, mkey, a.peer_id)  # b cannot claim in a's name
    # a stops renewing: b takes over once a's claim expires, and a learns it lost the lease
    started = time.monotonic()
    wait_for(lambda: try_acquire_lease(b.dht, mkey, b.peer_id, ttl_s=5.0), interval=0.2)
    assert time.monotonic() - started < 10
    assert get_lease(c.dht, mkey).coordinator_id == b.peer_id
    assert not renew_lease(a.dht, mkey, a.peer_id, ttl_s=2.0)
    assert not try_acquire_lease(a.dht, mkey, a.peer_id, ttl_s=2.0)
    # a trust list excludes untrusted coordinators from the lease
    assert get_lease(c.dht, mkey, trusted={a.peer_id}) is None


def test_released_lease_can_be_taken_at_once(nodes, mkey):
    a, b, c = nodes
    assert try_acquire_lease(a.dht, mkey, a.peer_id, ttl_s=60.0)
    assert not try_acquire_lease(b.dht, mkey, b.peer_id, ttl_s=60.0)
    assert release_lease(a.dht, mkey, a.peer_id)
    assert wait_for(lambda: get_lease(c.dht, mkey) is None)
    assert try_acquire_lease(b.dht, mkey, b.peer_id, ttl_s=60.0)
    assert not release_lease(c.dht, mkey, c.peer_id)  # c holds no claim


def make_plan(node, epoch, assignments, num_blocks=8) -> PlanRecord:
    return PlanRecord.build(
        epoch=epoch,
        num_blocks=num_blocks,
        assignments=assignments,
        coordinator_id=node.peer_id,
        created_at=get_dht_time(),
    )


def test_only_the_lease_holders_plan_is_accepted(nodes, mkey):
    a, b, c = nodes
    assert get_plan(c.dht, mkey) is None
    assert try_acquire_lease(a.dht, mkey, a.peer_id, ttl_s=60.0)
    leader_plan = make_plan(a, 1, {a.peer_id: (0, 4), b.peer_id: (4, 8)})
    assert publish_plan(a.dht, mkey, leader_plan)
    # b is not the leader: its plan is stored, with a higher epoch, and ignored
    assert publish_plan(b.dht, mkey, make_plan(b, 5, {b.peer_id: (0, 8)}))
    # c signs a plan that names a as its coordinator: ignored as well
    forged = make_plan(a, 9, {c.peer_id: (0, 8)}).to_dht()
    assert c.dht.store(control_key(mkey), forged, get_dht_time() + 60, subkey=f"plan:{mkey}{c.marker}")
    with pytest.raises(RegistryError):
        publish_plan(c.dht, mkey, make_plan(a, 9, {c.peer_id: (0, 8)}))
    for reader in (a, b, c):
        assert get_plan(reader.dht, mkey) == leader_plan
    state = read_control(c.dht, mkey)
    assert state.lease.coordinator_id == a.peer_id
    assert set(state.plans) == {a.peer_id, b.peer_id} and state.max_epoch == 5
    # with a trust list that leaves a out, nobody holds the lease and no plan is accepted
    assert get_plan(c.dht, mkey, trusted={b.peer_id}) is None


def test_plans_for_a_thousand_peers_round_trip(nodes, mkey):
    # ~60 KB: over hivemind's 16 KiB two-part pipe write, and over the 8 KiB limit of other records
    a, b, c = nodes
    assert try_acquire_lease(a.dht, mkey, a.peer_id, ttl_s=60.0)
    peer_ids = [base58.b58encode(bytes([18, 32]) + os.urandom(32)).decode() for _ in range(1000)]
    plan = make_plan(a, 3, {peer_id: (i % 80, i % 80 + 1) for i, peer_id in enumerate(peer_ids)}, num_blocks=80)
    for _ in range(3):
        assert publish_plan(a.dht, mkey, plan)
    assert get_plan(c.dht, mkey) == plan
    # the larger limit holds only under the plan's own model's control key
    other = model_key("other/model", {"n": 2})
    assert not a.dht.store(peers_key(mkey), plan.to_dht(), get_dht_time() + 60, subkey=f"plan:{mkey}{a.marker}")
    assert not a.dht.store(control_key(other), plan.to_dht(), get_dht_time() + 60, subkey=f"plan:{mkey}{a.marker}")


def test_list_models(nodes, mkey):
    a, b, c = nodes
    name = "test-org/" + mkey.split("--", 1)[1].split("@")[0]
    assert announce_peer(a.dht, mkey, peer_record(a), model_name=name)
    with pytest.raises(ValueError, match="does not give the name part"):
        announce_peer(a.dht, mkey, peer_record(a), model_name="another/name")
    # an unsigned entry whose name does not match its key is skipped by readers
    other_key = model_key("someone/else", {"x": 1})
    bogus = {"version": 1, "model_name": "not/the-same", "num_blocks": 8, "updated_at": get_dht_time()}
    assert b.dht.store(MODELS_KEY, bogus, get_dht_time() + 30, subkey=other_key)
    assert not b.dht.store(MODELS_KEY, bogus, get_dht_time() + 30, subkey="not a model key")
    models = wait_for(lambda: (found := list_models(c.dht)) and mkey in found and found)
    assert models[mkey].model_name == name and models[mkey].num_blocks == 8
    assert other_key not in models
    # a local directory is published as its last component, never as a path
    local_key = model_key("/home/alice/models/tiny-llama", {"n": 3})
    assert announce_peer(a.dht, local_key, peer_record(a), model_name="/home/alice/models/tiny-llama")
    assert wait_for(lambda: list_models(c.dht).get(local_key)).model_name == "tiny-llama"


async def _inject_signed_records(_dht, node, key, entries):
    """Test helper run inside the DHT process: put pre-signed subkeys into this node's storage."""
    from hivemind.dht.routing import DHTID

    key_id = DHTID.generate(source=key)
    return sum(node.protocol.storage.store_subkey(key_id, *entry) for entry in entries)


@pytest.mark.skipif(not os.environ.get("SWARM_BENCH_1000"), reason="set SWARM_BENCH_1000=1 (about a minute)")
def test_cost_of_reading_1000_peers(nodes, mkey):
    """Measures one get_peers over 1,000 peer records, each signed by its own RSA key (numbers in
    docs/records.md)."""
    from hivemind.dht.protocol import DHTProtocol
    from hivemind.dht.routing import DHTID
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer

    from swarm.registry import peer_id_from_public_key

    a, b, c = nodes
    count = 1000
    expiration = get_dht_time() + 600
    key_bytes = DHTID.generate(source=peers_key(mkey)).to_bytes()
    entries = []
    for i in range(count):
        key = RSAPrivateKey()
        validator = RSASignatureValidator(key)
        subkey = validator.local_public_key.decode()
        record = peer_record(
            a,
            peer_id=peer_id_from_public_key(key.get_public_key()),
            start_block=i % 8,
            end_block=i % 8 + 1,
            public_name=f"peer number {i}",
            addrs=[f"/ip4/10.{i // 256}.{i % 256}.7/tcp/31337", f"/ip4/10.{i // 256}.{i % 256}.7/udp/31337/quic-v1"],
            updated_at=get_dht_time(),
        )
        value = MSGPackSerializer.dumps(record.to_dht())
        signed = validator.sign_value(DHTRecord(key_bytes, MSGPackSerializer.dumps(subkey), value, expiration))
        entries.append((subkey, signed, expiration))
    assert a.dht.run_coroutine(functools.partial(_inject_signed_records, key=peers_key(mkey), entries=entries)) == count
    dictionary = DictionaryDHTValue()
    for entry in entries:
        dictionary.store(*entry)
    wire_bytes = len(DHTProtocol.serializer.dumps(dictionary))
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        peers = get_peers(c.dht, mkey)
        timings.append(time.perf_counter() - started)
        assert len(peers) == count
    started = time.perf_counter()
    raw = c.dht.get(peers_key(mkey), latest=True)
    raw_s = time.perf_counter() - started
    assert len(raw.value) == count
    print(
        f"\n1000 peers: one get carries {wire_bytes / 2**20:.2f} MiB ({wire_bytes / count:.0f} B/peer); "
        f"get_peers {min(timings) * 1e3:.0f}-{max(timings) * 1e3:.0f} ms; raw dht.get {raw_s * 1e3:.0f} ms"
    )
