"""The light commands (`validate`, `list`, `pull`, `promote`, `gc`, `store ...`) import neither torch, Ray,
transformers nor matplotlib, and a file:// registry loads no S3 client either. Each command runs in a fresh
interpreter, as a user runs it, and reports `sys.modules` after it finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.registry import Registry
from infra.store import StoreInfo

HEAVY = ("torch", "ray", "transformers", "matplotlib")
S3_CLIENTS = ("s3fs", "botocore", "aiohttp")
SECRET = "light-commands-secret-value"
# Runs the CLI like the `loramill` script does, then writes what it left in sys.modules for the test to read.
RUN_CLI = """
import json, sys
from pipelines.cli import app
report, args = sys.argv[1], sys.argv[2:]
try:
    app(args, prog_name="loramill")
except SystemExit as stop:
    code = stop.code or 0
with open(report, "w") as out:
    json.dump({"code": code, "modules": sorted({name.split(".")[0] for name in sys.modules})}, out)
"""


def loramill(tmp_path: Path, *args: str) -> tuple[int, str, set[str]]:
    """(exit code, stdout + stderr, top-level modules imported) of `loramill ARGS` in a fresh interpreter."""
    report = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", RUN_CLI, str(report), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env=os.environ | {"COLUMNS": "200"})
    found = json.loads(report.read_text())
    return found["code"], done.stdout + done.stderr, set(found["modules"])


def assert_light(modules: set[str], *, s3: bool = False) -> None:
    assert not modules & set(HEAVY), f"heavy modules imported: {sorted(modules & set(HEAVY))}"
    if not s3:
        assert not modules & set(S3_CLIENTS), f"S3 clients imported for a file:// registry: {modules & set(S3_CLIENTS)}"


def write_config(tmp_path: Path, publish: dict) -> Path:
    raw = {
        "publish": publish,
        "domains": [{"name": "medical", "train": "data/train.jsonl", "eval": "data/eval.jsonl",
                     "intended_use": "tests", "limitations": "none",
                     "storage_options": {"endpoint_url": "http://127.0.0.1:1", "secret": SECRET}}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A file:// registry holding medical v1 (a stand-in adapter: the registry checks names and hashes only)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    found = Registry(f"file://{tmp_path / 'registry'}")
    found.publish("medical", adapter, {"metrics": {"eval_loss": 1.5}})
    return found


@pytest.fixture
def config(tmp_path: Path, registry: Registry) -> Path:
    return write_config(tmp_path, {"registry": registry.url})


def test_validate_is_light_and_masks_credentials(tmp_path: Path, config: Path) -> None:
    code, output, modules = loramill(tmp_path, "validate", str(config))
    assert code == 0, output
    assert "secret: '***'" in output and SECRET not in output
    assert_light(modules)


def test_list_is_light(tmp_path: Path, config: Path) -> None:
    code, output, modules = loramill(tmp_path, "list", "--config", str(config))
    assert code == 0, output
    assert "medical" in output and "v1" in output and "1.5000" in output
    assert_light(modules)


def test_pull_is_light(tmp_path: Path, config: Path) -> None:
    code, output, modules = loramill(tmp_path, "pull", "medical@v1", "--to", str(tmp_path / "pulled"),
                                     "--config", str(config))
    assert code == 0, output
    assert "verified" in output
    assert (tmp_path / "pulled" / "adapter_model.safetensors").read_bytes() == b"\0" * 64
    assert_light(modules)


def test_promote_is_light(tmp_path: Path, config: Path, registry: Registry) -> None:
    code, output, modules = loramill(tmp_path, "promote", "medical", "v1", "--alias", "staging",
                                     "--config", str(config))
    assert code == 0, output
    assert registry.alias("medical", "staging").version == 1
    assert_light(modules)


def test_promote_through_the_gate_is_light(tmp_path: Path, config: Path, registry: Registry) -> None:
    """The gate alias reads the versions' typed metadata: v1 has none that loramill wrote, so it is refused."""
    code, output, modules = loramill(tmp_path, "promote", "medical", "v1", "--config", str(config))
    assert code == 2, output
    assert "no loramill metadata" in output
    assert registry.alias("medical", "production") is None
    assert_light(modules)


def test_gc_is_light(tmp_path: Path, config: Path, registry: Registry) -> None:
    abandoned = tmp_path / "registry" / "medical" / "v2" / "adapter_config.json"
    abandoned.parent.mkdir()
    abandoned.write_text("{}")
    code, output, modules = loramill(tmp_path, "gc", "--grace-s", "0", "--config", str(config))
    assert code == 0, output
    assert "removed 1 abandoned upload(s)" in output and not abandoned.exists()
    assert registry.versions("medical") == [1]
    assert_light(modules)


def test_store_commands_and_the_embedded_registry_are_light(tmp_path: Path, s3_store: StoreInfo) -> None:
    """Against the session's real store: `up` joins it, `status` reports it, `list` reads the embedded registry
    (through s3fs, which an s3:// registry does need); `down` on a folder without a store says so."""
    config = write_config(tmp_path, {"registry": "embedded", "store_dir": str(s3_store.data_dir.parent)})
    for args, expected in ((("store", "up"), s3_store.endpoint_url), (("store", "status"), s3_store.endpoint_url),
                           (("list",), "loramill registry s3://loramill/adapters")):
        code, output, modules = loramill(tmp_path, *args, "--config", str(config))
        assert code == 0, output
        assert expected in output
        assert_light(modules, s3=args == ("list",))
    (tmp_path / "elsewhere").mkdir()
    stopped = write_config(tmp_path / "elsewhere", {"store_dir": str(tmp_path / "no-store")})
    code, output, modules = loramill(tmp_path, "store", "down", "--config", str(stopped))
    assert code == 0, output
    assert "store was not running" in output
    assert_light(modules)


@pytest.mark.parametrize("publish", [
    {"registry": "file:///tmp/reg/../../etc"},
    {"registry": "s3://Bad_Bucket/adapters"},
    {"registry": "http://127.0.0.1:9/adapters"},
    {"registry": "file:///tmp/reg", "storage_options": {"endpoint_url": "http://127.0.0.1:1"}},
], ids=["file-dotdot", "bad-bucket", "unsupported-scheme", "options-on-a-file-registry"])
def test_validate_refuses_a_registry_every_other_command_refuses_with_the_same_message(tmp_path: Path,
                                                                                      publish: dict) -> None:
    config = write_config(tmp_path, publish)
    code, output, modules = loramill(tmp_path, "validate", str(config))
    listed_code, listed = loramill(tmp_path, "list", "--config", str(config))[:2]
    assert code == listed_code == 2, (output, listed)
    assert output.startswith("error: ") and output == listed
    assert_light(modules)
