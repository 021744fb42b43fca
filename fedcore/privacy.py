"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): clipping, noise, accounting.

The mechanism, per round with n contributing clients:

    clipped_i = delta_i * min(1, C / ||delta_i||_2)          (client side, fedclient/session.py;
                                                              again on the coordinator, below)
    mean      = (1/n) * sum_i clipped_i  +  N(0, (z*C/n)^2 I) (coordinator side)

The coordinator re-clips every update it sees in plain (the decoded delta, as folded) with the
same factor (clip_factor), so the bound holds whatever a client sends; an honest client's update
is within the bound and folded unchanged (factor exactly 1.0).

Replacing one client's update changes the sum by at most C in L2 (add/remove adjacency), so the
Gaussian noise on the sum has std z*C (noise multiplier z) and the mean's noise std is z*C/n.
Under secure aggregation or homomorphic encryption the coordinator never sees an individual
vector (it cannot re-clip: there the clip is the clients' to enforce), and under HE the key
holder would see an un-noised sum, so the noise is split:
every client adds N(0, (z*C)^2/n_sel) to its clipped update and the n_sel noises sum to
N(0, (z*C)^2). If only m < n_sel masked updates survive, the sum carries variance
(z*C)^2 * m/n_sel, i.e. an effective multiplier z*sqrt(m/n_sel), which is what gets accounted.

The privacy loss is computed by Opacus' RDP accountant (a maintained library, not hand-written
math) with sample rate q = clients selected / clients available when the round opened.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021, Algorithm 1): C follows the gamma-quantile of the update norms.
Each round every contribution i yields b_i = [||delta_i|| <= C_t] (measured by the coordinator,
or reported by the client), and

    b_bar   = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / n + 1/2     (centred: sensitivity 1/2)
    C_{t+1} = C_t * exp(-eta_C * (b_bar - gamma))                   (geometric update)

The count and the sum of updates are one Gaussian mechanism on the vector (sum/C, count/(1/2)):
its noise multiplier z satisfies z^-2 = z_delta^-2 + (2 sigma_b)^-2, so for the z the operator
asks for the updates are noised with z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 (needs 2 sigma_b > z)
and the accountant steps with z (Theorem 1 of the paper; TFF's adaptive_clip_noise_params).

Under secure aggregation or HE (client-side variant only; section 3 of the paper) the
coordinator must not see any b_i: each client appends b_i as one more float32 value of its update
(tensor MASKED_BIT_TENSOR, `with_masked_bit`), plus its share N(0, sigma_b^2/n_sel) of the
count's noise, so the masks (or the encryption) hide it like the update and only the noised sum
is revealed (mean x survivors). The m of n_sel shares that survive give sigma_b^2 m/n_sel, the
same factor as the update's split noise: the combined z*sqrt(m/n_sel) is what gets accounted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedcore.tensors import Manifest, TensorSpec

# Smallest norm treated as nonzero: a zero update needs no scaling (and must not divide by 0).
_TINY = 1e-12


# Andrew et al.'s recommendations, as Flower's DifferentialPrivacy*AdaptiveClipping defaults.
INITIAL_CLIP = 0.1
TARGET_QUANTILE = 0.5
CLIP_LR = 0.2
COUNT_STDDEV_DIVISOR = 20  # sigma_b = expected clients per round / 20
# The update metric a client reports under --dp-adaptive-clip client: 1.0 if its update's norm
# was within the round's clip before it clipped, else 0.0 (fedclient/local_update.py).
CLIP_BIT_METRIC = "dp_within_clip"
# The same bit (plus the client's share of the count noise) as the last value of a masked
# update under --secure secagg/he: a float32 tensor of shape (1,) after the model's floats.
MASKED_BIT_TENSOR = "dp:within_clip"  # ':' does not occur in torch state-dict names


def with_masked_bit(floats: Manifest) -> Manifest:
    """What a masked adaptive-clipping update carries: `floats`, then MASKED_BIT_TENSOR."""
    return Manifest((*floats.tensors, TensorSpec(MASKED_BIT_TENSOR, "float32", (1,))))


@dataclass(frozen=True)
class AdaptiveClip:
    """--dp-adaptive-clip: where b_i is measured, target quantile gamma, lr eta_C, sigma_b."""

    side: Literal["server", "client"]
    count_stddev: float
    target_quantile: float = TARGET_QUANTILE
    lr: float = CLIP_LR

    def __post_init__(self) -> None:
        if self.side not in ("server", "client"):
            raise ValueError(f"dp-adaptive-clip must be server or client, got {self.side!r}")
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(f"dp-target-quantile must be in [0, 1], got {self.target_quantile}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"dp-clip-lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.count_stddev) and self.count_stddev >= 0):
            raise ValueError(f"dp-clipped-count-stddev must be >= 0, got {self.count_stddev}")


@dataclass(frozen=True)
class DPConfig:
    """Client-level DP knobs: L2 clip C (the initial one when adaptive), noise multiplier z (of
    the combined mechanism when adaptive), target delta, adaptive clipping or None (fixed C)."""

    clip: float
    noise_multiplier: float
    delta: float = 1e-5
    adaptive: AdaptiveClip | None = field(default=None)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"dp-clip must be a positive number, got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"dp-noise-multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp-delta must be in (0, 1), got {self.delta}")
        if self.adaptive is not None:
            update_noise_multiplier(self.noise_multiplier, self.adaptive.count_stddev)

    @property
    def update_noise_multiplier(self) -> float:
        """z_delta: what the sum of updates is noised with (z itself under a fixed clip)."""
        if self.adaptive is None:
            return self.noise_multiplier
        return update_noise_multiplier(self.noise_multiplier, self.adaptive.count_stddev)


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2: the updates' share of a combined multiplier z
    when the clipped count (sensitivity 1/2) carries noise sigma_b. 0 when z is 0 (no noise)."""
    z = noise_multiplier
    if z == 0:
        return 0.0
    if not 2 * count_stddev > z:
        raise ValueError(
            f"dp-clipped-count-stddev {count_stddev:g} is too small for dp-noise-multiplier "
            f"{z:g}: adaptive clipping needs 2 x stddev > z (the count's noise is part of the "
            f"budget); raise --dp-clipped-count-stddev above {z / 2:g} (Andrew et al. suggest "
            "clients per round / 20) or lower --dp-noise-multiplier"
        )
    return float((z**-2 - (2 * count_stddev) ** -2) ** -0.5)


def noised_within_fraction(
    within: int, count: int, count_stddev: float, rng: np.random.Generator
) -> float:
    """b_bar: the noised fraction of `count` updates whose norm was within the clip; the sum
    of centred bits (sensitivity 1/2) gets N(0, sigma_b^2), as in the paper and TF Privacy."""
    if not 0 <= within <= count or count < 1:
        raise ValueError(f"within must be in 0..{count}, got {within}")
    noise = float(rng.normal(0.0, count_stddev)) if count_stddev > 0 else 0.0
    return (within - count / 2 + noise) / count + 0.5


def next_clip(clip: float, within_fraction: float, target_quantile: float, lr: float) -> float:
    """C_{t+1} = C_t exp(-eta_C (b_bar - gamma)): down when more than gamma of the updates were
    within C, up when fewer. It converges to the gamma-quantile of the update norms."""
    return clip * math.exp(-lr * (within_fraction - target_quantile))


def clip_factor(norm: float, clip: float) -> float:
    """What a vector of L2 norm `norm` is multiplied by to be clipped to `clip`: exactly 1.0
    within the bound (so an update already clipped is left bit for bit), else a hair under
    clip / norm, so that float32 rounding of the scaled values cannot exceed C."""
    if norm <= clip or norm < _TINY:
        return 1.0
    return clip / norm * (1 - 1e-6)


def l2_clip(delta: np.ndarray, clip: float) -> np.ndarray:
    """delta scaled down (never up) so its L2 norm is at most `clip`; float32 out."""
    vec = np.asarray(delta, dtype=np.float32)
    factor = clip_factor(float(np.linalg.norm(vec.astype(np.float64))), clip)
    if factor == 1.0:
        return vec.copy()
    # Scale in float64: one rounding to float32, covered by clip_factor's headroom.
    return (vec.astype(np.float64) * factor).astype(np.float32)


def mean_noise_std(noise_multiplier: float, clip: float, num_clients: int) -> float:
    """Std of the Gaussian noise added by the coordinator to the mean of `num_clients` updates."""
    if num_clients < 1:
        raise ValueError("need at least one client")
    return noise_multiplier * clip / num_clients


def client_noise_std(noise_multiplier: float, clip: float, num_selected: int) -> float:
    """Per-client noise std when noise is split across clients (secure aggregation on)."""
    if num_selected < 1:
        raise ValueError("need at least one client")
    return noise_multiplier * clip / math.sqrt(num_selected)


def effective_noise_multiplier(noise_multiplier: float, selected: int, contributed: int) -> float:
    """The multiplier the split noise actually achieved when only `contributed` of `selected`
    clients' (noised) updates made it into the sum."""
    if not 0 < contributed <= selected:
        raise ValueError(f"contributed must be in 1..{selected}, got {contributed}")
    return noise_multiplier * math.sqrt(contributed / selected)


def add_gaussian_noise(vec: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """vec + N(0, std^2 I), float32 (noise drawn in float64 for accuracy)."""
    if std == 0:
        return np.asarray(vec, dtype=np.float32).copy()
    noise = rng.normal(0.0, std, size=np.shape(vec))
    return (np.asarray(vec, dtype=np.float64) + noise).astype(np.float32)


def sample_rate(selected: int, available: int) -> float:
    """Poisson-style sample rate used for amplification: q = selected / available, capped at 1."""
    if selected < 1:
        raise ValueError("no client selected")
    return min(1.0, selected / max(available, selected))


class Accountant:
    """Privacy loss across rounds, via Opacus' RDP accountant.

    `history` is Opacus' own list of (noise_multiplier, sample_rate, steps); it is plain JSON so a
    resumed coordinator rebuilds the accountant exactly from its round history.
    """

    def __init__(self, history: list[tuple[float, float, int]] | None = None) -> None:
        from opacus.accountants import RDPAccountant  # heavy import: only when DP is on

        self._rdp = RDPAccountant()
        for z, q, steps in history or []:
            for _ in range(int(steps)):
                self.step(float(z), float(q))

    def step(self, noise_multiplier: float, rate: float) -> None:
        if noise_multiplier <= 0:
            raise ValueError("a round without noise has no finite privacy guarantee")
        self._rdp.step(noise_multiplier=noise_multiplier, sample_rate=rate)

    def epsilon(self, delta: float) -> float:
        if not self._rdp.history:
            return 0.0
        return float(self._rdp.get_epsilon(delta=delta))

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(z), float(q), int(n)) for z, q, n in self._rdp.history]

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)


__all__ = [
    "CLIP_BIT_METRIC",
    "MASKED_BIT_TENSOR",
    "Accountant",
    "AdaptiveClip",
    "DPConfig",
    "add_gaussian_noise",
    "client_noise_std",
    "clip_factor",
    "effective_noise_multiplier",
    "l2_clip",
    "mean_noise_std",
    "next_clip",
    "noised_within_fraction",
    "sample_rate",
    "update_noise_multiplier",
    "with_masked_bit",
]
