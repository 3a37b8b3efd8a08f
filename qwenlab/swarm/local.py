"""A swarm of peer processes on one machine (loopback), for the recipe stage and the experiment.

Each peer is its own process (spawned, so it starts without the parent's torch threads), with its
own hivemind DHT node; peer 0 bootstraps and the others join it, exactly as on separate machines.
`network=False` runs the same peers solo, with no DHT, as the baseline.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qwenlab.errors import QwenlabError
from qwenlab.swarm.peer import ADDRESS_FILE, KEY_FILE, PeerConfig


def write_seeded_identity(out: Path, key: str) -> None:
    """A deterministic peer key (so a seeded run draws the same tasks); only for experiments, never real swarms."""
    out.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(key.encode()).digest())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (out / KEY_FILE).write_bytes(pem)
    (out / KEY_FILE).chmod(0o600)


def _peer_main(config: PeerConfig, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from qwenlab.swarm.peer import SwarmPeer

    SwarmPeer(config).run()


def run_local_swarm(configs: list[PeerConfig], *, threads: int = 1, timeout_s: float = 600.0,
                    start_timeout_s: float = 120.0) -> list[int]:
    """Run the peers to completion (each config's `rounds` must be > 0); returns their exit codes.

    With network on, configs[0] bootstraps on 127.0.0.1 and the others join its address; every peer
    waits (at start only, up to its wait_timeout_s) until it sees the others, so that a peer that
    loads faster does not finish its rounds alone.
    """
    if configs[0].network and len(configs) > 1:
        configs = [replace(c, wait_for_peers=max(c.wait_for_peers, len(configs) - 1)) for c in configs]
    if any(c.rounds <= 0 for c in configs):
        raise QwenlabError("run_local_swarm: every peer needs rounds > 0")
    context = multiprocessing.get_context("spawn")
    processes: list = []

    def start(config: PeerConfig):
        process = context.Process(target=_peer_main, args=(config, threads), daemon=False)
        process.start()
        processes.append(process)
        return process

    (Path(configs[0].out) / ADDRESS_FILE).unlink(missing_ok=True)  # never join a previous run's address
    try:
        first = start(configs[0])
        address = None
        if configs[0].network and len(configs) > 1:
            address_file = Path(configs[0].out) / ADDRESS_FILE
            deadline = time.monotonic() + start_timeout_s
            while not (address_file.is_file() and address_file.read_text().split()):
                if time.monotonic() > deadline or not first.is_alive():
                    raise QwenlabError(f"the bootstrap peer did not start (no {address_file})")
                time.sleep(0.2)
            address = address_file.read_text().split()[0]
        for config in configs[1:]:
            start(replace(config, initial_peers=[address]) if address else config)
        deadline = time.monotonic() + timeout_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        return [p.exitcode if p.exitcode is not None else -1 for p in processes]
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the peer checkpoints and leaves after its round
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join(5)
