"""The model of the digits example: raw 8x8 pixel rows (0..16) in, class scores out."""

import torch
from torch import nn


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 16.0)  # scaling inside the graph: the device sends raw pixels


def build() -> nn.Module:
    return DigitsMLP()
