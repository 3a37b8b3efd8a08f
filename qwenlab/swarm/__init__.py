"""The swarm: SAPO-style rollout sharing over a hivemind DHT, trusting no peer.

signing.py (Ed25519 identities) -> records.py (schema, size cap, verification) -> dht.py (hivemind,
errors become warnings) -> sampler.py (rebuild, re-score, I local + J external) -> peer.py (the
round loop) -> metrics.py (rounds.jsonl, rounds.png).
"""

from qwenlab.swarm.peer import PeerConfig, SwarmPeer, run_peer
from qwenlab.swarm.records import RecordLimits, RecordRejected, decode_record, encode_record
from qwenlab.swarm.sampler import ExternalPool
from qwenlab.swarm.signing import PeerIdentity

__all__ = ["ExternalPool", "PeerConfig", "PeerIdentity", "RecordLimits", "RecordRejected", "SwarmPeer",
           "decode_record", "encode_record", "run_peer"]
