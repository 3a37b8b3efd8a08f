"""`qwenlab swarm bootstrap` and `qwenlab swarm join --peers MULTIADDR...`: a SAPO swarm peer.

Both run the same peer (qwenlab.swarm.peer): bootstrap starts a new swarm and prints the address
others join with; join connects to one or more known peers. Flags are the fields of PeerConfig and
GRPOConfig. Ctrl-C finishes the round, checkpoints and exits; run the same command to resume.
"""

from __future__ import annotations

from qwenlab.cli.grpo import HELP, add_dataclass_flags, dataclass_from_args

HELP.update({
    "swarm": "swarm name (a key namespace; peers of other swarms are ignored)",
    "host": "interface to listen on", "port": "TCP port to listen on (0: any free port)",
    "announce": "public IP to advertise, when this machine is behind NAT or port forwarding",
    "stable_address": "keep the p2p identity in OUT so the address survives restarts",
    "local": "I: own rollout groups per round", "external": "J: other peers' rollout groups per round",
    "fill_local": "fill external slots the swarm cannot fill with extra local rollouts",
    "rounds": "stop after this round (0: run until Ctrl-C)",
    "min_round_seconds": "lower bound on this peer's round time (0: as fast as it can)",
    "max_record_bytes": "reject incoming records larger than this",
    "rate_burst": "records a peer may send in a burst", "rate_per_s": "records per second per peer after the burst",
    "audit": "log every incoming record's verdict to OUT/records.jsonl",
    "wait_for_peers": "before round 1, wait until this many other peers are seen (0: start at once)",
    "wait_timeout_s": "longest wait for --wait-for-peers before starting anyway",
    "peer_timeout_s": "a peer silent for this long counts as gone (a warning; its records stay usable)",
    "resume": "continue from OUT/checkpoint when it exists", "quiet": "print warnings only",
    "external_selection": "drop_zero_advantage (SAPO: groups that all scored the same are dropped, then uniform) "
                          "or uniform",
    "round_deadline_s": "a round's exchange gets what is left of this many seconds after generating (0: none)",
    "rejoin_after_s": "with --peers: restart the DHT through them after this long without seeing a peer",
})
_PEER_SKIP = ("grpo", "out", "initial_peers", "network")
_GRPO_SKIP = ("steps", "batch", "save_every")


def cmd_swarm(args) -> int:
    from qwenlab.swarm import PeerConfig, SwarmPeer
    from qwenlab.train.grpo import GRPOConfig

    grpo = dataclass_from_args(GRPOConfig, args, skip=_GRPO_SKIP)
    config = dataclass_from_args(PeerConfig, args, skip=_PEER_SKIP, grpo=grpo, out=args.out,
                                 initial_peers=list(getattr(args, "peers", None) or []))
    peer = SwarmPeer(config)
    if getattr(args, "dht_only", False):
        peer.run_dht_only()
        return 0
    summary = peer.run()
    print(f"swarm: peer {summary['peer_id']} stopped after round {summary['rounds']}; adapter {summary['adapter']}; "
          f"records accepted {summary['accepted']}, rejected {summary['rejected']}; "
          f"curves {args.out}/rounds.jsonl, {args.out}/rounds.png")
    return 0


def _peer_parser(verbs, name: str, text: str, defaults: dict):
    from qwenlab.swarm import PeerConfig
    from qwenlab.train.grpo import GRPOConfig

    p = verbs.add_parser(name, help=text, description=text)
    p.add_argument("--out", default="swarm-peer", help="this peer's folder: key, checkpoint, adapter, metrics")
    add_dataclass_flags(p, PeerConfig, skip=_PEER_SKIP, defaults=defaults)
    add_dataclass_flags(p, GRPOConfig, skip=_GRPO_SKIP)
    p.set_defaults(func=cmd_swarm)
    return p


def register(subparsers) -> None:
    swarm = subparsers.add_parser("swarm", help="train with GRPO in a peer-to-peer swarm that shares rollouts")
    verbs = swarm.add_subparsers(dest="verb", metavar="VERB", required=True)
    boot = _peer_parser(verbs, "bootstrap", "start a new swarm: print the address others join, then train",
                        {"port": 31337, "stable_address": True})
    boot.add_argument("--dht-only", action="store_true", help="serve the DHT without training (e.g. on a VPS)")
    join = _peer_parser(verbs, "join", "join a swarm through one or more known peers and train", {})
    join.add_argument("--peers", nargs="+", required=True, metavar="MULTIADDR",
                      help="addresses printed by a bootstrap peer (or any running peer)")
