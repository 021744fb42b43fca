"""The user-facing Task interface: what a model owner implements to take part in federation.

A Task knows how to build its model and load one client's slice of data; everything the
coordinator asks for (local training, evaluation) has a default supervised implementation that
subclasses override only when they need something different. `objective` picks the default loss
and metrics: "multiclass" (CrossEntropy; accuracy), "binary" (BCEWithLogits on one logit;
accuracy at logit 0) or "regression" (MSE; mse, mae, r2). See fedclient/metrics.py.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fedclient.metrics import MetricSums, align, default_loss
from fedclient.partition import Partition
from fedcore.device import Placement
from fedcore.tensors import FlatModel, flatten_state_dict

__all__ = ["LocalData", "Task", "TrainConfig", "TrainResult"]


@dataclass(frozen=True)
class TrainConfig:
    """What the coordinator asks for this round; identical on every client of a round."""

    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    seed: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)  # strategy knobs, e.g. "proximal_mu"
    # Called as on_epoch(done, total) after each local epoch (progress bars); local only.
    on_epoch: Callable[[int, int], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.extra.items()):
            raise TypeError("extra must map str to str (it travels as strings on the wire)")
        # A read-only copy keeps the config truly frozen even if the caller mutates its dict.
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @property
    def proximal_mu(self) -> float:
        """FedProx strength; 0 (plain FedAvg local training) unless the strategy sets it."""
        raw = self.extra.get("proximal_mu", "0")
        try:
            mu = float(raw)
        except ValueError:
            raise ValueError(f"extra['proximal_mu'] must be a number, got {raw!r}") from None
        if mu < 0:
            raise ValueError(f"extra['proximal_mu'] must be >= 0, got {mu}")
        return mu

    @property
    def mode(self) -> str:
        """ "fedavg" (train, send the delta) or "fedsgd" (send one gradient); set by --mode."""
        mode = self.extra.get("mode", "fedavg")
        if mode not in ("fedavg", "fedsgd"):
            raise ValueError(f"extra['mode'] must be fedavg or fedsgd, got {mode!r}")
        return mode

    @property
    def train_tensors(self) -> tuple[str, ...]:
        """Partial updates: the float tensors trained and sent this round (empty = all)."""
        raw = self.extra.get("train_tensors", "")
        return tuple(n for n in raw.split(",") if n)

    @property
    def gradient_batch(self) -> int:
        """FedSGD: examples per gradient, a random batch; 0 = the whole partition."""
        raw = self.extra.get("gradient_batch", "0")
        if not raw.isdigit():
            raise ValueError(f"extra['gradient_batch'] must be an integer >= 0, got {raw!r}")
        return int(raw)


@dataclass(frozen=True)
class TrainResult:
    """What a client reports after local training."""

    num_examples: int  # examples seen per epoch (the FedAvg weight)
    metrics: dict[str, float]  # e.g. {"train_loss": ..., "train_accuracy": ...}


@dataclass(frozen=True)
class LocalData:
    """One client's data: what it trains on and, optionally, what it evaluates on."""

    train: Dataset
    test: Dataset | None = None


def input_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype floating inputs are cast to: the model's own when it is not float32 (a
    bfloat16-native model), else None (inputs left as the data set makes them)."""
    for p in model.parameters():
        if p.is_floating_point():
            return None if p.dtype == torch.float32 else p.dtype
    return None


class Task(abc.ABC):
    """Subclass, implement build_model and load_partition; the rest has good defaults."""

    objective: str = "multiclass"  # "multiclass" | "binary" | "regression"
    # FedPer: patterns of tensors that stay on the client (trained, never sent); the client's
    # --personal-tensors overrides it.
    personal_tensors: str = ""
    # Where and at what precision the loops run: `fedclient run --device/--precision` set it
    # (fedcore/device.configure). Tasks that override train/evaluate read it too.
    placement: Placement = Placement(torch.device("cpu"))

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A fresh model; must be deterministic given torch.manual_seed so peers agree."""

    @abc.abstractmethod
    def load_partition(self, partition: Partition) -> LocalData:
        """This client's slice of the data, chosen by `partition`."""

    def initial_model(self, seed: int) -> FlatModel:
        """The round-0 global model the coordinator starts from: build_model() under `seed`.

        The coordinator only ever needs the model as a FlatModel; a task whose model can be made
        without torch (benchmarks, numpy-only tasks) overrides this to keep the coordinator
        process free of torch's memory.
        """
        torch.manual_seed(seed)
        return flatten_state_dict(self.build_model().state_dict())

    def default_config(self) -> TrainConfig:
        """Round settings the coordinator uses unless its flags say otherwise."""
        return TrainConfig()

    def server_test_data(self) -> Dataset | None:
        """A held-out set the coordinator evaluates the global model on, if the task has one."""
        return None

    def loss_fn(self) -> torch.nn.Module:
        """The loss minimised by the default `train` and reported by `evaluate`."""
        return default_loss(self.objective)

    def new_metrics(self) -> MetricSums:
        """Accumulates one pass's metrics; override to report something else."""
        return MetricSums(self.objective)

    def align(
        self, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape/type model outputs and targets for the loss (e.g. (N, 1) logits vs (N,))."""
        return align(self.objective, outputs, targets)

    def make_optimizer(self, model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
        """A fresh optimizer each round: optimizer state is not federated, so it restarts."""
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)

    def train(self, model: torch.nn.Module, data: Dataset, config: TrainConfig) -> TrainResult:
        """Default supervised loop; reports the last epoch's metrics with a "train_" prefix.

        The shuffle uses its own generator seeded from `config.seed`, so a round is
        reproducible regardless of what else touched the global RNG. With a positive
        `proximal_mu` it adds the FedProx term (mu/2)*||w - w_global||^2, which keeps
        heterogeneous clients from drifting too far from the model they were sent.
        """
        generator = torch.Generator().manual_seed(config.seed)
        place = self.placement
        loader = DataLoader(
            data,
            batch_size=config.batch_size,
            shuffle=True,
            generator=generator,
            pin_memory=place.pin_memory,
        )
        model.to(place.device)
        dtype = input_dtype(model)
        optimizer = self.make_optimizer(model, config)
        scaler = place.grad_scaler()
        criterion = self.loss_fn()
        mu = config.proximal_mu
        params = [p for p in model.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in params] if mu > 0 else []

        model.train()
        sums = self.new_metrics()
        for epoch in range(config.local_epochs):
            sums = self.new_metrics()
            for raw_inputs, raw_targets in loader:
                optimizer.zero_grad()
                inputs, raw_targets = place.batch(raw_inputs, dtype), place.batch(raw_targets)
                with place.autocast():
                    outputs, targets = self.align(model(inputs), raw_targets)
                    loss = criterion(outputs, targets)
                objective = loss
                if mu > 0:
                    drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    objective = loss + (mu / 2) * drift
                scaler.scale(objective).backward()
                scaler.step(optimizer)
                scaler.update()
                # Report the task loss, not the proximal objective, so runs stay comparable.
                sums.add(outputs.float(), targets, loss.item())
            if config.on_epoch is not None:
                config.on_epoch(epoch + 1, config.local_epochs)
        if sums.seen == 0:
            raise ValueError("cannot train on an empty dataset")
        return TrainResult(num_examples=sums.seen, metrics=sums.result("train_"))

    def compute_gradient(
        self, model: torch.nn.Module, data: Dataset, config: TrainConfig
    ) -> TrainResult:
        """FedSGD: leave in each parameter's `.grad` the mean loss gradient, weights unchanged.

        The gradient is over the whole partition, or over one random batch of
        `config.gradient_batch` examples (seeded by `config.seed`); it is accumulated in
        `config.batch_size` slices so memory stays one batch. Assumes a mean-reduced loss (the
        defaults are). Metrics are those of the model as received.
        """
        if config.gradient_batch and config.gradient_batch < len(data):  # type: ignore[arg-type]
            generator = torch.Generator().manual_seed(config.seed)
            chosen = torch.randperm(len(data), generator=generator)[: config.gradient_batch]  # type: ignore[arg-type]
            data = Subset(data, chosen.tolist())
        total = len(data)  # type: ignore[arg-type]
        if total == 0:
            raise ValueError("cannot compute a gradient on an empty dataset")
        criterion = self.loss_fn()
        place = self.placement
        model.to(place.device)
        dtype = input_dtype(model)
        model.train()
        model.zero_grad(set_to_none=True)
        sums = self.new_metrics()
        loader = DataLoader(data, batch_size=config.batch_size, pin_memory=place.pin_memory)
        for raw_inputs, raw_targets in loader:
            inputs, raw_targets = place.batch(raw_inputs, dtype), place.batch(raw_targets)
            with place.autocast():
                outputs, targets = self.align(model(inputs), raw_targets)
                loss = criterion(outputs, targets)
            # Unscaled even at fp16: one gradient, summed over slices, is what is sent; bf16
            # (same range as fp32) is the precision to use with FedSGD on a GPU.
            (loss * (len(targets) / total)).backward()  # slices add up to the mean gradient
            sums.add(outputs.float(), targets, loss.item())
        return TrainResult(num_examples=total, metrics=sums.result("train_"))

    def evaluate(
        self, model: torch.nn.Module, data: Dataset, batch_size: int = 256
    ) -> dict[str, float]:
        """Example-weighted metrics ({"loss", "accuracy"} for classification, {"loss", "mse",
        "mae", "r2"} for regression); the model's train/eval mode is restored."""
        criterion = self.loss_fn()
        place = self.placement
        model.to(place.device)
        dtype = input_dtype(model)
        was_training = model.training
        model.eval()
        sums = self.new_metrics()
        loader = DataLoader(data, batch_size=batch_size, pin_memory=place.pin_memory)
        try:
            with torch.no_grad():
                for raw_inputs, raw_targets in loader:
                    inputs, raw_targets = place.batch(raw_inputs, dtype), place.batch(raw_targets)
                    with place.autocast():
                        outputs, targets = self.align(model(inputs), raw_targets)
                        loss = criterion(outputs, targets).item()
                    sums.add(outputs.float(), targets, loss)
        finally:
            model.train(was_training)
        if sums.seen == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        return sums.result()


def trains_with_make_optimizer(task: Task) -> bool:
    """Whether `task`'s training builds its optimizer with `make_optimizer`: the default loop
    does; a task with its own `train` is taken to only if it defines `make_optimizer` too."""
    cls = type(task)
    return cls.train is Task.train or cls.make_optimizer is not Task.make_optimizer


def warm_up_optimizer(task: Task, model: torch.nn.Module) -> None:
    """Build (and drop) the optimizer that training will build, where it builds one.

    The first torch optimizer imports torch._dynamo (~2 CPU s, ~73 MB RSS): done at start-up,
    it does not land in round 1's training time, against its deadline. A task with its own loop
    and no `make_optimizer` is spared it (a no-train task's memory is then its model's). A
    warm-up only: an optimizer that cannot be built this way fails in training, with context.
    """
    if trains_with_make_optimizer(task):
        with contextlib.suppress(Exception):
            task.make_optimizer(model, TrainConfig())
