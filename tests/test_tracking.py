"""Experiment tracking against a real MLflow store (sqlite) and real TensorBoard event files. The whole pipeline's
tracking (a sweep's parent and child runs, the final run, its published version) is checked in
tests/test_pipeline.py's tune test."""

import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from lora.config import ConfigError, load_config
from pipelines.cli import app
from pipelines.tracking import RunTracker, Tracking, record_published

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def history(steps: range) -> list[dict[str, float]]:
    entries = [{"step": 0, "eval_loss": 3.0}] if steps.start == 1 else []
    for step in steps:
        entries.append({"step": step, "train_loss": 3.0 - step / 10, "lr": 1e-3, "train_seconds": step,
                        "tokens_per_second": 100.0} | ({"eval_loss": 2.5 - step / 10} if step % 2 == 0 else {}))
    return entries


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]


def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_drops_the_lost_steps(tmp_path):
    cfg = load_config(CONFIG, [f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
                               f"cluster.output_dir={tmp_path}/output"])
    tracking = Tracking.open(cfg).named("medical", "medical-abc")
    first = history(range(1, 6))
    tracker = RunTracker(tracking, {"lora.r": 8}, [])
    tracker.write(first[:3])  # base eval, steps 1 and 2 (the checkpoint)
    tracker.write(first)  # steps 3 to 5: the attempt then fails
    tracker.close(finished=False)

    # The restart resumes from the step-2 checkpoint, whose history ends at step 2, and trains 3 to 6 again.
    resumed = first[:3] + [{**e, "train_loss": e["train_loss"] - 1} for e in history(range(3, 7))]
    tracker = RunTracker(tracking, {"lora.r": 8}, resumed[:3])
    tracker.write(resumed)
    tracker.close(finished=True)

    folder = tmp_path / "output/tensorboard/medical/medical-abc"
    # Steps 3-5 of the failed attempt are gone: each step's loss is the one the resumed run trained.
    assert scalars(folder, "train_loss") == [(s, e["train_loss"]) for s, e in enumerate(resumed) if s > 0]
    assert scalars(folder, "eval_loss") == [(0, 3.0), (2, 2.3), (4, 2.1), (6, 1.9)]
    assert scalars(folder, "tokens_per_second")[0] == (1, 100.0)

    client = MlflowClient(cfg.tracking.mlflow_uri)
    (run,) = client.search_runs([tracking.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "medical-abc"
    assert run.data.params == {"lora.r": "8"} and run.data.tags["loramill.domain"] == "medical"
    learning_rate = client.get_metric_history(run.info.run_id, "learning_rate")
    assert sorted({m.step for m in learning_rate}) == [1, 2, 3, 4, 5, 6]
    assert run.data.metrics["train_loss"] == pytest.approx(resumed[-1]["train_loss"])

    assert record_published(cfg, "medical-abc", 3, "s3://bucket/adapters/medical/v3") == []
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["loramill.published_version"] == "3"
    assert tags["loramill.registry_url"] == "s3://bucket/adapters/medical/v3"


def test_a_store_that_goes_away_mid_run_costs_the_mlflow_metrics_not_the_run(tmp_path, caplog):
    cfg = load_config(CONFIG, [f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
                               f"cluster.output_dir={tmp_path}/output"])
    tracker = RunTracker(Tracking.open(cfg).named("medical", "medical-abc"), {}, [])
    (tmp_path / "mlflow.db").write_bytes(b"\0" * 4096)  # the store is lost: no longer a database
    tracker.write(history(range(1, 3)))
    tracker.close(finished=True)
    assert "MLflow tracking stopped for medical-abc" in caplog.text
    assert len(scalars(tmp_path / "output/tensorboard/medical/medical-abc", "train_loss")) == 2


@pytest.mark.parametrize(("uri", "message"), [
    ("https://user:secret@mlflow.example.com", "remove the user:password@ part"),
    ("postgres://db/mlflow", "is not an MLflow tracking URI"),
    ("file:///tmp/mlruns", "is not an MLflow tracking URI"),
    ("mlruns", "is not an MLflow tracking URI"),
])
def test_unusable_mlflow_uris_are_config_errors(uri, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(CONFIG, [f"tracking.mlflow_uri={uri}"])
    assert "secret" not in str(error.value)


def test_a_relative_sqlite_store_is_relative_to_the_config_file():
    cfg = load_config(CONFIG, ["tracking.mlflow_uri=sqlite:///mlflow.db"])
    assert cfg.tracking.mlflow_uri == f"sqlite:///{CONFIG.parent / 'mlflow.db'}"


def test_an_unreachable_tracking_server_exits_2_within_seconds_before_ray_starts(tmp_path):
    started = time.monotonic()
    result = CliRunner().invoke(app, ["train", str(CONFIG), "tracking.mlflow_uri=http://127.0.0.1:9",
                                      f"cluster.output_dir={tmp_path}"])
    assert result.exit_code == 2, result.output
    assert "cannot open MLflow experiment 'loramill' at http://127.0.0.1:9" in result.output
    assert "remove tracking.mlflow_uri" in result.output
    assert time.monotonic() - started < 60  # MLflow's own retries would take four minutes
    assert not (tmp_path / "tensorboard").exists()
