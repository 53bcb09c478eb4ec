"""LoRA variants (DoRA, rsLoRA, PiSSA/OLoRA initialisation, LoRA+) and adapter layers on a tiny Llama, CPU: each
trains, has the trainable count computed from the shapes, saves, and reloads onto a fresh base with the trained
model's logits; merges where it can; bad combinations are config errors naming the fix."""

import json

import pytest
import torch

from lora import bottleneck
from lora.config import ConfigError, LoraSettings, ModelSource, Quantization, Training, load_config
from lora.generate import adapter_off
from lora.model import dispatch_backend, load_base_model, parameter_counts, prepare_trainable
from lora.serve import load_adapters, merge, use_adapter
from lora.train import TrainState, build_optimizer, load_trained, load_training_state, save_adapter, \
    save_training_state
from tests.conftest import REPO

IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
LORA_COUNT = 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
"""r=4 x (in + out) over q (64->64), k and v (64->32), o (64->64), gate and up (64->128), down (128->64), 2 blocks."""
DORA_MAGNITUDES = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
"""One magnitude per output feature of each adapted layer."""


def base(model_dir, mode="none"):
    quant = Quantization(mode=mode)
    backend = dispatch_backend(quant, use_gpu=False)
    return load_base_model(model_dir, ModelSource(id=str(model_dir)), quant, backend), backend


def trainable(model_dir, lora, mode="none"):
    torch.manual_seed(0)
    model, _ = base(model_dir, mode)
    return prepare_trainable(model, lora, gradient_checkpointing=False)


def train_steps(model, steps=3, loraplus_ratio=1.0):
    optimizer, scheduler = build_optimizer(model, Training(learning_rate=1e-2, max_steps=steps), steps,
                                           loraplus_ratio)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return optimizer, scheduler, losses


@torch.no_grad()
def logits(model):
    return model.eval()(input_ids=IDS).logits


VARIANTS = {
    "dora": (LoraSettings(r=4, alpha=8, dropout=0.0, variant="dora"), "none"),
    "rslora": (LoraSettings(r=4, alpha=8, dropout=0.0, scaling="rslora"), "none"),
    "pissa": (LoraSettings(r=4, alpha=8, dropout=0.0, init="pissa"), "none"),
    "olora": (LoraSettings(r=4, alpha=8, dropout=0.0, init="olora"), "none"),
    "dora-nf4": (LoraSettings(r=4, alpha=8, dropout=0.0, variant="dora"), "nf4"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_trains_saves_reloads_and_merges(tiny_model_dir, tmp_path, name):
    lora, mode = VARIANTS[name]
    model = trainable(tiny_model_dir, lora, mode)
    assert parameter_counts(model)[0] == LORA_COUNT + (DORA_MAGNITUDES if lora.variant == "dora" else 0)
    optimizer, scheduler, losses = train_steps(model)
    assert losses[-1] < losses[0]
    trained = logits(model)
    save_adapter(model, tmp_path / "adapter", "tests/tiny")

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] == (lora.variant == "dora") and saved["use_rslora"] == (lora.scaling == "rslora")
    # PiSSA/OLoRA are published converted for the original base: rank 2r, and a plain LoRA initialisation.
    assert saved["r"] == (8 if lora.init != "default" else 4) and saved["init_lora_weights"] is True

    fresh, _ = base(tiny_model_dir, mode)
    untouched = logits(fresh)
    assert (untouched - trained).abs().max() > 1e-2  # so that the comparison below can fail
    loaded = load_trained(fresh, tmp_path / "adapter")
    assert torch.allclose(logits(loaded), trained, atol=1e-4)
    if mode == "none":
        unmerged = logits(loaded)
        assert torch.allclose(logits(loaded.merge_and_unload()), unmerged, atol=1e-4)

    if lora.init != "default":  # a resumed run trains on the changed base again, from the saved A and B
        save_training_state(tmp_path / "checkpoint", model, optimizer, scheduler, TrainState(step=3), "tests/tiny")
        resumed = trainable(tiny_model_dir, lora, mode)
        optimizer, scheduler = build_optimizer(resumed, Training(learning_rate=1e-2, max_steps=3), 3)
        load_training_state(tmp_path / "checkpoint", resumed, optimizer, scheduler)
        assert torch.allclose(logits(resumed), trained, atol=1e-4)


def test_loraplus_gives_b_the_higher_learning_rate(tiny_model_dir):
    model = trainable(tiny_model_dir, LoraSettings(r=4, dropout=0.0))
    optimizer, _, _ = train_steps(model, steps=1, loraplus_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    # initial_lr: the peak the schedule scales (a cosine over 1 step is at 0 after it), per group.
    peaks = {names[id(p)]: group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(peaks) == sum(p.requires_grad for p in model.parameters())
    assert {peaks[n] for n in peaks if "lora_B" in n} == {1e-2 * 16}
    assert {peaks[n] for n in peaks if "lora_A" in n} == {1e-2}


def test_adapter_layers_start_as_the_base_train_reload_and_refuse_merging(tiny_model_dir, tmp_path):
    plain, _ = base(tiny_model_dir)
    before = logits(plain)
    model = trainable(tiny_model_dir, LoraSettings(method="adapter_layers", adapter_size=8))
    assert parameter_counts(model)[0] == 2 * 2 * (2 * 64 * 8 + 64 + 8)  # 2 blocks x (attention, MLP)
    assert torch.equal(logits(model), before)  # up-projection zero: the identity
    _, _, losses = train_steps(model, steps=5)
    assert losses[-1] < losses[0] - 0.05
    trained = logits(model)
    with adapter_off(model):
        assert torch.equal(logits(model), before)
    save_adapter(model, tmp_path / "layers", "tests/tiny")
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == sorted(bottleneck.FILES)

    loaded = load_trained(base(tiny_model_dir)[0], tmp_path / "layers")
    assert torch.allclose(logits(loaded), trained, atol=1e-5)

    # Served beside a LoRA adapter on one base: each request goes through its own adapter only.
    lora_model = trainable(tiny_model_dir, LoraSettings(r=4, dropout=0.0))
    train_steps(lora_model, steps=2)
    lora_trained = logits(lora_model)
    save_adapter(lora_model, tmp_path / "lora", "tests/tiny")
    both = load_adapters(base(tiny_model_dir)[0], {"layers": tmp_path / "layers", "lora": tmp_path / "lora"})
    for name, expected in [("layers", trained), ("lora", lora_trained), (None, before)]:
        with use_adapter(both, name):
            assert torch.allclose(logits(both), expected, atol=1e-5), name

    with pytest.raises(ConfigError, match="cannot be merged"):
        merge(tiny_model_dir, ModelSource(id=str(tiny_model_dir)), Quantization(mode="none"), tmp_path / "layers",
              tokenizer=None)


def test_adapter_layers_train_on_a_4bit_base(tiny_model_dir):
    model = trainable(tiny_model_dir, LoraSettings(method="adapter_layers", adapter_size=8), mode="nf4")
    _, _, losses = train_steps(model, steps=5)
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("overrides, problem", [
    (["lora.init=pissa"], "lora.init: pissa initialisation needs an unquantized base"),
    (["tune.inits=[default, olora]"], "tune.inits: olora initialisation needs an unquantized base"),
    (["lora.init=olora", "quant.mode=none", "lora.variant=dora"], "lora.variant: dora cannot be combined with olora"),
    (["quant.mode=none", "tune.inits=[pissa]", "tune.variants=[lora, dora]"], "tune.variants: dora cannot be combined"),
    (["lora.method=adapter_layers", "lora.variant=dora"], "lora.variant: a LoRA setting.*set lora.method=lora"),
    (["lora.method=adapter_layers", "lora.loraplus_ratio=16"], "lora.loraplus_ratio: a LoRA setting"),
    (["lora.loraplus_ratio=0.5"], "lora.loraplus_ratio: Input should be greater than or equal to 1"),
])
def test_bad_variant_combinations_are_config_errors(overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(REPO / "configs/default.yaml", overrides)


def test_good_variant_combinations_load():
    cfg = load_config(REPO / "configs/default.yaml", ["lora.init=pissa", "quant.mode=none", "lora.scaling=rslora",
                                                      "lora.loraplus_ratio=16"])
    assert (cfg.lora.init, cfg.lora.scaling, cfg.lora.loraplus_ratio) == ("pissa", "rslora", 16)
    cfg = load_config(REPO / "configs/default.yaml", ["lora.method=adapter_layers", "lora.adapter_size=32"])
    assert (cfg.lora.method, cfg.lora.adapter_size) == ("adapter_layers", 32)


def test_search_space_offers_the_variants_and_trials_apply_them():
    from pipelines.sweep import search_space, trial_config

    cfg = load_config(REPO / "configs/default.yaml", [
        "quant.mode=none", "tune.variants=[lora, dora]", "tune.scalings=[standard, rslora]",
        "tune.loraplus_ratios=[1, 16]"])
    space = search_space(cfg.tune)
    assert {k: space[k].categories for k in ("variant", "scaling", "loraplus_ratio")} == {
        "variant": ["lora", "dora"], "scaling": ["standard", "rslora"], "loraplus_ratio": [1, 16]}
    assert "init" not in space  # not listed: every trial keeps lora.init
    cfg = load_config(REPO / "configs/default.yaml", ["quant.mode=none", "tune.inits=[default, pissa, olora]"])
    assert search_space(cfg.tune)["init"].categories == ["default", "pissa", "olora"]
    trial = trial_config(cfg, {"r": 8, "alpha_ratio": 2.0, "learning_rate": 1e-3, "variant": "lora",
                               "scaling": "rslora", "init": "pissa", "loraplus_ratio": 16})
    assert (trial.lora.variant, trial.lora.scaling, trial.lora.init, trial.lora.loraplus_ratio) == \
        ("lora", "rslora", "pissa", 16)


def test_best_trial_carries_the_swept_variant_settings(tmp_path):
    from pipelines.sweep import SweepResult, TrialResult, write_outputs
    from pipelines.tune import best_config

    cfg = load_config(REPO / "configs/default.yaml", [f"cluster.output_dir={tmp_path}", "tune.variants=[lora, dora]",
                                                      "tune.loraplus_ratios=[1, 16]"])
    trial = TrialResult(trial_id="a", status="finished", r=8, alpha=16.0, learning_rate=1e-3, dropout=0.05,
                        target_modules="all-linear", variant="dora", scaling="rslora", loraplus_ratio=16,
                        eval_loss=1.0, steps=4, train_seconds=1.0, trial_seconds=1.0, curve=[(0, 2.0), (4, 1.0)])
    domain = cfg.domains[0].name
    write_outputs(cfg, SweepResult(domain=domain, experiment="x", search="grid", planned_steps=4, concurrency=1,
                                   best="a", trials=[trial]))
    best = json.loads((tmp_path / domain / "tune" / "best.json").read_text())["lora"]
    assert (best["variant"], best["loraplus_ratio"]) == ("dora", 16) and "scaling" not in best  # scaling not swept
    tuned = best_config(cfg, domain)
    assert (tuned.lora.variant, tuned.lora.loraplus_ratio, tuned.lora.scaling) == ("dora", 16, "standard")
