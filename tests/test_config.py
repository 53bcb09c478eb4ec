"""Config: every shipped YAML validates, every error is listed with its dotted path, overrides apply."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lora.config import Config, ConfigError, load_config
from pipelines.cli import app

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    for domain in cfg.domains:
        assert Path(domain.train).is_file() and Path(domain.eval).is_file()


def test_shipped_configs_exist():
    assert len(list(REPO.glob("configs/**/*.yaml"))) >= 1


def test_defaults_follow_the_design():
    cfg = load_config(REPO / "configs/default.yaml")
    assert cfg.quant.mode == "nf4" and cfg.quant.double_quant and cfg.quant.compute_dtype == "auto"
    assert [d.name for d in cfg.domains] == ["medical", "legal", "support"]


def test_every_error_is_listed_with_its_dotted_path(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(
            REPO / "configs/default.yaml",
            ["lora.r=0", "lora.alpha=0", "train.bogus=1", "domains.0.name=../x", "quant.mode=int3",
             "domains.1.intended_use="],
        )
    paths = [p.split(":")[0] for p in caught.value.problems]
    assert paths == ["quant.mode", "lora.r", "lora.alpha", "train.bogus", "domains.0.name", "domains.1.intended_use"]
    assert "unknown key" in caught.value.problems[3]


def test_cross_field_rules():
    base = {"domains": [{"name": "a", "train": "t", "eval": "e", "intended_use": "u", "limitations": "l"}]}
    with pytest.raises(ValueError, match="warmup_steps"):
        Config.model_validate(base | {"train": {"max_steps": 5, "warmup_steps": 5}})
    with pytest.raises(ValueError, match="unique"):
        Config.model_validate({"domains": base["domains"] * 2})
    with pytest.raises(ValueError, match="revision"):
        Config.model_validate(base | {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}})
    hub = Config.model_validate(base | {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"}})
    assert hub.model.revision == "main"
    with pytest.raises(ValueError, match="target_modules"):
        Config.model_validate(base | {"lora": {"target_modules": []}})


def test_overrides_and_relative_paths(tmp_path):
    (tmp_path / "d").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"domains": [
        {"name": "a", "train": "d/t.jsonl", "eval": "s3://bucket/e.jsonl", "intended_use": "u", "limitations": "l"}]}))
    cfg = load_config(path, ["train.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "domains.0.name=b"])
    assert cfg.train.max_steps == 7 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.domains[0].name == "b"
    assert cfg.domains[0].train == str(tmp_path / "d/t.jsonl")
    assert cfg.domains[0].eval == "s3://bucket/e.jsonl"
    assert cfg.cluster.storage_url == str(tmp_path / ".loramill/runs")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.max_steps"])
    with pytest.raises(ConfigError, match="no list item"):
        load_config(path, ["domains.3.name=x"])


def test_unknown_domain_is_a_config_error():
    cfg = load_config(REPO / "configs/default.yaml")
    with pytest.raises(ConfigError, match="no domain named 'finance'; configured: medical, legal, support"):
        cfg.domain("finance")


def test_cli_validate_prints_or_exits_2():
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(REPO / "configs/default.yaml"), "train.max_steps=5"])
    assert ok.exit_code == 0, ok.output
    assert yaml.safe_load(ok.output)["train"]["max_steps"] == 5
    bad = runner.invoke(app, ["validate", str(REPO / "configs/default.yaml"), "lora.r=-1", "cluster.gpus=2"])
    assert bad.exit_code == 2
    assert "lora.r:" in bad.output and "cluster.gpus: unknown key" in bad.output
    missing = runner.invoke(app, ["validate", "nope.yaml"])
    assert missing.exit_code == 2 and "config file not found" in missing.output


def test_readme_config_reference_matches_the_code():
    from lora.config import reference_markdown

    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate README's config reference: loramill config-reference"


def test_a_domain_named_like_the_serving_view_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="'serve' is reserved.*serving view.*serve-desk"):
        load_config(REPO / "configs/default.yaml", ["domains.0.name=serve"])
