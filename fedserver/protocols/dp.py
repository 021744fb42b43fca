"""Client-level differential privacy as a wrapper around any round protocol (--dp-clip).

Like TFF's differential_privacy factory around an inner aggregation factory, or Flower's
DifferentialPrivacyServerSideFixedClipping around a strategy: `DifferentialPrivacy` wraps the
protocol the registry builds, and the coordinator does not know DP exists. The math is in
fedcore/privacy.py; `DPServer` is the ledger (what clients are told, noise, ε), called at
three points: when a round's config is built (round config extras), when an update is folded
(every client weighs 1 and every update seen in plain is re-clipped to C: the sensitivity
argument needs an unweighted mean of vectors of norm at most C, whatever the clients did), and
when a round closes (noise + accountant step, in a worker thread: Opacus' ε takes up to 0.5 s).

A protocol says where noise goes (`RoundProtocol.noise`): "server" (plain, buffered async) and
the wrapper noises the mean; "clients" (secagg, he: the coordinator or a key holder sees only
sums) and each client adds its share; None and the wrapper refuses it (`DPWrapper.refuse`).

Adaptive clipping (--dp-adaptive-clip, Andrew et al. 2021; math in fedcore/privacy.py): the
ledger's clip C_t changes every round. "server": clients send unclipped updates and the
coordinator counts b_i = [norm <= C_t] from the norm it measured; "client": clients clip at the
C_t of their round config and report b_i as update metric CLIP_BIT_METRIC (the coordinator
still re-clips). Either way the round's noised count moves C_t when the round closes, and the
round records the clip it used (METRIC_CLIP) and the next one (METRIC_CLIP_NEXT, what a resumed
coordinator starts from). Under secagg/he a metric would show the coordinator each client's
bit, so there ("client" only) the bit and its share of the count noise travel inside the masked
or encrypted update as its last value (fedcore/privacy.py MASKED_BIT_TENSOR,
`DPWrapper.exchanged`) and the wrapper splits the aggregate mean; "server" needs norms the
coordinator never sees there, so it is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
    with_masked_bit,
)
from fedcore.tensors import Manifest
from fedserver.protocols.base import (
    Aggregate,
    Contribution,
    Opening,
    ProtocolEnv,
    ProtocolSettings,
    ProtocolWrapper,
    RoundProtocol,
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


class DPWrapper(ProtocolWrapper):
    """--dp-clip as the registry applies it: refuse, build the inner protocol unweighted, wrap."""

    def __init__(self, config: DPConfig, seed: int | None = None) -> None:
        self.config = config
        self.seed = seed  # fixed DP noise for reproducible tests; None = OS entropy

    def refuse(self, protocol: type[RoundProtocol], settings: ProtocolSettings) -> str | None:
        if protocol.noise is None:
            return (
                f"--dp-clip cannot be combined with round protocol {settings.name!r}: it "
                "declares no place for the noise (RoundProtocol.noise)"
            )
        adaptive = self.config.adaptive
        if adaptive is not None and adaptive.side == "server" and protocol.noise != "server":
            # (Client side is sound there: the bit is summed inside the update, `masks_bit`.)
            return (
                f"--dp-adaptive-clip server cannot be combined with --secure {settings.name}: "
                "the coordinator sees no update's norm there; use --dp-adaptive-clip client "
                "(each client's bit is summed inside the masked or encrypted update) or "
                "--dp-clip C (a fixed clip)"
            )
        if settings.keep_updates:
            # They read individual updates: that bypasses noise added to the mean.
            return (
                "a strategy that reads every individual update (median, trimmed mean, Krum) "
                "cannot be combined with --dp-clip, whose noise covers only the mean; use "
                "fedavg, fedprox, fedavgm or a FedOpt strategy"
            )
        if settings.partial_rounds:
            return (
                "--train-tensors cannot be combined with --dp-clip: its noise covers the whole "
                "model, so every round must train every tensor"
            )
        return None

    def masks_bit(self, protocol: type[RoundProtocol]) -> bool:
        """Whether adaptive clipping's bit travels inside the (masked) update: client side,
        with secure aggregation or HE (wherever clients add the noise)."""
        adaptive = self.config.adaptive
        client_side = adaptive is not None and adaptive.side == "client"
        return client_side and protocol.noise == "clients"

    def exchanged(self, protocol: type[RoundProtocol], floats: Manifest) -> Manifest:
        return with_masked_bit(floats) if self.masks_bit(protocol) else floats

    def inner_settings(self, settings: ProtocolSettings) -> ProtocolSettings:
        # DP-FedAvg bounds each client's influence only for an unweighted mean.
        return dataclasses.replace(settings, unweighted=True)

    def wrap(self, inner: RoundProtocol, env: ProtocolEnv) -> RoundProtocol:
        return DifferentialPrivacy(inner, env, self.config, self.seed)


class DifferentialPrivacy(RoundProtocol):
    """Client-level DP around a protocol that declares where the noise goes."""

    # Noise and ε cover the whole model: a partial update (personal tensors) is refused.
    partial_updates = False

    def __init__(
        self, inner: RoundProtocol, env: ProtocolEnv, config: DPConfig, seed: int | None
    ) -> None:
        if inner.noise is None:  # the registry refuses it first (DPWrapper.refuse)
            raise ValueError(f"--dp-clip cannot be combined with {type(inner).__name__}")
        self.inner = inner
        self.env = env
        # --secure secagg/he: noise on the clients, so neither the coordinator nor a key
        # holder ever sees a sum without it.
        self.ledger = DPServer(config, noise_on_clients=inner.noise == "clients", seed=seed)
        self.encoding = inner.encoding  # the inner protocol's wire encoding, per instance
        self.needs_norm = inner.sees_plain  # what is seen in plain is re-clipped by its norm
        client_bits = config.adaptive is not None and config.adaptive.side == "client"
        # Secagg/he: the bit is the last value of every masked update (DPWrapper.exchanged).
        self.masked_bit = client_bits and inner.noise == "clients"
        self.private_metrics = inner.private_metrics | ({CLIP_BIT_METRIC} if client_bits else set())

    def check_encoding(self, encoding: str) -> None:
        self.inner.check_encoding(encoding)

    def check_metrics(self, metrics: Mapping[str, float]) -> None:
        """The client's clip bit, when it reports one in plain: refused at the header, before a
        model's worth of bytes is read (accept checks it again)."""
        adaptive = self.ledger.config.adaptive
        if adaptive is not None and adaptive.side == "client" and not self.masked_bit:
            self.ledger.clip_bit(None, metrics)
        self.inner.check_metrics(metrics)

    def round_extra(self) -> dict[str, str]:
        return self.ledger.round_extra(len(self.env.selected())) | self.inner.round_extra()

    def open(self, opening: Opening) -> None:
        if opening.fresh:
            self.ledger.within = 0  # a re-opened round keeps what it counted
        self.inner.open(opening)

    def accept(self, c: Contribution) -> None:
        """Every client weighs 1; an update seen in plain is re-clipped to C before the fold."""
        adaptive = self.ledger.config.adaptive is not None and not self.masked_bit
        bit = self.ledger.clip_bit(c.staged.norm, c.metrics) if adaptive else False
        scale = self._reclip(c) if self.inner.sees_plain else 1.0
        self.inner.accept(dataclasses.replace(c, weight=1.0, scale=scale))
        self.ledger.within += bit  # counted once the update is

    def _reclip(self, c: Contribution) -> float:
        """The re-clip factor of an update seen in plain.

        The sensitivity bound, and so the reported ε, must not depend on clients clipping
        honestly: the decoded delta (after fp16/int8/top-k decoding, before the unweighted
        fold) is scaled to norm C here. An update an honest client clipped is within C
        (factor 1.0: nothing multiplied); fp16/int8 rounding may lift it ~1e-5 over C.
        """
        norm, clip = c.staged.norm, self.ledger.clip
        factor = self.ledger.reclip_factor(norm)
        if factor < 1.0:
            # fp16/int8 rounding can lift an honestly clipped update a hair over C: not news.
            # Adaptive server-side clipping clips about half of all updates by design.
            server_side = (
                self.ledger.config.adaptive and self.ledger.config.adaptive.side == "server"
            )
            clear = norm is not None and norm > 1.001 * clip and not server_side
            log.log(
                logging.INFO if clear else logging.DEBUG,
                "round %d: update from %s has L2 norm %.6g > --dp-clip %g; clipped by the "
                "coordinator (factor %.6g)",
                c.round,
                c.client_id,
                norm,
                clip,
                factor,
            )
        return factor

    def can_close(self) -> bool:
        return self.inner.can_close()

    async def aggregate(self) -> Aggregate:
        """The inner aggregate, noised (or not: clients did) and accounted off the event loop."""
        # Read before awaiting: the round's population as it closed.
        expected, drawn_from = self.env.expected_updates(), self.env.drawn_from()
        clip = self.ledger.clip  # what this round's updates were clipped to
        agg = await self.inner.aggregate()
        masked_sum = None
        if self.masked_bit:
            # The unmasked (decrypted) mean is sum / total weight, and every weight is 1
            # (unweighted): so mean x weight is the sum of exactly the counted clients' bits
            # (and their noise shares).
            masked_sum = float(np.float64(agg.mean[-1]) * agg.weight)
            agg = dataclasses.replace(agg, mean=agg.mean[:-1])
        # Adaptive: C_{t+1} before the next round can open (its updates are clipped to it).
        adapted = self.ledger.adapt(agg.count, masked_sum)
        # Off the event loop: the noise is O(model) and Opacus' ε takes up to 0.5 s.
        mean, metrics = await asyncio.to_thread(
            self.ledger.privatize, agg.mean, agg.count, expected, drawn_from, clip
        )
        return dataclasses.replace(agg, mean=mean, metrics=agg.metrics | adapted | metrics)

    def release(self) -> None:
        self.inner.release()

    def decryption_for(self, client_id: str) -> int:
        return self.inner.decryption_for(client_id)

    def stage(self, kind: str) -> object | None:
        return self.inner.stage(kind)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return self.inner.state_arrays()

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.inner.load_state_arrays(arrays)

    def resume(self, past_metrics: Iterable[Mapping[str, float]]) -> None:
        """Rebuild the accountant from the committed rounds, so ε continues exactly."""
        past = list(past_metrics)
        self.ledger.resume(past)
        self.inner.resume(past)
