"""Rollout records: the schema peers publish, how they are signed, and every check on the way in.

A record is one task instance and a group of completions, as the sender decoded them:

    task, seed, difficulty, prompt     the instance; the receiver rebuilds it from (task, seed, difficulty)
    task_identity                      the digest of the task source's identity (name, config, data hashes):
                                       a receiver with no source of that identity refuses the record
    tokenizer                          the digest of the sender's vocabulary (its tokenizer family)
    completions, finish_reasons        the sender's text ("stop" or "length" per completion)
    rewards                            the sender's scores, kept for the audit log only, never used
    swarm, peer_id, public_key, round, slot, created    who sent it, where, when

On the wire (a DHT value, stored under key "<swarm>/rollouts/<round>", subkey "<peer_id>:<slot>"):

    msgpack {"schema": 1, "body": <msgpack of the fields above>, "signature": <Ed25519 over body>}

The signature covers the exact body bytes, so nothing is re-encoded before verifying. decode_record
checks, cheapest first: size cap (before any parsing), envelope, schema version, field types and
limits, swarm name, peer id = hash(public key), subkey = "<peer_id>:<slot>", signature, age.
A failed check raises RecordRejected with a short reason that the peer counts per round.
Task-level checks (rebuild the instance, compare the prompt, re-score) live in sampler.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields

import msgpack

from qwenlab.swarm.signing import PEER_ID_HEX, PUBLIC_KEY_BYTES, SIGNATURE_BYTES, PeerIdentity, peer_id_for, \
    verify_signature

SCHEMA_VERSION = 2  # 2: task_identity and tokenizer
FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class RecordLimits:
    max_record_bytes: int = 64 * 1024  # the whole DHT value, checked before parsing
    max_completions: int = 64
    min_completions: int = 2  # a group of one has no advantage
    max_completion_chars: int = 8192
    max_prompt_chars: int = 4096
    max_age_s: float = 900.0  # older records are stale (the DHT expires them anyway)
    max_clock_skew_s: float = 120.0  # records "from the future" beyond this are refused
    max_score_s: float = 0.5  # CPU seconds to re-score one record (a linear-time verifier needs ~ms)


class RecordRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class RolloutRecord:
    swarm: str
    peer_id: str
    public_key: bytes
    round: int
    slot: int
    created: float
    task: str
    task_identity: str
    tokenizer: str
    seed: int
    difficulty: int
    prompt: str
    completions: list[str]
    finish_reasons: list[str]
    rewards: list[float]  # the sender's claim: logged, never used

    @property
    def subkey(self) -> str:
        return record_subkey(self.peer_id, self.slot)


def record_subkey(peer_id: str, slot: int) -> str:
    return f"{peer_id}:{slot}"


def rollouts_key(swarm: str, round_index: int) -> str:
    return f"{swarm}/rollouts/{round_index}"


def directory_key(swarm: str) -> str:
    return f"{swarm}/peers"


def tokenizer_digest(tokenizer) -> str:
    """A digest of a tokenizer's vocabulary: peers of one swarm share it (one tokenizer family, e.g. Qwen2.5's)."""
    import hashlib
    import json

    text = json.dumps(sorted(tokenizer.vocabulary().items()), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _body(record: RolloutRecord) -> bytes:
    fields_ = asdict(record)
    fields_["completions"] = list(record.completions)
    return msgpack.packb(fields_, use_bin_type=True)


def encode_record(identity: PeerIdentity, *, swarm: str, round_index: int, slot: int, task: str, seed: int,
                  difficulty: int, prompt: str, completions: list[str], finish_reasons: list[str],
                  rewards: list[float], task_identity: str, tokenizer: str, created: float | None = None) -> bytes:
    """The signed wire bytes of one rollout record from `identity`."""
    record = RolloutRecord(swarm=swarm, peer_id=identity.peer_id, public_key=identity.public_key,
                           round=round_index, slot=slot, created=time.time() if created is None else created,
                           task=task, task_identity=task_identity, tokenizer=tokenizer, seed=seed,
                           difficulty=difficulty, prompt=prompt,
                           completions=list(completions), finish_reasons=list(finish_reasons),
                           rewards=[float(r) for r in rewards])
    body = _body(record)
    return msgpack.packb({"schema": SCHEMA_VERSION, "body": body, "signature": identity.sign(body)},
                         use_bin_type=True)


def _unpack(data: bytes, limits: RecordLimits):
    # Bounded: the caller checked the size; these caps stop a small payload declaring huge containers.
    return msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=limits.max_record_bytes,
                           max_bin_len=limits.max_record_bytes, max_array_len=4 * limits.max_completions + 16,
                           max_map_len=32, max_ext_len=0)


_TYPES = {"swarm": str, "peer_id": str, "public_key": bytes, "round": int, "slot": int, "created": (int, float),
          "task": str, "task_identity": str, "tokenizer": str, "seed": int, "difficulty": int, "prompt": str,
          "completions": list, "finish_reasons": list, "rewards": list}


def _check_fields(body: dict, limits: RecordLimits) -> RolloutRecord:
    names = {f.name for f in fields(RolloutRecord)}
    if set(body) != names:
        raise RecordRejected("invalid", f"fields {sorted(set(body) ^ names)} missing or unexpected")
    for name, kind in _TYPES.items():
        value = body[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise RecordRejected("invalid", f"'{name}' has type {type(value).__name__}")
    completions, reasons, rewards = body["completions"], body["finish_reasons"], body["rewards"]
    if not limits.min_completions <= len(completions) <= limits.max_completions:
        raise RecordRejected("invalid", f"{len(completions)} completions (allowed "
                                        f"{limits.min_completions}..{limits.max_completions})")
    if len(reasons) != len(completions) or len(rewards) != len(completions):
        raise RecordRejected("invalid", "completions, finish_reasons and rewards differ in length")
    if not all(isinstance(c, str) and len(c) <= limits.max_completion_chars for c in completions):
        raise RecordRejected("invalid", "a completion is not text or is too long")
    if not all(r in FINISH_REASONS for r in reasons):
        raise RecordRejected("invalid", "finish_reasons must be 'stop' or 'length'")
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in rewards):
        raise RecordRejected("invalid", "rewards must be finite numbers")
    if len(body["task"]) > 1024 or len(body["task_identity"]) > 64 or len(body["tokenizer"]) > 64:
        raise RecordRejected("invalid", "task name or digests too long")
    if len(body["prompt"]) > limits.max_prompt_chars or body["round"] < 0 or body["slot"] < 0:
        raise RecordRejected("invalid", "prompt too long or negative round/slot")
    if not math.isfinite(body["created"]):
        raise RecordRejected("invalid", "'created' is not a finite time")
    return RolloutRecord(**body)


def check_raw_size(value, limits: RecordLimits = RecordLimits()) -> bytes:
    """The first check, before any parsing: a DHT value must be bytes within the size cap."""
    if not isinstance(value, bytes):
        raise RecordRejected("malformed", f"value is {type(value).__name__}, not bytes")
    if len(value) > limits.max_record_bytes:
        raise RecordRejected("oversized", f"{len(value)} bytes > {limits.max_record_bytes}")
    return value


def decode_record(value, subkey, *, swarm: str, limits: RecordLimits = RecordLimits(),
                  now: float | None = None) -> RolloutRecord:
    """A verified record from a DHT (subkey, value) pair, or RecordRejected naming the failed check."""
    check_raw_size(value, limits)
    try:
        envelope = _unpack(value, limits)
    except Exception as e:  # msgpack raises several types for bad or over-limit input
        raise RecordRejected("malformed", type(e).__name__) from None
    if not isinstance(envelope, dict) or "schema" not in envelope:
        raise RecordRejected("malformed", "no schema version")
    if envelope["schema"] != SCHEMA_VERSION:
        raise RecordRejected("schema", f"schema {envelope['schema']!r}, this peer reads {SCHEMA_VERSION}")
    body_bytes, signature = envelope.get("body"), envelope.get("signature")
    if not isinstance(body_bytes, bytes) or not isinstance(signature, bytes) or len(envelope) != 3:
        raise RecordRejected("malformed", "envelope needs exactly schema, body, signature")
    try:
        body = _unpack(body_bytes, limits)
    except Exception as e:
        raise RecordRejected("malformed", type(e).__name__) from None
    if not isinstance(body, dict):
        raise RecordRejected("malformed", "body is not a map")
    record = _check_fields(body, limits)
    if record.swarm != swarm:
        raise RecordRejected("wrong_swarm", record.swarm[:64])
    if len(record.public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES \
            or len(record.peer_id) != PEER_ID_HEX or peer_id_for(record.public_key) != record.peer_id:
        raise RecordRejected("peer_id", "peer id is not the hash of the record's public key")
    if subkey != record.subkey:
        raise RecordRejected("peer_id", f"stored under subkey {str(subkey)[:60]!r}, record says {record.subkey!r}")
    if not verify_signature(record.public_key, signature, body_bytes):
        raise RecordRejected("signature", f"bad signature from {record.peer_id}")
    now = time.time() if now is None else now
    if not now - limits.max_age_s <= record.created <= now + limits.max_clock_skew_s:
        raise RecordRejected("stale", f"created {now - record.created:.0f} s ago")
    return record
