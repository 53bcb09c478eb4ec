"""The LoRA projections of a Llama block that read the same input, as one matmul each: the attention's query, key
and value projections, and the MLP's gate and up projections.

Why: a Llama block's seven adapted projections make 81 matmul calls a training step (forward, the checkpointed
block's recompute, backward: base, A and B of each), and where the step is bound by the host (a 1B base in bf16 on
an H200, bench/SPEED_NOTES.md section 14) each call is host time. Grouped, the base weights of a group are one
tensor (the layers' weights become views of it: no memory added) and the group's A matrices are concatenated at each
forward (``r x in`` each: small), so a group of n projections makes one base matmul and one A matmul where it made
n of each; the B matrices stay one matmul each. Profiled at 1B: 60 matmul calls a block instead of 81, and 1.03-1.07x
the step's speed. The layers, their weights and the adapter files stay peft's.

Only for the plain LoRA forward on bases in full or half precision (a 4-bit base's layers keep their own matmuls),
for Llama's own attention and MLP classes; anything else a layer may do (adapters disabled or merged, dropout,
DoRA and the other variants, a bias in B) goes through each layer's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora.mixin import mix_in

_llama: Any = None
"""transformers' Llama module, imported by ``group_shared_input_projections``: dynamo (torch 2.11) breaks the graph
at an import of it inside the forward (``transformers.models.llama`` is a lazy module)."""

def plain_lora(layer: nn.Module) -> bool:
    """Whether ``layer`` (a peft LoRA layer) computes only ``base(x) + B(A(x)) * scaling`` now, which the reordered
    and grouped forwards reproduce."""
    return not (layer.disable_adapters or layer.merged or layer.lora_variant or any(layer.lora_bias.values()))


def group_shared_input_projections(blocks: list[nn.Module]) -> int:
    """Group the projections that read one input in ``blocks``' Llama attentions and MLPs, where their layers can be
    grouped; returns how many groups."""
    global _llama
    from transformers.models.llama import modeling_llama as _llama

    # By name in transformers' module, not by its attributes: Liger's kernels replace ``LlamaMLP`` there for the
    # whole process with a class of their own, whose forward is not the one GroupedMLP reproduces
    groups = {"LlamaAttention": (GroupedAttention, ("q_proj", "k_proj", "v_proj")),
              "LlamaMLP": (GroupedMLP, ("gate_proj", "up_proj"))}
    grouped, copied_on_cuda = 0, False
    for module in (m for block in blocks for m in block.modules()):
        for name, (mixin, names) in groups.items():
            layers = [getattr(module, n) for n in names] if _transformers_own(module, name, mixin) else []
            if not layers or not _groupable(layers):
                continue
            if not isinstance(module, mixin):  # a borrowed base grouped by a run before has its weights shared
                _share_one_weight(module, layers)
                mix_in(module, mixin)
                copied_on_cuda = copied_on_cuda or module.grouped_weight.is_cuda
            grouped += 1
    if copied_on_cuda:
        # The weights as loaded, now copied into the groups' tensors, would stay in torch's cache, which the memory
        # the GPU token budget is chosen from (the driver's free memory) does not count: give them back.
        torch.cuda.empty_cache()
    return grouped


def _transformers_own(module: nn.Module, class_name: str, mixin: type[nn.Module]) -> bool:
    """Whether ``module`` is an instance of transformers' own Llama class ``class_name`` (or was, before grouping)."""
    own = type(module).__bases__[-1] if isinstance(module, mixin) else type(module)
    return own.__module__ == _llama.__name__ and own.__name__ == class_name


def _is_lora(layer: nn.Module) -> bool:
    """A peft LoRA layer, told by its adapters' container (a check the compiled forward can make without peft)."""
    return isinstance(getattr(layer, "lora_A", None), nn.ModuleDict)


def _groupable(layers: list[nn.Module]) -> bool:
    if not all([_is_lora(layer) and type(layer.base_layer) is nn.Linear for layer in layers]):
        return False
    weights = [layer.base_layer.weight for layer in layers]
    return (all(layer.base_layer.bias is None for layer in layers) and not any(w.requires_grad for w in weights)
            and len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1)


def _share_one_weight(module: nn.Module, layers: list[nn.Module]) -> None:
    """One tensor holding the layers' base weights, row blocks in order; each layer's weight becomes a view of it."""
    weight = torch.cat([layer.base_layer.weight.detach() for layer in layers])
    module.register_buffer("grouped_weight", weight, persistent=False)
    for layer, rows in zip(layers, weight.split([layer.out_features for layer in layers]), strict=True):
        layer.base_layer.weight = nn.Parameter(rows, requires_grad=False)


def grouped_projections(x: torch.Tensor, layers: tuple[nn.Module, ...], weight: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's output for the input ``x`` they share, through one base matmul and one A matmul per adapter."""
    # List comprehensions, not generator expressions: torch 2.11's dynamo breaks the graph at each generator
    first = layers[0]
    if not all([_is_lora(layer) and plain_lora(layer) and layer.active_adapters == first.active_adapters
                for layer in layers]):  # a borrowed base's next adapter may leave some of them out
        return [layer(x) for layer in layers]
    # An active adapter a layer does not have adds nothing to it (peft skips it): grouped only when all have it
    adapters = [a for a in first.active_adapters if any([a in layer.lora_A for layer in layers])]
    if not all([a in layer.lora_A and isinstance(layer.lora_dropout[a], nn.Identity)
                for layer in layers for a in adapters]):  # some of them have it, or a dropout mask of its own
        return [layer(x) for layer in layers]
    outputs = list(F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1))
    dtype = outputs[0].dtype
    for adapter in adapters:
        a = torch.cat([layer.lora_A[adapter].weight for layer in layers])
        low_rank = F.linear(first._cast_input_dtype(x, a.dtype), a).split([layer.r[adapter] for layer in layers], -1)
        outputs = [out + layer.lora_B[adapter](low * layer.scaling[adapter])  # scaled in rank: lora/fast.py says why
                   for out, layer, low in zip(outputs, layers, low_rank, strict=True)]
    return [out.to(dtype) for out in outputs]


class GroupedMLP(nn.Module):
    """Mixed in before a Llama MLP: its forward with the gate and up projections grouped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = grouped_projections(x, (self.gate_proj, self.up_proj), self.grouped_weight)
        return self.down_proj(self.act_fn(gate) * up)


class GroupedAttention(nn.Module):
    """Mixed in before a Llama attention: transformers' ``LlamaAttention.forward`` with the query, key and value
    projections grouped, the rest as it is there."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = [states.view(hidden_shape).transpose(1, 2) for states in grouped_projections(
            hidden_states, (self.q_proj, self.k_proj, self.v_proj), self.grouped_weight)]
        cos, sin = position_embeddings
        query, key = _llama.apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = _llama.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                 _llama.eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask,
                                    dropout=0.0 if not self.training else self.attention_dropout,
                                    scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights
