"""--track mlflow://TRACKING_URI: one MLflow run, continued across restarts.

Imported only when such a target is given (pip install 'fedgrpc[mlflow]'). Runs in the
tracking thread (base.Dispatcher), which retries whatever raises here."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from fedcore.tracking.base import Backend, RunInfo

# MLflow's own HTTP client retries 7 times with exponential backoff (minutes per call) and
# waits 120 s for an answer; the dispatcher retries in the background instead, so a dead
# server is noticed, and logged, within seconds.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# Its "View run ... at" lines go to stdout, outside the log (and its --log-format json); the
# dispatcher logs the run id instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from mlflow import MlflowClient  # after the settings above
from mlflow.entities import Metric, Param, RunStatus

EXPERIMENT = "fedgrpc"
_BAD_KEY = re.compile(r"[^\w\-. /:]")  # MLflow's allowed characters in metric/param names
_BATCH = 1000  # MLflow's limit of metrics per log_batch
_STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
log = logging.getLogger("fedcore.tracking")


class MlflowBackend(Backend):
    def __init__(self, target: str, uri: str) -> None:
        self.target = target
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = ""

    def open(self, run: RunInfo) -> str:
        existing = self._find(run)
        if existing is None:
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(EXPERIMENT)
            )
            created = self.client.create_run(experiment_id, tags=run.tags, run_name=run.name)
            self.run_id = created.info.run_id
            logged: dict[str, str] = {}
        else:
            self.run_id = existing.info.run_id
            logged = dict(existing.data.params)
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        params = {_key(k): v[:6000] for k, v in run.params.items()}
        # A parameter's value is fixed once logged: a resumed run with a new --rounds keeps the
        # first value (the state dir's meta has the current one).
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for k, v in params.items():
            if k in logged and logged[k] != v:
                log.info(
                    "tracking %s: parameter %s stays %s (now %s)", self.target, k, logged[k], v
                )
        if new:
            self.client.log_batch(self.run_id, params=new)
        return self.run_id

    def _find(self, run: RunInfo):  # type: ignore[no-untyped-def]
        """The run to continue: the stored id, else one with the same identifying tags."""
        from mlflow.exceptions import MlflowException

        if run.run_id:
            try:
                return self.client.get_run(run.run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None or not run.tags:
            return None
        where = " and ".join(f"tags.`{k}` = '{_quote(v)}'" for k, v in sorted(run.tags.items()))
        found = self.client.search_runs([experiment.experiment_id], where, max_results=1)
        return found[0] if found else None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        rows = [Metric(_key(k), float(v), now, step) for k, v in sorted(metrics.items())]
        for i in range(0, len(rows), _BATCH):
            self.client.log_batch(self.run_id, metrics=rows[i : i + _BATCH])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, _STATUS.get(status, "FINISHED"))


def _key(name: str) -> str:
    return _BAD_KEY.sub("_", name)[:250]


def _quote(value: str) -> str:
    return value.replace("'", "")
