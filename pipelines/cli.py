"""The ``loramill`` command. Thin: parse, load the config, call one stage, print its result."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable

import typer
import yaml
from rich.console import Console
from rich.table import Table

from infra.registry import RegistryError
from infra.store import StoreError, store_down, store_status, store_up
from lora.config import ConfigError, load_config
from lora.errors import BackendError, DataError
from lora.redact import mask_storage_options
from pipelines import progress
from pipelines.errors import TrackingUnavailable, TrainingFailed
from pipelines.registry_access import check_registry, open_registry

if TYPE_CHECKING:
    from pipelines.publish import Outcome

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Logs and CI are not terminals: rich would wrap tables at 80 columns there.
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

USAGE_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, BackendError, RegistryError, StoreError,
                                              TrackingUnavailable)
"""Bad input: reported in one message that names the problem and the fix, exit status 2."""

ConfigArg = Annotated[Path, typer.Argument(help="YAML config (see configs/default.yaml)")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.max_steps=10")]
DomainOpt = Annotated[list[str] | None, typer.Option("--domain", "-d", help="Only this domain (repeatable)")]


@app.callback()
def output_options(
    log_format: Annotated[progress.LogFormat, typer.Option(
        "--log-format", envvar="LORAMILL_LOG_FORMAT",
        help="text: progress bars on a terminal, plain lines anywhere else (a file, a pipe, cron, a Ray job). json: "
        "one JSON object a line, for log pipelines: the progress and the results of train, tune, run and schedule")]
    = "text",
    progress_every: Annotated[float, typer.Option(
        "--progress-every", min=0, envvar="LORAMILL_PROGRESS_EVERY",
        help="Off a terminal: seconds between a run's progress lines (one comes at each evaluation too)")]
    = progress.DEFAULT_INTERVAL_S,
) -> None:
    progress.configure(log_format, progress_every)


def exits_2_on_bad_input(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USAGE_ERRORS as e:
            errors.print("error:", style="bold red", end=" ")
            errors.print(str(e), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except TrainingFailed as e:
            errors.print("failed:", style="bold red", end=" ")
            errors.print(str(e), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@exits_2_on_bad_input
def validate(config: ConfigArg, overrides: Overrides = None) -> None:
    """Print the resolved config, or list every error with its dotted path (exit 2)."""
    cfg = load_config(config, overrides or [])
    check_registry(cfg)
    # This output lands in terminals and CI logs: storage_options may hold credentials.
    typer.echo(yaml.safe_dump(mask_storage_options(cfg.model_dump()), sort_keys=False), nl=False)


@app.command(name="config-reference", hidden=True)
def config_reference() -> None:
    """Print the config reference (markdown) that README.md carries."""
    from lora.config import reference_markdown

    typer.echo(reference_markdown())


@app.command(name="train")
@exits_2_on_bad_input
def train_command(
    config: ConfigArg,
    overrides: Overrides = None,
    domain: DomainOpt = None,
    from_tune: Annotated[bool, typer.Option("--from-tune", help="Use each domain's best `loramill tune` trial "
                                            "(LoRA r, alpha, dropout, targets, learning rate)")] = False,
) -> None:
    """Train one LoRA adapter per domain on Ray Train; resumes a run with the same config."""
    from pipelines import train, tune

    cfg = load_config(config, overrides or [])
    tuned = {d.name: tune.best_config(cfg, d.name) for d in train.select_domains(cfg, domain)} if from_tune else None
    results = train.run(cfg, domain, tuned)
    show_training(results)


@app.command(name="tune")
@exits_2_on_bad_input
def tune_command(
    config: ConfigArg,
    overrides: Overrides = None,
    domain: DomainOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the sweep with this config; finished "
                                         "trials are kept")] = False,
) -> None:
    """Search LoRA rank, alpha and learning rate per domain with Ray Tune (ASHA stops weak trials early)."""
    from pipelines import tune
    from pipelines.sweep import tune_dir as sweep_dir

    cfg = load_config(config, overrides or [])
    for sweep in tune.run(cfg, domain, resume):
        folder = _short_path(sweep_dir(cfg, sweep.domain))
        if progress.mode() == "json":
            progress.emit("tuned", sweep.model_dump(mode="json") | {"folder": folder})
            continue
        console.print(tune_table(sweep))
        console.print(f"best: trial {sweep.best} → {folder}/best.json (`loramill train --from-tune` uses it); "
                      f"plot {folder}/tune.png")


def tune_table(sweep) -> Table:
    """One row per trial, best first; the swept dropout and target columns only when they vary."""
    trials = sorted(sweep.trials, key=lambda t: (t.eval_loss is None, t.eval_loss or 0.0, t.trial_id))
    varies = {key for key in ("dropout", "target_modules") if len({str(getattr(t, key)) for t in trials}) > 1}
    table = Table(title=f"loramill tune: {sweep.domain} ({sweep.search}, {len(trials)} trials, "
                        f"{sweep.concurrency} at once, {sweep.planned_steps} steps each)", title_justify="left")
    columns = ["trial", "rank", "alpha", "lr", *sorted(varies), "eval loss", "steps run", "stopped early?",
               "train s / trial s"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("trial", "target_modules", "stopped early?") else "right")
    for t in trials:
        best = t.trial_id == sweep.best
        loss = "error" if t.status == "error" else f"{t.eval_loss:.4f}"
        row = [("★ " if best else "") + t.trial_id, str(t.r), f"{t.alpha:g}", f"{t.learning_rate:.2e}",
               *[str(getattr(t, key)) for key in sorted(varies)],
               f"[green]{loss}[/]" if best else loss, f"{t.steps}/{sweep.planned_steps}",
               {"stopped": "yes (ASHA)", "finished": "no", "error": f"[red]{t.error}[/]"}[t.status],
               f"{t.train_seconds:.1f} / " + ("-" if t.trial_seconds is None else f"{t.trial_seconds:.1f}")]
        table.add_row(*row)
    return table


@app.command()
@exits_2_on_bad_input
def publish(
    config: ConfigArg,
    domain: Annotated[str, typer.Option("--domain", "-d", help="Domain to publish")],
    run_dir: Annotated[Path, typer.Option("--from", help="Run folder printed by `loramill train`")],
    force: Annotated[bool, typer.Option(help="Promote past a failing gate (recorded as forced)")] = False,
    force_new_version: Annotated[bool, typer.Option(
        "--force-new-version", help="Publish a new version even if this run was published before (same run, "
        "adapter bytes, config and data); without it, that version is returned")] = False,
) -> None:
    """Publish a finished run as the next immutable version, with its audit; apply the promotion gate."""
    from pipelines import publish as publish_stage

    cfg = load_config(config)
    outcome = publish_stage.run(cfg, domain, run_dir.resolve(), force=force, new_version=force_new_version)
    published = outcome.published
    if outcome.already_published:
        console.print(f"already published: [bold]{published.domain} v{published.version}[/] → {published.url}")
        console.print("this run (its adapter bytes, config and data) was published before, so nothing new was "
                      "written; --force-new-version publishes it as a new version")
    else:
        console.print(f"published [bold]{published.domain} v{published.version}[/] → {published.url}")
    console.print(f"gate ({outcome.gate.alias}): {outcome.gate.decision} — {outcome.gate.reason}",
                  markup=False)
    warn_after_commit([outcome])


def warn_after_commit(outcomes: list[Outcome]) -> None:
    """One stderr line per step a published version missed after its commit point (``publish.Outcome.warnings``):
    the version exists, so the command still succeeds."""
    for outcome in outcomes:
        for warning in outcome.warnings:
            errors.print(f"warning: published {outcome.published.domain} v{outcome.published.version}; {warning}",
                         markup=False, highlight=False, soft_wrap=True)


@app.command(name="list")
@exits_2_on_bad_input
def list_versions(
    domain: Annotated[str | None, typer.Argument(help="Only this domain")] = None,
    config: Annotated[Path, typer.Option("--config", "-c", help="Config naming the registry")] = Path(
        "configs/default.yaml"),
    verify: Annotated[bool, typer.Option(
        "--verify", help="Re-hash every file on the store (downloads them all); without it, a version is marked "
        "FAILED when its listing or manifest is wrong, or a later publish found it failing verification")] = False,
) -> None:
    """List published versions: aliases, key metrics, sizes, write-once retention (S3 Object Lock); versions that
    must not be used are marked FAILED."""
    registry = open_registry(load_config(config))
    rows = registry.describe(domain, verify=verify)
    table = Table(title=f"loramill registry {registry.url}", title_justify="left")
    for column in ("domain", "version", "created (UTC)", "parent", "aliases", "eval loss", "base loss", "files",
                   "size", "write-once", "verification"):
        table.add_column(column)
    for info in rows:
        table.add_row(info.domain, f"v{info.version}", (info.created_at or "-")[:19], f"v{info.parent_version}"
                      if info.parent_version else "-", ", ".join(info.aliases),
                      _fmt(info.metrics.get("eval_loss")), _fmt(info.metrics.get("base_eval_loss")),
                      "-" if info.files is None else str(info.files),
                      "-" if info.size_bytes is None else f"{info.size_bytes / 1e6:.1f} MB",
                      f"{info.lock.mode.lower()} until {info.lock.until:%Y-%m-%d}" if info.lock else "-",
                      "FAILED" if info.problem else "verified" if verify else "-")
    console.print(table)
    for info in rows:
        if info.problem:
            console.print(f"FAILED {info.domain} v{info.version}: {info.problem}", markup=False, highlight=False,
                          soft_wrap=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    return name, version or None


@app.command()
@exits_2_on_bad_input
def pull(
    ref: Annotated[str, typer.Argument(help="DOMAIN, DOMAIN@vN or DOMAIN@alias (default: latest)")],
    to: Annotated[Path, typer.Option("--to", help="New folder to write (must not exist)")],
    config: Annotated[Path, typer.Option("--config", "-c")] = Path("configs/default.yaml"),
) -> None:
    """Download a version, verify every sha256 against its manifest, write it atomically."""
    registry = open_registry(load_config(config))
    domain, version = _split_ref(ref)
    path = registry.pull(domain, version, to)
    console.print(f"pulled {domain}@{version or 'latest'} (v{registry.resolve(domain, version)}) → {path}, verified")


@app.command()
@exits_2_on_bad_input
def promote(
    domain: Annotated[str, typer.Argument()],
    version: Annotated[str, typer.Argument(help="vN")],
    alias: Annotated[str, typer.Option("--alias")] = "production",
    force: Annotated[bool, typer.Option(help="Skip the gate (recorded as forced)")] = False,
    config: Annotated[Path, typer.Option("--config", "-c")] = Path("configs/default.yaml"),
) -> None:
    """Move an alias to a version by compare-and-swap; the gate alias also has to pass the gate."""
    from pipelines.gate import candidate_of, decide, stored_incumbent
    from pipelines.records import ManifestMetadata

    cfg = load_config(config)
    registry = open_registry(cfg)
    number = registry.resolve(domain, version)
    current = registry.alias(domain, alias)
    record: dict[str, object] = {"by": "loramill promote", "forced": force}
    if alias == cfg.publish.gate_alias:
        metadata = ManifestMetadata.of(registry.manifest(domain, number))
        candidate = candidate_of(metadata)
        incumbent = stored_incumbent(registry, domain, alias, candidate.eval_set, metadata)
        gate = decide(alias, cfg.publish.gate_tolerance, candidate, incumbent, force)
        record["gate"] = gate.model_dump(mode="json")
        if gate.decision == "not promoted":
            errors.print(f"gate refused: {gate.reason}; use --force to override (recorded)", markup=False)
            raise typer.Exit(1)
    state = registry.promote(domain, number, alias, expected=current.version if current else None, record=record)
    console.print(f"{domain} {alias} → v{state.version} (generation {state.generation})")


@app.command()
@exits_2_on_bad_input
def gc(
    domain: Annotated[str | None, typer.Argument()] = None,
    grace_s: Annotated[float, typer.Option(help="Leave uploads younger than this alone")] = 3600.0,
    config: Annotated[Path, typer.Option("--config", "-c")] = Path("configs/default.yaml"),
) -> None:
    """Remove abandoned uploads (versions without a manifest older than the grace period)."""
    removed = open_registry(load_config(config)).gc(domain, grace_s=grace_s)
    console.print(f"removed {len(removed)} abandoned upload(s)" + "".join(f"\n  {url}" for url in removed))


@app.command(name="generate")
@exits_2_on_bad_input
def generate_command(
    refs: Annotated[list[str], typer.Argument(help="DOMAIN, DOMAIN@vN or DOMAIN@alias; several share one base")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="One prompt")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", exists=True, dir_okay=False,
                                                 help="A file with one prompt per line")] = None,
    compare: Annotated[bool, typer.Option(help="Also print the base model's answer")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 128,
    config: Annotated[Path, typer.Option("--config", "-c")] = Path("configs/default.yaml"),
    cache_dir: Annotated[Path | None, typer.Option(help="Verified adapter cache [default: ~/.cache/loramill/adapters]")]
    = None,
) -> None:
    """Answer prompts with published adapters (pulled verified, cached), on the base they were trained on."""
    from pipelines import use

    if (prompt is None) == (prompts is None):
        raise typer.BadParameter("pass either --prompt TEXT or --prompts FILE")
    lines = [prompt] if prompt is not None else prompts.read_text().splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise typer.BadParameter("no prompt given (the file holds one prompt per line)")
    answers = use.generate(load_config(config), [_split_ref(ref) for ref in refs], texts,
                           compare=compare, max_new_tokens=max_new_tokens, cache_root=cache_dir)
    console.print(use.answers_table(answers))


@app.command(name="export")
@exits_2_on_bad_input
def export_command(
    ref: Annotated[str, typer.Argument(help="DOMAIN@vN or DOMAIN@alias (default: latest)")],
    to: Annotated[Path, typer.Option("--to", help="New folder to write (must not exist)")],
    merge: Annotated[bool, typer.Option("--merge", help="Merge the adapter into a 16/32-bit copy of the base")] = False,
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")]
    = "auto",
    config: Annotated[Path, typer.Option("--config", "-c")] = Path("configs/default.yaml"),
    cache_dir: Annotated[Path | None, typer.Option(help="Verified adapter cache [default: ~/.cache/loramill/adapters]")]
    = None,
) -> None:
    """Write a merged full model (safetensors + config + tokenizer + manifest.json) for adapter-less serving."""
    import torch

    from pipelines import use

    if not merge:
        raise typer.BadParameter("only merged exports exist: pass --merge (`loramill pull` gets the adapter itself)")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise typer.BadParameter(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    domain, version = _split_ref(ref)
    result = use.export(load_config(config), domain, version, to, cache_root=cache_dir,
                        dtype=None if dtype == "auto" else getattr(torch, dtype))
    adapter = result.manifest["adapter"]
    console.print(f"exported {adapter['domain']} v{adapter['version']} merged into "
                  f"{result.manifest['base_model']['id']} → {result.path} (files verified)", markup=False)
    console.print("\n".join(use.merge_cost_lines(result.manifest)), markup=False, highlight=False)


store_app = typer.Typer(help="The embedded S3 server (SeaweedFS on 127.0.0.1).", no_args_is_help=True)
app.add_typer(store_app, name="store")


def _store_dir(config: Path) -> Path:
    return Path(load_config(config).publish.store_dir)


@store_app.command("up")
@exits_2_on_bad_input
def store_up_command(config: Annotated[Path, typer.Option("--config", "-c")] = Path("configs/default.yaml")) -> None:
    """Start the store (or report the running one)."""
    info = store_up(_store_dir(config))
    console.print(f"store up: {info.endpoint_url} bucket {info.bucket} (pid {info.pid}, data {info.data_dir})")


@store_app.command("down")
@exits_2_on_bad_input
def store_down_command(config: Annotated[Path, typer.Option("--config", "-c")] = Path("configs/default.yaml")) -> None:
    """Stop the store; its data stays."""
    console.print("store stopped" if store_down(_store_dir(config)) else "store was not running")


@store_app.command("status")
@exits_2_on_bad_input
def store_status_command(
    config: Annotated[Path, typer.Option("--config", "-c")] = Path("configs/default.yaml"),
) -> None:
    """Say whether the store runs, and where."""
    info = store_status(_store_dir(config))
    if info is None:
        console.print("store is not running")
        raise typer.Exit(1)
    console.print(f"store up: {info.endpoint_url} bucket {info.bucket} (pid {info.pid}, data {info.data_dir})")


@app.command(name="run")
@exits_2_on_bad_input
def run_command(
    config: ConfigArg,
    overrides: Overrides = None,
    domain: DomainOpt = None,
    tune: Annotated[bool, typer.Option("--tune", help="Sweep first (tune section); train each domain's best")] = False,
) -> None:
    """The whole chain per domain: (tune →) train → evaluate → gate → publish with the audit."""
    from pipelines import run as run_stage

    cfg = load_config(config, overrides or [])
    rows = run_stage.run(cfg, domain, sweep=tune)
    show_training([r.training for r in rows])
    show_published(rows)
    warn_after_commit([r.outcome for r in rows])


def show_published(rows) -> None:
    """What ``run`` published: a table, or with ``--log-format json`` one ``published`` object per domain."""
    if progress.mode() == "json":
        for r in rows:
            progress.emit("published", {
                "domain": r.training.domain, "version": r.outcome.published.version,
                "already_published": r.outcome.already_published, "eval_loss": r.training.eval_loss,
                "gate": r.outcome.gate.decision, "gate_reason": r.outcome.gate.reason, "url": r.outcome.published.url})
        return
    table = Table(title="published", title_justify="left")
    for column in ("domain", "version", "eval loss", "gate", "where"):
        table.add_column(column)
    for r in rows:
        version = f"v{r.outcome.published.version}" + (" (already published)" if r.outcome.already_published else "")
        table.add_row(r.training.domain, version, f"{r.training.eval_loss:.4f}",
                      f"{r.outcome.gate.decision}: {r.outcome.gate.reason}", r.outcome.published.url)
    console.print(table)


@app.command()
@exits_2_on_bad_input
def submit(
    config: Annotated[Path, typer.Argument(help="YAML config inside the uploaded working dir")],
    overrides: Overrides = None,
    address: Annotated[str, typer.Option("--address", envvar="RAY_API_SERVER_ADDRESS",
                                         help="The head's dashboard, e.g. http://127.0.0.1:8265")] = ...,
    wait: Annotated[bool, typer.Option("--wait", help="Stream the job's logs; exit 1 if it fails")] = False,
    domain: DomainOpt = None,
    working_dir: Annotated[Path | None, typer.Option(
        help="Folder uploaded as the job's working dir [default: this loramill checkout]")] = None,
) -> None:
    """Run `loramill run CONFIG` as a Ray job on a running cluster; credentials stay with the cluster."""
    from pipelines import submit as submit_stage

    def echo(text: str) -> None:
        typer.echo(text, nl=False)

    try:
        job = submit_stage.run(config, overrides or [], address=address, domains=domain, wait=wait, echo=echo,
                               working_dir=working_dir or submit_stage.REPO_ROOT)
    except ConnectionError as e:
        errors.print(f"error: {e} Is a Ray head running there (`ray start --head`)?", markup=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        errors.print("stopped following; the job keeps running on the cluster (`ray job stop ID --address ...`)")
        raise typer.Exit(130) from None
    console.print(f"job {job.job_id}: {job.status or 'submitted'} — {job.entrypoint}", markup=False)
    if job.status is None:
        console.print(f"follow it: ray job logs --follow {job.job_id} --address {address}", markup=False)
    elif job.status != "SUCCEEDED":
        errors.print(f"job {job.job_id} {job.status}: {job.message}", markup=False)
        raise typer.Exit(1)


@app.command()
@exits_2_on_bad_input
def schedule(
    config: ConfigArg,
    overrides: Overrides = None,
    once: Annotated[bool, typer.Option(
        "--once", help="One tick over every domain (or --domain), then exit: for system cron or a CronJob")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --once: retrain even if the data is unchanged")] = False,
    domain: DomainOpt = None,
    lock_ttl: Annotated[float, typer.Option(
        "--lock-ttl", min=1, help="Seconds a domain's retrain lock lasts; set above your longest run")] = 6 * 3600.0,
) -> None:
    """Retrain domains whose data changed, at their cron times (UTC), inside their latest version's envelope.

    Each tick ends with one line per domain: skipped (why), published vN, or failed: why. With --once the exit
    status is 1 if any domain failed, 2 if the tick was refused as a whole (config, registry), else 0."""
    import signal
    from datetime import UTC, datetime

    from pipelines import schedule as schedule_stage

    def echo(line: str) -> None:
        if progress.mode() == "json":
            progress.emit("schedule", {"message": line})
        else:
            console.print(f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} {line}", markup=False, highlight=False)

    if force and not once:
        raise typer.BadParameter("--force applies to one tick: add --once")
    cfg = load_config(config, overrides or [])
    if once:
        decisions = schedule_stage.tick(cfg, domain, force=force, lock_ttl_s=lock_ttl, echo=echo)
        for decision in decisions:
            echo(decision.summary())
        if any(decision.failed is not None for decision in decisions):
            raise typer.Exit(1)
        return

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # `kill` and Kubernetes stop with SIGTERM: leave as cleanly as on Ctrl-C

    # SIGINT too: a shell starts background jobs (`loramill schedule ... &`) with SIGINT ignored, and Python then
    # leaves it ignored, so `kill -INT` would not stop the loop.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        schedule_stage.loop(cfg, domain, lock_ttl_s=lock_ttl, echo=echo)
    except KeyboardInterrupt:
        echo("scheduler stopped")


RUN_FIELDS = {"domain", "run_name", "steps", "base_eval_loss", "eval_loss", "base_eval_accuracy", "eval_accuracy",
              "trainable_params", "total_params", "train_seconds", "wall_seconds", "tokens_per_second"}
"""What ``--log-format json`` prints of each ``RunRecord`` (the training table's columns; result.json holds all)."""


def show_training(results) -> None:
    """The training table, or with ``--log-format json`` one ``trained`` object per domain."""
    if progress.mode() != "json":
        console.print(training_table(results))
        return
    for r in results:
        progress.emit("trained", r.model_dump(mode="json", include=RUN_FIELDS)
                      | {"adapter": str(r.output_dir / "adapter"), "batching": r.info.batching})


def training_table(results) -> Table:
    # The batching under the table: on a GPU an unset train.batch_tokens is chosen for the run, and steps of
    # thousands of tokens are several epochs of a small set.
    table = Table(title="loramill train", title_justify="left", caption_justify="left",
                  caption="\n".join(f"{r.domain} batching: {r.info.batching}" for r in results if r.info.batching))
    classify = any(r.eval_accuracy is not None for r in results)
    for column in ("domain", "steps", "base eval loss", "adapter eval loss",
                   "accuracy base → trained" if classify else "ppl base → adapter",
                   "trainable params", "train s / wall s", "adapter"):
        table.add_column(column, justify="left" if column in ("domain", "adapter") else "right")
    for r in results:
        better = "green" if r.eval_loss < r.base_eval_loss else "red"
        table.add_row(
            r.domain,
            str(r.steps),
            f"{r.base_eval_loss:.3f}",
            f"[{better}]{r.eval_loss:.3f}[/]",
            f"{r.base_eval_accuracy:.2%} → {r.eval_accuracy:.2%}" if classify
            else f"{math.exp(r.base_eval_loss):.1f} → {math.exp(r.eval_loss):.1f}",
            f"{r.trainable_params:,} ({r.trainable_params / r.total_params:.2%})",
            f"{r.train_seconds:.0f} / {r.wall_seconds:.0f}",
            _short_path(r.output_dir / "adapter"),
        )
    return table


def _short_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
