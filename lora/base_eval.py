"""The frozen base's held-out metrics, kept per measurement and reused. A domain's Tune trials, and a retraining on
unchanged eval data, would otherwise evaluate the same base on the same examples again: on a CPU an evaluation of
32 examples costs about four training steps.

A measurement is identified by everything its result depends on: the base's weights (sha256), how they are loaded
and run (quantization, compute dtype, device type, kernels, how LoRA was initialised) and the evaluated examples'
token ids and labels with their batching. It is kept in this process and under ``cache_dir()/base-evals``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora.model import cache_dir


@dataclasses.dataclass(frozen=True)
class BaseEval:
    metrics: dict[str, float]
    """What ``lora.train.evaluate`` returned for the base (eval_loss, eval_perplexity, ...)."""
    measured_at: str
    """When it was measured (ISO 8601, UTC)."""
    key: str

    def provenance(self) -> str:
        """What ``TrainState.base_eval`` says of a run that reuses this measurement."""
        return (f"reused: measured at {self.measured_at} on the same base weights, eval examples and settings "
                f"(measurement {self.key[:12]})")


_kept: dict[str, BaseEval] = {}


def measurement_key(settings: dict[str, Any], examples: list) -> str:
    """sha256 of ``settings`` (weights sha256, quantization, ...: JSON values) and of every example's fields."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for example in examples:
        digest.update(json.dumps(dataclasses.asdict(example)).encode())
    return digest.hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / "base-evals" / f"{key}.json"


def reused(key: str) -> BaseEval | None:
    """The measurement kept under ``key``; None when there is none (or its file is unreadable: measured again)."""
    if key not in _kept:
        try:
            raw = json.loads(_path(key).read_text())
            _kept[key] = BaseEval({k: float(v) for k, v in raw["metrics"].items()}, str(raw["measured_at"]), key)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    return _kept[key]


def remember(key: str, metrics: dict[str, float]) -> None:
    """Keep ``metrics`` under ``key``; the file is written whole (a temporary file renamed) or not at all."""
    kept = BaseEval(dict(metrics), datetime.now(UTC).isoformat(timespec="seconds"), key)
    _kept[key] = kept
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".partial", delete=False) as f:
        json.dump({"metrics": kept.metrics, "measured_at": kept.measured_at}, f)
    os.replace(f.name, path)
