"""A swarm peer: SAPO-style rollout sharing over a hivemind DHT, GRPO on its own LoRA adapter.

One round, on this peer's own clock (no coordinator, no barrier):
    1. draw I training instances and generate G completions each with the current policy
    2. sign and publish them (records.py, dht.py)
    3. fetch whatever other peers have published by now; verify, rebuild, re-score (sampler.py)
    4. take up to J external rollouts (SAPO: zero-advantage groups dropped, the rest sampled uniformly);
       slots the swarm could not fill are filled with extra local rollouts, with a visible warning
       (DHT down, peers gone, the round's deadline passed, or simply nobody ahead of us)
    5. one GRPO step on the I + J groups; log the round; checkpoint every `save_every` rounds
Joining: a peer whose tokenizer differs from a peer already in the swarm is refused (one error line):
rollouts are re-encoded under each peer's own tokenizer, which must be of one family. Peers may
differ in base model and adapter. A peer that has seen no other peer for `rejoin_after_s` restarts
its DHT node through its initial peers (it trains alone meanwhile).
Stopping: the first Ctrl-C (or SIGTERM) finishes the round, checkpoints and leaves; a second one
stops at once (the last checkpoint stands).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwenlab.adapters.peft_format import save_adapter_files
from qwenlab.errors import QwenlabError
from qwenlab.model.memory import heap_in_use, release_free_memory, resident_bytes
from qwenlab.swarm.dht import SwarmDHT
from qwenlab.swarm.metrics import SwarmMetrics, mean
from qwenlab.swarm.records import RecordLimits, encode_record
from qwenlab.swarm.sampler import SELECTION_RULES, ExternalPool
from qwenlab.tasks import get_task
from qwenlab.swarm.signing import PeerIdentity
from qwenlab.train.grpo.rollouts import Rollout, draw_instances
from qwenlab.train.grpo.trainer import (GRPOConfig, GRPOLearner, GracefulStop, check_grpo_inputs, has_checkpoint,
                                        save_final_adapter)

KEY_FILE = "peer_key.pem"
P2P_IDENTITY_FILE = "p2p_identity.key"
ADDRESS_FILE = "address.txt"


@dataclass
class PeerConfig:
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # model, tasks, G, LoRA, lr, beta, seed, ...
    out: str = "swarm-peer"
    swarm: str = "qwenlab"  # the DHT key namespace: peers with another name ignore each other
    initial_peers: list[str] = field(default_factory=list)  # empty: this peer is a bootstrap node
    network: bool = True  # False: a solo peer (no DHT at all), for baselines
    host: str = "0.0.0.0"
    port: int = 0
    announce: str | None = None  # public IP to advertise (behind NAT / port forwarding)
    stable_address: bool = False  # keep the p2p identity in OUT so the multiaddr survives restarts
    local: int = 4  # I: own rollout groups per round
    external: int = 4  # J: other peers' rollout groups per round
    fill_local: bool = True  # fill missing external slots with extra local rollouts
    external_selection: str = "drop_zero_advantage"  # SAPO's rule, or "uniform" (every record may be drawn)
    round_deadline_s: float = 0.0  # the exchange gets what is left of this after generating (0: no deadline)
    rejoin_after_s: float = 60.0  # alone this long with initial peers given: restart the DHT through them
    rounds: int = 0  # stop after this round (0: run until stopped)
    save_every: int = 10
    snapshot_every: int = 0  # also keep the adapter every N rounds in OUT/snapshots/round-N (0: never)
    min_round_seconds: float = 0.0  # a floor on this peer's own round time (0: as fast as it can)
    dht_timeout_s: float = 10.0
    dht_retry_s: float = 30.0
    record_ttl_s: float = 600.0
    peer_timeout_s: float = 120.0  # a peer not heard from for this long counts as gone (for warnings)
    max_record_bytes: int = 64 * 1024
    rate_burst: float = 64
    rate_per_s: float = 8.0
    wait_for_peers: int = 0  # before round 1, wait until this many other peers are announced ...
    wait_timeout_s: float = 60.0  # ... or this long, then start anyway
    audit: bool = False  # write every incoming record's verdict to OUT/records.jsonl
    resume: bool = True
    quiet: bool = False

    def validate(self) -> "PeerConfig":
        self.grpo.validate()
        if self.local < 0 or self.external < 0 or self.local + self.external < 1:
            raise QwenlabError(f"swarm: need local >= 0, external >= 0 and at least one group per round, "
                               f"got {self.local}/{self.external}")
        if self.local == 0 and not self.fill_local:
            raise QwenlabError("swarm: local 0 needs fill_local (a round with no external records has nothing)")
        if self.rounds < 0 or self.save_every < 1 or self.snapshot_every < 0:
            raise QwenlabError("swarm: rounds must be >= 0, save_every >= 1 and snapshot_every >= 0")
        if self.external_selection not in SELECTION_RULES:
            raise QwenlabError(f"swarm: external_selection must be one of {', '.join(SELECTION_RULES)}, "
                               f"got {self.external_selection!r}")
        if self.round_deadline_s < 0 or self.rejoin_after_s <= 0:
            raise QwenlabError("swarm: round_deadline_s must be >= 0 and rejoin_after_s > 0")
        if "/" in self.swarm or not self.swarm:
            raise QwenlabError(f"swarm: the swarm name must be non-empty and contain no '/', got {self.swarm!r}")
        self._validate_addresses()
        return self

    def _validate_addresses(self) -> None:
        """Before any network or process starts: a bad address would otherwise hang the DHT or run alone."""
        _check_ip(self.host, "--host")
        if self.announce is not None:
            _check_ip(self.announce, "--announce")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise QwenlabError(f"swarm: --port must be 0..65535, got {self.port!r}")
        for address in self.initial_peers:
            _check_peer_address(address)


def _check_ip(value: str, flag: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise QwenlabError(f"swarm: {flag} must be an IPv4 or IPv6 address, got {value!r}") from None


def _check_peer_address(value: str) -> None:
    """A multiaddr that names the peer: /ip4/HOST/tcp/PORT/p2p/ID (what bootstrap prints)."""
    from hivemind.utils.multiaddr import Multiaddr

    try:
        protocols = [p.name for p in Multiaddr(value).protocols()]
    except Exception as e:  # hivemind's parser raises several types (StringParseError, ValueError, ...)
        raise QwenlabError(f"swarm: --peers {value!r} is not a multiaddr ({str(e).splitlines()[0]}); "
                           "expected /ip4/HOST/tcp/PORT/p2p/PEER_ID as printed by `qwenlab swarm bootstrap`") from None
    if "p2p" not in protocols or "tcp" not in protocols:
        raise QwenlabError(f"swarm: --peers {value!r} lacks /tcp/PORT or /p2p/PEER_ID; "
                           "expected /ip4/HOST/tcp/PORT/p2p/PEER_ID as printed by `qwenlab swarm bootstrap`")


def _derived_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big")


class SwarmPeer:
    def __init__(self, config: PeerConfig):
        self.config = config.validate()
        check_grpo_inputs(config.grpo)  # a bad model or adapter path leaves no peer folder behind
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.identity = PeerIdentity.load_or_create(self.out / KEY_FILE)
        self.peer_id = self.identity.peer_id
        self.metrics = SwarmMetrics(self.out, audit=config.audit)
        self.pool: ExternalPool | None = None  # made with the learner: it scores with the learner's tokenizer
        self.dht: SwarmDHT | None = None
        self.learner: GRPOLearner | None = None
        self.round = 0
        self._last_fallback: str | None = None
        self._peers_active = 0
        self._alone_since = time.monotonic()
        self._refused_peers: set[str] = set()
        self.stop = GracefulStop("swarm: stopping after this round (checkpoint first); press Ctrl-C again to stop now")

    def say(self, text: str, always: bool = False) -> None:
        """Progress lines (hidden by quiet); warnings, stops and resumes are always printed."""
        if always or not self.config.quiet or "WARNING" in text:
            print(text, flush=True)

    # ---- setup ---------------------------------------------------------------------------
    def start_network(self) -> list[str]:
        """Start the DHT before the model: hivemind forks its process, best done before torch threads exist."""
        c = self.config
        if not c.network:
            return []
        identity = str(self.out / P2P_IDENTITY_FILE) if c.stable_address else None
        self.dht = SwarmDHT(c.swarm, c.initial_peers, host=c.host, port=c.port, announce=c.announce,
                            identity_path=identity, timeout_s=c.dht_timeout_s, retry_s=c.dht_retry_s,
                            record_ttl_s=c.record_ttl_s, peer_timeout_s=c.peer_timeout_s, warn=self.say)
        self.dht.start()
        addresses = self.dht.addresses()
        if addresses:  # written whole, then renamed: a reader never sees a half-written file
            tmp = self.out / f".{ADDRESS_FILE}.tmp"
            tmp.write_text("\n".join(addresses) + "\n")
            tmp.replace(self.out / ADDRESS_FILE)
        return addresses

    def start_learner(self) -> None:
        c = self.config
        self.learner = GRPOLearner.create(c.grpo)
        # Foreign completions are scored on exactly the tokens this learner trains on.
        self.pool = ExternalPool(c.swarm, self.peer_id, RecordLimits(max_record_bytes=c.max_record_bytes),
                                 tokenizer=self.learner.tokenizer, max_completion_tokens=c.grpo.max_new_tokens,
                                 tasks=c.grpo.tasks,
                                 rate_burst=c.rate_burst, rate_per_s=c.rate_per_s,
                                 seed=_derived_seed(c.grpo.seed, self.peer_id))
        checkpoint = self.out / "checkpoint"
        if self.config.resume and has_checkpoint(checkpoint):
            extra = self.learner.load(checkpoint)
            self.round = int(extra.get("round", self.learner.step))
            self.metrics.resume_at(self.round)
            self.say(f"swarm: resumed from {checkpoint} at round {self.round}", always=True)
        else:
            self.metrics.resume_at(0)
        config = asdict(self.config)
        identities = {t: get_task(t).digest for t in c.grpo.tasks}
        (self.out / "peer_config.json").write_text(json.dumps(
            {**config, "peer_id": self.peer_id, "tokenizer": self.pool.tokenizer_digest, "task_identities": identities},
            indent=2) + "\n")

    def _announce(self) -> dict:
        return {"tokenizer": self.pool.tokenizer_digest}

    def check_tokenizers(self, joining: bool) -> None:
        """Compare our tokenizer with every announced peer's. Joining (initial peers given), a mismatch
        refuses us with one error line; otherwise the other peer is reported once (its records are refused)."""
        if self.dht is None:
            return
        announced = self.dht.announcements(self.peer_id) or {}
        ours = self.pool.tokenizer_digest
        for peer, entry in announced.items():
            theirs = entry.get("tokenizer")
            if not isinstance(theirs, str) or theirs == ours or peer in self._refused_peers:
                continue
            self._refused_peers.add(peer)
            message = (f"swarm: peer {str(peer)[:16]} uses another tokenizer (vocabulary digest {theirs[:16]}, "
                       f"ours {ours[:16]} from {self.config.grpo.model}); peers of one swarm must share a "
                       "tokenizer family (e.g. the Qwen2.5 models), since each re-encodes the others' text")
            if joining:
                raise QwenlabError(f"{message}: refused at join")
            self.say(f"swarm: WARNING: {message}; its records are refused")

    def _wait_for_peers(self) -> int:
        """Announce ourselves and wait (bounded) until `wait_for_peers` others are listed. Only a start
        condition: rounds never wait for anyone."""
        c = self.config
        if self.dht is None or c.wait_for_peers <= 0:
            return 0
        deadline, seen = time.monotonic() + c.wait_timeout_s, 0
        while not self.stop.requested:
            self.dht.publish(self.peer_id, self.round, [], announce=self._announce())
            fetched = self.dht.fetch(self.peer_id)
            seen = fetched[1] if fetched is not None else 0
            if seen >= c.wait_for_peers or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if seen < c.wait_for_peers:
            self.say(f"swarm: WARNING: {seen} of {c.wait_for_peers} peers after {c.wait_timeout_s:.0f} s; "
                     "starting anyway")
        return seen

    # ---- one round -----------------------------------------------------------------------
    def _local_rollouts(self, count: int, tag: str) -> list[Rollout]:
        if count == 0:
            return []
        g = self.config.grpo
        instances = draw_instances(g.tasks, count, f"swarm:{g.seed}:{self.peer_id}:{self.round + 1}:{tag}",
                                   g.difficulty)
        return self.learner.rollouts(instances, seed=_derived_seed(g.seed, self.peer_id, self.round + 1, tag))

    def _publish(self, round_index: int, rollouts: list[Rollout]) -> bool:
        entries = []
        for slot, r in enumerate(rollouts):
            value = encode_record(self.identity, swarm=self.config.swarm, round_index=round_index, slot=slot,
                                  task=r.task, task_identity=get_task(r.task).digest,
                                  tokenizer=self.pool.tokenizer_digest, seed=r.seed, difficulty=r.difficulty,
                                  prompt=r.prompt, completions=r.completions, finish_reasons=r.finish_reasons,
                                  rewards=r.rewards)
            if len(value) > self.config.max_record_bytes:  # peers would reject it: do not send it
                self.say(f"swarm: WARNING: record {slot} of round {round_index} is {len(value)} bytes, over "
                         f"max_record_bytes {self.config.max_record_bytes}; not published")
                continue
            entries.append((f"{self.peer_id}:{slot}", value))
        return self.dht.publish(self.peer_id, round_index, entries, announce=self._announce(),
                                timeout_s=self._exchange_timeout())

    def _exchange_timeout(self) -> float:
        """The DHT timeout, cut to what is left of the round's deadline (at least 0.1 s)."""
        if not self.config.round_deadline_s:
            return self.config.dht_timeout_s
        left = self._round_deadline - time.monotonic()
        return max(0.1, min(self.config.dht_timeout_s, left))

    def _rejoin_if_alone(self, peers_seen: int) -> None:
        """Nobody seen for rejoin_after_s although we joined through initial peers: the neighbours may
        have restarted or our routing table may have emptied; restarting the DHT bootstraps again."""
        now = time.monotonic()
        if peers_seen or not self.config.initial_peers:
            self._alone_since = now
            return
        if now - self._alone_since >= self.config.rejoin_after_s:
            self.say(f"swarm: WARNING: no other peer seen for {now - self._alone_since:.0f} s; rejoining "
                     "through the initial peers (training goes on alone meanwhile)")
            self._alone_since = now
            self.dht.start()

    def run_round(self) -> dict:
        c, r = self.config, self.round + 1
        started = time.perf_counter()
        self._round_deadline = time.monotonic() + c.round_deadline_s
        local = self._local_rollouts(c.local, "local")
        generated = time.perf_counter()
        report, peers_seen, dht_ok = None, 0, False
        late = bool(c.round_deadline_s) and time.monotonic() >= self._round_deadline
        if self.dht is not None:
            published = self._publish(r, local) if local else True
            fetched = None
            if c.external and not late:
                fetched = self.dht.fetch(self.peer_id, timeout_s=self._exchange_timeout())
            elif not c.external:
                fetched = ([], 0)
            dht_ok = published and fetched is not None
            if fetched is not None:
                entries, peers_seen = fetched
                report = self.pool.ingest(entries)
                self.metrics.log_audit(r, report.audit)
                if report.rejected.get("tokenizer"):
                    self.check_tokenizers(joining=False)
            self._rejoin_if_alone(peers_seen)
        dropped_before = self.pool.dropped_zero_advantage
        external = self.pool.take(c.external, c.external_selection)
        exchanged = time.perf_counter()
        shortfall = c.external - len(external)
        fill = []
        if self.dht is not None and dht_ok and c.external and peers_seen != self._peers_active:
            # Peers joining is news; peers leaving is a warning (shown even when quiet).
            left = peers_seen < self._peers_active
            self.say(f"swarm: {'WARNING: ' if left else ''}round {r}: {peers_seen} other peer(s) active "
                     f"(was {self._peers_active})")
            self._peers_active = peers_seen
        if shortfall and c.fill_local:
            if self.dht is not None:
                why = ("round deadline passed before the exchange" if late else "DHT unavailable" if not dht_ok
                       else f"only {len(external)} external rollouts available")
                warn = not dht_ok and why != self._last_fallback  # once per outage; the DHT also warns
                self._last_fallback = why
                self.say(f"swarm: {'WARNING: ' if warn else ''}round {r}: {why}; filling {shortfall} of "
                         f"{c.external} external slots with local rollouts")
            fill = self._local_rollouts(shortfall, "fill")
        elif not shortfall:
            self._last_fallback = None
        filled = time.perf_counter()
        stats = self.learner.train_step(local + fill + external)
        self.round = r
        trained = time.perf_counter()
        # Rounds free tensors of ever-different sizes (completions, re-encoded foreign text): glibc keeps the
        # freed pages mapped, split over its per-thread arenas, and RSS crept up ~80 MiB over 500 rounds with
        # nothing live behind it. Handing them back each round (a few ms) keeps RSS at what is in use.
        release_free_memory()
        memory = self._memory()
        row = {
            "round": r, "time": round(time.time(), 3), "peer": self.peer_id,
            "local_reward": mean(x for g in local + fill for x in g.rewards),
            "external_reward": mean(x for g in external for x in g.rewards),
            "claimed_external_reward": mean(x for g in external for x in (g.claimed_rewards or [])),
            "local_used": len(local) + len(fill), "external_used": len(external), "fallback_local": len(fill),
            "external_selection": c.external_selection,
            "dropped_zero_advantage": self.pool.dropped_zero_advantage - dropped_before,
            "deadline_missed": late, "tasks": sorted({g.task for g in local + fill + external}),
            "external_peers": len({g.source for g in external}),
            "accepted": report.accepted if report else 0, "rejected": report.rejected_total if report else 0,
            "rejected_by_reason": dict(report.rejected) if report else {},
            "duplicates": report.duplicates if report else 0,
            "claim_mismatches": report.claim_mismatches if report else 0,
            "peers_seen": peers_seen, "dht_ok": dht_ok, "dht_errors": self.dht.errors if self.dht else 0,
            "pool": len(self.pool), **{k: stats[k] for k in ("loss", "kl", "grad_norm", "tokens")},
            "seconds_generate": round(generated - started + filled - exchanged, 3),
            "seconds_exchange": round(exchanged - generated, 3),
            "seconds_train": round(trained - filled, 3),
            **memory,
        }
        self.metrics.log_round(row)
        ext = f"{row['external_reward']:.3f}" if row["external_reward"] is not None else "  -  "
        self.say(f"round {r}  local {row['local_reward']:.3f}  external {ext} "
                 f"({len(external)} from {row['external_peers']} peers)  accepted {row['accepted']}  "
                 f"rejected {row['rejected']}  loss {stats['loss']:+.4f}")
        return row

    @staticmethod
    def _memory() -> dict:
        """What this process holds after a round, for telling a leak (live bytes grow) from the allocator
        keeping freed pages (RSS grows, live bytes flat): RSS, glibc's live heap, Python's live blocks."""
        rss, heap = resident_bytes(), heap_in_use()
        return {"rss_mib": None if rss is None else round(rss / 2**20, 1),
                "heap_in_use_mib": None if heap is None else round(heap / 2**20, 1),
                "python_blocks": sys.getallocatedblocks()}

    # ---- the loop ------------------------------------------------------------------------
    def save(self) -> None:
        self.learner.save(self.out / "checkpoint", extra={"round": self.round, "peer_id": self.peer_id})

    def snapshot(self) -> None:
        """The adapter as it is now, for picking a round afterwards (e.g. on validation accuracy)."""
        folder = self.out / "snapshots" / f"round-{self.round:06d}"
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_adapter_files(self.learner.adapter(), tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    def run(self) -> dict:
        """Start, run rounds until `rounds` or a stop signal, checkpoint, shut down. Returns a summary."""
        try:
            with self.stop:
                addresses = self.start_network()
                if addresses:
                    self.say("swarm: this peer's addresses (give one to `qwenlab swarm join --peers`):\n  "
                             + "\n  ".join(addresses), always=True)
                self.start_learner()
                self._wait_for_peers()
                self.check_tokenizers(joining=bool(self.config.initial_peers))
                self.say(f"swarm: peer {self.peer_id} starting at round {self.round + 1} "
                         f"({self.config.local} local + {self.config.external} external groups per round)")
                while not self.stop.requested and (self.config.rounds == 0 or self.round < self.config.rounds):
                    started = time.monotonic()
                    self.run_round()
                    if self.round % self.config.save_every == 0:
                        self.save()
                    if self.config.snapshot_every and self.round % self.config.snapshot_every == 0:
                        self.snapshot()
                    rest = self.config.min_round_seconds - (time.monotonic() - started)
                    if rest > 0 and not self.stop.requested:
                        time.sleep(rest)
                self.save()
            save_final_adapter(self.learner, self.out / "adapter", "swarm-grpo",
                               {**asdict(self.config), "peer_id": self.peer_id, "rounds_done": self.round})
            return self.summary()
        except KeyboardInterrupt:
            self.say(f"swarm: stopped at once; the checkpoint in {self.out / 'checkpoint'} stands", always=True)
            raise
        finally:
            self.metrics.plot(f"swarm peer {self.peer_id[:8]}")
            if self.dht is not None:
                self.dht.shutdown()

    def run_dht_only(self, seconds: float | None = None) -> None:
        """Serve the DHT without training (a bootstrap node on a small VPS) until stopped."""
        self.stop.message = "swarm: stopping the DHT node"
        try:
            with self.stop:
                for line in self.start_network():
                    self.say(line, always=True)
                deadline = None if seconds is None else time.monotonic() + seconds
                while not self.stop.requested and (deadline is None or time.monotonic() < deadline):
                    time.sleep(0.5)
                    self.dht.ensure_started()
        finally:
            if self.dht is not None:
                self.dht.shutdown()

    def summary(self) -> dict:
        rows = self.metrics.rounds.rows()
        return {"peer_id": self.peer_id, "rounds": self.round, "out": str(self.out),
                "adapter": str(self.out / "adapter"),
                "local_reward_first": rows[0]["local_reward"] if rows else None,
                "local_reward_last": rows[-1]["local_reward"] if rows else None,
                "accepted": sum(r["accepted"] for r in rows), "rejected": sum(r["rejected"] for r in rows)}


def run_peer(config: PeerConfig) -> dict:
    return SwarmPeer(config).run()
