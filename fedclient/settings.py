"""What one fedclient process is told to do: the flags of `fedclient run`, resolved."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from fedclient.partition import Partition
from fedcore.proto import coordinator_pb2 as pb
from fedcore.security import TlsFiles

# This process, whatever its client id: a Join from a new address with the same instance is the
# same client reconnecting (another route, IPv4 then IPv6), never a second claimant of its id.
INSTANCE = secrets.token_hex(8)


@dataclass(frozen=True)
class ClientSettings:
    server: str
    partition: Partition
    client_id: str = ""
    seed: int = 0
    poll_seconds: float = 20.0
    give_up_after: float = 300.0
    rpc_timeout: float = 600.0
    tls: TlsFiles | None = None
    token: str | None = field(default=None, repr=False)  # never in logs
    progress: bool = False  # local-epoch progress bar (only when stderr is a terminal)
    personal_tensors: str = ""  # FedPer: patterns of tensors kept here, never sent ("" = task's)
    encoding: str = ""  # update encoding (fp32, fp16, int8, int4, topk[:F]); "" = the round's
    he_key: Path | None = None  # --secure he: the shared secret CKKS context
    state_dir: Path | None = None  # --state-dir: what outlives the process (SCAFFOLD's c_i)
    slowdown: float = 1.0  # testing aid: training takes this many times as long (sleeping)
    task_name: str = ""  # --task, sent at Join so a refusal can name it
    track: tuple[str, ...] = ()  # --track: this client's metrics to MLflow / TensorBoard

    def resolved_id(self) -> str:
        """--client-id, else one unique to this process: clients started on one host without
        ids (or with the same --partition) once all joined as HOST-0of1 and counted as one."""
        p = self.partition
        return self.client_id or f"{socket.gethostname()}-{p.index}of{p.count}-pid{os.getpid()}"

    def tracked_params(self) -> dict[str, str]:
        """What --track records about this client's setup (never its data)."""
        p = self.partition
        return {
            "task": self.task_name,
            "partition": f"{p.index}/{p.count}",
            "partitioner": p.scheme,
            "alpha": str(p.alpha),
            "seed": str(self.seed),
            "encoding": self.encoding or "(the round's)",
        }

    def join_request(
        self, client_id: str, fingerprint: str, base_model: str = ""
    ) -> pb.JoinRequest:
        """What this client says about itself at every Join (docs/protocol.md, Join);
        `base_model`: a LoRA task's frozen-base hash (fedclient/lora.py)."""
        p = self.partition
        properties = {"hostname": socket.gethostname(), "partition": f"{p.index}/{p.count}"}
        if base_model:
            properties["base_model"] = base_model
        return pb.JoinRequest(
            client_id=client_id,
            properties=properties,
            task=self.task_name,
            model_fingerprint=fingerprint,
            instance=INSTANCE,
        )
