"""What digits-train and digits-infer share: the data, the network, the weight digest.

Imports torch and scikit-learn; only a running pipeline imports this module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

N_FEATURES = 64
N_CLASSES = 10
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@functools.cache
def load_split() -> Split:
    """scikit-learn's bundled 8x8 digits (no download), split the same way every time."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(20240601))
    n_test = int(len(x) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])


class Net(nn.Module):
    """A small MLP: 64 -> hidden -> 10."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(N_FEATURES, hidden)
        self.fc2 = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


def init_net(hidden: int, seed: int) -> Net:
    """A network initialised from ``seed`` alone, without touching the global RNG."""
    net = Net(hidden)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (net.fc1, net.fc2):
            bound = 1.0 / layer.in_features ** 0.5
            layer.weight.copy_((torch.rand(layer.weight.shape, generator=gen) * 2 - 1) * bound)
            layer.bias.copy_((torch.rand(layer.bias.shape, generator=gen) * 2 - 1) * bound)
    return net


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the weights in a canonical order: name, dtype, shape, bytes."""
    # start-up: torch; every command that reads the registry imports this module
    from spotrun.integrations.torch import weights_sha256 as digest

    return digest(state)


def tensors_to_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None
                     ) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                metadata=meta)


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
