"""`loramill run` end to end on the real local Ray and the real S3 server (SeaweedFS): train → gate →
publish with the audit; then pull, load with PEFT, and a second version on changed data."""

import json

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from infra.registry import Registry
from pipelines.audit import REQUIRED_SECTIONS
from pipelines.cli import app
from pipelines.records import ManifestMetadata

runner = CliRunner()


def walk_bytes(registry_url, options):
    import s3fs

    fs = s3fs.S3FileSystem(**{"endpoint_url": options["endpoint_url"], "key": options["key"],
                              "secret": options["secret"]})
    root = registry_url.removeprefix("s3://")
    return {path: fs.cat_file(path) for path in fs.find(root)}


def test_run_publishes_audited_versions_that_pull_and_load(ray_cluster, tiny_config_file, tiny_model_dir,
                                                           s3_store, registry_url, small_data, tmp_path):
    options = s3_store.storage_options()
    config = tiny_config_file(domains=("support",), publish={
        "registry": registry_url, "storage_options": options, "audit_prompts": 2, "audit_max_new_tokens": 8})
    first = runner.invoke(app, ["run", str(config)])
    assert first.exit_code == 0, first.output
    assert "published" in first.output and "v1" in first.output

    registry = Registry(registry_url, options)
    manifest = registry.manifest("support", 1)
    assert set(manifest.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md", "audit.md",
                                   "audit.json", "loss_curves.png", "delta_w.png"}
    assert registry.alias("support", "production").version == 1
    assert manifest.metadata["base_model"]["id"] == "tests/tiny-llama"

    pulled = registry.pull("support", "latest", tmp_path / "pulled")
    audit = json.loads((pulled / "audit.json").read_text())
    for section in REQUIRED_SECTIONS:
        assert audit[section], f"audit section {section} is empty"
    assert (pulled / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (pulled / "README.md").read_text()
    assert card.startswith("---\nbase_model: tests/tiny-llama\nlibrary_name: peft\n")

    # ΔW in the audit equals a direct computation from the published weights.
    weights = load_file(pulled / "adapter_model.safetensors")
    config_json = json.loads((pulled / "adapter_config.json").read_text())
    scale = config_json["lora_alpha"] / config_json["r"]
    for module in audit["change_log"]["weight_change"]["modules"][:4]:
        key = f"base_model.model.{module['module']}"
        delta = weights[f"{key}.lora_B.weight"].double() @ weights[f"{key}.lora_A.weight"].double() * scale
        assert abs(torch.linalg.matrix_norm(delta).item() - module["frobenius_norm"]) < 1e-6

    # The pulled folder loads with PEFT and gives the trained adapter's outputs.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    [run_dir] = (config.parent / "output" / "support").iterdir()
    inputs = torch.tensor([[1, 20, 300, 4000]])
    outputs = []
    for adapter in (run_dir / "adapter", pulled):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        outputs.append(PeftModel.from_pretrained(base, adapter).eval()(inputs).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)

    # Nothing published holds a credential or an absolute path of this machine.
    for path, data in walk_bytes(registry_url, options).items():
        assert options["secret"].encode() not in data, path
        assert options["key"].encode() not in data, path
        assert str(tmp_path).encode() not in data and b"/root/" not in data, path

    # Changed data -> v2 with v1 as parent; the change log says what changed.
    train_file = small_data / "support/train.jsonl"
    train_file.write_text("".join(train_file.read_text().splitlines(keepends=True)[:-4]))
    second = runner.invoke(app, ["run", str(config), "train.learning_rate=0.02"])
    assert second.exit_code == 0, second.output
    v2 = registry.pull("support", "v2", tmp_path / "v2")
    audit2 = json.loads((v2 / "audit.json").read_text())
    assert audit2["change_log"]["parent_version"] == 1
    assert "train" in audit2["change_log"]["data_changes"]
    assert audit2["change_log"]["config_changes"]["train.learning_rate"] == {"from": 0.01, "to": 0.02}
    gate = audit2["validation"]["gate"]
    assert gate["current_version"] == 1 and gate["decision"] in ("promoted", "not promoted")
    history = registry.alias("support", "production").history
    assert [h["to"] for h in history] == ([1, 2] if gate["decision"] == "promoted" else [1])
    assert "## 8. Change log (6)" in (v2 / "audit.md").read_text()
    # Its eval data did not change: v2's run took the base's metrics from v1's run's measurement, and says so.
    assert "Base metrics: reused: measured at " in (v2 / "audit.md").read_text()
    assert audit2["validation"]["metrics"]["base_eval_loss"] == audit["validation"]["metrics"]["base_eval_loss"]

    # New eval data at the same URL: production's adapter is evaluated on it in the same publish (with the new
    # adapter and the base), and the gate decides on that pair; both numbers and the eval set are recorded.
    production = registry.alias("support", "production").version
    stored = ManifestMetadata.of(registry.manifest("support", production))
    eval_file = small_data / "support/eval.jsonl"
    eval_file.write_text("".join(eval_file.read_text().splitlines(keepends=True)[:-3]))
    third = runner.invoke(app, ["run", str(config), "train.learning_rate=0.02"])
    assert third.exit_code == 0, third.output
    v3 = ManifestMetadata.of(registry.manifest("support", 3))
    gate3 = v3.gate
    assert gate3.current_version == production and "evaluated at this publish" in gate3.compared_on
    assert gate3.eval_set == v3.metrics.eval_set != stored.metrics.eval_set
    assert gate3.current_eval_loss is not None and gate3.current_eval_loss != stored.metrics.eval_loss
    # Measured again at publish, the new adapter's and the base's losses are those training measured.
    assert gate3.new_eval_loss == pytest.approx(v3.metrics.eval_loss, abs=1e-4)
    assert gate3.base_eval_loss == pytest.approx(v3.metrics.base_eval_loss, abs=1e-4)
    audit3 = registry.pull("support", "v3", tmp_path / "v3")
    assert json.loads((audit3 / "audit.json").read_text())["validation"]["gate"] == gate3.model_dump(mode="json")
    assert f"{gate3.current_eval_loss:.4f} (production v{production})" in (audit3 / "audit.md").read_text()
    # New eval examples: not v2's measurement of the base (gate3 above measured the base on them at publish).
    assert v3.metrics.base_eval_loss != audit2["validation"]["metrics"]["base_eval_loss"]


def test_run_with_tune_trains_the_best_trial_and_audits_the_search(ray_cluster, tiny_config_file, s3_store,
                                                                    registry_url, tmp_path):
    options = s3_store.storage_options()
    config = tiny_config_file(domains=("legal",), publish={
        "registry": registry_url, "storage_options": options, "audit_prompts": 1, "audit_max_new_tokens": 4},
        tune={"search": "grid", "ranks": [2, 4], "alphas": [2.0], "learning_rates": [1e-2]},
        tracking={"mlflow_uri": "sqlite:///mlflow.db"})
    result = runner.invoke(app, ["run", str(config), "--tune"])
    assert result.exit_code == 0, result.output
    best = json.loads((config.parent / "output/legal/tune/best.json").read_text())
    audit = json.loads(Registry(registry_url, options).pull("legal", "latest", tmp_path / "v1")
                       .joinpath("audit.json").read_text())
    design = audit["design_choices"]
    assert len(design["trials"]) == 2 and design["chosen"]["trial_id"] == best["trial_id"]
    assert audit["base_model_and_modification"]["lora"]["r"] == best["lora"]["r"]
    assert audit["predetermined_changes"]["retraining_envelope"]["lora_r"] == [2, 4]

    # Tracking: the sweep is an MLflow parent run with a child run per trial, then the final run, tagged with the
    # version published from it; every run and trial also wrote TensorBoard event files under output/tensorboard.
    client = MlflowClient(f"sqlite:///{config.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("loramill").experiment_id])
    (sweep,) = [r for r in runs if "tune.search" in r.data.params]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    (final,) = [r for r in runs if r not in trials and r != sweep]
    assert sweep.data.tags["loramill.best_trial"] == best["trial_id"] and sweep.info.status == "FINISHED"
    assert sorted(int(t.data.params["lora.r"]) for t in trials) == [2, 4]
    assert final.data.params["lora.r"] == str(best["lora"]["r"])
    assert final.data.tags["loramill.published_version"] == "1"
    assert final.data.tags["loramill.registry_url"].endswith("/legal/v1")
    assert {m.step for m in client.get_metric_history(final.info.run_id, "train_loss")} == {1, 2, 3, 4}
    assert {m.step for m in client.get_metric_history(final.info.run_id, "eval_loss")} == {0, 2, 4}
    sweep_result = json.loads((config.parent / "output/legal/tune/tune_results.json").read_text())
    status = {"finished": "FINISHED", "stopped": "KILLED"}  # stopped: by ASHA
    assert sorted(t.info.status for t in trials) == sorted(status[t["status"]] for t in sweep_result["trials"])
    assert final.info.status == "FINISHED"
    event_folders = {p.parent.relative_to(config.parent / "output/tensorboard/legal").as_posix()
                     for p in (config.parent / "output/tensorboard/legal").rglob("events.out.tfevents.*")}
    experiment = sweep_result["experiment"]
    assert event_folders == {final.data.tags["loramill.run"], *(t.data.tags["loramill.run"] for t in trials)}
    assert all(name.startswith(experiment.rsplit("/", 1)[1] + "/") for name in event_folders - {final.info.run_name})


def test_production_trained_on_another_base_or_quantization_is_not_re_evaluated():
    """The gate measures production on new eval data only where its adapter loads as it was trained."""
    from infra.registry import Manifest
    from lora.config import Config
    from pipelines.publish import trained_elsewhere
    from pipelines.records import BaseModelRef, RunInfo, RunRecord

    ours = BaseModelRef(id="org/base", revision=None, weights_sha256="a" * 64)
    record = RunRecord.model_construct(info=RunInfo.model_construct(base_model=ours))
    cfg = Config.model_validate({"domains": [{"name": "d", "train": "t.jsonl", "eval": "e.jsonl", "intended_use": "x",
                                              "limitations": "y"}]})

    def production(**metadata) -> Manifest:
        return Manifest.model_validate({"schema": 1, "domain": "d", "version": 2, "parent_version": 1,
                                        "created_at": "2026-11-29T00:00:00+00:00", "files": {}, **metadata})

    same = {"base_model": ours.model_dump(), "quant": cfg.quant.model_dump()}
    assert trained_elsewhere(production(**same), record, cfg) is None
    assert "another base" in trained_elsewhere(production(**same | {"base_model": ours.model_dump() | {
        "weights_sha256": "b" * 64}}), record, cfg)
    assert "another base" in trained_elsewhere(production(**same | {"base_model": ours.model_dump() | {
        "id": "org/other"}}), record, cfg)
    assert "quant.mode=none" in trained_elsewhere(production(**same | {"quant": {"mode": "none"}}), record, cfg)
    assert "does not record" in trained_elsewhere(production(), record, cfg)


def test_finished_domains_model_work_runs_while_the_last_domain_trains(ray_cluster, tiny_config_file, tmp_path):
    """Three domains of half the session cluster's CPUs each: two train at once and the third starts when one of
    them ends. When the second ends, training leaves CPUs free for good, and the two finished runs' model work (one
    task, one load of the base) runs then, while the third still trains; the third's follows its training. The
    versions are written once all three have trained."""
    from datetime import datetime

    from lora.config import load_config
    from pipelines.records import RESULT_FILE
    from pipelines.run import run

    cpus = ray_cluster.cluster_resources()["CPU"]
    config = tiny_config_file(
        domains=("medical", "legal", "support"), cluster={"cpus_per_worker": cpus / 2},
        publish={"registry": f"file://{tmp_path / 'registry'}", "audit_prompts": 1, "audit_max_new_tokens": 4})
    outcomes = run(load_config(config))

    trained = {o.training.domain: (o.training.output_dir / RESULT_FILE).stat().st_mtime for o in outcomes}
    works = {o.training.domain: o.outcome.model_work for o in outcomes}
    last = max(trained, key=trained.get)
    first = sorted(set(trained) - {last})
    assert sorted((first[0], *works[first[0]].shared_with)) == first and works[last].shared_with == ()
    assert works[first[0]].started_at < trained[last] <= works[last].started_at
    registry = Registry(f"file://{tmp_path / 'registry'}")
    for outcome in outcomes:
        assert outcome.outcome.published.version == 1
        created = datetime.fromisoformat(registry.manifest(outcome.training.domain, 1).created_at).timestamp()
        assert created >= trained[last]
