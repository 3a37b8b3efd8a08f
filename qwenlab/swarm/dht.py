"""The swarm's use of a hivemind DHT, wrapped so that no DHT failure can stop training.

Layout (all keys under the swarm name, so several swarms can share one DHT):
    "<swarm>/peers"            subkey <peer_id>        -> msgpack {"round": r, "tokenizer": digest}
                                                          who is active, at which round, with which tokenizer
    "<swarm>/rollouts/<r>"     subkey <peer_id>:<slot> -> a signed rollout record (records.py)
A fetch reads the directory, then the rollout keys of the latest round of each other peer: rounds
are asynchronous, so a peer takes whatever its peers have published by now, with no coordinator.

Every call runs with a timeout and returns a value or None; an exception, a timeout or a dead DHT
process turns into a warning and `healthy = False`, the peer trains on local rollouts, and the DHT
is restarted (rejoining the initial peers) at most every `retry_s` seconds. A peer whose initial
peers cannot be reached at start keeps training alone and keeps retrying: no bootstrap node is
required to be up, and any peer can be one (`qwenlab swarm bootstrap`).

The DHT itself refuses to store any value over `hard_cap_bytes` (PayloadCapValidator), so honest
nodes never hold an attacker's large blobs; the finer per-record cap is applied, and counted, by
the receiving peer (records.py).
"""

from __future__ import annotations

import time
import weakref
from typing import Callable

import msgpack

from qwenlab.swarm.records import directory_key, rollouts_key

DEFAULT_HARD_CAP_BYTES = 1 << 20


def _validator(hard_cap_bytes: int):
    from hivemind.dht.validation import RecordValidatorBase

    class PayloadCapValidator(RecordValidatorBase):
        """Refuse, at the DHT level, any stored or returned value larger than the hard cap."""

        def validate(self, record) -> bool:
            return len(record.value) <= hard_cap_bytes

    return PayloadCapValidator()


_started = {"any": False, "instances": weakref.WeakSet()}  # DHTs started by this Python process


def _fresh_locks_if_idle(starting: "SwarmDHT") -> None:
    """hivemind's MPFuture shares class-level multiprocessing locks with every DHT process it forks, in the
    whole Python process. A DHT process that died holding one (terminated mid-update, crashed) leaves it
    locked, and the next DHT process, of this instance or any other, blocks forever on its first update.
    So before a start, when a DHT was started here before and none is running now, the locks are made
    anew (with a DHT still running, its futures need the old ones)."""
    from hivemind.utils.mpfuture import MPFuture

    running = any(dht is not starting and dht.healthy for dht in _started["instances"])
    if _started["any"] and not running:
        MPFuture.reset_backend()
    _started["any"] = True
    _started["instances"].add(starting)


START_TIMEOUT_S = 120.0  # a DHT start (p2pd, bootstrap) that takes longer has failed


class SwarmDHT:
    def __init__(self, swarm: str, initial_peers: list[str] | None = None, *, host: str = "0.0.0.0", port: int = 0,
                 announce: str | None = None, identity_path: str | None = None, timeout_s: float = 10.0,
                 retry_s: float = 30.0, record_ttl_s: float = 600.0, peer_timeout_s: float = 120.0,
                 max_rounds_per_fetch: int = 16,
                 hard_cap_bytes: int = DEFAULT_HARD_CAP_BYTES, warn: Callable[[str], None] = print):
        self.swarm, self.initial_peers = swarm, list(initial_peers or [])
        self.host, self.port, self.announce, self.identity_path = host, port, announce, identity_path
        self.timeout_s, self.retry_s, self.record_ttl_s = timeout_s, retry_s, record_ttl_s
        self.peer_timeout_s = peer_timeout_s
        self.max_rounds_per_fetch, self.hard_cap_bytes, self.warn = max_rounds_per_fetch, hard_cap_bytes, warn
        self._dht = None
        self._last_attempt = -float("inf")
        self.start_timeout_s = START_TIMEOUT_S
        self.errors = 0  # DHT failures so far (start, store, get)

    # ---- lifecycle -----------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._dht is not None and self._dht.is_alive()

    def start(self) -> bool:
        """Start (or restart) the DHT node; False, with a warning, if it cannot join now."""
        import hivemind

        self._last_attempt = time.monotonic()
        self.shutdown()
        _fresh_locks_if_idle(self)
        kwargs = dict(host_maddrs=[f"/ip4/{self.host}/tcp/{self.port}"],
                      record_validators=[_validator(self.hard_cap_bytes)])
        if self.announce:
            kwargs["announce_maddrs"] = [f"/ip4/{self.announce}/tcp/{self.port}"]
        if self.identity_path:
            kwargs["identity_path"] = self.identity_path
        try:
            self._dht = hivemind.DHT(initial_peers=self.initial_peers or None, start=False, **kwargs)
            # Bounded: a DHT process that never reports ready must not hang the peer.
            self._dht.run_in_background(await_ready=True, timeout=self.start_timeout_s)
            _make_command_pipe_blocking(self._dht)
            return True
        except Exception as e:
            if self._dht is not None and self._dht.is_alive():
                self._dht.terminate()
                self._dht.join(5)
            self._dht = None
            reason = f"not ready within {self.start_timeout_s:.0f} s" if isinstance(e, TimeoutError) else _short(e)
            self._fail(f"could not start the DHT / reach the initial peers ({reason})")
            return False

    def ensure_started(self) -> bool:
        """Restart a failed DHT, at most once every retry_s seconds."""
        if self.healthy:
            return True
        if time.monotonic() - self._last_attempt < self.retry_s:
            return False
        self.warn("swarm: retrying to join the DHT")
        return self.start()

    def addresses(self) -> list[str]:
        if not self.healthy:
            return []
        return [str(a) for a in self._dht.get_visible_maddrs()]

    def shutdown(self) -> None:
        dht, self._dht = self._dht, None
        if dht is not None:
            try:
                dht.shutdown()
            except Exception:
                pass  # it is going away either way

    def _fail(self, what: str) -> None:
        self.errors += 1
        self.warn(f"swarm: WARNING: {what}; training continues on local rollouts")
        if self._dht is not None and not self._dht.is_alive():
            self._dht = None

    # ---- records -------------------------------------------------------------------------
    def publish(self, peer_id: str, round_index: int, entries: list[tuple[str, bytes]],
                announce: dict | None = None, timeout_s: float | None = None) -> bool:
        """Store our records for this round and announce the round (and `announce`'s fields) in the directory."""
        if not self.ensure_started():
            return False
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            from hivemind.utils import get_dht_time

            expiration = get_dht_time() + self.record_ttl_s
            futures = [self._dht.store(rollouts_key(self.swarm, round_index), value, expiration, subkey=subkey,
                                       return_future=True) for subkey, value in entries]
            futures.append(self._dht.store(directory_key(self.swarm),
                                           msgpack.packb({**(announce or {}), "round": round_index}),
                                           expiration, subkey=peer_id, return_future=True))
            deadline = time.monotonic() + timeout_s
            stored = [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futures]
        except Exception as e:
            self._fail(f"publishing round {round_index} failed ({_short(e)})")
            return False
        if not all(stored):
            self.warn(f"swarm: {stored.count(False)} of {len(stored)} DHT stores were not acknowledged")
        return True

    def _active_peers(self, listing, own_peer_id: str) -> int:
        """Other peers that announced a round within peer_timeout_s (an announcement expires
        record_ttl_s after it was made; peers are assumed to use the same TTL)."""
        from hivemind.utils import get_dht_time

        if listing is None or not isinstance(listing.value, dict):
            return 0
        since = get_dht_time() - self.peer_timeout_s
        return sum(1 for peer, item in listing.value.items()
                   if peer != own_peer_id and item.expiration_time - self.record_ttl_s >= since)

    def announcements(self, own_peer_id: str) -> dict[str, dict] | None:
        """What every other peer announced in the directory ({peer: {"round": r, "tokenizer": ...}}); None on error."""
        if not self.ensure_started():
            return None
        try:
            listing = self._dht.get(directory_key(self.swarm), latest=True, return_future=True)
            listing = listing.result(timeout=self.timeout_s)
        except Exception as e:
            self._fail(f"reading the peer directory failed ({_short(e)})")
            return None
        if listing is None or not isinstance(listing.value, dict):
            return {}
        return {peer: announced for peer, item in listing.value.items()
                if peer != own_peer_id and (announced := _announcement(item.value)) is not None}

    def fetch(self, own_peer_id: str, timeout_s: float | None = None) -> tuple[list[tuple[object, object]], int] | None:
        """(subkey, value) pairs of the other peers' latest rounds, and how many are active; None on error."""
        if not self.ensure_started():
            return None
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            deadline = time.monotonic() + timeout_s
            listing = self._dht.get(directory_key(self.swarm), latest=True, return_future=True)
            listing = listing.result(timeout=timeout_s)
            rounds = _latest_rounds(listing, own_peer_id, self.max_rounds_per_fetch)
            futures = [self._dht.get(rollouts_key(self.swarm, r), latest=True, return_future=True) for r in rounds]
            entries: list[tuple[object, object]] = []
            for future in futures:
                found = future.result(timeout=max(0.1, deadline - time.monotonic()))
                if found is not None and isinstance(found.value, dict):
                    entries += [(subkey, item.value) for subkey, item in found.value.items()]
                elif found is not None:
                    entries.append((None, found.value))  # a plain value where a dictionary belongs
            return entries, self._active_peers(listing, own_peer_id)
        except Exception as e:
            self._fail(f"fetching rollouts failed ({_short(e)})")
            return None


def _make_command_pipe_blocking(dht) -> None:
    """Work around hivemind 1.1.12 dying on any command message larger than what one read() returns.

    The DHT child registers its end of the command pipe with the event loop, which leaves the shared
    file description non-blocking; `recv()` of a message that is still being written then raises
    BlockingIOError and the DHT process exits (hivemind PR #660, gensyn-ai/rl-swarm #77/#216: the
    "EOFError"/"Resource temporarily unavailable" crashes). O_NONBLOCK belongs to the open file
    description, which parent and child share after fork, so setting it back here fixes the child.
    """
    import os

    pipe = getattr(dht, "_inner_pipe", None)
    if pipe is not None:
        os.set_blocking(pipe.fileno(), True)


def _latest_rounds(listing, own_peer_id: str, limit: int) -> list[int]:
    """The distinct latest rounds announced by other peers (newest `limit` of them)."""
    if listing is None or not isinstance(listing.value, dict):
        return []
    rounds = set()
    for peer, item in listing.value.items():
        announced = _announcement(item.value) if peer != own_peer_id else None
        if announced is not None:
            rounds.add(announced["round"])
    return sorted(rounds)[-limit:]


def _announcement(value) -> dict | None:
    """A directory entry {"round": r, ...} read with bounds, or None if it is not one."""
    if not isinstance(value, bytes) or len(value) > 256:
        return None
    try:
        announced = msgpack.unpackb(value, max_str_len=128, max_map_len=8, max_array_len=8)
        round_index = announced["round"]
    except Exception:
        return None
    if not isinstance(round_index, int) or isinstance(round_index, bool) or not 0 <= round_index < 2**40:
        return None
    return announced


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__
