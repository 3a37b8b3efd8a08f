"""Records: signing, the size cap, the schema and every rejection reason, without a network."""

from __future__ import annotations

import time
from functools import cache

import msgpack
import pytest

from qwenlab.swarm.records import SCHEMA_VERSION, RecordLimits, RecordRejected, decode_record, encode_record, \
    tokenizer_digest
from qwenlab.tasks import get_task
from qwenlab.swarm.signing import PeerIdentity
from qwenlab.train.grpo.rollouts import draw_instances

SWARM = "test"


@cache
def nano_tokenizer_digest() -> str:
    from qwenlab.model.tokenizer import load_tokenizer
    from qwenlab.nano import nano_path

    return tokenizer_digest(load_tokenizer(nano_path()))


def make_record(identity: PeerIdentity, *, slot=0, completions=None, rewards=None, created=None, swarm=SWARM,
                instance=None, task_identity=None, tokenizer=None):
    instance = instance or draw_instances(["arithmetic"], 1, "records")[0]
    completions = completions or [instance.expected, "no idea"]
    value = encode_record(identity, swarm=swarm, round_index=3, slot=slot, task=instance.task,
                          task_identity=task_identity or get_task(instance.task).digest,
                          tokenizer=tokenizer or nano_tokenizer_digest(), seed=instance.seed,
                          difficulty=instance.difficulty, prompt=instance.prompt, completions=completions,
                          finish_reasons=["stop"] * len(completions),
                          rewards=rewards if rewards is not None else [1.0] + [0.0] * (len(completions) - 1),
                          created=created)
    return f"{identity.peer_id}:{slot}", value


def rejection(subkey, value, **kwargs) -> str:
    with pytest.raises(RecordRejected) as caught:
        decode_record(value, subkey, swarm=kwargs.pop("swarm", SWARM), **kwargs)
    return caught.value.reason


def test_round_trip_keeps_every_field():
    identity = PeerIdentity.generate()
    subkey, value = make_record(identity)
    record = decode_record(value, subkey, swarm=SWARM)
    assert record.peer_id == identity.peer_id and record.public_key == identity.public_key
    assert record.task == "arithmetic" and record.round == 3 and record.slot == 0
    assert record.completions[1] == "no idea" and record.rewards == [1.0, 0.0]


def _reencode(value: bytes, change_body=None, change_envelope=None) -> bytes:
    envelope = msgpack.unpackb(value, raw=False)
    body = msgpack.unpackb(envelope["body"], raw=False)
    if change_body:
        change_body(body)
        envelope["body"] = msgpack.packb(body, use_bin_type=True)
    if change_envelope:
        change_envelope(envelope)
    return msgpack.packb(envelope, use_bin_type=True)


def test_tampered_completion_fails_the_signature():
    subkey, value = make_record(PeerIdentity.generate())
    tampered = _reencode(value, change_body=lambda b: b["completions"].__setitem__(1, "The answer is 7"))
    assert rejection(subkey, tampered) == "signature"


def test_tampered_claimed_reward_fails_the_signature():
    subkey, value = make_record(PeerIdentity.generate())
    assert rejection(subkey, _reencode(value, change_body=lambda b: b.__setitem__("rewards", [1.0, 1.0]))) \
        == "signature"


def test_record_claiming_another_peers_key_is_forged():
    """Signed by the attacker, but carrying the victim's public key and id: the signature cannot verify."""
    attacker, victim = PeerIdentity.generate(), PeerIdentity.generate()
    subkey, value = make_record(attacker)

    def impersonate(body):
        body["public_key"], body["peer_id"] = victim.public_key, victim.peer_id

    forged = _reencode(value, change_body=impersonate)
    assert rejection(f"{victim.peer_id}:0", forged) == "signature"


def test_peer_id_that_is_not_the_hash_of_the_key_is_rejected():
    attacker, victim = PeerIdentity.generate(), PeerIdentity.generate()
    _, value = make_record(attacker)
    claims_victim = _reencode(value, change_body=lambda b: b.__setitem__("peer_id", victim.peer_id))
    assert rejection(f"{victim.peer_id}:0", claims_victim) == "peer_id"


def test_record_stored_under_another_peers_subkey_is_rejected():
    attacker, victim = PeerIdentity.generate(), PeerIdentity.generate()
    _, value = make_record(attacker)
    assert rejection(f"{victim.peer_id}:0", value) == "peer_id"
    assert rejection(f"{attacker.peer_id}:5", value) == "peer_id"  # slot differs from the signed one


def test_oversized_record_is_rejected_before_parsing():
    identity = PeerIdentity.generate()
    subkey, value = make_record(identity, completions=["x" * 8000] * 12)
    assert len(value) > RecordLimits().max_record_bytes
    assert rejection(subkey, value) == "oversized"
    assert rejection(subkey, b"\xff" * 70_000) == "oversized"  # garbage is never parsed


def test_schema_version_and_malformed_payloads():
    subkey, value = make_record(PeerIdentity.generate())
    assert rejection(subkey, _reencode(value, change_envelope=lambda e: e.__setitem__("schema", SCHEMA_VERSION + 1))) == "schema"
    assert rejection(subkey, b"not msgpack \xc1") == "malformed"
    assert rejection(subkey, {"a": 1}) == "malformed"  # not bytes at all
    assert rejection(subkey, msgpack.packb([1, 2, 3])) == "malformed"
    # a small payload declaring a huge array is refused by the bounded unpacker
    assert rejection(subkey, b"\xdd\xff\xff\xff\xff") == "malformed"


@pytest.mark.parametrize("completions,rewards", [
    (["only one"], [1.0]),                    # a group of one has no advantage
    (["a", "b"], [1.0, float("nan")]),        # rewards must be finite
])
def test_invalid_fields(completions, rewards):
    identity = PeerIdentity.generate()
    subkey, value = make_record(identity, completions=completions, rewards=rewards)
    assert rejection(subkey, value) == "invalid"


def test_bad_finish_reason_and_wrong_types_are_invalid():
    identity = PeerIdentity.generate()
    subkey, value = make_record(identity)
    for change in (lambda b: b.__setitem__("finish_reasons", ["stop", "maybe"]),
                   lambda b: b.__setitem__("seed", "12"),
                   lambda b: b.__setitem__("extra", 1)):
        body = msgpack.unpackb(msgpack.unpackb(value, raw=False)["body"], raw=False)
        change(body)
        raw = msgpack.packb(body, use_bin_type=True)
        resigned = msgpack.packb({"schema": SCHEMA_VERSION, "body": raw, "signature": identity.sign(raw)}, use_bin_type=True)
        assert rejection(subkey, resigned) == "invalid"


def test_stale_future_and_foreign_swarm_records():
    identity = PeerIdentity.generate()
    subkey, old = make_record(identity, created=time.time() - 3600)
    assert rejection(subkey, old) == "stale"
    subkey, future = make_record(identity, created=time.time() + 3600)
    assert rejection(subkey, future) == "stale"
    subkey, other = make_record(identity, swarm="another")
    assert rejection(subkey, other) == "wrong_swarm"


def test_identity_file_keeps_the_peer_id(tmp_path):
    first = PeerIdentity.load_or_create(tmp_path / "key.pem")
    again = PeerIdentity.load_or_create(tmp_path / "key.pem")
    assert first.peer_id == again.peer_id
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600
