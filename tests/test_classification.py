"""task: sequence_classification on a tiny BERT-like encoder: the three training methods' trainable counts, bad data
refused with its file and line, and a LoRA classifier through the real train and publish stages (Ray, S3)."""

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora.config import Config, ConfigError, LoraSettings, ModelSource, Quantization, load_config
from lora.model import dispatch_backend, load_base_model, load_tokenizer, prepare_trainable
from pipelines.cli import app
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Tiny BERT: hidden 32, 3 blocks of 4 heads, intermediate 64, 2 labels.
HIDDEN, LAYERS, INTERMEDIATE, POSITIONS, LABELS = 32, 3, 64, 64, ["rotten", "fresh"]
GOOD, BAD = ["great", "superb", "moving", "funny"], ["dull", "awful", "boring", "clumsy"]
FILLER = ["the", "film", "plot", "cast", "was", "quite", "and", "its", "story", "ending", "a", "very"]


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A random 3-block BERT with a word-level vocabulary of the test sentences, saved like a hub folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *GOOD, *BAD, *FILLER]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                        intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def reviews(n: int, seed: int) -> list[dict]:
    """Filler words around one sentiment word: fresh if it is a good word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = rng.choices(FILLER, k=6)
        words.insert(rng.randrange(7), rng.choice(GOOD if label == "fresh" else BAD))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def classifier_config(tmp_path, tiny_encoder_dir):
    """A config file for the tiny encoder over 64 train / 16 eval reviews; keyword overrides merged per section."""

    def write(**sections) -> Path:
        raw = {
            "task": "sequence_classification",
            "model": {"id": str(tiny_encoder_dir), "logical_id": "tests/tiny-bert"},
            "quant": {"mode": "none"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 8, "learning_rate": 0.02, "micro_batch_size": 8, "max_seq_len": 32,
                      "eval_every": 4, "checkpoint_every": 8, "warmup_steps": 0},
            "cluster": {"storage_url": str(tmp_path / "runs"), "output_dir": str(tmp_path / "output")},
            "domains": [{"name": "reviews", "labels": LABELS,
                         "train": str(write_jsonl(tmp_path / "data/train.jsonl", reviews(64, seed=1))),
                         "eval": str(write_jsonl(tmp_path / "data/eval.jsonl", reviews(16, seed=2))),
                         "intended_use": "tests", "limitations": "a tiny random encoder"}],
        }
        return write_config(tmp_path, raw, sections)

    return write


def trainable_after(tiny_encoder_dir: Path, lora: LoraSettings) -> int:
    source, quant = ModelSource(id=str(tiny_encoder_dir)), Quantization(mode="none")
    model = load_base_model(tiny_encoder_dir, source, quant, dispatch_backend(quant, use_gpu=False), LABELS, 0)
    model = prepare_trainable(model, lora, gradient_checkpointing=False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_trainable_parameters_of_the_three_methods(tiny_encoder_dir):
    h, i, r = HIDDEN, INTERMEDIATE, 4
    head = h * len(LABELS) + len(LABELS)  # classifier: weight + bias
    pooler = h * h + h
    # One BERT block: q, k, v, attention output (h x h + bias each), 2 LayerNorms (2h each), h -> i, i -> h.
    block = 4 * (h * h + h) + 2 * (2 * h) + (h * i + i) + (i * h + h)
    vocab = len((tiny_encoder_dir / "vocab.txt").read_text().split())
    embeddings = vocab * h + POSITIONS * h + 2 * h + 2 * h  # words, positions, 2 token types, LayerNorm
    # LoRA on every linear layer but the classifier (q, k, v, o: h -> h; h -> i; i -> h; the pooler's h -> h),
    # plus the whole classifier head (peft's modules_to_save).
    lora = LAYERS * (4 * r * (h + h) + r * (h + i) + r * (i + h)) + r * (h + h) + head

    assert trainable_after(tiny_encoder_dir, LoraSettings(r=r)) == lora == 5_698
    assert trainable_after(tiny_encoder_dir, LoraSettings(method="last_layers", last_layers=2)) == \
        2 * block + pooler + head == 18_210
    assert trainable_after(tiny_encoder_dir, LoraSettings(method="full")) == \
        embeddings + LAYERS * block + pooler + head


def test_a_classifier_trains_on_ray_and_publishes_with_its_audit(ray_cluster, classifier_config, s3_store,
                                                                 registry_url, tiny_encoder_dir, tmp_path):
    options = s3_store.storage_options()
    config = classifier_config(publish={"registry": registry_url, "storage_options": options, "audit_prompts": 2})
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    assert "accuracy base → trained" in result.output

    [run_dir] = (tmp_path / "output/reviews").iterdir()
    facts = json.loads((run_dir / "result.json").read_text())
    assert facts["steps"] == 8 and facts["trainable_params"] == 5_698
    assert facts["eval_loss"] < facts["base_eval_loss"]
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["step"] for h in history if "eval_accuracy" in h] == [0, 4, 8]
    assert facts["eval_accuracy"] == history[-1]["eval_accuracy"] and 0 <= facts["eval_accuracy"] <= 1
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["data"]["train"]["label_counts"] == {
        label: sum(r["label"] == label for r in reviews(64, seed=1)) for label in LABELS}

    from infra.registry import Registry

    registry = Registry(registry_url, options)
    pulled = registry.pull("reviews", "latest", tmp_path / "pulled")
    audit = json.loads((pulled / "audit.json").read_text())
    assert audit["base_model_and_modification"]["task"] == "sequence_classification"
    assert audit["validation"]["metrics"]["eval_accuracy"] == facts["eval_accuracy"]
    first_eval = reviews(16, seed=2)[:2]
    assert [(s["prompt"], s["expected"]) for s in audit["samples"]] == [(r["text"], r["label"]) for r in first_eval]
    assert all(s["adapter"] in LABELS and s["base"] in LABELS for s in audit["samples"])
    assert "text-classification" in (pulled / "README.md").read_text()
    report = (pulled / "audit.md").read_text()
    # One validation table, with the classifier's columns (no perplexity header left above it).
    assert report.count("| model | eval loss |") == 1 and "| model | eval loss | accuracy |\n|---|---|---|\n" in report
    assert registry.manifest("reviews", 1).metadata["metrics"]["eval_accuracy"] == facts["eval_accuracy"]

    # The published adapter (LoRA + the trained head) gives the run's eval accuracy when loaded with PEFT.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_encoder_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, pulled).eval()
    tokenizer = load_tokenizer(ModelSource(id=str(tiny_encoder_dir)), tiny_encoder_dir, chat=False)
    held_out = reviews(16, seed=2)
    inputs = tokenizer([r["text"] for r in held_out], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = model(**inputs).logits.argmax(-1).tolist()
    accuracy = sum(LABELS[p] == r["label"] for p, r in zip(predicted, held_out)) / len(held_out)
    assert accuracy == pytest.approx(facts["eval_accuracy"])


@pytest.mark.parametrize("line, message", [
    ({"text": "the film", "label": "meh"}, "eval.jsonl:3: `label` must be one of the domain's labels (rotten, fresh)"),
    ({"label": "fresh"}, "eval.jsonl:3: needs a non-empty string `text`"),
    ({"text": "  ", "label": "fresh"}, "eval.jsonl:3: needs a non-empty string `text`"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "eval.jsonl:3: needs a non-empty string `text`"),
], ids=["unknown-label", "missing-text", "blank-text", "chat-record"])
def test_bad_classification_data_exits_2_naming_file_and_line(classifier_config, tmp_path, line, message):
    config = classifier_config()
    eval_file = tmp_path / "data/eval.jsonl"
    rows = reviews(4, seed=3)
    write_jsonl(eval_file, [*rows[:2], line, *rows[2:]])
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "meh" not in result.output  # messages never echo a line's values
    assert not (tmp_path / "output").exists() and not (tmp_path / "runs").exists()


def test_task_rules_are_config_errors_with_their_paths(classifier_config):
    config = classifier_config()
    with pytest.raises(ConfigError) as caught:
        load_config(config, ["quant.mode=nf4", "domains.0.labels=null"])
    assert [p.split(":")[0] for p in caught.value.problems] == ["domains.0.labels", "quant.mode"]
    with pytest.raises(ConfigError, match="domains.0.labels: only for task sequence_classification"):
        load_config(config, ["task=causal_lm"])
    with pytest.raises(ConfigError, match="lora.method: full is for task sequence_classification"):
        load_config(REPO / "configs/default.yaml", ["lora.method=full", "quant.mode=none"])
    with pytest.raises(ConfigError, match="lora.method"):
        load_config(config, ["lora.method=adapters"])


@pytest.mark.parametrize("command", ["tune", "run"])
def test_weights_of_non_lora_methods_are_neither_swept_nor_published(classifier_config, tmp_path, command):
    config = classifier_config(publish={"registry": f"file://{tmp_path}/registry"})
    result = runner.invoke(app, [command, str(config), "lora.method=full"])
    assert result.exit_code == 2, result.output
    assert "lora.method" in result.output
    assert not (tmp_path / "output").exists() and not (tmp_path / "registry").exists()


def test_the_quality_bench_config_validates():
    cfg = load_config(REPO / "bench/quality/reviews.yaml")
    assert isinstance(cfg, Config) and cfg.task == "sequence_classification"
    assert cfg.domains[0].labels == ["rotten", "fresh"] and cfg.quant.mode == "none"
