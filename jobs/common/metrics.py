"""Classification metrics and plots shared by ``evaluate`` and ``register``."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm


def ranking_metrics(label: np.ndarray, score: np.ndarray) -> dict[str, float | None]:
    """AUC-ROC, PR-AUC (average precision) and Brier score; None where undefined."""
    label = np.asarray(label, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    both = 0 < label.sum() < len(label)
    return {
        "auc": float(skm.roc_auc_score(label, score)) if both else None,
        "pr_auc": float(skm.average_precision_score(label, score)) if both else None,
        "brier": float(skm.brier_score_loss(label, score)) if len(label) else None,
        "rows": int(len(label)),
        "positives": int(label.sum()),
    }


def average_precision_se(label: np.ndarray, score: np.ndarray, resamples: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error of the average precision of ``score``.

    A Poisson bootstrap (each row weighted by a Poisson(1) draw) over one sort of the
    scores, so each resample costs two cumulative sums. With tens of positives, as in the
    TalkingData sample's validation split, it is of the same order as the differences
    between hyper-parameter settings; ``tune`` uses it to tell the two apart. NaN when
    either label is missing.
    """
    label = np.asarray(label, dtype=np.float64)
    if not 0 < label.sum() < len(label):
        return float("nan")
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    y, ranked = label[order], np.asarray(score, dtype=np.float64)[order]
    # Tied scores are one threshold, as in sklearn: precision is read at a tie group's end.
    group_end = np.r_[ranked[1:] != ranked[:-1], True]
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for i in range(resamples):
        values[i] = _weighted_average_precision(y, group_end, rng.poisson(1.0, len(y)).astype(np.float64))
    return float(np.nanstd(values, ddof=1))


def _weighted_average_precision(y: np.ndarray, group_end: np.ndarray, w: np.ndarray) -> float:
    """Average precision of rows sorted by descending score, each row counted ``w`` times."""
    true_positives = np.cumsum(w * y)[group_end]
    precision = true_positives / np.maximum(np.cumsum(w)[group_end], 1e-12)
    gained = np.diff(true_positives, prepend=0.0)
    return float((gained * precision).sum() / true_positives[-1]) if true_positives[-1] else float("nan")


def choose_threshold(label: np.ndarray, score: np.ndarray) -> float:
    """The score threshold that maximises F1 on ``label`` (use the validation split)."""
    precision, recall, thresholds = skm.precision_recall_curve(label, score)
    f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
    if len(thresholds) == 0:
        return 0.5
    return float(thresholds[int(np.argmax(f1))])


def at_threshold(label: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, Any]:
    """Precision, recall, F1 and the confusion matrix of ``score >= threshold``."""
    label = np.asarray(label, dtype=np.int64)
    pred = (np.asarray(score) >= threshold).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(label, pred, labels=[0, 1]).ravel()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "threshold": float(threshold),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def plot_curves(label: np.ndarray, score: np.ndarray, title: str, path: str) -> None:
    """ROC, precision-recall and reliability curves side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    fpr, tpr, _ = skm.roc_curve(label, score)
    axes[0].plot(fpr, tpr, label=f"AUC {skm.roc_auc_score(label, score):.4f}")
    axes[0].plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    precision, recall, _ = skm.precision_recall_curve(label, score)
    axes[1].plot(recall, precision, label=f"PR-AUC {skm.average_precision_score(label, score):.4f}")
    axes[1].axhline(label.mean(), linestyle="--", color="grey", linewidth=0.8)
    axes[1].set(xlabel="recall", ylabel="precision", title="Precision-recall")
    frac, mean_pred = calibration_curve(label, score, n_bins=10, strategy="quantile")
    axes[2].plot(mean_pred, frac, marker="o")
    axes[2].plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    axes[2].set(xlabel="mean predicted probability", ylabel="observed rate", title="Reliability")
    for ax in axes[:2]:
        ax.legend(loc="lower right" if ax is axes[0] else "upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def savings_curve(is_fraud: np.ndarray, fraud_score: np.ndarray, cost: np.ndarray, blocked_legit_loss: float):
    """Money saved by blocking every click scoring at least each candidate threshold.

    A blocked fraudulent click saves its cost; a blocked legitimate click loses
    ``blocked_legit_loss``. Returns (thresholds, savings), thresholds descending.
    """
    order = np.argsort(-fraud_score, kind="stable")
    score = fraud_score[order]
    fraud = is_fraud[order].astype(bool)
    saved = np.cumsum(np.where(fraud, cost[order], 0.0))
    lost = np.cumsum(np.where(fraud, 0.0, blocked_legit_loss))
    # Only the last row of a run of equal scores is a real cut point.
    last = np.r_[score[1:] != score[:-1], True]
    return score[last], (saved - lost)[last]


def choose_threshold_savings(is_fraud, fraud_score, cost, blocked_legit_loss: float) -> tuple[float, float]:
    """(threshold, savings) maximising money saved; blocking nothing saves 0."""
    thresholds, savings = savings_curve(np.asarray(is_fraud), np.asarray(fraud_score, dtype=np.float64),
                                        np.asarray(cost, dtype=np.float64), blocked_legit_loss)
    if len(savings) == 0 or savings.max() <= 0:
        return float(np.nextafter(1.0, 2.0)), 0.0
    best = int(np.argmax(savings))
    return float(thresholds[best]), float(savings[best])


def savings_at(is_fraud, fraud_score, cost, blocked_legit_loss: float, threshold: float) -> float:
    flag = np.asarray(fraud_score) >= threshold
    fraud = np.asarray(is_fraud).astype(bool)
    return float(np.asarray(cost)[flag & fraud].sum() - blocked_legit_loss * (flag & ~fraud).sum())
