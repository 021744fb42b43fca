"""The client's side of each round protocol: what it does around local training.

The round config says which protocol the coordinator runs (`extra`: "secagg", "he"); the
session asks `handler_for` and then drives the handler through the same three steps whatever
it is: `prepare` (before training; False: sit this round out), `encode` (the update vector ->
the bytes that leave this process) and `after_submit` (once the update was accepted).
Mirrors fedserver/protocols; adding a protocol is one handler class here plus its line in
`handler_for`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedclient.protocols.secagg import SecAggClient, SecAggExchange, run_secagg_step
from fedclient.retry import PermanentError
from fedcore.codecs import Codec, ErrorFeedback
from fedcore.he import HEClient
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.secagg.keys import round_context


class RoundHandler:
    """Plain aggregation: the update as the chosen codec encodes it (with error feedback)."""

    # Masked or encrypted rounds must keep the round's encoding: --encoding is ignored then.
    fixed_encoding = False

    def __init__(self, feedback: ErrorFeedback) -> None:
        self.feedback = feedback  # top-k's residual, carried across rounds

    def prepare(self, header: pb.ModelHeader) -> bool:
        return True

    def encode(
        self, codec: Codec, delta: np.ndarray, num_examples: int, extra: dict[str, str]
    ) -> np.ndarray:
        return self.feedback.encode(codec, delta)

    def after_submit(self, round_number: int) -> None:
        return None


class SecAggHandler(RoundHandler):
    """Secure aggregation: keys before training; only the masked vector leaves this process."""

    fixed_encoding = True

    def __init__(
        self,
        stub: pb_grpc.CoordinatorStub,
        call: Callable[[str, Callable[[], Any]], Any],
        client_id: str,
        federation_id: str,
        poll_seconds: float,
    ) -> None:
        self.stub, self.call = stub, call
        self.client_id, self.federation_id = client_id, federation_id
        self.poll_seconds = poll_seconds
        self.exchange: SecAggExchange | None = None

    def prepare(self, header: pb.ModelHeader) -> bool:
        """Key exchange before training; False if this client is out of this secure round."""
        client = SecAggClient(self.client_id, round_context(self.federation_id, header.round))
        exchange = SecAggExchange(self.stub, self.call, client, header.round, self.poll_seconds)
        self.exchange = exchange
        return run_secagg_step(header.round, "key exchange", exchange.setup)

    def encode(
        self, codec: Codec, delta: np.ndarray, num_examples: int, extra: dict[str, str]
    ) -> np.ndarray:
        assert self.exchange is not None
        weight = 1.0 if extra.get("secagg_weighted") == "0" else num_examples
        return codec.encode(self.exchange.client.masked(delta, float(weight)))

    def after_submit(self, round_number: int) -> None:
        assert self.exchange is not None
        run_secagg_step(round_number, "unmask", self.exchange.unmask)


class HEHandler(RoundHandler):
    """Homomorphic aggregation: only CKKS ciphertexts of weight x delta leave this process."""

    fixed_encoding = True

    def __init__(self, he: HEClient) -> None:
        self.he = he

    def encode(
        self, codec: Codec, delta: np.ndarray, num_examples: int, extra: dict[str, str]
    ) -> np.ndarray:
        weight = 1.0 if extra.get("he_weighted") == "0" else num_examples
        return self.he.encrypt_update(delta, float(weight))


def handler_for(
    extra: dict[str, str],
    *,
    feedback: ErrorFeedback,
    he: HEClient | None,
    stub: pb_grpc.CoordinatorStub,
    call: Callable[[str, Callable[[], Any]], Any],
    client_id: str,
    federation_id: str,
    poll_seconds: float,
) -> RoundHandler:
    """The handler for the protocol this round's config names."""
    if extra.get("he") == "1":
        if he is None:
            raise PermanentError(
                "the coordinator aggregates under homomorphic encryption (--secure he): start "
                "this client with --he-key FILE (the he-secret.ctx from `fedserver he-keygen`)"
            )
        return HEHandler(he)
    if extra.get("secagg") == "1":
        return SecAggHandler(stub, call, client_id, federation_id, poll_seconds)
    return RoundHandler(feedback)


__all__ = ["HEHandler", "RoundHandler", "SecAggHandler", "handler_for"]
