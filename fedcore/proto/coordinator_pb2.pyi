from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FederationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEDERATION_STATE_UNSPECIFIED: _ClassVar[FederationState]
    WAITING_FOR_CLIENTS: _ClassVar[FederationState]
    TRAINING: _ClassVar[FederationState]
    FINISHED: _ClassVar[FederationState]
    SHUTTING_DOWN: _ClassVar[FederationState]

class SecAggStep(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_STEP_UNSPECIFIED: _ClassVar[SecAggStep]
    SECAGG_ROSTER: _ClassVar[SecAggStep]
    SECAGG_INBOX: _ClassVar[SecAggStep]
    SECAGG_UNMASK: _ClassVar[SecAggStep]
FEDERATION_STATE_UNSPECIFIED: FederationState
WAITING_FOR_CLIENTS: FederationState
TRAINING: FederationState
FINISHED: FederationState
SHUTTING_DOWN: FederationState
SECAGG_STEP_UNSPECIFIED: SecAggStep
SECAGG_ROSTER: SecAggStep
SECAGG_INBOX: SecAggStep
SECAGG_UNMASK: SecAggStep

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class RoundConfig(_message.Message):
    __slots__ = ("local_epochs", "lr", "batch_size", "encoding", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    lr: float
    batch_size: int
    encoding: str
    extra: _containers.ScalarMap[str, str]
    def __init__(self, local_epochs: _Optional[int] = ..., lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., encoding: _Optional[str] = ..., extra: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id", "properties", "task", "model_fingerprint", "instance")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    properties: _containers.ScalarMap[str, str]
    task: str
    model_fingerprint: str
    instance: str
    def __init__(self, client_id: _Optional[str] = ..., properties: _Optional[_Mapping[str, str]] = ..., task: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("client_id", "federation_id", "chunk_size", "max_update_bytes", "heartbeat_seconds", "checksums")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    federation_id: str
    chunk_size: int
    max_update_bytes: int
    heartbeat_seconds: float
    checksums: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, client_id: _Optional[str] = ..., federation_id: _Optional[str] = ..., chunk_size: _Optional[int] = ..., max_update_bytes: _Optional[int] = ..., heartbeat_seconds: _Optional[float] = ..., checksums: _Optional[_Iterable[str]] = ...) -> None: ...

class GetGlobalModelRequest(_message.Message):
    __slots__ = ("client_id", "known_version", "wait_seconds")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    known_version: str
    wait_seconds: float
    def __init__(self, client_id: _Optional[str] = ..., known_version: _Optional[str] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("state", "round", "selected", "model_version", "manifest", "config", "total_bytes", "total_rounds", "deadline_seconds", "message", "evaluate_round", "decrypt_round", "strategy_manifest", "strategy_version", "strategy_bytes", "model_checksum", "strategy_checksum")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_ROUND_FIELD_NUMBER: _ClassVar[int]
    DECRYPT_ROUND_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    state: FederationState
    round: int
    selected: bool
    model_version: str
    manifest: Manifest
    config: RoundConfig
    total_bytes: int
    total_rounds: int
    deadline_seconds: float
    message: str
    evaluate_round: int
    decrypt_round: int
    strategy_manifest: Manifest
    strategy_version: str
    strategy_bytes: int
    model_checksum: str
    strategy_checksum: str
    def __init__(self, state: _Optional[_Union[FederationState, str]] = ..., round: _Optional[int] = ..., selected: _Optional[bool] = ..., model_version: _Optional[str] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., config: _Optional[_Union[RoundConfig, _Mapping]] = ..., total_bytes: _Optional[int] = ..., total_rounds: _Optional[int] = ..., deadline_seconds: _Optional[float] = ..., message: _Optional[str] = ..., evaluate_round: _Optional[int] = ..., decrypt_round: _Optional[int] = ..., strategy_manifest: _Optional[_Union[Manifest, _Mapping]] = ..., strategy_version: _Optional[str] = ..., strategy_bytes: _Optional[int] = ..., model_checksum: _Optional[str] = ..., strategy_checksum: _Optional[str] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("client_id", "round", "base_version", "num_examples", "metrics", "encoding", "manifest", "total_bytes", "checksum")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    base_version: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    encoding: str
    manifest: Manifest
    total_bytes: int
    checksum: str
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., base_version: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., encoding: _Optional[str] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., total_bytes: _Optional[int] = ..., checksum: _Optional[str] = ...) -> None: ...

class UpdateTrailer(_message.Message):
    __slots__ = ("sha256", "digest")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    digest: str
    def __init__(self, sha256: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    trailer: UpdateTrailer
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[UpdateTrailer, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "duplicate", "round", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    round: int
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., round: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EvaluationResult(_message.Message):
    __slots__ = ("client_id", "round", "model_version", "num_examples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    model_version: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., model_version: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvaluationReply(_message.Message):
    __slots__ = ("accepted", "duplicate", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class EncryptedAggregateRequest(_message.Message):
    __slots__ = ("client_id", "round")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "participants", "num_examples", "metrics", "duration_seconds", "model_version")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    round: int
    participants: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    duration_seconds: float
    model_version: str
    def __init__(self, round: _Optional[int] = ..., participants: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., duration_seconds: _Optional[float] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetStatusReply(_message.Message):
    __slots__ = ("state", "current_round", "total_rounds", "rounds_completed", "live_clients", "updates_received", "updates_expected", "rounds", "federation_id", "rejections", "rounds_omitted", "failure")
    class RejectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    LIVE_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    state: FederationState
    current_round: int
    total_rounds: int
    rounds_completed: int
    live_clients: int
    updates_received: int
    updates_expected: int
    rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    federation_id: str
    rejections: _containers.ScalarMap[str, int]
    rounds_omitted: int
    failure: str
    def __init__(self, state: _Optional[_Union[FederationState, str]] = ..., current_round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., rounds_completed: _Optional[int] = ..., live_clients: _Optional[int] = ..., updates_received: _Optional[int] = ..., updates_expected: _Optional[int] = ..., rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ..., federation_id: _Optional[str] = ..., rejections: _Optional[_Mapping[str, int]] = ..., rounds_omitted: _Optional[int] = ..., failure: _Optional[str] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("client_id", "round", "channel_public_key", "mask_public_key")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    channel_public_key: bytes
    mask_public_key: bytes
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., channel_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("peer_id", "ciphertext")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    ciphertext: bytes
    def __init__(self, peer_id: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("client_id", "round", "shares")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner_id", "share")
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner_id: str
    share: bytes
    def __init__(self, owner_id: _Optional[str] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("client_id", "round", "self_mask_shares", "mask_key_shares")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    self_mask_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    mask_key_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., self_mask_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., mask_key_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class SecAggAck(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class SecAggStageRequest(_message.Message):
    __slots__ = ("client_id", "round", "step", "wait_seconds")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    step: SecAggStep
    wait_seconds: float
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[_Union[SecAggStep, str]] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class RosterEntry(_message.Message):
    __slots__ = ("client_id", "channel_public_key", "mask_public_key")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    channel_public_key: bytes
    mask_public_key: bytes
    def __init__(self, client_id: _Optional[str] = ..., channel_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ...) -> None: ...

class SecAggStage(_message.Message):
    __slots__ = ("ready", "step", "threshold", "roster", "inbox", "survivors", "dropped", "message")
    READY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    INBOX_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    step: SecAggStep
    threshold: int
    roster: _containers.RepeatedCompositeFieldContainer[RosterEntry]
    inbox: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    message: str
    def __init__(self, ready: _Optional[bool] = ..., step: _Optional[_Union[SecAggStep, str]] = ..., threshold: _Optional[int] = ..., roster: _Optional[_Iterable[_Union[RosterEntry, _Mapping]]] = ..., inbox: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "round")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("live",)
    LIVE_FIELD_NUMBER: _ClassVar[int]
    live: bool
    def __init__(self, live: _Optional[bool] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("client_id", "round", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    reason: str
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class FailureReply(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...
