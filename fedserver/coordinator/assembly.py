"""From the coordinator's settings to a ready Coordinator: checks that combine flags, the state
dir opened or resumed, the task's model, strategy and protocol (with --dp-clip's wrapper).
Shared by `fedserver run` (transport/server.py adds the gRPC daemon and its own ServeSettings)
and `fedserver simulate`; no gRPC here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedcore.plugins import load_object
from fedcore.privacy import DPConfig
from fedcore.sealed import StateCipher
from fedcore.selection import check_spec
from fedcore.tensors import ManifestError
from fedserver.coordinator.central_eval import Evaluator, initial_model, placement_for
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.coordinator.offers import TrainingDefaults
from fedserver.coordinator.publishing import PROTOCOL_STATE
from fedserver.coordinator.tracking import TrackSettings, run_params, start_tracking
from fedserver.modes.base import RoundMode
from fedserver.modes.registry import pinned
from fedserver.modes.synchronous import FedAvg
from fedserver.protocols.base import ProtocolSettings
from fedserver.protocols.dp import DPWrapper
from fedserver.protocols.registry import protocol_refusal
from fedserver.rounds.eval_campaign import EvalPolicy
from fedserver.rounds.synchronous import RoundPolicy
from fedserver.state.store import StateDirBusy, StateStore
from fedserver.strategies import Strategy, build_strategy
from fedserver.updates.receiver import MAX_UPDATE_VALUE

log = logging.getLogger("fedserver")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 3, 2


@dataclass(frozen=True)
class CoordinatorSettings:
    """What build_coordinator reads; the daemon's own settings are transport/server.py's."""

    task: str
    state_dir: Path
    policy: RoundPolicy
    defaults: TrainingDefaults
    strategy: str = "fedavg"
    strategy_params: dict[str, float | str] = field(default_factory=dict)
    eval_policy: EvalPolicy = field(default_factory=EvalPolicy)
    seed: int = 0
    device: str = "cpu"  # --device: where the task's held-out evaluation runs (central_eval.py)
    max_update_bytes: int = 4 << 30
    max_update_value: float = MAX_UPDATE_VALUE
    dp: DPConfig | None = None
    secure: str = "none"  # "none" | "secagg" | "he"
    he_public_key: Path | None = None  # --secure he: the public CKKS context
    dp_seed: int | None = None  # fixed DP noise for reproducible tests; None = OS entropy
    encrypt_state: Path | None = None  # key file: seal checkpoints and the model (AES-GCM)
    secagg_stage_timeout: float = 30.0
    mode: RoundMode = field(default_factory=FedAvg)  # --mode: how rounds run (fedserver/modes)
    # A finished run started again with its own --rounds: `run` serves "finished" for --linger
    # (a coordinator restarted after its last commit tells late clients); `simulate` has no one
    # to tell and refuses.
    serve_finished: bool = True
    track: TrackSettings | None = None  # --track: MLflow / TensorBoard (coordinator/tracking.py)


class SetupError(RuntimeError):
    """A problem the operator must fix before the coordinator can start."""


def record_base_model(store: StateStore, task: object) -> None:
    """A LoRA task's frozen-base hash (docs/llm.md), which Join checks; a resumed run must
    fine-tune the same base its adapters were trained on."""
    fingerprint = getattr(task, "base_fingerprint", None)
    base = fingerprint() if callable(fingerprint) else ""
    recorded = store.get_meta("base_model")
    if recorded and recorded != base:
        raise SetupError(
            f"{store.dir} holds adapters trained on base model {recorded[:12]}, but the task's "
            f"base is {base[:12] or '(none)'}; use the same base checkpoint or another --state-dir"
        )
    store.set_meta(base_model=base)


def check_round_size(policy: RoundPolicy, strategy: Strategy) -> None:
    """Refuse settings under which a round could close with fewer updates than the strategy
    needs (Bulyan: 4f + 3). A round opens with at least --min-clients live clients and closes
    with at least its quorum, both nondecreasing in the live count, so the fewest a round can
    close with is the quorum of a round opened with exactly --min-clients live."""
    needed, why = strategy.min_updates()
    fewest = policy.quorum(policy.sample_size(policy.min_clients))
    if fewest < needed:
        raise SetupError(
            f"strategy {strategy.name} needs at least {needed} updates in every round ({why}), "
            f"but a round may close with {fewest} (--min-clients {policy.min_clients}, "
            f"--min-fit {policy.min_fit or 'unset'}, --clients-per-round "
            f"{policy.clients_per_round or 'unset'}, --fraction-fit {policy.fraction_fit}); "
            f"set --min-clients to at least {needed} (and --min-fit, --clients-per-round, "
            "if set)"
        )


def scaffold_refusal(s: CoordinatorSettings) -> str | None:
    """What SCAFFOLD (docs/algorithms.md) cannot be combined with, or None. Secure
    aggregation is allowed: c needs only the sum of the Δc_i, which masks and ciphertexts give."""
    if s.strategy != "scaffold":
        return None
    if s.dp is not None:
        return (
            "--strategy scaffold cannot be combined with DP (--dp-clip, --dp-adaptive-clip): the "
            "control-variate deltas "
            "Δc_i travel beside the model delta and would need their own clipping, noise and "
            "privacy accounting, which are not implemented"
        )
    if s.mode.name != "fedavg":
        return (
            f"--strategy scaffold cannot be combined with --mode {s.mode.name}: it needs "
            "synchronous rounds of local steps (c and the clients' c_i describe one model "
            "version; an asynchronous delta would correct with a stale c); use --mode fedavg"
        )
    if s.defaults.train_tensors:
        return (
            "--strategy scaffold cannot be combined with --train-tensors: the control variates "
            "cover the whole model, so every round must train and send every tensor"
        )
    return None


def build_coordinator(
    s: CoordinatorSettings, fleet_clock: Callable[[], float] | None = None
) -> Coordinator:
    """`fleet_clock`: a simulated fleet's virtual clock (fedserver/simulation/clock.py) for
    deadlines, liveness and leases; rounds then record their fleet seconds too."""
    try:
        task = load_object(s.task)
    except ValueError as e:
        raise SetupError(str(e)) from None
    strategy = build_strategy(s.strategy, **s.strategy_params)  # bad flags: before any disk
    try:
        placement = placement_for(s.device)  # an unavailable device: before any disk too
    except ValueError as e:
        raise SetupError(str(e)) from None
    if why := s.mode.refuse(s.secure, strategy):
        raise SetupError(why)
    if why := scaffold_refusal(s):
        raise SetupError(why)
    if strategy.needs_all_updates and s.secure != "none":
        # They read individual updates: impossible when the coordinator only holds masked ones.
        raise SetupError(
            f"strategy {s.strategy} reads every individual update, so it cannot be combined "
            "with --secure; use fedavg, fedprox, fedavgm or a FedOpt strategy"
        )
    check_round_size(s.policy, strategy)
    # --dp-clip is a wrapper around the protocol (protocols/dp.py): it refuses what it cannot
    # wrap, here before the state dir is touched (the Coordinator's registry call checks again).
    wrappers = (DPWrapper(s.dp, s.dp_seed),) if s.dp is not None else ()
    protocol = ProtocolSettings(
        s.mode.protocol(s.secure),
        keep_updates=strategy.needs_all_updates,
        partial_rounds=bool(s.defaults.train_tensors),
    )
    if why := protocol_refusal(protocol, wrappers):
        raise SetupError(why)
    try:
        cipher = StateCipher.from_key_file(s.encrypt_state) if s.encrypt_state else None
    except ManifestError as e:
        raise SetupError(str(e)) from None
    try:
        store = StateStore(s.state_dir, cipher)
    except StateDirBusy as e:
        raise SetupError(str(e)) from None
    fresh = initial_model(task, s.seed)
    architecture = fresh.manifest
    last = store.last_round()
    if last or store.checkpoint_path(0).exists():
        # Only its manifest is needed now: dropped before the checkpoint is read, so resuming
        # holds one model, not two (a model over half of RAM must still resume).
        del fresh
        recorded = store.get_meta("task")
        if recorded and recorded != s.task:
            raise SetupError(
                f"{s.state_dir} holds a run of task {recorded!r}, not {s.task!r}; "
                "use another --state-dir to start a new federation"
            )
        recorded = store.get_meta("strategy")
        if recorded and recorded != s.strategy:
            raise SetupError(
                f"{s.state_dir} holds a run of strategy {recorded!r}, not {s.strategy!r}; "
                "resume with the same --strategy or use another --state-dir"
            )
        check_rounds_left(s, last, int(store.get_meta("total_rounds", "0") or 0))
        check_resumed_mode(s, store)
        try:
            model, strategy_state = store.load_checkpoint(last)
        except ManifestError as e:  # wrong key, tampered or truncated file: refuse to start
            raise SetupError(f"cannot resume from {s.state_dir}: {e}") from None
        if model.manifest != architecture:
            raise SetupError(
                f"the checkpoint in {s.state_dir} does not match the task's model architecture"
            )
        protocol_state = {
            k.removeprefix(PROTOCOL_STATE): strategy_state.pop(k)
            for k in [k for k in strategy_state if k.startswith(PROTOCOL_STATE)]
        }
        strategy.load_state_arrays(strategy_state)
        # A crash between the SQLite commit and publishing would leave model.safetensors a
        # round behind; the committed checkpoint is the truth.
        store.publish_model(model, last)
        log.info("resuming from %s: %d round(s) completed", s.state_dir, last)
    else:
        model, protocol_state = fresh, {}
        log.info("starting a new federation in %s", s.state_dir)
    if s.defaults.train_tensors:
        try:
            check_spec(model.manifest.floats(), s.defaults.train_tensors)
        except ManifestError as e:
            raise SetupError(f"--train-tensors: {e}") from None
        if strategy.needs_all_updates or s.secure != "none":  # --dp-clip: its wrapper refuses
            raise SetupError(
                "--train-tensors needs a mean-based strategy without --secure (the masks and "
                "the spooled rows cover the whole model)"
            )
    suggested = task.default_config() if hasattr(task, "default_config") else None
    task_defaults = TrainingDefaults(
        getattr(suggested, "local_epochs", None),
        getattr(suggested, "lr", None),
        getattr(suggested, "batch_size", None),
    )
    evaluator = Evaluator(task, placement)
    if s.secure == "he":
        check_he_settings(s)
    coordinator = Coordinator(
        store=store,
        strategy=strategy,
        policy=s.policy,
        model=model,
        defaults=s.defaults.resolved(task_defaults),
        evaluate=evaluator if evaluator.enabled else None,
        max_update_bytes=s.max_update_bytes,
        max_update_value=s.max_update_value,
        seed=s.seed,
        eval_policy=s.eval_policy,
        protocol_wrappers=wrappers,
        secure=s.secure,
        secagg_stage_timeout=s.secagg_stage_timeout,
        he_public_key=s.he_public_key,
        mode=s.mode,
        **({"clock": fleet_clock, "fleet_time": True} if fleet_clock is not None else {}),
    )
    coordinator.protocol.load_state_arrays(protocol_state)
    coordinator.protocol.resume(r.metrics for r in store.rounds())
    coordinator.initialize_store(s.task)
    record_base_model(store, task)
    store.set_meta(**{key: value for key, _, value in pinned(s.mode)})
    store.set_meta(state_encryption=f"aes-256-gcm key {cipher.key_id.hex()}" if cipher else "none")
    params = run_params(
        task=s.task,
        strategy=strategy,
        defaults=coordinator.defaults,
        policy=s.policy,
        eval_policy=s.eval_policy,
        privacy=s.dp,
        mode=s.mode,
        secure=s.secure,
        seed=s.seed,
    )
    tracker = start_tracking(s.track, store, coordinator.federation_id, params)
    coordinator.publisher.tracker = coordinator.evaluations.tracker = tracker
    return coordinator


def check_rounds_left(s: CoordinatorSettings, done: int, planned: int) -> None:
    """A resumed run must have rounds left; the stored total is never lowered below `done`."""
    wanted = s.policy.total_rounds
    if done < wanted:
        if planned > wanted:
            log.warning(
                "--rounds %d ends the run in %s before the %d rounds it was started with",
                wanted,
                shown_path(s.state_dir),
                planned,
            )
        return
    message = (
        f"nothing to do: {done} rounds already completed in {shown_path(s.state_dir)} (use "
        f"--rounds > {done} to continue, or another --state-dir)"
    )
    if wanted == planned and s.serve_finished:
        log.warning("%s; telling clients that training is finished", message)
        return
    raise SetupError(message)


def shown_path(path: Path) -> str:
    """`./state` rather than `state`: a bare word does not read as a folder in a message."""
    text = str(path)
    return text if path.is_absolute() or text.startswith(".") else f"./{text}"


def check_resumed_mode(s: CoordinatorSettings, store: StateStore) -> None:
    """A resumed run keeps its --mode and the mode's pinned flags (--buffer-size): a version's
    meaning (a round of the selected clients, or a buffer of K deltas) and its DP accounting
    would change mid-run."""
    for key, flag, now in pinned(s.mode):
        recorded = store.get_meta(key)
        if recorded is not None and recorded != now:
            raise SetupError(
                f"{shown_path(s.state_dir)} holds a run with {flag} {recorded or '(unset)'}, not "
                f"{now or '(unset)'}; resume with {flag} {recorded or '(unset)'} or use another "
                "--state-dir"
            )


def check_he_settings(s: CoordinatorSettings) -> None:
    """--secure he: a public context, and rounds that always sum at least two updates."""
    from fedcore.he import HEError, load_public_context
    from fedserver.protocols.he import MIN_UPDATES

    if s.he_public_key is None:
        raise SetupError(
            "--secure he needs --he-public-key FILE (he-public.ctx from `fedserver he-keygen`)"
        )
    try:
        load_public_context(s.he_public_key)
    except HEError as e:
        raise SetupError(f"--he-public-key: {e}") from None
    p = s.policy
    if min(p.min_clients, p.min_fit or p.min_clients) < MIN_UPDATES:
        raise SetupError(
            f"--secure he needs --min-clients (and --min-fit) of at least {MIN_UPDATES}: the "
            "decrypted sum of a single update would be that update"
        )
