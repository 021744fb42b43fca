"""Masks that cancel in the sum: what a client adds, and what the coordinator removes.

Client i with self-mask seed b_i and pairwise seeds s_ij (shared with every peer j of the round):

    y_i = q_i + PRG(b_i) + sum_{j != i} sign(i, j) * PRG(s_ij)     (mod 2^64)
    sign(i, j) = +1 if i < j else -1                                 (so s_ij terms cancel)

Summing the survivors' y_i leaves  sum q_i + sum_i PRG(b_i) + (terms with dropped peers d).
The coordinator rebuilds b_i for survivors and s_d's private key for dropped clients from Shamir
shares (never both for the same client), subtracts PRG(b_i), and subtracts each survivor's
term sign(i, d) * PRG(s_id), recomputing s_id from d's private key and i's public key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedcore.secagg.keys import KeyPair, expand
from fedcore.secagg.quantize import add, sub

MASK_PURPOSE = b"mask"


def pair_sign(me: str, peer: str) -> int:
    if me == peer:
        raise ValueError("a client has no pairwise mask with itself")
    return 1 if me < peer else -1


def pair_seed(mine: KeyPair, peer_public: bytes, context: bytes) -> bytes:
    return mine.agree(peer_public, MASK_PURPOSE, context)


def mask(
    quantized: np.ndarray,
    me: str,
    self_seed: bytes,
    peers: Mapping[str, bytes],
    mask_key: KeyPair,
    context: bytes,
) -> np.ndarray:
    """Client side: y = q + PRG(b) + sum_j sign * PRG(s_ij) over `peers` {id: mask public key}."""
    n = quantized.size
    y = add(quantized, expand(self_seed, n))
    for peer, public in sorted(peers.items()):
        if peer == me:
            continue
        stream = expand(pair_seed(mask_key, public, context), n)
        y = add(y, stream) if pair_sign(me, peer) > 0 else sub(y, stream)
    return y


def unmask(
    masked_sum: np.ndarray,
    survivor_seeds: Iterable[bytes],
    dropped_keys: Mapping[str, KeyPair],
    survivors: Mapping[str, bytes],
    context: bytes,
) -> np.ndarray:
    """Coordinator side: the sum of the survivors' quantized vectors.

    survivor_seeds: rebuilt self-mask seeds b_i of every survivor;
    dropped_keys: rebuilt mask key pairs of clients that shared keys but sent no masked input;
    survivors: {id: mask public key} of the survivors.
    """
    n = masked_sum.size
    total = np.asarray(masked_sum, dtype=np.uint64)
    for seed in survivor_seeds:
        total = sub(total, expand(seed, n))
    for dropped, key in sorted(dropped_keys.items()):
        for survivor, public in sorted(survivors.items()):
            stream = expand(pair_seed(key, public, context), n)
            # Survivor added sign(survivor, dropped) * PRG(s): take exactly that back out.
            total = sub(total, stream) if pair_sign(survivor, dropped) > 0 else add(total, stream)
    return total
