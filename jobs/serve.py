"""Online scoring service: raw click events in, the served model's scores out.

``python -m jobs.serve --config <serving config> --host 127.0.0.1 --port 8080`` serves the
model the serving configuration (written by :mod:`jobs.rollout`) points at::

    POST /v1/score      {"events": [<raw event>, ...]} -> a score per event
    GET  /health        the process is alive
    GET  /ready         200 once a model is loaded, 503 before
    GET  /v1/model      what is served (name, version, dataset, threshold, backend, schema)
    GET  /metrics       Prometheus metrics
    POST /admin/reload  re-read the configuration and swap the model (also on SIGHUP)

An event carries the dataset's raw columns (label, oracle and withheld columns are not
needed and are ignored, as are unknown fields); ``click_time`` is an ISO 8601 string
(naive means UTC) or seconds since the epoch. Features come from
:class:`jobs.online_features.OnlineFeatures`, the same definitions as the ETL, with state
kept in the process or in Redis (``ADFRAUD_REDIS_URL``).

Each result holds ``probability`` (of the dataset's label 1, what the model outputs),
``fraud_score`` (the probability itself where label 1 is fraud, ``1 - probability``
where label 1 is genuine traffic, as on TalkingData) and ``flagged``
(``fraud_score >= threshold``). The threshold is the configuration's ``threshold`` (on
the fraud score), else ``ADFRAUD_SERVING_THRESHOLD``, else 0.5.

A reload builds the new model beside the old one and swaps a single reference: requests
already running finish on the model they started with, and none is dropped. A
configuration that fails to load leaves the current model in place.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from jobs.common import cli, datasets, features, settings, storage
from jobs.common.datasets import DatasetSpec
from jobs.common.features import Preprocessor
from jobs.online_features import FeatureStore, InputEncoder, OnlineFeatures, store_from_env

logger = logging.getLogger(__name__)

# Which model runtime scores: "onnxruntime" (CPU, the default), "tensorrt" (GPU, an
# engine built from the same ONNX file) or "torch" (eager PyTorch from the checkpoint
# the configuration's checkpoint_uri names; for comparisons).
BACKEND_ENV_VAR = "ADFRAUD_SERVING_BACKEND"
DEFAULT_BACKEND = "onnxruntime"
BACKENDS = ("onnxruntime", "tensorrt", "torch")

# Fraud-score threshold for "flagged" when the serving configuration names none.
THRESHOLD_ENV_VAR = "ADFRAUD_SERVING_THRESHOLD"
DEFAULT_THRESHOLD = 0.5

# Most events one request may carry (more is answered 413).
MAX_EVENTS_ENV_VAR = "ADFRAUD_SERVING_MAX_EVENTS"
DEFAULT_MAX_EVENTS = 1_024

# Largest request body, in KiB (more is answered 413 before it is parsed).
MAX_BODY_KB_ENV_VAR = "ADFRAUD_SERVING_MAX_BODY_KB"
DEFAULT_MAX_BODY_KB = 1_024

# Threads the model runtime may use per request (onnxruntime intra-op, torch).
THREADS_ENV_VAR = "ADFRAUD_SERVING_THREADS"
DEFAULT_THREADS = 1

# Seconds between checks of the serving configuration for a new model; 0 turns it off.
POLL_S_ENV_VAR = "ADFRAUD_SERVING_POLL_S"
DEFAULT_POLL_S = 30

# Bearer token /admin/reload requires; unset leaves it open to whoever reaches the port.
ADMIN_TOKEN_ENV_VAR = "ADFRAUD_SERVING_ADMIN_TOKEN"

# TensorRT optimization profile: batch sizes from 1 to MAX (OPT is tuned for); larger
# requests are split into chunks of MAX.
TRT_MAX_BATCH_ENV_VAR = "ADFRAUD_SERVING_TRT_MAX_BATCH"
DEFAULT_TRT_MAX_BATCH = 4_096
TRT_OPT_BATCH_ENV_VAR = "ADFRAUD_SERVING_TRT_OPT_BATCH"
DEFAULT_TRT_OPT_BATCH = 256

# Longest string a categorical field may hold.
MAX_STRING_CHARS = 1_024

# Event times the service accepts, in microseconds since the epoch: 1970 to 2100.
MIN_EVENT_US = 0
MAX_EVENT_US = 4_102_444_800 * 1_000_000

INPUT_NAMES = ("categorical", "numeric")
OUTPUT_NAME = "probability"

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SCORE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def default_config_uri() -> str:
    """``ADFRAUD_SERVING_CONFIG``, else where :mod:`jobs.rollout` writes by default."""
    return os.environ.get(settings.SERVING_CONFIG_ENV_VAR) or storage.join(
        settings.home(), "serving", "current.json"
    )


def _float_env(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None


# ---------------------------------------------------------------------------------------
# Model runtimes


class ModelBackend:
    """Scores model inputs: ``predict(int64 [n, n_cat], float32 [n, n_num]) -> float32 [n]``."""

    name = "abstract"

    def predict(self, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        """Probabilities of the dataset's label 1, one per row."""
        raise NotImplementedError


class OnnxRuntimeBackend(ModelBackend):
    """onnxruntime on CPU, one session shared by all requests (``run`` is thread-safe).

    :param onnx_bytes: the ONNX model.
    :param threads: intra-op threads; 1 is fastest for request-sized batches.
    """

    name = "onnxruntime"

    def __init__(self, onnx_bytes: bytes, threads: int = DEFAULT_THREADS) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads sleep instead of spinning: the cores are shared.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.input_widths = {i.name: i.shape[1] for i in self.session.get_inputs()}

    def predict(self, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {"categorical": categorical, "numeric": numeric})[0]


class TorchBackend(ModelBackend):
    """Eager PyTorch from the training checkpoint (``checkpoint_uri`` in the configuration).

    :param checkpoint_uri: a ``model.pt`` written by ``train``.
    :param threads: torch intra-op threads (process-wide).
    """

    name = "torch"

    def __init__(self, checkpoint_uri: str, threads: int = DEFAULT_THREADS) -> None:
        import torch

        from jobs.common.model import FraudProbability, load_checkpoint

        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "model.pt")
            with open(local, "wb") as handle:
                handle.write(storage.read_bytes(checkpoint_uri))
            net, _ = load_checkpoint(local)
        self._torch = torch
        self.model = FraudProbability(net).eval()

    def predict(self, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.model(self._torch.from_numpy(categorical), self._torch.from_numpy(numeric))
        return out.numpy()


class TensorRTBackend(ModelBackend):
    """A TensorRT engine built from the same ONNX file, on the first CUDA device.

    The engine has one optimization profile over batch sizes ``1..max_batch`` (tuned for
    ``opt_batch``); larger batches are scored in chunks of ``max_batch``. FP32 only
    (TF32 off): the scores must match onnxruntime within 1e-4. Device buffers and the
    stream come from torch, which the GPU images carry. One execution context, used
    under a lock.

    :param onnx_bytes: the ONNX model.
    :param max_batch: largest batch of the profile.
    :param opt_batch: batch size the profile is tuned for.
    :param engine_bytes: a serialized engine to try first (built for this GPU and
        TensorRT version); the ONNX file is compiled when it does not load.
    """

    name = "tensorrt"

    def __init__(
        self,
        onnx_bytes: bytes,
        max_batch: int = DEFAULT_TRT_MAX_BATCH,
        opt_batch: int = DEFAULT_TRT_OPT_BATCH,
        engine_bytes: bytes | None = None,
    ) -> None:
        import tensorrt as trt  # pragma: no cover, needs a CUDA device and TensorRT
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt backend needs a CUDA device")
        self._trt, self._torch = trt, torch
        self.max_batch = max_batch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(engine_bytes) if engine_bytes else None
        if engine is None:
            engine = self._runtime.deserialize_cuda_engine(self.build(onnx_bytes, max_batch, opt_batch))
        if engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine it built")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        self._dtypes = {
            name: torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
            for name in (*INPUT_NAMES, OUTPUT_NAME)
        }
        self._lock = threading.Lock()

    def build(self, onnx_bytes: bytes, max_batch: int, opt_batch: int) -> bytes:
        """Compile the ONNX model into a serialized engine with a batch-size profile."""
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        config.clear_flag(trt.BuilderFlag.TF32)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            width = tensor.shape[1]
            profile.set_shape(tensor.name, (1, width), (min(opt_batch, max_batch), width), (max_batch, width))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT engine build failed")
        logger.info(
            "TensorRT %s engine built: batch 1..%d (tuned for %d)", trt.__version__, max_batch, opt_batch
        )
        return bytes(serialized)

    def predict(self, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        torch = self._torch
        out = np.empty(len(categorical), dtype=np.float32)
        with self._lock, torch.cuda.stream(self.stream):
            for start in range(0, len(categorical), self.max_batch):
                stop = min(start + self.max_batch, len(categorical))
                cat = torch.from_numpy(categorical[start:stop]).to(self.device, self._dtypes["categorical"])
                num = torch.from_numpy(numeric[start:stop]).to(self.device, self._dtypes["numeric"])
                prob = torch.empty((stop - start,), dtype=self._dtypes[OUTPUT_NAME], device=self.device)
                for name, tensor in (("categorical", cat), ("numeric", num)):
                    self.context.set_input_shape(name, tuple(tensor.shape))
                    self.context.set_tensor_address(name, tensor.data_ptr())
                self.context.set_tensor_address(OUTPUT_NAME, prob.data_ptr())
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("TensorRT execution failed")
                out[start:stop] = prob.float().cpu().numpy()
            self.stream.synchronize()
        return out


def make_backend(kind: str, config: dict[str, Any], onnx_bytes: bytes) -> ModelBackend:
    """The model runtime ``kind`` for a serving configuration."""
    threads = cli.int_env(THREADS_ENV_VAR, DEFAULT_THREADS)
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(onnx_bytes, threads)
    if kind == "torch":
        if not config.get("checkpoint_uri"):
            raise ValueError("the torch backend needs checkpoint_uri in the serving configuration")
        return TorchBackend(config["checkpoint_uri"], threads)
    if kind == "tensorrt":
        engine = storage.read_bytes(config["tensorrt_uri"]) if config.get("tensorrt_uri") else None
        return TensorRTBackend(
            onnx_bytes,
            max_batch=cli.int_env(TRT_MAX_BATCH_ENV_VAR, DEFAULT_TRT_MAX_BATCH),
            opt_batch=cli.int_env(TRT_OPT_BATCH_ENV_VAR, DEFAULT_TRT_OPT_BATCH),
            engine_bytes=engine,
        )
    raise ValueError(f"unknown serving backend {kind!r}; known: {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------------------
# Requests


def _json_number(value: Any) -> Any:
    """Numbers only: JSON strings and booleans are not numbers here."""
    if isinstance(value, (str, bool)):
        raise ValueError("expected a JSON number")
    return value


def _not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("must not be null: the column is not nullable")
    return value


def _event_time(value: Any) -> int:
    """Microseconds since the epoch from an ISO 8601 string or seconds since the epoch."""
    if isinstance(value, bool):
        raise ValueError("expected an ISO 8601 string or seconds since the epoch")
    if isinstance(value, int):
        micros = value * 1_000_000
    elif isinstance(value, float):
        if not np.isfinite(value):
            raise ValueError("expected a finite number of seconds")
        micros = round(value * 1e6)
    elif isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("expected an ISO 8601 timestamp, e.g. 2017-11-07T09:30:38Z") from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=dt.UTC)
        delta = stamp - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    else:
        raise ValueError("expected an ISO 8601 string or seconds since the epoch")
    if not MIN_EVENT_US <= micros < MAX_EVENT_US:
        raise ValueError("event time outside 1970-2100")
    return micros


_INT_RANGES = {
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}


def input_columns(spec: DatasetSpec) -> list[datasets.Column]:
    """The raw columns a request must carry: all but the label, oracle and withheld ones."""
    skip = {spec.label, *spec.oracle, *spec.withheld}
    return [c for c in spec.columns if c.name not in skip]


def _field_type(column: datasets.Column) -> Any:
    from pydantic import BeforeValidator, Field, StringConstraints

    if column.type == "string":
        return Annotated[str, StringConstraints(max_length=MAX_STRING_CHARS)]
    if column.type == "timestamp":
        return Annotated[int, BeforeValidator(_event_time)]
    if column.type in _INT_RANGES:
        lo, hi = _INT_RANGES[column.type]
        if column.min_value is not None:
            lo = max(lo, int(column.min_value))
        if column.max_value is not None:
            hi = min(hi, int(column.max_value))
        return Annotated[int, BeforeValidator(_json_number), Field(ge=lo, le=hi)]
    if column.type in ("float64", "float32", "double"):
        return Annotated[
            float,
            BeforeValidator(_json_number),
            Field(ge=column.min_value, le=column.max_value, allow_inf_nan=False),
        ]
    raise ValueError(f"column {column.name}: no request type for {column.type!r}")


def request_model(spec: DatasetSpec, max_events: int):
    """The pydantic model of a score request for ``spec``'s raw layout."""
    from pydantic import BeforeValidator, ConfigDict, Field, create_model

    fields: dict[str, Any] = {}
    for column in input_columns(spec):
        kind = _field_type(column)
        if column.nullable:
            fields[column.name] = (kind | None, Field(None, description=column.description))
        else:
            fields[column.name] = (
                Annotated[kind, BeforeValidator(_not_null)],
                Field(..., description=column.description),
            )
    event = create_model(f"{spec.name.title()}Event", __config__=ConfigDict(extra="ignore"), **fields)
    return create_model(
        "ScoreRequest",
        __config__=ConfigDict(extra="forbid"),
        events=(list[event], Field(..., min_length=1, max_length=max_events)),
    )


# ---------------------------------------------------------------------------------------
# Loading a model


@dataclass
class LoadedModel:
    """Everything one served model version needs, swapped as one reference."""

    config: dict[str, Any]
    spec: DatasetSpec
    pre: Preprocessor
    encoder: InputEncoder
    backend: ModelBackend
    threshold: float
    request_model: Any
    loaded_at: str
    features: OnlineFeatures | None = None

    @property
    def name(self) -> str:
        return str(self.config["model_name"])

    @property
    def version(self) -> str:
        return str(self.config["version"])

    def signature(self) -> tuple:
        """What makes two configurations serve the same model (see reload_if_changed)."""
        return _signature(self.config)


def _signature(config: dict[str, Any]) -> tuple:
    keys = (
        "model_name",
        "version",
        "onnx_uri",
        "preprocessor_uri",
        "threshold",
        "checkpoint_uri",
        "tensorrt_uri",
    )
    return tuple(config.get(k) for k in keys)


REQUIRED_CONFIG_KEYS = ("model_name", "version", "dataset", "onnx_uri", "preprocessor_uri")


def read_model_files(config_uri: str) -> tuple[dict[str, Any], DatasetSpec, Preprocessor, bytes]:
    """The configuration, dataset spec, preprocessor and ONNX bytes of a serving configuration.

    Refuses a model whose preprocessor was fitted for other features than this code
    computes (a different feature spec hash).
    """
    config = storage.read_json(config_uri)
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{config_uri}: serving configuration lacks {missing}")
    spec = datasets.get(config["dataset"])
    pre = Preprocessor.from_dict(storage.read_json(config["preprocessor_uri"]))
    expected = features.feature_spec_hash(spec)
    if pre.dataset != spec.name:
        raise ValueError(f"preprocessor is for dataset {pre.dataset!r}, configuration says {spec.name!r}")
    if pre.feature_spec_hash != expected or config.get("feature_spec_hash", expected) != expected:
        raise ValueError(
            f"model features {pre.feature_spec_hash} differ from what this code computes ({expected}); "
            "score it with the code version it was trained with"
        )
    return config, spec, pre, storage.read_bytes(config["onnx_uri"])


def resolve_threshold(config: dict[str, Any], override: float | None = None) -> float:
    """The fraud-score threshold: ``override``, the configuration's, the environment's, 0.5."""
    if override is not None:
        threshold = float(override)
    elif config.get("threshold") is not None:
        threshold = float(config["threshold"])
    else:
        threshold = _float_env(THRESHOLD_ENV_VAR, DEFAULT_THRESHOLD)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} is outside [0, 1]")
    return threshold


def load_model(config_uri: str, backend_kind: str, max_events: int = DEFAULT_MAX_EVENTS) -> LoadedModel:
    """Read a serving configuration and build everything its model needs.

    Refuses a model trained on other features than this code computes
    (:func:`read_model_files`) and one that does not score a probability.
    """
    config, spec, pre, onnx_bytes = read_model_files(config_uri)

    # The runtime, and a smoke score of one all-unknown event.
    backend = make_backend(backend_kind, config, onnx_bytes)
    widths = getattr(backend, "input_widths", None)
    if widths and (widths.get("categorical"), widths.get("numeric")) != (
        len(pre.categorical),
        len(pre.numeric),
    ):
        raise ValueError(f"ONNX inputs {widths} do not match the preprocessor's columns")
    probe = backend.predict(
        np.zeros((1, len(pre.categorical)), np.int64), np.zeros((1, len(pre.numeric)), np.float32)
    )
    if probe.shape != (1,) or not (0.0 <= float(probe[0]) <= 1.0):
        raise ValueError(f"the model does not score a probability: {probe!r}")

    threshold = resolve_threshold(config)
    return LoadedModel(
        config=config,
        spec=spec,
        pre=pre,
        encoder=InputEncoder(pre),
        backend=backend,
        threshold=threshold,
        request_model=request_model(spec, max_events),
        loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


# ---------------------------------------------------------------------------------------
# Metrics


class ServingMetrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "adfraud_serving_requests", "score requests by HTTP status", ["status"], registry=self.registry
        )
        self.latency = Histogram(
            "adfraud_serving_request_latency_seconds",
            "score request latency in the server",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.score = Histogram(
            "adfraud_serving_score", "fraud scores served", buckets=SCORE_BUCKETS, registry=self.registry
        )
        self.events = Counter("adfraud_serving_events", "events scored", registry=self.registry)
        self.flagged = Counter("adfraud_serving_flagged", "events flagged as fraud", registry=self.registry)
        self.reloads = Counter(
            "adfraud_serving_reloads", "model loads by result", ["result"], registry=self.registry
        )
        self.loaded = Gauge(
            "adfraud_serving_model_loaded", "1 while a model is served", registry=self.registry
        )
        self.model = Info("adfraud_serving_model", "the model served", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------------------
# The service


class RequestError(Exception):
    """A request the service answers with a 4xx (or 503) and a JSON body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("detail"))
        self.status = status
        self.body = body


@dataclass
class ScoringService:
    """The served model, the feature state and the reload logic behind the HTTP app.

    :param config_uri: the serving configuration to (re)load.
    :param backend_kind: one of :data:`BACKENDS`.
    :param store_factory: builds the feature store of a dataset (default: from the environment).
    :param max_events: most events per request.
    :param max_body_bytes: largest request body.
    """

    config_uri: str
    backend_kind: str = DEFAULT_BACKEND
    store_factory: Callable[[DatasetSpec], FeatureStore] = store_from_env
    max_events: int = DEFAULT_MAX_EVENTS
    max_body_bytes: int = DEFAULT_MAX_BODY_KB * 1_024
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    current: LoadedModel | None = None
    last_error: str | None = None
    _engines: dict[str, OnlineFeatures] = field(default_factory=dict)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # Loading and swapping.

    def _activate(self, loaded: LoadedModel) -> LoadedModel:
        """Attach the dataset's feature state (kept across versions) and swap the reference."""
        engine = self._engines.get(loaded.spec.name)
        if engine is None:
            engine = self._engines[loaded.spec.name] = OnlineFeatures(
                loaded.spec, self.store_factory(loaded.spec)
            )
            logger.info("feature state for %s: %s store", loaded.spec.name, engine.store.name)
        loaded = replace(loaded, features=engine)
        previous = self.current
        self.current = loaded  # the swap: one reference assignment
        self.last_error = None
        self.metrics.loaded.set(1)
        self.metrics.model.info({"name": loaded.name, "version": loaded.version})
        self.metrics.reloads.labels(result="ok").inc()
        logger.info(
            "serving %s v%s (%s, %s, threshold %.4f)%s",
            loaded.name,
            loaded.version,
            loaded.spec.name,
            loaded.backend.name,
            loaded.threshold,
            f", was v{previous.version}" if previous is not None else "",
        )
        return loaded

    async def reload(self, reason: str) -> LoadedModel:
        """Load the configuration's model off the event loop, then swap it in.

        Raises whatever the load raised; the current model stays in place then.
        """
        async with self._reload_lock:
            try:
                loaded = await asyncio.to_thread(
                    load_model, self.config_uri, self.backend_kind, self.max_events
                )
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.metrics.reloads.labels(result="failed").inc()
                logger.error(
                    "model load (%s) from %s failed, %s: %s",
                    reason,
                    self.config_uri,
                    "keeping the current model" if self.current else "no model served",
                    self.last_error,
                )
                raise
            return self._activate(loaded)

    async def reload_if_changed(self) -> None:
        """Reload when the configuration names another model than the one served."""
        try:
            config = await asyncio.to_thread(storage.read_json, self.config_uri)
        except Exception as exc:  # a missing or half-written file is retried next poll
            logger.debug("serving configuration unreadable: %s", exc)
            return
        if self.current is None or _signature(config) != self.current.signature():
            try:
                await self.reload("configuration changed")
            except Exception:  # logged by reload; retried next poll
                pass

    async def warm_up(self, events_uri: str) -> int:
        """Replay raw events into the current dataset's feature state; returns how many."""
        if self.current is None or self.current.features is None:
            raise RuntimeError("no model loaded: the dataset to warm up is unknown")
        engine = self.current.features
        table = await asyncio.to_thread(storage.read_table, events_uri)
        await asyncio.to_thread(engine.replay, table)
        logger.info("feature state warmed up with %d events from %s", table.num_rows, events_uri)
        return table.num_rows

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()

    # Scoring.

    def parse(self, loaded: LoadedModel, body: bytes) -> list[dict[str, Any]]:
        """Validated raw events of a request body, or a :class:`RequestError`."""
        from pydantic import ValidationError

        try:
            request = loaded.request_model.model_validate_json(body)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            if any(e["type"] == "too_long" and tuple(e["loc"]) == ("events",) for e in errors):
                raise RequestError(
                    413, {"detail": f"more than {self.max_events} events in one request"}
                ) from None
            fields = [".".join(str(p) for p in e["loc"]) or "body" for e in errors]
            raise RequestError(422, {"detail": errors, "fields": fields}) from None
        return [event.__dict__ for event in request.events]

    def score(self, loaded: LoadedModel, events: list[dict[str, Any]]) -> dict[str, Any]:
        """Features, model inputs and scores of validated events."""
        columns = loaded.features.compute(events)
        categorical, numeric = loaded.encoder.encode(columns)
        probability = np.asarray(loaded.backend.predict(categorical, numeric), dtype=np.float32)
        fraud = probability if loaded.spec.positive_is_fraud else (1.0 - probability).astype(np.float32)
        flagged = fraud >= loaded.threshold

        observe = self.metrics.score.observe
        for value in fraud.tolist():
            observe(value)
        self.metrics.events.inc(len(events))
        self.metrics.flagged.inc(int(flagged.sum()))

        ids = columns[loaded.spec.event_id]
        results = [
            {"event_id": i, "probability": p, "fraud_score": f, "flagged": g}
            for i, p, f, g in zip(ids, probability.tolist(), fraud.tolist(), flagged.tolist(), strict=True)
        ]
        return {
            "model_name": loaded.name,
            "model_version": loaded.version,
            "dataset": loaded.spec.name,
            "label": loaded.spec.label,
            "threshold": loaded.threshold,
            "results": results,
        }

    def describe(self) -> dict[str, Any]:
        """What /v1/model answers."""
        loaded = self.current
        if loaded is None:
            return {"loaded": False, "config_uri": self.config_uri, "last_error": self.last_error}
        return {
            "loaded": True,
            "model_name": loaded.name,
            "version": loaded.version,
            "dataset": loaded.spec.name,
            "label": loaded.spec.label,
            "label_meaning": loaded.spec.label_meaning,
            "positive_is_fraud": loaded.spec.positive_is_fraud,
            "threshold": loaded.threshold,
            "backend": loaded.backend.name,
            "feature_store": loaded.features.store.name if loaded.features else None,
            "feature_spec_hash": loaded.pre.feature_spec_hash,
            "onnx_uri": loaded.config["onnx_uri"],
            "loaded_at": loaded.loaded_at,
            "config_uri": self.config_uri,
            "last_error": self.last_error,
            "max_events": self.max_events,
            "max_body_bytes": self.max_body_bytes,
            "inputs": {"categorical": loaded.pre.categorical_columns, "numeric": loaded.pre.numeric_columns},
            "request_schema": loaded.request_model.model_json_schema(),
        }


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, {"detail": "invalid Content-Length"}) from None
        if size > limit:
            raise RequestError(413, {"detail": f"request body over {limit} bytes"})
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, {"detail": f"request body over {limit} bytes"})
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    config_uri: str | None = None,
    *,
    backend: str | None = None,
    store_factory: Callable[[DatasetSpec], FeatureStore] | None = None,
    warmup_uri: str | None = None,
):
    """The FastAPI app serving the model that ``config_uri`` points at.

    :param config_uri: serving configuration (default :func:`default_config_uri`).
    :param backend: model runtime (default ``ADFRAUD_SERVING_BACKEND`` or onnxruntime).
    :param store_factory: feature store per dataset (default: Redis or memory, by environment).
    :param warmup_uri: raw events to replay into the feature state before becoming ready.
    """
    kind = backend or os.environ.get(BACKEND_ENV_VAR, DEFAULT_BACKEND)
    if kind not in BACKENDS:
        raise ValueError(f"unknown serving backend {kind!r}; known: {', '.join(BACKENDS)}")
    service = ScoringService(
        config_uri=config_uri or default_config_uri(),
        backend_kind=kind,
        store_factory=store_factory or store_from_env,
        max_events=cli.int_env(MAX_EVENTS_ENV_VAR, DEFAULT_MAX_EVENTS),
        max_body_bytes=cli.int_env(MAX_BODY_KB_ENV_VAR, DEFAULT_MAX_BODY_KB) * 1_024,
    )
    poll_s = _float_env(POLL_S_ENV_VAR, DEFAULT_POLL_S)
    admin_token = os.environ.get(ADMIN_TOKEN_ENV_VAR, "")
    tasks: set[asyncio.Task] = set()

    def spawn(coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def on_sighup() -> None:
        try:
            await service.reload("SIGHUP")
        except Exception:  # logged by reload
            pass

    async def poll() -> None:
        while True:
            await asyncio.sleep(poll_s)
            await service.reload_if_changed()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await service.reload("startup")
            if warmup_uri:
                await service.warm_up(warmup_uri)
        except Exception:  # not ready; the poll or a reload may fix it
            logger.warning("starting without a model: /ready answers 503 until a reload succeeds")
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: spawn(on_sighup()))
            hup = True
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):
            hup = False  # not the main thread (tests) or no SIGHUP on this platform
        if poll_s > 0:
            spawn(poll())
        yield
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        for task in list(tasks):
            task.cancel()
        service.close()

    app = FastAPI(title="adfraud scoring", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service
    metrics = service.metrics

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        """Score a batch of raw click events."""
        started = time.perf_counter()
        status = 200
        try:
            body = await _read_body(request, service.max_body_bytes)
            loaded = service.current
            if loaded is None:
                raise RequestError(503, {"detail": "no model loaded", "last_error": service.last_error})
            events = service.parse(loaded, body)
            if loaded.features.store.blocking_io:
                from starlette.concurrency import run_in_threadpool

                result = await run_in_threadpool(service.score, loaded, events)
            else:
                result = service.score(loaded, events)
            return JSONResponse(result)
        except RequestError as exc:
            status = exc.status
            return JSONResponse(exc.body, status_code=exc.status)
        except Exception:
            status = 500
            logger.exception("scoring failed")
            return JSONResponse({"detail": "internal error"}, status_code=500)
        finally:
            metrics.requests.labels(status=str(status)).inc()
            metrics.latency.observe(time.perf_counter() - started)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        """200 once a model is loaded, 503 before."""
        if service.current is None:
            return JSONResponse({"ready": False, "last_error": service.last_error}, status_code=503)
        return JSONResponse(
            {"ready": True, "model_name": service.current.name, "version": service.current.version}
        )

    @app.get("/v1/model")
    async def model() -> Response:
        """What is served."""
        return JSONResponse(service.describe(), status_code=200 if service.current else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus metrics."""
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> Response:
        """Re-read the serving configuration and swap the model in."""
        if admin_token and request.headers.get("authorization") != f"Bearer {admin_token}":
            return JSONResponse({"detail": "admin token required"}, status_code=401)
        previous = service.current.version if service.current else None
        try:
            loaded = await service.reload("admin request")
        except Exception:  # reported to the caller, logged by reload
            return JSONResponse(
                {"status": "failed", "error": service.last_error, "serving_version": previous},
                status_code=409,
            )
        return JSONResponse(
            {
                "status": "reloaded",
                "model_name": loaded.name,
                "version": loaded.version,
                "previous_version": previous,
            }
        )

    return app


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("jobs.serve", __doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        default=None,
        help=f"serving configuration URI (default ${settings.SERVING_CONFIG_ENV_VAR} or "
        "<home>/serving/current.json)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8080, help="port to bind")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help=f"model runtime (default ${BACKEND_ENV_VAR} or {DEFAULT_BACKEND})",
    )
    p.add_argument(
        "--warmup", default=None, help="raw events (parquet URI) to replay into the feature state first"
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    import uvicorn

    try:
        app = create_app(args.config, backend=args.backend, warmup_uri=args.warmup)
    except ValueError as exc:
        cli.fail(str(exc))
    logger.info("listening on %s:%d", args.host, args.port)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        access_log=args.access_log,
        log_config=None,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
