"""The train stage on a real local Ray cluster: 2-worker DDP, outputs file by file, resume, bad input."""


import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora.config import load_config
from lora.data import load_examples
from lora.model import load_tokenizer
from lora.train import Batching, Shard
from pipelines.cli import app
from tests.conftest import read_json

runner = CliRunner()


def tokens_in_steps(cfg, domain: str, model_dir, steps: int) -> int:
    """Real tokens that all ranks of ``cfg``'s run train on in its first ``steps`` steps, from the epoch plans."""
    tokenizer = load_tokenizer(cfg.model, model_dir)
    examples, _ = load_examples(cfg.domain(domain).train, {}, tokenizer, cfg.train.max_seq_len, cfg.train.overlong)
    batching, total = Batching.of(cfg.train), 0
    for rank in range(cfg.cluster.workers_per_domain):
        shard, epoch, index = Shard(examples, [], rank, cfg.cluster.workers_per_domain), 0, 0
        for _ in range(steps * cfg.train.grad_accum):
            if index >= shard.batches_per_epoch(batching, epoch):
                epoch, index = epoch + 1, 0
            total += sum(len(e.input_ids) for row in shard.micro_batch(epoch, index, batching) for e in row)
            index += 1
    return total


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_two_worker_run_writes_a_loadable_adapter_learns_and_a_rerun_resumes(ray_cluster, tiny_config_file,
                                                                            tiny_model_dir):
    # Packed micro batches (train.batch_tokens), dealt out to the two DDP ranks.
    config = tiny_config_file(domains=("legal", "support"), cluster={"workers_per_domain": 2},
                              train={"batch_tokens": 512})
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    assert "loramill train" in result.output

    for domain in ("legal", "support"):
        [run_dir] = (config.parent / "output" / domain).iterdir()
        files = sorted(p.name for p in run_dir.iterdir())
        assert files == ["adapter", "history.json", "result.json", "run_info.json"]
        assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == [
            "README.md", "adapter_config.json", "adapter_model.safetensors"]
        adapter_config = read_json(run_dir / "adapter/adapter_config.json")
        assert adapter_config["base_model_name_or_path"] == "tests/tiny-llama"
        assert adapter_config["r"] == 4
        weights = load_file(run_dir / "adapter/adapter_model.safetensors")
        assert len(weights) == 2 * 7 * 2  # A and B for 7 linear layers in each of 2 blocks

        facts = read_json(run_dir / "result.json")
        info = read_json(run_dir / "run_info.json")
        assert info["hardware"]["workers"] == 2
        assert facts["steps"] == 4 and facts["eval_loss"] < facts["base_eval_loss"]
        assert facts["tokens_per_second"] > 0
        assert info["batching"].startswith("packed: 1 row(s) of 512 tokens")
        assert info["data"]["train"]["examples_kept"] == 32 and len(info["data"]["train"]["sha256"]) == 64
        history = read_json(run_dir / "history.json")
        assert [h["step"] for h in history if "eval_loss" in h] == [0, 2, 4]
        # The rate counts both ranks' tokens (a rank's share of a step is not half of it).
        trained = history[-1]["tokens_per_second"] * history[-1]["train_seconds"]
        assert trained == pytest.approx(tokens_in_steps(load_config(config), domain, tiny_model_dir, steps=4))

    # The adapter loads as PEFT expects, onto the base named by a local path.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, run_dir / "adapter")

    # The same config again (support's run) resumes instead of restarting: restored at step 4 of 4, no step is
    # trained again.
    first = read_json(run_dir / "history.json")
    second_run = invoke("train", config, "--domain", "support")
    assert second_run.exit_code == 0, second_run.output
    assert read_json(run_dir / "history.json") == first
    checkpoints = sorted(p.name for p in (config.parent / "runs" / run_dir.name).glob("checkpoint_2*"))
    assert len(checkpoints) == 2  # num_to_keep=2 of the 2 written (steps 2 and 4)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / "legal/train.jsonl").unlink(), "legal/train.jsonl: data file not found"),
        (lambda d: (d / "legal/eval.jsonl").write_text('{"messages": [}\n'), "legal/eval.jsonl:1: malformed JSON"),
        (lambda d: (d / "legal/train.jsonl").write_text(""), "empty dataset"),
    ],
    ids=["missing", "malformed", "empty"],
)
def test_bad_data_exits_2_before_anything_is_written(tiny_config_file, small_data, mutate, message):
    config = tiny_config_file(domains=("medical", "legal"))
    mutate(small_data)
    result = invoke("train", config)
    assert result.exit_code == 2
    assert message in result.output
    assert not (config.parent / "output").exists() and not (config.parent / "runs").exists()


def test_unknown_domain_and_missing_gpu_exit_2(ray_cluster, tiny_config_file):
    config = tiny_config_file(domains=("medical",))
    result = invoke("train", config, "--domain", "finance")
    assert result.exit_code == 2 and "no domain named 'finance'" in result.output
    result = invoke("train", config, "cluster.use_gpu=true")
    assert result.exit_code == 2 and "set cluster.use_gpu=false" in result.output
    assert not (config.parent / "output").exists()
