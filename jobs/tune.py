"""Hyper-parameter search with Ray Tune and the ASHA scheduler.

Each trial runs the same training loop as ``train`` (one process, no gradient sync) and
reports validation PR-AUC after every epoch; ASHA stops the weak trials early. The first
trial is the training defaults, and a trial replaces them only when it beats them by more
than one bootstrap standard error of the validation PR-AUC: with the few dozen positives
of a small validation split most differences between trials are noise. Trial
resources are derived from what the Ray cluster offers, so a small machine never waits
on a request it cannot meet. Runs on a local Ray instance by default and on an existing
cluster when ``RAY_ADDRESS`` is set. Writes ``best_config.json`` for ``train`` and logs
every trial as a nested MLflow run under one tuning run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from jobs.common import cli, datasets, settings, storage, tracking
from jobs.common.features import Preprocessor
from jobs.common.training import TrainConfig, load_split

logger = logging.getLogger(__name__)

METRIC = "val_pr_auc"

# Ray's object store on a local instance, in MiB: the splits travel through it once.
LOCAL_OBJECT_STORE_MB = 512


def search_space(seed: int) -> dict:
    from ray import tune

    return {
        "lr": tune.loguniform(3e-4, 1e-2),
        "batch_size": tune.choice([256, 512, 1024, 2048]),
        "weight_decay": tune.loguniform(1e-6, 1e-3),
        "dropout": tune.uniform(0.0, 0.5),
        # Strings, not lists: Ray reads a list in a preset point as nested keys.
        "hidden": tune.choice(["64,32", "128,64", "256,128"]),
        "max_embedding_dim": tune.choice([8, 16, 32]),
        # 0 weighs positives by negatives / positives: hundreds on real clicks.
        "pos_weight": tune.choice([0.0, 5.0, 20.0]),
        "numeric_bins": tune.choice([0, 8, 16]),
        "seed": seed,
    }


def starting_point(space: dict) -> dict:
    """The training defaults, for the searched keys: the first trial, so the best trial is
    never worse on validation than the defaults under the same trial budget."""
    defaults = TrainConfig().to_dict()
    defaults["hidden"] = ",".join(str(h) for h in defaults["hidden"])
    return {key: defaults[key] for key in space if key in defaults and key != "seed"}


def trial(config: dict, *, pre: Preprocessor, train, validation, epochs: int, threads: int) -> None:
    """One Ray Tune trial: the shared training loop, reporting every epoch."""
    from ray import tune

    from jobs.common.training import fit

    # One network per trial: the ensemble of the final training only averages out seeds.
    cfg = TrainConfig.from_dict({**config, "epochs": epochs, "patience": epochs, "members": 1})
    fit(
        cfg, pre, train, validation, num_threads=threads,
        pr_auc_se=True,
        on_epoch=lambda epoch, m: tune.report({METRIC: _finite(m["val_pr_auc"]), "val_auc": _finite(m["val_auc"]),
                                               f"{METRIC}_se": _finite(m["val_pr_auc_se"]),
                                               "train_loss": m["train_loss"]}),
    )


def select(trials: list[dict], defaults: dict) -> tuple[dict, dict]:
    """The trial ``train`` gets, and why.

    The best trial by :data:`METRIC`, unless the defaults' trial (config equal to
    ``defaults`` on its keys) is within one standard error of it, the larger of the two
    trials' bootstrap errors at their best epochs; then the defaults. A one-standard-error
    rule: a small validation split cannot tell such trials apart, and the defaults were
    chosen over many seeds. It is deliberately conservative: both trials score the same
    rows, so the error of their difference is smaller than either trial's own.
    """
    ok = [t for t in trials if "error" not in t]
    best = max(ok, key=lambda t: t[METRIC])
    default = next((t for t in ok if all(t["config"].get(k) == v for k, v in defaults.items())), None)
    selection = {"rule": "one standard error", "best_value": best[METRIC], "best_se": best.get("se")}
    if default is None or default is best:
        return best, {**selection, "chosen": "best", "why": "defaults' trial is the best" if default else
                      "defaults' trial did not finish"}
    margin = max(best.get("se") or 0.0, default.get("se") or 0.0)
    selection.update(default_value=default[METRIC], default_se=default.get("se"), margin=margin)
    if best[METRIC] - default[METRIC] > margin:
        return best, {**selection, "chosen": "best", "why": "beats the defaults by more than one standard error"}
    return default, {**selection, "chosen": "defaults", "why": "best is within one standard error of the defaults"}


def _finite(value: float) -> float:
    return value if value == value else 0.0


def start_ray(cpus: int | None):
    """Connect to ``RAY_ADDRESS`` or start a loopback-only local instance."""
    import ray

    address = os.environ.get(settings.RAY_ADDRESS_ENV_VAR) or None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=cpus or os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=LOCAL_OBJECT_STORE_MB * 1024 * 1024,
            _node_ip_address="127.0.0.1",
        )
    return ray


def run(args) -> dict:
    import mlflow
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if args.grace_period > args.max_epochs:
        cli.fail(f"--grace-period ({args.grace_period}) must not exceed --max-epochs ({args.max_epochs})")
    started = time.monotonic()
    pre = Preprocessor.from_dict(storage.read_json(storage.join(args.features, "preprocessor.json")))
    spec = datasets.get(pre.dataset)
    _, train = load_split(storage.join(args.features, "train"), spec, pre)
    _, validation = load_split(storage.join(args.features, "validation"), spec, pre)

    ray = start_ray(args.cpus)
    storage_dir = tempfile.mkdtemp(prefix="adfraud-tune-")
    try:
        # Resources from what the cluster has: never ask for more than one node offers.
        total = int(ray.cluster_resources().get("CPU", 1))
        largest_node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
        concurrent = max(1, min(args.trials, total))
        # A trial runs on one node: never ask for more CPUs than the largest node has.
        per_trial = max(1, min(total // concurrent, largest_node))
        logger.info("tuning %d trials, %d at a time, %d CPU each (cluster has %d, largest node %d)", args.trials,
                    concurrent, per_trial, total, largest_node)
        space = search_space(args.seed)
        trainable = tune.with_resources(
            tune.with_parameters(trial, pre=pre, train=train, validation=validation, epochs=args.max_epochs,
                                 threads=per_trial),
            {"cpu": per_trial},
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                num_samples=args.trials,
                scheduler=ASHAScheduler(max_t=args.max_epochs, grace_period=args.grace_period, reduction_factor=2),
                # The generator takes the concurrency cap itself (Tune ignores
                # max_concurrent_trials for a SearchGenerator).
                search_alg=BasicVariantGenerator(points_to_evaluate=[starting_point(space)],
                                                 max_concurrent=concurrent, random_state=args.seed),
            ),
            run_config=tune.RunConfig(name="adfraud-tune", storage_path=storage_dir, verbose=0),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
        shutil.rmtree(storage_dir, ignore_errors=True)

    # Best trial, and every trial as a nested MLflow run.
    trials = []
    for result in grid:
        if result.error or not result.metrics:
            trials.append({"config": result.config, "error": str(result.error)})
            continue
        history = result.metrics_dataframe
        best_value, se = 0.0, None
        if history is not None and len(history):
            top = history.loc[history[METRIC].idxmax()]
            best_value = float(top[METRIC])
            se = float(top[f"{METRIC}_se"]) if f"{METRIC}_se" in top else None
        trials.append({"config": result.config, METRIC: best_value, "se": se,
                       "epochs": int(result.metrics["training_iteration"])})
    ok = [t for t in trials if "error" not in t]
    if not ok:
        cli.fail(f"all {len(trials)} tuning trials failed; first error: {trials[0].get('error')}")
    chosen, selection = select(trials, starting_point(space))
    logger.info("selected the %s trial: %s (best %.4f, defaults %s, margin %s)", selection["chosen"],
                selection["why"], selection["best_value"],
                f"{selection['default_value']:.4f}" if "default_value" in selection else "n/a",
                f"{selection['margin']:.4f}" if "margin" in selection else "n/a")
    best_config = dict(chosen["config"])
    tracking.configure()
    with mlflow.start_run(run_name=f"tune-{spec.name}", tags={tracking.TAG_DAG_RUN_ID: args.run_id,
                                                              tracking.TAG_DATASET: spec.name,
                                                              tracking.TAG_STAGE: "tune"}) as parent:
        mlflow.log_params(tracking.clean_params({"trials": args.trials, "max_epochs": args.max_epochs,
                                                 "grace_period": args.grace_period}))
        mlflow.log_metrics({f"best_{METRIC}": selection["best_value"], f"chosen_{METRIC}": chosen[METRIC]})
        mlflow.set_tag("adfraud.tune_selection", selection["chosen"])
        for i, t in enumerate(trials):
            with mlflow.start_run(run_name=f"trial-{i:03d}", nested=True):
                mlflow.log_params(tracking.clean_params(t["config"]))
                if "error" not in t:
                    mlflow.log_metrics({METRIC: t[METRIC], "epochs": t["epochs"],
                                        **({f"{METRIC}_se": t["se"]} if t["se"] is not None else {})})
    payload = {"config": best_config, "metric": METRIC, "value": chosen[METRIC], "selection": selection,
               "trials": trials}
    storage.write_json(storage.join(args.output, "best_config.json"), payload)
    logger.info("chosen of %d trials: %s = %.4f with %s", len(trials), METRIC, chosen[METRIC], best_config)
    return {
        "dataset": spec.name,
        "best_config_uri": storage.join(args.output, "best_config.json"),
        "best_config": best_config,
        "best_metric": METRIC,
        "best_value": selection["best_value"],
        "chosen_value": chosen[METRIC],
        "selection": selection["chosen"],
        "trials": len(trials),
        "trials_failed": len(trials) - len(ok),
        "mlflow_run_id": parent.info.run_id,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("jobs.tune", __doc__.split("\n\n")[0])
    p.add_argument("--features", required=True, help="ETL output URI (train/, validation/, preprocessor.json)")
    p.add_argument("--output", required=True, help="URI to write best_config.json")
    p.add_argument("--trials", type=int, default=4, help="number of sampled configurations")
    p.add_argument("--max-epochs", type=int, default=4, help="ASHA max_t: epochs of the longest trial")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA grace period in epochs (<= --max-epochs)")
    p.add_argument("--cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    p.add_argument("--seed", type=int, default=7, help="seed of the search and of every trial")
    p.add_argument("--run-id", default="manual", help="orchestrator run id, recorded as an MLflow tag")
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    if args.trials < 1 or args.max_epochs < 1:
        cli.fail("--trials and --max-epochs must be at least 1")
    cli.write_result(run(args), args.result_path)


if __name__ == "__main__":
    main()
