"""Prometheus metrics of one coordinator (`fedserver run --metrics-port`).

Each Coordinator owns a registry (not the process-global one), so tests can run several in one
process. Event counters are bumped by the coordinator where the event happens; gauges that
describe the current state (round, live clients, updates received) are read at scrape time.
The HTTP endpoint is plaintext and unauthenticated, like most exporters: it binds to
--metrics-host (127.0.0.1 by default) and carries counts and durations, never model data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

ROUND_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STALENESS_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50)
AGGREGATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds_completed = Counter(
            "fedgrpc_rounds_completed", "Rounds aggregated and committed", registry=r
        )
        self.round_participants = Gauge(
            "fedgrpc_round_participants", "Updates folded into the last completed round", registry=r
        )
        self.updates_accepted = Counter(
            "fedgrpc_updates_accepted", "Updates counted into a round", registry=r
        )
        self.updates_rejected = Counter(
            "fedgrpc_updates_rejected", "Updates refused, by reason", ["reason"], registry=r
        )
        self.auth_refused = Counter(
            "fedgrpc_auth_refused", "Calls refused by authentication/authorization",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self.update_staleness = Histogram(
            "fedgrpc_update_staleness", "Versions published between an update's base model "
            "and the round it was counted in (always 0 in synchronous rounds)",
            buckets=STALENESS_BUCKETS, registry=r,
        )  # fmt: skip
        self.bytes_received = Counter(
            "fedgrpc_update_bytes_received", "Update payload bytes received", registry=r
        )
        self.bytes_sent = Counter("fedgrpc_model_bytes_sent", "Model bytes streamed", registry=r)
        self.round_duration = Histogram(
            "fedgrpc_round_duration_seconds", "Round open to committed",
            buckets=ROUND_BUCKETS, registry=r,
        )  # fmt: skip
        self.aggregation_duration = Histogram(
            "fedgrpc_aggregation_duration_seconds", "Aggregate + checkpoint + evaluate + commit",
            buckets=AGGREGATION_BUCKETS, registry=r,
        )  # fmt: skip
        # Traffic of the round in progress, stored with the round for `fedserver report`.
        self.round_bytes_in = 0
        self.round_bytes_out = 0

    # ------------------------------------------------------------------ events
    def round_opened(self) -> None:
        self.round_bytes_in = self.round_bytes_out = 0

    def received(self, n: int) -> None:
        self.bytes_received.inc(n)
        self.round_bytes_in += n

    def sent(self, n: int) -> None:
        self.bytes_sent.inc(n)
        self.round_bytes_out += n

    def accepted(self, staleness: int = 0) -> None:
        self.updates_accepted.inc()
        self.update_staleness.observe(staleness)

    def rejected(self, reason: str) -> None:
        self.updates_rejected.labels(reason).inc()

    def refused_call(self, method: str, code: Any) -> None:
        self.auth_refused.labels(method, getattr(code, "name", str(code))).inc()

    def round_closed(self, participants: int, round_seconds: float, agg_seconds: float) -> None:
        self.rounds_completed.inc()
        self.round_participants.set(participants)
        self.round_duration.observe(round_seconds)
        self.aggregation_duration.observe(agg_seconds)

    # ------------------------------------------------------------------ state and serving
    def watch(self, read: Callable[[], dict[str, float]]) -> None:
        """Export `read()`'s values as gauges fedgrpc_<key>, evaluated at each scrape."""
        self.registry.register(_StateCollector(read))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for key, value in self.read().items():
            yield GaugeMetricFamily(f"fedgrpc_{key}", f"current {key.replace('_', ' ')}", value)
