"""The only module that imports MLflow: a small interface that never raises into training.

Every call is wrapped: a tracking failure (store down, a name or value over MLflow's limits) is
logged as a warning and remembered in `Tracker.errors`; the checkpoint on disk is the source of
truth and MLflow the index.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("posttrain.tracking")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A tracking server that is down must not hold training for minutes (MLflow's default is 7 retries
# with exponential back-off); users who want more patience set these themselves.
# A store that fails once is not asked again this process: its calls are queued (tasks/tracking_queue.py).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
# Artifacts fetched from a tracking server (lineage comparing a changed checkpoint with its logged
# copy) would draw a progress bar into the command's error output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# MLflow stores dataset digests in a 36-character column: we log the first 32 hex characters of
# the file's sha256 there, and the full digest in the run's posttrain.inputs tag.
MLFLOW_DIGEST_CHARS = 32


def mlflow_digest(digest: str) -> str:
    return digest.removeprefix("sha256:")[:MLFLOW_DIGEST_CHARS]


@contextlib.contextmanager
def store_lock(tracking_uri: str):
    """Hold an exclusive lock on `<db>.lock` next to a SQLite store while connecting to it.

    MLflow creates and migrates a SQLite store on the first connection; two processes doing it at
    once on a new store leave `_alembic_tmp_*` tables behind, and every later connection fails on
    them. The lock makes the first connection (and the experiment's creation) one process at a time.
    Other stores (a tracking server) migrate on their own side: no lock.
    """
    from urllib.parse import unquote, urlparse

    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(unquote(urlparse(tracking_uri).path))
    if not db.parent.is_dir():  # MLflow names the missing directory itself
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_server(tracking_uri: str) -> bool:
    """A tracking server (`http(s)://`): it keeps artifacts under its own root and serves them, so a new
    experiment takes the server's default location (`mlflow-artifacts:/…`), never a path on this
    machine that a teammate's machine would not have."""
    return tracking_uri.startswith(("http://", "https://"))


def unreachable(e: BaseException) -> bool:
    """The store did not answer (refused, timed out, 5xx), as opposed to refusing one call's values."""
    import requests

    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            ConnectionError, TimeoutError)):
            return True
    text = str(e)
    return (("API request to" in text and "failed with exception" in text)
            or re.search(r"failed with error code 5\d\d", text) is not None
            or "unable to open database file" in text)


# What a SQLite store answers when another process holds its write lock longer than MLflow's
# busy timeout (20 s), or when two transactions would deadlock on upgrading a read lock (SQLite then
# answers at once, without waiting): the call changed nothing and may simply be made again.
_LOCKED = ("database is locked", "database table is locked", "database is busy")
LOCKED_RETRIES = 6  # attempts in all; waits 0.5, 1, 2, 4, 8 s between them


def _is_locked(exc: BaseException | None) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(m in str(exc).lower() for m in _LOCKED):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _RetryLocked:
    """An MlflowClient whose every call is made again while a SQLite store says it is locked.

    Concurrent runs share one store (`<state>/mlflow.db`). Each client call is one transaction,
    rolled back when SQLite refuses it, so calling it again is safe; a call is retried, not a Tracker
    method (which may make several calls: `log_params` in batches), so nothing is logged twice."""

    def __init__(self, client, attempts: int = LOCKED_RETRIES, first_delay: float = 0.5):
        self._client, self._attempts, self._first_delay = client, attempts, first_delay

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            delay = self._first_delay
            for attempt in range(1, self._attempts + 1):
                try:
                    return attr(*args, **kwargs)
                except Exception as e:
                    if attempt == self._attempts or not _is_locked(e):
                        raise
                    log.info("MLflow store locked by another process in %s (attempt %d of %d): retrying in %.1fs",
                             name, attempt, self._attempts, delay)
                    time.sleep(delay)
                    delay *= 2

        return call


def _safe(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if self.journal is not None:  # the store did not answer earlier: queue, do not wait again
            return self._queue(fn.__name__, args, kwargs)
        args, kwargs = self.ids.translate(args), self.ids.translate(kwargs)
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never fail a stage
            if self.raise_errors:
                raise
            if self.queue_dir is not None and unreachable(e):
                self._go_offline(f"{type(e).__name__}: {e}")
                return None if fn.__name__ == "_connect" else self._queue(fn.__name__, args, kwargs)
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
    """MLflow calls that never raise into training (unless `raise_errors`, for a replay).

    With a `queue_dir`, a store that does not answer turns the tracker offline for good: one warning,
    and every later call goes to a journal there (`tasks.tracking_queue`) instead of waiting on the
    store again; `posttrain sync` or the next run's start replays it."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None,
                 queue_dir: str | os.PathLike | None = None, raise_errors: bool = False):
        from tasks.tracking_queue import IdMap

        self.uri, self.experiment, self.artifact_root = tracking_uri, experiment, artifact_root
        self.errors: list[str] = []
        self.experiment_id: str | None = None
        self.client = None
        self.queue_dir = Path(queue_dir) if queue_dir is not None else None
        self.raise_errors = raise_errors
        self.journal = None
        self.ids = IdMap(self.queue_dir)
        self._connect(experiment, artifact_root)

    @property
    def offline(self) -> bool:
        return self.journal is not None

    @property
    def queued(self) -> int:
        return self.journal.calls if self.journal is not None else 0

    def _go_offline(self, reason: str) -> None:
        from tasks.tracking_queue import Journal

        self.journal = Journal(self.queue_dir, self.uri, self.experiment, self.artifact_root, reason)
        msg = (f"MLflow store {self.uri} did not answer ({reason[:300]}); this run's tracking is queued in "
               f"{self.journal.path} and goes to the store with `posttrain sync` (or at the next run's start)")
        log.warning(msg)
        self.errors.append(msg)

    def _queue(self, call: str, args: tuple, kwargs: dict):
        from tasks.tracking_queue import new_placeholder

        kwargs = {k: v for k, v in kwargs.items() if k != "at_ms"}
        returns = new_placeholder() if call == "start_run" else None
        self.journal.append(call, args, kwargs, returns)
        return returns

    @_safe
    def _connect(self, experiment: str, artifact_root: str | None) -> None:
        from mlflow.tracking import MlflowClient

        with store_lock(self.uri):  # one process at a time creates the store and the experiment
            client = _RetryLocked(MlflowClient(tracking_uri=self.uri))
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                loc = Path(artifact_root).resolve().as_uri() if artifact_root and not is_server(self.uri) else None
                self.experiment_id = client.create_experiment(experiment, artifact_location=loc)
            else:
                self.experiment_id = exp.experiment_id
                if artifact_root:
                    _follow_moved_store(self.uri, exp.artifact_location, Path(artifact_root).resolve())
            self.client = client

    @property
    def ok(self) -> bool:
        return self.client is not None and self.experiment_id is not None

    @_safe
    def start_run(self, name: str, params: dict | None = None, tags: dict | None = None,
                  parent_run_id: str | None = None, at_ms: int | None = None) -> str | None:
        if not self.ok:
            return None
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if at_ms is not None:  # a replayed run: when it really ran
            all_tags["posttrain.replayed"] = "true"
        run = self.client.create_run(self.experiment_id, start_time=at_ms, run_name=name, tags=all_tags)
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
    def log_metrics(self, run_id: str | None, rows: list[dict], prefix: str = "", step_key: str = "step",
                    at_ms: int | None = None) -> None:
        """Per-step rows ({step: 3, loss: 0.4, ...}) in batches, or one row without a step."""
        from mlflow.entities import Metric

        if not run_id:
            return
        now = at_ms if at_ms is not None else int(time.time() * 1000)
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
    def has_artifact(self, run_id: str | None, artifact_path: str) -> bool:
        return bool(run_id) and bool(self.client.list_artifacts(run_id, artifact_path))

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
    def end_run(self, run_id: str | None, status: str = "FINISHED", at_ms: int | None = None) -> None:
        if run_id:
            self.client.set_terminated(run_id, status=status, end_time=at_ms)

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


def kill_runs(tracking_uri: str, parent_run_id: str, why: str) -> None:
    """End a flow's parent run and its unfinished stage runs as KILLED, `why` in `posttrain.error`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    children = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run_id in [r.info.run_id for r in children] + [parent_run_id]:
        client.set_tag(run_id, "posttrain.error", why)
        client.set_terminated(run_id, "KILLED")


class RunReader:
    """Read-only access to the store for `posttrain lineage`: plain dicts out, and errors raised.

    Unlike `Tracker` (which must never fail a stage), a reader wants to hear that the store is down.
    It never creates an experiment or writes anything.
    """

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        with store_lock(tracking_uri):
            self.client = _RetryLocked(MlflowClient(tracking_uri=tracking_uri))
            self.client.search_experiments(max_results=1)  # the store's creation, under the lock

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

    def runs_tagged(self, tag: str, value: str) -> list[dict]:
        """Runs whose tag `tag` is exactly `value`, oldest first, whatever characters the value holds.

        MLflow's filter strings have no escape character: a value goes in whichever quotes it lacks;
        one with both quotes or a backslash is matched with LIKE (`_` for those characters) and then
        compared exactly here."""
        key = f"tags.`{tag}`"
        for quote in "'\"":
            if quote not in value and "\\" not in value:
                return self.search(f"{key} = {quote}{value}{quote}")
        pattern = "".join("_" if c in "'\"\\" else c for c in value)
        return [r for r in self.search(f"{key} LIKE '{pattern}'") if r["tags"].get(tag) == value]

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
            atexit.register(shutil.rmtree, dst, True)  # a download for this command only
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


def _follow_moved_store(uri: str, location: str, artifact_root: Path) -> None:
    """A state dir copied elsewhere (the disk-full advice) brings a SQLite store whose experiment and
    runs still name the old dir's artifact root: new runs would write there. When the store is this
    state dir's own (the db next to `artifact_root`), point every stored artifact location under the
    old root at the new one. MLflow has no API to move an experiment's artifact location."""
    import sqlite3

    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    old, new = location.rstrip("/"), artifact_root.as_uri()
    if db is None or db.resolve().parent != artifact_root.parent or old == new or not old.startswith("file://"):
        return
    columns = {"experiments": ("artifact_location",), "runs": ("artifact_uri",),
               "logged_models": ("artifact_location",), "model_versions": ("source", "storage_location")}
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, cols in columns.items():
            for col in cols if table in tables else ():
                conn.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?) WHERE {col} = ? OR {col} LIKE ?",
                             (new, len(old) + 1, old, old + "/%"))
