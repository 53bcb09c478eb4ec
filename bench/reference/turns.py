"""A timed process's side of ``bench/bench_paired.py``: its timed steps in windows, each begun when the coordinator
gives it the turn (a line on stdin), each ended by a ``{"turn_done": seconds}`` line on stdout. Between windows the
process waits, its model loaded, while the other systems take their turns: a drift of the node then falls on every
system alike, where processes run one after another met it at different times.

Used by both sides (``bench_speed.py --turns N`` and ``unsloth_anchor.py --turns N``), which share nothing else:
standard library only.
"""
import json
import sys
import time


class Turns:
    def __init__(self):
        self.seconds: list[float] = []  # each window's time, waits excluded
        self.started: float | None = None

    def hand_over(self, now: float) -> None:
        """End the running window at ``now`` (the first call: say ready), then wait for the next turn."""
        self._end(now)
        if not sys.stdin.readline():  # the coordinator is gone (stopped by the bench's budget): so is this process
            raise SystemExit("bench_paired.py closed this process's turns")
        self.started = time.perf_counter()

    def finish(self, now: float) -> None:
        """End the last window; the process then goes on to print its result and exit."""
        self._end(now)

    def _end(self, now: float) -> None:
        if self.started is not None:
            self.seconds.append(now - self.started)
        print(json.dumps({"turn_done": self.seconds[-1] if self.started is not None else None}), flush=True)
