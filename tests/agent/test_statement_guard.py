"""Which deployment statements the agent obeys: agent/statement_guard.py.

A real StatementGuard on a tmp data_dir with an injected clock, real Ed25519 keys and real trust
roots. Each test is an attack a client on a shared broker (or a stale retained message) could
make: a forged or replayed statement, a downgrade, a replay after a restart or after the guard's
state was lost, a revoked key after a root rotation. The disk-full test fills a real tmpfs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.statement_guard import Accepted, StatementGuard
from edgesdk.errors import StorageError, TrustError
from edgesdk.protocol import BLOCK_SIZE, DeploymentStatement, SignedStatement, new_serial, sign_statement
from edgesdk.signing import generate_keys, key_id, load_private_key, load_public_key
from edgesdk.trustroot import TrustRoot, create_root, rotate_root
from tests.fixtures.disk import SmallDisk, tmpfs

NOW = 1_900_000_000.0  # 2030-03-17
FLEET, DEVICE = "plant-7", "cam-01"
STATE = Path("trust") / "state.json"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Keys:
    """Named key pairs in tmp folders."""

    def __init__(self, folder: Path) -> None:
        self.folder, self._pairs = folder, {}

    def pair(self, name: str):
        if name not in self._pairs:
            made = generate_keys(self.folder / name)
            self._pairs[name] = (load_private_key(made.private_path), load_public_key(made.public_path))
        return self._pairs[name]

    def private(self, *names: str) -> list:
        return [self.pair(n)[0] for n in names]

    def public(self, *names: str) -> list:
        return [self.pair(n)[1] for n in names]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


def make_guard(data_dir: Path, keys: Keys, clock: Clock, **kwargs: Any) -> StatementGuard:
    kwargs.setdefault("release_keys", keys.public("release"))
    kwargs.setdefault("fleet_keys", keys.public("fleet"))
    return StatementGuard(data_dir, FLEET, DEVICE, clock=clock, **kwargs)


def signed(keys: Keys, key: str = "fleet", *, issued: float = NOW - 60, **changes: Any) -> SignedStatement:
    """A statement as the device receives it: signed by ``key``, serialised and parsed again."""
    fields: dict[str, Any] = dict(
        fleet=FLEET, device=DEVICE, package_id="ab" * 32, name="detector", version="1.2.0", target="x86-64-cpu",
        size=1_000_000, block_size=BLOCK_SIZE, blocks_digest="cd" * 32, serial=new_serial(now=issued),
        issued_at=issued, expires=issued + 3600, rollout_id=None, rollback=False)
    fields.update(changes)
    wire = sign_statement(DeploymentStatement(**fields), keys.private(key)[0]).to_json()
    return SignedStatement.from_json(wire, "desired")


def running(**versions: str):
    return lambda name: versions.get(name)


# -- the happy path -------------------------------------------------------------------------------
def test_valid_statement_is_accepted_and_its_serial_recorded(tmp_path: Path, keys: Keys, clock: Clock):
    guard = make_guard(tmp_path / "data", keys, clock)
    st = signed(keys, serial=100)

    accepted = guard.accept(st, running())

    assert accepted == Accepted(st, key_id(keys.public("fleet")[0]), redelivered=False)
    assert guard.last_serial("detector") == 100
    state = json.loads((tmp_path / "data" / STATE).read_bytes())
    assert state["names"]["detector"]["serial"] == 100


@pytest.mark.parametrize("attack", ["untrusted-key", "other-device", "other-fleet", "expired", "future"])
def test_refused_statement_records_nothing(tmp_path: Path, keys: Keys, clock: Clock, attack: str):
    guard = make_guard(tmp_path / "data", keys, clock)
    st = {"untrusted-key": lambda: signed(keys, "stranger"),
          "other-device": lambda: signed(keys, device="cam-02"),
          "other-fleet": lambda: signed(keys, fleet="plant-8"),
          "expired": lambda: signed(keys, issued=NOW - 7200),
          "future": lambda: signed(keys, issued=NOW + 3600)}[attack]()

    with pytest.raises(TrustError):
        guard.accept(st, running())

    assert guard.last_serial("detector") == 0
    assert not (tmp_path / "data" / STATE).exists()
    guard.accept(signed(keys), running())  # a good statement still gets through afterwards


def test_release_key_cannot_sign_statements(tmp_path: Path, keys: Keys, clock: Clock):
    """Each key does one job: a stolen release key builds packages but cannot deploy them."""
    guard = make_guard(tmp_path / "data", keys, clock)
    with pytest.raises(TrustError):
        guard.accept(signed(keys, "release"), running())


# -- replay ---------------------------------------------------------------------------------------
def test_replayed_statement_is_refused(tmp_path: Path, keys: Keys, clock: Clock):
    guard = make_guard(tmp_path / "data", keys, clock)
    old = signed(keys, serial=50, version="1.0.0")
    guard.accept(old, running())
    guard.accept(signed(keys, serial=100, version="1.1.0"), running())

    with pytest.raises(TrustError, match="replayed statement: serial 50 for detector is not above the last accepted 100"):
        guard.accept(old, running())  # an older, validly signed statement (captured earlier)
    with pytest.raises(TrustError, match="replayed"):
        guard.accept(signed(keys, serial=100, version="1.2.0"), running())  # equal serial, other bytes
    assert guard.last_serial("detector") == 100


def test_redelivered_retained_statement_is_not_a_replay(tmp_path: Path, keys: Keys, clock: Clock):
    guard = make_guard(tmp_path / "data", keys, clock)
    st = signed(keys, serial=100)
    assert guard.accept(st, running()).redelivered is False

    again = SignedStatement.from_json(st.to_json())  # the broker's retained copy, at reconnect
    accepted = guard.accept(again, running(detector="1.2.0"))

    assert accepted.redelivered is True
    assert guard.last_serial("detector") == 100
    # and after a restart the same bytes are still recognised
    restarted = make_guard(tmp_path / "data", keys, clock)
    assert restarted.accept(again, running(detector="1.2.0")).redelivered is True


def test_redelivered_statement_that_has_since_expired_is_refused(tmp_path: Path, keys: Keys, clock: Clock):
    guard = make_guard(tmp_path / "data", keys, clock)
    st = signed(keys)
    guard.accept(st, running())
    clock.now = st.statement.expires + 1  # the fleet service stopped renewing it: a frozen fleet
    with pytest.raises(TrustError, match="expired"):
        guard.accept(st, running())


def test_serial_survives_restart(tmp_path: Path, keys: Keys, clock: Clock):
    first = make_guard(tmp_path / "data", keys, clock)
    first.accept(signed(keys, serial=200), running())

    restarted = make_guard(tmp_path / "data", keys, clock)

    assert restarted.last_serial("detector") == 200
    with pytest.raises(TrustError, match="replayed"):
        restarted.accept(signed(keys, serial=150), running())
    assert restarted.accept(signed(keys, serial=250), running()).redelivered is False


CORRUPT_STATES = {
    "empty": b"",
    "truncated": b'{"serial": 12',
    "not-utf8": b"\xff\xfe\x00garbage",
    "array": b"[]",
    "serial-missing": b'{"statement_sha256": ""}',
    "digest-missing": b'{"serial": 5}',
    "serial-text": b'{"serial": "many", "statement_sha256": ""}',
    "serial-null": b'{"serial": null, "statement_sha256": ""}',
    "serial-infinity": b'{"serial": Infinity, "statement_sha256": ""}',  # int(inf): OverflowError
    "serial-1e400": b'{"serial": 1e400, "statement_sha256": ""}',
    "deep-nesting": b"[" * 100_000,  # RecursionError in json.loads
}


@pytest.mark.parametrize("case", list(CORRUPT_STATES))
def test_corrupt_guard_state_refuses_old_statements(tmp_path: Path, keys: Keys, clock: Clock, case: str):
    first = make_guard(tmp_path / "data", keys, clock)
    captured = signed(keys, issued=NOW - 600)  # issued (and captured) 10 minutes ago
    first.accept(captured, running())
    (tmp_path / "data" / STATE).write_bytes(CORRUPT_STATES[case])

    clock.now = NOW + 1
    restarted = make_guard(tmp_path / "data", keys, clock)

    # Lost state must not reopen the door to replays: only statements issued from now on count.
    assert restarted.last_serial("detector") >= int(clock.now * 1_000_000)
    with pytest.raises(TrustError, match="replayed"):
        restarted.accept(captured, running())
    with pytest.raises(TrustError, match="replayed"):
        restarted.accept(signed(keys, issued=NOW - 1), running())
    assert restarted.accept(signed(keys, issued=clock.now + 1), running()).redelivered is False


# -- downgrade ------------------------------------------------------------------------------------
def test_downgrade_is_refused_unless_rollback(tmp_path: Path, keys: Keys, clock: Clock):
    guard = make_guard(tmp_path / "data", keys, clock)
    device_runs = running(detector="1.10.0")

    with pytest.raises(TrustError, match="downgrade refused: detector@1.9.0 is below the running detector@1.10.0"):
        guard.accept(signed(keys, serial=100, version="1.9.0"), device_runs)
    assert guard.last_serial("detector") == 0  # a refused downgrade does not burn the serial

    rollback = guard.accept(signed(keys, serial=101, version="1.9.0", rollback=True), device_runs)
    assert rollback.redelivered is False and rollback.signed.statement.rollback
    # same version (a re-issue), a higher one and another model's name are not downgrades
    guard.accept(signed(keys, serial=102, version="1.10"), device_runs)
    guard.accept(signed(keys, serial=103, version="1.10.1"), device_runs)
    guard.accept(signed(keys, serial=104, name="counter", version="0.1"), device_runs)
    with pytest.raises(TrustError, match="downgrade"):
        guard.accept(signed(keys, serial=105, version="1.10.0-rc1"), device_runs)


# -- disk full ------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with tmpfs(tmp_path / "disk", 64 * 1024) as disk:
        yield disk


def test_full_disk_when_recording_serial_is_storage_error(small_disk: SmallDisk, keys: Keys, clock: Clock):
    guard = make_guard(small_disk.path / "data", keys, clock)
    st = signed(keys, serial=100)
    small_disk.fill()

    with pytest.raises(StorageError, match="record statement serial") as info:
        guard.accept(st, running())

    assert info.value.disk_full
    assert guard.last_serial("detector") == 0  # not obeyed, so not recorded: it is no replay once space is back
    assert sorted(p.name for p in (small_disk.path / "data" / "trust").iterdir()) == []  # no temp file left
    small_disk.free()
    assert guard.accept(st, running()).redelivered is False
    assert make_guard(small_disk.path / "data", keys, clock).last_serial("detector") == 100


# -- the trust root -------------------------------------------------------------------------------
def root_v1(keys: Keys, **kwargs: Any) -> bytes:
    return create_root(keys.private("root1", "root2", "root3"), keys.public("release"), keys.public("fleet"),
                       threshold=2, **kwargs)


def test_guard_with_a_trust_root_uses_its_keys_not_the_configured_ones(tmp_path: Path, keys: Keys, clock: Clock):
    clock.now = time.time()
    guard = make_guard(tmp_path / "data", keys, clock, release_keys=keys.public("old-release"),
                       fleet_keys=keys.public("old-fleet"), trust_root=root_v1(keys))
    assert [key_id(k) for k in guard.release_keys] == [key_id(k) for k in keys.public("release")]
    with pytest.raises(TrustError):
        guard.accept(signed(keys, "old-fleet", issued=clock.now), running())
    guard.accept(signed(keys, "fleet", issued=clock.now), running())


def test_rotated_release_key_is_accepted_after_new_root_arrives(tmp_path: Path, keys: Keys, clock: Clock):
    clock.now = time.time()
    raw_v1 = root_v1(keys)
    guard = make_guard(tmp_path / "data", keys, clock, trust_root=raw_v1)
    raw_v2 = rotate_root(TrustRoot.from_bytes(raw_v1), keys.private("root1", "root2"),
                         release_keys=keys.public("release2"))

    assert guard.update_root([raw_v2]) is True

    assert guard.root.version == 2
    assert [key_id(k) for k in guard.release_keys] == [key_id(k) for k in keys.public("release2")]
    # the root survives a restart (data_dir/trust/root.json), even when provisioned with v1
    restarted = make_guard(tmp_path / "data", keys, clock, trust_root=raw_v1)
    assert restarted.root.version == 2
    assert [key_id(k) for k in restarted.release_keys] == [key_id(k) for k in keys.public("release2")]
    assert guard.update_root([raw_v2]) is False  # the retained chain again: nothing to do


def test_revoked_fleet_key_is_refused(tmp_path: Path, keys: Keys, clock: Clock):
    clock.now = time.time()
    raw_v1 = root_v1(keys)
    guard = make_guard(tmp_path / "data", keys, clock, trust_root=raw_v1)
    captured = signed(keys, "fleet", issued=clock.now - 10)
    stolen_key_statement = signed(keys, "fleet", issued=clock.now)
    guard.accept(captured, running())

    raw_v2 = rotate_root(TrustRoot.from_bytes(raw_v1), keys.private("root2", "root3"),
                         fleet_keys=keys.public("fleet2"))
    guard.update_root([raw_v2])

    with pytest.raises(TrustError, match="does not match any trusted key"):
        guard.accept(stolen_key_statement, running())  # a newer serial, but from the revoked key
    with pytest.raises(TrustError):
        guard.accept(captured, running())  # even the last accepted one, redelivered
    assert guard.accept(signed(keys, "fleet2", issued=clock.now + 1), running()).fleet_key == \
        key_id(keys.public("fleet2")[0])


def test_root_update_not_signed_by_the_threshold_leaves_keys_unchanged(tmp_path: Path, keys: Keys, clock: Clock):
    clock.now = time.time()
    guard = make_guard(tmp_path / "data", keys, clock, trust_root=root_v1(keys))
    forged = create_root(keys.private("root1"), keys.public("attacker"), keys.public("attacker"), version=2)

    with pytest.raises(TrustError, match="threshold"):
        guard.update_root([forged])

    assert guard.root.version == 1
    assert [key_id(k) for k in guard.fleet_keys] == [key_id(k) for k in keys.public("fleet")]
    assert not (tmp_path / "data" / "trust" / "root.json").exists()


def test_root_version_rollback_is_ignored_by_the_guard(tmp_path: Path, keys: Keys, clock: Clock):
    clock.now = time.time()
    raw_v1 = root_v1(keys)
    guard = make_guard(tmp_path / "data", keys, clock, trust_root=raw_v1)
    raw_v2 = rotate_root(TrustRoot.from_bytes(raw_v1), keys.private("root1", "root2"),
                         fleet_keys=keys.public("fleet2"))
    raw_v3 = rotate_root(TrustRoot.from_bytes(raw_v2), keys.private("root1", "root2"),
                         fleet_keys=keys.public("fleet3"))
    assert guard.update_root([raw_v2, raw_v3]) is True

    assert guard.update_root([raw_v2]) is False  # an older chain replayed on the retained topic
    assert guard.update_root([raw_v1]) is False
    assert guard.root.version == 3
    assert [key_id(k) for k in guard.fleet_keys] == [key_id(k) for k in keys.public("fleet3")]


def test_expired_root_stops_the_device_obeying_statements(tmp_path: Path, keys: Keys, clock: Clock):
    clock.now = time.time()
    raw_v1 = root_v1(keys, expires_days=1)
    guard = make_guard(tmp_path / "data", keys, clock, trust_root=raw_v1)
    guard.accept(signed(keys, issued=clock.now), running())

    clock.now += 2 * 86400  # the fleet published no new root: it is frozen or its keys were lost
    with pytest.raises(TrustError, match="trust root version 1 expired"):
        guard.accept(signed(keys, issued=clock.now), running())
    with pytest.raises(TrustError, match="expired"):
        guard.update_root([])  # nothing newer: still expired

    raw_v2 = rotate_root(TrustRoot.from_bytes(raw_v1), keys.private("root1", "root2"))  # a fresh root revives it
    assert guard.update_root([raw_v2]) is True
    guard.accept(signed(keys, issued=clock.now + 1), running())


def test_root_update_on_a_guard_with_fixed_keys_is_refused(tmp_path: Path, keys: Keys, clock: Clock):
    guard = make_guard(tmp_path / "data", keys, clock)
    with pytest.raises(TrustError, match="fixed keys"):
        guard.update_root([root_v1(keys)])


def test_corrupt_stored_root_falls_back_to_the_provisioned_one(tmp_path: Path, keys: Keys, clock: Clock):
    clock.now = time.time()
    raw_v1 = root_v1(keys)
    (tmp_path / "data" / "trust").mkdir(parents=True)
    (tmp_path / "data" / "trust" / "root.json").write_bytes(b'{"signed": garbage')
    guard = make_guard(tmp_path / "data", keys, clock, trust_root=raw_v1)
    assert guard.root.version == 1


# -- several models: serials per name --------------------------------------------------------------
def test_serials_are_per_model_name(tmp_path: Path, keys: Keys, clock: Clock):
    """Deploying the recogniser (serial 300) must not make the detector's current statement
    (serial 200, still retained and redelivered) look like a replay; a replay within one name is
    still refused."""
    guard = make_guard(tmp_path / "data", keys, clock)
    detector = signed(keys, serial=200)
    guard.accept(detector, running())
    guard.accept(signed(keys, serial=300, name="recogniser"), running())

    assert guard.accept(detector, running(detector="1.2.0")).redelivered
    assert guard.accept(signed(keys, serial=250), running(detector="1.2.0")).redelivered is False
    with pytest.raises(TrustError, match="serial 260 for recogniser is not above the last accepted 300"):
        guard.accept(signed(keys, serial=260, name="recogniser"), running())
    assert guard.serials() == {"detector": 250, "recogniser": 300}
    restarted = make_guard(tmp_path / "data", keys, clock)
    assert restarted.serials() == {"detector": 250, "recogniser": 300}


def test_single_model_guard_state_bounds_every_name(tmp_path: Path, keys: Keys, clock: Clock):
    """The state file of an agent from before per-name serials: its serial is a floor for all names."""
    (tmp_path / "data" / "trust").mkdir(parents=True)
    (tmp_path / "data" / STATE).write_text(json.dumps({"serial": 500, "statement_sha256": "00" * 32}))
    guard = make_guard(tmp_path / "data", keys, clock)

    with pytest.raises(TrustError, match="replayed statement"):
        guard.accept(signed(keys, serial=400, name="recogniser"), running())
    guard.accept(signed(keys, serial=600, name="recogniser"), running())


def test_undeploy_statement_is_never_a_downgrade(tmp_path: Path, keys: Keys, clock: Clock):
    from edgesdk.protocol import undeploy_statement

    guard = make_guard(tmp_path / "data", keys, clock)
    statement = undeploy_statement(FLEET, DEVICE, "detector", 700, NOW - 60)
    wire = SignedStatement.from_json(sign_statement(statement, keys.private("fleet")[0]).to_json(), "desired")

    assert guard.accept(wire, running(detector="9.0")).signed.statement.undeploy
