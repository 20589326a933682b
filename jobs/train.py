"""Train the fraud classifier on the ETL's splits, on one or more worker processes.

With ``--backend torch`` (the default) and ``--workers N > 1`` this command starts
``torchrun`` with N processes on this node (gloo on CPU, NCCL on GPU) and each runs the
same loop on its share of every epoch. ``--backend horovod`` starts ``horovodrun -np N``
instead. Rank 0 logs parameters and per-epoch metrics to MLflow, writes the checkpoint
and the preprocessor to ``--output`` and the stage result.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

from jobs.common import cli, datasets, storage, tracking
from jobs.common.features import Preprocessor
from jobs.common.training import (
    Backend,
    HorovodBackend,
    TorchDistributedBackend,
    TrainConfig,
    fit,
    load_split,
)

DEFAULTS = TrainConfig()

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "horovod")

# Set by torchrun and horovodrun in the worker processes they start.
TORCHRUN_RANK_ENV_VAR = "LOCAL_RANK"
HOROVOD_RANK_ENV_VAR = "HOROVOD_RANK"


def build_parser():
    p = cli.parser("jobs.train", __doc__.split("\n\n")[0])
    p.add_argument("--features", required=True, help="ETL output URI (train/, validation/, preprocessor.json)")
    p.add_argument("--output", required=True, help="URI to write model.pt, preprocessor.json, train_summary.json")
    p.add_argument("--params", default=None, help="JSON file of hyper-parameters (the tune stage's best_config)")
    p.add_argument("--workers", type=int, default=2, help="worker processes on this node")
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="gradient synchronisation backend")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (overrides --params)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (overrides --params)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (overrides --params)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (overrides --params)")
    p.add_argument("--dropout", type=float, default=None, help="dropout (overrides --params)")
    p.add_argument("--hidden", default=None, help="hidden sizes, comma separated, e.g. 256,128 (overrides --params)")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs")
    p.add_argument("--pos-weight", type=float, default=None,
                   help="loss weight of label-1 rows; 0 = negatives / positives (overrides --params)")
    p.add_argument("--members", type=int, default=None,
                   help=f"networks in the deep ensemble, each with its own seed (default: {DEFAULTS.members})")
    p.add_argument("--numeric-bins", type=int, default=None,
                   help="quantile bins of the piecewise-linear numeric encoding; 0 = off "
                        f"(default: {DEFAULTS.numeric_bins})")
    p.add_argument("--target-smoothing", type=float, default=None,
                   help=f"prior pseudo-count of the per-id target statistics (default: {DEFAULTS.target_smoothing:g})")
    p.add_argument("--no-target-encoding", dest="target_encoding", action="store_const", const=False,
                   default=None, help="leave out the per-id target statistics")
    p.add_argument("--target-pairs", dest="target_pairs", action="store_const", const=True, default=None,
                   help="also target-encode every pair of categorical columns (off by default: it did not "
                        "raise test AUC on the TalkingData sample, see the issue notes)")
    p.add_argument("--seed", type=int, default=None, help="seed for weights and batch order")
    p.add_argument("--run-id", default="manual", help="orchestrator run id, recorded as an MLflow tag")
    p.add_argument("--smoke-test", action="store_true", help="two epochs, for quick checks")
    return p


def resolve_config(args) -> TrainConfig:
    """Defaults, then the ``--params`` file, then explicit flags."""
    payload: dict = {}
    if args.params:
        loaded = storage.read_json(args.params)
        payload.update(loaded.get("config", loaded))
    keys = ("epochs", "lr", "batch_size", "weight_decay", "dropout", "hidden", "patience", "pos_weight", "members",
            "numeric_bins", "target_smoothing", "target_encoding", "target_pairs", "seed")
    for key in keys:
        value = getattr(args, key)
        if value is not None:
            payload[key] = value
    if args.smoke_test:
        payload["epochs"] = min(int(payload.get("epochs", 2)), 2)
        if args.members is None:
            payload["members"] = 1
    return TrainConfig.from_dict(payload)


def find_horovodrun() -> str:
    """The ``horovodrun`` launcher, or a one-line error when Horovod is not installed here."""
    import importlib.util

    horovodrun = shutil.which("horovodrun")
    if horovodrun is None or importlib.util.find_spec("horovod") is None:
        cli.fail(
            "--backend horovod needs Horovod, which is not installed here: build it with "
            "scripts/install_horovod.sh (CPU, gloo) or use the trainer-gpu image (NCCL)"
        )
    return horovodrun


def launch(args, argv: list[str]) -> int:
    """Start the worker processes of a multi-process run and wait for them."""
    env = dict(os.environ)
    # Local CPU runs talk over loopback; a cluster sets its own interface.
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.backend == "torch":
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={args.workers}", "-m", "jobs.train", *argv,
        ]
    else:
        horovodrun = find_horovodrun()
        # All N workers on this host, started directly (no ssh), with gloo on the same
        # interface as torchrun's (loopback unless the caller set GLOO_SOCKET_IFNAME).
        # horovodrun sets HOROVOD_RANK in every worker, which main() reads.
        cmd = [
            horovodrun, "-np", str(args.workers), "-H", f"localhost:{args.workers}", "--gloo",
            "--network-interfaces", env["GLOO_SOCKET_IFNAME"], "--disable-cache",
            sys.executable, "-m", "jobs.train", *argv,
        ]
    logger.info("starting %d %s workers", args.workers, args.backend)
    return subprocess.call(cmd, env=env)


def worker(args) -> None:
    """One training process: fit, and on rank 0 log, save and report."""
    import mlflow

    started = time.monotonic()
    if args.backend == "horovod":
        backend: Backend = HorovodBackend()
    elif TORCHRUN_RANK_ENV_VAR in os.environ:
        backend = TorchDistributedBackend()
    else:
        backend = Backend()
    config = resolve_config(args)

    # Data and preprocessor.
    pre = Preprocessor.from_dict(storage.read_json(storage.join(args.features, "preprocessor.json")))
    spec = datasets.get(pre.dataset)
    _, train = load_split(storage.join(args.features, "train"), spec, pre)
    _, validation = load_split(storage.join(args.features, "validation"), spec, pre)
    if backend.rank == 0:
        logger.info("training on %d rows (%d positive), validating on %d", len(train), int(train.label.sum()),
                    len(validation))

    # Fit; rank 0 logs every epoch to MLflow.
    run = None
    on_epoch = None
    if backend.rank == 0:
        tracking.configure()
        run = mlflow.start_run(
            run_name=f"retrain-{spec.name}",
            tags={
                tracking.TAG_DAG_RUN_ID: args.run_id,
                tracking.TAG_DATASET: spec.name,
                tracking.TAG_FEATURE_SPEC: pre.feature_spec_hash,
                tracking.TAG_DATA_URI: args.features,
                tracking.TAG_BACKEND: args.backend,
            },
        )
        mlflow.log_params(tracking.clean_params({**config.to_dict(), "workers": args.workers}))

        def on_epoch(epoch: int, metrics: dict) -> None:
            mlflow.log_metrics({k: v for k, v in metrics.items() if v == v}, step=epoch)

    try:
        net, summary = fit(config, pre, train, validation, backend=backend, on_epoch=on_epoch)
    finally:
        backend.close()
    if backend.rank != 0:
        return

    # Checkpoint and preprocessor, to the output URI and to MLflow.
    from jobs.common.model import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(net, os.path.join(tmp, "model.pt"), extra={"dataset": spec.name, "train_config": config.to_dict()})
        storage.write_json(os.path.join(tmp, "preprocessor.json"), pre.to_dict())
        storage.write_json(os.path.join(tmp, "train_summary.json"), summary)
        for name in ("model.pt", "preprocessor.json", "train_summary.json"):
            with open(os.path.join(tmp, name), "rb") as handle:
                storage.write_bytes(storage.join(args.output, name), handle.read())
        mlflow.log_artifacts(tmp, artifact_path="model")
    mlflow.log_metrics({"best_val_pr_auc": summary["best_val_pr_auc"], "best_epoch": summary["best_epoch"]})
    mlflow.end_run()
    result = {
        "dataset": spec.name,
        "model_uri": args.output,
        "checkpoint_uri": storage.join(args.output, "model.pt"),
        "preprocessor_uri": storage.join(args.output, "preprocessor.json"),
        "features_uri": args.features,
        "mlflow_run_id": run.info.run_id,
        "backend": args.backend,
        "world_size": summary["world_size"],
        "members": config.members,
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "best_val_pr_auc": summary["best_val_pr_auc"],
        "best_val_auc": summary["best_val_auc"],
        "train_rows": len(train),
        "train_seconds": round(summary["train_seconds"], 2),
        "samples_per_s": summary["samples_per_s"],
        "config": config.to_dict(),
        "seconds": round(time.monotonic() - started, 1),
    }
    logger.info("best epoch %d: val PR-AUC %.4f", summary["best_epoch"], summary["best_val_pr_auc"])
    cli.write_result(result, args.result_path)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cli.configure_logging(args.verbose)
    if args.workers < 1:
        cli.fail("--workers must be at least 1")
    in_worker = TORCHRUN_RANK_ENV_VAR in os.environ or HOROVOD_RANK_ENV_VAR in os.environ
    if not in_worker:
        # Fail here, once, rather than in every worker after the launcher started; a
        # missing launcher first, since no input would make the run possible.
        if args.backend == "horovod":
            find_horovodrun()
        try:
            resolve_config(args)
        except (ValueError, TypeError) as exc:
            cli.fail(f"bad hyper-parameters: {exc}")
        preprocessor = storage.join(args.features, "preprocessor.json")
        if not storage.exists(preprocessor):
            cli.fail(f"{preprocessor} not found: --features must be an ETL output")
    if args.backend == "horovod" and not in_worker:
        raise SystemExit(launch(args, argv))
    if args.backend == "torch" and args.workers > 1 and not in_worker:
        raise SystemExit(launch(args, argv))
    worker(args)


if __name__ == "__main__":
    main()
