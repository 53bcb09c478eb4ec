"""A run's identity and its folder: the name that hashes the config and the data bytes, and the output folder
(``output_dir/<domain>/<run>/``: adapter, history, ``run_info.json``, ``result.json``) written from its checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora.config import Config, Domain
from lora.data import check_file
from lora.files import atomic_folder
from lora.redact import drop_storage_options
from lora.train import HISTORY_FILE, STATE_FILE
from pipelines.errors import TrainingFailed
from pipelines.records import RESULT_FILE, RUN_INFO_FILE, SPLITS, RunInfo, RunRecord, run_identity

if TYPE_CHECKING:
    from ray.train import Checkpoint


def run_name(cfg: Config, domain: Domain, data_sha256: dict[str, str], fresh: str | None = None) -> str:
    """Same config and same data bytes -> same name -> Ray Train resumes that run's latest checkpoint.

    ``fresh`` (a UTC time stamp) starts a new run however much of an identical one exists: a forced retraining.
    """
    config = {
        "task": cfg.task,
        "labels": domain.labels,
        "model": cfg.model.model_dump(),
        "quant": cfg.quant.model_dump(),
        "lora": cfg.lora.model_dump(),
        "train": cfg.train.model_dump(),
        "workers": cfg.cluster.workers_per_domain,
    }
    return f"{domain.name}-{run_identity(config, data_sha256)}" + (f"-{fresh}" if fresh else "")


def data_fingerprint(domain: Domain) -> dict[str, str]:
    """Validate the domain's train and eval files (``DataError`` names the file and line) and return the sha256 of
    each: every byte ``read_jsonl`` reads, which is what the worker records while tokenizing."""
    fingerprints = {}
    for split, url in zip(SPLITS, (domain.train, domain.eval)):
        digest = hashlib.sha256()
        check_file(url, domain.storage_options, domain.labels, digest)
        fingerprints[split] = digest.hexdigest()
    return fingerprints


def collect_output(cfg: Config, domain: Domain, name: str, data_sha256: dict[str, str], checkpoint: Checkpoint,
                   wall: float) -> dict[str, Any]:
    """Write ``output_dir/<domain>/<run>/`` atomically: everything but optimizer state, plus result.json.

    Raises ``TrainingFailed`` if the worker read other bytes than the run is named after (the data changed between
    the driver's fingerprint and the worker's read): the run's name would then lie about what it trained on.
    """
    target = Path(cfg.cluster.output_dir) / domain.name / name
    with atomic_folder(target, replace=True) as partial:
        checkpoint.to_directory(str(partial))
        (partial / STATE_FILE).unlink()
        history = json.loads((partial / HISTORY_FILE).read_text())
        info = RunInfo.model_validate_json((partial / RUN_INFO_FILE).read_text())
        read = {split: info.data[split].sha256 for split in SPLITS}
        if read != data_sha256:
            changed = [split for split in SPLITS if read[split] != data_sha256[split]]
            raise TrainingFailed(f"domain {domain.name!r}: the {' and '.join(changed)} data changed while the run "
                                 "started (the worker read other bytes than the driver fingerprinted); run it again")
        evals = [h for h in history if "eval_loss" in h]
        RunRecord(
            domain=domain.name,
            run_name=name,
            steps=history[-1]["step"],
            base_eval_loss=evals[0]["eval_loss"],
            eval_loss=evals[-1]["eval_loss"],
            eval_accuracy=evals[-1].get("eval_accuracy"),
            base_eval_accuracy=evals[0].get("eval_accuracy"),
            trainable_params=info.trainable_params,
            total_params=info.total_params,
            train_seconds=history[-1].get("train_seconds", 0.0),
            wall_seconds=wall,
            tokens_per_second=history[-1].get("tokens_per_second", 0.0),
            config=drop_storage_options(cfg.model_dump()),  # credentials stay out of run folders, which get copied
            info=info,
            output_dir=target,
        ).write(partial / RESULT_FILE)
    return {"output_dir": str(target)}
