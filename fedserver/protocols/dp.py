"""The coordinator's side of client-level DP: what clients are told, noise, and the ε ledger.

Pure numpy (the math is in fedcore/privacy.py); the coordinator calls it at three points:
when a round opens (round config extras), when folding (every client weighs 1 and every update
seen in plain is re-clipped to C: the sensitivity argument needs an unweighted mean of vectors
of norm at most C, whatever the clients did), and when a round closes (noise + accountant step,
in a worker thread: Opacus' ε takes up to 0.5 s).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

import numpy as np

from fedcore.privacy import (
    Accountant,
    DPConfig,
    add_gaussian_noise,
    client_noise_std,
    clip_factor,
    effective_noise_multiplier,
    mean_noise_std,
    sample_rate,
)

# Round-config keys (RoundConfig.extra) read by fedclient/session.py.
EXTRA_CLIP = "dp_clip"
EXTRA_CLIENT_NOISE_STD = "dp_client_noise_std"
# Round-history metric names (SQLite rounds.metrics), read back to rebuild the accountant.
METRIC_EPSILON = "epsilon"
METRIC_DELTA = "dp_delta"
METRIC_Z = "dp_noise_multiplier"
METRIC_Q = "dp_sample_rate"


class DPServer:
    def __init__(
        self, config: DPConfig, noise_on_clients: bool = False, seed: int | None = None
    ) -> None:
        self.config = config
        # With secure aggregation the coordinator cannot add noise to a vector it never sees;
        # under HE it could, but the key holder would see the sum before the noise.
        self.noise_on_clients = noise_on_clients
        # DP noise must be unpredictable in production; tests pass a seed for reproducibility.
        self.rng = np.random.default_rng(seed if seed is not None else secrets.randbits(128))
        self.accountant = Accountant()

    def resume(self, past_metrics: Iterable[Mapping[str, float]]) -> None:
        """Rebuild the accountant from the committed rounds' (z, q) so ε continues exactly."""
        history = [
            (m[METRIC_Z], m[METRIC_Q], 1)
            for m in past_metrics
            if m.get(METRIC_Z, 0) > 0 and METRIC_Q in m
        ]
        self.accountant = Accountant(history)

    def round_extra(self, num_selected: int) -> dict[str, str]:
        extra = {EXTRA_CLIP: repr(self.config.clip)}
        if self.noise_on_clients and num_selected:
            std = client_noise_std(self.config.noise_multiplier, self.config.clip, num_selected)
            extra[EXTRA_CLIENT_NOISE_STD] = repr(std)
        return extra

    def reclip_factor(self, norm: float | None) -> float:
        """What an update the coordinator sees in plain is folded with: 1.0 (no change) within
        C, less above. `norm` is the decoded update's L2 norm, measured while it arrived."""
        if norm is None:
            raise ValueError("the update's norm was not measured (UpdateReceiver track_norm)")
        return clip_factor(norm, self.config.clip)

    def privatize(
        self, mean: np.ndarray, contributed: int, selected: int, available: int
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Noise the unweighted mean of `contributed` clipped updates; step the accountant.

        Returns the noised mean and the metrics to store with the round.
        """
        cfg = self.config
        if self.noise_on_clients:
            noised = mean  # the clients' noise is already in the sum
            planned = max(selected, contributed)
            z = effective_noise_multiplier(cfg.noise_multiplier, planned, contributed)
        else:
            std = mean_noise_std(cfg.noise_multiplier, cfg.clip, contributed)
            noised = add_gaussian_noise(mean, std, self.rng)
            z = cfg.noise_multiplier
        q = sample_rate(max(selected, contributed), available)
        metrics = {METRIC_DELTA: cfg.delta, METRIC_Q: q, METRIC_Z: z}
        if z > 0:
            self.accountant.step(z, q)
            metrics[METRIC_EPSILON] = self.accountant.epsilon(cfg.delta)
        # z == 0: clipping only; no finite ε exists, so none is recorded.
        return noised, metrics
