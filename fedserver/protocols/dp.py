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
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
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
from fedserver.protocols.base import (
    Aggregate,
    Contribution,
    Opening,
    ProtocolEnv,
    ProtocolSettings,
    ProtocolWrapper,
    RoundProtocol,
)

log = logging.getLogger("fedserver")

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

    def check_encoding(self, encoding: str) -> None:
        self.inner.check_encoding(encoding)

    def open(self, opening: Opening) -> None:
        self.inner.open(opening)

    def round_extra(self) -> dict[str, str]:
        return self.ledger.round_extra(len(self.env.selected())) | self.inner.round_extra()

    def accept(self, c: Contribution) -> None:
        """Every client weighs 1; an update seen in plain is re-clipped to C before the fold."""
        scale = self._reclip(c) if self.inner.sees_plain else 1.0
        self.inner.accept(dataclasses.replace(c, weight=1.0, scale=scale))

    def _reclip(self, c: Contribution) -> float:
        """The re-clip factor of an update seen in plain.

        The sensitivity bound, and so the reported ε, must not depend on clients clipping
        honestly: the decoded delta (after fp16/int8/top-k decoding, before the unweighted
        fold) is scaled to norm C here. An update an honest client clipped is within C
        (factor 1.0: nothing multiplied); fp16/int8 rounding may lift it ~1e-5 over C.
        """
        norm, clip = c.staged.norm, self.ledger.config.clip
        factor = self.ledger.reclip_factor(norm)
        if factor < 1.0:
            # fp16/int8 rounding can lift an honestly clipped update a hair over C: not news.
            clear = norm is not None and norm > 1.001 * clip
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
        agg = await self.inner.aggregate()
        # Off the event loop: the noise is O(model) and Opacus' ε takes up to 0.5 s.
        mean, metrics = await asyncio.to_thread(
            self.ledger.privatize, agg.mean, agg.count, expected, drawn_from
        )
        return dataclasses.replace(agg, mean=mean, metrics=agg.metrics | metrics)

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
