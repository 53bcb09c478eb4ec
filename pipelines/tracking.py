"""Experiment tracking: TensorBoard event files for every training run and Tune trial, and MLflow runs when
``tracking.mlflow_uri`` is set (a sweep is a parent run, its trials are child runs).

Rank 0 of a run writes both, as Ray Train's V2 guides for TensorBoard and MLflow do (log from the rank 0 worker):
the Tune logger callbacks never see a Train run's metrics. Every step's metrics are written at the run's reports
(each evaluation and checkpoint), in one batch. The driver opens the MLflow experiment before any worker starts (a
new sqlite store creates its schema once rather than in every worker at the same moment), holds a sweep's parent
run, and tags a training run with the version published from it.

A tracking store that fails mid-run costs the run its MLflow metrics (with one warning), never the run: the
metrics also stay in the run's history.json and TensorBoard files. Light: mlflow and tensorboard are imported where
they are used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import TrackingUnavailable

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lora.config import Config

log = logging.getLogger(__name__)

METRIC_NAMES = {"train_loss": "train_loss", "eval_loss": "eval_loss", "eval_perplexity": "eval_perplexity",
                "eval_accuracy": "eval_accuracy", "lr": "learning_rate", "tokens_per_second": "tokens_per_second"}
"""History key -> the name TensorBoard and MLflow show (the same in both)."""
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
RUN_TAG = "loramill.run"
"""The MLflow tag that names a run as loramill does (run name, sweep experiment, or experiment/trial): a resumed
run or sweep continues its MLflow run instead of starting a second one."""


@dataclass(frozen=True)
class Tracking:
    """Where one run's (or trial's) metrics go: made on the driver, it travels to rank 0 with the run's config."""

    tensorboard_root: str | None
    """``<output_dir>/tensorboard``; None when ``tracking.tensorboard`` is off."""
    mlflow_uri: str | None
    experiment_id: str | None
    parent_run_id: str | None = None
    """The sweep's MLflow run, for its trials."""
    domain: str = ""
    name: str = ""
    """The run's name (``run_folder.run_name``), or ``<sweep experiment>/<trial name>`` for a trial."""

    @classmethod
    def open(cls, cfg: Config) -> Tracking:
        """The stage's tracking. Opens (creates if needed) the MLflow experiment: ``TrackingUnavailable`` names the
        store and the fix when it cannot be reached."""
        tensorboard_root = str(Path(cfg.cluster.output_dir) / "tensorboard") if cfg.tracking.tensorboard else None
        uri = cfg.tracking.mlflow_uri
        if uri is None:
            return cls(tensorboard_root, None, None)
        try:
            with _fail_fast():
                client = _client(uri)
                experiment = client.get_experiment_by_name(cfg.tracking.mlflow_experiment)
                experiment_id = (experiment.experiment_id if experiment
                                 else client.create_experiment(cfg.tracking.mlflow_experiment))
        except Exception as e:  # mlflow raises MlflowException, requests' and SQLAlchemy's errors alike
            raise TrackingUnavailable(f"tracking.mlflow_uri: cannot open MLflow experiment "
                                      f"{cfg.tracking.mlflow_experiment!r} at {uri}: {_first_line(e)}; start the "
                                      "server, fix the URI, or remove tracking.mlflow_uri") from None
        return cls(tensorboard_root, uri, experiment_id)

    def named(self, domain: str, name: str) -> Tracking:
        return replace(self, domain=domain, name=name)

    def start_sweep(self, params: dict[str, Any]) -> Tracking:
        """The sweep's MLflow parent run (``name`` is the sweep's experiment), continued on ``tune --resume``;
        returns the tracking its trials get (``parent_run_id`` set)."""
        if self.mlflow_uri is None:
            return self
        run_id = _find_or_create_run(_client(self.mlflow_uri), self, params)
        return replace(self, parent_run_id=run_id)

    def end_sweep(self, best_trial: str, best_eval_loss: float) -> None:
        if self.parent_run_id is None:
            return
        client = _client(self.mlflow_uri)
        client.set_tag(self.parent_run_id, "loramill.best_trial", best_trial)
        client.log_metric(self.parent_run_id, "best_eval_loss", best_eval_loss)
        client.set_terminated(self.parent_run_id, "FINISHED")

    def trial(self, trial_name: str) -> Tracking:
        return replace(self, name=f"{self.name}/{trial_name}")


OFF = Tracking(None, None, None)
"""No TensorBoard, no MLflow: for callers of the stages' building blocks outside a stage (tests, benchmarks)."""


class RunTracker:
    """Rank 0's writer for one run: every step's metrics from the run's history, written at each report."""

    def __init__(self, tracking: Tracking, params: dict[str, Any], history: list[dict[str, float]]):
        self.tracking = tracking
        self.logged = len(history)
        """History entries already written: on a resume, those up to the checkpoint (an earlier attempt wrote
        them)."""
        resumed_at = int(history[-1]["step"]) if history else None
        self.writer = None
        if tracking.tensorboard_root is not None:
            from tensorboardX import SummaryWriter  # what Ray's own TensorBoard logger writes with

            # purge_step: TensorBoard drops what the failed attempt wrote after the checkpoint it resumes from.
            # The suffix keeps an attempt's file from replacing the one before: tensorboardX names files by the
            # second they were opened in.
            self.writer = SummaryWriter(str(Path(tracking.tensorboard_root) / tracking.domain / tracking.name),
                                        purge_step=None if resumed_at is None else resumed_at + 1,
                                        filename_suffix=f".from-step-{resumed_at or 0}")
        self.client, self.run_id = None, None
        if tracking.mlflow_uri is not None:
            self._mlflow(lambda: self._start_mlflow(params))

    def _start_mlflow(self, params: dict[str, Any]) -> None:
        self.client = _client(self.tracking.mlflow_uri)
        self.run_id = _find_or_create_run(self.client, self.tracking, params)

    def write(self, history: list[dict[str, float]]) -> None:
        """Write the entries added to ``history`` since the last call."""
        entries, self.logged = history[self.logged:], len(history)
        points = [(METRIC_NAMES[key], value, int(entry["step"]))
                  for entry in entries for key, value in entry.items() if key in METRIC_NAMES]
        if self.writer is not None:
            for name, value, step in points:
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.run_id is not None and points:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._mlflow(lambda: self.client.log_batch(
                self.run_id, metrics=[Metric(name, value, now, step) for name, value, step in points]))

    def close(self, finished: bool) -> None:
        """``finished``: the run trained every step; otherwise it was stopped (by ASHA) or failed, and a resume
        continues its MLflow run."""
        if self.writer is not None:
            self.writer.close()
        if self.run_id is not None:
            self._mlflow(lambda: self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED"))

    def _mlflow(self, call: Any) -> None:
        try:
            call()
        except Exception as e:  # the store went away: keep training, keep TensorBoard, say it once
            log.warning("MLflow tracking stopped for %s: %s (the metrics are still in the run's history.json and "
                        "TensorBoard files)", self.tracking.name, _first_line(e))
            self.run_id = None


def run_params(cfg: Config, data_sha256: dict[str, str] | None = None) -> dict[str, Any]:
    """What a run's MLflow parameters say: the config sections that decide its training, flattened."""
    from lora.redact import drop_storage_options

    sections = drop_storage_options(cfg.model_dump(include={"task", "model", "quant", "lora", "train"}))
    params = _flatten(sections) | {"cluster.workers_per_domain": cfg.cluster.workers_per_domain,
                                    "cluster.use_gpu": cfg.cluster.use_gpu}
    return params | {f"data.{split}_sha256": digest for split, digest in (data_sha256 or {}).items()}


def record_published(cfg: Config, run_name: str, version: int, url: str) -> list[str]:
    """Tag the MLflow run that trained ``run_name`` with the version published from it (nothing when MLflow is off
    or that run was trained without it). Runs after publishing's commit point: a failure is a warning to show."""
    if cfg.tracking.mlflow_uri is None:
        return []
    try:
        tracking = Tracking.open(cfg)
        client = _client(tracking.mlflow_uri)
        for run in _runs_named(client, tracking.experiment_id, run_name):
            client.set_tag(run.info.run_id, "loramill.published_version", str(version))
            client.set_tag(run.info.run_id, "loramill.registry_url", url)
    except Exception as e:  # TrackingUnavailable, or the store failing after it opened
        return [f"could not tag MLflow run {run_name} with this version: {_first_line(e)}"]
    return []


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """MLflow's HTTP retries for a first contact: by default a server that is not there takes four minutes of
    retries (7, backing off 2x) to report. Later calls keep MLflow's retries: a run rides out a restarting server."""
    saved = {name: os.environ.get(name) for name in FAIL_FAST}
    os.environ.update(FAIL_FAST)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    # Not "Creating initial MLflow database tables..." in the user's log: the progress lines say what happens.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient(uri)


def _find_or_create_run(client: MlflowClient, tracking: Tracking, params: dict[str, Any]) -> str:
    existing = _runs_named(client, tracking.experiment_id, tracking.name)
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {RUN_TAG: tracking.name, "loramill.domain": tracking.domain}
    if tracking.parent_run_id:
        tags["mlflow.parentRunId"] = tracking.parent_run_id  # MLflow's nesting: the UI shows it under the sweep
    run_id = client.create_run(tracking.experiment_id, run_name=tracking.name.rpartition("/")[2],
                               tags=tags).info.run_id
    from mlflow.entities import Param

    # MLflow keeps a parameter's first value: set once, when the run is created.
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
    return run_id


def _runs_named(client: MlflowClient, experiment_id: str | None, name: str) -> list:
    quoted = name.replace("'", "\\'")
    return client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{quoted}'")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
