"""The GPU path: 4-bit NF4 on CUDA with bf16 compute, and a one-GPU Ray Train run. Skipped without CUDA."""

import pytest
import torch
from typer.testing import CliRunner

from lora.config import LoraSettings, ModelSource, Quantization
from lora.data import TokenizedExample, collate_packed
from lora.fast import compile_decoder_layers, offload_checkpointed_inputs, use_fused_kernels, use_packed_attention
from lora.model import apply_lora, dispatch_backend, load_base_model
from lora.train import evaluate
from pipelines.cli import app
from tests.conftest import read_json

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def transformers_llama_module_restored():
    """Liger's kernels replace classes and functions in transformers' Llama module for the whole process (its MLP,
    RMSNorm and RoPE, for models built later): put them back after each test, so that a test's models are
    transformers' own whatever ran before it in this process."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    vars(modeling_llama).update(saved)


def test_nf4_on_cuda_trains_in_bf16(tiny_model_dir):
    import bitsandbytes as bnb

    backend = dispatch_backend(Quantization(), use_gpu=True)
    assert backend.compute_dtype == torch.bfloat16 and backend.device.type == "cuda"
    model = load_base_model(tiny_model_dir, ModelSource(id=str(tiny_model_dir)), Quantization(), backend)
    model = apply_lora(model, LoraSettings(r=4), gradient_checkpointing=True)
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
    # No train.batch_tokens in the config: the budget is the GPU default, and the line under the table says so.
    assert info["batching"].startswith("packed: ") and "the GPU default" in info["batching"]
    # The GPU defaults: Liger's fused loss, each block compiled, flex attention over packed rows (tests/test_fast.py,
    # tests/test_packing.py: none of them on CPU)
    assert info["kernels"].endswith("(fused loss only); torch.compile of 2 blocks (their 14 4-bit layers dequantized "
                                    "by loramill's Triton kernel); attention: flex_attention (one packed row a micro "
                                    "batch, its block mask keeping examples apart)"), info["kernels"]
    shown = " ".join(result.output.split())  # the caption wraps at the table's width
    assert "legal batching: packed: " in shown and "train.micro_batch_size is not used" in shown


GROUPED = "4 groups of projections reading one input, one matmul each"
"""What the compiled blocks of a bf16 base add to ``kernels``: q/k/v and gate/up of both blocks (lora/grouped.py)."""


def _loss_and_lora_grads(model_dir, fused: bool, compiled: bool = False, offloaded: bool = False,
                         four_bit: bool = False, dequantization: str = "triton", packed_attention: str | None = None,
                         ) -> tuple[str, torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss and LoRA gradients: on two rows of 64 random tokens, or with ``packed_attention``
    on one packed row of examples of several lengths in that attention."""
    quant = Quantization(mode="nf4" if four_bit else "none")
    backend = dispatch_backend(quant, use_gpu=True)
    model = load_base_model(model_dir, ModelSource(id=str(model_dir)), quant, backend)
    kernels = use_fused_kernels(model, backend) if fused else "none"
    torch.manual_seed(0)
    model = apply_lora(model, LoraSettings(r=4, dropout=0.0), gradient_checkpointing=True)
    if compiled:
        kernels = compile_decoder_layers(model, backend, dequantization)
    if offloaded:
        kernels = offload_checkpointed_inputs(model, backend)
    if packed_attention:  # after compiling, as the worker chooses it
        kernels += "; " + use_packed_attention(model, packed_attention, backend, packed=True, world_size=1)[1]
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0, which would leave every A gradient 0: compare non-trivial ones
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator(p.device).manual_seed(len(name)))
    model.train()
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    labels = ids.clone()
    labels[:, :10] = -100  # prompt tokens: ignored, as assistant-only loss does
    batch = {"input_ids": ids, "labels": labels}
    if packed_attention:
        examples = [TokenizedExample(ids[0, :n].tolist(), [-100] * 10 + ids[0, 10:n].tolist()) for n in (64, 23, 50)]
        batch = {k: v.cuda() for k, v in collate_packed([examples], 0, width=160).items()}  # 23 tokens padding
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return kernels, loss.detach().float(), grads


def test_fused_kernels_match_the_plain_modules(tiny_model_dir):
    plain_kernels, plain_loss, plain_grads = _loss_and_lora_grads(tiny_model_dir, fused=False)
    kernels, loss, grads = _loss_and_lora_grads(tiny_model_dir, fused=True)  # last: Liger patches modules globally
    assert plain_kernels == "none" and kernels.startswith("liger ")
    assert torch.allclose(loss, plain_loss, rtol=1e-2), (loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name, grad in grads.items():
        error = (grad - plain_grads[name]).norm() / plain_grads[name].norm()
        assert error < 0.05, f"{name}: relative gradient difference {error:.3f} (bf16 compute)"


def test_compiled_blocks_and_offloaded_checkpoints_match_the_eager_step(tiny_model_dir):
    _, eager_loss, eager_grads = _loss_and_lora_grads(tiny_model_dir, fused=False)
    for route in ("compiled", "offloaded"):
        kernels, loss, grads = _loss_and_lora_grads(tiny_model_dir, fused=False, **{route: True})
        assert kernels in (f"torch.compile of 2 blocks ({GROUPED})",
                           "inputs of 2 checkpointed blocks in host memory"), kernels
        assert torch.allclose(loss, eager_loss, rtol=1e-2), (route, loss, eager_loss)
        assert grads.keys() == eager_grads.keys()
        for name, grad in grads.items():
            error = (grad - eager_grads[name]).norm() / eager_grads[name].norm()
            assert error < 0.05, f"{route} {name}: relative gradient difference {error:.3f} (bf16 compute)"


def test_flex_attention_on_a_packed_row_trains_as_sdpa_does(tiny_model_dir):
    """The packed attention a GPU run takes (``train.attention: auto``), in compiled blocks, has the loss and
    gradients of SDPA's dense mask on the same row: its block mask keeps each example to itself in the backward
    pass too (no CPU test can: flex attention has no backward pass there)."""
    _, sdpa_loss, sdpa_grads = _loss_and_lora_grads(tiny_model_dir, fused=False, compiled=True,
                                                    packed_attention="sdpa")
    kernels, loss, grads = _loss_and_lora_grads(tiny_model_dir, fused=False, compiled=True,
                                                packed_attention="flex_attention")
    assert kernels == f"torch.compile of 2 blocks ({GROUPED}); attention: flex_attention (train.attention)", kernels
    assert torch.allclose(loss, sdpa_loss, rtol=1e-2), (loss, sdpa_loss)
    assert grads.keys() == sdpa_grads.keys()
    for name, grad in grads.items():
        error = (grad - sdpa_grads[name]).norm() / sdpa_grads[name].norm()
        assert error < 0.05, f"{name}: relative gradient difference {error:.3f} (bf16 compute)"


@pytest.mark.parametrize("double_quant", [True, False])
def test_loramill_nf4_kernel_and_torch_ops_dequantize_as_bitsandbytes_does_bit_for_bit(double_quant):
    """lora/nf4_kernel.py and lora/nf4.py's torch ops against bitsandbytes' CUDA kernels, with and without double
    quantization, on shapes whose element count is not a multiple of the block size nor of 256 blocks (the absmaxes'
    outer blocks), of a Llama projection, and in both compute dtypes."""
    import bitsandbytes as bnb
    from bitsandbytes import functional as bnb_functional

    from lora.nf4 import TorchOpsLinear4bit, TritonKernelLinear4bit

    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in ((200, 320), (130, 70), (3, 7), (2048, 8192)):
        weight = 3 * torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
        packed = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                   compress_statistics=double_quant).to("cuda")  # quantized on the move
        state = packed.quant_state
        assert state.nested == double_quant
        for dtype in (torch.bfloat16, torch.float32):
            expected = bnb_functional.dequantize_4bit(packed.data, state).to(dtype)
            for route in (TritonKernelLinear4bit, TorchOpsLinear4bit):
                assert torch.equal(route.dequantize(packed.data, state, dtype), expected), (route, packed.shape, dtype)
        assert not torch.equal(expected.to(torch.bfloat16), weight.cuda())  # 4 bits lost something
    # Launched from a compiled graph (which may compile the kernel again, with its own options), the same bits
    torch._dynamo.reset()
    in_graph = torch.compile(lambda codes: TritonKernelLinear4bit.dequantize(codes, state, torch.bfloat16),
                             fullgraph=True)
    assert torch.equal(in_graph(packed.data), bnb_functional.dequantize_4bit(packed.data, state).to(torch.bfloat16))


def test_compiled_4bit_blocks_train_as_bitsandbytes_does(tiny_model_dir):
    """The compiled blocks' 4-bit layers through loramill's kernel and through the torch ops (lora/nf4.py): the
    step's loss and LoRA gradients those of bitsandbytes' own op in the same graph and of the eager step."""
    _, eager_loss, eager_grads = _loss_and_lora_grads(tiny_model_dir, fused=False, four_bit=True)
    runs = {route: _loss_and_lora_grads(tiny_model_dir, fused=False, compiled=True, four_bit=True,
                                        dequantization=route) for route in ("triton", "torch", "bitsandbytes")}
    layers = "torch.compile of 2 blocks (their 14 4-bit layers dequantized by "
    assert runs["triton"][0] == layers + "loramill's Triton kernel)"
    assert runs["torch"][0] == layers + "torch ops)"
    assert runs["bitsandbytes"][0] == "torch.compile of 2 blocks"
    for _, loss, grads in runs.values():
        assert torch.allclose(loss, eager_loss, rtol=1e-2), (loss, eager_loss)
        for name, grad in grads.items():
            error = (grad - eager_grads[name]).norm() / eager_grads[name].norm()
            assert error < 0.05, f"{name}: relative gradient difference {error:.3f} (bf16 compute)"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_ddp_run_evaluates_the_set_one_gpu_does(ray_cluster, tiny_config_file):
    """DDP on two GPUs with accumulation (no_sync on the first micro batch of each step): the base's eval loss at
    step 0 equals the one-GPU run's (the capped set is split across ranks, not capped per rank), and it trains."""
    config = tiny_config_file(domains=("medical",), cluster={"use_gpu": True}, train={
        "max_steps": 4, "grad_accum": 2, "max_eval_examples": 5, "eval_every": 2, "checkpoint_every": 4})
    histories = {}
    for workers in (1, 2):
        output = config.parent / f"output-{workers}"
        result = CliRunner().invoke(app, ["train", str(config), f"cluster.workers_per_domain={workers}",
                                          f"cluster.output_dir={output}"])
        assert result.exit_code == 0, result.output
        [run_dir] = (output / "medical").iterdir()
        histories[workers] = read_json(run_dir / "history.json")
        assert read_json(run_dir / "run_info.json")["hardware"]["workers"] == workers
    assert histories[1][0]["eval_loss"] == pytest.approx(histories[2][0]["eval_loss"], rel=1e-3)  # bf16 compute
    assert histories[2][-1]["eval_loss"] < histories[2][0]["eval_loss"]


def test_evaluation_with_the_fused_loss_never_makes_the_logits(tiny_model_dir):
    """Held-out loss on CUDA goes through Liger's fused loss in eval mode too: the same loss as the plain modules',
    and the evaluation's memory stays far below the logits' size (8 x 512 tokens x 49k vocabulary: 0.4 GiB in bf16,
    before the plain loss's float32 copy)."""
    quant = Quantization(mode="none")
    backend = dispatch_backend(quant, use_gpu=True)
    ids = torch.randint(0, 1000, (8, 512), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [TokenizedExample(input_ids=row, labels=row) for row in ids]

    def evaluation(fused: bool) -> tuple[float, int, int]:
        model = load_base_model(tiny_model_dir, ModelSource(id=str(tiny_model_dir)), quant, backend)
        if fused:
            assert use_fused_kernels(model, backend, block_kernels=False).startswith("liger ")
        model = apply_lora(model, LoraSettings(r=4), gradient_checkpointing=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = evaluate(model, examples, 8, 0, backend.device)["eval_loss"]
        return loss, torch.cuda.max_memory_allocated() - before, model.config.vocab_size

    plain_loss, plain_peak, vocab = evaluation(fused=False)  # first: Liger patches modules globally
    fused_loss, fused_peak, _ = evaluation(fused=True)
    logits_bytes = 8 * 512 * vocab * 2
    assert plain_peak > logits_bytes  # what the plain loss costs: the check below can fail
    assert fused_peak < logits_bytes / 8, (fused_peak, logits_bytes)
    assert abs(fused_loss - plain_loss) < 1e-2 * plain_loss, (fused_loss, plain_loss)
