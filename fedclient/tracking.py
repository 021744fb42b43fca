"""`fedclient run --track`: this client's own training and evaluation metrics, one run per
(client id, federation) in each target, named after the client id and tagged with the
federation id. Only numbers the client reports anyway; never data. Delivery is in the
background (fedcore.tracking): a tracker that is down never holds up training."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from fedclient.settings import ClientSettings
from fedcore.tracking import RunInfo, Tracking

log = logging.getLogger("fedclient")
_UNSAFE = re.compile(r"[^\w.-]")  # a client id as one folder name under tensorboard://DIR


class ClientTracker:
    def __init__(self, targets: tuple[str, ...], client_id: str, params: dict[str, str]) -> None:
        self.targets = targets
        self.client_id = client_id
        self.params = params
        self.federation_id = ""
        self.tracking: Tracking | None = None

    @classmethod
    def of(cls, settings: ClientSettings, client_id: str) -> ClientTracker | None:
        if not settings.track:
            return None
        return cls(settings.track, client_id, settings.tracked_params())

    def log(
        self,
        federation_id: str,
        round_number: int,
        kind: str,
        values: Mapping[str, float],
        num_examples: int,
    ) -> None:
        """One round's `kind` ("train" or "eval") metrics, as kind/NAME; a new federation
        behind the same address starts a new run."""
        metrics = {f"{kind}/{k}": float(v) for k, v in values.items()}
        metrics[f"{kind}/num_examples"] = float(num_examples)
        if federation_id != self.federation_id:
            self.close()
            self.federation_id = federation_id
            run = RunInfo(
                name=self.client_id,
                tags={
                    "fedgrpc.role": "client",
                    "fedgrpc.client_id": self.client_id,
                    "fedgrpc.federation_id": federation_id,
                },
                params=self.params,
            )
            subdir = _UNSAFE.sub("_", self.client_id)
            self.tracking = Tracking.start(self.targets, lambda _: run, subdir=subdir)
        assert self.tracking is not None
        self.tracking.log_metrics(round_number, metrics)

    def close(self, status: str = "finished", timeout: float = 10.0) -> None:
        if self.tracking is not None:
            self.tracking.close(status, timeout)
            self.tracking = None
