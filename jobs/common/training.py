"""The one training loop behind ``tune`` and ``train``, whatever the backend.

A :class:`Backend` says how gradients are synchronised: not at all (one process, as in
a Ray Tune trial), by torch.distributed (DDP over gloo or NCCL) or by Horovod. The loop
itself is the same: class-weighted BCE on logits, Adam with weight decay, early
stopping on validation PR-AUC, the best epoch's weights kept.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from jobs.common import storage
from jobs.common.datasets import DatasetSpec
from jobs.common.features import Preprocessor
from jobs.common.metrics import average_precision_se
from jobs.common.model import FraudEnsemble, FraudNet, ModelConfig, all_pairs, predict_proba

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run; ``tune`` searches over them.

    :param lr: Adam learning rate.
    :param batch_size: global batch size, split across workers.
    :param weight_decay: L2 penalty (AdamW).
    :param dropout: dropout after each hidden layer.
    :param hidden: hidden layer sizes.
    :param max_embedding_dim: cap on embedding width.
    :param epochs: maximum number of epochs.
    :param patience: epochs without a better validation PR-AUC before stopping.
    :param pos_weight: weight of label-1 rows in the loss; 0 means negatives / positives.
    :param target_encoding: give the model per-id target statistics (see :class:`FraudNet`).
    :param target_smoothing: prior pseudo-count of those statistics.
    :param numeric_bins: quantile bins of the piecewise-linear numeric encoding; 0 = off.
    :param target_pairs: also target-encode every pair of categorical columns.
    :param members: networks trained with seeds ``seed, seed + 1, ...`` and averaged.
    :param seed: seed for weights, batch order and the target-encoding folds.
    """

    # Defaults: the best mean validation AUC over seeds on the TalkingData sample
    # (tests/model and the issue notes give the figures); tune starts from them.
    lr: float = 1e-3
    batch_size: int = 1024
    weight_decay: float = 1e-5
    dropout: float = 0.3
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    max_embedding_dim: int = 16
    epochs: int = 8
    patience: int = 3
    pos_weight: float = 20.0
    target_encoding: bool = True
    target_smoothing: float = 100.0
    numeric_bins: int = 8
    target_pairs: bool = False
    members: int = 8
    seed: int = 7

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "weight_decay": self.weight_decay >= 0,
            "dropout": 0 <= self.dropout < 1,
            "hidden": bool(self.hidden) and all(int(h) >= 1 for h in self.hidden),
            "max_embedding_dim": self.max_embedding_dim >= 2,
            "epochs": self.epochs >= 1,
            "patience": self.patience >= 1,
            "pos_weight": self.pos_weight >= 0,
            "target_smoothing": self.target_smoothing > 0,
            "numeric_bins": self.numeric_bins >= 0,
            "members": self.members >= 1,
            "target_pairs": self.target_encoding or not self.target_pairs,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(", ".join(f"{name}={getattr(self, name)!r}" for name in bad) + " out of range")

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> TrainConfig:
        known = {k: v for k, v in payload.items() if k in cls.__dataclass_fields__}
        if "hidden" in known and isinstance(known["hidden"], str):
            known["hidden"] = [int(x) for x in known["hidden"].split(",") if x]
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SplitArrays:
    """Model inputs and labels of one split."""

    categorical: np.ndarray
    numeric: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


def load_split(uri: str, spec: DatasetSpec, pre: Preprocessor) -> tuple[pd.DataFrame, SplitArrays]:
    """Read a split written by the ETL, in event order, and its model inputs."""
    frame = storage.read_table(uri).to_pandas()
    frame = frame.sort_values([spec.timestamp, spec.event_id], kind="stable").reset_index(drop=True)
    cats, nums = pre.transform(frame)
    return frame, SplitArrays(cats, nums, frame[spec.label].to_numpy(dtype=np.float32))


class Backend:
    """No synchronisation: one process does all the work."""

    name = "single"
    rank = 0
    world_size = 1

    def wrap(self, net: nn.Module) -> nn.Module:
        return net

    def optimizer(self, opt: torch.optim.Optimizer, net: nn.Module) -> torch.optim.Optimizer:
        return opt

    def broadcast(self, net: nn.Module) -> None:
        """Make every worker start from rank 0's weights."""

    def close(self) -> None:
        """Release the process group, if any."""


class TorchDistributedBackend(Backend):
    """torch.distributed with DDP; started by torchrun (gloo on CPU, NCCL on GPU)."""

    name = "torch"

    def __init__(self) -> None:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        logger.info("torch.distributed %s: rank %d of %d", backend, self.rank, self.world_size)

    def wrap(self, net: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(net)

    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


class HorovodBackend(Backend):
    """Horovod allreduce through its DistributedOptimizer; started by ``horovodrun --gloo``.

    Each worker process builds one of these after horovodrun has set ``HOROVOD_RANK``
    and the gloo rendezvous variables. Gradients are averaged by the wrapped optimizer;
    the module itself is not wrapped. Per-worker torch threads are set by :func:`fit`.
    """

    name = "horovod"

    def __init__(self) -> None:
        try:
            import horovod.torch as hvd  # imported here: horovod is optional
        except ImportError as exc:
            import sys

            from jobs.common import cli

            cli.fail(
                f"--backend horovod: horovod.torch does not import in {sys.executable} ({exc}); "
                "build it with scripts/install_horovod.sh (CPU, gloo) or use the trainer-gpu image (NCCL)"
            )

        hvd.init()
        self._hvd = hvd
        self.rank = hvd.rank()
        self.world_size = hvd.size()
        logger.info("horovod: rank %d of %d", self.rank, self.world_size)

    def optimizer(self, opt: torch.optim.Optimizer, net: nn.Module) -> torch.optim.Optimizer:
        """Wrap ``opt`` so ``step()`` allreduces gradients, and give all ranks rank 0's state."""
        opt = self._hvd.DistributedOptimizer(opt, named_parameters=net.named_parameters())
        # NOTE: not hvd.broadcast_optimizer_state: on a fresh optimizer it first takes a
        # zero-gradient step to create the state, which for AdamW applies weight decay and
        # advances the step count, so horovod runs would drift from the torch backend's.
        # Sending the whole state dict (the pattern of hvd.broadcast_object's docs) covers
        # both a fresh and a restored optimizer, hyper-parameters included.
        state = self._hvd.broadcast_object(opt.state_dict(), root_rank=0, name="optimizer_state")
        if self.rank != 0:
            opt.load_state_dict(state)
        return opt

    def broadcast(self, net: nn.Module) -> None:
        self._hvd.broadcast_parameters(net.state_dict(), root_rank=0)

    def close(self) -> None:
        self._hvd.shutdown()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def average_precision(label: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(label, score)) if 0 < label.sum() < len(label) else float("nan")


def roc_auc(label: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(label, score)) if 0 < label.sum() < len(label) else float("nan")


EpochCallback = Callable[[int, dict[str, float]], None]


def fit(
    config: TrainConfig,
    pre: Preprocessor,
    train: SplitArrays,
    validation: SplitArrays,
    backend: Backend | None = None,
    on_epoch: EpochCallback | None = None,
    num_threads: int | None = None,
    pr_auc_se: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``config.members`` networks and return the model with a summary.

    One member is a :class:`FraudNet`; several are trained one after another, member
    ``i`` with seed ``config.seed + i``, and returned as a :class:`FraudEnsemble` that
    averages their logits. ``on_epoch`` sees each member's metrics, prefixed with
    ``member<i>/`` when there are several. ``pr_auc_se`` adds each epoch's bootstrap
    standard error of the validation PR-AUC (``val_pr_auc_se``) to those metrics.
    """
    backend = backend or Backend()
    if config.members < 1:
        raise ValueError(f"members must be at least 1, got {config.members}")
    positives = float(train.label.sum())
    if positives == 0:
        raise ValueError("the training split has no positive labels")
    val_positives = int(validation.label.sum())
    if not 0 < val_positives < len(validation):
        raise ValueError(f"the validation split ({len(validation)} rows, {val_positives} positive) needs both "
                         "labels: early stopping ranks it")
    nets, summaries = [], []
    for member in range(config.members):
        member_config = replace(config, seed=config.seed + member)
        callback = on_epoch
        if on_epoch is not None and config.members > 1:
            def callback(epoch: int, metrics: dict[str, float], _prefix: str = f"member{member}/") -> None:
                on_epoch(epoch, {_prefix + k: v for k, v in metrics.items()})
        if backend.rank == 0 and config.members > 1:
            logger.info("training member %d of %d (seed %d)", member + 1, config.members, member_config.seed)
        net, summary = _fit_one(member_config, pre, train, validation, backend, callback, num_threads, pr_auc_se)
        nets.append(net)
        summaries.append(summary)
    if config.members == 1:
        return nets[0], summaries[0]

    # The ensemble's own validation metrics decide nothing; they are what is reported.
    ensemble = FraudEnsemble(nets).eval()
    scores = predict_proba(ensemble, validation.categorical, validation.numeric)
    train_seconds = sum(s["train_seconds"] for s in summaries)
    samples = sum(s["samples"] for s in summaries)
    summary = {
        "members": config.members,
        "best_epoch": max(s["best_epoch"] for s in summaries),
        "member_best_epochs": [s["best_epoch"] for s in summaries],
        "best_val_pr_auc": average_precision(validation.label, scores),
        "best_val_auc": roc_auc(validation.label, scores),
        "member_val_pr_auc": [s["best_val_pr_auc"] for s in summaries],
        "member_val_auc": [s["best_val_auc"] for s in summaries],
        "pos_weight": summaries[0]["pos_weight"],
        "history": [{"member": i, **h} for i, s in enumerate(summaries) for h in s["history"]],
        "epochs_run": sum(s["epochs_run"] for s in summaries),
        "world_size": backend.world_size,
        "backend": backend.name,
        "train_seconds": train_seconds,
        "samples": samples,
        "samples_per_s": samples / train_seconds if train_seconds else None,
    }
    if backend.rank == 0:
        logger.info("ensemble of %d: val AUC %.4f, val PR-AUC %.4f (members' AUC %s)", config.members,
                    summary["best_val_auc"], summary["best_val_pr_auc"],
                    ", ".join(f"{a:.4f}" if a is not None else "n/a" for a in summary["member_val_auc"]))
    return ensemble, summary


def _fit_one(
    config: TrainConfig,
    pre: Preprocessor,
    train: SplitArrays,
    validation: SplitArrays,
    backend: Backend,
    on_epoch: EpochCallback | None,
    num_threads: int | None,
    pr_auc_se: bool = False,
) -> tuple[FraudNet, dict[str, Any]]:
    """Train one :class:`FraudNet` and return its best epoch's weights with a summary.

    Every worker holds the whole training split and takes an equal, disjoint share of
    each epoch's shuffled order, so all workers make the same number of steps. Every
    worker scores the whole validation split with the synchronised weights, so all reach
    the same early-stopping decision without talking to each other.
    """
    seed_everything(config.seed)
    torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // backend.world_size))

    # Model, loss and optimizer.
    net = FraudNet(
        ModelConfig(
            cardinalities=pre.cardinalities,
            n_numeric=len(pre.numeric_columns),
            hidden=list(config.hidden),
            dropout=config.dropout,
            max_embedding_dim=config.max_embedding_dim,
            target_encoding=config.target_encoding,
            target_smoothing=config.target_smoothing,
            numeric_bins=config.numeric_bins,
            target_pairs=all_pairs(len(pre.cardinalities)) if config.target_pairs else [],
        )
    )
    # Every worker holds the whole training split, so all fit the same encodings.
    out_of_fold = net.fit_encodings(train.categorical, train.numeric, train.label, seed=config.seed)
    encoded = torch.from_numpy(out_of_fold) if out_of_fold is not None else None
    backend.broadcast(net)
    model = backend.wrap(net)
    positives = float(train.label.sum())
    pos_weight = config.pos_weight or (len(train) - positives) / positives
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float32))
    opt = backend.optimizer(
        torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay), net
    )
    local_batch = max(1, config.batch_size // backend.world_size)
    cats = torch.from_numpy(train.categorical)
    nums = torch.from_numpy(train.numeric)
    labels = torch.from_numpy(train.label)

    # Epochs with early stopping on validation PR-AUC.
    best: dict[str, Any] = {"val_pr_auc": -1.0, "epoch": 0}
    best_state = copy.deepcopy(net.state_dict())
    history: list[dict[str, float]] = []
    stale = 0
    train_seconds, samples = 0.0, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        # Seeded by (seed, epoch): member i + 1 must not replay member i's orders one epoch late.
        order = np.random.default_rng((config.seed, epoch)).permutation(len(train))
        usable = (len(order) // backend.world_size) * backend.world_size
        shard = torch.from_numpy(order[:usable][backend.rank :: backend.world_size])
        total, steps = 0.0, 0
        for start in range(0, len(shard), local_batch):
            idx = shard[start : start + local_batch]
            # Plain zero_grad(): torch 2 sets gradients to None by default, and Horovod
            # 0.28.1's DistributedOptimizer.zero_grad() accepts no arguments.
            opt.zero_grad()
            logits = model(cats[idx], nums[idx], encoded[idx]) if encoded is not None else model(cats[idx], nums[idx])
            loss = loss_fn(logits, labels[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        train_seconds += time.perf_counter() - epoch_start
        samples += usable
        scores = predict_proba(net, validation.categorical, validation.numeric)
        metrics = {
            "train_loss": total / max(steps, 1),
            "val_auc": roc_auc(validation.label, scores),
            "val_pr_auc": average_precision(validation.label, scores),
        }
        if pr_auc_se:
            metrics["val_pr_auc_se"] = average_precision_se(validation.label, scores, seed=epoch)
        history.append({"epoch": epoch, **metrics})
        if backend.rank == 0:
            logger.info(
                "epoch %d/%d: loss %.4f, val AUC %.4f, val PR-AUC %.4f",
                epoch, config.epochs, metrics["train_loss"], metrics["val_auc"], metrics["val_pr_auc"],
            )
        if on_epoch:
            on_epoch(epoch, metrics)
        score = metrics["val_pr_auc"] if not math.isnan(metrics["val_pr_auc"]) else metrics["val_auc"]
        if score > best["val_pr_auc"]:
            best = {"val_pr_auc": score, "val_auc": metrics["val_auc"], "epoch": epoch}
            best_state = copy.deepcopy(net.state_dict())
            stale = 0
        else:
            stale += 1
            if stale >= config.patience:
                if backend.rank == 0:
                    logger.info("early stop after epoch %d: best epoch %d", epoch, best["epoch"])
                break

    net.load_state_dict(best_state)
    net.eval()
    summary = {"best_epoch": best["epoch"], "best_val_pr_auc": best["val_pr_auc"],
               "best_val_auc": best.get("val_auc"), "pos_weight": pos_weight, "history": history,
               "epochs_run": len(history), "world_size": backend.world_size, "backend": backend.name,
               "train_seconds": train_seconds, "samples": samples, "samples_per_s": samples / train_seconds if train_seconds else None}
    return net, summary
