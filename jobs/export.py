"""Export the trained model to ONNX, check it against PyTorch, build TensorRT where a GPU is.

The ONNX graph takes ``categorical`` (int64, ``[batch, n_categorical]``) and ``numeric``
(float32, ``[batch, n_numeric]``) with a dynamic batch axis and returns ``probability``
(float32, ``[batch]``): the probability of the dataset's label 1. onnxruntime scores a
few hundred test rows and the largest absolute difference from PyTorch must stay within
``--tolerance``. With a CUDA device and TensorRT installed, a serialized engine is built
from the same file; elsewhere the result says why none was built.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import torch

from jobs.common import cli, datasets, storage, tracking
from jobs.common.model import FraudProbability
from jobs.common.training import load_split
from jobs.evaluate import load_model

logger = logging.getLogger(__name__)

INPUT_NAMES = ["categorical", "numeric"]
OUTPUT_NAME = "probability"
OPSET = 18


def export_onnx(net, n_categorical: int, n_numeric: int, path: str) -> None:
    """Write ``net`` (with a sigmoid) to ``path`` as ONNX with a dynamic batch axis."""
    wrapped = FraudProbability(net).eval()
    example = (torch.zeros((4, n_categorical), dtype=torch.int64), torch.zeros((4, n_numeric), dtype=torch.float32))
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        wrapped,
        example,
        input_names=INPUT_NAMES,
        output_names=[OUTPUT_NAME],
        opset_version=OPSET,
        dynamo=True,
        dynamic_shapes=({0: batch}, {0: batch}),
        verbose=False,
    )
    program.save(path)


def onnx_parity(path: str, net, categorical: np.ndarray, numeric: np.ndarray) -> dict:
    """Largest absolute difference between onnxruntime and PyTorch on the same rows."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    onnx_out = session.run([OUTPUT_NAME], {"categorical": categorical, "numeric": numeric})[0]
    with torch.no_grad():
        torch_out = FraudProbability(net)(torch.from_numpy(categorical), torch.from_numpy(numeric)).numpy()
    diff = float(np.max(np.abs(onnx_out - torch_out))) if len(torch_out) else 0.0
    return {"rows": int(len(torch_out)), "max_abs_diff": diff, "onnxruntime": ort.__version__}


def build_tensorrt(onnx_path: str, engine_path: str, max_batch: int = 4096) -> dict:
    """A TensorRT engine from ``onnx_path``, or the reason none could be built here."""
    if not torch.cuda.is_available():
        return {"built": False, "reason": "no CUDA device on this machine; serving uses onnxruntime on CPU"}
    try:
        import tensorrt as trt
    except ImportError:
        return {"built": False, "reason": "tensorrt is not installed (use the serving-tensorrt image)"}
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    with open(onnx_path, "rb") as handle:
        if not parser.parse(handle.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            return {"built": False, "reason": f"TensorRT could not parse the ONNX file: {errors}"}
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        width = tensor.shape[1]
        profile.set_shape(tensor.name, (1, width), (256, width), (max_batch, width))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        return {"built": False, "reason": "TensorRT engine build failed"}
    with open(engine_path, "wb") as handle:
        handle.write(engine)
    return {"built": True, "tensorrt": trt.__version__, "max_batch": max_batch}


def run(model_uri: str, features_uri: str, output_uri: str, rows: int, tolerance: float, mlflow_run_id: str | None):
    import mlflow

    net, pre = load_model(model_uri)
    spec = datasets.get(pre.dataset)
    _, test = load_split(storage.join(features_uri, "test"), spec, pre)
    cats, nums = test.categorical[:rows], test.numeric[:rows]

    with tempfile.TemporaryDirectory() as tmp:
        # ONNX and its parity with PyTorch.
        onnx_path = os.path.join(tmp, "model.onnx")
        export_onnx(net, cats.shape[1], nums.shape[1], onnx_path)
        parity = onnx_parity(onnx_path, net, cats, nums)
        parity["tolerance"] = tolerance
        parity["passed"] = parity["max_abs_diff"] <= tolerance
        logger.info("ONNX parity on %d rows: max |onnx - torch| = %.3g (tolerance %.0e)",
                    parity["rows"], parity["max_abs_diff"], tolerance)
        if not parity["passed"]:
            cli.fail(f"ONNX output differs from PyTorch by {parity['max_abs_diff']:.3g} > {tolerance:g}")

        # TensorRT where a GPU exists.
        engine_path = os.path.join(tmp, "model.plan")
        tensorrt = build_tensorrt(onnx_path, engine_path)
        logger.info("TensorRT: %s", tensorrt.get("reason", "engine built"))

        # Publish next to the model and in MLflow.
        for name in ("model.onnx", "model.plan"):
            if os.path.exists(os.path.join(tmp, name)):
                with open(os.path.join(tmp, name), "rb") as handle:
                    storage.write_bytes(storage.join(output_uri, name), handle.read())
        storage.write_json(storage.join(output_uri, "preprocessor.json"), pre.to_dict())
        if mlflow_run_id:
            tracking.configure()
            with mlflow.start_run(run_id=mlflow_run_id):
                mlflow.log_artifact(onnx_path, artifact_path="onnx")
                if tensorrt.get("built"):
                    mlflow.log_artifact(engine_path, artifact_path="tensorrt")
                mlflow.log_metric("onnx_max_abs_diff", parity["max_abs_diff"])
    return {
        "dataset": spec.name,
        "onnx_uri": storage.join(output_uri, "model.onnx"),
        "preprocessor_uri": storage.join(output_uri, "preprocessor.json"),
        "tensorrt_uri": storage.join(output_uri, "model.plan") if tensorrt.get("built") else None,
        "onnx_parity": parity,
        "tensorrt": tensorrt,
        "opset": OPSET,
        "inputs": {"categorical": pre.categorical_columns, "numeric": pre.numeric_columns},
        "output": OUTPUT_NAME,
        "mlflow_run_id": mlflow_run_id,
        "model_uri": model_uri,
    }


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("jobs.export", __doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model URI written by train")
    p.add_argument("--features", required=True, help="ETL output URI; parity is checked on test rows")
    p.add_argument("--output", required=True, help="URI for model.onnx (and model.plan with TensorRT)")
    p.add_argument("--rows", type=int, default=512, help="test rows scored for the parity check")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed |onnx - torch|")
    p.add_argument("--mlflow-run-id", default=None, help="MLflow run to log the ONNX file to")
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    result = run(args.model, args.features, args.output, args.rows, args.tolerance, args.mlflow_run_id)
    cli.write_result(result, args.result_path)


if __name__ == "__main__":
    main()
