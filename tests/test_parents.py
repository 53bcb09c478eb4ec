"""Parents under contention and tampering, through the real publish stage on file://, moto and SeaweedFS; and the
publish stage's model work on one base load, in a Ray task.

The runs are finished run folders written here (a real PEFT adapter on a tiny random Llama, its result.json and
history), so publishing trains nothing. In the parent tests it loads no model and starts no Ray either:
``audit_prompts`` is 0 and every gate compares stored losses, except where production's version fails verification
and the gate refuses to evaluate it.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from infra.registry import Registry
from lora.config import Config
from lora.errors import DataError
from pipelines import publish
from pipelines.cli import app
from pipelines.records import RESULT_FILE, RunInfo, RunRecord, Sample
from pipelines.run_folder import data_fingerprint
from tests.conftest import DATA, REPO, save_random_lora
from tests.s3_fixtures import MOTO_BUCKET, moto_options

WEIGHTS = "adapter_model.safetensors"
PUBLISHERS = 6


@dataclass(frozen=True)
class Place:
    """A fresh registry location, and the raw filesystem under it (to tamper as another writer would)."""

    url: str
    options: dict[str, str]
    fs: fsspec.AbstractFileSystem
    root: str


@pytest.fixture(params=["file", "moto", "seaweedfs"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    if request.param == "file":
        root = str(tmp_path / "registry")
        return Place(f"file://{root}", {}, fsspec.filesystem("file", auto_mkdir=True), root)
    if request.param == "moto":
        url = f"s3://{MOTO_BUCKET}/test-{uuid.uuid4().hex[:12]}"
        options = moto_options(request.getfixturevalue("moto_server"))
    else:
        url = request.getfixturevalue("registry_url")
        options = request.getfixturevalue("s3_store").storage_options()
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, **options)
    return Place(url, options, fs, url.removeprefix("s3://"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT LoRA (r=2, random A and B) on a tiny random Llama, as save_pretrained writes it."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, lora).save_pretrained(path)
    return path


def config_of(place: Place, data: Path = DATA) -> dict[str, Any]:
    return {
        "domains": [{"name": "medical", "train": str(data / "medical/train.jsonl"),
                     "eval": str(data / "medical/eval.jsonl"), "intended_use": "tests of parents",
                     "limitations": "random adapter"}],
        "publish": {"registry": place.url, "storage_options": place.options, "audit_prompts": 0},
    }


def finished_run(folder: Path, adapter: Path, name: str, eval_loss: float, eval_sha256: str = "e" * 64,
                 domain: str = "medical") -> Path:
    """A finished run folder of ``domain``: the adapter, its history and result.json (losses as given)."""
    run_dir = folder / name
    (run_dir / "adapter").mkdir(parents=True)
    for source in adapter.iterdir():
        (run_dir / "adapter" / source.name).write_bytes(source.read_bytes())
    (run_dir / "history.json").write_text(json.dumps(
        [{"step": 0, "eval_loss": 2.0}, {"step": 1, "train_loss": 1.5, "eval_loss": eval_loss}]))

    def split(sha256: str) -> dict[str, Any]:
        return {"url": "data.jsonl", "sha256": sha256, "examples_read": 8, "examples_kept": 8, "dropped_overlong": 0,
                "truncated_overlong": 0, "tokens": 800, "target_tokens": 400}

    info = RunInfo(domain=domain, task="causal_lm", method="lora", labels=None,
                   base_model={"id": "tests/tiny-llama", "revision": None, "weights_sha256": "0" * 64},
                   trainable_params=128, total_params=10_000, total_steps=1,
                   data={"train": split("t" * 64), "eval": split(eval_sha256)},
                   hardware={"device": "cpu", "workers": 1, "use_gpu": False, "cpus_per_worker": 1.0},
                   compute_dtype="float32", kernels="none", checks=[], resumed_from_step=[])
    RunRecord(domain=domain, run_name=name, steps=1, base_eval_loss=2.0, eval_loss=eval_loss, eval_accuracy=None,
              base_eval_accuracy=None, trainable_params=128, total_params=10_000, train_seconds=1.0,
              wall_seconds=2.0, config={}, info=info, output_dir=run_dir).write(run_dir / RESULT_FILE)
    return run_dir


def published_audit(registry: Registry, version: int, folder: Path, domain: str = "medical") -> dict[str, Any]:
    pulled = registry.pull(domain, version, folder / f"{domain}-v{version}")  # verified: every hash checked
    return json.loads((pulled / "audit.json").read_text()) | {"audit.md": (pulled / "audit.md").read_text()}


def test_concurrent_publishes_name_one_parent_in_audit_and_manifest(place: Place, adapter_dir: Path,
                                                                    tmp_path: Path) -> None:
    cfg = Config.model_validate(config_of(place))
    runs = [finished_run(tmp_path / "runs", adapter_dir, f"medical-run{i}", eval_loss=1.0 - i / 100)
            for i in range(PUBLISHERS + 1)]
    assert publish.run(cfg, "medical", runs[0]).published.version == 1  # every publisher below has a parent
    start = threading.Barrier(PUBLISHERS)

    def publish_one(run_dir: Path) -> publish.Outcome:
        start.wait()
        return publish.run(cfg, "medical", run_dir)

    with ThreadPoolExecutor(PUBLISHERS) as pool:
        outcomes = list(pool.map(publish_one, runs[1:]))

    registry = Registry(place.url, place.options or None)
    versions = [outcome.published.version for outcome in outcomes]
    assert sorted(versions) == list(range(2, PUBLISHERS + 2))
    assert [outcome.published.unverified for outcome in outcomes] == [None] * PUBLISHERS
    assert registry.versions("medical") == list(range(1, PUBLISHERS + 2))
    assert sorted(place.fs.find(f"{place.root}/serve/medical.latest")) == sorted(
        f"{place.root}/serve/medical.latest/{name}" for name in ("adapter_config.json", WEIGHTS))
    for version in range(1, PUBLISHERS + 2):
        manifest = registry.verify("medical", version)
        # The version folder holds exactly its manifest's files (claims live in medical/claims/), and its serving
        # view exactly the two adapter files, as published.
        folder = f"{place.root}/medical/v{version}"
        assert sorted(p[len(folder) + 1:] for p in place.fs.find(folder)) == sorted([*manifest.files, "manifest.json"])
        for name in ("adapter_config.json", WEIGHTS):
            view = place.fs.cat_file(f"{place.root}/serve/medical.v{version}/{name}")
            assert view == place.fs.cat_file(f"{folder}/{name}"), f"v{version} {name}"
        audit = published_audit(registry, version, tmp_path / "pulled")
        parent = manifest.parent_version
        assert audit["prepared_as_version"] == version
        assert audit["change_log"]["parent_version"] == parent, f"v{version}"
        assert manifest.skipped_parents == []
        if version == 1:
            assert parent is None
            continue
        assert parent is not None and parent < version
        assert "- Parent version: v%d\n" % parent in audit["audit.md"]
        # The change log's facts are the parent's: its stored loss (same eval set), not another version's.
        parent_loss = registry.manifest("medical", parent).metadata["metrics"]["eval_loss"]
        assert audit["validation"]["metrics"]["parent_eval_loss"] == parent_loss
        assert audit["change_log"]["metric_deltas"]["eval_loss"] == pytest.approx(
            manifest.metadata["metrics"]["eval_loss"] - parent_loss)
        [check] = [c for c in audit["validation"]["checks"] if c["name"] == "earlier versions verified on the store"]
        assert check["status"] == "passed" and f"parent v{parent}:" in check["evidence"]


def test_tampered_newest_version_is_skipped_as_parent_and_listed(place: Place, adapter_dir: Path,
                                                                 tmp_path: Path) -> None:
    raw = config_of(place)
    cfg = Config.model_validate(raw)
    runs = tmp_path / "runs"
    publish.run(cfg, "medical", finished_run(runs, adapter_dir, "medical-a", eval_loss=1.0))
    second = publish.run(cfg, "medical", finished_run(runs, adapter_dir, "medical-b", eval_loss=0.9))
    assert second.gate.decision == "promoted" and second.published.version == 2
    # Another client with write access alters the newest version's weights, same size.
    path = f"{place.root}/medical/v2/{WEIGHTS}"
    data = bytearray(place.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    place.fs.pipe_file(path, bytes(data))

    # New eval data: the gate would evaluate production (v2) here, and refuses to, as it fails verification.
    third = publish.run(cfg, "medical", finished_run(runs, adapter_dir, "medical-c", 0.8, eval_sha256="f" * 64))

    registry = Registry(place.url, place.options or None)
    assert third.published.version == 3 and third.published.unverified is None and third.warnings == []
    manifest = registry.verify("medical", 3)
    assert manifest.parent_version == 1
    [skipped] = manifest.skipped_parents
    assert skipped.version == 2 and WEIGHTS in skipped.reason and "sha256" in skipped.reason
    audit = published_audit(registry, 3, tmp_path / "pulled")
    assert audit["change_log"]["parent_version"] == 1
    assert audit["validation"]["metrics"]["parent_eval_loss"] is None  # v1 was evaluated on the other eval set
    [check] = [c for c in audit["validation"]["checks"] if c["name"] == "earlier versions verified on the store"]
    assert check["status"] == "failed"
    assert check["evidence"].startswith("parent v1: every file re-hashed on the store matched its manifest")
    assert f"v2 skipped: {skipped.reason}" in check["evidence"]
    assert f"earlier versions verified on the store: **failed** — {check['evidence']}" in audit["audit.md"]
    assert third.gate.decision == "not promoted" and "it fails verification" in third.gate.reason
    assert registry.alias("medical", "production").version == 2 and registry.resolve("medical") == 3

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    listed = CliRunner().invoke(app, ["list", "medical", "-c", str(config)])
    assert listed.exit_code == 0, listed.output
    assert f"FAILED medical v2: failed verification when v3 was published: {skipped.reason}" in listed.output
    assert "FAILED medical v1" not in listed.output and "FAILED medical v3" not in listed.output
    verified = CliRunner().invoke(app, ["list", "medical", "-c", str(config), "--verify"])
    assert verified.exit_code == 0, verified.output
    assert "FAILED medical v2: medical v2: 'adapter_model.safetensors' has sha256" in verified.output
    assert verified.output.count("FAILED") == 2  # v2's row and its line below the table

    # The next publish follows v3, which verifies: nothing is skipped any more.
    fourth = publish.run(cfg, "medical", finished_run(runs, adapter_dir, "medical-d", 0.7, eval_sha256="f" * 64))
    assert fourth.published.manifest.parent_version == 3 and fourth.published.manifest.skipped_parents == []


def test_publish_measures_production_and_answers_the_samples_on_one_model(ray_cluster: Any, tiny_model_dir: Path,
                                                                          small_data: Path, tmp_path: Path) -> None:
    """Production evaluated on other data: the base and both adapters are measured on this run's eval set, and the
    audit samples answered, by one model (``publish.model_work``, the stage's one load of the base), in a Ray task
    with a training worker's resources, not in the driver; its errors reach the caller as they were raised."""
    adapter = save_random_lora(tiny_model_dir, tmp_path / "adapter", 0, r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj"])
    raw = config_of(Place(f"file://{tmp_path / 'registry'}", {}, fsspec.filesystem("file"), ""), small_data) | {
        "model": {"id": str(tiny_model_dir), "logical_id": "tests/tiny-llama"},
        "train": {"max_seq_len": 256, "micro_batch_size": 4}}
    raw["publish"] |= {"audit_prompts": 1, "audit_max_new_tokens": 4}
    cfg = Config.model_validate(raw)
    eval_sha256 = data_fingerprint(cfg.domain("medical"))["eval"]
    first = publish.run(cfg, "medical", finished_run(tmp_path / "runs", adapter, "medical-a", 1.0))
    assert first.gate.decision == "promoted" and len(first.published.manifest.files) == 7

    second = publish.run(cfg, "medical", finished_run(tmp_path / "runs", adapter, "medical-b", 0.9, eval_sha256))

    gate = second.gate
    assert gate.current_version == 1 and gate.compared_on.startswith("both adapters and the base evaluated at this")
    # One adapter published twice, measured in the same model: the same loss, and not the base's.
    assert gate.current_eval_loss == gate.new_eval_loss != gate.base_eval_loss
    registry = Registry(raw["publish"]["registry"])
    audit = published_audit(registry, 2, tmp_path / "pulled")
    [sample] = audit["samples"]
    first_eval = json.loads((small_data / "medical/eval.jsonl").read_text().splitlines()[0])
    assert sample["prompt"] == [m for m in first_eval["messages"] if m["role"] == "user"][-1]["content"]
    assert audit["validation"]["gate"] == gate.model_dump(mode="json")
    [check] = [c for c in audit["validation"]["checks"] if c["name"].startswith("held-out prompts answered")]
    driver_node = ray_cluster.get_runtime_context().get_node_id()
    assert check["evidence"] == f"1 prompts, greedy, on cpu in a Ray task on node {driver_node} (section 9)"

    record = RunRecord.load(finished_run(tmp_path / "runs", adapter, "medical-c", 0.9, eval_sha256))
    with publish.Publishing(new_version=True) as publishing:
        publishing.add(publish.Request(cfg, "medical", record.output_dir))
        [outcome] = publishing.finish()
    work = outcome.model_work
    assert work.pid is not None and work.pid != os.getpid() and work.node_id == driver_node
    assert work.device == "cpu" and work.samples == [Sample.model_validate(s) for s in audit["samples"]]

    # An eval file that changed since the run was trained: the task's DataError itself, not Ray's remote traceback.
    changed = finished_run(tmp_path / "runs", adapter, "medical-d", 0.9, eval_sha256="d" * 64)
    with pytest.raises(DataError) as caught:
        publish.run(cfg, "medical", changed)
    assert type(caught.value) is DataError
    assert str(caught.value).endswith("changed since run medical-d was trained on it; train again before publishing, "
                                      "so that the audit describes the data the adapter was evaluated on")


def test_runs_published_together_share_one_task_and_nothing_is_published_when_one_fails(
        ray_cluster: Any, tiny_model_dir: Path, small_data: Path, tmp_path: Path) -> None:
    """``publish.run_all``, runs published together (as ``loramill run`` publishes the domains that finish
    together): one Ray task and one load of the base for the runs' model work; each audit holds its own domain's prompts, answered as a publish of that run alone answers
    them; and when one run's model work fails, no run is published."""
    adapters = {domain: save_random_lora(tiny_model_dir, tmp_path / f"adapter-{domain}", seed, r=4, lora_alpha=8,
                                         target_modules=["q_proj", "v_proj"])
                for seed, domain in enumerate(("medical", "legal"))}
    raw = config_of(Place(f"file://{tmp_path / 'registry'}", {}, fsspec.filesystem("file"), ""), small_data) | {
        "model": {"id": str(tiny_model_dir), "logical_id": "tests/tiny-llama"},
        "train": {"max_seq_len": 256, "micro_batch_size": 4}}
    raw["domains"].append(raw["domains"][0] | {"name": "legal", "train": str(small_data / "legal/train.jsonl"),
                                                "eval": str(small_data / "legal/eval.jsonl")})
    raw["publish"] |= {"audit_prompts": 2, "audit_max_new_tokens": 4}
    cfg = Config.model_validate(raw)
    registry = Registry(raw["publish"]["registry"])

    def request(domain: str, name: str, eval_sha256: str = "e" * 64) -> publish.Request:
        return publish.Request(cfg, domain, finished_run(tmp_path / "runs", adapters[domain], name, 1.0, eval_sha256,
                                                         domain))

    together = publish.run_all([request("medical", "medical-a"), request("legal", "legal-a")])

    assert [(o.published.domain, o.published.version) for o in together] == [("medical", 1), ("legal", 1)]
    audits = {d: published_audit(registry, 1, tmp_path / "pulled", d) for d in ("medical", "legal")}
    for domain, other in (("medical", "legal"), ("legal", "medical")):
        asked = publish.held_out_prompts(cfg, cfg.domain(domain))
        assert len(asked) == 2 and [sample["prompt"] for sample in audits[domain]["samples"]] == asked
        [check] = [c for c in audits[domain]["validation"]["checks"] if c["name"].startswith("held-out prompts")]
        assert check["evidence"].endswith(f"one load of the base and one batch with {other} (section 9)")
    alone = publish.run(cfg, "legal", request("legal", "legal-b").run_dir)
    assert alone.published.version == 2
    assert published_audit(registry, 2, tmp_path / "pulled", "legal")["samples"] == audits["legal"]["samples"]

    # legal's eval file is not what its run was trained on: its gate evaluation fails, and medical is not published.
    medical_eval = data_fingerprint(cfg.domain("medical"))["eval"]
    with pytest.raises(DataError, match="changed since run legal-d was trained on it"):
        publish.run_all([request("medical", "medical-c", medical_eval), request("legal", "legal-d", "d" * 64)])
    assert registry.versions("medical") == [1] and registry.versions("legal") == [1, 2]


def test_a_dora_audit_says_its_weight_change_leaves_out_the_magnitudes(tiny_model_dir: Path, adapter_dir: Path,
                                                                      tmp_path: Path) -> None:
    """DoRA rescales each output row of W + B·A·α/r to a learned magnitude: the audit's ΔW norms (of B·A·α/r) must
    say that they leave that out, in audit.json and in audit.md; a plain LoRA's audit says ΔW = B·A·α/r."""
    adapter = save_random_lora(tiny_model_dir, tmp_path / "dora", 0, r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj"], use_dora=True)
    raw = config_of(Place(f"file://{tmp_path / 'registry'}", {}, fsspec.filesystem("file"), ""))
    registry = Registry(raw["publish"]["registry"])
    for version, variant, saved in ((1, "dora", adapter), (2, "lora", adapter_dir)):
        cfg = Config.model_validate(raw | {"lora": {"variant": variant}, "quant": {"mode": "none"}})
        publish.run(cfg, "medical", finished_run(tmp_path / "runs", saved, f"medical-{variant}", 1.0))
        audit = published_audit(registry, version, tmp_path / "pulled")
        measures = audit["change_log"]["weight_change"]["measures"]
        assert (measures.startswith("the low-rank update B·A·α/r only: DoRA also rescales") if variant == "dora"
                else measures == "ΔW = B·A·α/r")
        assert f"modules ({measures})" in audit["audit.md"]


def test_an_uninstalled_source_tree_publishes_with_its_pyproject_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a node that has the checkout on PYTHONPATH but no installed loramill, publishing names the source tree's
    version instead of failing after every domain trained."""
    import importlib.metadata
    import tomllib

    installed = importlib.metadata.version("loramill")
    assert publish.loramill_version() == installed

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    source = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert publish.loramill_version() == f"{source} (source tree, not installed)"
