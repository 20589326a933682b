"""Throughput of ``jobs.generate`` against the original per-row Faker design, side by side.

The original design called Faker once per field per row in a Python loop (uuid4 for the
event and the device, random_element for the campaign, date_time_between, ipv4,
user_agent), drew the cost and a 5 % coin-flip label with ``random``, built a list of
dicts and a pandas DataFrame, and wrote it to parquet. It runs here on a bounded number
of rows; the vectorized generator runs as its own process (``python -m jobs.generate``)
on many more, parquet write included. Optionally a second generator process measures
peak memory (``ru_maxrss``) at a large row count.

Usage::

    python bench/bench_generate.py                      # 20k baseline rows, 2M generator rows
    python bench/bench_generate.py --rss-rows 10000000  # also peak RSS at 10M rows
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYWORDS = ("brand", "generic", "competitor", "premium")


def original_design(rows: int, seed: int, path: Path) -> float:
    """The per-row Faker loop; returns seconds including the parquet write."""
    import pandas as pd
    from faker import Faker

    began = time.perf_counter()
    fake = Faker()
    fake.seed_instance(seed)
    draw = random.Random(seed)
    campaigns = [f"cmp-{i:04d}" for i in range(60)]
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 8, tzinfo=UTC)
    records = []
    for _ in range(rows):
        campaign = fake.random_element(campaigns)
        records.append(
            {
                "event_id": fake.uuid4(),
                "campaign_id": campaign,
                "ad_group": f"{campaign}-ag{fake.random_int(0, 5):02d}",
                "keyword_type": fake.random_element(KEYWORDS),
                "click_time": fake.date_time_between(start, end, tzinfo=UTC),
                "ip_address": fake.ipv4(),
                "device_id": fake.uuid4(),
                "user_agent": fake.user_agent(),
                "click_cost": round(draw.uniform(0.1, 5.0), 4),
                "is_fraud": int(draw.random() < 0.05),
            }
        )
    pd.DataFrame.from_records(records).to_parquet(path)
    return time.perf_counter() - began


def run_generator(rows: int, seed: int, output: Path) -> tuple[float, dict, int]:
    """``python -m jobs.generate`` in a child process: wall seconds, its result, peak RSS in KiB."""
    result_path = output.parent / f"{output.name}.json"
    command = [
        sys.executable, "-m", "jobs.generate", "--output", str(output), "--rows", str(rows),
        "--seed", str(seed), "--result-path", str(result_path),
    ]
    began = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 gives this child's own rusage (ru_maxrss is in KiB on Linux).
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - began
    stderr = child.stderr.read().decode() if child.stderr else ""
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"jobs.generate failed ({child.returncode}):\n{stderr[-2000:]}")
    return seconds, json.loads(result_path.read_text()), usage.ru_maxrss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-rows", type=int, default=20_000, help="rows for the per-row Faker loop")
    p.add_argument("--rows", type=int, default=2_000_000, help="rows for jobs.generate")
    p.add_argument("--rss-rows", type=int, default=0, help="also measure peak RSS at this size")
    p.add_argument("--seed", type=int, default=7, help="seed of both generators")
    p.add_argument("--workdir", default=None, help="where outputs go (default: a temporary folder, removed)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)

        # Baseline and ours, side by side
        base_s = original_design(args.baseline_rows, args.seed, work / "baseline.parquet")
        ours_s, result, ours_rss = run_generator(args.rows, args.seed, work / "ours")
        base_rate = args.baseline_rows / base_s
        ours_wall_rate = args.rows / ours_s

        rows = [
            ("original design (Faker per field, Python loop)", args.baseline_rows, base_s, base_rate, "-"),
            ("jobs.generate, in-process (from its result)", args.rows, result["elapsed_s"],
             result["events_per_s"], "-"),
            ("jobs.generate, whole process (incl. start-up)", args.rows, ours_s, ours_wall_rate,
             f"{ours_rss / 1024:.0f}"),
        ]

        # Peak memory at a large size
        if args.rss_rows:
            rss_s, _, rss_kib = run_generator(args.rss_rows, args.seed, work / "rss")
            rows.append(("jobs.generate, whole process (incl. start-up)", args.rss_rows, rss_s,
                         args.rss_rows / rss_s, f"{rss_kib / 1024:.0f}"))

    print(f"{'generator':<50} {'rows':>12} {'seconds':>9} {'events/s':>12} {'peak RSS MiB':>13}")
    for name, n, seconds, rate, rss in rows:
        print(f"{name:<50} {n:>12,} {seconds:>9.2f} {rate:>12,.0f} {rss:>13}")
    print(f"speed-up (whole process vs original design): {ours_wall_rate / base_rate:,.0f}x")
    print(f"speed-up (in-process vs original design):    {result['events_per_s'] / base_rate:,.0f}x")
    print(f"generated fraud rate {result['fraud_rate']:.4f}, Bayes AUC {result['bayes_auc']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
