"""What an adapter changes in the base: per-module ΔW = B·A·α/r, its Frobenius norm and effective rank."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass(frozen=True)
class ModuleDelta:
    module: str
    shape: tuple[int, int]
    frobenius_norm: float
    """‖ΔW‖_F."""
    effective_rank: float
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007): 1 = one direction, r = all equal."""

    def to_dict(self) -> dict:
        return asdict(self)


def adapter_deltas(adapter_dir: Path) -> list[ModuleDelta]:
    """ΔW statistics for every LoRA module of a saved PEFT adapter, in file order.

    ΔW = B (out×r) · A (r×in) · α/r is never materialised: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR),
    ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ · α/r, so its singular values are those of the r×r matrix R_B R_Aᵀ · α/r.
    """
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    deltas = []
    for key in weights:
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        a = weights[key].double()
        b = weights[key.replace("lora_A", "lora_B")].double()
        rank = a.shape[0]
        alpha = config.get("alpha_pattern", {}).get(module.rsplit(".", 1)[-1], config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)  # rsLoRA: alpha / sqrt(r)
        _, r_b = torch.linalg.qr(b)
        _, r_a = torch.linalg.qr(a.T)
        singular = torch.linalg.svdvals(r_b @ r_a.T) * scale
        deltas.append(
            ModuleDelta(
                module=module,
                shape=(b.shape[0], a.shape[1]),
                frobenius_norm=float(singular.norm()),
                effective_rank=effective_rank(singular),
            )
        )
    return deltas


def effective_rank(singular_values: torch.Tensor) -> float:
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values / total
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))
