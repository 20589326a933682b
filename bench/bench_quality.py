"""Model quality on real clicks: LightGBM against the network and its parts, over seeds.

Runs the TalkingData sample through ingest and the Spark ETL once (or takes an ETL
output), then trains, with each seed, LightGBM and the network's steps so far: plain
embeddings + a 128-64 MLP, + target encoding, + piecewise-linear numeric encoding, a
3-member ensemble of those, and what ``train`` builds by default (8 members of 256-128). It
prints test AUC and PR-AUC on the last 15% of clicks by time (35 attributed), the
validation AUC, and the mean over seeds with its ratio to LightGBM's.

    python bench/bench_quality.py [--features ETL_OUTPUT] [--seeds 7,17,27,37,47]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DEFAULT_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "talkingdata" / "train_sample.csv"

# Variant name -> TrainConfig overrides.
SMALL = {"hidden": [128, 64]}
VARIANTS = {
    "mlp": {**SMALL, "members": 1, "target_encoding": False, "numeric_bins": 0},
    "mlp+te": {**SMALL, "members": 1, "numeric_bins": 0},
    "mlp+te+ple": {**SMALL, "members": 1},
    "ensemble(3)": {**SMALL, "members": 3},
    "default": {},
}


def build_features(sample: str, tmp: str) -> str:
    env = dict(os.environ, ADFRAUD_HOME=os.path.join(tmp, "home"), SPARK_LOCAL_IP="127.0.0.1")
    raw, feats = os.path.join(tmp, "raw"), os.path.join(tmp, "features")
    for cmd in (["jobs.ingest", "--input", sample, "--output", raw],
                ["jobs.etl", "--input", raw, "--output", feats, "--dataset", "talkingdata"]):
        subprocess.run([sys.executable, "-m", *cmd, "--result-path", os.path.join(tmp, "r.json")], check=True,
                       env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return feats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", default=None, help="TalkingData ETL output (default: build it from --sample)")
    p.add_argument("--sample", default=str(DEFAULT_SAMPLE), help="TalkingData CSV for the ETL")
    p.add_argument("--seeds", default="7,17,27,37,47", help="comma-separated seeds")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from jobs import baseline
    from jobs.common import datasets, metrics, storage
    from jobs.common.features import Preprocessor
    from jobs.common.model import predict_proba
    from jobs.common.training import TrainConfig, fit, load_split

    seeds = [int(s) for s in args.seeds.split(",") if s]
    tmp = tempfile.mkdtemp(prefix="adfraud-bench-quality-")
    feats = args.features or build_features(args.sample, tmp)
    pre = Preprocessor.from_dict(storage.read_json(storage.join(feats, "preprocessor.json")))
    spec = datasets.get(pre.dataset)
    splits = {name: load_split(storage.join(feats, name), spec, pre)[1] for name in ("train", "validation", "test")}

    rows: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in ["lightgbm", *VARIANTS]}
    for seed in seeds:
        started = time.perf_counter()
        ns = argparse.Namespace(features=feats, output=os.path.join(tmp, f"gbdt{seed}"), seed=seed, rounds=1000,
                                early_stopping_rounds=50, balanced=False, mlflow_run_id=None)
        r = baseline.run(ns)
        rows["lightgbm"].append((r["test_auc"], r["test_pr_auc"], r["validation_auc"], time.perf_counter() - started))
        for name, overrides in VARIANTS.items():
            started = time.perf_counter()
            net, _ = fit(TrainConfig(seed=seed, **overrides), pre, splits["train"], splits["validation"],
                         num_threads=2)
            seconds = time.perf_counter() - started
            test = metrics.ranking_metrics(splits["test"].label, predict_proba(net, splits["test"].categorical,
                                                                               splits["test"].numeric))
            val = metrics.ranking_metrics(splits["validation"].label,
                                          predict_proba(net, splits["validation"].categorical,
                                                        splits["validation"].numeric))
            rows[name].append((test["auc"], test["pr_auc"], val["auc"], seconds))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1][0]:.4f}" for k, v in rows.items()), flush=True)

    base = np.mean([r[0] for r in rows["lightgbm"]])
    print(f"\nTalkingData sample, test = last 15% by time ({int(splits['test'].label.sum())} positives), "
          f"seeds {seeds}")
    wins = sum(n[0] >= g[0] for n, g in zip(rows["default"], rows["lightgbm"], strict=True))
    print(f"default network's test AUC >= LightGBM's with the same seed: {wins} of {len(seeds)} seeds")
    print(f"{'model':<14}{'test AUC':>10}{'min':>8}{'max':>8}{'PR-AUC':>9}{'val AUC':>9}{'fit s':>8}{'AUC/LGBM':>10}")
    for name, values in rows.items():
        a = np.array(values)
        print(f"{name:<14}{a[:, 0].mean():>10.4f}{a[:, 0].min():>8.4f}{a[:, 0].max():>8.4f}{a[:, 1].mean():>9.4f}"
              f"{a[:, 2].mean():>9.4f}{a[:, 3].mean():>8.1f}{a[:, 0].mean() / base:>10.4f}")


if __name__ == "__main__":
    main()
