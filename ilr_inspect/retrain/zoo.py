"""Reference networks for benchmarks: CIFAR-style PreResNet (He et al. 2016, pre-activation), as in LLA20."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        total: torch.Tensor = out + skip
        return total


class PreResNet(nn.Module):
    """Depth 6n+2 (n blocks per stage, widths 16/32/64); ``PreResNet(32)`` is PreResNet32."""

    def __init__(self, depth: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise UsageError(f"PreResNet depth must be 6n+2 (20, 32, 44, 56, …), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(_PreActBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        logits: torch.Tensor = self.fc(out)
        return logits


def preresnet32(num_classes: int = 10) -> PreResNet:
    return PreResNet(32, num_classes)
