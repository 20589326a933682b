"""Latency and throughput of ``jobs.serve`` with onnxruntime beside eager PyTorch.

Builds an untrained TalkingData model of the production architecture (timing does not
depend on the weights), starts ``python -m jobs.serve`` on 127.0.0.1 once per backend
and measures, over loopback only and within fixed request counts:

* p50 / p99 latency of single-event and 256-event requests sent at a fixed rate (one
  client; latency counts from the scheduled send time, so a slow reply delays the
  clock of the next one instead of hiding it);
* peak throughput with a few concurrent clients for a bounded time;
* in-process batch scoring rows/s (model inputs to probabilities, as ``jobs.score`` does).

Client and server share the machine's cores, which the numbers include.

Usage::

    python bench/bench_serving.py                       # defaults: about two minutes
    python bench/bench_serving.py --single-requests 300 --batch-requests 60 --peak-s 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
T0_US = 1_510_047_038_000_000
# Vocabulary sizes of the categorical columns, about those of the full TalkingData set.
VOCAB = {"app": 400, "device": 300, "os": 250, "channel": 180}
BACKENDS = ("onnxruntime", "torch")


def build_model(root: Path) -> Path:
    """An untrained model with the default architecture; returns its serving config."""
    import torch

    from jobs.common import features
    from jobs.common.datasets import TALKINGDATA
    from jobs.common.features import Preprocessor
    from jobs.common.model import FraudNet, ModelConfig, save_checkpoint
    from jobs.export import export_onnx
    from jobs.rollout import serving_config

    spec = TALKINGDATA
    categorical = {c: [str(i) for i in range(VOCAB[c])] for c in features.categorical_features(spec)}
    numeric = {c: {"mean": 1.0, "std": 2.0} for c in features.numeric_features(spec)}
    pre = Preprocessor(spec.name, categorical, numeric, features.feature_spec_hash(spec))
    torch.manual_seed(0)
    net = FraudNet(ModelConfig(pre.cardinalities, len(numeric))).eval()
    export_onnx(net, len(categorical), len(numeric), str(root / "model.onnx"))
    save_checkpoint(net, str(root / "model.pt"))
    (root / "preprocessor.json").write_text(json.dumps(pre.to_dict()))
    config = serving_config("adfraud-talkingdata-bench", 1, pre, str(root), checkpoint_uri=str(root / "model.pt"))
    path = root / "config.json"
    path.write_text(json.dumps(config))
    return path


class EventSource:
    """TalkingData-like raw events in time order: skewed IPs, increasing times, unique ids."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.next_id = 0
        self.now_us = T0_US

    def take(self, n: int) -> list[dict]:
        ips = (self.rng.zipf(1.3, n) % 50_000).tolist()
        out = []
        for i in range(n):
            self.now_us += int(self.rng.integers(0, 20_000))
            out.append(
                {
                    "event_id": self.next_id,
                    "ip": ips[i],
                    "app": int(self.rng.integers(0, 450)),
                    "device": int(self.rng.integers(0, 320)),
                    "os": int(self.rng.integers(0, 260)),
                    "channel": int(self.rng.integers(0, 200)),
                    "click_time": self.now_us / 1e6,
                }
            )
            self.next_id += 1
        return out

    def bodies(self, count: int, size: int) -> list[bytes]:
        return [json.dumps({"events": self.take(size)}).encode() for _ in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(config: Path, backend: str, workdir: Path):
    """``python -m jobs.serve`` with ``backend`` on a free loopback port; yields its URL."""
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADFRAUD_")}
    env.update(
        {
            "ADFRAUD_HOME": str(workdir),
            "ADFRAUD_SERVING_BACKEND": backend,
            "ADFRAUD_SERVING_POLL_S": "0",
            "ADFRAUD_SERVING_THREADS": "1",
        }
    )
    log = open(workdir / f"serve-{backend}.log", "wb")  # closed in the finally below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.serve",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not become ready; see {log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def fixed_rate(url: str, bodies: list[bytes], rate: float) -> np.ndarray:
    """Latencies (s) of ``bodies`` sent at ``rate`` per second, from their scheduled times."""
    import httpx

    headers = {"content-type": "application/json"}
    latencies = np.empty(len(bodies))
    with httpx.Client(base_url=url, timeout=30) as client:
        start = time.perf_counter() + 0.05
        for i, body in enumerate(bodies):
            scheduled = start + i / rate
            pause = scheduled - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            response = client.post("/v1/score", content=body, headers=headers)
            if response.status_code != 200:
                raise SystemExit(f"request failed: {response.status_code} {response.text[:300]}")
            latencies[i] = time.perf_counter() - scheduled
    return latencies


def peak(url: str, bodies: list[bytes], clients: int, seconds: float) -> float:
    """Requests per second that ``clients`` closed-loop clients sustain, over at most
    ``seconds`` and at most ``len(bodies)`` requests."""
    import httpx

    headers = {"content-type": "application/json"}
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    stop_at = time.perf_counter() + seconds

    def work() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while time.perf_counter() < stop_at:
                with lock:
                    i = state["next"]
                    state["next"] += 1
                if i >= len(bodies):
                    return
                if client.post("/v1/score", content=bodies[i], headers=headers).status_code != 200:
                    raise SystemExit("request failed during the throughput run")
                with lock:
                    state["done"] += 1

    began = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return state["done"] / (time.perf_counter() - began)


def batch_scoring(config: Path, rows: int, events: EventSource, threads: int) -> dict[str, float]:
    """Rows/s of model inputs -> probabilities in process, per backend, ``threads`` each."""
    import onnxruntime as ort
    import torch

    from jobs.common.datasets import TALKINGDATA
    from jobs.common.features import Preprocessor
    from jobs.common.model import load_checkpoint, predict_proba
    from jobs.online_features import (
        DEFAULT_LATENESS_S,
        FeaturePlan,
        InputEncoder,
        MemoryFeatureStore,
        OnlineFeatures,
    )

    cfg = json.loads(config.read_text())
    pre = Preprocessor.from_dict(json.loads(Path(cfg["preprocessor_uri"]).read_text()))
    raw = events.take(rows)
    for e in raw:
        e["click_time"] = round(e["click_time"] * 1e6)
    online = OnlineFeatures(TALKINGDATA, MemoryFeatureStore(FeaturePlan.build(DEFAULT_LATENESS_S)))
    tick = time.perf_counter()
    columns = online.compute(raw)
    features_s = time.perf_counter() - tick
    cats, nums = InputEncoder(pre).encode(columns)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(cfg["onnx_uri"], options, providers=["CPUExecutionProvider"])
    chunk = 65_536

    def run_ort() -> None:
        for s in range(0, rows, chunk):
            session.run(["probability"], {"categorical": cats[s : s + chunk], "numeric": nums[s : s + chunk]})

    torch.set_num_threads(threads)
    net, _ = load_checkpoint(cfg["checkpoint_uri"])

    def run_torch() -> None:
        predict_proba(net, cats, nums, batch_size=chunk)

    out = {"online features": rows / features_s}
    for name, fn in (("onnxruntime", run_ort), ("torch", run_torch)):
        fn()  # warm-up
        tick = time.perf_counter()
        fn()
        out[name] = rows / (time.perf_counter() - tick)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--single-requests", type=int, default=1_000, help="single-event requests at the fixed rate"
    )
    p.add_argument("--single-rate", type=float, default=200.0, help="single-event requests per second")
    p.add_argument("--batch-requests", type=int, default=200, help="256-event requests at the fixed rate")
    p.add_argument("--batch-rate", type=float, default=10.0, help="256-event requests per second")
    p.add_argument("--batch-size", type=int, default=256, help="events per batch request")
    p.add_argument("--peak-s", type=float, default=4.0, help="seconds per peak-throughput run")
    p.add_argument("--peak-clients", type=int, default=2, help="concurrent clients in the peak runs")
    p.add_argument("--scoring-rows", type=int, default=200_000, help="rows for in-process batch scoring")
    p.add_argument("--warmup-requests", type=int, default=200, help="requests before measuring")
    p.add_argument(
        "--scoring-threads",
        type=int,
        default=1,
        help="threads per backend for batch scoring (1 is fastest on shared cores)",
    )
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))

    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = build_model(work)
        for backend in BACKENDS:
            events = EventSource(seed=1)
            warm = events.bodies(args.warmup_requests, 1) + events.bodies(20, args.batch_size)
            single = events.bodies(args.single_requests, 1)
            batch = events.bodies(args.batch_requests, args.batch_size)
            peak_single = events.bodies(int(args.peak_s * 3_000), 1)
            peak_batch = events.bodies(int(args.peak_s * 100), args.batch_size)
            with server(config, backend, work) as url:
                fixed_rate(url, warm, 500.0)
                lat1 = fixed_rate(url, single, args.single_rate) * 1e3
                latb = fixed_rate(url, batch, args.batch_rate) * 1e3
                rps1 = peak(url, peak_single, args.peak_clients, args.peak_s)
                rpsb = peak(url, peak_batch, args.peak_clients, args.peak_s)
            rows.setdefault(f"1-event p50 ms @ {args.single_rate:g}/s", {})[backend] = float(
                np.percentile(lat1, 50)
            )
            rows.setdefault(f"1-event p99 ms @ {args.single_rate:g}/s", {})[backend] = float(
                np.percentile(lat1, 99)
            )
            rows.setdefault(f"{args.batch_size}-event p50 ms @ {args.batch_rate:g}/s", {})[backend] = float(
                np.percentile(latb, 50)
            )
            rows.setdefault(f"{args.batch_size}-event p99 ms @ {args.batch_rate:g}/s", {})[backend] = float(
                np.percentile(latb, 99)
            )
            rows.setdefault(f"peak 1-event requests/s ({args.peak_clients} clients)", {})[backend] = rps1
            rows.setdefault(f"peak events/s in {args.batch_size}-event requests", {})[backend] = (
                rpsb * args.batch_size
            )
        scoring = batch_scoring(config, args.scoring_rows, EventSource(seed=2), args.scoring_threads)
    for backend in BACKENDS:
        rows.setdefault("batch scoring rows/s (model, in process)", {})[backend] = scoring[backend]

    print(
        f"cores: {os.cpu_count()} (load average {os.getloadavg()[0]:.1f}); client and server share them; "
        f"loopback HTTP, one uvicorn worker, 1 model thread; batch scoring {args.scoring_threads} thread(s)"
    )
    print(f"{'metric':<44} {'onnxruntime':>12} {'torch eager':>12} {'ORT speed-up':>13}")
    for name, values in rows.items():
        ort_v, torch_v = values["onnxruntime"], values["torch"]
        lower_is_better = " ms " in name
        ratio = torch_v / ort_v if lower_is_better else ort_v / torch_v
        print(f"{name:<44} {ort_v:>12,.2f} {torch_v:>12,.2f} {ratio:>12.2f}x")
    print(f"online features (in process, shared by both): {scoring['online features']:,.0f} events/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
