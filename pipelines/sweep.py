"""One domain's Ray Tune sweep of LoRA rank, alpha and learning rate, ASHA stopping weak trials early.

Every trial is a real training run through ``train_domain``, the code path of ``loramill train``:
- one worker per domain: ``tune_trial`` runs it in the trial's own actor (rank 0 of 1, a Tune-backed
  ``WorkerSession``). With ``reuse_actors=True`` the actor, its imports and the train worker's per-process caches
  (tokenizer, tokenized data, base model) carry over from trial to trial: no worker-group start per trial.
- several workers: the trial builds and fits a ``TorchTrainer`` whose ``TuneReportCallback`` forwards rank 0's
  reports (Train V2's pattern: a Tuner cannot wrap a TorchTrainer directly).

``sweep_domain`` drives one domain's sweep (a Ray task, so domains sweep side by side) and writes
``<output_dir>/<domain>/tune/``: tune_results.json (``SweepResult``), tune.png and best.json (``BestTrial``).
The stage that plans and starts the sweeps is ``pipelines.tune``.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import pipelines.ray_session  # noqa: F401  (sets Ray's environment before ray is imported)
import ray
import ray.train
import ray.tune
from ray.tune import CheckpointConfig, FailureConfig, PlacementGroupFactory, RunConfig, TuneConfig, Tuner
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from lora.config import Config, Domain, TuneSettings
from pipelines.cluster import storage, worker_resources
from pipelines.errors import TrainingFailed
from pipelines.progress import Display
from pipelines.records import Record
from pipelines.tracking import Tracking, run_params
from pipelines.train import build_trainer
from pipelines.train_worker import WorkerSession, train_domain

METRIC = "eval_loss"
STEP = "step"
"""ASHA's clock: optimizer steps, so its rungs fall on evaluations (grace_evals x eval_every x factor^k steps)."""
TRIAL_DRIVER_CPU = 0.01
"""What a trial that drives a multi-worker TorchTrainer holds itself (Tune refuses 0; STACK.md)."""
RESULTS_FILE = "tune_results.json"
PLOT_FILE = "tune.png"
BEST_FILE = "best.json"


class TrialResult(Record):
    """One trial as it ended: its values, its eval-loss curve, and whether ASHA cut it short."""

    trial_id: str
    status: str
    """``finished`` (ran every step), ``stopped`` (by ASHA) or ``error``."""
    r: int
    alpha: float
    learning_rate: float
    dropout: float
    target_modules: str | list[str]
    variant: str = "lora"
    scaling: str = "standard"
    init: str = "default"
    loraplus_ratio: float = 1.0
    """The LoRA variant settings (``tune.variants`` ...); defaults for sweeps recorded before they existed."""
    eval_loss: float | None
    """The last evaluation's loss (None when the trial failed before its first)."""
    steps: int
    train_seconds: float
    """Time inside optimizer steps, as the training loop measures it."""
    trial_seconds: float | None
    """Wall time from the trial function's (re)start to its last report; None for multi-worker trials."""
    curve: list[tuple[int, float]]
    """(step, eval_loss) at every evaluation, step 0 being the base model."""
    error: str | None = None


class SweepResult(Record):
    """A finished sweep, as ``<output_dir>/<domain>/tune/tune_results.json`` holds it."""

    domain: str
    experiment: str
    """Where Ray Tune keeps the sweep (``loramill tune --resume`` continues it)."""
    search: str
    planned_steps: int
    concurrency: int
    """Trials at once."""
    best: str
    """trial_id of the trial with the lowest final eval loss."""
    trials: list[TrialResult]
    warnings: list[str] = []

    @property
    def best_trial(self) -> TrialResult:
        return next(t for t in self.trials if t.trial_id == self.best)

    @classmethod
    def load(cls, tune_dir: Path) -> SweepResult:
        return cls.model_validate_json((tune_dir / RESULTS_FILE).read_text())


class BestTrial(Record):
    """``best.json``: the values of a sweep's best trial, which ``loramill train --from-tune`` applies."""

    domain: str
    trial_id: str
    eval_loss: float
    steps: int
    lora: dict[str, Any]
    """r, alpha, dropout, target_modules and the variant settings the sweep chose (``tune.variants`` ...), as the
    ``lora`` config section takes them."""
    learning_rate: float
    experiment: str


class Schedule(Record):
    """What ASHA works with, in optimizer steps."""

    steps: int
    """Steps every trial runs unless stopped (``train.max_steps``, or at most the epochs' worth of batches)."""
    grace_steps: int
    warnings: list[str]


def tune_dir(cfg: Config, domain_name: str) -> Path:
    return Path(cfg.cluster.output_dir) / domain_name / "tune"


# ---------------------------------------------------------------------------------------------
# In the trial's actor
# ---------------------------------------------------------------------------------------------


def tune_trial(params: dict[str, Any], cfg_dict: dict[str, Any], domain_name: str, display: Display,
               tracking: Tracking) -> None:
    """One trial: a training run of ``domain_name`` with the trial's LoRA values and learning rate. ``tracking`` is
    the sweep's (its MLflow run is the trial's parent)."""
    cfg = trial_config(Config.model_validate(cfg_dict), params)
    domain = cfg.domain(domain_name)
    trial = ray.tune.get_context().get_trial_name()
    display, tracking = display.for_trial(trial), tracking.trial(trial)
    if cfg.cluster.workers_per_domain == 1:
        train_domain(cfg, domain, tune_session(), display, tracking)
    else:
        fit_trial_trainer(cfg, domain, display, tracking)


def tune_session() -> WorkerSession:
    """Rank 0 of 1 in the trial's actor. Reports also carry ``trial_seconds`` (wall time since the trial began;
    Tune's own ``time_total_s`` runs on across the trials of a reused actor) and ``reported_at`` (epoch seconds;
    Tune's ``timestamp`` is whole seconds): bench/bench_tune_overhead.py builds the trials' timeline from them."""
    started = time.perf_counter()

    def report(metrics: dict[str, float], checkpoint: ray.train.Checkpoint | None = None) -> None:
        ray.tune.report(
            metrics | {"trial_seconds": time.perf_counter() - started, "reported_at": time.time()},
            checkpoint=checkpoint and ray.tune.Checkpoint.from_directory(checkpoint.path),
        )

    return WorkerSession(0, 1, 0, ray.tune.get_checkpoint, report)


def fit_trial_trainer(cfg: Config, domain: Domain, display: Display, tracking: Tracking) -> None:
    """Several workers: fit a TorchTrainer named after the trial, so a resumed trial resumes its own run."""
    from ray.tune.integration.ray_train import TuneReportCallback

    context = ray.tune.get_context()
    runs = f"{cfg.cluster.storage_url.rstrip('/')}/tune/{context.get_experiment_name()}-runs"
    cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"storage_url": runs})})
    build_trainer(cfg, domain, context.get_trial_name(), display=display, tracking=tracking,
                  callbacks=[TuneReportCallback()]).fit()


VARIANT_CHOICES = {"variants": "variant", "scalings": "scaling", "inits": "init", "loraplus_ratios": "loraplus_ratio"}
"""``tune`` choice lists and the ``lora`` setting each one sweeps (the trial's parameter has the setting's name)."""


def trial_config(cfg: Config, params: dict[str, Any]) -> Config:
    """``cfg`` with a trial's values in ``lora`` and ``train.learning_rate``, validated again."""
    raw = cfg.model_dump()
    raw["lora"]["r"] = params["r"]
    raw["lora"]["alpha"] = params["alpha_ratio"] * params["r"] if "alpha_ratio" in params else params["alpha"]
    if "dropout" in params:
        raw["lora"]["dropout"] = params["dropout"]
    if "target_modules" in params:
        label = params["target_modules"]
        raw["lora"]["target_modules"] = label if label == "all-linear" else label.split(",")
    for key in VARIANT_CHOICES.values():
        if key in params:
            raw["lora"][key] = params[key]
    raw["train"]["learning_rate"] = params["learning_rate"]
    return Config.model_validate(raw)


# ---------------------------------------------------------------------------------------------
# One domain's sweep (a Ray task)
# ---------------------------------------------------------------------------------------------


def search_space(settings: TuneSettings) -> dict[str, Any]:
    """Ray Tune's param space. Target-module sets travel as labels (``all-linear``, ``q_proj,v_proj``): Optuna's
    categorical choices must be plain values."""
    pick = ray.tune.grid_search if settings.search == "grid" else ray.tune.choice
    space = {
        "r": pick(settings.ranks),
        ("alpha_ratio" if settings.alpha_per_rank else "alpha"): pick(settings.alphas),
        "learning_rate": (pick(settings.learning_rates) if settings.learning_rates
                          else ray.tune.loguniform(settings.lr_min, settings.lr_max)),
    }
    if settings.dropouts:
        space["dropout"] = pick(settings.dropouts)
    if settings.target_module_sets:
        space["target_modules"] = pick([s if s == "all-linear" else ",".join(s) for s in settings.target_module_sets])
    for choices, key in VARIANT_CHOICES.items():
        if getattr(settings, choices):
            space[key] = pick(getattr(settings, choices))
    return space


def trial_name(domain_name: str, trial: Any) -> str:
    return f"{domain_name}-{trial.trial_id}"


def trial_resources(cfg: Config, domain: Domain) -> PlacementGroupFactory:
    """A one-worker trial holds its worker's resources; a multi-worker trial's TorchTrainer requests its own."""
    if cfg.cluster.workers_per_domain > 1:
        return PlacementGroupFactory([{"CPU": TRIAL_DRIVER_CPU}])
    return PlacementGroupFactory([worker_resources(cfg, domain)])


def build_tuner(cfg: Config, domain: Domain, path: str, schedule: Schedule, concurrency: int,
                resume: bool, display: Display, tracking: Tracking) -> Tuner:
    """A new Tuner for this domain's sweep at ``path`` (``experiment_path``), or the interrupted one restored
    (finished trials stay finished)."""
    filesystem = storage(cfg)[1]
    storage_path, experiment = path.rsplit("/", 1)
    # Registered under the sweep's own name: Tune keeps trainables in a job-wide registry keyed by name, and a
    # function's name ("tune_trial") is the same in every sweep task, so domains swept side by side ran whichever
    # registered last: each other's data (seen on a GPU node, where the sweeps queue for the GPU).
    ray.tune.register_trainable(experiment, ray.tune.with_resources(
        functools.partial(tune_trial, cfg_dict=cfg.model_dump(), domain_name=domain.name, display=display,
                          tracking=tracking),
        trial_resources(cfg, domain),
    ))
    if resume and Tuner.can_restore(path, storage_filesystem=filesystem):
        return Tuner.restore(path, experiment, resume_unfinished=True, resume_errored=True,
                             storage_filesystem=filesystem)
    settings = cfg.tune
    if settings.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = ConcurrencyLimiter(OptunaSearch(seed=cfg.train.seed), max_concurrent=concurrency)
    else:  # not a Searcher: TuneConfig(max_concurrent_trials=...) would be ignored for it
        search_alg = BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.train.seed)
    # stop_last_trials=False: a trial that runs to its last step ends by itself, so "stopped" means ASHA.
    scheduler = ASHAScheduler(time_attr=STEP, max_t=schedule.steps, grace_period=schedule.grace_steps,
                              reduction_factor=settings.reduction_factor, stop_last_trials=False)
    name = functools.partial(trial_name, domain.name)
    return Tuner(
        experiment,
        param_space=search_space(settings),
        tune_config=TuneConfig(
            metric=METRIC, mode="min", search_alg=search_alg, scheduler=scheduler,
            num_samples=1 if settings.search == "grid" else settings.num_trials,
            reuse_actors=True,
            trial_name_creator=name, trial_dirname_creator=name,
        ),
        run_config=RunConfig(
            name=experiment, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),  # as the train stage: enough to resume a trial
            callbacks=[AshaRungs(scheduler)],
            # Tune's status tables are drawn for a terminal; elsewhere the trials' progress lines and the results
            # say it, and with --log-format json stdout must hold JSON only.
            verbose=1 if display.mode == "bars" else 0,
        ),
    )


class AshaRungs(ray.tune.Callback):
    """Carries ASHA's rungs across ``tune --resume``.

    Ray Tune checkpoints a sweep's searcher and callbacks with the experiment, not its scheduler: a restored sweep
    would rank the trials still to run against empty rungs, i.e. only against each other. Tune does restore a
    callback's state, and this callback holds the very scheduler object of the restored Tuner (both are pickled
    together in the Tuner's state), so it writes the saved rungs back into it. ASHA has no public accessor for its
    rungs, hence ``_brackets``/``_rungs`` (ray is pinned).
    """

    def __init__(self, scheduler: ASHAScheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any]:
        return {"rungs": [[dict(recorded) for _, recorded in bracket._rungs] for bracket in self.scheduler._brackets]}

    def set_state(self, state: dict[str, Any]) -> None:
        for bracket, saved in zip(self.scheduler._brackets, state["rungs"], strict=True):
            for (_, recorded), values in zip(bracket._rungs, saved, strict=True):
                recorded.update(values)


def sweep_runtime_env(display: Display) -> dict[str, Any]:
    """The environment ``sweep_domain`` runs in (its trials inherit it).

    A failed trial is shown as one line in the results table (its traceback in the error.txt the sweep's output
    points to), and as TrainingFailed when all failed: TUNE_PRINT_ALL_TRIAL_ERRORS=0 keeps Tune from also logging
    each traceback. Off a terminal, RAY_AIR_NEW_OUTPUT=0: Tune's newer output engine prints the experiment's header
    and paths even at verbose=0, its older one prints nothing.
    """
    env_vars = {"TUNE_PRINT_ALL_TRIAL_ERRORS": "0"}
    if display.mode != "bars":
        env_vars["RAY_AIR_NEW_OUTPUT"] = "0"
    return {"env_vars": env_vars}


# num_cpus=0: a task blocked in Tune's loop needs no CPU; a share would keep a trial from fitting. Started with
# ``sweep_runtime_env``.
@ray.remote(num_cpus=0)
def sweep_domain(cfg_dict: dict[str, Any], domain_name: str, experiment: str, schedule: dict[str, Any],
                 concurrency: int, resume: bool, display: Display, tracking: Tracking) -> str:
    """Run (or resume) one domain's sweep and write its results, plot and best configuration; returns the folder.
    ``TrainingFailed`` when every trial failed."""
    cfg, plan = Config.model_validate(cfg_dict), Schedule.model_validate(schedule)
    domain = cfg.domain(domain_name)
    tracking = tracking.named(domain.name, experiment.rsplit("/", 1)[-1]).start_sweep(
        run_params(cfg) | {f"tune.{key}": value for key, value in cfg.tune.model_dump().items()})
    grid = build_tuner(cfg, domain, experiment, plan, concurrency, resume, display, tracking).fit()
    sweep = collect_sweep(cfg, domain, experiment, grid, plan, concurrency)
    tracking.end_sweep(sweep.best, sweep.best_trial.eval_loss)
    return str(write_outputs(cfg, sweep))


def collect_sweep(cfg: Config, domain: Domain, experiment: str, grid: Any, schedule: Schedule,
                  concurrency: int) -> SweepResult:
    """Each trial's values and eval-loss curve from Tune's results; the best is the lowest final eval loss.
    ``TrainingFailed`` when no trial reported one."""
    trials = sorted((trial_result(cfg, r) for r in grid), key=lambda t: t.trial_id)
    # All trials plan the same number of steps (data and batch sizes are not swept); ASHA never stops the first
    # trial to reach a rung, so the longest trial ran them all.
    planned = cfg.train.max_steps or max((t.steps for t in trials if t.status != "error"), default=schedule.steps)
    for t in trials:
        if t.status == "finished" and t.steps < planned:
            t.status = "stopped"
    ranked = sorted((t for t in trials if t.status != "error" and t.eval_loss is not None),
                    key=lambda t: (t.eval_loss, t.trial_id))
    if not ranked:
        first_error = next((t.error for t in trials if t.error), "no trial reported an eval loss")
        raise TrainingFailed(f"domain {domain.name!r}: every trial of the sweep failed; the first: {first_error}")
    return SweepResult(
        domain=domain.name, experiment=experiment, search=cfg.tune.search,
        planned_steps=planned, concurrency=concurrency, best=ranked[0].trial_id,
        trials=trials, warnings=schedule.warnings,
    )


def trial_result(cfg: Config, result: Any) -> TrialResult:
    trial_cfg = trial_config(cfg, result.config)
    reports = result.metrics_dataframe
    rows = reports.to_dict("records") if reports is not None else []
    evals = [(int(row[STEP]), float(row[METRIC])) for row in rows
             if STEP in row and not math.isnan(row.get(METRIC, math.nan))]
    last = rows[-1] if rows else {}
    trial_seconds = last.get("trial_seconds")
    return TrialResult(
        trial_id=str(result.metrics.get("trial_id") or Path(result.path).name.rsplit("-", 1)[-1]),
        status="error" if result.error else "finished",  # or "stopped": collect_sweep knows the planned steps
        r=trial_cfg.lora.r,
        alpha=trial_cfg.lora.alpha,
        learning_rate=trial_cfg.train.learning_rate,
        dropout=trial_cfg.lora.dropout,
        target_modules=trial_cfg.lora.target_modules,
        **{key: getattr(trial_cfg.lora, key) for key in VARIANT_CHOICES.values()},
        eval_loss=evals[-1][1] if evals else None,
        steps=int(max((row.get(STEP, 0) for row in rows), default=0)),
        train_seconds=float(last.get("train_seconds", 0.0)),
        trial_seconds=None if trial_seconds is None or math.isnan(trial_seconds) else float(trial_seconds),
        curve=evals,
        error=None if result.error is None else trial_error(result.error),
    )


def trial_error(error: BaseException) -> str:
    """``Type: message`` of what ended a trial, one line for the results table and ``TrainingFailed``. Tune hands
    back the trial function's exception wrapped in a ``RayTaskError``, whose text is the whole remote traceback."""
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    return f"{type(cause).__name__}: {cause}"


def write_outputs(cfg: Config, sweep: SweepResult) -> Path:
    """tune_results.json, tune.png, then best.json (last: it is what ``--from-tune`` reads)."""
    target = tune_dir(cfg, sweep.domain)
    target.mkdir(parents=True, exist_ok=True)
    sweep.write(target / RESULTS_FILE)
    plot_sweep(sweep, target / PLOT_FILE)
    best = sweep.best_trial
    BestTrial(
        domain=sweep.domain, trial_id=best.trial_id, eval_loss=best.eval_loss, steps=best.steps,
        lora={"r": best.r, "alpha": best.alpha, "dropout": best.dropout, "target_modules": best.target_modules}
        | {key: getattr(best, key) for choices, key in VARIANT_CHOICES.items() if getattr(cfg.tune, choices)},
        learning_rate=best.learning_rate, experiment=sweep.experiment,
    ).write(target / BEST_FILE)
    return target


def plot_sweep(sweep: SweepResult, path: Path) -> None:
    """Left: eval loss per trial over steps (dashed: stopped by ASHA). Right: final eval loss over rank x alpha
    (the best trial per cell when several share one, e.g. at different learning rates)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend in a Ray worker
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    curves, grid = fig.subplots(1, 2)
    for t in sweep.trials:
        if t.curve:
            steps, losses = zip(*t.curve)
            curves.plot(steps, losses, "--" if t.status == "stopped" else "-", marker="o", markersize=3,
                        linewidth=2.5 if t.trial_id == sweep.best else 1.2,
                        label=f"{t.trial_id.rsplit('_', 1)[-1]} r={t.r} α={t.alpha:g} lr={t.learning_rate:.1e}")
    curves.set(xlabel="step", ylabel="eval loss", title=f"{sweep.domain}: eval loss per trial (dashed: stopped early)")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.legend(fontsize=7, loc="best")
    cells: dict[tuple[int, float], float] = {}
    for t in sweep.trials:
        if t.eval_loss is not None and t.status != "error":
            cells[(t.r, t.alpha)] = min(t.eval_loss, cells.get((t.r, t.alpha), math.inf))
    ranks, alphas, losses = zip(*((r, a, loss) for (r, a), loss in sorted(cells.items())))
    points = grid.scatter(ranks, alphas, c=losses, s=400, cmap="viridis_r", edgecolors="black")
    for r, a, loss in zip(ranks, alphas, losses):
        grid.annotate(f"{loss:.3f}", (r, a), textcoords="offset points", xytext=(0, 14), ha="center", fontsize=8)
    best = sweep.best_trial
    grid.scatter([best.r], [best.alpha], marker="*", s=160, color="red", label="best", zorder=3)
    grid.set_xscale("log", base=2)
    grid.set_yscale("log", base=2)
    grid.set_xticks(sorted(set(ranks)), [str(r) for r in sorted(set(ranks))])
    grid.set_yticks(sorted(set(alphas)), [f"{a:g}" for a in sorted(set(alphas))])
    grid.minorticks_off()
    grid.margins(0.25)
    grid.set(xlabel="LoRA rank r", ylabel="LoRA alpha", title="final eval loss over rank × alpha")
    grid.legend(fontsize=8, loc="upper left")
    fig.colorbar(points, ax=grid, label="final eval loss")
    fig.savefig(path, dpi=110)
