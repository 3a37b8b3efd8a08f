"""No DHT failure stops training: unreachable peers, a dead DHT process, and a peer run without a swarm."""

from __future__ import annotations

import json

from qwenlab.swarm import PeerConfig, SwarmPeer
from qwenlab.swarm.dht import SwarmDHT
from qwenlab.train.grpo import GRPOConfig

NOWHERE = "/ip4/127.0.0.1/tcp/9/p2p/QmQc2JUuW6MStHT6hy2xzzSCYaL4zC291ECJfDwvEucZvt"


def test_unreachable_initial_peers_and_a_dead_dht_become_warnings():
    warnings: list[str] = []
    dht = SwarmDHT("t", [NOWHERE], host="127.0.0.1", retry_s=0, timeout_s=5, warn=warnings.append)
    assert dht.start() is False and not dht.healthy
    assert dht.publish("me", 1, [("me:0", b"x")]) is False
    assert dht.fetch("me") is None
    assert dht.errors >= 3 and all("training continues on local rollouts" in w for w in warnings if "WARN" in w)

    alone = SwarmDHT("t", [], host="127.0.0.1", retry_s=3600, timeout_s=5, warn=warnings.append)
    try:
        assert alone.start() and alone.publish("me", 1, [("me:0", b"x")])
        alone._dht.terminate()  # the DHT process dies under us
        alone._dht.join(5)
        assert alone.fetch("me") is None and alone.publish("me", 2, []) is False  # no retry before retry_s
        alone.retry_s = 0
        assert alone.fetch("me") == ([], 0)  # restarted
    finally:
        alone.shutdown()


def test_peer_trains_on_local_rollouts_when_the_swarm_is_unreachable_then_resumes(tiny_model_dir, tmp_path):
    grpo = GRPOConfig(model=str(tiny_model_dir), num_generations=2, max_new_tokens=4)
    config = PeerConfig(grpo=grpo, out=str(tmp_path / "peer"), swarm="t", initial_peers=[NOWHERE],
                        host="127.0.0.1", local=1, external=2, rounds=2, save_every=1, dht_retry_s=3600, quiet=True)
    summary = SwarmPeer(config).run()
    rows = [json.loads(line) for line in (tmp_path / "peer" / "rounds.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 2 and [r["round"] for r in rows] == [1, 2]
    assert all(not r["dht_ok"] and r["fallback_local"] == 2 and r["local_used"] == 3 for r in rows)
    # each round records what the process holds (RSS above the live heap, which holds the model)
    assert all(r["rss_mib"] > r["heap_in_use_mib"] > 1 and r["python_blocks"] > 1000 for r in rows)
    assert (tmp_path / "peer" / "adapter" / "adapter_model.safetensors").is_file()

    config.rounds, config.network = 3, False  # restart (solo this time): continues at round 3
    resumed = SwarmPeer(config)
    assert resumed.run()["rounds"] == 3
    rows = [json.loads(line) for line in (tmp_path / "peer" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and resumed.learner.step == 3


def test_restart_after_a_dht_process_died_holding_hivemind_lock():
    """A DHT process killed mid-update leaves hivemind's shared MPFuture lock held; the restarted
    DHT must not block on it forever (this hung a CI run)."""
    from hivemind.utils.mpfuture import MPFuture

    warnings: list[str] = []
    dht = SwarmDHT("t", [], host="127.0.0.1", retry_s=0, timeout_s=5, warn=warnings.append)
    try:
        assert dht.start()
        dht._dht.terminate()
        dht._dht.join(5)
        # What a killed process leaves behind. The terminate() above may itself have killed the DHT
        # process while it held the lock (then it is held already: the same situation), so never block here.
        MPFuture._update_lock.acquire(timeout=1)
        dht.start_timeout_s = 60
        assert dht.fetch("me") == ([], 0) and dht.healthy  # restarted, and answering
    finally:
        dht.shutdown()
