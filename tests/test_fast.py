"""The fast path's parts that run everywhere: kernels fall back on CPU, and length-grouped batching (less padding,
same examples). The CUDA side (Liger kernels, compiled blocks and offloaded checkpoints against the plain step) is in
tests/test_gpu.py."""

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint

import lora.fast
from lora.config import LoraSettings, ModelSource, Quantization, load_config
from lora.data import TokenizedExample, load_examples
from lora.fast import (compile_blocks, compile_decoder_layers, offload_checkpointed_inputs, transformer_blocks,
                       use_fused_kernels)
from lora.model import apply_lora, dispatch_backend, load_base_model, load_tokenizer, resolve_model_dir
from lora.nf4 import dequantize_nf4, linear_4bit_as_torch_ops
from lora.config import Training
from lora.train import Batching, Shard, TrainState, adapter_autocast, adapter_inputs_uncast, build_optimizer, train
from pipelines import train_worker

REPO = Path(__file__).resolve().parents[1]


def test_fused_kernels_fall_back_on_cpu_and_leave_the_model_as_it_was(tiny_model_dir):
    backend = dispatch_backend(Quantization(mode="none"), use_gpu=False)
    model = load_base_model(tiny_model_dir, ModelSource(id=str(tiny_model_dir)), Quantization(mode="none"), backend)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids, labels=ids).loss

    assert use_fused_kernels(model, backend) == "none: Triton kernels need CUDA"
    model = apply_lora(model, LoraSettings(r=4), gradient_checkpointing=True)
    assert compile_decoder_layers(model, backend) == "none: compiled blocks are for CUDA"
    assert offload_checkpointed_inputs(model, backend) == "none: nothing to offload on CPU"
    with model.disable_adapter():
        assert torch.equal(model(input_ids=ids, labels=ids).loss, before)


def test_a_checkpointed_blocks_input_goes_to_the_host_and_nothing_inside_it_does(monkeypatch):
    """The mechanism behind train.offload_checkpoints, on CPU (the option itself only acts on CUDA, where the copies
    run on a side stream: tests/test_gpu.py): non-reentrant checkpointing saves the block's input through the hooks
    around it, and the block's own saved tensors stay with checkpointing's recomputation. Each input is unpacked
    once, the last saved first, and the gradients are unchanged."""
    on_host = lora.fast.HostCheckpoints()
    moved, unpacked = [], []
    pack, unpack = on_host.pack, on_host.unpack
    monkeypatch.setattr(on_host, "pack", lambda tensor: moved.append(tuple(tensor.shape)) or pack(tensor))
    monkeypatch.setattr(on_host, "unpack", lambda saved: unpacked.append(tuple(saved.host.shape)) or unpack(saved))
    blocks = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6)),
              torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.SiLU(), torch.nn.Linear(12, 5))]
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    checkpoint = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def gradients(run) -> list[torch.Tensor]:
        x.grad = None
        for p in (p for block in blocks for p in block.parameters()):
            p.grad = None
        run(blocks[1], run(blocks[0], x) * 2).pow(2).sum().backward()
        return [x.grad.clone(), *(p.grad.clone() for block in blocks for p in block.parameters())]

    plain = gradients(checkpoint)
    assert moved == []
    offloaded = gradients(partial(lora.fast._with_inputs_on_host, on_host, checkpoint))
    assert moved == [(4, 8), (4, 6)]  # each block's input; weights and activations inside the blocks stay
    assert unpacked == [(4, 6), (4, 8)]
    assert all(torch.equal(a, b) for a, b in zip(plain, offloaded, strict=True))


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_4bit_weight_dequantized_by_torch_ops_is_bitsandbytes_bit_for_bit(double_quant):
    """lora/nf4.py's arithmetic (what the compiled blocks fuse on CUDA) against bitsandbytes' own dequantization, on
    shapes whose element count is not a multiple of the block size nor of 256 blocks (the absmaxes' outer blocks)."""
    import bitsandbytes as bnb
    from bitsandbytes import functional as bnb_functional

    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in ((200, 320), (130, 70)):
        weight = 3 * torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
        packed = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                   compress_statistics=double_quant).to("cpu")  # quantized on the move
        state = packed.quant_state
        assert state.nested == double_quant
        expected = bnb_functional.dequantize_4bit(packed.data, state)
        assert torch.equal(dequantize_nf4(packed.data, state, torch.bfloat16), expected)
        assert torch.equal(dequantize_nf4(packed.data, state, torch.float32), expected.float())  # rounded as bnb does
        assert not torch.equal(expected, weight)  # 4 bits lost something: the check compares dequantizations


def test_a_tune_actor_keeps_its_blocks_compiled_trial_after_trial(tiny_model_dir):
    """A Tune actor trains trial after trial on one base in its process (``reuse_actors``, the base given back by
    pipelines/train_worker.py), each trial through compiled blocks. Every LoRA rank compiles the blocks' forward
    anew, on top of what a run's training and evaluations compile: with torch's default limit of 8 variants the
    third rank's calls ran uncompiled (9 frames, 8 compiled). Every frame must be compiled through four ranks."""
    backend = dispatch_backend(Quantization(mode="none"), use_gpu=False)
    base = load_base_model(tiny_model_dir, ModelSource(id=str(tiny_model_dir)), Quantization(mode="none"), backend)
    generator = torch.Generator().manual_seed(0)
    examples = [TokenizedExample(input_ids=(ids := torch.randint(0, 1000, (int(n),), generator=generator).tolist()),
                                 labels=ids) for n in torch.randint(10, 60, (24,), generator=generator)]
    cfg = Training(max_steps=2, learning_rate=1e-3, lr_schedule="constant", max_seq_len=64, batch_tokens=128,
                   gradient_checkpointing=True, eval_every=1, checkpoint_every=10**6, group_by_length=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for r in (4, 8, 16, 32):
        model = apply_lora(base, LoraSettings(r=r, alpha=2 * r, dropout=0.0, target_modules="all-linear"), True)
        compile_blocks(transformer_blocks(model), backend="aot_eager")
        optimizer, scheduler = build_optimizer(model, cfg, cfg.max_steps)
        train(model, optimizer, scheduler, Shard(examples[:20], examples[20:], rank=0, world_size=1), cfg,
              TrainState(), lambda *a: None, pad_id=0, device=backend.device)
        train_worker._give_back_base_model(("tune actor",), model)
        base = train_worker._idle_base_models.pop(("tune actor",))
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["total"] > 8 and frames["ok"] == frames["total"]


def _tiny_lora_step(model_dir: Path, quantization: Quantization, settings: LoraSettings):
    """The tiny Llama with a LoRA adapter whose B matrices are drawn at random (B starts at zero, which would leave
    every A without a gradient), and a function giving its loss and LoRA gradients on one fixed batch."""
    backend = dispatch_backend(quantization, use_gpu=False)
    model = load_base_model(model_dir, ModelSource(id=str(model_dir)), quantization, backend)
    model = apply_lora(model, settings, gradient_checkpointing=True)
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))

    def loss_and_gradients() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    return model, loss_and_gradients


def _assert_blocks_compile_to_one_graph_with_the_same_results(blocks, loss_and_gradients, loss, grads, atol):
    """torch.compile traces all blocks as one graph (dynamo guards on each layer's class, so one class per original
    class), checked on CPU without a compiler through the ``aot_eager`` backend, with the eager loss and gradients."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for block in blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    compiled_loss, compiled_grads = loss_and_gradients()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.allclose(compiled_loss, loss, rtol=1e-5)
    for grad, eager_grad in zip(compiled_grads, grads, strict=True):
        assert torch.allclose(grad, eager_grad, rtol=1e-3, atol=atol)


def test_4bit_layers_as_torch_ops_give_bitsandbytes_loss_and_gradients_in_one_graph_for_all_blocks(tiny_model_dir):
    """A 4-bit LoRA model whose blocks' 4-bit layers compute through torch ops: the same loss and LoRA gradients as
    bitsandbytes' op (float tolerance: bitsandbytes' backward rounds the weight to its stored dtype first), the
    layers still ``Linear4bit``s; torch.compile traces both blocks as one graph (dynamo guards on each layer's class,
    one class per original class), which CPU checks without a compiler through the ``aot_eager`` backend."""
    import bitsandbytes as bnb

    model, loss_and_gradients = _tiny_lora_step(tiny_model_dir, Quantization(), LoraSettings(r=4, dropout=0.0))
    bnb_loss, bnb_grads = loss_and_gradients()
    blocks = lora.fast.transformer_blocks(model)
    layers = [m for block in blocks for m in block.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 projections, 2 blocks
    for layer in layers:
        assert linear_4bit_as_torch_ops(layer, "torch") == "torch ops"
    assert all(isinstance(layer, bnb.nn.Linear4bit) for layer in layers)
    assert len({type(layer) for layer in layers}) == 1
    loss, grads = loss_and_gradients()
    assert torch.allclose(loss, bnb_loss, rtol=1e-5)
    for grad, bnb_grad in zip(grads, bnb_grads, strict=True):
        assert torch.allclose(grad, bnb_grad, rtol=1e-3, atol=1e-6)

    _assert_blocks_compile_to_one_graph_with_the_same_results(blocks, loss_and_gradients, loss, grads, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_compiled_4bit_layer_keeps_no_dequantized_weight_for_its_backward(device):
    """What a compiled block's graph saves for the backward pass of a 4-bit layer through torch ops (CPU) or
    loramill's Triton kernel (CUDA): the 4-bit codes with their scales, never the dequantized bf16 weight (4 x the
    codes' size; inductor's partitioner would keep it, as the backward's matmul needs it, were the dequantization
    not checkpointed)."""
    import bitsandbytes as bnb
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def forward_compiler(graph, _inputs):
        [output] = [node for node in graph.graph.nodes if node.op == "output"]
        saved.extend((tuple(n.meta["val"].shape), n.meta["val"].dtype) for n in output.args[0][1:])
        return make_boxed_func(graph.forward)

    layer = bnb.nn.Linear4bit(512, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
    route = linear_4bit_as_torch_ops(layer, "triton" if device == "cuda" else "torch")
    assert route == ("loramill's Triton kernel" if device == "cuda" else "torch ops")
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=aot_autograd(
        fw_compiler=forward_compiler, bw_compiler=lambda graph, _inputs: make_boxed_func(graph.forward),
        partition_fn=min_cut_rematerialization_partition))  # inductor's partitioner
    x = torch.randn(4, 512, dtype=torch.bfloat16, device=device, requires_grad=True)
    compiled(x).float().sum().backward()
    assert x.grad is not None and saved
    assert (1024, 512) not in [shape for shape, _ in saved]
    assert max(math.prod(shape) * dtype.itemsize for shape, dtype in saved) <= 512 * 1024 // 2  # the codes


@pytest.mark.parametrize("alpha", [8, 12])  # a scale of 2 (exact in any precision) and of 3
def test_lora_scaled_in_rank_gives_peft_loss_and_gradients_in_one_graph_for_all_blocks(tiny_model_dir, alpha):
    """The compiled blocks' LoRA layers compute ``B(A(x) * scaling)``: the loss and every LoRA gradient equal peft's
    ``B(A(x)) * scaling`` (float tolerance), the layers are still peft's, and both blocks trace as one graph."""
    from peft.tuners.lora import LoraLayer

    model, loss_and_gradients = _tiny_lora_step(tiny_model_dir, Quantization(mode="none"),
                                                LoraSettings(r=4, alpha=alpha, dropout=0.0))
    peft_loss, peft_grads = loss_and_gradients()
    blocks = lora.fast.transformer_blocks(model)
    layers = [m for block in blocks for m in block.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14
    for layer in layers:
        lora.fast.scale_lora_in_rank(layer)
    assert all(isinstance(layer, lora.fast.LoraScaledInRank) and isinstance(layer, LoraLayer) for layer in layers)
    loss, grads = loss_and_gradients()
    assert torch.allclose(loss, peft_loss, rtol=1e-6)
    for grad, peft_grad in zip(grads, peft_grads, strict=True):
        assert torch.allclose(grad, peft_grad, rtol=1e-4, atol=1e-7)

    _assert_blocks_compile_to_one_graph_with_the_same_results(blocks, loss_and_gradients, loss, grads, atol=1e-7)


@pytest.mark.parametrize("in_rank", [False, True])
def test_a_compiled_lora_layer_scaled_in_rank_makes_no_scaled_copy_of_its_output_gradient(in_rank):
    """What the backward graph of a compiled LoRA layer computes from the gradient of its output (tokens x 256):
    in peft's order, a scaled full-size copy of it (what inductor keeps as one more buffer); scaled in rank, only
    rank-sized products (tokens x 4) are scaled."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.backends.common import aot_autograd

    scaled_shapes: list[tuple[int, ...]] = []

    def backward_compiler(graph, _inputs):
        scaled_shapes.extend(tuple(node.meta["val"].shape) for node in graph.graph.nodes
                             if node.op == "call_function" and node.target == torch.ops.aten.mul.Tensor)
        return make_boxed_func(graph.forward)

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 256)),
                           LoraConfig(r=4, lora_alpha=12, target_modules=["0"]))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, generator=torch.Generator().manual_seed(0))
    if in_rank:
        lora.fast.scale_lora_in_rank(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=aot_autograd(
        fw_compiler=lambda graph, _inputs: make_boxed_func(graph.forward), bw_compiler=backward_compiler,
        partition_fn=min_cut_rematerialization_partition))
    x = torch.randn(32, 64, requires_grad=True)
    compiled(x).sum().backward()
    assert x.grad is not None and scaled_shapes
    assert ((32, 256) in scaled_shapes) is not in_rank
    assert ((32, 4) in scaled_shapes) is in_rank


@pytest.mark.parametrize("case", ["plain", "bias in B", "DoRA", "adapters disabled", "merged"])
def test_a_lora_layer_scaled_in_rank_keeps_peft_output_and_leaves_what_it_does_not_reorder_to_peft(case):
    """The plain LoRA forward reordered gives peft's output (float tolerance); where reordering would change the
    result or peft does more (a bias in B would go unscaled, DoRA, adapters disabled or merged), peft's own forward
    runs: the same output bit for bit."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=12, target_modules=["0"], lora_bias=case == "bias in B",
                        use_dora=case == "DoRA")
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 256)), config)
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, generator=torch.Generator().manual_seed(0))
    if layer.lora_B["default"].bias is not None:
        torch.nn.init.normal_(layer.lora_B["default"].bias, generator=torch.Generator().manual_seed(1))
    if case == "merged":
        layer.merge()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))

    def output() -> torch.Tensor:
        with torch.no_grad():
            if case == "adapters disabled":
                with model.disable_adapter():
                    return layer(x)
            return layer(x)

    expected = output()
    lora.fast.scale_lora_in_rank(layer)
    if case == "plain":
        assert torch.allclose(output(), expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(output(), expected)


def _adapter_input_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """The dtypes every LoRA A matrix is fed from now on (a forward hook on each)."""
    seen: list[torch.dtype] = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].dtype))
    return seen


def test_a_bfloat16_base_runs_its_adapter_in_bfloat16_and_keeps_float32_weights(tiny_model_dir):
    """What ``adapter_autocast`` promises, on CPU with a bfloat16 base (CUDA's default compute dtype): the LoRA
    matmuls get bfloat16 inputs instead of peft's float32 casts, weights and gradients stay float32, the loss and
    gradients match peft's float32 adapter matmuls within bfloat16 tolerance, and gradient checkpointing's recompute
    finds the same dtypes. ``train()`` runs its steps and evaluations that way."""
    quant = Quantization(mode="none", compute_dtype="bfloat16")
    backend = dispatch_backend(quant, use_gpu=False)
    model = load_base_model(tiny_model_dir, ModelSource(id=str(tiny_model_dir)), quant, backend)
    model = apply_lora(model, LoraSettings(r=4, dropout=0.0), gradient_checkpointing=True)
    torch.manual_seed(0)
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave every A without a gradient
            torch.nn.init.normal_(weight, std=0.02)
    model.train()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    seen = _adapter_input_dtypes(model)

    def loss_and_gradients(mixed: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        if mixed:
            with adapter_inputs_uncast(model):
                with adapter_autocast(model):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.detach().float(), [p.grad for p in model.parameters() if p.requires_grad]

    peft_loss, peft_grads = loss_and_gradients(mixed=False)
    assert set(seen) == {torch.float32}  # peft's own cast: the matmuls this avoids
    seen.clear()
    loss, grads = loss_and_gradients(mixed=True)
    assert set(seen) == {torch.bfloat16}
    assert all(g.dtype == torch.float32 for g in grads)
    assert torch.allclose(loss, peft_loss, rtol=2e-2)
    for mixed_grad, peft_grad in zip(grads, peft_grads, strict=True):
        assert torch.nn.functional.cosine_similarity(mixed_grad.flatten(), peft_grad.flatten(), dim=0) > 0.99

    examples = [TokenizedExample(input_ids=ids[0].tolist(), labels=ids[0].tolist())] * 4
    cfg = Training(max_steps=2, micro_batch_size=2, max_seq_len=32, eval_every=1, checkpoint_every=10**6,
                   max_eval_examples=2, gradient_checkpointing=True)
    optimizer, scheduler = build_optimizer(model, cfg, cfg.max_steps)
    seen.clear()
    state = train(model, optimizer, scheduler, Shard(examples, examples[:2], rank=0, world_size=1), cfg,
                  TrainState(), lambda *a: None, pad_id=0, device=backend.device)
    assert state.step == 2 and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    seen.clear()
    model(input_ids=ids, labels=ids)  # outside train(): peft's casts again
    assert set(seen) == {torch.float32}


@pytest.mark.parametrize("settings", [{"variant": "dora"}, {"init": "pissa"}, {"dropout": 0.1},
                                      {"method": "adapter_layers"}, {"method": "full"}],
                         ids=lambda settings: "-".join(f"{k}={v}" for k, v in settings.items()))
def test_every_method_trains_on_a_bfloat16_base_under_adapter_autocast(tiny_model_dir, settings):
    """The bf16 adapter matmuls of train() (autocast, peft's input casts off) with each way of training: no dtype
    clash in the forward or in gradient checkpointing's recompute, finite losses, trained weights still float32."""
    from lora.model import prepare_trainable

    quant = Quantization(mode="none", compute_dtype="bfloat16")
    backend = dispatch_backend(quant, use_gpu=False)
    model = load_base_model(tiny_model_dir, ModelSource(id=str(tiny_model_dir)), quant, backend)
    model = prepare_trainable(model, LoraSettings(r=4, **settings), gradient_checkpointing=True)
    ids = torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [TokenizedExample(input_ids=ids, labels=ids)] * 4
    cfg = Training(max_steps=2, micro_batch_size=2, max_seq_len=32, eval_every=1, checkpoint_every=10**6,
                   max_eval_examples=2, gradient_checkpointing=True)
    optimizer, scheduler = build_optimizer(model, cfg, cfg.max_steps)
    state = train(model, optimizer, scheduler, Shard(examples, examples[:2], rank=0, world_size=1), cfg,
                  TrainState(), lambda *a: None, pad_id=0, device=backend.device)
    assert state.step == 2
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["eval_loss"]) for h in state.history[1:])
    if settings.get("method") != "full":  # adapters are float32; a base trained whole keeps its own dtype
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def _examples(lengths: list[int]) -> list[TokenizedExample]:
    return [TokenizedExample(input_ids=[index] * n, labels=[index] * n) for index, n in enumerate(lengths)]


@pytest.mark.parametrize("world_size", [1, 3])
def test_length_grouping_keeps_every_example_once_per_epoch_and_ranks_apart(world_size):
    lengths = [int(n) for n in torch.randint(10, 400, (203,), generator=torch.Generator().manual_seed(1))]
    examples = _examples(lengths)
    seen_by_rank = []
    for rank in range(world_size):
        shard = Shard(examples, [], rank, world_size)
        for group in (False, True):
            batching = Batching(4, seed=7, group_by_length=group)
            seen = [row[0].input_ids[0] for i in range(shard.batches_per_epoch(batching, 2))
                    for row in shard.micro_batch(2, i, batching)]
            assert len(seen) == len(set(seen)) == shard.batches_per_epoch(batching, 2) * 4
            if group:
                assert set(seen) == set(plain_seen)  # the same examples as ungrouped, in another order
            plain_seen = seen
        seen_by_rank.append(set(seen))
    assert sum(len(s) for s in seen_by_rank) == len(set().union(*seen_by_rank))  # no example on two ranks
    # Deterministic: a resumed run sees the same micro batch at the same position.
    grouped = Batching(4, seed=7, group_by_length=True)
    assert Shard(examples, [], 0, world_size).micro_batch(2, 5, grouped) == Shard(
        examples, [], 0, world_size).micro_batch(2, 5, grouped)


def test_length_grouping_and_packing_pad_at_most_five_percent_of_the_bundled_domains():
    cfg = load_config(REPO / "configs" / "default.yaml", [])
    tokenizer = load_tokenizer(cfg.model, resolve_model_dir(cfg.model))
    for domain in cfg.domains:
        examples, _ = load_examples(domain.train, {}, tokenizer, cfg.train.max_seq_len, cfg.train.overlong)
        shard = Shard(examples, [], 0, 1)
        for micro_batch_size in (4, 8):
            grouped = shard.padding_fraction(Batching(micro_batch_size, cfg.train.seed, group_by_length=True))
            plain = shard.padding_fraction(Batching(micro_batch_size, cfg.train.seed, group_by_length=False))
            assert grouped <= 0.05, (domain.name, micro_batch_size, grouped)
            assert grouped < plain / 3, (domain.name, micro_batch_size, grouped, plain)
        for batch_tokens in (8192, 32768):  # packed rows (train.batch_tokens): only each row's end is padding
            batching = Batching.of(cfg.train.model_copy(update={"batch_tokens": batch_tokens}))
            assert batching.row_len == 2048
            packed = shard.padding_fraction(batching)
            assert packed <= 0.05, (domain.name, batch_tokens, packed)
