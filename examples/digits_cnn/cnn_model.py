"""The model of the digits CNN example: raw rows of 64 pixels (0..16) in, class scores out.

The rows are scaled and reshaped to (1, 8, 8) images inside the graph, so the device
sends the same raw rows as for the digits MLP.
"""

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Conv(16) BN ReLU, Conv(32) BN ReLU, MaxPool 2, Flatten, Linear(64) ReLU, Linear(10)."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64) -> None:
        super().__init__()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 4 * 4, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # unflatten, not reshape(-1, ...): export then keeps the batch bound at max_batch
        return self.net((x / 16.0).unflatten(1, (1, 8, 8)))


def build() -> nn.Module:
    return DigitsCNN()
