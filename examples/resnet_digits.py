"""A ResNet-18-style CNN (11.2 M parameters) on scikit-learn's bundled digits, as images.

Run a client with it via `fedclient run --task examples.resnet_digits:task`. Nothing is
downloaded: the data are the 1797 8x8 digits that scikit-learn ships (examples/digits.py: same
file, same fixed 20% server test split, same partitioners), reshaped to one-channel images and
upscaled to 12x12 so the four stages of a ResNet-18 see 12, 6, 3 and 2 pixels a side (at 2x2 a
3x3 convolution's every weight still meets a pixel, so every parameter learns; at the native 8x8
the last stage would be 1x1 and 8 of its 9 taps would only ever see padding). A real
data set with learnable structure was preferred to a generated one: accuracy then means what it
means on digits (the MLP task reaches 0.975), and compression's effect on it is comparable.

The model is ResNet-18's layout for small images (a 3x3 stem without max-pool, as CIFAR
ResNets use; BasicBlocks [2, 2, 2, 2] at 64, 128, 256, 512 channels; global average pool; a
10-way linear head) with GroupNorm (16-channel groups) in place of BatchNorm: BatchNorm's running
statistics are each client's own data statistics, which averaging blends wrongly under non-IID
splits (Hsieh et al. 2020, "The Non-IID Data Quagmire"), and GroupNorm keeps every state tensor
a trained weight.

CPU cost: 12x12 inputs keep a forward + backward pass at ~0.24 G multiply-adds per image, so a round
(one local epoch on a third of the pool: ~430 images, 14 batches of 32) takes tens of seconds
with 3 clients on 2 cores, not minutes (docs/performance.md, "A ResNet on CPU"; `max_train`
caps it further). `--device cuda` and `--precision bf16` apply through
the Task's default loops like for any task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from examples.digits import NUM_CLASSES, DigitsTask
from fedclient.partition import Partition
from fedclient.task import LocalData, TrainConfig

__all__ = ["ResNetDigitsTask", "task"]

SIDE = 8  # scikit-learn's digits are 8x8
GROUP = 16  # channels per GroupNorm group; every width is a multiple of it


def _norm(channels: int) -> nn.GroupNorm:
    # Groups of 16 channels, at most 32 groups (Wu & He 2018's default count; their 16-channel
    # groups did as well): a group must hold enough values to normalize, and the last stage
    # sees 2x2 pixels, where 1-channel groups would leave 4 values, all but erased.
    return nn.GroupNorm(min(32, channels // GROUP), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (a 1x1 convolution where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        # Each residual branch starts as zero (Goyal et al. 2017): the untrained network is a
        # shallow one, and the first rounds at the default lr do not blow up.
        nn.init.zeros_(self.norm2.weight)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small one-channel images: 11.2 M parameters at the default widths."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), _norm(widths[0]))
        stages: list[nn.Module] = []
        cin = widths[0]
        for n, width in enumerate(widths):
            stride = 1 if n == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1))
            )
            cin = width
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def as_images(data: Dataset, side: int) -> TensorDataset:
    """Digits' flat 64-pixel rows as (N, 1, side, side) images (bilinear upscaling)."""
    assert isinstance(data, TensorDataset)
    x, y = data.tensors
    images = x.reshape(-1, 1, SIDE, SIDE)
    if side != SIDE:
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    return TensorDataset(images.contiguous(), y)


class ResNetDigitsTask(DigitsTask):
    """ResNet18 on digits upscaled to `side` x `side`; examples/digits.py's split and partitions.

    `widths` scales the model (the tests use a narrow one); `max_train` caps each client's
    training images (0: all of its partition) to bound a round's CPU time.
    """

    def __init__(
        self,
        side: int = 12,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        max_train: int = 0,
        local_test_fraction: float = 0.1,
    ) -> None:
        super().__init__(local_test_fraction=local_test_fraction)
        if side < SIDE:
            raise ValueError(f"side must be >= {SIDE}, got {side}")
        if not widths or any(w < GROUP or w % GROUP for w in widths):
            raise ValueError(f"widths must be multiples of {GROUP}, got {widths}")
        if max_train < 0:
            raise ValueError(f"max_train must be >= 0, got {max_train}")
        self.side = side
        self.widths = tuple(widths)
        self.max_train = max_train

    def default_config(self) -> TrainConfig:
        # One epoch a round keeps a round's CPU time in seconds on 2 cores; SGD with momentum
        # (the Task's optimizer) at 0.02: 0.05 made the first rounds of a GroupNorm ResNet
        # diverge in some seeds.
        return TrainConfig(local_epochs=1, lr=0.02, batch_size=32)

    def build_model(self) -> nn.Module:
        return ResNet18(self.widths, NUM_CLASSES)

    def load_partition(self, partition: Partition) -> LocalData:
        local = super().load_partition(partition)
        train = as_images(local.train, self.side)
        if self.max_train and len(train) > self.max_train:
            train = TensorDataset(*(t[: self.max_train] for t in train.tensors))
        test = as_images(local.test, self.side) if local.test is not None else None
        return LocalData(train=train, test=test)

    def server_test_data(self) -> TensorDataset:
        return as_images(super().server_test_data(), self.side)


task = ResNetDigitsTask()
