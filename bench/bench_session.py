"""One bench, one session (issue 15 item 6): loramill, the plain path and the two Unsloth anchors back to back on one
GPU node, in separate processes one after the other, and one markdown file with the commands, tok/s, peak memory
and the loramill / Unsloth ratios.

Parts, in this order (each a process of its own; the exact command lines are recorded in the JSON and the table):

1. long rows, batch 4 x 2048 random tokens: ``bench/bench_speed.py`` once per system (plain path, loramill's default
   step and the same with ``train.offload_checkpoints``; QLoRA and bf16 LoRA), then ``bench/reference/unsloth_anchor.py`` on the
   same checkpoint (QLoRA and bf16 LoRA); ``--long-rounds N``: N processes per system (the plain path once), taken
   in turn, and the table gives each row's median and range; ``--long-turns``: instead, the plain path once,
   then loramill's two systems and Unsloth loaded at once and timed in turns by ``bench/bench_paired.py`` (a
   window of steps each, the order rotating), so that the node's drift falls on all of them alike;
2. real data (``data/medical/train.jsonl``, 1B shape, 4-bit): ``bench/bench_realdata.py`` at the token budgets that
   are compared with Unsloth, then ``bench/reference/unsloth_realdata.py`` (Unsloth + TRL) on the same files:

   | per optimizer step | loramill (``batch_tokens``) | Unsloth + TRL |
   |---|---|---|
   | ~16 examples | packed 2048 | 16 examples, padding-free |
   | ~60 examples | packed 8192 | 64 examples, padding-free |
   | 8 rows of 2048 | packed 16384 | packed by TRL, 8 x 2048 |
   | 16 rows of 2048 | packed 32768 | packed by TRL, 16 x 2048 |
   | long chats, 8 rows of 2048 | packed 16384 | packed by TRL, 8 x 2048 |

The two environments do not mix: loramill's parts run with ``PYTHONPATH=/tmp/site:REPO`` (``.gpu-bundle``), Unsloth's
with ``PYTHONPATH=/tmp/usite`` (``.unsloth-bundle``). Each bundle is installed from the checkout when it is there
and not installed yet; both stay in /tmp while the machine is warm. The two bundles (41 + 52 MiB) do not fit into one
64 MiB transfer, so on the device tool the session is: one call carrying one bundle (``--setup-only``), then calls
carrying the other and ``.gpu-tokenizer`` that run the whole bench (``results/session_h200_2026-12-01h.md``: the
setup with ``.gpu-bundle``, its install script run and ``PYTHONPATH=/tmp/site:$PWD`` exported first). A bench
longer than one call (``--budget`` stops it in time) goes on in the next with ``--resume``, its JSON from the call
before copied into ``--out-dir`` first (the device tool's ``$OUT`` starts empty).

    python3 bench/bench_session.py --setup-only                      # install what is carried, make checkpoints
    python3 bench/bench_session.py --tag run1 --out-dir DIR          # the bench; writes DIR/session_TAG.{json,md,log}
    python3 bench/bench_session.py --tag run1 --out-dir DIR --resume # the parts the budget left, into the same run
    python3 bench/bench_session.py render RUN1.json [RUN2.json ...] --out FILE.md   # one table, with the spread
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CKPT = Path("/tmp/ckpt")
LORAMILL_LONG = ("loramill", "loramill-offload")  # bench_speed's systems in the long rows: the default step, offloaded
SITE, USITE = Path("/tmp/site"), Path("/tmp/usite")
DATA = "data/medical/train.jsonl"
LONG = str(CKPT / "long.jsonl")  # written by bench_realdata.long_conversations (14 examples a chat)
UNSLOTH_STEPS = 20  # unsloth_realdata times the steps after 3 warm-up steps: 17 timed steps
# Long rows' timed steps (after 3 warm-up steps), the same for every system: about 7 s of loramill's step, where 8
# steps (1.4 s at 1B) let one hiccup of the host count for several percent. It did not steady the 1B rows: they
# drifted by 1.4x within one call with 40 (results/session_h200_2026-12-01h.md), the node's doing; --long-turns is
# the bench for that.
LONG_TIMED_STEPS = {"llama-1b": 40, "llama-8b": 10}
TURN_WINDOWS = 10  # --long-turns: the timed steps in this many windows a system (bench_paired.py)

# (label, loramill row "data:packed:budget", Unsloth (data, batch, pack|nopack))
REALDATA_PAIRS = [
    ("~16 examples a step", "short:packed:2048", ("short", 16, "nopack")),
    ("~60 examples a step", "short:packed:8192", ("short", 64, "nopack")),
    ("8 rows of 2048", "short:packed:16384", ("short", 8, "pack")),
    ("16 rows of 2048", "short:packed:32768", ("short", 16, "pack")),
    ("long chats, 8 rows of 2048", "long:packed:16384", ("long", 8, "pack")),
]


def loramill_env() -> dict:
    return os.environ | {"PYTHONPATH": f"{SITE}:{REPO}", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
                         "RAY_AUTH_MODE": "disabled"}


def unsloth_env() -> dict:
    return os.environ | {"PYTHONPATH": str(USITE), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                         "UNSLOTH_DISABLE_STATISTICS": "1", "CKPT_ROOT": str(CKPT)}


ENV_TEXT = {"loramill": f"PYTHONPATH={SITE}:$PWD", "unsloth": f"PYTHONPATH={USITE} HF_HUB_OFFLINE=1 CKPT_ROOT={CKPT}"}


class Session:
    """Runs the parts one after another within a time budget, logging each and keeping every JSON line printed."""

    def __init__(self, out_dir: Path, tag: str, budget_s: float, resume: bool = False):
        self.out_dir, self.tag, self.budget_s = out_dir, tag, budget_s
        self.started = time.perf_counter()
        self.log = (out_dir / f"session_{tag}.log").open("a")
        saved = out_dir / f"session_{tag}.json"
        if resume and saved.exists():  # a bench longer than one device call: the earlier calls' record goes on
            self.record = json.loads(saved.read_text())
            self.record["hosts"] = [*self.record.get("hosts", [self.record["host"]]), platform.node()]
        else:
            self.record = dict(tag=tag, host=platform.node(), parts=[], rows=[], versions={},
                               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        self.earlier_s = self.record.get("wall_s", 0.0)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def part(self, name: str, argv: list[str], env: str, tag: dict | None = None, keep: bool = True) -> list[dict]:
        """Run one part; its JSON lines come back (and go into the record, with ``tag``, when ``keep``). A kept part
        that finished in an earlier call of a resumed bench is not run again; its rows stay in the record."""
        command = f"{ENV_TEXT[env]} {shlex.join(argv)}"
        earlier = [p for p in self.record["parts"] if p["part"] == name]
        if keep and earlier and "error" not in earlier[-1]:
            print(f"## {name}: done in an earlier call", flush=True)
            return [r for r in self.record["rows"] if r["part"] == name]
        self.record["parts"] = [p for p in self.record["parts"] if p["part"] != name]
        self.record["rows"] = [r for r in self.record["rows"] if r["part"] != name]
        entry = dict(part=name, command=command)
        self.record["parts"].append(entry)
        if self.left() < 20:
            entry["error"] = "skipped: the session's time budget was spent"
            print(f"## {name}: skipped (budget)", flush=True)
            self.save()
            return []
        print(f"## {name}: {command}", flush=True)
        self.log.write(f"\n## {name}: {command}\n")
        self.log.flush()
        started = time.perf_counter()
        try:
            done = subprocess.run(argv, cwd=REPO, env=loramill_env() if env == "loramill" else unsloth_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=self.left())
            output, entry["rc"] = done.stdout, done.returncode
        except subprocess.TimeoutExpired as e:
            output = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            entry["error"] = "stopped: the session's time budget ran out during this part"
        entry["seconds"] = round(time.perf_counter() - started, 1)
        self.log.write(output)
        self.log.flush()
        rows = []
        for line in output.splitlines():
            if line.startswith("{"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                print(line, flush=True)
                rows.append(row | (tag or {}) | {"part": name})
        if entry.get("rc"):
            entry["error"] = f"exit {entry['rc']}: " + " | ".join(output.strip().splitlines()[-3:])[-400:]
            print(f"## {name}: {entry['error']}", flush=True)
        print(f"## {name}: {entry['seconds']} s", flush=True)
        if keep:
            self.record["rows"] += rows
        self.save()
        return rows

    def save(self) -> None:
        self.record["wall_s"] = round(self.earlier_s + time.perf_counter() - self.started, 1)
        (self.out_dir / f"session_{self.tag}.json").write_text(json.dumps(self.record, indent=1) + "\n")


def install_bundles() -> list[str]:
    """Unpack the bundles that travelled with the checkout and are not unpacked yet; say what is there."""
    said = []
    if (REPO / ".gpu-bundle/install.sh").exists():
        subprocess.run(["bash", str(REPO / ".gpu-bundle/install.sh")], check=True)
    if (REPO / ".unsloth-bundle/install.sh").exists():
        digest = hashlib.md5(b"".join(sorted(p.name.encode() for p in (REPO / ".unsloth-bundle/wheels").iterdir())))
        marker = USITE / f".bundle-{digest.hexdigest()[:12]}"
        if not marker.exists():
            subprocess.run(["bash", str(REPO / ".unsloth-bundle/install.sh")], check=True)
            marker.touch()
    for name, site in (("loramill (.gpu-bundle)", SITE), ("unsloth (.unsloth-bundle)", USITE)):
        said.append(f"{name}: {'installed in ' + str(site) if any(site.glob('.bundle-*')) else 'NOT installed'}")
    return said


VERSIONS = """
import importlib.metadata as m, json, subprocess, torch
names = {names}
v = {{}}
for n in names:
    try:
        v[n] = m.version(n)
    except m.PackageNotFoundError:
        v[n] = None
v["torch.cuda"] = torch.version.cuda
v["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
print(json.dumps({{"versions": v}}))
"""

DATA_FACTS = f"""
import json, sys
from pathlib import Path
Path("{CKPT}").mkdir(parents=True, exist_ok=True)
sys.path.insert(0, "bench")
from bench_realdata import long_conversations
from lora.config import ModelSource
from lora.data import load_examples
from lora.model import load_tokenizer
tok = Path(sys.argv[1])
tokenizer = load_tokenizer(ModelSource(id=str(tok)), tok)
files = {{"short": Path("{DATA}"), "long": long_conversations(Path("{DATA}"), Path("{LONG}"))}}
for name, path in files.items():
    ex = load_examples(str(path), {{}}, tokenizer, 2048, "drop")[0]
    lengths = [len(e.input_ids) for e in ex]
    print(json.dumps({{"data_facts": name, "file": str(path), "examples": len(ex), "tokens": sum(lengths),
                      "mean_tokens": round(sum(lengths) / len(ex), 1)}}))
"""


def run_bench(args) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    s = Session(args.out_dir, args.tag, args.budget, args.resume)
    s.record["bundles"] = install_bundles()
    print("\n".join(s.record["bundles"]), flush=True)
    py = "python3"
    tok = str(args.tokenizer)
    for env, names in (("loramill", ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel"]),
                       ("unsloth", ["torch", "transformers", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "trl",
                                    "datasets"])):
        for row in s.part(f"versions ({env})", [py, "-c", VERSIONS.format(names=names)], env, keep=False):
            s.record["versions"][env] = row["versions"]
    s.record["data"] = [r for r in s.part("data facts", [py, "-c", DATA_FACTS, tok], "loramill", keep=False)
                        if "data_facts" in r]
    for shape in args.long_shapes:
        steps = LONG_TIMED_STEPS.get(shape, 8)
        if args.long_turns:
            s.part(f"long rows {shape}: plain", [py, "bench/bench_speed.py", "--shapes", shape, "--modes",
                                                *args.long_modes, "--systems", "plain", "--steps", str(steps)],
                   "loramill")
            for mode in args.long_modes:
                s.part(f"long rows {shape} {mode}: in turns",
                       [py, "bench/bench_paired.py", shape, mode, "--systems", *LORAMILL_LONG, "unsloth",
                        "--windows", str(TURN_WINDOWS), "--turn-steps", str(max(1, steps // TURN_WINDOWS)),
                        "--tokenizer", tok], "loramill")
            continue
        for round_ in range(args.long_rounds):
            # The plain path once: bound by the GPU, it repeats within 1%. The others in turn, each round starting one
            # further, so that a drift of the node does not always fall on the same system.
            systems = [*LORAMILL_LONG, "unsloth"]
            turn = round_ % len(systems)
            systems = (["plain"] if round_ == 0 else []) + systems[turn:] + systems[:turn]
            for system in systems:
                # A process per system, as a run's worker process trains one: at 8B QLoRA (2026-12-01) the offloaded
                # step measured 10,627 tok/s after the default step in the same process, 11,119 and 11,070 alone
                name = f"long rows {shape}: {system}" + (f" (round {round_ + 1})" if args.long_rounds > 1 else "")
                if system == "unsloth":
                    s.part(name, [py, "bench/reference/unsloth_anchor.py", shape, *args.long_modes, "--steps",
                                  str(steps)], "unsloth")
                else:
                    s.part(name, [py, "bench/bench_speed.py", "--shapes", shape, "--modes", *args.long_modes,
                                  "--systems", system, "--tokenizer", tok, "--steps", str(steps)], "loramill")
    pairs = [p for p in REALDATA_PAIRS if p[1] in args.realdata_rows]
    for shape in args.realdata_shapes:
        s.part(f"real data {shape}: loramill",
               [py, "bench/bench_realdata.py", "--tokenizer", tok, "--shapes", shape, "--rows",
                *[p[1] for p in pairs]], "loramill")
        for _, _, (data, bs, mode) in pairs:
            s.part(f"real data {shape}: Unsloth {data} {bs} {mode}",
                   [py, "bench/reference/unsloth_realdata.py", str(CKPT / shape), DATA if data == "short" else LONG,
                    str(bs), str(UNSLOTH_STEPS), mode], "unsloth",
                   tag=dict(data=data, shape=shape))
    s.save()
    (args.out_dir / f"session_{args.tag}.md").write_text(render([s.record]))
    print(f"## done in {s.record['wall_s']} s", flush=True)


def setup_only(args) -> None:
    for line in install_bundles():
        print(line, flush=True)
    for shape in args.long_shapes + args.realdata_shapes:
        subprocess.run([sys.executable, "bench/random_checkpoint.py", shape, "--tokenizer", str(args.tokenizer)],
                       cwd=REPO, check=True)


# ---------------------------------------------------------------------------------------------------------------- table

def index(record: dict) -> dict:
    """Rows by a key that is the same across runs; a key measured in several rounds gets the median of its rounds'
    tok/s and step time (of two rounds: their mean), the highest peak and every round's tok/s (``runs``)."""
    rounds: dict[tuple, list[dict]] = {}
    for key, row in keyed_rows(record):
        rounds.setdefault(key, []).append(row)
    out = {}
    for key, rows in rounds.items():
        out[key] = rows[0] | dict(tok_s=round(statistics.median(r["tok_s"] for r in rows)),
                                  peak=max(r["peak"] for r in rows), runs=[r["tok_s"] for r in rows])
        if len(rows) > 1 and all(r.get("step_s") for r in rows):
            out[key]["step_s"] = round(statistics.median(r["step_s"] for r in rows), 3)
    return out


def keyed_rows(record: dict) -> list[tuple[tuple, dict]]:
    """(key, figures) of every row that measured something."""
    out = []
    for r in record["rows"]:
        if "error" in r:
            continue
        if (r["part"].startswith("long rows") and r.get("system", "plain") in ("plain", *LORAMILL_LONG)
                and "tok_s" in r):
            # bench_speed: hf_baseline's rows carry no system; a row says its shape as path and its mode as quant
            key = ("long", r["path"], "qlora" if r["quant"] else "lora", r.get("system", "plain"))
            out.append((key, dict(tok_s=r["tok_s"], peak=r["peak_gib"], step_s=r.get("step_s"))))
        elif r.get("system") == "paired":  # bench_paired: every system's rate over its windows, one call
            for system, figures in r["rows"].items():
                key = ("long", r["path"], "qlora" if r["quant"] else "lora", system)
                against = r.get("against_unsloth", {}).get(system)
                out.append((key, dict(tok_s=figures["tok_s"], peak=figures["peak_gib"],
                                      turns=against and against | {"windows": r["windows"]})))
        elif r.get("system") == "unsloth" and "tok_s" in r:  # unsloth_anchor
            key = ("long", r["path"], "qlora" if r["quant"] else "lora", "unsloth")
            out.append((key, dict(tok_s=r["tok_s"], peak=r["peak_gib"])))
        elif r.get("system") == "loramill" and "real_tok_s" in r:  # bench_realdata
            key = ("real", r["shape"], f"{r['data']}:{r['batching']}:{r['size']}", "loramill")
            out.append((key, dict(tok_s=r["real_tok_s"], peak=r["peak_gib"], step_s=r["step_s"],
                                  tokens_per_step=r["tokens_per_step"], padding=r.get("padding"),
                                  attention=r.get("attention"))))
        elif r.get("system") == "unsloth+trl":  # unsloth_realdata
            key = ("real", r["shape"], f"{r['data']}:{r['bs']}:{'pack' if r['packing'] else 'nopack'}", "unsloth")
            out.append((key, dict(tok_s=r["real_tok_s"], peak=r["peak_gib"], step_s=r["step_s"],
                                  tokens_per_step=r["tokens_per_step"])))
    return out


def errors(record: dict) -> list[str]:
    said = [f"{p['part']}: {p['error']}" for p in record["parts"] if "error" in p]
    said += [f"{r['part']}: {json.dumps({k: v for k, v in r.items() if k != 'part'})}" for r in record["rows"]
             if "error" in r]
    return said


def fmt(row: dict | None, extra: str = "") -> str:
    if not row:
        return "—"
    step = f", {row['step_s']} s/step" if row.get("step_s") else ""
    runs = row.get("runs", [])
    rounds = f" (median of {len(runs)}: {min(runs):,}–{max(runs):,})" if len(runs) > 1 else ""
    return f"{row['tok_s']:,} tok/s{rounds}{step}, {row['peak']} GiB{extra}"


def ratio(a: dict | None, b: dict | None, key: str = "tok_s") -> str:
    return f"{a[key] / b[key]:.2f}×" if a and b else "—"


def render(records: list[dict]) -> str:
    first, idx = records[0], [index(r) for r in records]
    i1 = idx[0]
    versions = first.get("versions", {})
    out = [f"# One bench, one session: loramill, the plain path and Unsloth on {versions.get('loramill', {}).get('gpu') or 'GPU'}", ""]
    for n, r in enumerate(records, 1):
        hosts = r.get("hosts", [r["host"]])
        where = f"host `{hosts[0]}`" if len(hosts) == 1 else f"{len(hosts)} calls (`--resume`), hosts " + ", ".join(
            f"`{h}`" for h in hosts)
        out.append(f"- run {n} (`{r['tag']}`): {r['date']}, {where}, {r.get('wall_s')} s wall for the bench")
    out.append("")
    for env, v in versions.items():
        out.append(f"- {env} environment: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    for d in first.get("data", []):
        out.append(f"- data `{d['data_facts']}` ({d['file']}): {d['examples']} examples, {d['tokens']:,} tokens, "
                   f"{d['mean_tokens']} tokens an example (loramill's tokenization, SmolLM2 chat template)")
    mean = {d["data_facts"]: d["mean_tokens"] for d in first.get("data", [])}
    out += ["", "Figures below are run 1's; the last table gives run 2 next to it.", ""] if len(records) > 1 else [""]

    shapes = sorted({k[1] for k in i1 if k[0] == "long"})
    if shapes:
        # rows from before the bench set the steps per shape say nothing: bench_speed's default, 8
        timed = {f"{r['path']}: {r.get('steps', 8)}" for r in first["rows"] if r["part"].startswith("long rows")
                 and "tok_s" in r}
        in_turns = [(k, v["turns"]) for k, v in i1.items() if v.get("turns")]
        how = ("Measured in turns (`--long-turns`, below): a row gives the tokens over all of its windows."
               if in_turns else "Measured in rounds (`--long-rounds`, a process per system and round): a row gives "
               "the median of its rounds and their range.")
        out += ["## Long rows: batch 4 × 2048 random tokens, r=16/α=32 all linear layers, gradient checkpointing", "",
                f"tok/s over the timed steps after 3 warm-up steps, the same for all systems ({', '.join(sorted(timed))}"
                f"); peak is `torch.cuda.max_memory_allocated`. {how}", "",
                "loramill offloaded: the same step with `train.offload_checkpoints: true`. The goal is met where "
                "either of loramill's rows is at or above Unsloth's speed at no more than its memory.", "",
                "| shape, mode | plain path | loramill | loramill offloaded | Unsloth | loramill / plain | "
                "loramill / Unsloth speed, memory | offloaded / Unsloth speed, memory | goal (≥ speed, ≤ memory) |",
                "|---|---|---|---|---|---:|---:|---:|---|"]
        for shape in shapes:
            for mode in ("qlora", "lora"):
                p, lm, lo, u = (i1.get(("long", shape, mode, s)) for s in ("plain", *LORAMILL_LONG, "unsloth"))
                if not (p or lm or lo or u):
                    continue
                met = [name for name, row in (("default", lm), ("offloaded", lo))
                       if row and u and row["tok_s"] >= u["tok_s"] and row["peak"] <= u["peak"]]
                goal = "—" if not u else f"met ({', '.join(met)})" if met else "not met"
                out.append(f"| {shape} {'QLoRA' if mode == 'qlora' else 'bf16 LoRA'} | {fmt(p)} | {fmt(lm)} | "
                           f"{fmt(lo)} | {fmt(u)} | {ratio(lm, p)} | {ratio(lm, u)}, {ratio(lm, u, 'peak')} | "
                           f"{ratio(lo, u)}, {ratio(lo, u, 'peak')} | {goal} |")
        out.append("")
        if in_turns:
            out += ["Rows measured in turns (`--long-turns`, `bench_paired.py`): every system loaded at once, a "
                    "window of steps each in turn, the order rotating; a ratio above is over all windows, and each "
                    "window against Unsloth's next to it gives:", ""]
            out += [f"- {k[1]} {k[2]}, {k[3]}: median {t['windows_median']}×, {t['windows_min']}–"
                    f"{t['windows_max']}× over {t['windows']} windows" for k, t in in_turns]
            out.append("")

    shapes = sorted({k[1] for k in i1 if k[0] == "real"})
    for shape in shapes:
        # bench_realdata's rows say how often it repeated the file; rows from before it did say nothing: once
        repeats = {r.get("file_repeats", 1) for r in first["rows"] if r.get("system") == "loramill" and
                   r.get("shape") == shape and "real_tok_s" in r}
        out += [f"## Real data, {shape} shape in 4-bit NF4 (real, non-padding tokens/s)", "",
                "loramill: 10 timed steps after 3 warm-up steps, one base load for all rows, the file repeated "
                f"{' or '.join(f'{n}×' for n in sorted(repeats))}; Unsloth + TRL: {UNSLOTH_STEPS - 3} timed steps "
                "after 3, a process per row, the file repeated 40×.", "",
                "| per optimizer step | loramill | Unsloth + TRL | loramill / Unsloth speed | memory |",
                "|---|---|---|---:|---:|"]
        for label, lrow, (data, bs, mode) in REALDATA_PAIRS:
            lm = i1.get(("real", shape, lrow, "loramill"))
            u = i1.get(("real", shape, f"{data}:{bs}:{mode}", "unsloth"))
            budget = lrow.split(":")[2]
            extra = ""
            if lm:
                examples = f" ≈ {lm['tokens_per_step'] / mean[data]:.0f} examples" if data in mean else ""
                extra = f", {lm['tokens_per_step']:,} tokens a step{examples}"
                extra += f", {lm['attention']}" if lm.get("attention") else ""
            uextra = f", {u['tokens_per_step']:,} tokens a step" if u else ""
            utext = f"{bs} examples, padding-free" if mode == "nopack" else f"{bs} × 2048 packed"
            out.append(f"| {label} | `batch_tokens` {budget}: {fmt(lm, extra)} | {utext}: {fmt(u, uextra)} | "
                       f"{ratio(lm, u)} | {ratio(lm, u, 'peak')} |")
        best = max((v["tok_s"] for k, v in i1.items() if k[:2] == ("real", shape) and k[3] == "loramill"
                    and k[2].startswith("short")), default=None)
        if best is not None:
            out += ["", f"Best loramill short-data rate: {best:,} real tok/s (goal ≥ 25,000: "
                        f"{'met' if best >= 25000 else 'not met'})."]
        out.append("")

    if len(records) > 1:
        out += ["## Second run: every row, run 1 against run 2", "",
                "| row | system | run 1 tok/s | run 2 tok/s | change | run 1 GiB | run 2 GiB |",
                "|---|---|---:|---:|---:|---:|---:|"]
        changes = []
        for key, a in i1.items():
            b = idx[1].get(key)
            name = f"{key[0]} {key[1]} {key[2]}"
            if b:
                change = 100 * (b["tok_s"] / a["tok_s"] - 1)
                changes.append(abs(change))
                out.append(f"| {name} | {key[3]} | {a['tok_s']:,} | {b['tok_s']:,} | {change:+.1f}% | {a['peak']} | "
                           f"{b['peak']} |")
            else:
                out.append(f"| {name} | {key[3]} | {a['tok_s']:,} | — | — | {a['peak']} | — |")
        if changes:
            out += ["", f"Largest change {max(changes):.1f}%, median {sorted(changes)[len(changes) // 2]:.1f}% "
                        f"over {len(changes)} rows."]
        out += ["", "Ratios in run 2:", "", "| row | loramill / Unsloth run 1 | run 2 |", "|---|---:|---:|"]
        pairs = [(f"long {k[1]} {k[2]} {k[3]}", k, (k[0], k[1], k[2], "unsloth")) for k in i1
                 if k[0] == "long" and k[3] in LORAMILL_LONG]
        pairs += [(f"real {s} {label}", ("real", s, lrow, "loramill"), ("real", s, f"{d}:{b}:{m}", "unsloth"))
                  for s in shapes for label, lrow, (d, b, m) in REALDATA_PAIRS]
        for name, kl, ku in pairs:
            out.append(f"| {name} | {ratio(i1.get(kl), i1.get(ku))} | {ratio(idx[1].get(kl), idx[1].get(ku))} |")
        out.append("")

    out += ["## Commands", "", "In the repository root on the node, each part a process of its own, in this order:", "",
            "```bash"]
    out += [p["command"] for p in first["parts"] if not p["part"].startswith(("versions", "data facts"))]
    out += ["```", ""]
    for n, r in enumerate(records, 1):
        out.append(f"Run {n}, seconds per part: " + "; ".join(f"{p['part']} {p.get('seconds', '—')}"
                                                           for p in r["parts"]))
        out.append("")
    problems = [f"- run {n}: {e}" for n, r in enumerate(records, 1) for e in errors(r)]
    if problems:
        out += ["## What failed", ""] + problems + [""]
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "render":
        parser = argparse.ArgumentParser(description="one table from the runs' JSON")
        parser.add_argument("runs", nargs="+", type=Path)
        parser.add_argument("--out", type=Path, required=True)
        args = parser.parse_args(sys.argv[2:])
        args.out.write_text(render([json.loads(p.read_text()) for p in args.runs]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="run")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench/results")
    parser.add_argument("--tokenizer", type=Path, default=Path(".gpu-tokenizer"))
    parser.add_argument("--long-shapes", nargs="*", default=["llama-1b"],
                        help="shapes of the long rows; the flag with none skips them (a real-data-only session: "
                             "they run first and can spend its --budget)")
    parser.add_argument("--long-modes", nargs="+", default=["qlora", "lora"], choices=["qlora", "lora"])
    parser.add_argument("--long-rounds", type=int, default=1, help="processes per long-row system, taken in turn "
                        "(the plain path once); the table gives the median. At 1B, bound by the host, one process "
                        "per row moved by up to 22%% between runs")
    parser.add_argument("--long-turns", action="store_true", help="loramill's long rows and Unsloth's loaded at "
                        "once, timed in turns (bench_paired.py), instead of a process after another: the node's "
                        "drift then falls on all of them alike")
    parser.add_argument("--realdata-shapes", nargs="*", default=["llama-1b"],
                        help="shapes of the real-data rows; the flag with none skips them")
    parser.add_argument("--realdata-rows", nargs="+", default=[p[1] for p in REALDATA_PAIRS],
                        choices=[p[1] for p in REALDATA_PAIRS], help="loramill's rows to run, each with its Unsloth "
                        "pair (default: all)")
    parser.add_argument("--budget", type=float, default=560.0, help="seconds for the whole bench; a part still "
                        "running then is stopped and the parts after it are skipped")
    parser.add_argument("--resume", action="store_true", help="go on with the run TAG in --out-dir: the parts that "
                        "finished in an earlier call are kept, the others (skipped, failed, not reached) run")
    parser.add_argument("--setup-only", action="store_true")
    args = parser.parse_args()
    os.chdir(REPO)
    setup_only(args) if args.setup_only else run_bench(args)


if __name__ == "__main__":
    main()
