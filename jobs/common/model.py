"""The fraud classifier: embeddings for categorical ids beside standardized numbers.

Shared by ``tune``, ``train``, ``evaluate``, ``export`` and ``register`` so that a
checkpoint written by one stage loads in every other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ModelConfig:
    """Architecture of :class:`FraudNet`.

    :param cardinalities: embedding table size per categorical column (OOV id included).
    :param n_numeric: number of numeric inputs.
    :param hidden: sizes of the hidden layers.
    :param dropout: dropout after each hidden layer.
    :param max_embedding_dim: cap on one embedding's width; a column with cardinality
        ``k`` gets ``min(cap, round(1.6 * k ** 0.56))`` dimensions.
    """

    cardinalities: list[int]
    n_numeric: int
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.1
    max_embedding_dim: int = 16

    def embedding_dims(self) -> list[int]:
        return [max(2, min(self.max_embedding_dim, round(1.6 * k**0.56))) for k in self.cardinalities]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FraudNet(nn.Module):
    """An MLP over concatenated embeddings and numeric features; returns one logit per row."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.ModuleList(
            nn.Embedding(k, d) for k, d in zip(config.cardinalities, config.embedding_dims(), strict=True)
        )
        width = sum(config.embedding_dims()) + config.n_numeric
        layers: list[nn.Module] = []
        for size in config.hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(config.dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        parts = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        parts.append(numeric)
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)


class FraudProbability(nn.Module):
    """:class:`FraudNet` with a sigmoid: the exported and served graph outputs probabilities."""

    def __init__(self, net: FraudNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(categorical, numeric))


def save_checkpoint(net: FraudNet, path: str, extra: dict[str, Any] | None = None) -> None:
    """Save weights and architecture to a local file (atomically, via a temp name)."""
    import os
    import uuid

    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    torch.save({"config": net.config.to_dict(), "state_dict": net.state_dict(), "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> tuple[FraudNet, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`, in eval mode."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    net = FraudNet(ModelConfig(**payload["config"]))
    net.load_state_dict(payload["state_dict"])
    net.eval()
    return net, payload.get("extra", {})


@torch.no_grad()
def predict_proba(net: FraudNet, categorical, numeric, batch_size: int = 65_536):
    """Probabilities of label 1 for numpy inputs, batched."""
    import numpy as np

    net.eval()
    out = []
    for start in range(0, len(categorical), batch_size):
        cat = torch.from_numpy(categorical[start : start + batch_size])
        num = torch.from_numpy(numeric[start : start + batch_size])
        out.append(torch.sigmoid(net(cat, num)).numpy())
    return np.concatenate(out) if out else np.empty(0, dtype=np.float32)
