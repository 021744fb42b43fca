"""What a Task measures, per objective: multiclass, binary (logits) and regression.

Metrics are accumulated as sums over batches and divided once at the end, so results are
example-weighted and identical whatever the batch size. Each objective also says how the model's
output and the targets are lined up for its loss (a binary or regression head usually emits shape
(N, 1) while targets are (N,)).
"""

from __future__ import annotations

import torch

OBJECTIVES = ("multiclass", "binary", "regression")


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    return objective


def default_loss(objective: str) -> torch.nn.Module:
    """CrossEntropy on class indices, BCEWithLogits on 0/1 targets, MSE on real targets."""
    return {
        "multiclass": torch.nn.CrossEntropyLoss,
        "binary": torch.nn.BCEWithLogitsLoss,
        "regression": torch.nn.MSELoss,
    }[check_objective(objective)]()


def align(
    objective: str, outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, targets) shaped and typed for the objective's loss."""
    if objective == "multiclass":
        return outputs, targets
    if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] == 1:
        outputs = outputs.squeeze(-1)
    if outputs.shape != targets.shape:
        raise ValueError(
            f"{objective} task: model outputs {tuple(outputs.shape)} do not match targets "
            f"{tuple(targets.shape)}"
        )
    return outputs, targets.to(outputs.dtype)


class MetricSums:
    """Running sums for one pass over a dataset; `result()` turns them into metrics."""

    def __init__(self, objective: str) -> None:
        self.objective = check_objective(objective)
        self.seen = 0
        self.loss = 0.0
        self.hits = 0  # classification: correct predictions
        self.abs_err = 0.0  # regression: sum |y - yhat|
        self.sq_err = 0.0  # regression: sum (y - yhat)^2
        self.y_sum = 0.0  # regression: for R^2 = 1 - SSE / SST
        self.y_sq = 0.0

    def add(self, outputs: torch.Tensor, targets: torch.Tensor, loss: float) -> None:
        """`outputs`/`targets` as returned by `align`; `loss` the batch's mean loss."""
        n = len(targets)
        self.seen += n
        self.loss += loss * n
        outputs, targets = outputs.detach(), targets.detach()
        if self.objective == "multiclass":
            if outputs.ndim == 2 and targets.ndim == 1 and not targets.is_floating_point():
                self.hits += int((outputs.argmax(dim=1) == targets).sum().item())
        elif self.objective == "binary":
            self.hits += int(((outputs > 0) == (targets > 0.5)).sum().item())
        else:
            err = (outputs - targets).double()
            y = targets.double()
            self.abs_err += float(err.abs().sum())
            self.sq_err += float((err * err).sum())
            self.y_sum += float(y.sum())
            self.y_sq += float((y * y).sum())

    def result(self, prefix: str = "") -> dict[str, float]:
        if self.seen == 0:
            raise ValueError("cannot compute metrics on an empty dataset")
        n = self.seen
        out = {"loss": self.loss / n}
        if self.objective == "regression":
            sst = self.y_sq - self.y_sum * self.y_sum / n
            out["mse"] = self.sq_err / n
            out["mae"] = self.abs_err / n
            # R^2 against the mean of this very set; undefined (reported 0) for constant targets.
            out["r2"] = 1.0 - self.sq_err / sst if sst > 0 else 0.0
        else:
            out["accuracy"] = self.hits / n
        return {prefix + k: v for k, v in out.items()}
