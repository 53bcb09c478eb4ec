"""The ``loramill`` command. Thin: parse, load the config, call one stage, print its result."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Annotated, Callable

import typer
import yaml
from rich.console import Console
from rich.table import Table

from lora.config import Config, ConfigError, load_config
from lora.data import DataError
from lora.model import BackendError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Logs and CI are not terminals: rich would wrap tables at 80 columns there.
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

USAGE_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, BackendError)
"""Bad input: reported in one message that names the problem and the fix, exit status 2."""

ConfigArg = Annotated[Path, typer.Argument(help="YAML config (see configs/default.yaml)")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.max_steps=10")]
DomainOpt = Annotated[list[str] | None, typer.Option("--domain", "-d", help="Only this domain (repeatable)")]


def exits_2_on_bad_input(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USAGE_ERRORS as e:
            errors.print("error:", style="bold red", end=" ")
            errors.print(str(e), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@exits_2_on_bad_input
def validate(config: ConfigArg, overrides: Overrides = None) -> None:
    """Print the resolved config, or list every error with its dotted path (exit 2)."""
    cfg = load_config(config, overrides or [])
    typer.echo(yaml.safe_dump(cfg.model_dump(), sort_keys=False), nl=False)


@app.command(name="config-reference", hidden=True)
def config_reference() -> None:
    """Print the config reference (markdown) that README.md carries."""
    from lora.config import reference_markdown

    typer.echo(reference_markdown())


@app.command(name="train")
@exits_2_on_bad_input
def train_command(config: ConfigArg, overrides: Overrides = None, domain: DomainOpt = None) -> None:
    """Train one LoRA adapter per domain on Ray Train; resumes a run with the same config."""
    from pipelines import train

    cfg = load_config(config, overrides or [])
    results = train.run(cfg, domain)
    console.print(training_table(results))


def training_table(results) -> Table:
    table = Table(title="loramill train", title_justify="left")
    for column in ("domain", "steps", "base eval loss", "adapter eval loss", "ppl base → adapter",
                   "trainable params", "train s / wall s", "adapter"):
        table.add_column(column, justify="left" if column in ("domain", "adapter") else "right")
    for r in results:
        better = "green" if r.eval_loss < r.base_eval_loss else "red"
        table.add_row(
            r.domain,
            str(r.steps),
            f"{r.base_eval_loss:.3f}",
            f"[{better}]{r.eval_loss:.3f}[/]",
            f"{math.exp(r.base_eval_loss):.1f} → {math.exp(r.eval_loss):.1f}",
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
