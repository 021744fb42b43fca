"""The secure-aggregation protocol, in process: the real client logic
(fedclient/protocols/secagg.py) against the real coordinator-side round
(fedserver/protocols/secagg_stages.py), with clients dropping out.

Real-process timing of "drop exactly after masking" is fragile on a shared 2-core machine, so the
dropout case is driven here step by step; tests/test_secagg_e2e.py runs the no-dropout case with
real processes over gRPC.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedclient.protocols.secagg import SecAggAbort, SecAggClient
from fedcore.secagg import quantize
from fedcore.secagg.keys import round_context
from fedserver.protocols.secagg_stages import SecAggFailed, SecAggRefused, SecAggRound, Stage
from fedserver.updates.receiver import BadUpdate

pytestmark = pytest.mark.timeout(120)
DIM = 2_000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _updates(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    xs = [rng.normal(0, 0.05, DIM).astype(np.float32) for _ in range(n)]
    ws = [float(w) for w in rng.integers(20, 200, n)]
    return xs, ws


def _key_exchange(n: int, clock: Clock, advertise: int | None = None):
    ids = [f"client-{i}" for i in range(n)]
    ctx = round_context("fed", 7)
    server = SecAggRound(7, frozenset(ids), ctx, DIM, stage_timeout=30.0, clock=clock)
    clients = {c: SecAggClient(c, ctx) for c in ids}
    for c in ids[: advertise or n]:
        server.advertise(c, *clients[c].advert())
    if advertise is not None:
        clock.now += 31  # the rest never advertise: the stage closes at its deadline
    assert server.step() and server.stage is Stage.SHARES
    view = {c: server.stage_view(c, "roster") for c in server.roster}
    for c in server.roster:
        boxes = clients[c].shares_for(view[c]["roster"], view[c]["threshold"])
        server.post_shares(c, boxes)
    assert server.step() and server.stage is Stage.MASKED
    for c in server.shared:
        clients[c].accept_inbox(server.stage_view(c, "inbox")["inbox"])
    return ids, server, clients


def _run(n: int, drop: set[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray, SecAggRound]:
    clock = Clock()
    ids, server, clients = _key_exchange(n, clock)
    xs, ws = _updates(n, seed)
    for i, c in enumerate(ids):
        y = clients[c].masked(xs[i], ws[i])  # everyone masks ...
        if c not in drop:  # ... but the dropped clients' masked updates never arrive
            server.fold(c, [(0, y)], ws[i])
    server.begin_unmask()
    assert server.dropped == tuple(sorted(drop))
    for c in server.survivors:
        view = server.stage_view(c, "unmask")
        server.reveal(c, *clients[c].reveal(list(view["survivors"]), list(view["dropped"])))
    assert server.unmask_ready()
    server.stop_reveals()
    with pytest.raises(SecAggRefused):  # a late reveal cannot change what finish() reads
        server.reveal(server.survivors[0], {}, {})
    total, weight = server.finish()
    got = quantize.decode_sum(total, weight)
    keep = [i for i, c in enumerate(ids) if c not in drop]
    w = np.array([ws[i] for i in keep])
    want = sum(xs[i].astype(np.float64) * ws[i] for i in keep) / w.sum()
    return got, want, server


def test_secure_sum_equals_fedavg_within_quantization_error() -> None:
    got, want, _ = _run(5, set())
    assert np.max(np.abs(got - want)) <= quantize.ERROR_BOUND + 2**-23 * np.abs(want).max()


def test_two_of_eight_drop_after_masking_and_the_round_completes() -> None:
    got, want, server = _run(8, {"client-2", "client-6"})
    assert server.threshold == 5 and len(server.survivors) == 6
    assert np.max(np.abs(got - want)) <= quantize.ERROR_BOUND + 2**-23 * np.abs(want).max()


def test_masked_update_held_by_coordinator_is_uncorrelated_with_the_update() -> None:
    clock = Clock()
    ids, _server, clients = _key_exchange(4, clock)
    x = np.sin(np.arange(DIM) / 10).astype(np.float32)  # a strongly structured update
    q = quantize.encode(x, 1.0).view(np.int64).astype(np.float64)
    y = clients[ids[0]].masked(x, 1.0).view(np.int64).astype(np.float64)
    r = np.corrcoef(q, y)[0, 1]
    # Under independence, |r| exceeds 4/sqrt(n) with probability < 1e-4.
    assert abs(r) < 4 / np.sqrt(DIM)
    # And it is not just another structured vector: its top bits are fair coins.
    bits = (clients[ids[0]].masked(x, 1.0) >> np.uint64(63)).mean()
    assert abs(bits - 0.5) < 4 * 0.5 / np.sqrt(DIM)


def test_key_stage_closes_at_deadline_without_silent_clients() -> None:
    clock = Clock()
    ids, server, _ = _key_exchange(6, clock, advertise=4)
    assert sorted(server.roster) == ids[:4] and server.threshold == 3
    with pytest.raises(SecAggRefused):
        server.stage_view(ids[5], "roster")


def test_too_many_dropouts_fail_loudly() -> None:
    clock = Clock()
    ids, server, clients = _key_exchange(4, clock)  # threshold 3
    x = np.zeros(DIM, np.float32)
    for c in ids[:2]:
        server.fold(c, [(0, clients[c].masked(x, 1.0))], 1.0)
    with pytest.raises(SecAggFailed, match="threshold"):
        server.begin_unmask()


def test_clients_refuse_to_reveal_both_secrets_of_one_client() -> None:
    clock = Clock()
    ids, _server, clients = _key_exchange(4, clock)
    with pytest.raises(SecAggAbort, match="both secrets"):
        clients[ids[0]].reveal([ids[0], ids[1], ids[2]], [ids[1]])
    with pytest.raises(SecAggAbort, match="threshold"):
        clients[ids[0]].reveal([ids[0]], [ids[1], ids[2], ids[3]])


def test_stage_and_input_validation() -> None:
    clock = Clock()
    ctx = round_context("fed", 1)
    server = SecAggRound(1, frozenset({"a", "b"}), ctx, 4, 30.0, clock)
    with pytest.raises(BadUpdate, match="32-byte"):
        server.advertise("a", b"short", b"short")
    with pytest.raises(SecAggRefused, match="stage KEYS"):
        server.post_shares("a", {"b": b"x"})
    a, b = SecAggClient("a", ctx), SecAggClient("b", ctx)
    server.advertise("a", *a.advert())
    server.advertise("a", *a.advert())  # retry is fine
    server.advertise("b", *b.advert())
    assert server.step()
    with pytest.raises(BadUpdate, match="addressed"):
        server.post_shares("a", {"zz": b"x"})
    # A client never accepts a roster that does not carry its own keys, or a weak threshold.
    with pytest.raises(SecAggAbort):
        a.shares_for({"a": b.advert(), "b": b.advert()}, 2)
    with pytest.raises(SecAggAbort, match="threshold"):
        a.shares_for(server.roster, 1)


def test_every_pair_of_two_dropouts_among_five() -> None:
    for drop in itertools.combinations([f"client-{i}" for i in range(5)], 2):
        got, want, _ = _run(5, set(drop), seed=len(drop))
        assert np.max(np.abs(got - want)) <= 1e-6
