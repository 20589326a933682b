"""The fraud classifier: embeddings for categorical ids beside standardized numbers.

Shared by ``tune``, ``train``, ``evaluate``, ``export`` and ``register`` so that a
checkpoint written by one stage loads in every other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

# Most table rows one pair's target encoding takes (64k floats).
PAIR_TABLE_CAP = 1 << 16


@dataclass
class ModelConfig:
    """Architecture of :class:`FraudNet`.

    :param cardinalities: embedding table size per categorical column (OOV id included).
    :param n_numeric: number of numeric inputs.
    :param hidden: sizes of the hidden layers.
    :param dropout: dropout after each hidden layer.
    :param max_embedding_dim: cap on one embedding's width; a column with cardinality
        ``k`` gets ``min(cap, round(1.6 * k ** 0.56))`` dimensions.
    :param target_encoding: add, per categorical column, the smoothed log-odds of label 1
        among the training rows with the same id (see :meth:`FraudNet.fit_encodings`).
    :param target_smoothing: pseudo-count of the prior in that estimate.
    :param numeric_bins: piecewise-linear encoding of each numeric input over this many
        training-split quantile bins, beside the input itself; 0 turns it off.
    :param target_pairs: pairs of categorical column indices whose combination also gets
        a target encoding (app and channel together, say); needs ``target_encoding``.
        A pair with more combinations than ``pair_table_cap`` shares table rows by the
        combined id modulo the cap (saved with the model, so the tables keep their size).
    """

    cardinalities: list[int]
    n_numeric: int
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.1
    max_embedding_dim: int = 16
    target_encoding: bool = False
    target_smoothing: float = 100.0
    numeric_bins: int = 0
    target_pairs: list[list[int]] = field(default_factory=list)
    pair_table_cap: int = PAIR_TABLE_CAP

    def __post_init__(self) -> None:
        n_cat = len(self.cardinalities)
        for pair in self.target_pairs:
            if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= i < n_cat for i in pair):
                raise ValueError(f"target_pairs: {pair!r} is not two distinct column indices below {n_cat}")
        if self.target_pairs and not self.target_encoding:
            raise ValueError("target_pairs needs target_encoding")

    def encoded_sizes(self) -> list[int]:
        """Table rows of each target-encoded input: every column, then every pair."""
        k = self.cardinalities
        return list(k) + [min(k[a] * k[b], self.pair_table_cap) for a, b in self.target_pairs]

    def embedding_dims(self) -> list[int]:
        return [max(2, min(self.max_embedding_dim, round(1.6 * k**0.56))) for k in self.cardinalities]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def all_pairs(n_columns: int) -> list[list[int]]:
    """Every unordered pair of ``n_columns`` categorical columns."""
    return [[a, b] for a in range(n_columns) for b in range(a + 1, n_columns)]


def encoded_ids(categorical: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """``[n, n_encoded]`` row ids of each target-encoded input in its own table.

    A column's id is its own; a pair's is ``id_a * k_b + id_b``, modulo the pair's table
    size when the combinations outnumber the cap. Used by the graph and by
    :meth:`FraudNet.fit_encodings`, so training, export and serving agree.
    """
    k = config.cardinalities
    columns = [categorical[:, i] for i in range(len(k))]
    for (a, b), size in zip(config.target_pairs, config.encoded_sizes()[len(k):], strict=True):
        combined = categorical[:, a] * k[b] + categorical[:, b]
        if k[a] * k[b] > size:
            combined = torch.remainder(combined, size)
        columns.append(combined)
    return torch.stack(columns, dim=1)


class FraudNet(nn.Module):
    """An MLP over concatenated embeddings and numeric features; returns one logit per row.

    Two optional encodings are part of the module, so an exported graph takes the same
    two inputs whatever the configuration:

    - target encoding: a table per categorical column (and per chosen pair of columns) of
      the smoothed log-odds of label 1 among training rows with that id. It gives the
      network, from the first step, the per-id statistics a gradient-boosting model finds
      by its categorical splits, which matters when positives are few (164 in the
      TalkingData sample's training split).
    - piecewise-linear encoding of numbers over training-split quantile bins (Gorishniy
      et al., "On Embeddings for Numerical Features in Tabular Deep Learning", 2022): a
      count's effect can change at thresholds without the MLP spending units to find them.

    Both are fitted on the training split by :meth:`fit_encodings` and saved as buffers in
    the state dict. Training rows are scored with out-of-fold target encodings (passed as
    ``target_encoded``), so a row's own label never feeds its input.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.ModuleList(
            nn.Embedding(k, d) for k, d in zip(config.cardinalities, config.embedding_dims(), strict=True)
        )
        bins = config.numeric_bins
        width = sum(config.embedding_dims()) + config.n_numeric * (1 + bins)
        if config.target_encoding:
            # One row per id of every column and pair, offset by input: a single gather in the graph.
            sizes = config.encoded_sizes()
            self.register_buffer("te_table", torch.zeros(sum(sizes)))
            self.register_buffer("te_offsets", torch.tensor(_offsets(sizes), dtype=torch.int64))
            self.register_buffer("te_scale", torch.ones(2, len(sizes)))  # mean, std of the encoded values
            width += len(sizes)
        if bins:
            # Bins past a column's distinct quantiles start beyond every value and stay 0.
            self.register_buffer("bin_low", torch.full((config.n_numeric, bins), _UNUSED_BIN))
            self.register_buffer("bin_width", torch.ones(config.n_numeric, bins))
        layers: list[nn.Module] = []
        for size in config.hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(config.dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(
        self, categorical: torch.Tensor, numeric: torch.Tensor, target_encoded: torch.Tensor | None = None
    ) -> torch.Tensor:
        parts = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        parts.append(numeric)
        if self.config.numeric_bins:
            position = (numeric.unsqueeze(2) - self.bin_low) / self.bin_width
            parts.append(torch.clamp(position, 0.0, 1.0).flatten(1))
        if self.config.target_encoding:
            if target_encoded is None:
                target_encoded = self.te_table[encoded_ids(categorical, self.config) + self.te_offsets]
            parts.append((target_encoded - self.te_scale[0]) / self.te_scale[1])
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)

    @torch.no_grad()
    def fit_encodings(
        self, categorical: np.ndarray, numeric: np.ndarray, label: np.ndarray, *, folds: int = 5, seed: int = 0
    ) -> np.ndarray | None:
        """Fit the encodings on the training split; return its out-of-fold target encodings.

        The returned ``[n, n_encoded]`` array (columns, then pairs; None without target
        encoding) is what each training row must be scored with: the statistics of the
        other folds, since the full table includes the row's own label. Validation, test
        and serving rows use the full table. Deterministic for a given ``seed``.
        """
        if self.config.numeric_bins:
            low, width = quantile_bins(numeric, self.config.numeric_bins)
            self.bin_low.copy_(torch.from_numpy(low))
            self.bin_width.copy_(torch.from_numpy(width))
        if not self.config.target_encoding:
            return None
        label = label.astype(np.float64)
        prior = float(label.mean())
        # A stream of its own: the same seed may have drawn the data or the batch order.
        fold = np.random.default_rng((seed, _FOLD_STREAM)).integers(0, folds, len(label))
        # The prior of a fold's rows comes from the other folds too: no row's label reaches it.
        fold_rows = np.bincount(fold, minlength=folds)
        fold_positives = np.bincount(fold, weights=label, minlength=folds)
        fold_prior = (label.sum() - fold_positives) / np.maximum(len(label) - fold_rows, 1)
        for j, k in enumerate(self.config.cardinalities):
            ids = categorical[:, j]
            if len(ids) and (ids.min() < 0 or ids.max() >= k):
                raise ValueError(f"categorical column {j}: ids span {ids.min()}..{ids.max()}, the table has {k}")
        sizes = self.config.encoded_sizes()
        all_ids = encoded_ids(torch.from_numpy(np.ascontiguousarray(categorical, dtype=np.int64)), self.config).numpy()
        table = np.empty(sum(sizes))
        out_of_fold = np.empty(all_ids.shape, dtype=np.float32)
        for j, (k, offset) in enumerate(zip(sizes, _offsets(sizes), strict=True)):
            ids = all_ids[:, j]
            positives = np.bincount(ids, weights=label, minlength=k)
            counts = np.bincount(ids, minlength=k).astype(np.float64)
            table[offset : offset + k] = smoothed_log_odds(positives, counts, prior, self.config.target_smoothing)
            for f in range(folds):
                held = fold == f
                pos_f = np.bincount(ids[held], weights=label[held], minlength=k)
                cnt_f = np.bincount(ids[held], minlength=k)
                other = smoothed_log_odds(positives - pos_f, counts - cnt_f, float(fold_prior[f]),
                                          self.config.target_smoothing)
                out_of_fold[held, j] = other[ids[held]]
        mean, std = out_of_fold.mean(axis=0), out_of_fold.std(axis=0)
        self.te_table.copy_(torch.from_numpy(table).float())
        # A floor on the scale: a column whose encodings barely vary (one id) would
        # otherwise have its fold-to-fold noise blown up to unit variance.
        self.te_scale.copy_(torch.from_numpy(np.stack([mean, np.maximum(std, _MIN_TE_STD)])).float())
        return out_of_fold


# Distinguishes the target-encoding folds' random stream from other uses of a seed.
_FOLD_STREAM = 0x7E

# Smallest scale of a standardized target encoding, in log-odds.
_MIN_TE_STD = 0.25

# Lower edge of an unused bin: above any standardized input, so its encoding stays 0.
_UNUSED_BIN = 1e9


def _offsets(cardinalities: list[int]) -> list[int]:
    return [int(x) for x in np.cumsum([0, *cardinalities[:-1]])]


def smoothed_log_odds(positives: np.ndarray, counts: np.ndarray, prior: float, smoothing: float) -> np.ndarray:
    """``logit((positives + smoothing * prior) / (counts + smoothing))``; ids never seen get
    the prior's log-odds."""
    prior = min(max(prior, 1e-6), 1 - 1e-6)
    rate = (positives + smoothing * prior) / (counts + smoothing)
    rate = np.clip(rate, 1e-6, 1 - 1e-6)
    return np.log(rate / (1 - rate))


def quantile_bins(numeric: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower edges and widths ``[n_numeric, bins]`` of each column's quantile bins.

    Heavily repeated values collapse quantiles, so a column gets as many bins as it has
    distinct quantile edges, and the rest are unused (:data:`_UNUSED_BIN`).
    """
    n_cols = numeric.shape[1]
    low = np.full((n_cols, bins), _UNUSED_BIN, dtype=np.float32)
    width = np.ones((n_cols, bins), dtype=np.float32)
    for j in range(n_cols):
        edges = np.unique(np.quantile(numeric[:, j], np.linspace(0.0, 1.0, bins + 1)))
        used = len(edges) - 1
        low[j, :used] = edges[:-1]
        width[j, :used] = np.maximum(np.diff(edges), 1e-6)
    return low, width


class FraudEnsemble(nn.Module):
    """Members of one architecture, trained with different seeds; the mean of their logits.

    A deep ensemble: with few positives a single network's ranking varies with its seed
    by more than the gap between model families, and the average varies less. Same
    interface as :class:`FraudNet`, so export, evaluation and serving take either.
    """

    def __init__(self, members: list[FraudNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.config = members[0].config
        self.members = nn.ModuleList(members)

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(categorical, numeric) for m in self.members]).mean(dim=0)


class FraudProbability(nn.Module):
    """:class:`FraudNet` with a sigmoid: the exported and served graph outputs probabilities."""

    def __init__(self, net: FraudNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(categorical, numeric))


def save_checkpoint(net: FraudNet | FraudEnsemble, path: str, extra: dict[str, Any] | None = None) -> None:
    """Save weights and architecture to a local file (atomically, via a temp name)."""
    import os
    import uuid

    members = len(net.members) if isinstance(net, FraudEnsemble) else 1
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    torch.save(
        {"config": net.config.to_dict(), "members": members, "state_dict": net.state_dict(), "extra": extra or {}},
        tmp,
    )
    os.replace(tmp, path)


def load_checkpoint(path: str) -> tuple[FraudNet | FraudEnsemble, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`, in eval mode."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    config = ModelConfig(**payload["config"])
    members = int(payload.get("members", 1))
    net: FraudNet | FraudEnsemble
    net = FraudNet(config) if members == 1 else FraudEnsemble([FraudNet(config) for _ in range(members)])
    net.load_state_dict(payload["state_dict"])
    net.eval()
    return net, payload.get("extra", {})


@torch.no_grad()
def predict_proba(net: nn.Module, categorical, numeric, batch_size: int = 65_536):
    """Probabilities of label 1 for numpy inputs, batched."""
    import numpy as np

    net.eval()
    out = []
    for start in range(0, len(categorical), batch_size):
        cat = torch.from_numpy(categorical[start : start + batch_size])
        num = torch.from_numpy(numeric[start : start + batch_size])
        out.append(torch.sigmoid(net(cat, num)).numpy())
    return np.concatenate(out) if out else np.empty(0, dtype=np.float32)
