"""Peer identity and record signatures: Ed25519 (RFC 8032) through the `cryptography` package.

A peer is its key pair. Its peer id is derived from the public key (first 20 bytes of SHA-256, in
hex), so a record that carries a public key and a peer id proves both or neither: a record whose
id is not the hash of its key, or whose signature does not verify under that key, is rejected.
Signatures cover a domain tag plus the exact record bytes, so a signature made for anything else
(another protocol, another schema version) never verifies as a swarm record.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from qwenlab.errors import QwenlabError

DOMAIN = b"qwenlab-swarm-record\x00"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PEER_ID_HEX = 40


def peer_id_for(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:PEER_ID_HEX]


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True only for a well-formed key and a valid signature of DOMAIN + message."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, DOMAIN + message)
        return True
    except (InvalidSignature, ValueError):
        return False


class PeerIdentity:
    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        self.public_key = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                 serialization.PublicFormat.Raw)
        self.peer_id = peer_id_for(self.public_key)

    @classmethod
    def generate(cls) -> "PeerIdentity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> "PeerIdentity":
        """The key in `path` (PEM, PKCS#8), created with mode 0600 if missing: a restarted peer keeps its id."""
        path = Path(path)
        if path.is_file():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except ValueError as e:
                raise QwenlabError(f"{path}: not a PEM private key ({e})") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise QwenlabError(f"{path}: expected an Ed25519 private key")
            return cls(key)
        identity = cls.generate()
        pem = identity._private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return identity

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(DOMAIN + message)
