"""Staleness weights for asynchronous (buffered) aggregation: how much a late delta counts.

A delta trained on model version v and folded while version v + tau is current has staleness
tau; it is weighted by num_examples x s(tau). Pure math, no state (docs/algorithms.md):

    constant      s(tau) = 1
    poly:A        s(tau) = (1 + tau) ** -A              FedAsync's polynomial; FedBuff uses A = 0.5
    hinge:A,B     s(tau) = 1 if tau <= B else 1 / (A (tau - B) + 1)     FedAsync's hinge

Xie et al., "Asynchronous Federated Optimization" (2019); Nguyen et al., "Federated Learning
with Buffered Asynchronous Aggregation" (AISTATS 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("constant", "poly", "hinge")


@dataclass(frozen=True)
class StalenessWeight:
    kind: str = "poly"
    a: float = 0.5
    b: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"staleness weight must be one of {', '.join(KINDS)}, got {self.kind}")
        if self.a < 0 or self.b < 0:
            raise ValueError(f"staleness weight parameters must be >= 0, got {self}")

    @classmethod
    def parse(cls, spec: str) -> StalenessWeight:
        """'constant', 'poly:A' or 'hinge:A,B' (ValueError with the expected form otherwise)."""
        kind, _, params = spec.strip().partition(":")
        try:
            values = [float(p) for p in params.split(",")] if params else []
        except ValueError:
            raise ValueError(f"--staleness-weight {spec!r}: parameters must be numbers") from None
        expected = {"constant": 0, "poly": 1, "hinge": 2}.get(kind)
        if expected is None or len(values) != expected:
            raise ValueError(
                f"--staleness-weight {spec!r}: expected constant, poly:A or hinge:A,B "
                "(e.g. poly:0.5, hinge:10,4)"
            )
        return cls(kind, *values) if values else cls(kind, 0.0, 0.0)

    def __call__(self, staleness: int) -> float:
        if staleness < 0:
            raise ValueError(f"staleness cannot be negative, got {staleness}")
        if self.kind == "poly":
            return float((1.0 + staleness) ** -self.a)
        if self.kind == "hinge" and staleness > self.b:
            return 1.0 / (self.a * (staleness - self.b) + 1.0)
        return 1.0

    def __str__(self) -> str:
        if self.kind == "constant":
            return "constant"
        if self.kind == "poly":
            return f"poly:{self.a:g}"
        return f"hinge:{self.a:g},{self.b:g}"
