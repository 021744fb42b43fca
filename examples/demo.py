"""`make demo`: a coordinator and three client processes train digits on this machine.

The coordinator's progress is shown live; each client's log goes to demo-state/logs/. The state
dir is left behind for `fedserver status --state-dir demo-state` and inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedcore.durable import open_private, private_dir

TARGET = 0.95


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], log: Path | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = open_private(log) if log else None  # handed to the child process
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=out if out else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--partitioner", default="iid", help="iid, dirichlet, shards, quantity")
    parser.add_argument("--state-dir", type=Path, default=Path("demo-state"))
    args = parser.parse_args()

    if args.state_dir.exists():
        print(f"demo: removing the previous run in {args.state_dir}/")
        shutil.rmtree(args.state_dir)
    logs = args.state_dir / "logs"
    # Owner-only like everything else in a state dir (docs/security.md), whatever the umask.
    private_dir(args.state_dir)
    private_dir(logs)
    port = _free_port()
    task = "examples.digits:task"
    started = time.monotonic()
    print(
        f"demo: coordinator on 127.0.0.1:{port}, {args.clients} clients, {args.rounds} rounds "
        f"of FedAvg on scikit-learn digits ({args.partitioner} partitions)"
    )
    server = _spawn(
        ["-m", "fedserver.cli", "run", "--task", task, "--port", str(port),
         "--rounds", str(args.rounds), "--min-clients", str(args.clients),
         "--state-dir", str(args.state_dir), "--linger", "10"],
        None,
    )  # fmt: skip
    clients = [
        _spawn(
            [
                "-m",
                "fedclient.cli",
                "run",
                "--server",
                f"127.0.0.1:{port}",
                "--task",
                task,
                "--partition",
                f"{i}/{args.clients}",
                "--partitioner",
                args.partitioner,
                "--client-id",
                f"demo-client-{i}",
                "--threads",
                "1",
            ],
            logs / f"client-{i}.log",
        )
        for i in range(args.clients)
    ]
    try:
        assert server.stdout is not None
        with open_private(logs / "coordinator.log") as server_log:
            for line in server.stdout:
                server_log.write(line)
                text = line.decode(errors="replace").rstrip()
                if any(w in text for w in ("closed:", "listening", "finished", "ERROR", "joined")):
                    print("  " + text)
        server_code = server.wait()
        client_codes = [c.wait(timeout=60) for c in clients]
    except KeyboardInterrupt:
        print("\ndemo: interrupted; stopping the coordinator and clients")
        for p in [server, *clients]:
            p.send_signal(signal.SIGINT)
        for p in [server, *clients]:
            p.wait(timeout=30)
        return 130

    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "fedserver.cli", "status", "--state-dir",
             str(args.state_dir), "--json"],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    accuracy = status["rounds"][-1]["metrics"].get("accuracy", 0.0) if status["rounds"] else 0.0
    elapsed = time.monotonic() - started
    print(
        f"demo: {status['rounds_completed']} rounds in {elapsed:.1f}s; "
        f"final test accuracy: {accuracy:.4f} (target {TARGET})"
    )
    print(f"demo: state, checkpoints and logs are in {args.state_dir}/")
    if server_code != 0 or any(client_codes):
        print(f"demo: FAILED: coordinator exit {server_code}, clients {client_codes}")
        return 1
    return 0 if accuracy >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
