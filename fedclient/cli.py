"""`fedclient run`: a federated participant that trains on its own data."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import grpc

from fedclient.check import check_task
from fedclient.diagnose import TaskMistake
from fedclient.flags import add_data_flags, add_device_flags
from fedclient.partition import Partition
from fedclient.retry import Misconfigured, PermanentError, Stopped
from fedclient.session import ClientSession
from fedclient.settings import ClientSettings
from fedcore.codecs import get_codec
from fedcore.config import CliParser, parse_layered, quiet_broken_pipe
from fedcore.device import configure
from fedcore.he import HEError
from fedcore.logs import add_log_flags, setup_logging
from fedcore.malloc import limit_malloc_arenas
from fedcore.plugins import load_object
from fedcore.progress import wanted as progress_wanted
from fedcore.security import SecurityError, TlsFiles, add_tls_arguments
from fedcore.tracking import add_track_arguments, check_targets

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """\
Every flag can also be set as an environment variable (--server -> FEDGRPC_SERVER) or in a
TOML file given with --config (a [client] table). Precedence: flag > environment > file > default.

example:
  fedclient run --server coordinator.example.org:50051 --task examples.digits:task --partition 0/3
  # with mTLS (files from `fedserver certs`; the certificate's name is the client id):
  fedclient run --server coordinator.example.org:50051 --task examples.digits:task \\
      --partition 0/3 --tls-ca certs/ca.crt --tls-cert certs/client-0.crt \\
      --tls-key certs/client-0.key
"""


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="fedclient",
        description="fedgrpc client: pulls the global model, trains on local data, "
        "pushes the update; repeats until the coordinator says training is finished.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="join a federation and train until it finishes",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, help="TOML file with a [client] table of flags")
    run.add_argument("--server", required=True, help="coordinator address HOST:PORT")
    run.add_argument("--task", required=True, help="the model and local data, MODULE:ATTR")
    run.add_argument(
        "--partition",
        default="0/1",
        help="which slice of the task's data this client holds, I/N with 0 <= I < N (0/1)",
    )
    add_data_flags(run)
    add_device_flags(run)
    run.add_argument(
        "--client-id",
        default="",
        help="identity of this client (default: the --tls-cert's name, else HOSTNAME-IofN-pidPID, "
        "unique per process); pin one to rejoin as the same client after a restart",
    )
    run.add_argument("--seed", type=int, default=0, help="seed for partitioning and training (0)")
    run.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; several clients on one host: 1 each (or cores / clients), else "
        "each takes one thread per core and they preempt each other (0 = torch's: one per core)",
    )
    run.add_argument(
        "--give-up-after",
        type=float,
        default=300.0,
        help="seconds of unreachable coordinator before exiting with an error (300)",
    )
    run.add_argument(
        "--poll-seconds",
        type=float,
        default=20.0,
        help="long-poll duration while waiting for a round (20)",
    )
    run.add_argument(
        "--personal-tensors",
        default="",
        metavar="PATTERNS",
        help="FedPer: tensors matching these comma-separated patterns are trained here but "
        "never sent, and keep their local values across rounds (the task's personal_tensors)",
    )
    run.add_argument(
        "--he-key",
        type=Path,
        metavar="FILE",
        help="the shared secret CKKS context (he-secret.ctx from `fedserver he-keygen`); needed "
        "when the coordinator runs --secure he",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where this client keeps what must outlive the process: its SCAFFOLD control "
        "variate (needed when the coordinator runs --strategy scaffold; none by default); "
        "also where a round's base model is kept on disk while the model trains (an unlinked "
        "file the size of the model; default: the temporary folder, $TMPDIR)",
    )
    run.add_argument(
        "--slowdown",
        type=float,
        default=1.0,
        metavar="F",
        help="testing aid: make local training take F times as long by sleeping (F-1) x its "
        "CPU time after each round, to emulate a slow device (1: off)",
    )
    add_log_flags(run)
    add_tls_arguments(run, server=False)
    add_track_arguments(run, "this client's train and evaluation metrics, per round")
    check = sub.add_parser(
        "check",
        help="try a task locally: load a partition, train and evaluate one batch",
        description="Loads the partition, builds the model, trains one batch and evaluates one,\n"
        "as `fedclient run` would, and explains common mistakes with their fix.\n"
        "Exit status 0: the task is ready; 1: it is not (and why); 2: bad arguments.",
        epilog="example:\n  fedclient check --task examples.digits:task --partition 0/3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--config", type=Path, help="TOML file with a [client] table of flags")
    check.add_argument("--task", required=True, help="the model and local data, MODULE:ATTR")
    check.add_argument(
        "--partition", default="0/1", help="the slice of the task's data to try, I/N (0/1)"
    )
    add_data_flags(check)
    check.add_argument("--seed", type=int, default=0, help="seed for partitioning and training")
    add_log_flags(check)
    return parser


def check_main(args: argparse.Namespace) -> int:
    """`fedclient check`: exit 0 with a summary, 1 with the mistake explained, 2 on usage."""
    log = logging.getLogger("fedclient")
    limit_malloc_arenas()  # before gRPC's and torch's threads start
    try:
        partition = Partition.parse(
            args.partition, scheme=args.partitioner, alpha=args.alpha, seed=args.seed
        )
        task = load_object(args.task)
        if args.encoding:
            get_codec(args.encoding)
    except ValueError as e:
        log.error("%s", e)
        return EXIT_USAGE
    try:
        summary = check_task(task, partition, args.seed)
    except TaskMistake as e:
        log.error("task %s is not ready: %s", args.task, e)
        return EXIT_ERROR
    except Exception:
        log.exception("task %s failed (not a mistake we recognise; traceback follows)", args.task)
        return EXIT_ERROR
    print(f"task {args.task} is ready:\n  " + summary.replace("\n", "\n  "))
    return EXIT_OK


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    return quiet_broken_pipe(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parse_layered(parser, argv, "client")
    setup_logging(args.log_level, args.log_format)
    if args.command == "check":
        return check_main(args)
    log = logging.getLogger("fedclient")
    limit_malloc_arenas()  # before gRPC's and torch's threads start
    try:
        partition = Partition.parse(
            args.partition, scheme=args.partitioner, alpha=args.alpha, seed=args.seed
        )
        task = load_object(args.task)
        if not args.slowdown >= 1.0:
            raise ValueError(f"--slowdown must be at least 1, got {args.slowdown}")
        if args.encoding:
            get_codec(args.encoding)  # unknown names are a usage error, before connecting
        placement = configure(task, args.device, args.precision)  # no CUDA for cuda: exit 2
        tls = TlsFiles.from_args(args)
        check_targets(args.track)
        client_id = args.client_id
        if tls is not None and tls.cert is not None:
            if tls.ca is None:
                log.info("no --tls-ca: verifying the coordinator against the system's CAs")
            # With mTLS the certificate is the identity; default --client-id to its name.
            client_id = client_id or tls.certificate_name()
    except (ValueError, SecurityError) as e:
        log.error("%s", e)
        return EXIT_USAGE
    log.info("training on %s (%s)", placement.device, placement.precision)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    settings = ClientSettings(
        server=args.server,
        partition=partition,
        client_id=client_id,
        seed=args.seed,
        poll_seconds=args.poll_seconds,
        give_up_after=args.give_up_after,
        tls=tls,
        token=args.token,
        progress=progress_wanted(args.log_format),
        personal_tensors=args.personal_tensors,
        encoding=args.encoding,
        he_key=args.he_key,
        state_dir=args.state_dir,
        slowdown=args.slowdown,
        task_name=args.task,
        track=tuple(args.track),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        session = ClientSession(settings, task, stop)
    except HEError as e:
        log.error("--he-key: %s", e)
        return EXIT_USAGE
    try:
        return session.run()
    except (KeyboardInterrupt, Stopped):
        stop.set()
        log.info("interrupted: abandoning the current round (nothing partial was counted)")
        return EXIT_INTERRUPTED
    except Misconfigured as e:
        log.error("%s", e)
        return EXIT_USAGE
    except PermanentError as e:
        log.error("%s", e)
        return EXIT_ERROR
    except TaskMistake as e:
        log.error("%s\n  (`fedclient check --task %s` tries the task in seconds)", e, args.task)
        return EXIT_ERROR
    except grpc.RpcError as e:
        log.error("coordinator refused this client (%s): %s", e.code().name, e.details())  # type: ignore[attr-defined]
        return EXIT_ERROR
    finally:
        session.channel.close()
        if session.tracker is not None:
            session.tracker.close()


if __name__ == "__main__":
    sys.exit(main())
