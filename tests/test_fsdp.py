"""``train.strategy: fsdp`` on the real local Ray (2 CPU workers, gloo): FSDP2 shards the base across the workers.

An FSDP run with a worker SIGKILLed after a checkpoint restarts from it (gathered LoRA tensors and optimizer state)
and ends as a DDP run of the same config does: the same losses step by step and the same adapter, written in the
same form. The DDP run's first evaluation is the one-worker evaluation. Config rules need no Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora.config import ConfigError, load_config
from pipelines.cli import app
from tests.conftest import read_json
from tests.test_reliability import WorkerKiller, uninterrupted_reports

runner = CliRunner()

STEPS, EVERY = 8, 4
"""grad_accum 3 with 8 steps: an accumulation of three micro batches (two without gradient sync), and a checkpoint
interval of 4 steps that outlasts the 2 s in which Ray Train's controller registers a checkpoint (WorkerKiller)."""


def _config(tiny_config_file, tmp_path: Path, name: str, strategy: str) -> Path:
    """Two workers, a 32-bit base (quant none: the CPU's float32, as DDP has it), micro batches of 2 examples; 5
    held-out examples, 3 + 2 on the ranks: rank 0 evaluates two micro batches, rank 1 one, which a sharded model
    must run in lockstep."""
    return tiny_config_file(
        domains=("support",),
        quant={"mode": "none"},
        train={"strategy": strategy, "max_steps": STEPS, "checkpoint_every": EVERY, "eval_every": EVERY,
               "grad_accum": 3, "micro_batch_size": 2, "max_eval_examples": 5, "learning_rate": 0.01},
        cluster={"workers_per_domain": 2, "max_failures": 2, "storage_url": str(tmp_path / f"runs-{name}"),
                 "output_dir": str(tmp_path / f"output-{name}")},
    )


def _train(config: Path) -> Path:
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    [run_dir] = (Path(load_config(config).cluster.output_dir) / "support").iterdir()
    return run_dir


def _run_dir(config: Path) -> Path:
    from pipelines.run_folder import data_fingerprint, run_name

    cfg = load_config(config)
    return Path(cfg.cluster.storage_url) / run_name(cfg, cfg.domains[0], data_fingerprint(cfg.domains[0]))


def test_fsdp_resumed_after_a_worker_is_killed_matches_ddp(ray_cluster, tiny_config_file, tmp_path):
    ddp = _train(_config(tiny_config_file, tmp_path, "ddp", "ddp"))

    # One worker SIGKILLed once the checkpoint at step 4 is registered: Ray Train restarts both, they load their
    # shards of the gathered LoRA tensors and optimizer state, and finish as an uninterrupted run would.
    config = _config(tiny_config_file, tmp_path, "fsdp", "fsdp")
    run_dir = _run_dir(config)
    killer = WorkerKiller(run_dir, after_step=EVERY)
    killer.start()
    fsdp = _train(config)
    killer.join(timeout=5)
    assert killer.error is None and killer.killed_pid is not None, killer.error
    assert killer.registered_at_kill == EVERY
    [final] = [p for p in run_dir.glob("checkpoint_*") if p.is_dir() and read_json(p / "history.json")[-1]["step"] == STEPS]
    assert torch.load(final / "trainer_state.pt", weights_only=True)["state"]["resumed_from_step"] == [EVERY]

    # The same losses, step by step: the same micro batches, their gradients averaged over the ranks either way.
    ddp_history, fsdp_history = read_json(ddp / "history.json"), read_json(fsdp / "history.json")
    assert [h["step"] for h in fsdp_history] == list(range(STEPS + 1))  # every step once: none lost, none doubled
    assert [h["step"] for h in fsdp_history if "eval_loss" in h] == [0, EVERY, STEPS]
    for key in ("train_loss", "eval_loss"):
        ddp_losses = [h.get(key) for h in ddp_history]
        fsdp_losses = [h.get(key) for h in fsdp_history]
        assert [loss is None for loss in fsdp_losses] == [loss is None for loss in ddp_losses]
        assert [x for x in fsdp_losses if x is not None] == pytest.approx(
            [x for x in ddp_losses if x is not None], rel=1e-4)
    assert fsdp_history[-1]["eval_loss"] < fsdp_history[0]["eval_loss"]
    # Tokens are counted over both ranks, as under DDP.
    assert (fsdp_history[-1]["tokens_per_second"] * fsdp_history[-1]["train_seconds"]
            == pytest.approx(ddp_history[-1]["tokens_per_second"] * ddp_history[-1]["train_seconds"]))

    # The adapter folder is the same in form (PEFT's names, full tensors gathered from the shards) and in values.
    assert sorted(p.name for p in (fsdp / "adapter").iterdir()) == sorted(p.name for p in (ddp / "adapter").iterdir())
    ddp_config, fsdp_config = read_json(ddp / "adapter/adapter_config.json"), read_json(fsdp / "adapter/adapter_config.json")
    # peft writes target_modules from a set: in each process's string-hash order
    assert sorted(fsdp_config.pop("target_modules")) == sorted(ddp_config.pop("target_modules"))
    assert fsdp_config == ddp_config
    ddp_weights = load_file(ddp / "adapter/adapter_model.safetensors")
    fsdp_weights = load_file(fsdp / "adapter/adapter_model.safetensors")
    assert sorted(fsdp_weights) == sorted(ddp_weights) and len(fsdp_weights) == 2 * 7 * 2
    for name, tensor in ddp_weights.items():
        assert fsdp_weights[name].shape == tensor.shape
        torch.testing.assert_close(fsdp_weights[name], tensor, rtol=1e-4, atol=1e-6)
    assert read_json(fsdp / "run_info.json")["hardware"]["workers"] == 2

    # max_eval_examples caps the held-out set before the ranks split it (5 examples: 3 + 2 on two workers), so the
    # base's eval loss is the one a single worker measures on all 5.
    one_worker = uninterrupted_reports(_config(tiny_config_file, tmp_path, "ddp", "ddp"))
    [one_worker_base] = [r["eval_loss"] for r in one_worker if r["step"] == 0]
    assert ddp_history[0]["eval_loss"] == pytest.approx(one_worker_base, rel=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=sequence_classification", "quant.mode=none", "domains.0.labels=[a,b]"],
         "train.strategy: fsdp shards LoRA training of causal LMs"),
        (["quant.mode=none", "lora.init=pissa"], "lora.init: pissa converts the adapter"),
        (["quant.mode=nf4"], "quant.mode: nf4 with train.strategy=fsdp: .* set quant.mode=none"),
    ],
    ids=["classifier", "pissa", "4-bit"],
)
def test_fsdp_refuses_what_it_cannot_shard(tiny_config_file, overrides, message):
    config = tiny_config_file(train={"strategy": "fsdp"})
    with pytest.raises(ConfigError, match=message):
        load_config(config, overrides)
