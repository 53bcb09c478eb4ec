"""Long rows of several systems timed in turns, within one call (issue 15, items 3 and 6).

At 1B the long-row step is bound by the host, and on the GPU nodes the host's speed drifts while a bench runs: on
2026-12-01 the same system moved by a factor of 1.4 between processes of one call, 40 timed steps each
(``results/session_h200_2026-12-01h.md``). Processes run one after another meet that drift at different times. Here
every system is loaded at once, each in its own process (loramill's ``bench_speed.py`` and Unsloth's
``reference/unsloth_anchor.py`` cannot share one), and they take turns: a window of a few steps each, the order
rotating every window, so that a drift falls on all of them alike. Each window's ratio compares systems measured
seconds apart; the JSON line gives every window's tok/s, each system's rate over all its windows, and the median
of the windows' ratios against Unsloth.

    python3 bench/bench_paired.py llama-1b qlora [--systems loramill loramill-offload unsloth] [--windows 10]
        [--turn-steps 4] [--tokenizer .gpu-tokenizer] [--log FILE]

Environments as in ``bench_session.py``: loramill's processes with ``.gpu-bundle`` in /tmp/site, Unsloth's with
``.unsloth-bundle`` in /tmp/usite; the checkpoint in /tmp/ckpt (``bench_session.py --setup-only``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import TextIO

from bench_session import REPO, loramill_env, unsloth_env

TOKENS_PER_STEP = 4 * 2048  # bench_speed's and unsloth_anchor's micro batch


class Timed:
    """One system's process, started loaded and warm, waiting for its turns."""

    def __init__(self, system: str, argv: list[str], env: dict, log: TextIO):
        self.system, self.log, self.result = system, log, None
        self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)

    def turn_done(self) -> float | None:
        """Read the process's output up to the end of its current window (its first: warm and ready)."""
        for line in self.process.stdout:
            self.log.write(f"[{self.system}] {line}")
            if not line.startswith("{"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "turn_done" in row:
                return row["turn_done"]
            if "error" in row:
                raise RuntimeError(f"{self.system}: {row['error']}")
        raise RuntimeError(f"{self.system} exited (code {self.process.wait()}) before its turn ended: see the log")

    def take_turn(self) -> float:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return self.turn_done()

    def close(self) -> dict:
        """The process's own result row (rate over its windows, peak memory), once it has exited."""
        for line in self.process.stdout:
            self.log.write(f"[{self.system}] {line}")
            if line.startswith('{"system"'):
                self.result = json.loads(line)
        if self.process.wait() != 0 or self.result is None:
            raise RuntimeError(f"{self.system} exited with {self.process.returncode} without its row: see the log")
        return self.result


def command(system: str, shape: str, mode: str, steps: int, turn_steps: int, tokenizer: Path) -> tuple[list, dict]:
    if system == "unsloth":
        return ([sys.executable, "bench/reference/unsloth_anchor.py", shape, mode, "--steps", str(steps),
                 "--turns", str(turn_steps)], unsloth_env())
    return ([sys.executable, "bench/bench_speed.py", "--shapes", shape, "--modes", mode, "--systems", system,
             "--tokenizer", str(tokenizer), "--steps", str(steps), "--turns", str(turn_steps)], loramill_env())


def paired(shape: str, mode: str, systems: list[str], windows: int, turn_steps: int, tokenizer: Path,
           log: TextIO) -> dict:
    timed = [Timed(s, *command(s, shape, mode, windows * turn_steps, turn_steps, tokenizer), log) for s in systems]
    try:
        for t in timed:  # loading and compiling run side by side; each then waits for its first turn
            t.turn_done()
        seconds: dict[str, list[float]] = {s: [] for s in systems}
        for window in range(windows):
            turn = window % len(timed)
            for t in timed[turn:] + timed[:turn]:
                seconds[t.system].append(t.take_turn())
        results = {t.system: t.close() for t in timed}
    finally:
        for t in timed:
            if t.process.poll() is None:
                t.process.kill()
    rate = {s: [round(TOKENS_PER_STEP * turn_steps / x) for x in seconds[s]] for s in systems}
    row = dict(system="paired", path=shape, quant=mode == "qlora", windows=windows, turn_steps=turn_steps,
               order="every system loaded at once, a window each in turn, the order rotating every window",
               rows={s: dict(tok_s=results[s]["tok_s"], peak_gib=results[s]["peak_gib"], window_tok_s=rate[s])
                     for s in systems})
    if "unsloth" in systems:
        row["against_unsloth"] = {}
        for s in systems:
            if s == "unsloth":
                continue
            ratios = [a / b for a, b in zip(rate[s], rate["unsloth"])]  # each window against Unsloth's next to it
            row["against_unsloth"][s] = dict(
                windows_median=round(statistics.median(ratios), 3), windows_min=round(min(ratios), 3),
                windows_max=round(max(ratios), 3), overall=round(results[s]["tok_s"] / results["unsloth"]["tok_s"], 3))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape")
    parser.add_argument("mode", choices=["qlora", "lora"])
    parser.add_argument("--systems", nargs="+", default=["loramill", "loramill-offload", "unsloth"])
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--turn-steps", type=int, default=4, help="steps in a window (1B: 4 steps are ~0.7 s)")
    parser.add_argument("--tokenizer", type=Path, default=Path(".gpu-tokenizer"))
    parser.add_argument("--log", type=Path, default=None, help="the processes' own output (default: stderr)")
    args = parser.parse_args()
    log = args.log.open("a") if args.log else sys.stderr
    try:
        row = paired(args.shape, args.mode, args.systems, args.windows, args.turn_steps, args.tokenizer, log)
    except RuntimeError as error:
        row = dict(system="paired", path=args.shape, quant=args.mode == "qlora", error=str(error)[:400])
    print(json.dumps(row), flush=True)
    sys.exit(1 if "error" in row else 0)


if __name__ == "__main__":
    main()
