"""Key agreement and the cryptographic streams that turn shared secrets into masks.

Each client makes two fresh X25519 key pairs per round: a *channel* pair (its shares are
encrypted to each peer under HKDF(X25519(c_i, c_j))) and a *mask* pair (the pairwise mask seed
with peer j is HKDF(X25519(s_i, s_j))). Seeds become masks through ChaCha20's keystream, a
cryptographic PRG; numpy's generators are predictable and never used for masks.
"""

from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
_ZERO_NONCE = bytes(16)  # every ChaCha20 key here is used for exactly one stream
_AEAD_NONCE = bytes(12)  # every AEAD key encrypts exactly one message (one sender -> recipient)


class KeyPair:
    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self.private = private or X25519PrivateKey.generate()

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self.private.private_bytes_raw()

    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def agree(self, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
        """A 32-byte key shared with the owner of `peer_public`, bound to purpose and context."""
        shared = self.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        return HKDF(
            algorithm=hashes.SHA256(),
            length=SEED_BYTES,
            salt=None,
            info=b"fedgrpc-secagg/" + purpose + b"/" + context,
        ).derive(shared)


def random_seed() -> bytes:
    return secrets.token_bytes(SEED_BYTES)


def expand(seed: bytes, num_values: int) -> np.ndarray:
    """ChaCha20 keystream of `seed` as `num_values` uint64 ring elements."""
    encryptor = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * num_values))
    return np.frombuffer(stream, dtype="<u8").copy()


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_AEAD_NONCE, plaintext, associated)


def open_sealed(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """Raises cryptography.exceptions.InvalidTag if forged or misrouted."""
    return ChaCha20Poly1305(key).decrypt(_AEAD_NONCE, ciphertext, associated)


def round_context(federation_id: str, round_number: int) -> bytes:
    """Binds every derived key to one federation and round: keys never carry across rounds."""
    return f"{federation_id}/{round_number}".encode()
