"""`make demo-multihost`: the coordinator and each client on its own "host" (network namespace).

Builds a private LAN on this machine out of Linux network namespaces: one namespace holds a
bridge (the switch), and the coordinator and every client get a namespace of their own with one
veth "cable" into it and their own address (10.77.0.1 for the coordinator, .11, .12, ... for
clients). Nothing is added to the machine's own network namespace. Certificates come from
`fedserver certs` for the coordinator's address, and the whole federation runs with mTLS, as it
would across real machines. Needs root (CAP_NET_ADMIN) and the `ip` tool; says why otherwise.
Namespaces are removed at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "10.77.0"
COORDINATOR_IP = f"{SUBNET}.1"
PORT = 50051
TASK = "examples.digits:task"


class NetnsError(RuntimeError):
    pass


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


class Lan:
    """A bridge in its own namespace, and one namespace per host plugged into it."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.switch = f"{tag}-lan"
        self.hosts: list[str] = []

    def __enter__(self) -> Lan:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def add_host(self, name: str, address: str) -> str:
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        self.hosts.append(ns)
        port = f"p{len(self.hosts)}"  # the switch side of the cable
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns)  # fmt: skip
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def __exit__(self, *exc: object) -> None:
        # Deleting a namespace deletes its end of each cable, and with it the other end.
        for ns in [*self.hosts, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _preflight() -> None:
    if shutil.which("ip") is None:
        raise NetnsError("the `ip` tool (iproute2) is not installed")
    if os.geteuid() != 0:
        raise NetnsError(
            "network namespaces need root (CAP_NET_ADMIN): run `sudo make demo-multihost`, "
            "or see docs/deploy.md to use real machines"
        )


def _fed(ns: str, module: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", module, *args],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    _preflight()
    work = args.dir
    if work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    certs = work / "certs"
    subprocess.run(
        [sys.executable, "-m", "fedserver.cli", "certs", "--out", str(certs), "--server-name",
         COORDINATOR_IP, "--clients", str(args.clients)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    with Lan(f"fg{os.getpid()}") as lan:
        try:
            coord_ns = lan.add_host("coord", COORDINATOR_IP)
            client_ns = [lan.add_host(f"c{i}", f"{SUBNET}.{11 + i}") for i in range(args.clients)]
            print(f"multihost: coordinator in netns {coord_ns} at {COORDINATOR_IP}:{PORT}")
            for i, ns in enumerate(client_ns):
                print(f"multihost: client-{i} in netns {ns} at {SUBNET}.{11 + i}")
            server = _fed(
                coord_ns, "fedserver.cli", "run", "--task", TASK, "--host", COORDINATOR_IP,
                "--port", str(PORT), "--rounds", str(args.rounds),
                "--min-clients", str(args.clients), "--state-dir", str(work / "state"),
                "--linger", "10", "--tls-cert", str(certs / "server.crt"),
                "--tls-key", str(certs / "server.key"), "--tls-ca", str(certs / "ca.crt"),
                log=work / "logs" / "coordinator.log",
            )  # fmt: skip
            procs.append(server)
            for i, ns in enumerate(client_ns):
                client = [
                    "run", "--server", f"{COORDINATOR_IP}:{PORT}", "--task", TASK,
                    "--partition", f"{i}/{args.clients}", "--client-id", f"client-{i}",
                    "--threads", "1", "--tls-ca", str(certs / "ca.crt"),
                    "--tls-cert", str(certs / f"client-{i}.crt"),
                    "--tls-key", str(certs / f"client-{i}.key"),
                ]  # fmt: skip
                log = work / "logs" / f"client-{i}.log"
                procs.append(_fed(ns, "fedclient.cli", *client, log=log))
            codes = [p.wait(timeout=args.timeout) for p in procs[1:]]
            server_code = server.wait(timeout=60)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    log = (work / "logs" / "coordinator.log").read_text(errors="replace")
    for line in log.splitlines():
        if any(w in line for w in ("joined", "security:", "closed:", "finished", "ERROR")):
            print("  " + line)
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "fedserver.cli", "status", "--state-dir", str(work / "state"),
             "--json"],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    rounds = status["rounds"]
    accuracy = rounds[-1]["metrics"].get("accuracy", 0.0) if rounds else 0.0
    print(
        f"multihost: {status['rounds_completed']}/{args.rounds} rounds over mTLS across "
        f"{args.clients + 1} network namespaces in {time.monotonic() - started:.1f}s; "
        f"final accuracy {accuracy:.4f}; logs in {work}/logs"
    )
    if server_code != 0 or any(codes) or status["rounds_completed"] != args.rounds:
        print(f"multihost: FAILED: coordinator exit {server_code}, clients {codes}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dir", type=Path, default=Path("multihost-demo"))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the clients")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except NetnsError as e:
        print(f"demo-multihost: cannot build the namespaces: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
