"""Virtual clients: the client-side code of `fedclient`, run for many simulated clients in turn.

A simulation worker (one per Ray actor, fedserver/simulation/workers.py) holds ONE task, ONE
torch model and at most one global model version, and serves any number of virtual clients:
each call names the clients to run, and each client's data is cut from its id. What comes in
and goes out is bytes only — the coordinator's ModelHeader and model buffer in, an UpdateHeader
/ EvaluationResult and the encoded update out — exactly what a `fedclient` process exchanges
over gRPC.

What a `fedclient` process keeps in memory between rounds (FedPer personal tensors, top-k's
error-feedback residual) a virtual client keeps on disk, in the simulation's StateStore
(state.py, `VirtualSpec.state_dir`): read before it trains or evaluates, written after it
encoded its update, so nothing is held in memory for a client that is not running. SCAFFOLD's
c_i too, which a `fedclient` process keeps in its --state-dir: c comes after the model's bytes
(`fit`'s `strategy`, as the strategy's tensors follow the model in a GetGlobalModel stream),
and c_i⁺ is left pending (`Fitted.pending`) until the driver saw its update counted.

A client whose task raises is a failed client (`Fitted.error`, `Evaluated.error`), never an
exception out of the worker: the driver reports it to the round at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedclient.partition import Partition
from fedclient.state import ClientState, StateStore
from fedclient.task import LocalData, Task
from fedclient.update import prepare_update
from fedcore.device import configure
from fedcore.plugins import load_object
from fedcore.proto import coordinator_pb2 as pb
from fedcore.tensors import FlatModel, to_state_dict
from fedcore.wire import manifest_from_proto

log = logging.getLogger("fedclient")

ID_PREFIX = "client-"  # the same ids tests/procs.py gives `fedclient` processes


def client_id(index: int) -> str:
    return f"{ID_PREFIX}{index}"


def client_index(cid: str) -> int:
    return int(cid.removeprefix(ID_PREFIX))


@dataclass(frozen=True)
class VirtualSpec:
    """What every worker needs to impersonate any of the `num_clients` clients."""

    task: str  # MODULE:ATTR
    num_clients: int
    partitioner: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    encoding: str = ""  # "" = the round's (like fedclient --encoding)
    threads: int = 1  # torch CPU threads of this worker
    device: str = "cpu"  # fedclient --device: cpu unless --client-resources grants a GPU
    precision: str = "fp32"  # fedclient --precision
    state_dir: str = ""  # the clients' StateStore; "": each round starts from a fresh state
    federation_id: str = ""  # the coordinator's, as a Join tells a `fedclient` (tags c_i)


@dataclass(frozen=True)
class Evaluated:
    """One virtual client's federated evaluation: a serialized pb.EvaluationResult (what
    SubmitEvaluation carries), or why the client failed."""

    client_id: str
    result: bytes = b""
    error: str = ""


@dataclass(frozen=True)
class Fitted:
    """One virtual client's update, as it would travel: header bytes, payload, digest."""

    client_id: str
    header: bytes = b""  # a serialized pb.UpdateHeader; empty when the client failed
    payload: np.ndarray | None = None
    digest: str = ""
    error: str = ""
    pending: str = ""  # SCAFFOLD: c_i⁺'s file, to settle once the update is counted


class VirtualClients:
    """One model replica and one task serving many virtual clients, one after another."""

    def __init__(self, spec: VirtualSpec) -> None:
        import torch

        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.task: Task = load_object(spec.task)
        configure(self.task, spec.device, spec.precision)
        self.model: Any = self.task.build_model()
        self._base: tuple[str, FlatModel] | None = None
        self._sent: tuple[str, FlatModel] | None = None  # (strategy version, SCAFFOLD's c)
        self.store = StateStore(Path(spec.state_dir)) if spec.state_dir else None
        self.personal_patterns: str = getattr(self.task, "personal_tensors", "")

    def _state(self, cid: str) -> ClientState:
        return self.store.load(cid) if self.store is not None else ClientState()

    def _data(self, index: int) -> LocalData:
        s = self.spec
        return self.task.load_partition(
            Partition(index, s.num_clients, s.partitioner, s.alpha, s.seed)
        )

    def _model(self, header: pb.ModelHeader, buffer: np.ndarray) -> FlatModel:
        """The round's global model; built once per version, shared by every client here."""
        if self._base is None or self._base[0] != header.model_version:
            flat = FlatModel(manifest_from_proto(header.manifest), np.asarray(buffer))
            self._base = (header.model_version, flat)
        return self._base[1]

    def _strategy(
        self, header: pb.ModelHeader, strategy: np.ndarray | None
    ) -> tuple[int, FlatModel] | None:
        """(round, the strategy's tensors) as a `fedclient` session keeps them from its pull."""
        if strategy is None or not header.strategy_bytes:
            return None
        if self._sent is None or self._sent[0] != header.strategy_version:
            flat = FlatModel(manifest_from_proto(header.strategy_manifest), np.asarray(strategy))
            self._sent = (header.strategy_version, flat)
        return header.round, self._sent[1]

    def fit(
        self,
        header_bytes: bytes,
        buffer: np.ndarray,
        ids: Sequence[str],
        strategy: np.ndarray | None = None,
    ) -> list[Fitted]:
        """`strategy`: the bytes of the header's strategy tensors (SCAFFOLD's c), if any."""
        header = pb.ModelHeader.FromString(header_bytes)
        base = self._model(header, buffer)
        sent = self._strategy(header, strategy)
        out = []
        for cid in ids:
            try:
                out.append(self._fit_one(header, base, cid, sent))
            except Exception as e:  # one bad client is a dropout, not a dead worker
                log.warning("virtual client %s failed in round %d: %r", cid, header.round, e)
                out.append(Fitted(cid, error=f"{type(e).__name__}: {e}"))
        return out

    def _fit_one(
        self,
        header: pb.ModelHeader,
        base: FlatModel,
        cid: str,
        sent: tuple[int, FlatModel] | None,
    ) -> Fitted:
        extra = header.config.extra
        if extra.get("secagg") == "1" or extra.get("he") == "1":
            raise ValueError("secure aggregation rounds cannot be simulated")
        data = self._data(client_index(cid))
        state = self._state(cid)
        update = prepare_update(
            self.task,
            self.model,
            data,
            base,
            header,
            cid,
            seed=self.spec.seed,
            state=state,
            personal_patterns=self.personal_patterns,
            encoding=self.spec.encoding,
            sent=sent,
            federation_id=self.spec.federation_id,
        )
        if self.store is not None:
            self.store.save(cid, state)
        header_bytes = update.header.SerializeToString(deterministic=True)
        pending = str(update.pending) if update.pending is not None else ""
        return Fitted(cid, header_bytes, update.payload, update.digest, pending=pending)

    def evaluate(
        self, header_bytes: bytes, buffer: np.ndarray, ids: Sequence[str]
    ) -> list[Evaluated]:
        """Federated evaluation, one result per client; a client whose task raises is reported
        as failed (as in fit), not raised: it would end the whole simulation."""
        header = pb.ModelHeader.FromString(header_bytes)
        base = self._model(header, buffer)
        out = []
        for cid in ids:
            try:
                out.append(Evaluated(cid, self._evaluate_one(header, base, cid)))
            except Exception as e:
                log.warning(
                    "virtual client %s failed to evaluate round %d: %r",
                    cid,
                    header.evaluate_round,
                    e,
                )
                out.append(Evaluated(cid, error=f"{type(e).__name__}: {e}"))
        return out

    def _evaluate_one(self, header: pb.ModelHeader, base: FlatModel, cid: str) -> bytes:
        data = self._data(client_index(cid))
        metrics: dict[str, float] = {}
        n = len(data.test) if data.test is not None else 0  # type: ignore[arg-type]
        if n:
            self.model.load_state_dict(to_state_dict(base))
            personal = self._state(cid).personal
            if personal:  # FedPer: what this client serves is global + its own layers
                self.model.load_state_dict(personal, strict=False)
            metrics = {k: float(v) for k, v in self.task.evaluate(self.model, data.test).items()}
        result = pb.EvaluationResult(
            client_id=cid,
            round=header.evaluate_round,
            model_version=header.model_version,
            num_examples=n,
            metrics=metrics,
        )
        return result.SerializeToString()
