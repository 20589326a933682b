"""Build a TensorRT engine from the served ONNX model and check it against onnxruntime.

For a machine with an NVIDIA GPU and TensorRT (the serving-tensorrt image). Builds the
engine exactly as the serving backend does (``jobs.serve.TensorRTBackend``: one
optimization profile over batch sizes ``1..--max-batch`` tuned for ``--opt-batch``, FP32
with TF32 off), scores the same random inputs with both runtimes at several batch sizes
(one above ``--max-batch`` to exercise the chunked path), fails unless every score is
within ``--tolerance`` of onnxruntime's, and prints per-batch latency of both.

Usage::

    python scripts/build_tensorrt_check.py --onnx var/serving/models/adfraud-talkingdata/v3/model.onnx
    python scripts/build_tensorrt_check.py --onnx model.onnx --engine-out model.plan --batches 1,256,10000

The preprocessor (``--preprocessor``, or ``preprocessor.json`` beside the ONNX file)
supplies the embedding sizes, so that random ids stay in range; without it every id is
the out-of-vocabulary 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("build_tensorrt_check")


def cardinalities(onnx_path: Path, preprocessor: str | None, n_categorical: int) -> list[int]:
    """Embedding sizes per categorical input, from the preprocessor when there is one."""
    from jobs.common.features import Preprocessor

    path = Path(preprocessor) if preprocessor else onnx_path.with_name("preprocessor.json")
    if not path.exists():
        logger.warning("no preprocessor at %s: all categorical ids are 0 (OOV)", path)
        return [1] * n_categorical
    pre = Preprocessor.from_dict(json.loads(path.read_text()))
    if len(pre.cardinalities) != n_categorical:
        raise SystemExit(
            f"{path} has {len(pre.cardinalities)} categorical columns, the model {n_categorical}"
        )
    return pre.cardinalities


def latency_ms(fn, iterations: int) -> tuple[float, float]:
    """p50 and p99 of ``fn()`` in milliseconds after a short warm-up."""
    for _ in range(min(10, iterations)):
        fn()
    times = np.empty(iterations)
    for i in range(iterations):
        tick = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - tick
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--onnx", required=True, help="the ONNX model (inputs categorical, numeric; output probability)"
    )
    p.add_argument("--preprocessor", default=None, help="preprocessor.json (default: beside the ONNX file)")
    p.add_argument("--max-batch", type=int, default=4_096, help="largest batch of the optimization profile")
    p.add_argument("--opt-batch", type=int, default=256, help="batch size the profile is tuned for")
    p.add_argument("--batches", default="1,16,256,4096,10000", help="batch sizes to check, comma separated")
    p.add_argument("--iterations", type=int, default=200, help="timed runs per batch size and runtime")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |tensorrt - onnxruntime|")
    p.add_argument("--engine-out", default=None, help="where to write the serialized engine")
    p.add_argument("--result-path", default=None, help="where to write the results as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(REPO))
    from jobs.serve import OnnxRuntimeBackend, TensorRTBackend

    onnx_path = Path(args.onnx)
    onnx_bytes = onnx_path.read_bytes()
    reference = OnnxRuntimeBackend(onnx_bytes, threads=os.cpu_count() or 1)
    n_cat, n_num = reference.input_widths["categorical"], reference.input_widths["numeric"]
    batches = sorted({int(b) for b in args.batches.split(",") if b})

    # Random inputs in range, shared by both runtimes.
    rng = np.random.default_rng(args.seed)
    rows = max(batches)
    cats = np.stack(
        [rng.integers(0, k, rows) for k in cardinalities(onnx_path, args.preprocessor, n_cat)], axis=1
    )
    cats = np.ascontiguousarray(cats, dtype=np.int64)
    nums = rng.normal(0.0, 1.0, (rows, n_num)).astype(np.float32)

    # The engine, built as the serving backend builds it.
    tick = time.perf_counter()
    try:
        engine = TensorRTBackend(onnx_bytes, max_batch=args.max_batch, opt_batch=args.opt_batch)
    except (ImportError, RuntimeError) as exc:
        print(f"error: cannot build a TensorRT engine here: {exc}", file=sys.stderr)
        return 2
    build_s = time.perf_counter() - tick
    if args.engine_out:
        Path(args.engine_out).write_bytes(bytes(engine.engine.serialize()))
        logger.info("engine written to %s", args.engine_out)

    results = []
    for batch in batches:
        c, x = cats[:batch], nums[:batch]
        want = reference.predict(c, x)
        got = engine.predict(c, x)
        diff = float(np.max(np.abs(got - want)))
        trt_p50, trt_p99 = latency_ms(lambda c=c, x=x: engine.predict(c, x), args.iterations)
        ort_p50, ort_p99 = latency_ms(lambda c=c, x=x: reference.predict(c, x), args.iterations)
        results.append(
            {
                "batch": batch,
                "max_abs_diff": diff,
                "passed": diff <= args.tolerance,
                "tensorrt_p50_ms": trt_p50,
                "tensorrt_p99_ms": trt_p99,
                "onnxruntime_p50_ms": ort_p50,
                "onnxruntime_p99_ms": ort_p99,
                "chunked": batch > args.max_batch,
            }
        )

    print(
        f"engine built in {build_s:.1f} s; profile 1..{args.max_batch} (opt {args.opt_batch}); "
        f"tolerance {args.tolerance:g}"
    )
    print(
        f"{'batch':>7} {'max |trt-ort|':>14} {'ok':>3} {'trt p50 ms':>11} {'trt p99 ms':>11} "
        f"{'ort p50 ms':>11} {'ort p99 ms':>11} {'trt rows/s':>12}"
    )
    for r in results:
        rate = r["batch"] / (r["tensorrt_p50_ms"] / 1e3)
        print(
            f"{r['batch']:>7} {r['max_abs_diff']:>14.2e} {'yes' if r['passed'] else 'NO':>3} "
            f"{r['tensorrt_p50_ms']:>11.3f} {r['tensorrt_p99_ms']:>11.3f} {r['onnxruntime_p50_ms']:>11.3f} "
            f"{r['onnxruntime_p99_ms']:>11.3f} {rate:>12,.0f}"
        )
    if args.result_path:
        Path(args.result_path).write_text(json.dumps({"build_s": build_s, "results": results}, indent=2))
    failed = [r["batch"] for r in results if not r["passed"]]
    if failed:
        print(f"FAILED: batches {failed} differ from onnxruntime by more than {args.tolerance:g}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
