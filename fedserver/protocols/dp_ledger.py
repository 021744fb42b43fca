"""The DP ledger of a federation (--dp-clip): what clients are told each round (clip, their
share of the noise), the re-clip factor of an update seen in plain, adaptive clipping's bit and
clip step (Andrew et al. 2021), and the noise + accountant step at a round's close. Pure state
and math over fedcore/privacy.py; `DifferentialPrivacy` (dp.py) calls it from the round
protocol's verbs, and the round history stores the metrics it returns.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Iterable, Mapping

import numpy as np

from fedcore.privacy import (
    CLIP_BIT_METRIC,
    MASKED_BIT_TENSOR,
    Accountant,
    DPConfig,
    add_gaussian_noise,
    client_noise_std,
    clip_factor,
    effective_noise_multiplier,
    mean_noise_std,
    next_clip,
    noised_within_fraction,
    sample_rate,
)
from fedserver.updates.receiver import BadUpdate

log = logging.getLogger("fedserver")

# Round-config keys (RoundConfig.extra) read by fedclient/session.py.
EXTRA_CLIP = "dp_clip"
EXTRA_CLIENT_NOISE_STD = "dp_client_noise_std"
# Round-history metric names (SQLite rounds.metrics), read back to rebuild the accountant.
METRIC_EPSILON = "epsilon"
METRIC_DELTA = "dp_delta"
METRIC_Z = "dp_noise_multiplier"
METRIC_Q = "dp_sample_rate"
# Adaptive clipping: the clip this round used, the next round's, the updates' own multiplier
# z_delta and the noised fraction of updates within the clip (all released: safe to record).
METRIC_CLIP = "dp_clip"
METRIC_CLIP_NEXT = "dp_clip_next"
METRIC_UPDATE_Z = "dp_update_noise_multiplier"
METRIC_WITHIN = "dp_within_clip_fraction"
EXTRA_REPORT_BIT = "dp_report_clip_bit"  # "1": report CLIP_BIT_METRIC (client-side variant)
REPORT_MASKED = "masked"  # EXTRA_REPORT_BIT under secagg/he: the bit inside the update
EXTRA_CLIENT_COUNT_NOISE_STD = "dp_client_count_noise_std"  # each client's share of sigma_b
# An unmasked bit sum further than this many count-noise stddevs outside [0, n] is no honest
# round's (honest: a chance below 1e-9); BIT_SUM_SLACK covers the fixed-point rounding.
BIT_SUM_SIGMAS = 6.0
BIT_SUM_SLACK = 0.5


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
        self.clip = config.clip  # C_t: fixed, or adaptive's current one
        self.within = 0  # adaptive: this round's updates with b_i = 1

    def resume(self, past_metrics: Iterable[Mapping[str, float]]) -> None:
        """Rebuild the accountant from the committed rounds' (z, q) so ε continues exactly,
        and an adaptive clip from the last committed round's next clip."""
        past = list(past_metrics)
        history = [
            (m[METRIC_Z], m[METRIC_Q], 1) for m in past if m.get(METRIC_Z, 0) > 0 and METRIC_Q in m
        ]
        self.accountant = Accountant(history)
        if self.config.adaptive is not None:
            clips = [m[METRIC_CLIP_NEXT] for m in past if METRIC_CLIP_NEXT in m]
            self.clip = clips[-1] if clips else self.config.clip

    def round_extra(self, num_selected: int) -> dict[str, str]:
        adaptive = self.config.adaptive
        if adaptive is not None and adaptive.side == "server":
            # The coordinator measures each norm against C_t: a client clip would hide it.
            return {}
        extra = {EXTRA_CLIP: repr(self.clip)}
        if adaptive is not None:
            extra[EXTRA_REPORT_BIT] = REPORT_MASKED if self.noise_on_clients else "1"
        if self.noise_on_clients and num_selected:
            # Adaptive: the updates' share z_delta; the count's share is sigma_b / sqrt(n_sel).
            z = self.config.update_noise_multiplier
            extra[EXTRA_CLIENT_NOISE_STD] = repr(client_noise_std(z, self.clip, num_selected))
            if adaptive is not None:
                std = client_noise_std(adaptive.count_stddev, 1.0, num_selected)
                extra[EXTRA_CLIENT_COUNT_NOISE_STD] = repr(std)
        return extra

    def reclip_factor(self, norm: float | None) -> float:
        """What an update the coordinator sees in plain is folded with: 1.0 (no change) within
        C_t, less above. `norm` is the decoded update's L2 norm, measured while it arrived."""
        if norm is None:
            raise ValueError("the update's norm was not measured (UpdateReceiver track_norm)")
        return clip_factor(norm, self.clip)

    def clip_bit(self, norm: float | None, metrics: Mapping[str, float]) -> bool:
        """Adaptive clipping's b_i for one update: measured here (server side) or the client's
        report (client side; BadUpdate if it is missing or not 0/1)."""
        assert self.config.adaptive is not None
        if self.config.adaptive.side == "server":
            if norm is None:
                raise ValueError("the update's norm was not measured (UpdateReceiver track_norm)")
            return norm <= self.clip
        bit = metrics.get(CLIP_BIT_METRIC)
        if bit not in (0.0, 1.0):
            raise BadUpdate(
                "this coordinator adapts the DP clip from the clients' reports "
                f"(--dp-adaptive-clip client): the update's metric {CLIP_BIT_METRIC!r} must be "
                f"1 (norm within the round's clip) or 0, got {bit!r}; run a current fedclient",
                reason="bad_metrics",
            )
        return bit == 1.0

    def adapt(self, count: int, masked_sum: float | None = None) -> dict[str, float]:
        """At a round's close, on the event loop before any await: C_{t+1} from the noised count
        of this round's `count` updates (`masked_sum`: the unmasked sum of the bits, already
        noised by the clients). Returns the metrics to record with the round."""
        adaptive = self.config.adaptive
        if adaptive is None or count < 1:
            return {}
        used, within_count = self.clip, self.within
        self.within = 0
        kept = {METRIC_CLIP: used, METRIC_CLIP_NEXT: used}
        kept[METRIC_UPDATE_Z] = self.config.update_noise_multiplier
        if masked_sum is not None:
            if not plausible_bit_sum(masked_sum, count, adaptive.count_stddev):
                # Masked: nobody can tell whose value it was, so the round's model step stands
                # and only the clip keeps its value (never exp() of a huge number: a crash).
                log.warning(
                    "round's unmasked sum of adaptive-clip bits is %.6g, outside what %d updates "
                    "of 0 or 1 plus the count noise can give (0..%d +/- %g): a client sent "
                    "something else in tensor %r; the DP clip stays %g",
                    masked_sum,
                    count,
                    count,
                    BIT_SUM_SIGMAS * adaptive.count_stddev + BIT_SUM_SLACK,
                    MASKED_BIT_TENSOR,
                    used,
                )
                return kept
            within = masked_sum / count
        else:
            within = noised_within_fraction(within_count, count, adaptive.count_stddev, self.rng)
        self.clip = next_clip(used, within, adaptive.target_quantile, adaptive.lr)
        return kept | {METRIC_CLIP_NEXT: self.clip, METRIC_WITHIN: within}

    def privatize(
        self,
        mean: np.ndarray,
        contributed: int,
        selected: int,
        available: int,
        clip: float | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Noise the unweighted mean of `contributed` updates clipped to `clip` (default: the
        current C); step the accountant.

        Returns the noised mean and the metrics to store with the round.
        """
        cfg = self.config
        if self.noise_on_clients:
            noised = mean  # the clients' noise is already in the sum
            planned = max(selected, contributed)
            z = effective_noise_multiplier(cfg.noise_multiplier, planned, contributed)
        else:
            # Adaptive: the updates carry z_delta, the count the rest of z (fedcore/privacy.py).
            clip = self.clip if clip is None else clip
            std = mean_noise_std(cfg.update_noise_multiplier, clip, contributed)
            noised = add_gaussian_noise(mean, std, self.rng)
            z = cfg.noise_multiplier
        q = sample_rate(max(selected, contributed), available)
        metrics = {METRIC_DELTA: cfg.delta, METRIC_Q: q, METRIC_Z: z}
        if z > 0:
            self.accountant.step(z, q)
            metrics[METRIC_EPSILON] = self.accountant.epsilon(cfg.delta)
        # z == 0: clipping only; no finite ε exists, so none is recorded.
        return noised, metrics


def plausible_bit_sum(masked_sum: float, count: int, count_stddev: float) -> bool:
    """Whether an unmasked sum of `count` adaptive-clip bits (each 0 or 1, plus shares of the
    count noise, whose stddev together is at most `count_stddev`) could come from honest
    clients: within [0, count] widened by BIT_SUM_SIGMAS stddevs (and the fixed-point
    encoding's rounding). Outside, some client masked a value other than 0 or 1."""
    slack = BIT_SUM_SIGMAS * count_stddev + BIT_SUM_SLACK
    return math.isfinite(masked_sum) and -slack <= masked_sum <= count + slack
