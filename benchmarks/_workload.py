"""The toy epoch the loop benchmarks share: the device example's CNN on scikit-learn's digits.

1,437 training images of 8x8 (the example's 80 % split), batch 24: 60 steps an epoch, about
0.3 s on one CPU thread. Defined here rather than imported from `examples/` so the benchmarks keep
measuring the same epoch when the example changes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH_SIZE = 24
SMOKE_SAMPLES = 3 * BATCH_SIZE


class Net(nn.Module):
    """The device example's CNN: three conv blocks, global pooling, a linear head."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(block(1, 32), block(32, 64), nn.MaxPool2d(2), block(64, 128))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def dataset(smoke: bool = False) -> TensorDataset:
    """The digits training split as ``(B, 1, 8, 8)`` float images and int64 labels (3 batches if ``smoke``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, _, y_train, _ = train_test_split(
        digits.images / 16.0, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    x = torch.tensor(x_train, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(y_train, dtype=torch.int64)
    if smoke:
        x, y = x[:SMOKE_SAMPLES], y[:SMOKE_SAMPLES]
    return TensorDataset(x, y)


def loader(data: TensorDataset) -> DataLoader:
    """The loader every variant iterates: in order, no workers, so each sees the same batches."""
    return DataLoader(data, batch_size=BATCH_SIZE, shuffle=False)


def fresh(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same freshly initialised model and AdamW optimizer for every variant."""
    torch.manual_seed(seed)
    model = Net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)
