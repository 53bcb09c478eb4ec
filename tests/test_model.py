"""Model side: 4-bit NF4 on CPU, the trainable-count check, resumable training state, the cached weights hash."""

import hashlib
import importlib.metadata
import json
import os

import pytest
import torch

from lora import model as lora_model
from lora.config import ConfigError, LoraSettings, ModelSource, Quantization, Training
from lora.data import load_examples
from lora.errors import BackendError
from lora.model import (
    apply_lora,
    check_bitsandbytes,
    dispatch_backend,
    expected_lora_parameters,
    load_base_model,
    load_tokenizer,
)
from lora.train import Shard, TrainState, build_optimizer, load_training_state, save_training_state, train
from tests.conftest import DATA


def load(tiny_model_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), mode="nf4"):
    source, quant = ModelSource(id=str(tiny_model_dir)), Quantization(mode=mode)
    backend = dispatch_backend(quant, use_gpu=False)
    model = load_base_model(tiny_model_dir, source, quant, backend)
    return apply_lora(model, lora, gradient_checkpointing=False), backend


def test_nf4_base_is_really_4bit_on_cpu(tiny_model_dir):
    import bitsandbytes as bnb

    model, backend = load(tiny_model_dir)
    assert backend.compute_dtype == torch.float32 and backend.four_bit
    four_bit_layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit_layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(m.weight.quant_state.quant_type == "nf4" for m in four_bit_layers)



def test_4bit_gradients_are_the_same_after_an_evaluation(tiny_model_dir):
    """Training evaluates between steps. On CPUs with AVX512-BF16 bitsandbytes 0.50 would repack the 4-bit weights
    at the first eval-mode forward into a format whose kernel has no backward, and every later training step's
    gradient would stop at the frozen 4-bit layers (on other CPUs and on CUDA this holds either way)."""
    model, _ = load(tiny_model_dir)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))

    def lora_gradients():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    before = lora_gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = lora_gradients()
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_trainable_count_is_r_times_in_plus_out(tiny_model_dir, targets):
    # tiny Llama: hidden 64, intermediate 128, 4 heads of 16, 2 kv heads -> k/v project 64 -> 32
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    names = shapes if targets == "all-linear" else targets
    by_hand = 2 * sum(4 * (shapes[n][0] + shapes[n][1]) for n in names)
    model, _ = load(tiny_model_dir, LoraSettings(r=4, target_modules=targets))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == by_hand
    base, _ = load_plain_base(tiny_model_dir)
    assert expected_lora_parameters(base, LoraSettings(r=4, target_modules=targets)) == by_hand


def load_plain_base(tiny_model_dir):
    quant = Quantization(mode="none")
    backend = dispatch_backend(quant, use_gpu=False)
    return load_base_model(tiny_model_dir, ModelSource(id=str(tiny_model_dir)), quant, backend), backend


def test_targets_that_match_nothing_are_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="matches no linear layer"):
        load(tiny_model_dir, LoraSettings(target_modules=["attention_dense"]))


def test_missing_bitsandbytes_and_cuda_are_refused(monkeypatch):
    with pytest.raises(BackendError, match="CUDA is not available"):
        if not torch.cuda.is_available():
            dispatch_backend(Quantization(), use_gpu=True)
        else:
            raise BackendError("CUDA is not available (skipped: this machine has CUDA)")
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(BackendError, match="set quant.mode=none"):
        check_bitsandbytes()
    # The driver's check reads the installed version without importing it.
    check_bitsandbytes(load=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.49.1")
    with pytest.raises(BackendError, match="found 0.49.1; upgrade it"):
        check_bitsandbytes(load=False)


@pytest.mark.parametrize("batch_tokens", [None, 512], ids=["padded", "packed"])
def test_resumed_training_equals_uninterrupted(tiny_model_dir, tmp_path, batch_tokens):
    """Checkpoint at step 2 of 4, resume into fresh objects: same adapter weights and history as one go."""
    cfg = Training(max_steps=4, learning_rate=1e-2, micro_batch_size=4, eval_every=2, checkpoint_every=2,
                   max_seq_len=256, batch_tokens=batch_tokens)
    tokenizer = load_tokenizer(ModelSource(id=str(tiny_model_dir)), tiny_model_dir)
    examples, _ = load_examples(str(DATA / "legal/train.jsonl"), {}, tokenizer, 256, "drop")
    held_out, _ = load_examples(str(DATA / "legal/eval.jsonl"), {}, tokenizer, 256, "drop")
    shard = Shard(examples[:40], held_out[:8], rank=0, world_size=1)

    def fresh():
        torch.manual_seed(0)
        model, backend = load(tiny_model_dir)
        optimizer, scheduler = build_optimizer(model, cfg, 4)
        return model, optimizer, scheduler, backend

    def run(model, optimizer, scheduler, backend, state, stop_at=None):
        def report(metrics, state, save):
            if save and state.step == stop_at:
                save_training_state(tmp_path, model, optimizer, scheduler, state, "tests/tiny")
                raise KeyboardInterrupt  # the worker dies right after its checkpoint
        try:
            train(model, optimizer, scheduler, shard, cfg, state, report, pad_id=tokenizer.pad_token_id,
                  device=backend.device)
        except KeyboardInterrupt:
            pass
        return model

    straight_state = TrainState()
    run(*fresh(), straight_state)

    run(*fresh(), TrainState(), stop_at=2)
    model, optimizer, scheduler, backend = fresh()
    state = load_training_state(tmp_path, model, optimizer, scheduler)
    assert (state.step, state.batch_in_epoch) == (2, 2)
    saved_moments = [s["exp_avg"].clone() for s in optimizer.state_dict()["state"].values()]
    assert sum(m.abs().sum() for m in saved_moments) > 0  # Adam state came back, not a fresh optimizer
    run(model, optimizer, scheduler, backend, state)
    # Same batches, same optimizer state: the same losses. CPU float32 kernels are not bitwise repeatable
    # across processes' allocations, and Adam turns ~1e-7 gradient noise into lr-sized steps on near-zero
    # gradients, so losses (not raw weights) are compared, at a tolerance far below one step's change.
    assert [h["step"] for h in state.history] == [h["step"] for h in straight_state.history]
    for resumed, straight in zip(state.history, straight_state.history):
        for key in ("train_loss", "eval_loss"):
            if key in straight:
                assert resumed[key] == pytest.approx(straight[key], abs=5e-3), (resumed, straight)


def test_base_weights_are_hashed_once_and_again_when_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMILL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "base"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"weights v1")
    real = hashlib.sha256(b"weights v1").hexdigest()
    assert lora_model.weights_sha256(folder) == real  # one file: its own sha256
    [record_path] = (tmp_path / "cache" / "weight-hashes").iterdir()
    record = json.loads(record_path.read_text())
    assert record["files"]["model.safetensors"]["sha256"] == real

    # A new process (no in-memory memo) takes the hash from the record, without reading the file: a record
    # that says otherwise wins while the file's size and mtime are unchanged.
    lora_model._weight_hashes.clear()
    record["files"]["model.safetensors"]["sha256"] = "f" * 64
    record_path.write_text(json.dumps(record))
    assert lora_model.weights_sha256(folder) == "f" * 64

    # Touched (new mtime, same size): read again, and the record corrected.
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert lora_model.weights_sha256(folder) == real
    assert json.loads(record_path.read_text())["files"]["model.safetensors"]["sha256"] == real

    # Rewritten in memory's sight (size changes): this process notices too.
    weights.write_bytes(b"weights v2, longer")
    assert lora_model.weights_sha256(folder) == hashlib.sha256(b"weights v2, longer").hexdigest()

    # Sharded weights: the sha256 of the files' "name sha256" lines.
    (folder / "model-2.safetensors").write_bytes(b"shard 2")
    lines = "".join(f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in sorted(folder.iterdir()))
    assert lora_model.weights_sha256(folder) == hashlib.sha256(lines.encode()).hexdigest()
    assert lora_model.weights_sha256(tmp_path / "not-there") is None


def test_ddp_all_reduces_once_per_optimizer_step(tiny_model_dir, tmp_path):
    """grad_accum=2 under DDP: every micro batch but the step's last runs in no_sync, so the gradients are all-reduced
    once per optimizer step (a comm hook counts the bucket all-reduces), and the steps are those of an unwrapped
    model's plain accumulation."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    tokenizer = load_tokenizer(ModelSource(id=str(tiny_model_dir)), tiny_model_dir)
    examples, _ = load_examples(str(DATA / "support/train.jsonl"), {}, tokenizer, 256, "drop")
    shard = Shard(examples[:16], examples[16:18], rank=0, world_size=1)

    def history(grad_accum: int, ddp: bool) -> tuple[list[dict], int]:
        cfg = Training(max_steps=3, learning_rate=1e-2, micro_batch_size=2, grad_accum=grad_accum, eval_every=3,
                       checkpoint_every=3, warmup_steps=0)
        torch.manual_seed(0)
        model, backend = load(tiny_model_dir)
        optimizer, scheduler = build_optimizer(model, cfg, cfg.max_steps)
        all_reduces = []
        if ddp:
            model = torch.nn.parallel.DistributedDataParallel(model)
            model.register_comm_hook(None, lambda group, bucket: all_reduces.append(bucket.index()) or
                                     allreduce_hook(group, bucket))
        state = train(model, optimizer, scheduler, shard, cfg, TrainState(), lambda *_: None,
                      pad_id=tokenizer.pad_token_id, device=backend.device)
        timeless = [{k: v for k, v in h.items() if k not in ("train_seconds", "tokens_per_second")}
                    for h in state.history]
        return timeless, len(all_reduces)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        _, per_step = history(grad_accum=1, ddp=True)
        assert per_step % 3 == 0 and per_step > 0
        buckets = per_step // 3
        accumulated, all_reduces = history(grad_accum=2, ddp=True)
        assert all_reduces == 3 * buckets  # without no_sync: 6 * buckets, one per micro batch
    finally:
        dist.destroy_process_group()
    plain, _ = history(grad_accum=2, ddp=False)
    assert [h["step"] for h in accumulated] == [0, 1, 2, 3]
    for with_ddp, without in zip(accumulated, plain):
        assert with_ddp == pytest.approx(without, rel=1e-5), (with_ddp, without)
