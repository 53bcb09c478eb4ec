"""How training progress is shown, decided once per process by the command that runs.

On a terminal: Ray's tqdm bars, one per run. Anywhere else (a file, a pipe, a cron job's or a Ray job's log): no
bars and no escape codes, but one line per run at each evaluation and every ``interval_s`` seconds, as plain text
or, with ``--log-format json``, as one JSON object (``ProgressLine``). Rank 0 of a run puts its lines into an inbox
the driver opens (``shown_here``), and the driver prints them: only the driver's stdout is the user's, and lines a
worker printed itself would reach it late, after the results, and prefixed by Ray.

Light: ray is imported only where a display opens or a worker shows a bar.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pipelines.records import Record

LogFormat = Literal["text", "json"]
Mode = Literal["bars", "text", "json"]
DEFAULT_INTERVAL_S = 30.0


class ProgressLine(Record):
    """One line of a run's progress: ``text()`` off a terminal, its JSON with ``--log-format json``."""

    time: str
    """UTC, ISO 8601, to the second."""
    event: Literal["start", "eval", "progress"]
    """``start`` once the run's base is loaded and it begins (or resumes) at ``step``, ``eval`` at each evaluation
    (step 0 is the base model's), ``progress`` every ``--progress-every`` seconds."""
    domain: str
    trial: str | None
    """The Tune trial (``loramill tune``); None for a training run."""
    step: int
    total_steps: int
    train_loss: float | None = None
    """Mean training loss of the steps since the run's previous line; None when there were none (step 0)."""
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    """Real (non-padding) tokens per second in optimizer steps, all workers together."""
    eta_seconds: float | None = None
    """Wall time left at the pace since the run (re)started, evaluations included; None before its first step."""

    def text(self) -> str:
        parts = [self.time[:19].replace("T", " "), self.trial or self.domain, f"step {self.step}/{self.total_steps}"]
        if self.event == "start":
            parts.append("started" if self.step == 0 else "resumed")
        if self.train_loss is not None:
            parts.append(f"train_loss {self.train_loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"eval_loss {self.eval_loss:.4f}")
        if self.tokens_per_second is not None:
            parts.append(f"tokens/s {self.tokens_per_second:.0f}")
        if self.eta_seconds is not None:
            parts.append(f"eta {timedelta(seconds=round(self.eta_seconds))}")
        return " ".join(parts)


@dataclass(frozen=True)
class Display:
    """How one run shows its progress; it travels to the run's workers with their config."""

    mode: Mode
    interval_s: float = DEFAULT_INTERVAL_S
    inbox: Any = None
    """The driver's ``ray.util.queue.Queue`` of ``ProgressLine`` (text and json modes, inside ``shown_here``)."""
    trial: str | None = None

    def for_trial(self, trial: str) -> Display:
        return replace(self, trial=trial)


TERMINAL = Display("bars")
_chosen = TERMINAL  # until ``configure``: Python callers of the stages keep the bars


def configure(log_format: LogFormat, interval_s: float) -> None:
    """Choose this process's display: bars when stdout and stderr are both terminals and the format is text, else
    lines. Called by the CLI before any stage runs, before Ray or huggingface_hub is imported."""
    global _chosen
    terminal = sys.stdout.isatty() and sys.stderr.isatty()
    mode: Mode = "json" if log_format == "json" else "bars" if terminal else "text"
    if mode != "bars":
        # What else would write escape codes: the hub's download bars (the variable is read when huggingface_hub
        # is imported) and the colours of the "(worker pid=...)" prefix Ray puts on the worker lines it forwards.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    _chosen = Display(mode, interval_s)


def mode() -> Mode:
    return _chosen.mode


def emit(event: str, fields: dict[str, Any]) -> None:
    """One JSON object line on stdout (``--log-format json``): ``time``, ``event`` and ``fields``."""
    _write(json.dumps({"time": _now(), "event": event} | fields, separators=(",", ":")))


@contextlib.contextmanager
def shown_here() -> Iterator[Display]:
    """The display for a stage's runs. In the text and json modes, an inbox whose lines this process prints while
    the stage runs; every line put before the stage ends is printed before this returns."""
    if _chosen.mode == "bars":
        yield _chosen
        return
    from ray.util.queue import Queue

    display = replace(_chosen, inbox=Queue(actor_options={"num_cpus": 0}))  # takes no CPU from training
    stage_ended = threading.Event()
    printer = threading.Thread(target=_print_lines, args=(display, stage_ended), name="loramill-progress",
                               daemon=True)
    printer.start()
    try:
        yield display
    finally:
        stage_ended.set()
        printer.join()
        display.inbox.shutdown()


def _print_lines(display: Display, stage_ended: threading.Event) -> None:
    from ray.exceptions import RayError
    from ray.util.queue import Empty

    inbox = display.inbox
    while True:
        ended = stage_ended.is_set()  # read before taking: what was put before the end is still taken
        try:
            lines = [inbox.get(timeout=0.5)] + inbox.get_nowait_batch(inbox.qsize())
        except Empty:
            lines = []
        except RayError:  # the cluster went away: the stage reports why
            return
        for line in lines:
            _write(line.model_dump_json() if display.mode == "json" else line.text())
        if ended and not lines:
            return


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunProgress:
    """Rank 0's progress for one run: the tqdm bar that Ray draws on the driver's terminal, or ``ProgressLine``s
    into the driver's inbox at each evaluation and every ``interval_s`` seconds."""

    def __init__(self, display: Display, domain: str, total_steps: int, done_steps: int):
        self.display, self.domain, self.total_steps = display, domain, total_steps
        self.started, self.started_step = time.monotonic(), done_steps
        self.last_line_at, self.last_line_step = self.started, done_steps
        self.bar = None
        if display.mode == "bars":
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(total=total_steps, desc=f"{display.trial or domain} train")
            self.bar.update(done_steps)  # ray's tqdm takes no `initial`
        else:  # the bar's appearance, as a line: before it, workers start and load the base (a minute on a CPU)
            self._put("start", done_steps)

    def stepped(self, history: list[dict[str, float]]) -> None:
        """After each optimizer step. ``history`` holds the metrics of every step before it (``lora.train.train``
        calls its ``progress`` before it records the step), so a line shows the steps up to the previous one."""
        if self.bar is not None:
            self.bar.update(1)
        elif time.monotonic() - self.last_line_at >= self.display.interval_s:
            self._line("progress", history)

    def evaluated(self, history: list[dict[str, float]]) -> None:
        """After each evaluation, whose metrics (with ``eval_loss``) are ``history[-1]``."""
        if self.bar is None:
            self._line("eval", history)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _line(self, event: Literal["eval", "progress"], history: list[dict[str, float]]) -> None:
        latest = history[-1]
        step = int(latest["step"])
        since_last = list(itertools.takewhile(lambda h: h["step"] > self.last_line_step, reversed(history)))
        if event == "progress" and not since_last:
            return
        losses = [h["train_loss"] for h in since_last if "train_loss" in h]
        pace = (time.monotonic() - self.started) / (step - self.started_step) if step > self.started_step else None
        self._put(event, step, train_loss=statistics.fmean(losses) if losses else None,
                  eval_loss=latest["eval_loss"] if event == "eval" else None,
                  tokens_per_second=latest.get("tokens_per_second"),
                  eta_seconds=None if pace is None else pace * (self.total_steps - step))
        self.last_line_at, self.last_line_step = time.monotonic(), step

    def _put(self, event: Literal["start", "eval", "progress"], step: int, **metrics: float | None) -> None:
        self.display.inbox.put(ProgressLine(time=_now(), event=event, domain=self.domain, trial=self.display.trial,
                                            step=step, total_steps=self.total_steps, **metrics))
