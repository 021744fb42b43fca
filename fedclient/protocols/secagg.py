"""A client's part in secure aggregation: keys, encrypted shares, masking, and unmasking.

`SecAggClient` is the protocol logic (no gRPC; tests drive it directly against the coordinator's
`fedserver.protocols.secagg_stages.SecAggRound`); `SecAggExchange` runs it over the Coordinator
service. The coordinator only ever receives this client's masked vector, never its update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import numpy as np

from fedclient.retry import PermanentError
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.secagg import quantize, shamir
from fedcore.secagg.keys import (
    PUBLIC_KEY_BYTES,
    KeyPair,
    open_sealed,
    random_seed,
    seal,
)
from fedcore.secagg.masking import mask

log = logging.getLogger("fedclient.secagg")
T = TypeVar("T")

SHARE_PURPOSE = b"share"


class SecAggAbort(RuntimeError):
    """This client cannot (or must not) continue the protocol for this round."""


def share_key(mine: KeyPair, peer_public: bytes, sender: str, recipient: str, ctx: bytes) -> bytes:
    # Direction in the HKDF info: i->j and j->i get different AEAD keys (each used once).
    return mine.agree(peer_public, SHARE_PURPOSE + f"/{sender}>{recipient}".encode(), ctx)


def share_x(roster: Mapping[str, object], client_id: str) -> int:
    """A client's Shamir x-coordinate: its 1-based position in the sorted roster."""
    return sorted(roster).index(client_id) + 1


@dataclass
class SecAggClient:
    client_id: str
    context: bytes
    channel_key: KeyPair = field(default_factory=KeyPair)
    mask_key: KeyPair = field(default_factory=KeyPair)
    self_seed: bytes = field(default_factory=random_seed)
    roster: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    threshold: int = 0
    # Shares other clients gave us: {owner: (mask-key share, self-seed share)}.
    held: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)

    def advert(self) -> tuple[bytes, bytes]:
        return self.channel_key.public_bytes(), self.mask_key.public_bytes()

    def shares_for(
        self, roster: Mapping[str, tuple[bytes, bytes]], threshold: int
    ) -> dict[str, bytes]:
        """Encrypted (mask key, self seed) shares for every other roster member."""
        n = len(roster)
        if roster.get(self.client_id) != self.advert():
            raise SecAggAbort("the roster does not carry this client's keys")
        # t > n/2: a coordinator cannot get both secrets of a client from honest survivors.
        if not n // 2 + 1 <= threshold <= n or n < 2:
            raise SecAggAbort(f"unsafe threshold {threshold} for a roster of {n}")
        for cid, (c, m) in roster.items():
            if len(c) != PUBLIC_KEY_BYTES or len(m) != PUBLIC_KEY_BYTES:
                raise SecAggAbort(f"malformed public key for {cid!r}")
        self.roster, self.threshold = dict(roster), threshold
        xs = {cid: share_x(roster, cid) for cid in roster}
        key_shares = shamir.split(self.mask_key.private_bytes(), threshold, list(xs.values()))
        seed_shares = shamir.split(self.self_seed, threshold, list(xs.values()))
        me = self.client_id
        self.held[me] = (key_shares[xs[me]], seed_shares[xs[me]])
        out = {}
        for peer, (channel_public, _) in roster.items():
            if peer == me:
                continue
            key = share_key(self.channel_key, channel_public, me, peer, self.context)
            plain = key_shares[xs[peer]] + seed_shares[xs[peer]]
            out[peer] = seal(key, plain, f"{me}>{peer}".encode())
        return out

    def accept_inbox(self, inbox: Mapping[str, bytes]) -> None:
        """Open the shares addressed to us; their senders are the clients masks are agreed with."""
        me = self.client_id
        for sender, box in inbox.items():
            if sender not in self.roster or sender == me:
                raise SecAggAbort(f"share from {sender!r}, who is not a roster peer")
            key = share_key(self.channel_key, self.roster[sender][0], sender, me, self.context)
            try:
                plain = open_sealed(key, box, f"{sender}>{me}".encode())
            except Exception:
                raise SecAggAbort(f"share from {sender!r} failed authentication") from None
            k = shamir.SHARE_BYTES
            self.held[sender] = (plain[:k], plain[k:])
        if len(self.held) < self.threshold:
            raise SecAggAbort(
                f"only {len(self.held)} clients shared keys; {self.threshold} are needed"
            )

    def masked(self, update: np.ndarray, weight: float) -> np.ndarray:
        """Fixed-point encode the (clipped, noised) update times `weight`, then mask it."""
        peers = {cid: self.roster[cid][1] for cid in self.held}
        return mask(
            quantize.encode(update, weight),
            self.client_id,
            self.self_seed,
            peers,
            self.mask_key,
            self.context,
        )

    def reveal(
        self, survivors: list[str], dropped: list[str]
    ) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """(self-seed shares of survivors, mask-key shares of dropped clients).

        Never both secrets of one client: that would unmask its individual update.
        """
        s, d = set(survivors), set(dropped)
        if s & d:
            raise SecAggAbort("coordinator asked for both secrets of the same client")
        if self.client_id not in s:
            raise SecAggAbort("this client is not listed as a survivor")
        if not (s | d) <= self.held.keys():
            raise SecAggAbort("unmask request names clients that shared no keys with us")
        if len(s) < self.threshold:
            raise SecAggAbort(f"{len(s)} survivors is below the threshold {self.threshold}")
        return (
            {cid: self.held[cid][1] for cid in sorted(s)},
            {cid: self.held[cid][0] for cid in sorted(d)},
        )


class SecAggExchange:
    """Runs SecAggClient over gRPC; `call` is the session's retrying RPC wrapper."""

    def __init__(
        self,
        stub: pb_grpc.CoordinatorStub,
        call: Callable[[str, Callable[[], T]], T],
        client: SecAggClient,
        round_number: int,
        poll_seconds: float,
    ) -> None:
        self.stub, self.call, self.client = stub, call, client
        self.round, self.poll = round_number, poll_seconds

    def _stage(self, step: int) -> pb.SecAggStage:
        req = pb.SecAggStageRequest(
            client_id=self.client.client_id, round=self.round, step=step, wait_seconds=self.poll
        )
        while True:
            reply = self.call(
                "secagg stage", lambda: self.stub.GetSecAggStage(req, timeout=self.poll + 60)
            )
            if reply.ready:
                return reply

    def setup(self) -> None:
        """Advertise keys, fetch the roster, send shares, fetch ours (before training)."""
        c = self.client
        channel, mask_public = c.advert()
        self.call(
            "advertise keys",
            lambda: self.stub.AdvertiseKeys(
                pb.AdvertiseKeysRequest(
                    client_id=c.client_id,
                    round=self.round,
                    channel_public_key=channel,
                    mask_public_key=mask_public,
                ),
                timeout=60,
            ),
        )
        stage = self._stage(pb.SECAGG_ROSTER)
        roster = {e.client_id: (e.channel_public_key, e.mask_public_key) for e in stage.roster}
        boxes = c.shares_for(roster, stage.threshold)
        self.call(
            "share keys",
            lambda: self.stub.ShareKeys(
                pb.ShareKeysRequest(
                    client_id=c.client_id,
                    round=self.round,
                    shares=[pb.EncryptedShare(peer_id=p, ciphertext=b) for p, b in boxes.items()],
                ),
                timeout=60,
            ),
        )
        stage = self._stage(pb.SECAGG_INBOX)
        c.accept_inbox({s.peer_id: s.ciphertext for s in stage.inbox})
        log.info(
            "round %d: secure aggregation with %d peers (threshold %d)",
            self.round,
            len(c.held) - 1,
            c.threshold,
        )

    def unmask(self) -> None:
        """After the masked update was accepted: reveal what the coordinator needs."""
        stage = self._stage(pb.SECAGG_UNMASK)
        seeds, keys = self.client.reveal(list(stage.survivors), list(stage.dropped))
        self.call(
            "unmask",
            lambda: self.stub.Unmask(
                pb.UnmaskRequest(
                    client_id=self.client.client_id,
                    round=self.round,
                    self_mask_shares=[
                        pb.RevealedShare(owner_id=o, share=s) for o, s in seeds.items()
                    ],
                    mask_key_shares=[
                        pb.RevealedShare(owner_id=o, share=s) for o, s in keys.items()
                    ],
                ),
                timeout=60,
            ),
        )


def run_secagg_step(round_number: int, what: str, step: Callable[[], None]) -> bool:
    """Run one stage; False (logged) if this client is out of the round, PermanentError if the
    coordinator refuses secure aggregation altogether."""
    try:
        step()
        return True
    except SecAggAbort as e:
        log.warning("round %d: secure aggregation %s aborted: %s", round_number, what, e)
    except grpc.RpcError as e:
        code = e.code()  # type: ignore[attr-defined]
        if code not in (
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.PERMISSION_DENIED,
        ):
            raise PermanentError(
                f"coordinator refused secure aggregation ({code.name}): {e.details()}"  # type: ignore[attr-defined]
            ) from None
        log.warning("round %d: secure aggregation %s: %s", round_number, what, e.details())  # type: ignore[attr-defined]
    return False
