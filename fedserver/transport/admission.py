"""Who may Join: a client whose model matches the coordinator's, one live peer per client id.

A client running another task or model used to join, pull, and fail inside load_state_dict
with `Missing key(s) in state_dict`; it now sends its model's manifest fingerprint at Join and
is refused with both tasks named. Two processes claiming one client id used to share it
silently: the coordinator counted one live client and waited forever for the others. A second
live claim from another host is refused naming both addresses; from the same host it is let in
(a restarted client must be able to rejoin at once) with a warning.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from urllib.parse import unquote

from fedcore.limits import excerpt
from fedcore.proto import coordinator_pb2 as pb
from fedserver.coordinator.api import CoordinatorAPI

log = logging.getLogger("fedserver.service")


class Admission:
    def __init__(self, coordinator: CoordinatorAPI) -> None:
        self.coordinator = coordinator
        # client id -> (peer address, instance) of its last admitted Join (pruned to live ids)
        self.peers: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def model_mismatch(self, request: pb.JoinRequest) -> str | None:
        """Why this client's model cannot train ours (FAILED_PRECONDITION), or None."""
        theirs = request.model_fingerprint
        manifest = self.coordinator.model.manifest
        if not theirs or theirs == manifest.fingerprint:
            return self.base_mismatch(request)  # an empty fingerprint is an older client
        task = self.coordinator.task_name()
        shown = theirs[:12] if re.fullmatch(r"[0-9a-f]{64}", theirs) else excerpt(theirs)
        tensors = manifest.describe()
        if len(tensors) > 160:
            tensors = tensors[:160] + " ..."
        message = (
            f"client {request.client_id!r} runs task {excerpt(request.task or '(not sent)')} "
            f"with model fingerprint {shown}, but this coordinator runs task {task} with model "
            f"fingerprint {manifest.fingerprint[:12]} ({len(manifest.tensors)} tensors: "
            f"{tensors}): start the client with --task {task} and the same model code as the "
            f"coordinator"
        )
        return message  # logged once, as every refusal, by transport/rpc.py

    def base_mismatch(self, request: pb.JoinRequest) -> str | None:
        """A LoRA task (fedclient/lora.py): the frozen base never travels, so both sides must
        hold the same one; the client sends its hash as the `base_model` property."""
        ours = self.coordinator.base_model()
        if not ours:
            return None  # the whole model travels: the manifest fingerprint is enough
        theirs = request.properties.get("base_model", "")
        if theirs == ours:
            return None
        if not theirs:
            shown = "(not sent)"
        else:
            shown = theirs[:12] if re.fullmatch(r"[0-9a-f]{64}", theirs) else excerpt(theirs)
        message = (
            f"client {request.client_id!r} fine-tunes a different frozen base model: its base "
            f"hash is {shown}, this coordinator's is {ours[:12]} (task "
            f"{self.coordinator.task_name()}): give the client the same base "
            f"checkpoint files and LoraSpec as the coordinator (docs/llm.md)"
        )
        return message  # logged once, as every refusal, by transport/rpc.py

    def claim(self, client_id: str, peer: str, instance: str = "") -> str | None:
        """Why `peer` may not act as `client_id` (ALREADY_EXISTS), or None after recording it.

        Refused only while the id is live from another host and the Join is not from the same
        client process (`instance`, sent by fedclient) on a new address: a client that restarts
        on the same host (new port) rejoins at once, and after the old claimant stops answering
        for the liveness window (90 s) the id is free for anyone."""
        previous, previous_instance = self.peers.get(client_id, (None, ""))
        ago = self.coordinator.seen_ago(client_id)
        same_process = bool(instance) and instance == previous_instance
        if previous is not None and previous != peer and ago is not None and not same_process:
            old, new = _address(previous), _address(peer)
            if _host(previous) != _host(peer):
                ttl = self.coordinator.policy.client_ttl
                message = (
                    f"client id {client_id!r} is already live from {old} (seen {ago:.0f} s "
                    f"ago); this Join came from {new}: give each client its own --client-id "
                    f"(with mTLS, its own certificate). If the client at {old} has stopped, "
                    f"the id is free again in {max(ttl - ago, 0.0):.0f} s"
                )
                return message  # logged once, as every refusal, by transport/rpc.py
            log.warning(
                "client %s joined again from %s while %s was seen %.0f s ago: a restarted "
                "client, or two processes on one host sharing an id (give each its own "
                "--client-id)",
                client_id,
                new,
                old,
                ago,
            )
        self.peers[client_id] = (peer, instance)
        self.peers.move_to_end(client_id)
        self._prune()
        return None

    def _prune(self) -> None:
        # Amortized O(1) per Join: rebuilt from the live ids once it has doubled past them.
        live = self.coordinator.live_ids()
        if len(self.peers) > 2 * len(live) + 1024:
            self.peers = OrderedDict((c, p) for c, p in self.peers.items() if c in live)


def _address(peer: str) -> str:
    """'ipv4:10.0.0.5:41234' -> '10.0.0.5:41234'; '%5B::1%5D' (some gRPC versions) -> '[::1]'."""
    return unquote(peer).partition(":")[2] or peer


def _host(peer: str) -> str:
    """The peer's host, with an IPv4-mapped IPv6 address as plain IPv4 (one host whether it
    reached a dual-stack listener over IPv4 or IPv6-mapped)."""
    address = _address(peer)
    host = address.rsplit(":", 1)[0].strip("[]")  # the last ':' is the port's
    return host.removeprefix("::ffff:")
