"""A tiny LoRA task for tests: a 1-layer GPT-2 over bytes built from a config (no checkpoint,
no pre-training), fine-tuned on stdlib packages through the example's data split."""

from __future__ import annotations

from typing import Any

from torch.utils.data import TensorDataset

from examples.stdlib_lm import TINY, client_blocks
from fedclient.lora import LoraSpec, LoraTask
from fedclient.partition import Partition
from fedclient.task import LocalData, TrainConfig

CONFIG = {
    "model_type": "gpt2",
    "vocab_size": 256,
    "n_positions": TINY.context,
    "n_embd": 32,
    "n_layer": 1,
    "n_head": 2,
    "bos_token_id": 10,
    "eos_token_id": 10,
}


class TinyLora(LoraTask):
    def __init__(self, scheme: str = "fedit", base_seed: int = 0, blocks: int = 16) -> None:
        self.spec = LoraSpec(rank=2, alpha=4.0, target_modules=("c_attn",), scheme=scheme)
        self.base_seed = base_seed
        self.blocks = blocks

    def base_config(self) -> dict[str, Any]:
        return CONFIG

    def default_config(self) -> TrainConfig:
        return TrainConfig(local_epochs=1, lr=1e-2, batch_size=8)

    def load_partition(self, partition: Partition) -> LocalData:
        train, test = client_blocks(partition.index, TINY)
        train, test = train[: self.blocks], test[: self.blocks]
        return LocalData(train=TensorDataset(train, train), test=TensorDataset(test, test))


task = TinyLora()
ffa = TinyLora(scheme="ffa")
other_base = TinyLora(base_seed=1)  # same adapters, another frozen base: refused at Join
