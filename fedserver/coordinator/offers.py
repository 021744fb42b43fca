"""What the coordinator offers a polling client: the round settings clients are
sent (TrainingDefaults) and GetGlobalModel's answer (Offer). Plain data, no gRPC."""

from __future__ import annotations

from dataclasses import dataclass

from fedcore.tensors import FlatModel


@dataclass(frozen=True)
class TrainingDefaults:
    """Round settings sent to clients; None means "the task's default_config()"."""

    local_epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    encoding: str = "fp32"
    # "fedavg": clients train and send a delta; "fedsgd": clients send one gradient (negated, a
    # pseudo-gradient the strategy applies) over `gradient_batch` examples (0 = all they hold).
    mode: str = "fedavg"
    gradient_batch: int = 0
    # --train-tensors: patterns of the tensors trained and sent ("" = all); ';' rotates groups.
    train_tensors: str = ""

    def resolved(self, task_default: TrainingDefaults) -> TrainingDefaults:
        return TrainingDefaults(
            self.local_epochs or task_default.local_epochs or 1,
            self.lr or task_default.lr or 0.05,
            self.batch_size or task_default.batch_size or 32,
            self.encoding,
            self.mode,
            self.gradient_batch,
            self.train_tensors,
        )

    def mode_extra(self) -> dict[str, str]:
        """Round-config `extra` entries telling clients what to compute."""
        if self.mode == "fedavg":
            return {}
        return {"mode": self.mode, "gradient_batch": str(self.gradient_batch)}


@dataclass(frozen=True)
class Offer:
    """What GetGlobalModel answers: the state, and the model if the client should train."""

    state: str  # waiting_for_clients | training | finished | shutting_down
    round: int
    selected: bool
    model: FlatModel
    send_bytes: bool
    config: dict[str, object]
    deadline_seconds: float
    message: str
    evaluate_round: int = 0  # > 0: evaluate `model` (the model after this round) locally
    decrypt_round: int = 0  # > 0 (--secure he): decrypt this round's encrypted aggregate
    # Sent to a selected client beside the model (Strategy.client_tensors: SCAFFOLD's c).
    strategy_tensors: FlatModel | None = None
