"""Every bound the coordinator puts on client-controlled data, in one place (docs/protocol.md,
"Limits"). A message over a limit is refused with INVALID_ARGUMENT before any work is done on
it, so no single message costs more than its own size to refuse, and nothing a client sends is
stored, logged or echoed unbounded.
"""

from __future__ import annotations

MAX_CLIENT_ID = 128  # characters, printable
MAX_STRING = 256  # characters: any other free string field (versions, encoding, checksum, ...)
MAX_TENSOR_NAME = 1024  # characters, per TensorSpec.name in an update manifest
MAX_TENSOR_DIMS = 32  # entries of TensorSpec.shape

MAX_METRICS = 64  # keys per UpdateHeader.metrics / EvaluationResult.metrics
MAX_METRIC_KEY = 64  # characters per metric name
MAX_ROUND_METRICS = 128  # distinct client metric names folded into one round's record
# A round's record names the clients' mean of each training metric CLIENT_METRIC_PREFIX + name
# (federated evaluation: "fed_" + name), so a client's `accuracy` or `epsilon` never reads as the
# coordinator's held-out accuracy or ε. Names the coordinator writes itself, bare or behind
# those prefixes, are refused in client metrics (INVALID_ARGUMENT): docs/protocol.md.
CLIENT_METRIC_PREFIX = "client_"
RESERVED_METRIC_NAMES = frozenset(
    {
        "base_round",  # a receipt's base model (history.py; its own column)
        "epsilon",  # fedserver/protocols/dp.py METRIC_*
        "dp_delta",
        "dp_noise_multiplier",
        "dp_sample_rate",
        "dp_clip",  # adaptive clipping (protocols/dp.py); not the clients' dp_within_clip bit
        "dp_clip_next",
        "dp_update_noise_multiplier",
        "dp_within_clip_fraction",
        "staleness_mean",  # fedserver/rounds/buffered.py closing_metrics
        "staleness_max",
        "examples",  # fedserver/rounds/eval_campaign.py: fed_examples, fed_clients
        "clients",
    }
)

MAX_PROPERTIES = 32  # entries of JoinRequest.properties
MAX_PROPERTY_KEY = 64  # characters
MAX_PROPERTY_VALUE = 256  # characters

MAX_REFUSAL_MESSAGE = 1024  # bytes of any status message the coordinator sends (UTF-8)
MAX_EXCERPT = 64  # characters of client input quoted in a refusal or a log line
MAX_LOG_MESSAGE = 4096  # characters of one log record's message

MAX_STATUS_ROUNDS = 100  # GetStatus lists the most recent rounds only
MAX_STATUS_BYTES = 1 << 20  # ... and stops adding rounds once the reply would exceed this


def excerpt(text: object, limit: int = MAX_EXCERPT) -> str:
    """`text` as a repr, shortened to about `limit` characters: for quoting client input."""
    shown = repr(text)
    if len(shown) <= limit:
        return shown
    return f"{shown[:limit]}... ({len(str(text))} characters)"


def excerpts(items: object, count: int = 5) -> str:
    """`[a, b, ...]`: the first `count` of `items`, each an excerpt, and how many there are."""
    listed = list(items)  # type: ignore[call-overload]
    shown = ", ".join(excerpt(i) for i in listed[:count])
    more = f", ... ({len(listed)} in all)" if len(listed) > count else ""
    return f"[{shown}{more}]"


def reserved_metric(names: object) -> str | None:
    """Why a client's metric names include a reserved one (RESERVED_METRIC_NAMES), or None."""
    for name in names:  # type: ignore[attr-defined]
        if name in RESERVED_METRIC_NAMES:
            return (
                f"metric name {excerpt(name)} is reserved for the coordinator's own records "
                f"(reserved: {', '.join(sorted(RESERVED_METRIC_NAMES))}); rename it in the "
                "Task's train() or evaluate() results"
            )
    return None


def clip_message(message: str, limit: int = MAX_REFUSAL_MESSAGE) -> str:
    """`message` cut to at most `limit` bytes of UTF-8 (gRPC metadata must stay small)."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= limit:
        return message
    suffix = " ... (truncated)"
    return raw[: limit - len(suffix)].decode("utf-8", "ignore") + suffix


def check_string_map(
    entries: object, what: str, max_entries: int, max_key: int, max_value: int | None = None
) -> str | None:
    """Why the protobuf map `entries` breaks its limits, or None. Counts before iterating."""
    n = len(entries)  # type: ignore[arg-type]
    if n > max_entries:
        return f"{what} has {n} entries, at most {max_entries} are allowed"
    for key, value in entries.items():  # type: ignore[attr-defined]
        if not key or len(key) > max_key or not key.isprintable():
            return (
                f"{what} names must be printable and 1 to {max_key} characters, got {excerpt(key)}"
            )
        if max_value is not None and len(value) > max_value:
            return f"{what} value of {excerpt(key)} exceeds {max_value} characters"
    return None
