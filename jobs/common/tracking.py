"""MLflow setup shared by the stages: tracking URI, experiment, run lookup."""

from __future__ import annotations

import logging
from typing import Any

from jobs.common import settings, storage

logger = logging.getLogger(__name__)

# Tags every pipeline run carries so a reviewer can trace a model to its inputs.
TAG_DAG_RUN_ID = "adfraud.dag_run_id"
TAG_DATASET = "adfraud.dataset"
TAG_FEATURE_SPEC = "adfraud.feature_spec_hash"
TAG_DATA_URI = "adfraud.data_uri"
TAG_BACKEND = "adfraud.training_backend"
TAG_STAGE = "adfraud.stage"


def configure() -> str:
    """Point MLflow at the configured store and make sure the experiment exists.

    Returns the experiment id. A new experiment keeps its artifacts under
    ``ADFRAUD_HOME/mlartifacts`` (not in the working directory) unless a tracking server
    decides where artifacts go.
    """
    import mlflow

    uri = settings.mlflow_tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = settings.mlflow_experiment()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        if uri.startswith("sqlite:"):
            artifact_location = storage.join(settings.home(), "mlartifacts")
        try:
            experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # another stage created it first
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def model_name(dataset: str) -> str:
    """The registered model name for a dataset: one lineage of champions per dataset."""
    return f"adfraud-{dataset}"


def clean_params(params: dict[str, Any]) -> dict[str, str]:
    """MLflow params as short strings."""
    return {k: (",".join(map(str, v)) if isinstance(v, list) else str(v))[:500] for k, v in params.items()}
