"""Token-budget micro batches packed padding-free (``train.batch_tokens``): the packed forward keeps examples apart,
so each example's loss, a step's gradients and the held-out metrics are those of padded batches of the same examples;
the epoch plan gives every example once, ranks apart, and the same plan to a resumed run."""


import pytest
import torch
from torch import nn

from lora.config import ConfigError, ModelSource, Training, load_config
from lora.data import IGNORE_INDEX, TokenizedExample, collate, collate_packed, epoch_order, load_examples
from lora.fast import use_packed_attention
from lora.model import Backend, load_tokenizer
from lora.train import Batching, Shard, evaluate, gpu_batch_tokens, pack_rows
from tests.conftest import DATA
from tests.test_model import load



@pytest.fixture(scope="module")
def legal(tiny_model_dir) -> tuple[list[TokenizedExample], int]:
    tokenizer = load_tokenizer(ModelSource(id=str(tiny_model_dir)), tiny_model_dir)
    examples, _ = load_examples(str(DATA / "legal/train.jsonl"), {}, tokenizer, 256, "drop")
    return examples, tokenizer.pad_token_id


def _token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every position's next-token target (0 where there is none), shape (rows, width - 1)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")


def test_each_example_in_a_packed_row_scores_as_it_does_alone(tiny_model_dir, legal):
    examples, pad_id = legal
    model, _ = load(tiny_model_dir, mode="none")
    model.eval()
    rows = [examples[0:3], examples[3:5]]  # several examples a row, rows of different lengths (padded tail)
    assert all(sum(len(e.input_ids) for e in row) < 600 for row in rows)
    with torch.no_grad():
        packed = _token_losses(model, collate_packed(rows, pad_id))
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                n = len(example.input_ids)
                alone = _token_losses(model, collate([example], pad_id))[0]
                # Position t predicts token t + 1: the example's own targets are positions start .. start + n - 2.
                torch.testing.assert_close(packed[r, start : start + n - 1], alone, rtol=1e-4, atol=1e-5)
                start += n
                # From an example's last token to the next example's first (or the padding): no target.
                assert torch.count_nonzero(packed[r, start - 1 :][:1]) == 0


def test_a_packed_step_has_the_gradients_of_the_padded_step(tiny_model_dir, legal):
    examples, pad_id = legal
    micro_batch = examples[:6]

    def step(batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model, _ = load(tiny_model_dir, mode="none")
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which leaves A without gradient: compare both
                nn.init.normal_(p, std=0.02)
        model.train()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    padded_loss, padded = step(collate(micro_batch, pad_id))
    packed_loss, packed = step(collate_packed([micro_batch[:4], micro_batch[4:]], pad_id))
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert padded and padded.keys() == packed.keys()
    assert all(g.abs().sum() > 0 for g in padded.values())
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_evaluation_equals_padded_evaluation(tiny_model_dir, legal):
    examples, pad_id = legal
    model, backend = load(tiny_model_dir, mode="none")
    padded = evaluate(model, examples[:12], 4, pad_id, backend.device)
    packed = evaluate(model, examples[:12], 4, pad_id, backend.device, Batching(4, 0, row_len=512, rows=2))
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)


def test_flex_attention_keeps_apart_the_examples_of_a_row_as_wide_as_the_budget(tiny_model_dir, legal):
    """CUDA's packed attention: one row of the whole budget, flex attention's block mask keeping each example to
    itself. Forward only: flex attention has no backward pass on CPU (tests/test_gpu.py compares its step with
    SDPA's on CUDA)."""
    examples, pad_id = legal
    model, backend = load(tiny_model_dir, mode="none")
    model.eval()
    batching = Batching.of(Training(batch_tokens=1024, max_seq_len=256, attention="flex_attention"))
    assert (batching.rows, batching.row_len) == (1, 1024)
    rows = Shard(examples, [], 0, 1).micro_batch(0, 0, batching)
    assert len(rows) == 1 and len(rows[0]) >= 4  # several examples, short of the row's end (padding)
    batch = batching.collate(rows, pad_id)
    assert (batch["input_ids"] == pad_id).any()
    try:
        assert use_packed_attention(model, "flex_attention", backend, packed=True, world_size=1)[0] == "flex_attention"
        assert model.config._attn_implementation == "flex_attention"
        with torch.no_grad():
            packed = _token_losses(model, batch)[0]
            flex_eval = evaluate(model, examples[:12], 4, pad_id, backend.device, batching)
    finally:
        use_packed_attention(model, "sdpa", backend, packed=True, world_size=1)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        start = 0
        for example in rows[0]:
            n = len(example.input_ids)
            alone = _token_losses(model, collate([example], pad_id))[0]
            torch.testing.assert_close(packed[start : start + n - 1], alone, rtol=1e-4, atol=1e-5)
            start += n
        padded_eval = evaluate(model, examples[:12], 4, pad_id, backend.device)
    assert flex_eval["eval_loss"] == pytest.approx(padded_eval["eval_loss"], rel=1e-5)


def test_auto_attention_is_flex_for_packed_batches_on_one_cuda_worker_only(tiny_model_dir):
    model, cpu = load(tiny_model_dir, mode="none")
    cuda = Backend(torch.device("cuda"), cpu.compute_dtype, cpu.four_bit)  # the choice only: nothing runs on it
    assert use_packed_attention(model, "auto", cpu, packed=True, world_size=1)[1] == (
        "attention: sdpa (flex attention has no backward pass on CPU)")
    assert use_packed_attention(model, "auto", cuda, packed=False, world_size=1)[0] == "sdpa"
    assert use_packed_attention(model, "auto", cuda, packed=True, world_size=2)[0] == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    assert use_packed_attention(model, "auto", cuda, packed=True, world_size=1)[0] == "flex_attention"
    assert model.config._attn_implementation == "flex_attention"
    # SDPA's rows stay as wide as max(max_seq_len, 2048) within the budget, several a micro batch.
    sdpa = Batching.of(Training(batch_tokens=16384, max_seq_len=1024, attention="sdpa"))
    assert (sdpa.rows, sdpa.row_len) == (8, 2048)


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("rows", [3, 1])  # SDPA's rows; flex attention's one row of the budget
def test_the_packed_plan_gives_each_example_once_ranks_apart_within_the_budget(world_size, rows):
    lengths = [int(n) for n in torch.randint(10, 400, (203,), generator=torch.Generator().manual_seed(1))]
    examples = [TokenizedExample([i] * n, [i] * n) for i, n in enumerate(lengths)]
    batching = Batching(4, seed=7, row_len=512, rows=rows)
    plans = [Shard(examples, [], rank, world_size).plan(2, batching) for rank in range(world_size)]
    assert len({len(plan) for plan in plans}) == 1  # every rank takes the same number of micro batches
    seen = [i for plan in plans for packed in plan for row in packed for i in row]
    assert len(seen) == len(set(seen))  # no example twice, on any rank
    # Packed a round (``rows`` rows for each rank) at a time: every example but those of a last round too small to
    # give each rank a row.
    rounds = pack_rows(epoch_order(203, 2, 7), lengths, 512, rows * world_size)
    assert sorted(seen) == sorted(i for packed in rounds if len(packed) >= world_size for row in packed for i in row)
    assert all(len(packed) == rows * world_size for packed in rounds[:-1])  # only the last round can be left out
    for plan in plans:
        for packed in plan:
            assert 1 <= len(packed) <= rows
            assert all(sum(lengths[i] for i in row) <= 512 for row in packed)
    # The ranks' micro batches of a round differ by one row at most, the epoch's last round too: no rank waits for
    # another's extra micro batch.
    for same_step in zip(*plans, strict=True):
        assert max(map(len, same_step)) - min(map(len, same_step)) <= 1
    # Deterministic per epoch (a resumed run sees the same micro batch), another order the next epoch.
    assert Shard(examples, [], 0, world_size).plan(2, batching) == plans[0]
    assert Shard(examples, [], 0, world_size).plan(3, batching) != plans[0]


def test_a_budget_below_one_row_packing_a_classifier_and_flex_attention_on_cpu_are_config_errors(tiny_config_file):
    with pytest.raises(ValueError, match="batch_tokens .* must be at least max_seq_len"):
        Training(batch_tokens=128, max_seq_len=256)
    with pytest.raises(ConfigError, match="train.batch_tokens: packing is for causal LMs"):
        load_config(tiny_config_file(train={"batch_tokens": 1024}), ["task=sequence_classification"])
    with pytest.raises(ConfigError, match="train.attention: flex_attention is for packed causal LM batches on CUDA"):
        load_config(tiny_config_file(train={"batch_tokens": 1024, "attention": "flex_attention"}))


def test_a_gpu_run_without_a_budget_gets_one_that_fits_its_free_memory():
    gib = 2**30
    checkpointed = Training(gradient_checkpointing=True, max_seq_len=1024)
    # 1B shape (hidden 2048, 16 layers) on an H200 after loading: the default budget, 16k tokens.
    assert gpu_batch_tokens(2048, 16, 135 * gib, checkpointed) == 16384
    # 8B shape (4096 x 32) with 8 GiB free: 16k tokens would take 20 GiB of activations; 2k take 2.5 of the 4 allowed.
    assert gpu_batch_tokens(4096, 32, 8 * gib, checkpointed) == 2048
    # Without gradient checkpointing every token keeps 20x more, so the same GPU gets a smaller budget.
    assert gpu_batch_tokens(2048, 16, 40 * gib, Training(max_seq_len=1024)) < gpu_batch_tokens(
        2048, 16, 40 * gib, checkpointed)
    # Never below one row: a long max_seq_len on a small GPU still trains a row at a time.
    assert gpu_batch_tokens(4096, 32, 1 * gib, Training(max_seq_len=4096)) == 4096
