"""DDP scaling of `loramill train` on one node (issue 17 item 1, issue 15 item 4): 1 vs 2 GPUs per domain.

Runs the real CLI (`loramill train configs/default.yaml -d medical key=value ...`) on random-weight Llama shapes and
times where a run's seconds go without touching the pipeline: with ``BENCH_TIMING_FILE`` set, a ``sitecustomize``
(written by ``site DIR``; put DIR first on PYTHONPATH) wraps the stage functions of ``pipelines.train`` (driver and the
fit_domain task), ``pipelines.train_worker`` and ``lora.train.evaluate`` (Ray Train workers) in every Python process
Ray starts, and appends one JSON line per call (start/end, wall clock, pid, rank) to that file. It also logs each
rank's examples and tokens trained on, its first optimizer steps and its peak CUDA memory.

    python bench/bench_ddp.py site /tmp/benchsite                 # once on the node
    python bench/bench_ddp.py node --budget 560 [--tests]         # on the node: logs.tgz to $OUT; a second call on
                                                                  # the warm machine goes on where the first ended
    python bench/bench_ddp.py summarize DIR                       # here: tables from the unpacked logs
    python bench/bench_ddp.py shares TOKENIZER_DIR 16384 2 120    # here: each rank's examples and tokens
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Timing hook (runs inside every process when BENCH_TIMING_FILE is set)
# ---------------------------------------------------------------------------------------------

_RANK: int | None = None


def _log(event: str, **fields) -> None:
    path = os.environ.get("BENCH_TIMING_FILE")
    if not path:
        return
    record = {"t": time.time(), "pid": os.getpid(), "rank": _RANK, "event": event} | fields
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
    except OSError:
        pass


def _timed(name: str, fn, info=None):
    if getattr(fn, "_bench_timed", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        extra = {}
        if info is not None:
            try:
                extra = info(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                extra = {"info_error": repr(e)}
        _log(name + ":start", **extra)
        started = time.time()
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            _log(name + ":error", dur=time.time() - started, error=repr(e)[:300])
            raise
        _log(name + ":end", dur=time.time() - started)
        return result

    wrapper._bench_timed = True
    return wrapper


def _patch(module, names, infos=None) -> None:
    infos = infos or {}
    for name in names:
        if hasattr(module, name):
            setattr(module, name, _timed(f"{module.__name__.rsplit('.', 1)[-1]}.{name}", getattr(module, name),
                                         infos.get(name)))


def _patch_pipelines_train(module) -> None:
    _patch(module, ["run", "preflight", "ensure_ray", "check_fit", "data_fingerprint", "check_bitsandbytes",
                    "resolve_model_dir", "collect_output"],
           {"collect_output": lambda cfg, domain, name, *a, **k: {"run_name": name}})
    original = module.build_trainer

    @functools.wraps(original)
    def build_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.fit = _timed("trainer.fit", trainer.fit)
        return trainer

    module.build_trainer = _timed("train.build_trainer", build_trainer)


def _patch_train_worker(module) -> None:
    import ray.train

    ray.train.report = _timed("ray.train.report", ray.train.report,
                              lambda metrics, checkpoint=None, **k: {"checkpoint": checkpoint is not None,
                                                                     "step": metrics.get("step")})
    original_domain = module.train_domain

    @functools.wraps(original_domain)
    def train_domain(cfg, domain, session, *args, **kwargs):
        global _RANK
        _RANK = session.rank
        _log("train_domain:start", world_size=session.world_size, max_steps=cfg.train.max_steps,
             batch_tokens=cfg.train.batch_tokens, model=cfg.model.id)
        started = time.time()
        try:
            return original_domain(cfg, domain, session, *args, **kwargs)
        finally:
            _log("train_domain:end", dur=time.time() - started)

    module.train_domain = train_domain
    _patch(module, ["dispatch_backend", "resolve_model_dir", "load_tokenizer", "_tokenized", "_borrow_base_model",
                    "use_fused_kernels", "prepare_trainable", "build_optimizer", "weights_sha256",
                    "save_training_state", "load_training_state", "_give_back_base_model"])

    original_budget = module._budget_for_this_gpu

    @functools.wraps(original_budget)
    def budget(model, cfg, device):
        import torch

        try:
            free, total = torch.cuda.mem_get_info(device)
            allocated = torch.cuda.memory_allocated(device)
        except Exception as e:  # noqa: BLE001
            free = total = allocated = repr(e)
        started = time.time()
        chosen = original_budget(model, cfg, device)
        _log("budget", dur=time.time() - started, free_bytes=free, total_bytes=total, batch_tokens=chosen,
             allocated_bytes=allocated)
        return chosen

    module._budget_for_this_gpu = budget
    original_train = module.train

    @functools.wraps(original_train)
    def train(model, optimizer, scheduler, shard, cfg, state, report, **kwargs):
        import torch

        device = kwargs.get("device")
        on_cuda = device is not None and getattr(device, "type", None) == "cuda"
        counts = {"examples": 0, "tokens": 0, "micro_batches": 0}
        last = [None]
        try:  # nothing here may break the run: on any error, train as is
            from lora.train import total_steps

            last[0] = total_steps(shard, cfg)
            micro_batch = shard.micro_batch

            def counted(epoch, index, batching):
                rows = micro_batch(epoch, index, batching)
                counts["micro_batches"] += 1
                counts["examples"] += sum(len(row) for row in rows)
                counts["tokens"] += sum(len(e.input_ids) for row in rows for e in row)
                return rows

            shard.micro_batch = counted
            progress = kwargs.get("progress")

            def stepped(step):
                if step <= 3 or step == last[0]:
                    _log("step_done", step=step, train_seconds=state.train_seconds)
                return progress(step) if progress else None

            kwargs["progress"] = stepped
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            _log("train:start", allocated_bytes=torch.cuda.memory_allocated(device) if on_cuda else None,
                 batch_tokens=cfg.batch_tokens, steps=last[0], train_examples=len(shard.train),
                 eval_examples=len(shard.eval))
        except Exception as e:  # noqa: BLE001
            _log("hook_error", where="train:start", error=repr(e))
        started = time.time()
        try:
            return original_train(model, optimizer, scheduler, shard, cfg, state, report, **kwargs)
        finally:
            try:
                _log("train:end", dur=time.time() - started, train_seconds=state.train_seconds,
                     state_tokens=state.tokens, steps_done=state.step, **counts,
                     peak_allocated_bytes=torch.cuda.max_memory_allocated(device) if on_cuda else None,
                     peak_reserved_bytes=torch.cuda.max_memory_reserved(device) if on_cuda else None)
            except Exception as e:  # noqa: BLE001
                _log("hook_error", where="train:end", error=repr(e))

    module.train = train


def _patch_lora_train(module) -> None:
    _patch(module, ["evaluate"], {"evaluate": lambda model, examples, *a, **k: {"examples": len(examples)}})


_PATCHERS = {"pipelines.train": _patch_pipelines_train, "pipelines.train_worker": _patch_train_worker,
             "lora.train": _patch_lora_train}


def install_hook() -> None:
    """Patch the modules above right after they are first imported in this process."""
    import importlib.abc

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in _PATCHERS:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            loader, patcher = spec.loader, _PATCHERS[name]
            exec_module = loader.exec_module

            def patched_exec(module):
                exec_module(module)
                try:
                    patcher(module)
                    _log("patched", module=name)
                except Exception as e:  # noqa: BLE001
                    _log("patch_error", module=name, error=repr(e))

            loader.exec_module = patched_exec
            return spec

    sys.meta_path.insert(0, Finder())


SITE = """import os, sys
if os.environ.get("BENCH_TIMING_FILE"):
    try:
        sys.path.insert(0, {bench!r})
        import bench_ddp
        bench_ddp.install_hook()
        sys.path.remove({bench!r})
    except Exception as e:
        print("bench_ddp hook failed:", repr(e), file=sys.stderr)
"""

# ---------------------------------------------------------------------------------------------
# The node: runs the plan, writes $OUT/logs.tgz and $OUT/summary.md
# ---------------------------------------------------------------------------------------------

CKPT = Path("/tmp/ckpt")
LOGS = Path("/tmp/bench_logs")
CLI = [sys.executable, "-c", "from pipelines.cli import app; app()", "--log-format", "json", "--progress-every", "2"]


def common(shape: str, extra: dict) -> list[str]:
    base = {"model.id": str(CKPT / shape), "quant.mode": "nf4", "cluster.use_gpu": "true",
            "cluster.cpus_per_worker": "8", "train.max_eval_examples": "80"}
    return [f"{k}={v}" for k, v in (base | extra).items()]


def ship() -> None:
    """Pack the logs and the runs' small files into $OUT (atomically: a call cut short still returns them)."""
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(".loramill/output")
    if runs.exists():
        for f in runs.rglob("*.json"):
            target = LOGS / "output" / f.relative_to(runs)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
    subprocess.run(["tar", "czf", str(out / ".logs.tgz.part"), "-C", str(LOGS.parent), LOGS.name], check=False)
    os.replace(out / ".logs.tgz.part", out / "logs.tgz")


class Plan:
    def __init__(self, budget: float, skip: list[str]):
        self.deadline = time.time() + budget
        self.skip = set(skip)
        self.events = LOGS / "plan.jsonl"

    def left(self) -> float:
        return self.deadline - time.time()

    def note(self, **fields) -> None:
        with open(self.events, "a") as f:
            f.write(json.dumps({"t": time.time()} | fields) + "\n")
        print(json.dumps(fields), flush=True)

    def start(self, label: str, overrides: list[str], env: dict | None = None) -> tuple[subprocess.Popen, dict]:
        cmd = CLI + ["train", "configs/default.yaml", "-d", "medical", *overrides]
        full_env = os.environ | {"BENCH_TIMING_FILE": str(LOGS / f"{label}.timing.jsonl")} | (env or {})
        meta = {"label": label, "cmd": ["loramill", *cmd[3:]], "t0": time.time(),
                "env": env or {}}
        proc = subprocess.Popen(cmd, stdout=open(LOGS / f"{label}.log", "w"), stderr=open(LOGS / f"{label}.err", "w"),
                                env=full_env)
        return proc, meta

    def finish(self, runs: list[tuple[subprocess.Popen, dict]], timeout: float) -> None:
        """Wait for runs started side by side; each one's wall time ends when its own process ends."""
        deadline = time.time() + max(1.0, timeout)
        pending = list(runs)
        while pending:
            for proc, meta in list(pending):
                if proc.poll() is not None:
                    meta["rc"], meta["t1"] = proc.returncode, time.time()
                    pending.remove((proc, meta))
            if pending and time.time() > deadline:
                for proc, meta in pending:
                    proc.terminate()
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    meta["rc"], meta["t1"] = "timeout", time.time()
                pending = []
            time.sleep(0.2)
        for _, meta in runs:
            meta["wall"] = meta["t1"] - meta["t0"]
            (LOGS / f"{meta['label']}.meta.json").write_text(json.dumps(meta, indent=1))
            if meta["rc"] == 0:
                (LOGS / f"{meta['label']}.done").touch()
            self.note(run=meta["label"], rc=meta["rc"], wall=round(meta["wall"], 1), left=round(self.left()))
        ship()

    def done(self, label: str) -> bool:
        """Done in an earlier call on this (warm) machine, or named by --skip."""
        return label in self.skip or (LOGS / f"{label}.done").exists()

    def run(self, label: str, overrides: list[str], need: float, env: dict | None = None) -> None:
        if self.done(label):
            return
        if self.left() < need:
            self.note(run=label, skipped=f"{self.left():.0f} s left, needs ~{need:.0f}")
            return
        self.finish([self.start(label, overrides, env)], self.left() - 5)

    def shell(self, label: str, command: str, need: float, env: dict | None = None) -> None:
        if self.done(label):
            return
        if self.left() < need:
            self.note(step=label, skipped=f"{self.left():.0f} s left")
            return
        started = time.time()
        with open(LOGS / f"{label}.out", "w") as f:
            try:
                rc = subprocess.run(command, shell=True, stdout=f, stderr=subprocess.STDOUT, env=os.environ | (env or {}),
                                    timeout=max(1.0, self.left() - 5)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        self.note(step=label, rc=rc, wall=round(time.time() - started, 1), left=round(self.left()))
        if rc == 0:
            (LOGS / f"{label}.done").touch()


def ray_cli(*args: str) -> str:
    return f"{sys.executable} -c 'import sys; from ray.scripts.scripts import main; sys.argv[0]=\"ray\"; main()' " + \
        " ".join(args)


def node(budget: float, skip: list[str], tests: bool) -> None:
    """Everything, in order of priority; steps already done on this warm machine (or in ``skip``) are left out,
    and a step that would not end before the budget is skipped."""
    LOGS.mkdir(parents=True, exist_ok=True)
    plan = Plan(budget, skip)
    tok = os.environ["LORAMILL_TEST_TOKENIZER_DIR"]
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,memory.used,utilization.gpu,power.draw",
                            "--format=csv,noheader", "-lms", "500"],
                           stdout=open(LOGS / f"smi_{int(time.time())}.csv", "w"))
    try:
        plan.shell("machine", "nvidia-smi; nvidia-smi topo -m; nproc; free -g; python3 -c 'import torch, "
                   "transformers, peft, bitsandbytes, ray; print(torch.__version__, transformers.__version__, "
                   "peft.__version__, bitsandbytes.__version__, ray.__version__)'", 5)
        plan.shell("ckpt_1b", f"{sys.executable} bench/random_checkpoint.py llama-1b --tokenizer {tok}", 30)
        one_b = {"train.eval_every": 60, "train.checkpoint_every": 120}
        # Item 2: the budget picked from free memory (batch_tokens unset), alone on local Ray: also the 1-GPU start-up.
        plan.run("b1_auto_1w", common("llama-1b", {"cluster.workers_per_domain": 1, "train.max_steps": 80,
                                                   "train.eval_every": 40, "train.checkpoint_every": 80}), 90)
        # One GPU each, side by side on one Ray cluster: the 16k baseline (2N steps) and the 32k control (N steps: the
        # 2-worker run's global batch on one GPU).
        if not (plan.done("b1_16k_1w") and plan.done("b1_32k_1w")) and plan.left() > 200:
            plan.shell("ray_start", ray_cli("start", "--head", "--port=6390", "--node-ip-address=127.0.0.1",
                                            "--num-cpus=32", "--num-gpus=2", "--disable-usage-stats"), 30,
                       {"BENCH_TIMING_FILE": str(LOGS / "pair_workers.timing.jsonl")})
            env = {"RAY_ADDRESS": "127.0.0.1:6390"}
            pair = [plan.start("b1_16k_1w", common("llama-1b", one_b | {
                "cluster.workers_per_domain": 1, "train.batch_tokens": 16384, "train.max_steps": 240}), env),
                    plan.start("b1_32k_1w", common("llama-1b", one_b | {
                        "cluster.workers_per_domain": 1, "train.batch_tokens": 32768, "train.max_steps": 120}), env)]
            plan.finish(pair, plan.left() - 60)
            subprocess.run(ray_cli("stop", "--force"), shell=True, stdout=open(LOGS / "ray_stop.out", "w"),
                           stderr=subprocess.STDOUT, check=False)
        plan.run("b1_16k_2w", common("llama-1b", one_b | {
            "cluster.workers_per_domain": 2, "train.batch_tokens": 16384, "train.max_steps": 120}), 100)
        eight_b = {"train.gradient_checkpointing": "true", "train.batch_tokens": 16384}
        if plan.left() > 200:
            plan.shell("ckpt_8b", f"{sys.executable} bench/random_checkpoint.py llama-8b --tokenizer {tok}", 150)
        if plan.done("ckpt_8b"):
            plan.run("b8_16k_2w", common("llama-8b", eight_b | {
                "cluster.workers_per_domain": 2, "train.max_steps": 10, "train.eval_every": 5,
                "train.checkpoint_every": 10}), 110)
            plan.run("b8_16k_1w", common("llama-8b", eight_b | {
                "cluster.workers_per_domain": 1, "train.max_steps": 20, "train.eval_every": 10,
                "train.checkpoint_every": 20}), 110)
        if tests:
            plan.shell("pytest_gpu", f"{sys.executable} -m pytest -q -p no:cacheprovider tests/test_gpu.py", 90,
                       {"BENCH_TIMING_FILE": ""})
    finally:
        smi.terminate()
        ship()


# ---------------------------------------------------------------------------------------------
# Here: read the logs back
# ---------------------------------------------------------------------------------------------


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def summarize(folder: Path) -> None:
    from datetime import datetime

    for meta_file in sorted(folder.glob("*.meta.json")):
        meta = json.loads(meta_file.read_text())
        label = meta["label"]
        log = _lines(folder / f"{label}.log")
        trained = [x for x in log if x.get("event") == "trained"]
        print(f"\n## {label}  rc={meta['rc']}  command wall {meta['wall']:.1f} s")
        print("   ", " ".join(meta["cmd"]))
        t0 = meta["t0"]
        for x in log:
            if x.get("event") in ("eval", "trained"):
                t = datetime.fromisoformat(x["time"]).timestamp()
                print(f"    log +{t - t0:6.1f}s {x['event']} step={x.get('step', x.get('steps'))} "
                      f"eval={x.get('eval_loss')} tok/s={x.get('tokens_per_second')}")
        record = None
        if trained:
            adapter = Path(trained[-1]["adapter"])
            run_dir = folder / "output" / "medical" / adapter.parent.name
            if (run_dir / "result.json").exists():
                record = json.loads((run_dir / "result.json").read_text())
                history = json.loads((run_dir / "history.json").read_text())
                evals = [(h["step"], round(h["eval_loss"], 4)) for h in history if "eval_loss" in h]
                print(f"    record: steps {record['steps']} tok/s(total) {record['tokens_per_second']:.0f} "
                      f"train_s {record['train_seconds']:.1f} wall_s {record['wall_seconds']:.1f} "
                      f"base {record['base_eval_loss']:.4f} eval {record['eval_loss']:.4f}")
                print(f"    batching: {record['info']['batching']}")
                print(f"    evals: {evals}")
                steps = [h for h in history if "train_seconds" in h and h["step"] > 0]
                if len(steps) > 10:
                    a, b = steps[len(steps) // 5], steps[-1]
                    print(f"    steady (steps {a['step']}..{b['step']}): "
                          f"{(b['train_seconds'] - a['train_seconds']) / (b['step'] - a['step']):.3f} s/step; "
                          f"step 1 took {steps[0]['train_seconds']:.2f} s")
        timing = _lines(folder / f"{label}.timing.jsonl")
        for x in timing:
            if x["event"].endswith(":end") or x["event"] in ("budget", "step_done") or x["event"].endswith(":error"):
                extra = {k: v for k, v in x.items() if k not in ("t", "pid", "rank", "event")}
                print(f"    +{x['t'] - t0:6.1f}s pid {x['pid']} r{x['rank']} {x['event']} {extra}")


def rank_shares(tokenizer_dir: Path, budget: int, workers: int, steps: int, marks: list[int]) -> None:
    """Examples and tokens each rank trains on in `steps` steps of the medical domain at `budget` tokens, from the
    same deterministic plan the workers use (on CPU, no model): what the run record's rank-0-times-workers rate
    assumes to be equal. `tokenizer_dir` also serves as the model folder (only its tokenizer is read)."""
    from lora.config import load_config
    from lora.data import load_examples
    from lora.model import load_tokenizer
    from lora.train import Batching, Shard

    cfg = load_config("configs/default.yaml", [f"model.id={tokenizer_dir}"])
    tokenizer = load_tokenizer(cfg.model, tokenizer_dir, chat=True)
    train, _ = load_examples(cfg.domain("medical").train, {}, tokenizer, cfg.train.max_seq_len, cfg.train.overlong)
    batching = Batching.of(cfg.train.model_copy(update={"batch_tokens": budget}))
    for rank in range(workers):
        shard, epoch, index, examples, tokens = Shard(train, [], rank, workers), 0, 0, 0, 0
        for step in range(1, steps + 1):
            if index >= shard.batches_per_epoch(batching, epoch):
                epoch, index = epoch + 1, 0
            rows = shard.micro_batch(epoch, index, batching)
            index += 1
            examples += sum(len(row) for row in rows)
            tokens += sum(len(e.input_ids) for row in rows for e in row)
            if step in marks or step == steps:
                print(f"budget {budget} workers {workers} rank {rank} step {step}: {examples} examples, "
                      f"{tokens} tokens ({shard.batches_per_epoch(batching, 0)} micro batches an epoch)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    site = sub.add_parser("site")
    site.add_argument("folder", type=Path)
    run = sub.add_parser("node")
    run.add_argument("--budget", type=float, default=560, help="seconds this call may take")
    run.add_argument("--skip", nargs="*", default=[], help="step labels to leave out")
    run.add_argument("--tests", action="store_true", help="end with tests/test_gpu.py if time is left")
    shares = sub.add_parser("shares")
    shares.add_argument("tokenizer", type=Path)
    shares.add_argument("budget", type=int)
    shares.add_argument("workers", type=int)
    shares.add_argument("steps", type=int)
    shares.add_argument("--marks", type=int, nargs="*", default=[])
    summary = sub.add_parser("summarize")
    summary.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.what == "site":
        args.folder.mkdir(parents=True, exist_ok=True)
        (args.folder / "sitecustomize.py").write_text(SITE.format(bench=str(Path(__file__).resolve().parent)))
    elif args.what == "node":
        node(args.budget, args.skip, args.tests)
    elif args.what == "shares":
        rank_shares(args.tokenizer, args.budget, args.workers, args.steps, args.marks)
    else:
        summarize(args.folder)
