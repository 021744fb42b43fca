"""The Synthetic(alpha, beta) federated data of FedProx (Li et al., MLSys 2020), per device.

Numpy only, so benchmarks can use it without torch. Device k's data depends on (seed, k) alone:
any number of devices, each generated on demand, identical in every process. Following the
paper's generator (github.com/litian96/FedProx, data/synthetic_*/generate_niid.py):

    u_k ~ N(0, alpha),  B_k ~ N(0, beta)             (alpha, beta used as std devs, as there)
    W_k ~ N(u_k, 1) in R^{60x10},  b_k ~ N(u_k, 1) in R^10
    v_k ~ N(B_k, 1) in R^60,  x ~ N(v_k, Sigma),  Sigma = diag(j^-1.2)
    y = argmax(softmax(W_k^T x + b_k)),  n_k ~ lognormal(4, 2) + 50 examples

alpha sets how much devices' models differ, beta how much their inputs differ. n_k is capped at
MAX_EXAMPLES (the lognormal tail reaches tens of thousands) to bound a device's cost. Each
device keeps TEST_FRACTION of its examples as local test data, as the paper does.
"""

from __future__ import annotations

import numpy as np

DIMENSION = 60
NUM_CLASSES = 10
MAX_EXAMPLES = 1000
TEST_FRACTION = 0.2
_SIGMA = np.power(np.arange(1, DIMENSION + 1, dtype=np.float64), -1.2)


def device_data(
    alpha: float, beta: float, device: int, seed: int = 0, iid: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of device `device`: float32 features, int64 labels.

    iid=True is the paper's Synthetic-IID: one W, b for every device and v_k = B_k * 1.
    """
    if device < 0:
        raise ValueError(f"device must be >= 0, got {device}")
    rng = np.random.default_rng([seed, 1, device])
    u = rng.normal(0.0, alpha)
    b_shift = rng.normal(0.0, beta)
    w = rng.normal(u, 1.0, (DIMENSION, NUM_CLASSES))
    b = rng.normal(u, 1.0, NUM_CLASSES)
    v = rng.normal(b_shift, 1.0, DIMENSION)
    if iid:
        shared = np.random.default_rng([seed, 0])  # the one model every device follows
        w = shared.normal(0.0, 1.0, (DIMENSION, NUM_CLASSES))
        b = shared.normal(0.0, 1.0, NUM_CLASSES)
        v = np.full(DIMENSION, b_shift)
    n = min(int(rng.lognormal(4, 2)) + 50, MAX_EXAMPLES)
    x = v + rng.standard_normal((n, DIMENSION)) * np.sqrt(_SIGMA)  # diagonal covariance
    y = np.argmax(x @ w + b, axis=1)  # argmax of softmax = argmax of the logits
    n_test = int(n * TEST_FRACTION)
    x, y = x.astype(np.float32), y.astype(np.int64)
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def pooled_test(
    alpha: float, beta: float, devices: int, seed: int = 0, iid: bool = False
) -> tuple[np.ndarray, ...]:
    """The local test splits of devices 0..devices-1, concatenated: a held-out set."""
    parts = [device_data(alpha, beta, k, seed, iid)[2:] for k in range(devices)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
