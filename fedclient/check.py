"""`fedclient check`: try a Task locally before any coordinator is involved.

Loads the partition, builds the model as the coordinator would (`initial_model`) and as the
client does (`build_model`), trains one batch through the client's own local update and
evaluates one batch, so each common mistake is explained (fedclient/diagnose.py) in seconds
instead of as a traceback at round 1 of a federation.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from torch.utils.data import Subset

from fedclient.diagnose import TaskMistake, explained, load
from fedclient.local_update import local_update
from fedclient.partition import Partition
from fedclient.task import LocalData, Task
from fedcore.logs import format_metrics
from fedcore.selection import Selection
from fedcore.tensors import Manifest

EVAL_EXAMPLES = 256


def check_task(task: Task, partition: Partition, seed: int = 0) -> str:
    """One-paragraph summary when all is well; TaskMistake (with the fix) or the task's own
    exception otherwise."""
    data, model, mine = load(task, partition)
    base = task.initial_model(seed)  # what a coordinator with this task would serve
    if mine.fingerprint != base.manifest.fingerprint:
        raise TaskMistake(
            "initial_model (the coordinator's model) and build_model (the client's) differ",
            None,
            [_difference(base.manifest, mine) + ": make them build the same tensors"],
        )
    train_size, test_size = len(data.train), len(data.test) if data.test is not None else 0  # type: ignore[arg-type]
    config = dataclasses.replace(task.default_config(), local_epochs=1, seed=seed)
    # One batch through the default loop; a task with its own loop may rely on its dataset's
    # type (e.g. TensorDataset.tensors), so it gets its whole partition for one epoch.
    batch = data.train
    if type(task).train is Task.train:
        batch = Subset(data.train, range(min(config.batch_size, train_size)))
    floats = base.manifest.floats()
    started = time.monotonic()
    with explained("training one batch failed", task, data, model):
        result, update = local_update(
            task, model, LocalData(batch), base, config, Selection.everything(floats)
        )
    if not np.isfinite(update).all():
        raise TaskMistake(
            "training one batch failed",
            None,
            [
                f"the update holds NaN or Inf after one batch at lr {config.lr:g}: lower the "
                f"learning rate (default_config) or check the loss; the coordinator refuses it"
            ],
        )
    trained = time.monotonic() - started
    lines = [
        f"partition {partition.index}/{partition.count}: {train_size} training and "
        f"{test_size} test examples",
        f"model: {len(mine.tensors)} tensors, {sum(t.numel for t in mine.tensors):,} values, "
        f"fingerprint {mine.fingerprint[:12]}",
        f"trained on {result.num_examples} examples in {trained:.2f}s "
        f"({format_metrics(result.metrics, sep=' ', join=', ')})",
    ]
    if test_size:
        sample = data.test
        if type(task).evaluate is Task.evaluate:
            sample = Subset(data.test, range(min(EVAL_EXAMPLES, test_size)))  # type: ignore[arg-type]
        with explained("evaluating failed", task, data, model):
            metrics = task.evaluate(model, sample)
        shown = format_metrics({k: float(v) for k, v in metrics.items()}, sep=" ", join=", ")
        lines.append(f"evaluated {len(sample)} test examples ({shown})")  # type: ignore[arg-type]
    else:
        lines.append("no test data: federated evaluation will report no metrics for it")
    return "\n".join(lines)


def _difference(ours: Manifest, theirs: Manifest) -> str:
    a = {t.name: t for t in ours.tensors}
    b = {t.name: t for t in theirs.tensors}
    if missing := sorted(a.keys() - b.keys()):
        return f"build_model lacks {missing[:5]}"
    if extra := sorted(b.keys() - a.keys()):
        return f"build_model has extra {extra[:5]}"
    for name, spec in a.items():
        other = b[name]
        if (spec.dtype, spec.shape) != (other.dtype, other.shape):
            return (
                f"tensor {name!r} is {spec.dtype}{list(spec.shape)} in initial_model, "
                f"{other.dtype}{list(other.shape)} in build_model"
            )
    return "the tensors are in a different order"
