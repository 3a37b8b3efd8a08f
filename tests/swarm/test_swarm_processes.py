"""A real swarm on loopback: three `qwenlab swarm` peer processes on hivemind, plus an attacker.

One scenario (module fixture), several checks:
  - the three peers exchange records (each accepts records from the other two)
  - forged, tampered and oversized records are rejected and counted; a record whose claimed
    rewards are wrong is accepted with the rewards recomputed locally; a poison-prefix record (the
    right answer only past the tokens a peer trains on) earns nothing
  - a peer killed with SIGKILL mid-round leaves the others training
  - SIGINT checkpoints and exits cleanly; restarting resumes from the checkpoint
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from qwenlab.swarm.dht import SwarmDHT
from qwenlab.swarm.signing import PeerIdentity
from qwenlab.train.grpo.rollouts import draw_instances
from tests.swarm.test_records import make_record as make_shared_record

SWARM = "loopback-test"
PEER_FLAGS = ["--host", "127.0.0.1", "--port", "0", "--swarm", SWARM, "--num-generations", "2",
              "--max-new-tokens", "4", "--local", "2", "--external", "2", "--min-round-seconds", "0.5",
              "--save-every", "2", "--threads", "1", "--audit", "--dht-timeout-s", "5", "--dht-retry-s", "2",
              "--peer-timeout-s", "8", "--quiet"]


class Peer:
    def __init__(self, name: str, root: Path, model: Path, verb: str, *extra: str):
        self.name, self.out = name, root / name
        self.log = root / f"{name}.log"
        command = [sys.executable, "-m", "qwenlab", "swarm", verb, "--out", str(self.out), "--model", str(model),
                   *PEER_FLAGS, *extra]
        with open(self.log, "a") as log:
            # its own process group: SIGKILL to the group takes the DHT child and p2pd with it, like a dead machine
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def rows(self) -> list[dict]:
        path = self.out / "rounds.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def audit(self) -> list[dict]:
        path = self.out / "records.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def peer_id(self) -> str:
        return json.loads((self.out / "peer_config.json").read_text())["peer_id"]

    def address(self) -> str:
        return (self.out / "address.txt").read_text().split()[0]

    def kill_group(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def output(self) -> str:
        return self.log.read_text()


def wait_for(predicate, timeout_s: float, what: str, peers=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        for peer in peers:
            if peer.process.poll() is not None:
                pytest.fail(f"{peer.name} exited ({peer.process.returncode}) while waiting for {what}:\n"
                            f"{peer.output()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n"
                + "\n".join(f"--- {p.name}\n{p.output()[-1500:]}" for p in peers))


def senders(peer: Peer) -> set[str]:
    return {e["peer"] for e in peer.audit() if e["accepted"]}


def attack(address: str, victim_id: str, tokenizer: str) -> dict:
    """Publish forged, tampered, oversized and lying records from a separate DHT node (with the swarm's tokenizer
    digest: the records must get as far as the checks under test)."""
    attacker, stranger = PeerIdentity.generate(), PeerIdentity.generate()

    def make_record(*args, **kwargs):
        return make_shared_record(*args, tokenizer=tokenizer, **kwargs)

    instances = draw_instances(["arithmetic"], 6, "attack")
    entries = []

    def reencode(value: bytes, change) -> bytes:
        envelope = msgpack.unpackb(value, raw=False)
        body = msgpack.unpackb(envelope["body"], raw=False)
        change(body)
        envelope["body"] = msgpack.packb(body, use_bin_type=True)
        return msgpack.packb(envelope, use_bin_type=True)

    # 1. forged: a stranger's key and id, signed by the attacker
    _, value = make_record(attacker, slot=0, instance=instances[0], swarm=SWARM)
    forged = reencode(value, lambda b: b.update(public_key=stranger.public_key, peer_id=stranger.peer_id))
    entries.append((f"{stranger.peer_id}:0", forged))
    # 2. impersonation: an honest peer's id on the attacker's key, under that peer's subkey
    _, value = make_record(attacker, slot=7, instance=instances[1], swarm=SWARM)
    entries.append((f"{victim_id}:7", reencode(value, lambda b: b.update(peer_id=victim_id))))
    # 3. tampered after signing
    subkey, value = make_record(attacker, slot=1, instance=instances[2], swarm=SWARM)
    entries.append((subkey, reencode(value, lambda b: b["completions"].__setitem__(0, "The answer is 1"))))
    # 4. oversized (valid signature, 12 x 8000 characters)
    entries.append(make_record(attacker, slot=2, instance=instances[3], swarm=SWARM, completions=["7" * 8000] * 12))
    # 5. valid, but the sender lies about its rewards
    wrong = str(int(instances[4].expected) + 1)
    entries.append(make_record(attacker, slot=3, instance=instances[4], swarm=SWARM,
                               completions=[f"The answer is {wrong}", instances[4].expected], rewards=[1.0, 0.0]))
    # 6. poison prefix: garbage in the first --max-new-tokens tokens, the right answer after them
    right = instances[5].expected
    entries.append(make_record(attacker, slot=4, instance=instances[5], swarm=SWARM,
                               completions=[f"zq#@!zq#@! The answer is {right}", right], rewards=[1.0, 1.0]))
    dht = SwarmDHT(SWARM, [address], host="127.0.0.1", timeout_s=10)
    try:
        assert dht.start(), "the attacker could not join"
        for _ in range(3):  # republish a few times: peers fetch the latest round of each directory entry
            assert dht.publish(attacker.peer_id, 5, entries)
            time.sleep(1.0)
    finally:
        dht.shutdown()
    return {"attacker": attacker.peer_id, "seed": instances[4].seed, "poison_seed": instances[5].seed}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("swarm")
    peers: list[Peer] = []
    try:
        a = Peer("a", root, tiny_model_dir, "bootstrap")
        peers.append(a)
        wait_for(lambda: (a.out / "address.txt").is_file(), 90, "the bootstrap address", [a])
        b = Peer("b", root, tiny_model_dir, "join", "--peers", a.address())
        c = Peer("c", root, tiny_model_dir, "join", "--peers", a.address())
        peers += [b, c]
        # 1. everyone hears from both others
        wait_for(lambda: all(len(senders(p)) >= 2 for p in (a, b, c)), 150, "records from two peers each", peers)
        ids = {p.name: p.peer_id() for p in peers}
        # 2. the attack
        tokenizer = json.loads((a.out / "peer_config.json").read_text())["tokenizer"]
        attack_info = attack(a.address(), ids["c"], tokenizer)  # c skips its own subkeys; a and b must catch it
        wait_for(lambda: all({attack_info["seed"], attack_info["poison_seed"]} <= {e.get("seed") for e in p.audit()}
                             for p in (a, b)), 60, "the attack records", [a, b, c])
        # 3. kill c mid-run; a and b keep training
        c.kill_group()
        at_kill = {p.name: len(p.rows()) for p in (a, b)}
        wait_for(lambda: all(len(p.rows()) >= at_kill[p.name] + 4 for p in (a, b)), 90, "rounds after the kill",
                 [a, b])
        wait_for(lambda: "other peer(s) active (was" in b.output() and "WARNING" in b.output(), 60,
                 "b's warning that peers left", [a, b])
        # 4. Ctrl-C on a: finish the round, checkpoint, exit 0
        a.process.send_signal(signal.SIGINT)
        a_code = a.process.wait(60)
        a_rows_at_stop = len(a.rows())
        # 5. restart a: it resumes from its checkpoint
        again = Peer("a", root, tiny_model_dir, "join", "--peers", b.address(), "--rounds", str(a_rows_at_stop + 2))
        peers.append(again)
        resumed_code = again.process.wait(120)
        b.process.send_signal(signal.SIGTERM)
        b_code = b.process.wait(60)
        yield {"a": a, "b": b, "c": c, "ids": ids, "attack": attack_info, "at_kill": at_kill, "a_code": a_code,
               "a_rows_at_stop": a_rows_at_stop, "resumed_code": resumed_code, "b_code": b_code}
    finally:
        for peer in peers:
            peer.kill_group()


def test_three_peers_exchange_records(swarm):
    ids = swarm["ids"]
    for name in "abc":
        others = {ids[o] for o in "abc" if o != name}
        assert others <= senders(swarm[name]), f"{name} did not accept records from both other peers"
    rows = swarm["a"].rows()
    assert any(r["external_used"] == 2 and r["external_peers"] >= 1 for r in rows)
    assert all(r["external_reward"] is None or 0 <= r["external_reward"] <= 1 for r in rows)


def test_forged_tampered_and_oversized_records_are_rejected_and_counted(swarm):
    for name in "ab":
        reasons = [e["reason"] for e in swarm[name].audit() if not e["accepted"]]
        assert reasons.count("signature") >= 2, reasons  # forged + tampered
        assert "peer_id" in reasons and "oversized" in reasons
        counted = {}
        for row in swarm[name].rows():
            for reason, n in row["rejected_by_reason"].items():
                counted[reason] = counted.get(reason, 0) + n
        assert counted.get("signature", 0) >= 2 and counted.get("oversized", 0) >= 1
        assert sum(r["rejected"] for r in swarm[name].rows()) >= 4


def test_wrong_claimed_rewards_are_recomputed(swarm):
    for name in "ab":
        # (the restarted a may meet the record again: the DHT still holds it, and a restart forgets what it saw)
        entry = next(e for e in swarm[name].audit() if e.get("seed") == swarm["attack"]["seed"])
        assert entry["peer"] == swarm["attack"]["attacker"]
        assert entry["claimed_rewards"] == [1.0, 0.0] and entry["rewards"] == [0.0, 1.0]
        assert entry["claim_mismatch"] is True


def test_a_poison_prefix_earns_nothing(swarm):
    """Scored whole, the poison completion holds the right answer; the peers train on its first 4
    tokens (--max-new-tokens 4), all garbage, and score exactly those: reward 0."""
    for name in "ab":
        entry = next(e for e in swarm[name].audit() if e.get("seed") == swarm["attack"]["poison_seed"])
        assert entry["accepted"] and entry["peer"] == swarm["attack"]["attacker"]
        assert entry["claimed_rewards"] == [1.0, 1.0] and entry["rewards"] == [0.0, 1.0]


def test_a_killed_peer_leaves_the_others_training(swarm):
    for name in "ab":
        assert len(swarm[name].rows()) >= swarm["at_kill"][name] + 4
    assert swarm["b_code"] == 0  # b ran on until SIGTERM, then stopped cleanly
    assert any("WARNING" in line and "other peer(s) active" in line for line in swarm["b"].output().splitlines())
    assert "stopping after this round" in swarm["b"].output()


def test_ctrl_c_checkpoints_and_restart_resumes(swarm):
    a = swarm["a"]
    assert swarm["a_code"] == 0 and "stopping after this round" in a.output()
    assert swarm["resumed_code"] == 0
    rounds = [r["round"] for r in a.rows()]
    stop = swarm["a_rows_at_stop"]
    assert rounds == list(range(1, stop + 3))  # no gap, no repeat: resumed at stop + 1
    assert f"resumed from {a.out / 'checkpoint'} at round {stop}" in a.output()
