"""The training loop: optimizer steps, periodic eval, resumable state. No Ray here: the Ray worker passes a
``report`` callback that turns metrics and checkpoint requests into ``ray.train.report`` calls.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lora.config import Training
from lora.data import LabelledExample, TokenizedExample, collate, collate_packed, epoch_order
from lora.fast import fused_loss_in_evaluation

STATE_FILE = "trainer_state.pt"
LENGTH_GROUP_WINDOW = 16
"""Micro batches per length-sorting window (``train.group_by_length``)."""
PACKED_ROW_TOKENS = 2048
"""Row length of packed micro batches under SDPA (flex attention takes one row of the whole budget), unless
``max_seq_len`` is longer or ``batch_tokens`` shorter. On an H200 the 1B shape trained as fast on rows of 512, 1024
and 2048 tokens; rows of 4096 took more memory (6.1 GiB instead of 3.7 at 8k tokens a step) and were slower at 16k and
32k (bench/SPEED_NOTES.md): longer rows waste less of their end, but under SDPA a row's attention grows with the
square of its length."""
GPU_BATCH_TOKENS = 16384
"""``train.batch_tokens`` of a GPU run of a causal LM whose config leaves it unset (``gpu_batch_tokens``): on an H200
the 1B shape in 4-bit trained 27k real tokens/s at 16k tokens a step and 30.5k at 32k, for 5 GiB instead of 9
(bench/results/realdata_h200.md); 8B: 6.6k and 6.9k, for 15 GiB instead of 25."""
ACTIVATION_BYTES = {True: 10, False: 100}
"""Activation bytes a packed step keeps per token, per unit of hidden size x layers, with and without gradient
checkpointing, from the growth of the peak memory between budgets on an H200, rounded up. With it: 9.3 (1B shape)
and 5.7 (8B) between 8k and 32k tokens (torch's peak allocation). Without it: 83 (1B shape, ``loramill train`` with
Liger kernels, nvidia-smi's peak between 8k, 16k and 32k tokens; bench/results/ddp_h200.md); 200, the estimate it
replaced, halved the 1B shape's budget to 8k tokens on an H200, 1.33x slower than 16k for 44 of 140 GiB."""
HISTORY_FILE = "history.json"
TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"
"""What ``lora.method`` last_layers or full writes instead of a PEFT adapter: the trained tensors, by their names in
the base model (load them over the base with ``load_state_dict(strict=False)``)."""
TRAINED_INFO_FILE = "trained_weights.json"


@dataclass
class TrainState:
    """Where training is: enough to resume exactly (the data position included)."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    batch_in_epoch: int = 0
    """Micro batches of ``epoch`` already consumed on this rank."""
    train_seconds: float = 0.0
    """Wall time inside optimizer steps (forward, backward, step), excluding eval and checkpoints."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per report: step, train_loss, and eval_loss/eval_perplexity when evaluated."""
    base_eval_loss: float | None = None
    """Held-out loss of the base model (adapter disabled, or before the first step), measured once."""
    tokens: int = 0
    """Real (non-padding) tokens all ranks trained on: ``tokens / train_seconds`` is the run's throughput."""
    resumed_from_step: list[int] = field(default_factory=list)
    """The step each restart continued from (one entry per resume from a checkpoint): the steps redone after a
    failure are the ones between that step and where the failed attempt was."""
    base_eval: str = "measured in this run"
    """Where ``base_eval_loss`` comes from: this run, or an identical earlier measurement (``lora.base_eval``)."""


@dataclass(frozen=True)
class Batching:
    """How an epoch is cut into micro batches. Padded (``row_len`` None): ``micro_batch_size`` examples, each a row
    padded to the longest. Packed (``train.batch_tokens``): rows of ``row_len`` tokens filled with whole examples,
    ``rows`` rows a micro batch, no padding between examples; with flex attention one row of the whole budget."""

    micro_batch_size: int
    seed: int
    group_by_length: bool = False
    row_len: int | None = None
    rows: int = 0

    @classmethod
    def of(cls, cfg: Training) -> Batching:
        if cfg.batch_tokens is None:
            return cls(cfg.micro_batch_size, cfg.seed, cfg.group_by_length)
        if cfg.attention == "flex_attention":  # its block mask skips the other examples: a wide row costs nothing
            return cls(cfg.micro_batch_size, cfg.seed, row_len=cfg.batch_tokens, rows=1)
        # SDPA's dense mask costs a row's width squared
        row_len = min(cfg.batch_tokens, max(cfg.max_seq_len, PACKED_ROW_TOKENS))
        return cls(cfg.micro_batch_size, cfg.seed, row_len=row_len, rows=cfg.batch_tokens // row_len)

    @property
    def packed(self) -> bool:
        return self.row_len is not None

    def describe(self) -> str:
        if self.packed:
            return f"packed: {self.rows} row(s) of {self.row_len} tokens a micro batch, examples kept apart"
        grouped = ", grouped by length" if self.group_by_length else ""
        return f"padded: {self.micro_batch_size} examples a micro batch{grouped}"

    def collate(self, micro_batch: list[list[TokenizedExample]] | list[list[LabelledExample]],
                pad_id: int) -> dict[str, torch.Tensor]:
        """The model inputs of one micro batch (rows of examples, as ``Shard.micro_batch`` gives them)."""
        if self.packed:  # every row row_len wide: a new shape each step costs more than the few padded tokens
            return collate_packed(micro_batch, pad_id, width=self.row_len)
        return collate([row[0] for row in micro_batch], pad_id)


def gpu_batch_tokens(hidden_size: int, layers: int, free_bytes: int, cfg: Training) -> int:
    """The token budget a GPU run gets when ``train.batch_tokens`` is unset: ``GPU_BATCH_TOKENS``, halved while the
    step's activations (``ACTIVATION_BYTES``) would take more than half of the memory left free after loading the
    base; never below one row of ``max_seq_len``. Every rank must pass the same ``free_bytes`` (the least of them):
    ranks with other budgets would take different numbers of micro batches."""
    per_token = ACTIVATION_BYTES[cfg.gradient_checkpointing] * hidden_size * layers
    budget = GPU_BATCH_TOKENS
    while budget > cfg.max_seq_len and budget * per_token > free_bytes / 2:
        budget //= 2
    return max(budget, cfg.max_seq_len)


def pack_rows(order: list[int], lengths: list[int], row_len: int, rows: int) -> list[list[list[int]]]:
    """Micro batches of ``rows`` rows, each row examples (indices into ``lengths``) whose lengths sum to at most
    ``row_len``: each example, in ``order``, goes into the first row of the open micro batch with room for it, or a
    new row; when ``rows`` rows are open and none has room, the micro batch closes. The short examples of the order
    fill the gaps the long ones leave, and the order stays random across micro batches."""
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    room: list[int] = []
    for index in order:
        n = lengths[index]
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None and len(current) == rows:
            batches.append(current)
            current, room = [], []
        if slot is None:
            current.append([])
            room.append(row_len)
            slot = len(current) - 1
        current[slot].append(index)
        room[slot] -= n
    if current:
        batches.append(current)
    return batches


@dataclass
class Shard:
    """This rank's share of the data: every rank gets the same number of micro batches per epoch."""

    train: list[TokenizedExample] | list[LabelledExample]
    eval: list[TokenizedExample] | list[LabelledExample]
    """This rank's share of the held-out set (``eval_share``)."""
    rank: int
    world_size: int
    _plans: dict[tuple[int, Batching], list[list[list[int]]]] = field(default_factory=dict, repr=False)

    def plan(self, epoch: int, batching: Batching) -> list[list[list[int]]]:
        """This rank's micro batches of ``epoch``: rows of example indices. Deterministic, so a resumed run sees the
        same micro batch at the same position. The same global shuffle on every rank; padded micro batches take a
        strided split of it, packed ones are packed from the whole order, ``rows x world_size`` rows a round, whose
        rows are dealt out in turn: ranks never share an example, every rank gets one micro batch a round, and the
        ranks' micro batches of a round differ by at most one row, also in an epoch's last, partial round (dealt out
        as whole micro batches, a rank had the small tail of the epoch alone: on 2 H200s, with a few micro batches
        an epoch, rank 0 trained 63% of the tokens and the other waited for it).

        ``group_by_length`` (padded only): each window of ``LENGTH_GROUP_WINDOW`` micro batches of that order is sorted
        by length and cut into micro batches, which are then taken in a shuffled order: batches of similar lengths
        (little padding), while what a window holds, and the order of the windows, stay random.
        """
        key = (epoch, batching)
        if key in self._plans:
            return self._plans[key]
        order = epoch_order(len(self.train), epoch, batching.seed)
        if batching.packed:
            lengths = [len(e.input_ids) for e in self.train]
            rounds = pack_rows(order, lengths, batching.row_len, batching.rows * self.world_size)
            plan = [rows[self.rank :: self.world_size] for rows in rounds if len(rows) >= self.world_size]
        else:
            size = batching.micro_batch_size
            order = order[self.rank :: self.world_size]
            order = order[: len(self.train) // self.world_size // size * size]  # whole micro batches only
            if batching.group_by_length:
                order = self._grouped(order, size, f"{batching.seed}/{epoch}")
            plan = [[[i] for i in order[k : k + size]] for k in range(0, len(order), size)]
        self._plans = {key: plan}  # one epoch at a time: a plan of a large set is not small
        return plan

    def _grouped(self, order: list[int], size: int, salt: str) -> list[int]:
        window_size = size * LENGTH_GROUP_WINDOW
        grouped = []
        for start in range(0, len(order), window_size):
            window = sorted(order[start : start + window_size], key=lambda i: len(self.train[i].input_ids))
            batches = [window[k : k + size] for k in range(0, len(window), size)]
            random.Random(f"{salt}/{start}").shuffle(batches)
            grouped += [i for batch in batches for i in batch]
        return grouped

    def batches_per_epoch(self, batching: Batching, epoch: int = 0) -> int:
        return len(self.plan(epoch, batching))

    def micro_batch(self, epoch: int, index: int, batching: Batching) -> list[list]:
        """Micro batch ``index`` of ``epoch`` on this rank: its rows of examples (one example a row when padded)."""
        return [[self.train[i] for i in row] for row in self.plan(epoch, batching)[index]]

    def padding_fraction(self, batching: Batching) -> float:
        """Share of the tokens in one epoch's micro batches that are padding (what the model processes for nothing)."""
        padded = real = 0
        for rows in self.plan(0, batching):
            lengths = [sum(len(self.train[i].input_ids) for i in row) for row in rows]
            padded += (batching.row_len or max(lengths)) * len(lengths)
            real += sum(lengths)
        return 1 - real / padded if padded else 0.0


def eval_share(examples: list, max_eval_examples: int | None, rank: int, world_size: int) -> list:
    """This rank's share of the held-out set: the first ``max_eval_examples`` of the whole set, strided across ranks.

    The cap comes first, so every worker count evaluates the same examples (``evaluate`` sums loss and token counts
    across ranks): 5 of 8 examples on 2 workers are 3 + 2, not 5 + 3.
    """
    return examples[:max_eval_examples][rank::world_size]


def total_steps(shard: Shard, cfg: Training) -> int:
    """``max_steps`` if set, else ``epochs`` passes: steps = batches_per_epoch * epochs / grad_accum (packed epochs
    differ by a micro batch or so; the first one's count stands for all)."""
    batches = shard.batches_per_epoch(Batching.of(cfg))
    if batches == 0:
        what = (f"{cfg.batch_tokens} tokens" if cfg.batch_tokens else f"{cfg.micro_batch_size} examples")
        knob = "train.batch_tokens" if cfg.batch_tokens else "train.micro_batch_size"
        raise ValueError(
            f"{len(shard.train)} training examples cannot fill one micro batch of {what} "
            f"on each of {shard.world_size} workers; lower {knob} or add data"
        )
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.floor(batches * cfg.epochs / cfg.grad_accum))


def build_optimizer(model: nn.Module, cfg: Training, steps: int,
                    loraplus_ratio: float = 1.0) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable (LoRA) parameters and the configured schedule; fused kernels on CUDA.

    ``loraplus_ratio`` above 1 (``lora.loraplus_ratio``): LoRA+, through PEFT's ``create_loraplus_optimizer``, whose
    parameter groups give B (and every 1-d parameter: DoRA's magnitudes) ``learning_rate x ratio``; the schedule
    scales every group alike.
    """
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = params[0].is_cuda
    if loraplus_ratio != 1.0:
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(getattr(model, "module", model), torch.optim.AdamW,
                                              lr=cfg.learning_rate, loraplus_lr_ratio=loraplus_ratio, fused=on_cuda)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, fused=on_cuda)
    scheduler = get_scheduler(
        cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps
    )
    return optimizer, scheduler


@torch.no_grad()
def evaluate(
    model: nn.Module, examples: list[TokenizedExample] | list[LabelledExample], batch_size: int, pad_id: int,
    device: torch.device, batching: Batching | None = None,
) -> dict[str, float]:
    """Held-out metrics, summed across ranks if distributed; ``batch_size`` examples a forward pass, or packed rows
    as ``batching`` says (the same sums: packing keeps examples apart).

    Causal LM: ``eval_loss`` (token-weighted mean over the assistant tokens) and ``eval_perplexity``; the model's own
    loss (fused on CUDA: the logits of a large packed batch are never materialised) times its target count.
    Sequence classification: ``eval_loss`` (mean cross-entropy per example) and ``eval_accuracy``.
    """
    classify = isinstance(examples[0], LabelledExample)
    batching = batching if batching is not None and batching.packed else Batching(batch_size, seed=0)
    order = list(range(len(examples)))
    if batching.packed:
        plan = pack_rows(order, [len(e.input_ids) for e in examples], batching.row_len, batching.rows)
    else:
        plan = [[[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
    own = len(plan)
    if sharded_root(model) is not None:
        # Each forward of a sharded model gathers every block's weights from all ranks, so all ranks must run as
        # many: one whose share makes fewer micro batches (an example less, or packed tighter) runs its first one
        # again, uncounted.
        most = torch.tensor(own, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        plan = plan + plan[:1] * (int(most) - own)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    fused_loss = {} if classify else fused_loss_in_evaluation(model)
    with adapter_autocast(model):  # no weight changes inside: one context for all forwards
        for index, rows in enumerate(plan):
            batch = {k: v.to(device) for k, v in batching.collate([[examples[i] for i in row] for row in rows],
                                                                  pad_id).items()}
            if index >= own:
                model(**batch)
                continue
            if classify:
                targets = batch.pop("labels")
                logits = model(**batch).logits.float()
                loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").double()
                correct += (logits.argmax(-1) == targets).sum()
                count += len(targets)
            else:
                targets = (batch["labels"][:, 1:] != -100).sum()
                loss_sum += model(**batch, **fused_loss).loss.double() * targets
                count += targets
    loss_sum, count, correct = all_ranks(torch.stack([loss_sum, count, correct]))
    model.train(was_training)
    eval_loss = loss_sum / max(count, 1)
    if classify:
        return {"eval_loss": eval_loss, "eval_accuracy": correct / max(count, 1)}
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}


def all_ranks(totals: torch.Tensor) -> list[float]:
    """``totals`` summed over the ranks of a distributed run (as they are on one process), read in one transfer."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


def has_adapter(model: nn.Module) -> bool:
    """A PEFT model (``lora.method: lora``), rather than a base whose own weights train (last_layers, full)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapter_autocast(model: nn.Module) -> contextlib.AbstractContextManager:
    """Around a forward pass: the adapter's matmuls in bfloat16 when the base computes in bfloat16 (CUDA by
    default), its weights and their optimizer state staying float32. Outside it, peft casts each adapted layer's
    input up to its float32 weights, so every LoRA matmul runs in float32: on an H200, 1B QLoRA at 8k tokens a step,
    those were ~50 ms of a 225 ms step as non-tensor-core GEMMs, plus the casts (bench/SPEED_NOTES.md, section 6).
    Only the forward: autocast caches the weights' casts until it exits, and the optimizer changes them. float16
    bases keep float32 adapter matmuls (float16 gradients would need loss scaling)."""
    if base_compute_dtype(model) != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def adapter_inputs_uncast(model: nn.Module):
    """While training under ``adapter_autocast``: peft leaves the adapted layers' inputs in bfloat16 instead of
    casting them to float32 first (autocast casts the small weights instead). For the whole run, not each forward:
    gradient checkpointing recomputes the forward during backward and must find the same dtypes."""
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model, active=base_compute_dtype(model) == torch.bfloat16):
        yield


def base_compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the base computes in: its input embeddings' (a 4-bit base keeps those unquantized)."""
    return getattr(model, "module", model).get_input_embeddings().weight.dtype


def base_model_view(model: nn.Module):
    """A context in which ``model`` computes as its base: a PEFT adapter switched off. A model without one
    (``lora.method`` last_layers or full) is its own base before the first step."""
    return model.disable_adapter() if has_adapter(model) else contextlib.nullcontext()


def sharded_root(model: nn.Module):
    """The outermost FSDP2 module of a sharded model (``train.strategy: fsdp``), or None."""
    from torch.distributed.fsdp import FSDPModule

    return next((m for m in model.modules() if isinstance(m, FSDPModule)), None)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """Reduce gradients across ranks only on the optimizer step's last micro batch (``sync``): the others
    accumulate locally (DDP's ``no_sync``; FSDP2's ``set_requires_gradient_sync(False)``, which keeps them unsharded
    until then), so a step with grad_accum micro batches costs one all-reduce or reduce-scatter, not grad_accum.
    """
    if sync:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif (root := sharded_root(model)) is not None:
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)
    else:
        yield


Report = Callable[[dict[str, float], TrainState, bool], None]
"""``report(metrics, state, checkpoint)``: called on every rank; ``checkpoint`` asks for a resumable save."""


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    shard: Shard,
    cfg: Training,
    state: TrainState,
    report: Report,
    *,
    pad_id: int,
    device: torch.device,
    progress: Callable[[int], None] = lambda steps_done: None,
    base_metrics: dict[str, float] | None = None,
) -> TrainState:
    """Run optimizer steps from ``state`` to the end, evaluating and checkpointing at the configured intervals.

    ``model`` may be DDP-wrapped or FSDP-sharded; the base-model metrics are measured once (adapter disabled) before
    step 1, unless ``base_metrics`` gives them (measured before on the same base, examples and settings).
    Evaluation runs on the unwrapped model: it needs none of DDP's collectives (DDP's first forward after a synced
    step broadcasts buffers), only ``evaluate``'s own all-reduce of its sums (a sharded model is its own unwrapped
    model: its forwards gather the weights).
    """
    steps = total_steps(shard, cfg)
    batching = Batching.of(cfg)
    peft_model = getattr(model, "module", model)
    with adapter_inputs_uncast(peft_model):
        if state.base_eval_loss is None:
            if base_metrics is None:
                with base_model_view(peft_model):
                    base_metrics = evaluate(peft_model, shard.eval, cfg.micro_batch_size, pad_id, device, batching)
            base = {"step": 0} | base_metrics
            state.base_eval_loss = base["eval_loss"]
            state.history.append(base)
            report(base, state, False)
        model.train()
        while state.step < steps:
            started = time.perf_counter()
            loss_sum, tokens = torch.zeros((), device=device), 0
            for micro_index in range(cfg.grad_accum):
                if state.batch_in_epoch >= shard.batches_per_epoch(batching, state.epoch):
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                micro = shard.micro_batch(state.epoch, state.batch_in_epoch, batching)
                state.batch_in_epoch += 1
                tokens += sum(len(e.input_ids) for row in micro for e in row)
                batch = {k: v.to(device, non_blocking=True) for k, v in batching.collate(micro, pad_id).items()}
                with gradient_sync(model, micro_index == cfg.grad_accum - 1):
                    with adapter_autocast(model):
                        loss = model(**batch).loss / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()  # read once a step: each .item() would wait for the GPU
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # Read once a step, and waits for the step to finish on the GPU: the time below is the step's.
            train_loss, step_tokens = all_ranks(torch.stack([loss_sum, torch.tensor(float(tokens), device=device)]))
            state.tokens += int(step_tokens)
            train_loss /= shard.world_size
            state.step += 1
            state.train_seconds += time.perf_counter() - started
            progress(state.step)

            metrics = {"step": state.step, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0]}
            is_last = state.step == steps
            if state.step % cfg.eval_every == 0 or is_last:
                metrics |= evaluate(peft_model, shard.eval, cfg.micro_batch_size, pad_id, device, batching)
            metrics |= {"train_seconds": state.train_seconds, "tokens_per_second": state.tokens / state.train_seconds}
            state.history.append(metrics)
            if "eval_loss" in metrics or state.step % cfg.checkpoint_every == 0:
                report(metrics, state, state.step % cfg.checkpoint_every == 0 or is_last)
    return state


def save_adapter(model: nn.Module, directory: Path, base_model_id: str,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """PEFT's adapter folder (adapter_config.json + adapter_model.safetensors), naming the base by its public id.

    peft writes ``base_model_name_or_path`` as the local folder it loaded from; a published adapter must name
    the model users can find instead. A model without an adapter (``lora.method`` last_layers or full) gets
    ``trained_weights.safetensors`` instead: its trained tensors under their names in the base; adapter layers
    get theirs (``lora.bottleneck.save``).

    A PiSSA/OLoRA adapter trained on a base whose weights it changed (W - B0.A0); it is saved converted for the
    original base, as PEFT's ``path_initial_model_for_weight_conversion`` does it: rank 2r, A' = [A; A0],
    B' = [B, -B0], alpha doubled (x sqrt 2 with rsLoRA), so that W + B'.A' x scale = (W - B0.A0) + B.A x scale.
    """
    from lora import bottleneck

    peft_model = getattr(model, "module", model)
    if bottleneck.attached(peft_model) is not None:
        bottleneck.save(peft_model, directory, base_model_id)
        return
    if not has_adapter(peft_model):
        save_trained_weights(peft_model, directory, base_model_id)
        return
    initial = getattr(peft_model, "loramill_initial_adapter", None)
    if initial is None:
        # state_dict: a sharded run's LoRA tensors, gathered (its parameters hold a rank's shard only)
        peft_model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    else:
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as scratch:
            # PEFT reads B0 and A0 from an adapter folder: its config (written there by save_pretrained itself) and
            # these weights, kept in memory since apply_lora.
            (Path(scratch) / "initial").mkdir()
            save_file({k: v.contiguous() for k, v in initial.items()},
                      Path(scratch) / "initial" / "adapter_model.safetensors")
            with warnings.catch_warnings():
                # peft loads B0/A0 as a second adapter to subtract them, and warns that PiSSA/OLoRA should not be
                # combined with other adapters, suggesting the conversion this is.
                warnings.filterwarnings("ignore", message="(PiSSA|OLoRA) changes the base weights")
                peft_model.save_pretrained(directory, safe_serialization=True,
                                           path_initial_model_for_weight_conversion=str(Path(scratch) / "initial"))
    config_path = directory / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_model_id
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))


def trained_half(converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained A and B of a PiSSA/OLoRA adapter that ``save_adapter`` saved converted ([A; A0], [B, -B0]): the
    first half of each, which is what the model (on its changed base) trains on when a run resumes."""
    halves = {}
    for name, tensor in converted.items():
        if "lora_A" in name:
            halves[name] = tensor[: tensor.shape[0] // 2]
        elif "lora_B" in name:
            halves[name] = tensor[:, : tensor.shape[1] // 2]
        else:
            halves[name] = tensor
    return halves


def trained_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_trained_weights(model: nn.Module, directory: Path, base_model_id: str) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights = trained_weights(model)
    save_file({name: t.contiguous() for name, t in weights.items()}, directory / TRAINED_WEIGHTS_FILE)
    info = {"base_model_name_or_path": base_model_id, "parameters": sum(t.numel() for t in weights.values()),
            "tensors": len(weights), "label2id": getattr(model.config, "label2id", None)}
    (directory / TRAINED_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))


def load_trained_weights(model: nn.Module, directory: Path) -> None:
    """Put saved trained tensors (``save_adapter`` of a model without adapter) into ``model``; every name must exist."""
    from safetensors.torch import load_file

    weights = load_file(directory / TRAINED_WEIGHTS_FILE, device=str(next(model.parameters()).device))
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{directory}: {len(unexpected)} saved tensors are not in the model, e.g. {unexpected[0]}")


def load_trained(base_model: nn.Module, directory: Path) -> nn.Module:
    """``base_model`` with what a run trained, from the run's ``adapter/`` folder (eval mode): its PEFT adapter, or
    the trained weights of a ``lora.method`` last_layers / full run. The base must be loaded as for training (same
    task and labels)."""
    from lora.bottleneck import is_adapter_layers

    if (directory / "adapter_config.json").is_file() or is_adapter_layers(directory):
        from lora.generate import load_with_adapter

        return load_with_adapter(base_model, directory)
    load_trained_weights(base_model, directory)
    return base_model.eval()


@dataclass(frozen=True)
class GatheredState:
    """What a sharded run (``train.strategy: fsdp``) saves, gathered in full from the ranks' shards onto rank 0's CPU
    (the other ranks get empty dicts): the trainable tensors under the model's parameter names, and the optimizer's
    state keyed by those names."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def gather_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> GatheredState:
    """Collective: every rank of a sharded run calls it, then rank 0 passes it to ``save_training_state``. Only the
    trainable tensors travel: the frozen base is never gathered whole."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = get_model_state_dict(model, options=options)
    # ignore_frozen_params still returns a frozen weight tied to another one (SmolLM2's lm_head is its embedding).
    return GatheredState({name: t for name, t in weights.items() if name in trainable},
                         get_optimizer_state_dict(model, optimizer, options=options))


def save_training_state(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    base_model_id: str,
    gathered: GatheredState | None = None,
) -> None:
    """Adapter (safetensors) + optimizer/scheduler/position (``trainer_state.pt``) + readable history.

    A sharded run passes ``gathered`` (``gather_training_state``): its adapter is written from those full tensors, and
    ``trainer_state.pt`` also keeps them under the model's parameter names, which is what FSDP's loader takes back
    (the adapter file has PEFT's names, without the adapter's).
    """
    save_adapter(model, directory / "adapter", base_model_id, state_dict=None if gathered is None else gathered.weights)
    rng = {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    resumable = {"optimizer": optimizer.state_dict() if gathered is None else gathered.optimizer,
                 "scheduler": scheduler.state_dict(), "state": asdict(state), "rng": rng}
    if gathered is not None:
        resumable["weights"] = gathered.weights
    torch.save(resumable, directory / STATE_FILE)
    (directory / HISTORY_FILE).write_text(json.dumps(state.history, indent=1))


def load_training_state(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainState:
    """Restore what ``save_training_state`` wrote; returns the position to continue from. A sharded model takes its
    rank's shard of the full tensors that ``trainer_state.pt`` holds."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from lora import bottleneck

    peft_model = getattr(model, "module", model)
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    sharded = sharded_root(model) is not None
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)  # strict: the frozen base is not in it
        set_model_state_dict(model, saved["weights"], options=options)
        set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=options)
    elif bottleneck.attached(peft_model) is not None:
        bottleneck.load_weights(peft_model, directory / "adapter")
    elif has_adapter(peft_model):
        weights = load_file(directory / "adapter" / "adapter_model.safetensors",
                            device=str(next(model.parameters()).device))
        if getattr(peft_model, "loramill_initial_adapter", None) is not None:
            weights = trained_half(weights)
        set_peft_model_state_dict(peft_model, weights)
    else:
        load_trained_weights(peft_model, directory / "adapter")
    if not sharded:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["cpu"])  # LoRA dropout draws from it: resumed == uninterrupted
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return TrainState(**saved["state"])
