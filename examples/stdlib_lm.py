"""LoRA fine-tuning of a small GPT-2 on CPython's own standard library sources (docs/llm.md).

Real, varied text every machine has, so nothing downloads. The base model is a tiny GPT-2
(transformers, from a config) over bytes (ids 0-255: no tokenizer to train), pre-trained
briefly and deterministically on the "public" part of the standard library (its top-level
modules) and cached as a local checkpoint (`FEDGRPC_LLM_CACHE`, default
~/.cache/fedgrpc/stdlib_lm): the coordinator, the clients, the benchmark and the tests reuse
it, and its files' hash is what Join compares. Client i (`--partition i/N`, N <= 10) then
fine-tunes LoRA adapters on one package (email/, asyncio/, json/...: naturally non-IID), with
a held-out fifth of that package's files (chosen by a hash of the file name) as its test split.

    fedserver run --task examples.stdlib_lm:task --rounds 10 --min-clients 10
    fedclient run --server HOST:50051 --task examples.stdlib_lm:task --partition 3/10

`ffa_task` is the same with FFA-LoRA; `tiny` is a smaller, faster variant for tests.
Needs the `llm` extra (transformers, peft).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from fedclient.lora import LoraSpec, LoraTask
from fedclient.partition import Partition
from fedclient.task import LocalData, TrainConfig
from fedcore.durable import private_dir

__all__ = ["CLIENT_PACKAGES", "Size", "StdlibLM", "ffa_task", "task", "tiny"]

# One package per client, in --partition order: different code styles and vocabularies.
CLIENT_PACKAGES = (
    "email",
    "asyncio",
    "json",
    "xml",
    "http",
    "concurrent",
    "importlib",
    "multiprocessing",
    "logging",
    "urllib",
)
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}
HELD_OUT = 5  # one file in five (by name hash) is a client's held-out split


@dataclass(frozen=True)
class Size:
    """The model and how much text each part uses; `key()` names the cached base."""

    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    context: int = 128
    pretrain_steps: int = 400
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    train_blocks: int = 256  # per client: at most this many context-long blocks (32 KiB)
    test_blocks: int = 64  # per client's held-out split

    def config(self) -> dict[str, Any]:
        return {
            "model_type": "gpt2",
            "vocab_size": 256,
            "n_positions": self.context,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "bos_token_id": 10,  # "\n": GPT-2's 50256 is outside a byte vocabulary
            "eos_token_id": 10,
        }

    def key(self) -> str:
        pretrain = [self.pretrain_steps, self.pretrain_batch, self.pretrain_lr, self.context]
        raw = json.dumps([self.config(), pretrain, list(sys.version_info[:2])], sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


FULL = Size()
TINY = Size(n_embd=64, n_head=2, context=64, pretrain_steps=40, train_blocks=96, test_blocks=16)


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _sources(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            yield path


def _held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % HELD_OUT == 0


def _blocks(files: list[Path], context: int, limit: int) -> torch.Tensor:
    """Non-overlapping byte blocks of the files' text, at most `limit`, spread evenly."""
    data = b"\n".join(f.read_bytes() for f in files)
    count = len(data) // context
    if count == 0:
        raise ValueError(f"{len(data)} bytes cannot fill one {context}-byte block")
    ids = torch.frombuffer(bytearray(data[: count * context]), dtype=torch.uint8)
    blocks = ids.view(count, context).long()
    if count > limit:  # even spread: every part of the package, not its first files only
        blocks = blocks[torch.linspace(0, count - 1, limit).round().long()]
    return blocks


@functools.cache
def client_blocks(index: int, size: Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) blocks of client `index`'s package."""
    root = stdlib() / CLIENT_PACKAGES[index]
    files = list(_sources(root))
    test = [f for f in files if _held_out(f.relative_to(root).as_posix())] or files[-1:]
    train = [f for f in files if f not in test]
    return _blocks(train, size.context, size.train_blocks), _blocks(
        test, size.context, size.test_blocks
    )


def public_blocks(size: Size) -> torch.Tensor:
    """The base's pre-training text: the standard library's top-level modules."""
    files = sorted(p for p in stdlib().glob("*.py") if p.is_file())
    return _blocks(files, size.context, 1 << 30)


def cache_root() -> Path:
    raw = os.environ.get("FEDGRPC_LLM_CACHE")
    return Path(raw) if raw else Path.home() / ".cache" / "fedgrpc" / "stdlib_lm"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process pre-trains; the coordinator and clients started with it wait for it."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_checkpoint(size: Size) -> Path:
    """The pre-trained base, built once (deterministic: fixed seeds) and cached."""
    root = cache_root()
    private_dir(root)
    target = root / f"base-{size.key()}"
    with _locked(root / f"base-{size.key()}.lock"):
        if not (target / "config.json").exists():
            pretrain(size, target)
    return target


def pretrain(size: Size, target: Path) -> None:
    """Train the whole tiny GPT-2 on the public blocks and save it to `target` atomically."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    config = dict(size.config())
    cfg = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    blocks = public_blocks(size)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr)
    model.train()
    for _ in range(size.pretrain_steps):
        batch = blocks[torch.randint(len(blocks), (size.pretrain_batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    staging = target.with_name(target.name + ".tmp")
    model.save_pretrained(str(staging), safe_serialization=True)
    staging.rename(target)


class StdlibLM(LoraTask):
    """LoRA on a stdlib package per client; `num_clients` packages form the server's test set."""

    def __init__(
        self,
        scheme: str = "fedit",
        rank: int = 4,
        alpha: float = 16.0,
        size: Size = FULL,
        num_clients: int = 10,
        server_eval: bool = True,
        local_epochs: int = 1,
    ) -> None:
        if not 1 <= num_clients <= len(CLIENT_PACKAGES):
            raise ValueError(f"num_clients must be in 1..{len(CLIENT_PACKAGES)}")
        self.spec = LoraSpec(
            rank=rank, alpha=alpha, target_modules=("attn.c_attn", "attn.c_proj"), scheme=scheme
        )
        self.size = size
        self.num_clients = num_clients
        self.server_eval = server_eval
        self.local_epochs = local_epochs

    def default_config(self) -> TrainConfig:
        return TrainConfig(local_epochs=self.local_epochs, lr=1e-2, batch_size=16)

    def base_checkpoint(self) -> Path:
        return base_checkpoint(self.size)

    def load_partition(self, partition: Partition) -> LocalData:
        if partition.count > len(CLIENT_PACKAGES):
            raise ValueError(
                f"this example has {len(CLIENT_PACKAGES)} client packages; "
                f"--partition {partition.index}/{partition.count} asks for more"
            )
        train, test = client_blocks(partition.index, self.size)
        return LocalData(train=TensorDataset(train, train), test=TensorDataset(test, test))

    def server_test_data(self) -> TensorDataset | None:
        if not self.server_eval:
            return None
        test = torch.cat([client_blocks(i, self.size)[1] for i in range(self.num_clients)])
        return TensorDataset(test, test)


task = StdlibLM()
ffa_task = StdlibLM(scheme="ffa")
tiny = StdlibLM(size=TINY, num_clients=2, local_epochs=4)
