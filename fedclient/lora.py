"""Hugging Face causal language models fine-tuned with LoRA adapters (docs/llm.md).

A `LoraTask` names a frozen base model (a local checkpoint directory, or a `transformers`
config built under a seed) and a `LoraSpec`. The model every other part of fedgrpc sees is
`AdapterModel`: its state_dict holds the adapter tensors only, so pulls, updates, checkpoints
and aggregation carry only those, and the frozen base never travels at all; both sides build it
locally, and Join compares its hash (`base_fingerprint`, sent as the `base_model` property).

Schemes (`LoraSpec.scheme`):
- "fedit": A and B are trained and averaged separately (plain FedAvg of adapter tensors).
  mean(B_i) mean(A_i) is not mean(B_i A_i): the aggregate is an approximation.
- "ffa": FFA-LoRA. A is frozen at an init drawn from `LoraSpec.seed` (identical everywhere and
  never sent); only B is trained and averaged, and mean(B_i) A = mean(B_i A): exact.

transformers and peft are imported here lazily (the `llm` extra), never at module level, so a
plain install's fedclient does not need them. HF_HUB_OFFLINE=1 is set before they load: nothing
is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedclient.task import Task, TrainConfig

__all__ = ["AdapterModel", "LoraSpec", "LoraTask", "files_digest", "perplexity"]

SCHEMES = ("fedit", "ffa")


@dataclass(frozen=True)
class LoraSpec:
    """The adapters: rank r, scaling alpha / r, which modules (peft's suffix match), scheme."""

    rank: int = 4
    alpha: float = 8.0
    target_modules: tuple[str, ...] = ("c_attn",)
    scheme: str = "fedit"  # "fedit" | "ffa" (module docstring)
    seed: int = 0  # "ffa": the draw of the frozen A matrices

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"LoraSpec.scheme must be one of {', '.join(SCHEMES)}")
        if self.rank < 1:
            raise ValueError(f"LoraSpec.rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise ValueError("LoraSpec.target_modules must name at least one module")


def _wire_name(peft_name: str) -> str:
    """'base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight' ->
    'transformer.h.0.attn.c_attn.lora_A.weight' (peft's wrapper and adapter name dropped)."""
    return peft_name.removeprefix("base_model.model.").replace(".default.", ".")


class AdapterModel(torch.nn.Module):
    """A peft-wrapped causal LM whose state is its exchanged adapter tensors only.

    The LM is held outside the module tree (not a submodule), so `state_dict`,
    `named_parameters` and `load_state_dict` see just the adapters: everything fedgrpc does
    with a model (flatten, partial updates, FedAvg) then applies to the adapters as is.
    `forward(input_ids)` returns the logits.
    """

    def __init__(self, lm: torch.nn.Module, adapters: Mapping[str, torch.nn.Parameter]) -> None:
        super().__init__()
        object.__setattr__(self, "lm", lm)  # not registered: its base weights are not our state
        self.adapters: OrderedDict[str, torch.nn.Parameter] = OrderedDict(adapters)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits

    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, param in self.adapters.items():
            yield prefix + name, param

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        # Copies: a FlatModel made from it must not change when training moves on.
        return OrderedDict((n, p.detach().clone()) for n, p in self.adapters.items())

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        missing = [n for n in self.adapters if n not in state_dict]
        unexpected = [n for n in state_dict if n not in self.adapters]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"adapter state does not match: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]} (another LoraSpec or base model?)"
            )
        with torch.no_grad():
            for name, value in state_dict.items():
                if name in self.adapters:
                    self.adapters[name].copy_(torch.as_tensor(value))
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def train(self, mode: bool = True) -> AdapterModel:
        super().train(mode)
        self.lm.train(mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterModel:  # .to(device) etc.
        self.lm._apply(fn)
        return self


def files_digest(path: Path) -> str:
    """sha256 over a checkpoint directory's files (names and bytes, sorted): its identity."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class LoraTask(Task):
    """Subclass, implement `base_checkpoint` or `base_config`, and `load_partition` returning
    token blocks: a dataset of (ids, ids) pairs of shape (context,) (next-token targets are
    shifted here). Training uses AdamW on the trainable adapters; evaluation adds perplexity."""

    objective = "multiclass"  # next-token prediction: loss is cross-entropy, accuracy top-1
    spec: LoraSpec = LoraSpec()
    base_seed: int = 0  # base_config only: the seed the base is built under

    def base_checkpoint(self) -> Path | None:
        """A local directory that `from_pretrained` reads (config.json + weights), or None."""
        return None

    def base_config(self) -> dict[str, Any] | None:
        """A transformers config dict (with "model_type") to build the base from, or None."""
        return None

    # ------------------------------------------------------------------ the model
    def base_fingerprint(self) -> str:
        """sha256 of what must be identical on every participant but never travels: the base
        weights (checkpoint files, or config + seed) and the LoRA settings they are used with."""
        path = self.base_checkpoint()
        if path is not None:
            base = files_digest(Path(path))
        else:
            config = json.dumps([self.base_config(), self.base_seed], sort_keys=True)
            base = hashlib.sha256(config.encode()).hexdigest()
        spec = json.dumps(asdict(self.spec), sort_keys=True)
        return hashlib.sha256(f"{base}:{spec}".encode()).hexdigest()

    def load_base(self) -> torch.nn.Module:
        os.environ["HF_HUB_OFFLINE"] = "1"  # never download: local files or a config only
        import transformers

        path = self.base_checkpoint()
        if path is not None:
            return transformers.AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True
            )
        config = self.base_config()
        if config is None:
            raise ValueError("a LoraTask needs base_checkpoint() or base_config()")
        config = dict(config)
        cfg = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.base_seed)
            return transformers.AutoModelForCausalLM.from_config(cfg)

    def build_model(self) -> AdapterModel:
        import peft

        spec = self.spec
        config = peft.LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=list(spec.target_modules),
            lora_dropout=0.0,
        )
        with warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out itself
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            lm = peft.get_peft_model(self.load_base(), config)
        named = {_wire_name(n): p for n, p in lm.named_parameters() if "lora_" in n}
        if spec.scheme == "ffa":
            freeze_a(named, spec.seed)
        exchanged = {n: p for n, p in named.items() if p.requires_grad}
        return AdapterModel(lm, exchanged)

    # ------------------------------------------------------------------ training
    def make_optimizer(self, model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    def loss_fn(self) -> torch.nn.Module:
        return torch.nn.CrossEntropyLoss()

    def align(
        self, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at position t predict token t + 1: (N, T, V) -> (N(T-1), V) vs (N(T-1),)."""
        vocab = outputs.shape[-1]
        return outputs[:, :-1].reshape(-1, vocab), targets[:, 1:].reshape(-1)

    def evaluate(self, model: torch.nn.Module, data: Any, batch_size: int = 64) -> dict[str, float]:
        out = super().evaluate(model, data, batch_size)
        out["perplexity"] = perplexity(out["loss"])
        return out


def freeze_a(named: Mapping[str, torch.nn.Parameter], seed: int) -> None:
    """FFA-LoRA: every lora_A drawn from `seed` alone (peft's default distribution,
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))), in name order, then frozen; so all participants hold
    the same A without it being sent, whatever the global RNG did before."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(n for n in named if ".lora_A." in n):
            param = named[name]
            bound = 1.0 / math.sqrt(param.shape[1])
            draw = torch.rand(param.shape, generator=generator, dtype=torch.float32)
            param.copy_((draw * 2 - 1) * bound)
            param.requires_grad_(False)
