"""The GPU path: 4-bit NF4 on CUDA with bf16 compute, and a one-GPU Ray Train run. Skipped without CUDA."""

import pytest
import torch
from typer.testing import CliRunner

from lora.config import LoraSettings, ModelSource, Quantization
from lora.model import apply_lora, dispatch_backend, load_base_model
from pipelines.cli import app
from tests.conftest import read_json

pytestmark = pytest.mark.gpu


def test_nf4_on_cuda_trains_in_bf16(tiny_model_dir):
    import bitsandbytes as bnb

    backend = dispatch_backend(Quantization(), use_gpu=True)
    assert backend.compute_dtype == torch.bfloat16 and backend.device.type == "cuda"
    model = load_base_model(tiny_model_dir, ModelSource(id=str(tiny_model_dir)), Quantization(), backend)
    model = apply_lora(model, LoraSettings(r=4), gradient_checkpointing=True, four_bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ids = torch.randint(0, 1000, (2, 32), device="cuda")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_one_gpu_ray_train_run(ray_cluster, tiny_config_file):
    config = tiny_config_file(domains=("legal",), cluster={"use_gpu": True})
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    [run_dir] = (config.parent / "output" / "legal").iterdir()
    facts, info = read_json(run_dir / "result.json"), read_json(run_dir / "run_info.json")
    assert info["hardware"]["use_gpu"] and info["compute_dtype"] == "bfloat16"
    assert info["hardware"]["device"].startswith("NVIDIA")
    assert facts["eval_loss"] < facts["base_eval_loss"]
