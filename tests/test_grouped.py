"""A Llama block's projections that read one input, grouped into one matmul each (lora/grouped.py): the same loss and
LoRA gradients, no memory added, one compiled graph for all blocks, and each layer's own forward wherever it does more
than the plain LoRA update."""

import contextlib
from collections.abc import Iterator

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers.models.llama import modeling_llama

from lora.config import LoraSettings, ModelSource, Quantization
from lora.fast import scale_lora_in_rank, transformer_blocks
from lora.grouped import GroupedAttention, GroupedMLP, group_shared_input_projections
from lora.model import apply_lora, dispatch_backend, load_base_model
from pipelines import train_worker
from tests.test_fast import _assert_blocks_compile_to_one_graph_with_the_same_results, _tiny_lora_step


@contextlib.contextmanager
def _base_layer_calls(model: torch.nn.Module) -> Iterator[list[str]]:
    """Names of the adapted layers whose own base matmul runs, appended at each call (a grouped one never does)."""
    calls: list[str] = []
    hooks = [layer.base_layer.register_forward_hook(lambda *_, name=name: calls.append(name))
             for name, layer in model.named_modules() if isinstance(layer, LoraLayer)]
    yield calls
    for hook in hooks:
        hook.remove()


def _storage_bytes(model: torch.nn.Module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


@pytest.mark.parametrize("alpha", [8, 12])
def test_grouped_projections_give_the_loss_and_gradients_of_each_layer_alone_in_one_graph(tiny_model_dir, alpha):
    """Both blocks' q/k/v and gate/up grouped (four groups): the loss and every LoRA gradient equal those of the
    layers computing alone (float tolerance); the base weights become views of one tensor a group (no byte added),
    the parameters and adapter keys stay peft's, and the blocks still trace as one graph."""
    model, loss_and_gradients = _tiny_lora_step(tiny_model_dir, Quantization(mode="none"),
                                                LoraSettings(r=4, alpha=alpha, dropout=0.0))
    blocks = transformer_blocks(model)
    for layer in (m for block in blocks for m in block.modules() if isinstance(m, LoraLayer)):
        scale_lora_in_rank(layer)
    alone_loss, alone_grads = loss_and_gradients()
    names, size = [name for name, _ in model.named_parameters()], _storage_bytes(model)

    assert group_shared_input_projections(blocks) == 4
    assert group_shared_input_projections(blocks) == 4  # a borrowed base: already grouped, left as it is
    assert [name for name, _ in model.named_parameters()] == names
    assert _storage_bytes(model) == size
    for block in blocks:
        assert isinstance(block.self_attn, GroupedAttention) and isinstance(block.mlp, GroupedMLP)
        for module, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj")), (block.mlp, ("gate_proj", "up_proj"))):
            storage = module.grouped_weight.untyped_storage().data_ptr()
            weights = [getattr(module, name).base_layer.weight for name in names]
            assert all(weight.untyped_storage().data_ptr() == storage for weight in weights)
    with _base_layer_calls(model) as calls:
        loss, grads = loss_and_gradients()
    assert calls and not any(name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) for name in calls)
    assert torch.allclose(loss, alone_loss, rtol=1e-6)
    for grad, alone_grad in zip(grads, alone_grads, strict=True):
        assert torch.allclose(grad, alone_grad, rtol=1e-4, atol=1e-7)

    _assert_blocks_compile_to_one_graph_with_the_same_results(blocks, loss_and_gradients, loss, grads, atol=1e-7)


@pytest.mark.parametrize("case", ["adapters disabled", "dropout", "merged"])
def test_grouped_projections_leave_what_they_do_not_group_to_each_layer(tiny_model_dir, case):
    """Where a layer does more than the plain update (its own dropout mask, adapters switched off, merged weights),
    the grouped block runs each layer's own forward: the same logits bit for bit."""
    model, _ = _tiny_lora_step(tiny_model_dir, Quantization(mode="none"),
                               LoraSettings(r=4, alpha=8, dropout=0.5 if case == "dropout" else 0.0))
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    if case == "merged":
        model.merge_adapter()

    def logits() -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout masks in both runs
        with torch.no_grad():
            if case == "adapters disabled":
                with model.disable_adapter():
                    return model(input_ids=ids).logits
            return model(input_ids=ids).logits

    expected = logits()
    assert group_shared_input_projections(transformer_blocks(model)) == 4
    with _base_layer_calls(model) as calls:
        assert torch.equal(logits(), expected)
    assert len(calls) == 14  # each of the 7 projections of both blocks through its own forward


class _MLPOfItsOwn(torch.nn.Module):
    """As Liger's SwiGLU MLP, which Liger puts in transformers' Llama module for the whole process: the same
    projections, its own forward, no ``act_fn``."""

    def __init__(self, config, *_args, **_kwargs):
        super().__init__()
        self.gate_proj, self.up_proj = [torch.nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
                                        for _ in range(2)]
        self.down_proj = torch.nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_an_mlp_class_put_in_place_of_llamas_keeps_its_own_forward(tiny_model_dir, monkeypatch):
    """A model built after another library replaced ``LlamaMLP`` in transformers' module (Liger's fused kernels do, in
    a process that ran a step with them): its MLPs are left alone, its attentions grouped, and the step gives the
    loss and gradients of the layers alone (on the GPU, this order of runs failed on ``act_fn``)."""
    monkeypatch.setattr(modeling_llama, "LlamaMLP", _MLPOfItsOwn)
    model, loss_and_gradients = _tiny_lora_step(tiny_model_dir, Quantization(mode="none"),
                                                LoraSettings(r=4, dropout=0.0))
    blocks = transformer_blocks(model)
    alone_loss, alone_grads = loss_and_gradients()

    assert group_shared_input_projections(blocks) == 2
    assert all(type(block.mlp) is _MLPOfItsOwn and isinstance(block.self_attn, GroupedAttention) for block in blocks)
    loss, grads = loss_and_gradients()
    assert torch.allclose(loss, alone_loss, rtol=1e-6)
    for grad, alone_grad in zip(grads, alone_grads, strict=True):
        assert torch.allclose(grad, alone_grad, rtol=1e-4, atol=1e-7)


def test_a_4bit_base_keeps_its_projections_apart(tiny_model_dir):
    model, _ = _tiny_lora_step(tiny_model_dir, Quantization(), LoraSettings(r=4, dropout=0.0))
    assert group_shared_input_projections(transformer_blocks(model)) == 0


def test_a_base_given_back_and_adapted_again_without_some_projections(tiny_model_dir):
    """A Tune actor's next trial on the same base (``reuse_actors``) may adapt fewer projections: its blocks stay
    grouped where all of a group's layers are adapted (the MLPs here) and the attention, whose key projection has no
    adapter now, runs each layer alone, with the logits of a base never grouped carrying the same adapter."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    backend = dispatch_backend(Quantization(mode="none"), use_gpu=False)

    def adapted(base: torch.nn.Module, targets: list[str] | str) -> torch.nn.Module:
        return apply_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=targets), True).eval()

    def fresh_base() -> torch.nn.Module:
        return load_base_model(tiny_model_dir, ModelSource(id=str(tiny_model_dir)), Quantization(mode="none"), backend)

    model = adapted(fresh_base(), "all-linear")
    assert group_shared_input_projections(transformer_blocks(model)) == 4
    train_worker._give_back_base_model(("tune actor",), model)
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    model = adapted(train_worker._idle_base_models.pop(("tune actor",)), targets)
    assert group_shared_input_projections(transformer_blocks(model)) == 2
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    reference = adapted(fresh_base(), targets)
    set_peft_model_state_dict(reference, get_peft_model_state_dict(model))
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_an_active_adapter_on_some_projections_of_a_group_leaves_that_group_to_each_layer(tiny_model_dir):
    """Two active adapters, the second on the query projections only: each attention runs its layers alone (a group
    cannot add an adapter to some of its layers), the MLPs, which neither layer of has the second adapter, stay
    grouped, and the logits are those of the layers alone."""
    from peft import LoraConfig

    model, _ = _tiny_lora_step(tiny_model_dir, Quantization(mode="none"), LoraSettings(r=4, alpha=8, dropout=0.0))
    model.add_adapter("queries", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "queries"])
    for name, weight in model.named_parameters():
        if "lora_B.queries" in name:
            torch.nn.init.normal_(weight, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert group_shared_input_projections(transformer_blocks(model)) == 4
        with _base_layer_calls(model) as calls:
            logits = model(input_ids=ids).logits
    assert sorted({name.rsplit(".", 1)[-1] for name in calls}) == ["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
