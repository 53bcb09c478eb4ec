"""Using published adapters: several domains on one base, `loramill generate` against the real S3 registry
(SeaweedFS), the verified cache, `loramill export --merge`, and the bad inputs that exit 2."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import fsspec
import pytest
import torch
from typer.testing import CliRunner

from infra.registry import IntegrityError, Registry
from lora.config import ModelSource, Quantization
from lora.generate import generate, load_with_adapter, side_by_side
from lora.model import dispatch_backend, load_base_model, weights_sha256
from lora.serve import load_adapters, probe_logits, use_adapter
from pipelines import use
from pipelines.cli import app
from tests.conftest import TINY_ID, save_random_lora

runner = CliRunner()
INPUTS = torch.tensor([[1, 20, 300, 4000, 17, 99, 2048]])
PROMPT = "How do I restore a deleted file?"
# Different ranks and targets per domain, so switching has to change which layers add what.
ADAPTERS = {
    "medical": {"r": 4, "target_modules": "all-linear"},
    "legal": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
    "support": {"r": 2, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
}


def plain_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def nf4_base(model_dir):
    quant = Quantization(mode="nf4")
    return load_base_model(model_dir, ModelSource(id=str(model_dir)), quant, dispatch_backend(quant, use_gpu=False))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from more threads, and on a busy machine two OpenMP threads sharing its
    cores spin-wait on each other: this module's generate test took 58 s there instead of 3 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Three LoRA adapters on the tiny model, saved by PEFT, with random non-zero B (an untrained B is zero)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    folders = {}
    for seed, (name, settings) in enumerate(ADAPTERS.items()):
        folder = save_random_lora(tiny_model_dir, tmp_path_factory.mktemp(f"adapter-{name}"), seed,
                                  lora_alpha=2 * settings["r"], **settings)
        tokenizer.save_pretrained(folder)  # published folders may carry their tokenizer; the cache must too
        folders[name] = folder
    return folders


def publish(registry: Registry, domain: str, folder: Path, base_model: dict) -> None:
    registry.publish(domain, folder, metadata={"base_model": base_model, "metrics": {"eval_loss": 1.0}})


@pytest.fixture
def published(s3_store, registry_url, tiny_model_dir, tiny_config_file, adapters):
    """medical v1 and legal v1 on the test SeaweedFS, and a config for the tiny model pointing there."""
    options = s3_store.storage_options()
    registry = Registry(registry_url, options)
    base = {"id": TINY_ID, "revision": None, "weights_sha256": weights_sha256(tiny_model_dir)}
    for domain in ("medical", "legal"):
        publish(registry, domain, adapters[domain], base)
    config = tiny_config_file(publish={"registry": registry_url, "storage_options": options})
    return config, registry


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])



@torch.no_grad()
def test_audit_samples_in_one_mixed_batch_are_the_answers_of_one_prompt_at_a_time(tiny_model_dir, adapters):
    """side_by_side answers every adapter's prompts through the base and through that adapter in one left-padded
    batch (PEFT's mixed-adapter batches): padding, batching and the other adapters' rows must not change a greedy
    answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = {"medical": [PROMPT, "Hi"],
               "legal": ["What does clause 4.2 of the Ardenia civil code say about deposits, in short?", PROMPT]}
    model = load_adapters(plain_base(tiny_model_dir), {name: adapters[name] for name in prompts})
    samples = side_by_side(model, tokenizer, prompts, 12)
    for name, asked in prompts.items():
        with use_adapter(model, name):
            one_at_a_time = [generate(model, tokenizer, prompt, 12) for prompt in asked]
        with use_adapter(model, None):
            base_one_at_a_time = [generate(model, tokenizer, prompt, 12) for prompt in asked]
        assert [s["prompt"] for s in samples[name]] == asked
        assert [s["adapter"] for s in samples[name]] == one_at_a_time
        assert [s["base"] for s in samples[name]] == base_one_at_a_time
        assert one_at_a_time != base_one_at_a_time  # the adapter changes the answers: the routing is really tested
    with use_adapter(model, "medical"):
        assert generate(model, tokenizer, PROMPT, 12) != samples["legal"][1]["adapter"]  # and the adapters differ


# ---------------------------------------------------------------------------------------------
# Several domains on one base
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_domains_on_one_base_equal_each_adapter_alone(tiny_model_dir, adapters):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    alone = {}
    for name, folder in adapters.items():
        model = load_with_adapter(plain_base(tiny_model_dir), folder, name)
        alone[name] = (model(INPUTS).logits, generate(model, tokenizer, PROMPT, 12))
    base = plain_base(tiny_model_dir)
    alone[None] = (base(INPUTS).logits, generate(base, tokenizer, PROMPT, 12))
    for a, b in [("medical", "legal"), ("legal", "support"), ("support", None), ("medical", None)]:
        assert (alone[a][0] - alone[b][0]).abs().max() > 1e-2, f"{a} and {b} give the same logits: test is vacuous"

    model = load_adapters(plain_base(tiny_model_dir), adapters)
    # One copy of the base: the parameters are the base's plus each adapter's A and B, once.
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters()) + lora_params
    assert lora_params == sum(
        sum(p.numel() for p in load_with_adapter(plain_base(tiny_model_dir), f).parameters())
        - sum(p.numel() for p in base.parameters()) for f in adapters.values())
    base_weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    before = base_weight.data_ptr()

    for name in ["legal", "medical", None, "support", "medical", "legal"]:  # switch back and forth per request
        with use_adapter(model, name):
            logits = model(INPUTS).logits
            answer = generate(model, tokenizer, PROMPT, 12)
        torch.testing.assert_close(logits, alone[name][0], rtol=0, atol=1e-6)
        assert answer == alone[name][1], name
    assert base_weight.data_ptr() == before  # switching never reloaded or copied the base
    with pytest.raises(KeyError, match="no adapter named 'finance'"):
        with use_adapter(model, "finance"):
            pass


# ---------------------------------------------------------------------------------------------
# generate against the registry, and its cache
# ---------------------------------------------------------------------------------------------


def test_generate_answers_like_the_adapter_loaded_by_hand(published, tiny_model_dir, adapters, tmp_path):
    config, registry = published
    cache = tmp_path / "cache"
    result = invoke("generate", "medical@v1", "legal", "--prompt", PROMPT, "--compare", "--max-new-tokens", 6,
                    "--config", config, "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert "base model" in result.output and "medical v1 (registry)" in result.output
    assert "legal v1 (registry)" in result.output
    again = invoke("generate", "medical@latest", "--prompts", _prompts_file(tmp_path), "--config", config,
                   "--cache-dir", cache)
    assert again.exit_code == 0, again.output
    assert "medical v1 (cache)" in again.output and "base model" not in again.output

    # The answers equal the ones of the 4-bit base (as trained) + the adapter loaded alone, and of the base.
    from lora.config import load_config

    answers = use.generate(load_config(config), [("medical", "v1"), ("legal", None)], [PROMPT, "Hello"],
                           compare=True, max_new_tokens=6, cache_root=cache)
    tokenizer_dir = tiny_model_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for domain in ("medical", "legal"):
        model = load_with_adapter(nf4_base(tiny_model_dir), adapters[domain])
        for row in answers.rows:
            assert row[f"{domain}_v1"] == generate(model, tokenizer, row["prompt"], 6)
    base = nf4_base(tiny_model_dir)
    assert [row["base"] for row in answers.rows] == [generate(base, tokenizer, p, 6) for p in (PROMPT, "Hello")]
    assert answers.rows[0]["medical_v1"] != answers.rows[0]["base"]


def _prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPT}\n\nWhat is a tort?\n")
    return path


def test_cache_is_used_only_while_it_matches_the_manifest(published, tmp_path):
    _, registry = published
    cache = tmp_path / "cache"
    first = use.fetch(registry, "medical", "v1", cache)
    assert first.source == "registry" and first.path == cache / "medical" / "v1"
    assert use.fetch(registry, "medical", None, cache).source == "cache"

    weights = first.path / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit flipped
    refetched = use.fetch(registry, "medical", "v1", cache)
    assert refetched.source == "registry (cache did not match)"
    assert weights.read_bytes() == original
    (first.path / "notes.txt").write_text("not in the manifest")
    assert use.fetch(registry, "medical", "v1", cache).source == "registry (cache did not match)"
    assert not (first.path / "notes.txt").exists()
    assert sorted(p.name for p in (cache / "medical").iterdir()) == ["v1"]  # no stale or partial folders left


# ---------------------------------------------------------------------------------------------
# export --merge
# ---------------------------------------------------------------------------------------------


def test_export_merges_verifies_and_reports_the_cost(published, tiny_model_dir, adapters, s3_store, tmp_path):
    config, registry = published
    target = tmp_path / "exports" / "medical-merged"
    result = invoke("export", "medical@v1", "--merge", "--to", target, "--config", config,
                    "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "merged vs base + adapter unmerged (float32)" in result.output

    manifest = use.verify_export(target)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= manifest["files"].keys()
    assert not [name for name in manifest["files"] if name.endswith((".bin", ".pt", ".pth"))]
    assert manifest["base_model"] == {"id": TINY_ID, "revision": None,
                                      "weights_sha256": weights_sha256(tiny_model_dir)}
    stored = fsspec.filesystem("s3", **s3_store.storage_options()).cat_file(
        f"{registry.location('medical', 1).removeprefix('s3://')}/manifest.json")
    assert manifest["adapter"] | {"registry": None} == {
        "domain": "medical", "version": 1, "ref": "v1", "registry": None,
        "manifest_sha256": hashlib.sha256(stored).hexdigest()}
    costs = manifest["merge_costs"]
    merge_only, leaving_4bit = costs["merged_vs_unmerged"], costs["merged_vs_as_trained"]
    assert costs["dtype"] == "float32" and merge_only["max_abs"] < 1e-4 and merge_only["top1_agreement"] == 1.0
    # Leaving the 4-bit base costs far more than the merge itself.
    assert leaving_4bit["max_abs"] > 100 * merge_only["max_abs"] and costs["base_vs_4bit_base"]["max_abs"] > 0
    assert leaving_4bit["mean_abs"] <= leaving_4bit["max_abs"] and 0 <= leaving_4bit["top1_agreement"] <= 1
    assert str(tmp_path) not in (target / "config.json").read_text()
    assert [p.name for p in target.parent.iterdir()] == ["medical-merged"]  # the staging folder was renamed
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600

    # Independently: the saved merged model gives base + adapter's (unmerged) logits.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    merged = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    unmerged = load_with_adapter(plain_base(tiny_model_dir), adapters["medical"])
    with torch.no_grad():
        difference = max((a - b).abs().max().item()
                         for a, b in zip(probe_logits(merged, tokenizer), probe_logits(unmerged, tokenizer)))
    assert difference < 1e-4
    assert difference == pytest.approx(merge_only["max_abs"], abs=1e-5)

    (target / "config.json").write_text((target / "config.json").read_text() + " ")
    with pytest.raises(IntegrityError, match="config.json"):
        use.verify_export(target)


def test_export_of_a_plain_lora_has_no_4bit_comparison(published, adapters, tmp_path):
    """The manifest published with the adapter says how it was trained; without 4-bit there is nothing to leave."""
    config, registry = published
    folder = tmp_path / "plain-adapter"
    shutil.copytree(adapters["support"], folder)
    registry.publish("support", folder, metadata={"base_model": {"id": TINY_ID, "revision": None,
                                                                  "weights_sha256": None},
                                                   "quant": {"mode": "none"}})
    result = invoke("export", "support", "--merge", "--to", tmp_path / "out", "--config", config,
                    "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "n/a (trained without 4-bit)" in result.output
    costs = use.verify_export(tmp_path / "out")["merge_costs"]
    assert costs["trained_quant"]["mode"] == "none" and costs["trained_quant"]["from"] == "manifest"
    assert costs["merged_vs_as_trained"] is None and costs["merged_vs_unmerged"]["max_abs"] < 1e-4


def test_export_refuses_an_existing_target_and_leaves_it_alone(published, tmp_path):
    config, _ = published
    target = tmp_path / "exports" / "taken"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("mine")
    result = invoke("export", "medical@v1", "--merge", "--to", target, "--config", config,
                    "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 2, result.output
    assert "already exists" in result.output and "never overwrites" in result.output
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    assert [p.name for p in target.parent.iterdir()] == ["taken"]
    assert invoke("export", "medical@v1", "--to", tmp_path / "new", "--config", config).exit_code == 2  # no --merge


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2 with the reason
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "export"])
def test_adapter_for_another_base_is_refused(published, adapters, tmp_path, command):
    config, registry = published
    publish(registry, "support", adapters["support"],
            {"id": "HuggingFaceTB/SmolLM2-360M-Instruct", "revision": "abc123", "weights_sha256": "0" * 64})
    args = ["--prompt", PROMPT] if command == "generate" else ["--merge", "--to", tmp_path / "out"]
    result = invoke(command, "support", *args, "--config", config, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "HuggingFaceTB/SmolLM2-360M-Instruct" in output and TINY_ID in output and "model id differs" in output
    assert not (tmp_path / "out").exists()


def test_same_name_but_other_weights_is_refused(published, adapters, tmp_path):
    config, registry = published
    publish(registry, "support", adapters["support"], {"id": TINY_ID, "revision": None, "weights_sha256": "f" * 64})
    result = invoke("generate", "support@v1", "--prompt", PROMPT, "--config", config, "--cache-dir", tmp_path / "c")
    assert result.exit_code == 2, result.output
    assert "weights sha256 differs" in result.output and "ffffffffffff" in result.output


def test_unknown_version_alias_or_domain_exits_2(published, tmp_path):
    config, _ = published
    for ref, message in [("medical@v9", "no complete version v9"), ("medical@staging", "no alias 'staging'"),
                         ("finance", "no complete version yet")]:
        result = invoke("generate", ref, "--prompt", PROMPT, "--config", config, "--cache-dir", tmp_path / "c")
        assert result.exit_code == 2 and message in result.output, (ref, result.output)
    result = invoke("export", "medical@v9", "--merge", "--to", tmp_path / "out", "--config", config)
    assert result.exit_code == 2 and "no complete version v9" in result.output
    assert invoke("generate", "medical", "--config", config).exit_code == 2  # neither --prompt nor --prompts
    assert invoke("generate", "medical", "--prompts", tmp_path / "missing.txt", "--config", config).exit_code == 2
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert invoke("generate", "medical", "--prompts", tmp_path / "empty.txt", "--config", config).exit_code == 2

