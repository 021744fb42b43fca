"""`fedserver run`: the coordinator daemon's flags and how they become its settings
(CoordinatorSettings, wrapped in the daemon's ServeSettings).

Every flag here can also come from FEDGRPC_* or the [server] table of --config
(fedcore/config.py); bad combinations are refused before the state dir is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from fedcore.config import positive_int
from fedcore.logs import add_log_flags, setup_logging
from fedcore.progress import wanted as progress_wanted
from fedcore.security import SecurityError, TlsFiles, add_tls_arguments
from fedserver.commands.privacy_flags import add_dp_flags, dp_config
from fedserver.coordinator.assembly import EXIT_USAGE, CoordinatorSettings, SetupError
from fedserver.coordinator.offers import TrainingDefaults
from fedserver.coordinator.tracking import add_track_flags, track_settings
from fedserver.modes.registry import add_mode_flags, mode_from_args
from fedserver.protocols.registry import SECURE_CHOICES
from fedserver.rounds.eval_campaign import EvalPolicy
from fedserver.rounds.synchronous import RoundPolicy
from fedserver.strategies import STRATEGIES
from fedserver.transport.limits import add_limit_arguments, limits_from_args
from fedserver.transport.server import ServeSettings, serve
from fedserver.updates.receiver import MAX_UPDATE_VALUE


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_command(sub: argparse._SubParsersAction, epilog: str) -> None:  # type: ignore[type-arg]
    run = sub.add_parser(
        "run",
        help="run the coordinator daemon (resumes if --state-dir holds a run)",
        description="Run the coordinator until all rounds are done. Ctrl-C or SIGTERM stops it "
        "cleanly; starting it again with the same --state-dir resumes at the next round.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, help="TOML file with a [server] table of flags")
    run.add_argument("--task", required=True, help="the model and held-out data, MODULE:ATTR")
    run.add_argument("--rounds", type=positive_int, default=20, help="rounds to train (20)")
    run.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (127.0.0.1; 0.0.0.0 for all interfaces)",
    )
    run.add_argument("--port", type=int, default=50051, help="port to listen on (50051)")
    run.add_argument(
        "--state-dir",
        type=Path,
        default=Path("state"),
        help="checkpoints, model and history live here (./state)",
    )
    run.add_argument(
        "--min-clients",
        type=positive_int,
        default=2,
        help="live clients needed before a round opens (2)",
    )
    run.add_argument(
        "--fraction-fit",
        type=float,
        default=1.0,
        help="fraction of live clients selected per round (1.0)",
    )
    run.add_argument(
        "--clients-per-round",
        type=positive_int,
        default=None,
        help="exact number of clients per round (overrides --fraction-fit)",
    )
    run.add_argument(
        "--min-fit",
        type=positive_int,
        default=None,
        help="updates needed to close a round at its deadline (default: --min-clients)",
    )
    run.add_argument(
        "--overselect",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="select FACTOR times the clients a round needs (--clients-per-round or "
        "--fraction-fit) and close it as soon as that many updates are in; the stragglers' "
        "late updates are refused as stale (1.0: wait for every selected client)",
    )
    run.add_argument(
        "--round-timeout",
        type=_positive_float,
        default=120.0,
        help="seconds a round stays open; under --mode async, the lease: how long a client may "
        "train between its pull and its submit (120)",
    )
    run.add_argument(
        "--client-timeout",
        type=_positive_float,
        default=90.0,
        metavar="SECONDS",
        help="a client not heard from this long is no longer live: not selected, and a round "
        "stops waiting for it; clients send a heartbeat every third of it while training (90)",
    )
    run.add_argument(
        "--max-attempts",
        type=positive_int,
        default=5,
        help="times a round is re-opened without quorum before giving up (5)",
    )
    run.add_argument(
        "--local-epochs",
        type=positive_int,
        help="local epochs per round on each client (default: the task's)",
    )
    run.add_argument("--lr", type=_positive_float, help="client learning rate (the task's)")
    run.add_argument("--batch-size", type=positive_int, help="client batch size (the task's)")
    add_mode_flags(run)  # --mode and each mode's own flags (fedserver/modes)
    run.add_argument(
        "--train-tensors",
        default="",
        metavar="PATTERNS",
        help="train and send only the float tensors matching these comma-separated patterns, "
        "e.g. '2.*'; groups separated by ';' rotate round by round, e.g. '0.*;2.*' (all)",
    )
    run.add_argument(
        "--gradient-batch",
        type=int,
        default=0,
        help="fedsgd: examples per client gradient, a random batch; 0 = the whole partition (0)",
    )
    run.add_argument(
        "--strategy",
        default="fedavg",
        choices=sorted(STRATEGIES),
        help="aggregation strategy (fedavg)",
    )
    _add_strategy_flags(run)
    run.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="federated evaluation: clients score the model every K rounds and after the "
        "last one, on their local test data (0 = off)",
    )
    run.add_argument(
        "--fraction-evaluate",
        type=float,
        default=1.0,
        help="fraction of live clients asked to evaluate (1.0)",
    )
    run.add_argument(
        "--seed", type=int, default=0, help="seed for the initial model and sampling (0)"
    )
    run.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="where the coordinator evaluates the global model on the task's held-out data: "
        "cpu, auto (CUDA when available, else MPS, else CPU), cuda, cuda:N or mps (cpu)",
    )
    run.add_argument(
        "--linger",
        type=float,
        default=15.0,
        help="seconds to keep serving after the last round so clients hear it (15)",
    )
    run.add_argument(
        "--max-update-bytes",
        type=positive_int,
        default=4 << 30,
        help="largest update accepted, in bytes (4 GiB)",
    )
    run.add_argument(
        "--max-update-value",
        type=_positive_float,
        default=MAX_UPDATE_VALUE,
        help="largest absolute value an update seen in plain may carry; beyond it the update "
        "is refused (INVALID_ARGUMENT out_of_range), so no finite value can overflow the "
        f"float32 aggregate to inf ({MAX_UPDATE_VALUE:g})",
    )
    add_dp_flags(run, _positive_float)
    run.add_argument(
        "--secure",
        default="none",
        choices=SECURE_CHOICES,
        help="secure aggregation: 'none' = the coordinator sees each update; 'secagg' = it "
        "only sees masked updates, whose sum is the plain sum; 'he' = only CKKS ciphertexts, "
        "summed without the secret key (needs --he-public-key) (none)",
    )
    run.add_argument(
        "--he-public-key",
        type=Path,
        metavar="FILE",
        help="--secure he: the public CKKS context he-public.ctx from `fedserver he-keygen` "
        "(never the secret one)",
    )
    run.add_argument(
        "--encrypt-state",
        type=Path,
        metavar="KEYFILE",
        help="encrypt checkpoints and the model at rest with this AES-256-GCM key file "
        "(make one with `fedserver keygen`); resuming needs the same key",
    )
    run.add_argument(
        "--secagg-stage-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds each secure-aggregation stage waits for slow clients (30)",
    )
    add_limit_arguments(run, positive_int, _positive_float)
    add_log_flags(
        run, "least severe log lines shown; debug adds one line per update and per Join (info)"
    )
    add_tls_arguments(run, server=True)
    add_track_flags(run, _positive_float)
    run.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (off)",
    )
    run.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address for --metrics-port (127.0.0.1; 0.0.0.0 to let a scraper in)",
    )
    run.add_argument(
        "--tokens",
        type=Path,
        help="require bearer tokens from this file (made by `fedserver tokens add`)",
    )
    run.set_defaults(handler=run_coordinator)


# (flag, type, help); unset flags keep the strategy's own default (docs/algorithms.md).
STRATEGY_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("proximal-mu", float, "fedprox: proximal term strength mu (0.01)"),
    (
        "server-lr",
        float,
        "server learning rate eta (1.0 for fedavg, fedprox, fedavgm; 0.03 "
        "for fedadam, fedyogi; 0.1 for fedadagrad)",
    ),
    ("server-momentum", float, "fedavgm: server momentum beta (0.9)"),
    ("beta1", float, "fedadam/fedyogi/fedadagrad: first-moment decay (0.9)"),
    ("beta2", float, "fedadam/fedyogi: second-moment decay (0.99)"),
    ("tau", float, "fedadam/fedyogi/fedadagrad: adaptivity epsilon tau (1e-3)"),
    ("trim-fraction", float, "trimmed_mean: fraction cut at each end per coordinate (0.2)"),
    ("krum-byzantine", int, "krum: number f of Byzantine clients tolerated (1)"),
    ("multi-krum-m", int, "krum: updates averaged; 1 = Krum, >1 = Multi-Krum (1)"),
    (
        "bulyan-byzantine",
        int,
        "bulyan: number f of Byzantine clients tolerated; every round needs at least 4f + 3 "
        "updates, so --min-clients/--min-fit must allow it (1)",
    ),
    (
        "bulyan-selection",
        str,
        "bulyan: krum (repeated Krum, the paper's and Flower's legacy Bulyan) or multikrum "
        "(Krum scores once, Flower's Message-API Bulyan) (krum)",
    ),
    (
        "q-param",
        float,
        "qfedavg: fairness q; 0 = unweighted mean, larger favours high-loss clients (0.2)",
    ),
    (
        "qffl-learning-rate",
        float,
        "qfedavg: the clients' learning rate, 1/L for the Lipschitz estimate L (0.1)",
    ),
    (
        "qffl-loss-metric",
        str,
        "qfedavg: the client metric used as its loss F_k: loss_before_training (the received "
        "model on the client's training data, an extra pass; the paper's) or e.g. train_loss "
        "(Flower's default) (loss_before_training)",
    ),
)


def _add_strategy_flags(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("strategy parameters (see docs/algorithms.md)")
    for flag, kind, text in STRATEGY_FLAGS:
        group.add_argument(f"--{flag}", type=kind, default=None, help=text)


def strategy_params(args: argparse.Namespace) -> dict[str, float | str]:
    """The strategy flags the operator actually set (file, environment or command line)."""
    names = (flag.replace("-", "_") for flag, _, _ in STRATEGY_FLAGS)
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def server_settings(args: argparse.Namespace) -> CoordinatorSettings:
    """The coordinator's settings from run's flags (shared with `simulate`; ValueError: usage)."""
    policy = RoundPolicy(
        total_rounds=args.rounds,
        min_clients=args.min_clients,
        fraction_fit=args.fraction_fit,
        clients_per_round=args.clients_per_round,
        min_fit=args.min_fit,
        round_timeout=args.round_timeout,
        max_attempts=args.max_attempts,
        client_ttl=args.client_timeout,
        overselect=args.overselect,
    )
    if args.gradient_batch < 0:
        raise ValueError(f"--gradient-batch must be >= 0, got {args.gradient_batch}")
    mode = mode_from_args(args)
    if policy.overselect > 1.0 and (mode.name == "async" or args.secure != "none"):
        raise ValueError(
            "--overselect closes synchronous rounds on their first arrivals; it does not apply "
            f"to --mode async (no rounds to close) nor to --secure {args.secure} (a masked or "
            "encrypted round needs its survivors to finish it)"
            if args.secure != "none"
            else "--overselect closes synchronous rounds on their first arrivals; --mode async "
            "has no rounds to close (its buffers already take whoever finishes first)"
        )
    defaults = TrainingDefaults(  # None: the task's
        args.local_epochs,
        args.lr,
        args.batch_size,
        mode=mode.client_update,  # what clients compute (async: FedAvg deltas)
        gradient_batch=args.gradient_batch,
        train_tensors=args.train_tensors,
    )
    dp = dp_config(args, mode, policy)  # ValueError: usage
    return CoordinatorSettings(
        task=args.task,
        state_dir=args.state_dir,
        policy=policy,
        defaults=defaults,
        strategy=args.strategy,
        strategy_params=strategy_params(args),
        eval_policy=EvalPolicy(args.eval_every, args.fraction_evaluate),
        seed=args.seed,
        device=args.device,
        max_update_bytes=args.max_update_bytes,
        max_update_value=args.max_update_value,
        dp=dp,
        secure=args.secure,
        he_public_key=args.he_public_key,
        encrypt_state=args.encrypt_state,
        secagg_stage_timeout=args.secagg_stage_timeout,
        mode=mode,
        track=track_settings(args),
    )


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The daemon's settings: the coordinator's, plus the network's (ValueError: usage)."""
    coordinator = server_settings(args)
    call_queue, downloads = limits_from_args(args)
    return ServeSettings(
        coordinator,
        host=args.host,
        port=args.port,
        linger=args.linger,
        tls=TlsFiles.from_args(args),
        tokens_file=args.tokens,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        progress=progress_wanted(args.log_format),
        call_queue=call_queue,
        downloads=downloads,
    )


def run_coordinator(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    try:
        return asyncio.run(serve(serve_settings(args)))
    except (SetupError, SecurityError, ValueError) as e:
        logging.getLogger("fedserver").error("%s", e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
