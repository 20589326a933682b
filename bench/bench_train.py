"""Training throughput for 1 and 2 torch.distributed workers (and Horovod if installed).

Generates synthetic events, builds features with the ETL once, then runs the ``train``
stage with each worker count on the same features and prints samples/s side by side,
as a ratio against one worker. Only the training loop is timed (the stage measures
it), not process start-up or data loading.

    python bench/bench_train.py [--rows 200000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile


def run(cmd: list[str], env: dict) -> None:
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="synthetic events to generate")
    p.add_argument("--epochs", type=int, default=2, help="epochs per measured run")
    p.add_argument("--batch-size", type=int, default=1024, help="global batch size")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="adfraud-bench-train-")
    env = dict(os.environ, ADFRAUD_HOME=os.path.join(tmp, "home"), SPARK_LOCAL_IP="127.0.0.1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        raw, feats = os.path.join(tmp, "raw"), os.path.join(tmp, "features")
        run([sys.executable, "-m", "jobs.generate", "--output", raw, "--rows", str(args.rows),
             "--result-path", os.path.join(tmp, "g.json")], env)
        run([sys.executable, "-m", "jobs.etl", "--input", raw, "--output", feats, "--dataset", "synthetic",
             "--result-path", os.path.join(tmp, "e.json")], env)
        backends = [("torch", 1), ("torch", 2)]
        if shutil.which("horovodrun"):
            backends.append(("horovod", 2))
        rows = []
        for backend, workers in backends:
            result = os.path.join(tmp, f"t-{backend}-{workers}.json")
            run([sys.executable, "-m", "jobs.train", "--features", feats, "--output", os.path.join(tmp, "m"),
                 "--workers", str(workers), "--backend", backend, "--members", "1", "--epochs", str(args.epochs),
                 "--patience", str(args.epochs), "--batch-size", str(args.batch_size), "--result-path", result], env)
            with open(result) as handle:
                r = json.load(handle)
            rows.append((backend, workers, r["samples_per_s"], r["train_seconds"], r["best_val_auc"]))
        base = rows[0][2]
        print(f"training throughput, {args.rows} events ({rows and json.load(open(os.path.join(tmp, 'e.json')))['splits']['train']['rows']} train rows), "
              f"{args.epochs} epochs, batch {args.batch_size}, {os.cpu_count()} CPUs")
        print(f"{'backend':<10}{'workers':>8}{'samples/s':>14}{'train s':>10}{'vs 1 worker':>13}{'val AUC':>10}")
        for backend, workers, sps, secs, auc in rows:
            print(f"{backend:<10}{workers:>8}{sps:>14,.0f}{secs:>10.1f}{sps / base:>12.2f}x{auc:>10.4f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
