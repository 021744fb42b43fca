"""Client-level differential privacy as a wrapper around any round protocol (--dp-clip).

Like TFF's differential_privacy factory around an inner aggregation factory, or Flower's
DifferentialPrivacyServerSideFixedClipping around a strategy: `DifferentialPrivacy` wraps the
protocol the registry builds, and the coordinator does not know DP exists. The math is in
fedcore/privacy.py; `DPServer` (dp_ledger.py) is the ledger (what clients are told, noise,
ε), called at three points: when a round's config is built (round config extras), when an
update is folded (every client weighs 1 and every update seen in plain is re-clipped to C:
the sensitivity argument needs an unweighted mean of vectors of norm at most C, whatever the
clients did), and when a round closes (noise + accountant step, in a worker thread: Opacus'
ε takes up to 0.5 s).

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
from collections.abc import Iterable, Mapping

import numpy as np

from fedcore.privacy import (
    CLIP_BIT_METRIC,
    DPConfig,
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
from fedserver.protocols.dp_ledger import DPServer

log = logging.getLogger("fedserver")


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
