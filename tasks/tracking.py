"""The only module that imports MLflow: a small interface that never raises into training.

Every call is wrapped: a tracking failure (store down, a name or value over MLflow's limits) is
logged as a warning and remembered in `Tracker.errors`; the checkpoint on disk is the source of
truth and MLflow the index.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("posttrain.tracking")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A tracking server that is down must not hold training for minutes (MLflow's default is 7 retries
# with exponential back-off); users who want more patience set these themselves.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

# MLflow stores dataset digests in a 36-character column: we log the first 32 hex characters of
# the file's sha256 there, and the full digest in the run's posttrain.inputs tag.
MLFLOW_DIGEST_CHARS = 32


def mlflow_digest(digest: str) -> str:
    return digest.removeprefix("sha256:")[:MLFLOW_DIGEST_CHARS]


def _safe(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never fail a stage
            msg = f"MLflow tracking failed in {fn.__name__}: {type(e).__name__}: {e}"
            if "disk" in str(e).lower() or "No space" in str(e):
                msg += " (the disk looks full: free space under the state dir; checkpoints are kept)"
            else:
                msg += f" (tracking URI {self.uri}; the stage goes on and its outputs stay on disk)"
            log.warning(msg)
            self.errors.append(msg)
            return None

    return wrapper


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None):
        self.uri = tracking_uri
        self.errors: list[str] = []
        self.experiment_id: str | None = None
        self.client = None
        self._connect(experiment, artifact_root)

    @_safe
    def _connect(self, experiment: str, artifact_root: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            loc = Path(artifact_root).resolve().as_uri() if artifact_root else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=loc)
        else:
            self.experiment_id = exp.experiment_id

    @property
    def ok(self) -> bool:
        return self.client is not None and self.experiment_id is not None

    @_safe
    def start_run(self, name: str, params: dict | None = None, tags: dict | None = None,
                  parent_run_id: str | None = None) -> str | None:
        if not self.ok:
            return None
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    @_safe
    def log_params(self, run_id: str | None, params: dict) -> None:
        from mlflow.entities import Param

        if not run_id:
            return
        items = [Param(k[:250], str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    @_safe
    def set_tags(self, run_id: str | None, tags: dict) -> None:
        from mlflow.entities import RunTag

        if not run_id:
            return
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:8000]) for k, v in tags.items()])

    @_safe
    def log_metrics(self, run_id: str | None, rows: list[dict], prefix: str = "", step_key: str = "step") -> None:
        """Per-step rows ({step: 3, loss: 0.4, ...}) in batches, or one row without a step."""
        import time

        from mlflow.entities import Metric

        if not run_id:
            return
        now = int(time.time() * 1000)
        metrics = []
        for row in rows:
            step = int(row.get(step_key, 0))
            for k, v in row.items():
                if k == step_key or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                metrics.append(Metric(_metric_name(prefix + k), float(v), now, step))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    @_safe
    def log_dataset(self, run_id: str | None, path: str, name: str, digest: str, context: str = "training") -> None:
        """Record a dataset input whose MLflow digest is the file's sha256 (truncated, see above)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        if not run_id:
            return
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local file is a local file
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(path).resolve()))
        ds = MetaDataset(source=source, name=name[:500], digest=mlflow_digest(digest))
        tags = [InputTag("mlflow.data.context", context)]
        self.client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=tags)])

    @_safe
    def log_artifacts(self, run_id: str | None, local_dir: str, artifact_path: str | None = None) -> None:
        if run_id:
            self.client.log_artifacts(run_id, local_dir, artifact_path)

    @_safe
    def log_artifact(self, run_id: str | None, local_path: str, artifact_path: str | None = None) -> None:
        if run_id:
            self.client.log_artifact(run_id, local_path, artifact_path)

    @_safe
    def log_json(self, run_id: str | None, obj: Any, artifact_file: str) -> None:
        if not run_id:
            return
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(artifact_file).name
            p.write_text(json.dumps(obj, indent=2, default=str))
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(p), None if parent == "." else parent)

    @_safe
    def log_table(self, run_id: str | None, rows: list[dict], artifact_file: str) -> None:
        if run_id and rows:
            import pandas as pd

            self.client.log_table(run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)

    @_safe
    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self.client.set_terminated(run_id, status=status)

    @_safe
    def register_model(self, name: str, run_id: str, artifact_path: str, tags: dict) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already exists
        source = f"runs:/{run_id}/{artifact_path}"
        mv = self.client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
        return str(mv.version)


def _metric_name(name: str) -> str:
    # MLflow allows alphanumerics, _ - . space : / only: pass@1 is logged as pass_at_1.
    name = name.replace("@", "_at_")
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in name)[:250]


def download_model_version(tracking_uri: str, uri: str, dst: str) -> str:
    """Download `models:/name/version` into dst (used by the fetch stage)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)


class RunReader:
    """Read-only access to the store for `posttrain lineage`: plain dicts out, and errors raised.

    Unlike `Tracker` (which must never fail a stage), a reader wants to hear that the store is down.
    It never creates an experiment or writes anything.
    """

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def run(self, run_id: str) -> dict | None:
        """A run as {run_id, name, status, tags, params, artifact_uri, start_time, datasets}; None if absent."""
        from mlflow.exceptions import MlflowException

        try:
            r = self.client.get_run(run_id)
        except MlflowException:
            return None
        return _run_dict(r)

    def search(self, filter_string: str, max_results: int = 1000) -> list[dict]:
        """Runs of every experiment matching an MLflow filter, oldest first."""
        ids = [e.experiment_id for e in self.client.search_experiments()]
        if not ids:
            return []
        runs = self.client.search_runs(ids, filter_string, max_results=max_results, order_by=["attributes.start_time ASC"])
        return [_run_dict(r) for r in runs]

    def model_version(self, name: str, version: str) -> dict | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(name, version)
        except MlflowException:
            return None
        return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "source": mv.source,
                "tags": dict(mv.tags or {})}

    def artifact_dir(self, run_id: str, artifact_path: str) -> Path | None:
        """A local directory holding a run's logged artifact dir (the store's own copy when it is local)."""
        from urllib.parse import unquote, urlparse

        import mlflow

        run = self.client.get_run(run_id)
        uri = run.info.artifact_uri
        if uri.startswith("file:"):
            p = Path(unquote(urlparse(uri).path)) / artifact_path
            return p if p.is_dir() else None
        try:
            dst = tempfile.mkdtemp(prefix="posttrain-lineage-")
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                            dst_path=dst, tracking_uri=self.uri))
        except Exception:  # noqa: BLE001 - no copy to compare with: the caller names the directory instead
            return None


def _run_dict(r) -> dict:
    return {
        "run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
        "experiment_id": r.info.experiment_id, "start_time": r.info.start_time,
        "artifact_uri": r.info.artifact_uri, "tags": dict(r.data.tags), "params": dict(r.data.params),
        "datasets": [{"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source}
                     for d in (r.inputs.dataset_inputs if r.inputs else [])],
    }
