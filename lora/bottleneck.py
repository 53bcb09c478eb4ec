"""Adapter layers (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): a small bottleneck network
(down-projection, GELU, up-projection, residual) after the attention and after the MLP of every decoder block.

The contrast to LoRA: the bottlenecks sit in the forward path, so they cannot be folded into the base's weights;
serving keeps them as extra layers. No maintained library fits: the ``adapters`` package (AdapterHub) 1.3.0
requires ``transformers~=4.57.6`` and loramill runs transformers 5.23. The adapters are forward hooks on each block's
``self_attn`` and ``mlp`` modules (the Llama-family layout: Llama, Mistral, Qwen, Gemma, SmolLM), held by one
``AdapterLayers`` module registered on the base as ``adapter_layers``: ``model.parameters()``, ``.to()``, DDP and
``train()`` see them.

A saved adapter is ``bottleneck_config.json`` + ``bottleneck_model.safetensors``: names PEFT does not read, so no
PEFT loader mistakes the folder for a LoRA adapter.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora.config import ConfigError

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_model.safetensors"
FILES = (CONFIG_FILE, WEIGHTS_FILE)
FORMAT = "loramill-bottleneck-adapter"
FORMAT_VERSION = 1
PLACES = ("attention", "mlp")
"""Where each block gets an adapter: after its attention (``self_attn``'s output, before the residual add) and
after its MLP (likewise), where Houlsby et al. place them."""
_MODULE_OF_PLACE = {"attention": "self_attn", "mlp": "mlp"}
ATTRIBUTE = "adapter_layers"
"""The name under which the ``AdapterLayers`` module hangs on the base model."""


class Bottleneck(nn.Module):
    """h + up(gelu(down(h))). ``up`` starts at zero, so a new adapter is the identity: training starts from the
    base model's outputs, as a LoRA adapter's B = 0 does. Weights in float32 whatever the base's dtype (as PEFT
    keeps LoRA weights): the input is cast to them and the update back to the input's dtype."""

    def __init__(self, hidden: int, size: int, device: torch.device | None = None):
        super().__init__()
        self.down = nn.Linear(hidden, size, device=device, dtype=torch.float32)
        self.up = nn.Linear(size, hidden, device=device, dtype=torch.float32)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.gelu(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


class AdapterLayers(nn.Module):
    """Named sets of bottlenecks (one per place per block) over one base, and which set is active (None: the base).

    Several domains' adapters can be loaded side by side, like PEFT's named adapters; each forward pass goes through
    the active one only.
    """

    def __init__(self, blocks: nn.ModuleList, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        for index, block in enumerate(blocks):  # hooked for the base's lifetime: a base with them is not reused
            for place in PLACES:
                getattr(block, _MODULE_OF_PLACE[place]).register_forward_hook(self._hook(index, place))

    def _hook(self, index: int, place: str):
        def after(module: nn.Module, inputs: Any, output: Any) -> Any:
            if self.active is None:
                return None  # the module's own output, unchanged
            adapter = self.adapters[self.active][index][place]
            if isinstance(output, tuple):  # attention returns (hidden states, attention weights)
                return (adapter(output[0]), *output[1:])
            return adapter(output)

        return after

    def add(self, name: str, size: int, blocks: int, device: torch.device) -> nn.ModuleList:
        layers = nn.ModuleList(nn.ModuleDict({place: Bottleneck(self.hidden, size, device) for place in PLACES})
                               for _ in range(blocks))
        self.adapters[name] = layers
        self.active = name
        return layers

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """The base alone for the duration, then the previously active adapter again."""
        active, self.active = self.active, None
        try:
            yield
        finally:
            self.active = active


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The base's decoder blocks: its longest ``nn.ModuleList``, each block with ``self_attn`` and ``mlp``."""
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)
    if blocks is None or not all(hasattr(b, name) for b in blocks for name in _MODULE_OF_PLACE.values()):
        found = type(blocks[0]).__name__ if blocks else "none"
        raise ConfigError([f"lora.method: adapter_layers needs decoder blocks with self_attn and mlp modules (the "
                           f"Llama family); this base's blocks are {found}. Use lora.method=lora"])
    return blocks


def attached(model: nn.Module) -> AdapterLayers | None:
    """The ``AdapterLayers`` of ``model`` (a base, or a PEFT model around one), or None."""
    return next((m for m in model.modules() if isinstance(m, AdapterLayers)), None)


def expected_parameters(model: nn.Module, size: int) -> int:
    """Two bottlenecks per block, each down (hidden x size + size) and up (size x hidden + hidden)."""
    hidden = model.config.get_text_config().hidden_size
    return len(decoder_blocks(model)) * len(PLACES) * (2 * hidden * size + hidden + size)


def add_adapter_layers(model: nn.Module, size: int, name: str = "default") -> AdapterLayers:
    """Hook a new, identity-initialised set of bottlenecks into ``model`` (under ``name``) and make it active;
    the first call registers the ``AdapterLayers`` module on the base."""
    layers = attached(model)
    if layers is None:
        blocks = decoder_blocks(model)
        layers = AdapterLayers(blocks, model.config.get_text_config().hidden_size)
        model.add_module(ATTRIBUTE, layers)
    device = next(model.parameters()).device
    layers.add(name, size, len(decoder_blocks(model)), device)
    return layers


def is_adapter_layers(folder: Path) -> bool:
    """Whether ``folder`` holds saved adapter layers (rather than a PEFT adapter)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def save(model: nn.Module, directory: Path, base_model_id: str) -> None:
    """The active adapter's weights (safetensors, keys ``<block>.<place>.<down|up>.<weight|bias>``) and what a
    loader needs to rebuild it."""
    from safetensors.torch import save_file

    layers = attached(model)
    if layers is None or layers.active is None:
        raise ValueError("save: the model has no active adapter layers")
    trained = layers.adapters[layers.active]
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in trained.state_dict().items()}, directory / WEIGHTS_FILE)
    first = trained[0][PLACES[0]]
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "base_model_name_or_path": base_model_id,
              "adapter_size": first.down.out_features, "hidden_size": layers.hidden, "blocks": len(trained),
              "places": list(PLACES), "activation": "gelu",
              "parameters": sum(p.numel() for p in trained.parameters())}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def read_config(directory: Path) -> dict[str, Any]:
    config = json.loads((Path(directory) / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: {CONFIG_FILE} is not a {FORMAT} v{FORMAT_VERSION} config")
    return config


def load(model: nn.Module, directory: Path, name: str = "default") -> nn.Module:
    """``model`` with the adapter layers saved at ``directory`` hooked in under ``name`` and active (eval mode).
    Raises ValueError if the folder was saved for another shape of base."""
    config = read_config(directory)
    blocks = len(decoder_blocks(model))
    hidden = model.config.get_text_config().hidden_size
    if (config["blocks"], config["hidden_size"]) != (blocks, hidden):
        raise ValueError(f"{directory}: adapter layers for {config['blocks']} blocks of width {config['hidden_size']}; "
                         f"this base has {blocks} of width {hidden}")
    add_adapter_layers(model, config["adapter_size"], name)
    load_weights(model, directory, name)
    return model.eval()


def load_weights(model: nn.Module, directory: Path, name: str = "default") -> None:
    """Put the saved weights into the adapter ``name`` already hooked into ``model`` (every tensor must match)."""
    from safetensors.torch import load_file

    layers = attached(model)
    target = layers.adapters[name]
    target.load_state_dict(load_file(Path(directory) / WEIGHTS_FILE, device=str(next(target.parameters()).device)))
