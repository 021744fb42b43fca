"""Secure aggregation math (SecAgg, Bonawitz et al. CCS 2017): pure functions, no I/O.

- quantize.py: fixed-point encoding of float updates into the ring Z_{2^64} and back
- shamir.py:   t-of-n Shamir secret sharing over the prime field GF(2^521 - 1)
- keys.py:     X25519 key agreement + HKDF, ChaCha20 mask expansion, AEAD for shares
- masking.py:  one client's masked vector, and the coordinator's mask removal
"""
