"""The architecture's boundaries, read from the source with `ast` (every import, also those inside functions):
`lora/` is the model side and never reaches for Ray, S3, the registry or the pipelines; `infra/` operates the
system and never imports the pipelines; light modules stay light."""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "lora": ("ray", "s3fs", "infra", "pipelines"),
    "infra": ("pipelines",),
}
STDLIB_ONLY = ("lora/errors.py", "lora/names.py", "lora/redact.py")
"""Imported by the CLI's light commands, the config and the registry alike: nothing but the standard library."""
S3_CLIENTS = ("s3fs", "aiohttp", "botocore", "boto3")
S3_TRANSPORT = "infra/registry/s3.py"
"""The registry's only module that may import an S3 client: file:// registries never load one."""


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, a module of `package`; relative ones resolved."""
    parts = package.split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level + 1] if node.level else []
            found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
    return found


def module_imports(path: Path) -> list[tuple[int, str]]:
    return imports(path, ".".join(path.relative_to(REPO).parts[:-1]))


def sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def under(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layers_import_only_downwards(folder: str) -> None:
    assert sources(folder), f"no sources under {folder}/"
    violations = [f"{path.relative_to(REPO)}:{line} imports {module}" for path in sources(folder)
                  for line, module in module_imports(path) if under(module, FORBIDDEN[folder])]
    assert not violations, f"{folder}/ must not import {', '.join(FORBIDDEN[folder])}:\n" + "\n".join(violations)


@pytest.mark.parametrize("name", STDLIB_ONLY)
def test_rule_modules_are_stdlib_only(name: str) -> None:
    violations = [f"{name}:{line} imports {module}" for line, module in module_imports(REPO / name)
                  if module.split(".")[0] not in sys.stdlib_module_names and module != "__future__"]
    assert not violations, "\n".join(violations)


def test_only_the_s3_transport_imports_an_s3_client() -> None:
    violations = [f"{path.relative_to(REPO)}:{line} imports {module}"
                  for path in sources("infra/registry") if path.relative_to(REPO).as_posix() != S3_TRANSPORT
                  for line, module in module_imports(path) if under(module, S3_CLIENTS)]
    assert not violations, "\n".join(violations)


def test_imports_are_read(tmp_path: Path) -> None:
    """The reader sees imports inside functions and resolves relative ones, or the checks above prove nothing."""
    sample = tmp_path / "probe.py"
    sample.write_text("def f():\n    import ray.train\n    from .config import Config\n    from ..infra import store\n")
    assert [module for _, module in imports(sample, "lora")] == ["ray.train", "lora.config", "infra"]
