"""A loopback swarm on a mixed-task run: three `qwenlab swarm` peer processes on two tasks (a built-in one and a
reasoning-gym dataset), one of them on another base model of the same tokenizer family; a fourth peer whose
reasoning-gym config differs (its records of that task are refused by identity); a fifth on another tokenizer,
refused at join."""

from __future__ import annotations

import json

import pytest

from tests.conftest import build_hf_model
from tests.swarm.test_swarm_processes import Peer, senders, wait_for


def tasks_flag(root, max_digits: int) -> str:
    config = root / f"chain_sum_{max_digits}.yaml"
    config.write_text(f"min_terms: 2\nmax_terms: 2\nmax_digits: {max_digits}\n")
    return f"arithmetic,reasoning_gym:chain_sum@{config}"


def test_mixed_task_swarm_with_a_heterogeneous_peer(tmp_path, tiny_model_dir):
    other_base = tmp_path / "other-base"
    build_hf_model(other_base, seed=1)  # other weights, the same tokenizer (built from the same corpus)
    tasks, other_tasks = tasks_flag(tmp_path, 1), tasks_flag(tmp_path, 3)
    peers: list[Peer] = []
    try:
        a = Peer("a", tmp_path, tiny_model_dir, "bootstrap", "--tasks", tasks, "--external-selection", "uniform")
        peers.append(a)
        wait_for(lambda: (a.out / "address.txt").is_file(), 90, "the bootstrap address", [a])
        b = Peer("b", tmp_path, other_base, "join", "--peers", a.address(), "--tasks", tasks)
        c = Peer("c", tmp_path, tiny_model_dir, "join", "--peers", a.address(), "--tasks", tasks,
                 "--external-selection", "uniform")
        peers += [b, c]
        wait_for(lambda: all(len(senders(p)) >= 2 for p in (a, b, c)), 150, "records from two peers each", peers)
        d = Peer("d", tmp_path, tiny_model_dir, "join", "--peers", a.address(), "--tasks", other_tasks)
        peers.append(d)
        wait_for(lambda: (d.out / "peer_config.json").is_file(), 90, "d's start", peers)
        d_id = d.peer_id()
        wait_for(lambda: any(e.get("reason") == "task_identity" for e in a.audit())
                 and d_id in senders(a), 90, "d's records at a", peers)
        e = Peer("e", tmp_path, "nano", "join", "--peers", a.address(), "--tasks", tasks)
        peers.append(e)
        e_code = e.process.wait(180)
    finally:
        for peer in peers:
            peer.kill_group()

    ids = {p.name: p.peer_id() for p in (a, b, c)}
    # every peer of the mixed run took records from both others, the heterogeneous one included
    assert senders(a) >= {ids["b"], ids["c"]} and senders(b) >= {ids["a"], ids["c"]}
    # one question per sampled task: each round's local groups are one arithmetic and one chain_sum question
    for peer in (a, b, c):
        assert all(sorted(r["tasks"]) == sorted(tasks.split(",")) for r in peer.rows())
    # records are rebuilt with the receiver's own source: both tasks arrive, each re-scored here
    accepted_tasks = {e["task"].split("@")[0] for e in a.audit() if e["accepted"]}
    assert accepted_tasks == {"arithmetic", "reasoning_gym:chain_sum"}
    # the selection rule is the peer's, and recorded: b (SAPO's rule) drops zero-advantage groups,
    # a (uniform) trains on external groups whatever they scored
    assert {r["external_selection"] for r in b.rows()} == {"drop_zero_advantage"}
    assert {r["external_selection"] for r in a.rows()} == {"uniform"}
    assert sum(r["external_used"] for r in a.rows()) > 0
    assert sum(r["dropped_zero_advantage"] for r in b.rows()) + sum(r["external_used"] for r in b.rows()) > 0
    # d's chain_sum (another config: another identity) is refused; its arithmetic records are taken
    from_d = [e for e in a.audit() if e.get("peer") == d_id or d_id in str(e.get("subkey", ""))]
    assert any(e["accepted"] and e["task"] == "arithmetic" for e in from_d)
    refused = [e for e in a.audit() if e.get("reason") == "task_identity"]
    assert refused and all(d_id in e["subkey"] for e in refused)
    # nano's tokenizer is another family: refused at join, one error line, exit 2
    assert e_code == 2, e.output()[-2000:]
    assert "uses another tokenizer" in e.output() and "refused at join" in e.output()
    assert json.loads((b.out / "peer_config.json").read_text())["tokenizer"] == \
        json.loads((a.out / "peer_config.json").read_text())["tokenizer"]
