"""bench/bench_paired.py's turn-taking: the coordinator and the timed processes' side (bench/reference/turns.py), with
processes that stand in for loramill's and Unsloth's steps (those need CUDA) by sleeping for a step's time."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_paired  # noqa: E402

# argv: system, windows, steps a window, seconds a step, then "fail" to die before its first turn
STAND_IN = textwrap.dedent(f"""
    import json, os, sys, time
    sys.path.insert(0, {str(REPO / "bench" / "reference")!r})
    from turns import Turns
    name, windows, per, step_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    print("compiling", flush=True)
    if sys.argv[5:] == ["fail"]:
        print(json.dumps({{"system": name, "error": "OutOfMemoryError: stand-in"}}), flush=True)
        sys.exit(0)
    turns = Turns()
    for _ in range(windows):
        turns.hand_over(time.perf_counter())
        began = time.time()
        time.sleep(step_s * per)
        print(json.dumps({{"window": [name, began, time.time()]}}), flush=True)
    turns.finish(time.perf_counter())
    print(json.dumps({{"system": name, "tok_s": round(4 * 2048 * per * windows / sum(turns.seconds)),
                      "peak_gib": 1.0}}), flush=True)
""")


def stand_ins(monkeypatch, step_s: dict[str, float], failing: str | None = None) -> None:
    def command(system, shape, mode, steps, turn_steps, tokenizer):
        argv = [sys.executable, "-c", STAND_IN, system, str(steps // turn_steps), str(turn_steps), str(step_s[system])]
        return argv + (["fail"] if system == failing else []), dict(os.environ)

    monkeypatch.setattr(bench_paired, "command", command)


def test_systems_take_turns_never_overlap_and_each_window_is_compared_with_its_neighbours(monkeypatch, tmp_path):
    step_s = {"loramill": 0.02, "loramill-offload": 0.03, "unsloth": 0.025}
    stand_ins(monkeypatch, step_s)
    log = tmp_path / "log"
    with log.open("w") as f:
        row = bench_paired.paired("llama-1b", "qlora", list(step_s), 6, 2, Path("tok"), f)

    windows = [json.loads(line.split("] ", 1)[1])["window"] for line in log.read_text().splitlines()
               if '"window"' in line]
    order = [name for name, _, _ in windows]
    systems = list(step_s)
    assert order == [s for w in range(6) for s in systems[w % 3:] + systems[:w % 3]]  # rotating every window
    spans = sorted((began, ended) for _, began, ended in windows)
    assert all(ended <= next_began for (_, ended), (next_began, _) in zip(spans, spans[1:]))  # one at a time

    assert set(row["rows"]) == set(step_s) and all(len(r["window_tok_s"]) == 6 for r in row["rows"].values())
    against = row["against_unsloth"]
    assert set(against) == {"loramill", "loramill-offload"}
    assert against["loramill"]["windows_median"] == pytest.approx(0.025 / 0.02, rel=0.15)
    assert against["loramill-offload"]["windows_median"] == pytest.approx(0.025 / 0.03, rel=0.15)
    assert against["loramill"]["windows_min"] <= against["loramill"]["windows_median"] <= \
        against["loramill"]["windows_max"]


def test_a_failing_system_stops_the_bench_with_its_error_and_no_process_left(monkeypatch, tmp_path):
    stand_ins(monkeypatch, {"loramill": 0.01, "unsloth": 0.01}, failing="unsloth")
    started = []
    popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(bench_paired.subprocess, "Popen", recording_popen)
    with (tmp_path / "log").open("w") as f, pytest.raises(RuntimeError, match="unsloth: OutOfMemoryError"):
        bench_paired.paired("llama-1b", "qlora", ["loramill", "unsloth"], 3, 1, Path("tok"), f)
    for process in started:
        assert process.wait(timeout=10) is not None


def test_a_timed_process_exits_when_the_coordinator_is_gone():
    done = subprocess.run([sys.executable, "-c", STAND_IN, "loramill", "3", "1", "0.01"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "closed this process's turns" in done.stderr
    assert '"window"' not in done.stdout  # no step ran without its turn
