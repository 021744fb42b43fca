"""`fedserver run`'s differential-privacy flags (shared with `simulate`) and the DPConfig they
make: --dp-clip (fixed clip) or --dp-adaptive-clip (Andrew et al. 2021) with their parameters.
The math is fedcore/privacy.py's; the wrapper that applies it is fedserver/protocols/dp.py."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from fedcore.privacy import (
    CLIP_LR,
    COUNT_STDDEV_DIVISOR,
    INITIAL_CLIP,
    TARGET_QUANTILE,
    AdaptiveClip,
    DPConfig,
)
from fedserver.modes.base import RoundMode
from fedserver.rounds.synchronous import RoundPolicy


def add_dp_flags(run: argparse.ArgumentParser, positive_float: Callable[[str], float]) -> None:
    dp = run.add_argument_group(
        "differential privacy (client-level DP-FedAvg; see docs/algorithms.md)"
    )
    dp.add_argument(
        "--dp-clip",
        type=positive_float,
        default=None,
        help="clip each client's update to this L2 norm C; turns DP on (off)",
    )
    dp.add_argument(
        "--dp-noise-multiplier",
        type=float,
        default=1.0,
        help="Gaussian noise multiplier z: noise std z*C on the sum of updates (1.0)",
    )
    dp.add_argument(
        "--dp-delta", type=float, default=1e-5, help="delta at which epsilon is reported (1e-5)"
    )
    dp.add_argument(
        "--dp-adaptive-clip",
        choices=("server", "client"),
        default=None,
        help="instead of --dp-clip: the clip follows a quantile of the update norms (Andrew et "
        "al. 2021); 'server' = clients send unclipped updates and the coordinator clips and "
        "counts (not with --secure), 'client' = clients clip and report whether they had to "
        "(under --secure: inside the masked or encrypted update); "
        "turns DP on, --dp-noise-multiplier is then the combined z (off)",
    )
    for flag, text in ADAPTIVE_FLAGS:
        dp.add_argument(f"--{flag}", type=_non_negative_float, default=None, help=text)


# --dp-adaptive-clip's parameters (None: unset, so one set without it is refused).
ADAPTIVE_FLAGS: tuple[tuple[str, str], ...] = (
    ("dp-initial-clip", f"--dp-adaptive-clip: the first round's clip C0 ({INITIAL_CLIP})"),
    (
        "dp-target-quantile",
        "--dp-adaptive-clip: fraction gamma of updates whose norm should be within the clip "
        f"({TARGET_QUANTILE}: the median)",
    ),
    ("dp-clip-lr", f"--dp-adaptive-clip: geometric learning rate eta_C of the clip ({CLIP_LR})"),
    (
        "dp-clipped-count-stddev",
        "--dp-adaptive-clip: noise std sigma_b on each round's count of updates within the "
        f"clip; must exceed z/2 (clients per round / {COUNT_STDDEV_DIVISOR}: --clients-per-round, "
        "else --min-clients; --buffer-size under --mode async)",
    ),
)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def dp_config(args: argparse.Namespace, mode: RoundMode, policy: RoundPolicy) -> DPConfig | None:
    """--dp-clip or --dp-adaptive-clip and their parameters (ValueError: usage)."""
    given = [f for f, _ in ADAPTIVE_FLAGS if getattr(args, f.replace("-", "_")) is not None]
    if args.dp_adaptive_clip is None:
        if given:
            raise ValueError(f"--{given[0]} is for --dp-adaptive-clip, which is not set")
        if args.dp_clip is None:
            return None
        return DPConfig(args.dp_clip, args.dp_noise_multiplier, args.dp_delta)
    if args.dp_clip is not None:
        raise ValueError(
            "--dp-clip (a fixed clip) and --dp-adaptive-clip cannot both be set; choose one "
            "(--dp-initial-clip is adaptive clipping's first clip)"
        )
    stddev = args.dp_clipped_count_stddev
    if stddev is None:
        stddev = (
            mode.updates_per_round(policy) / COUNT_STDDEV_DIVISOR
            if args.dp_noise_multiplier
            else 0.0
        )
    adaptive = AdaptiveClip(
        args.dp_adaptive_clip,
        stddev,
        TARGET_QUANTILE if args.dp_target_quantile is None else args.dp_target_quantile,
        CLIP_LR if args.dp_clip_lr is None else args.dp_clip_lr,
    )
    initial = INITIAL_CLIP if args.dp_initial_clip is None else args.dp_initial_clip
    return DPConfig(initial, args.dp_noise_multiplier, args.dp_delta, adaptive)
