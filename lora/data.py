"""JSONL examples from any fsspec URL -> token ids with loss only on assistant tokens, or labelled texts.

For ``task: causal_lm`` two record formats are accepted, one JSON object per line:
- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- instruction: ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` optional)

For ``task: sequence_classification``: ``{"text": "...", "label": "..."}``, the label one of the domain's labels.

Files are streamed line by line (never loaded whole) and hashed on the way, so the sha256 fingerprint
in the audit is of exactly the bytes that were trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lora.errors import DataError
from lora.redact import redact_url, scrub_url

IGNORE_INDEX = -100
MAX_LINE_BYTES = 1 << 20
"""A single example over 1 MiB is malformed input, not a training example: refuse it before parsing."""


@dataclass
class DataStats:
    """What was read and what each filter did; published in the audit."""

    url: str
    sha256: str = ""
    examples_read: int = 0
    examples_kept: int = 0
    dropped_overlong: int = 0
    truncated_overlong: int = 0
    tokens: int = 0
    """Tokens in the kept examples (after truncation)."""
    target_tokens: int = 0
    """Of those, the assistant tokens the loss is computed on."""
    formats: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)
    """Kept examples per class label (sequence classification only)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


@dataclass
class LabelledExample:
    """A text to classify: its token ids and the id of its label (its position in ``domains[].labels``)."""

    input_ids: list[int]
    label: int


def read_jsonl(url: str, storage_options: dict[str, Any], digest: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)``; update ``digest`` with every byte read. Raises ``DataError``."""
    import fsspec

    shown = redact_url(url)  # messages reach terminals and logs: never a user:password@ part

    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            for line_number, (raw, length) in enumerate(_lines(f, MAX_LINE_BYTES), start=1):
                digest.update(raw)
                if length > MAX_LINE_BYTES:
                    raise DataError(
                        f"{shown}:{line_number}: line is {length:,} bytes (limit {MAX_LINE_BYTES:,}); "
                        "split or shorten the example"
                    )
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{shown}:{line_number}: not valid UTF-8 ({e.reason}); re-encode the file as UTF-8") from None
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{shown}:{line_number}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{shown}:{line_number}: expected a JSON object, got {type(record).__name__}")
                yield line_number, record
    except FileNotFoundError:
        raise DataError(f"{shown}: data file not found; check the domain's train/eval path") from None
    except PermissionError:
        raise DataError(f"{shown}: data file is not readable (permission denied)") from None
    except IsADirectoryError:
        raise DataError(f"{shown}: is a folder; point train/eval at a .jsonl file") from None
    except DataError:
        raise
    except Exception as e:  # unreachable server, unknown protocol, refused credentials: bad input, not a crash
        raise DataError(
            f"{shown}: cannot read the data ({type(e).__name__}: {scrub_url(str(e), url)}); check the URL, "
            "that its server is up, and the domain's storage_options"
        ) from None


def _lines(f: Any, limit: int) -> Iterator[tuple[bytes, int]]:
    """``(line, its length in bytes)`` for each line of the binary file ``f``, holding at most ``limit`` bytes of a
    line (plus one 64 KiB read): a longer line is counted to its end and yielded as ``b""``, for the caller to
    refuse by its length. Iterating ``f`` itself would read a hostile file without newlines into memory whole."""
    pending, overlong = b"", 0
    while chunk := f.read(1 << 16):
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            piece, start = chunk[start : end + 1], end + 1
            length = overlong + len(pending) + len(piece)
            yield (pending + piece if length <= limit else b""), length
            pending, overlong = b"", 0
        rest = chunk[start:]
        if overlong or len(pending) + len(rest) > limit:
            overlong, pending = overlong + len(pending) + len(rest), b""
        else:
            pending += rest
    if overlong or pending:
        yield pending, overlong + len(pending)


def to_messages(record: dict[str, Any], where: str) -> tuple[str, list[dict[str, str]]]:
    """(format name, chat messages) for a chat or instruction record; ``DataError`` naming ``where`` if invalid."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: `messages` must be a non-empty list")
        _check_roles(messages, where)
        return "chat", [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record and "output" in record:
        for key in ("instruction", "input", "output"):
            if not isinstance(record.get(key, ""), str):
                raise DataError(f"{where}: `{key}` must be a string")
        if not record["instruction"].strip() or not record["output"].strip():
            raise DataError(f"{where}: `instruction` and `output` must not be empty")
        prompt = record["instruction"].strip()
        if record.get("input", "").strip():
            prompt += "\n\n" + record["input"].strip()
        return "instruction", [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    raise DataError(
        f"{where}: unknown record format (keys: {', '.join(sorted(record)) or 'none'}); "
        'use {"messages": [...]} or {"instruction": ..., "input": ..., "output": ...}'
    )


def _check_roles(messages: list[Any], where: str) -> None:
    """Optional system first, then user/assistant alternating, ending with assistant; no empty content."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs string `role` and `content`")
        if not m["content"].strip():
            raise DataError(f"{where}: messages[{i}] ({m['role']}) has empty content")
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or turns != expected or turns[-1] != "assistant":
        raise DataError(
            f"{where}: roles {roles} are out of order; use an optional system message, then user and "
            "assistant alternating, ending with assistant"
        )


def to_labelled_text(record: dict[str, Any], where: str, labels: list[str]) -> tuple[str, int]:
    """(text, label id) of a ``{"text": ..., "label": ...}`` record; ``DataError`` naming ``where`` if invalid.

    The messages never repeat the line's values: data files may hold what must not reach logs.
    """
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: needs a non-empty string `text` (records look like "
                        '{"text": "...", "label": "..."})')
    label = record.get("label")
    if not isinstance(label, str) or label not in labels:
        raise DataError(f"{where}: `label` must be one of the domain's labels ({', '.join(labels)}); fix the line "
                        "or add the label to domains[].labels")
    return text, labels.index(label)


def check_file(url: str, storage_options: dict[str, Any], labels: list[str] | None = None,
               digest: Any = None) -> int:
    """Read and validate every record of ``url`` without tokenizing; the number of examples. Raises ``DataError``.

    ``labels``: the domain's class labels for sequence classification; None for chat/instruction records.
    ``digest`` (a hashlib object) is fed every byte read: the file's fingerprint, as training records it.
    Run on the driver before any Ray work starts, so bad data fails in seconds with its file and line.
    """
    count = 0
    for line_number, record in read_jsonl(url, storage_options, digest or hashlib.sha256()):
        where = f"{redact_url(url)}:{line_number}"
        if labels is None:
            to_messages(record, where)
        else:
            to_labelled_text(record, where, labels)
        count += 1
    if count == 0:
        raise DataError(f"{redact_url(url)}: empty dataset (no examples); add JSONL lines or fix the path")
    return count


def tokenize_messages(messages: list[dict[str, str]], tokenizer: Any) -> TokenizedExample:
    """Apply the chat template; label only the assistant turns (their content and end-of-turn token).

    Each assistant span is what the template adds between ``messages[:i]`` rendered with a generation prompt
    and ``messages[:i+1]`` rendered in full, so it works for any template that renders prefixes consistently.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise DataError("the tokenizer's chat template does not render conversation prefixes consistently")
        context_ids = tokenizer(prompt[len(rendered) :], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        input_ids += context_ids + answer_ids
        labels += [IGNORE_INDEX] * len(context_ids) + answer_ids
        rendered = full
    return TokenizedExample(input_ids, labels)


def load_examples(
    url: str, storage_options: dict[str, Any], tokenizer: Any, max_seq_len: int, overlong: str
) -> tuple[list[TokenizedExample], DataStats]:
    """Read, validate and tokenize every example of one file. Raises ``DataError`` (file, line, fix)."""
    stats = DataStats(url=redact_url(url))
    digest = hashlib.sha256()
    examples = []
    for line_number, record in read_jsonl(url, storage_options, digest):
        stats.examples_read += 1
        fmt, messages = to_messages(record, f"{redact_url(url)}:{line_number}")
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        example = tokenize_messages(messages, tokenizer)
        if len(example.input_ids) > max_seq_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            stats.truncated_overlong += 1
            example = TokenizedExample(example.input_ids[:max_seq_len], example.labels[:max_seq_len])
        if all(label == IGNORE_INDEX for label in example.labels):
            stats.dropped_overlong += 1  # truncation removed every assistant token: nothing left to learn
            continue
        examples.append(example)
        stats.tokens += len(example.input_ids)
        stats.target_tokens += sum(label != IGNORE_INDEX for label in example.labels)
    stats.sha256 = digest.hexdigest()
    stats.examples_kept = len(examples)
    refuse_empty(stats, examples, max_seq_len, "examples")
    return examples, stats


def refuse_empty(stats: DataStats, examples: list, max_seq_len: int, what: str) -> None:
    """``DataError`` for a file with no records, or whose every record was dropped as overlong."""
    if stats.examples_read == 0:
        raise DataError(f"{stats.url}: empty dataset (no examples); add JSONL lines or fix the path")
    if not examples:
        raise DataError(
            f"{stats.url}: all {stats.examples_read} {what} are longer than train.max_seq_len={max_seq_len}; "
            "raise max_seq_len or set train.overlong=truncate"
        )


def load_labelled_examples(
    url: str, storage_options: dict[str, Any], tokenizer: Any, max_seq_len: int, overlong: str, labels: list[str]
) -> tuple[list[LabelledExample], DataStats]:
    """Read, validate and tokenize every ``{"text", "label"}`` record of one file. Raises ``DataError``."""
    stats = DataStats(url=redact_url(url), formats={"classification": 0})
    digest = hashlib.sha256()
    examples = []
    for line_number, record in read_jsonl(url, storage_options, digest):
        stats.examples_read += 1
        text, label = to_labelled_text(record, f"{redact_url(url)}:{line_number}", labels)
        input_ids = tokenizer(text)["input_ids"]  # with the model's own special tokens ([CLS] ... [SEP] for BERT)
        if len(input_ids) > max_seq_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            stats.truncated_overlong += 1
            input_ids = tokenizer(text, truncation=True, max_length=max_seq_len)["input_ids"]
        examples.append(LabelledExample(input_ids, label))
        stats.tokens += len(input_ids)
        stats.label_counts[labels[label]] = stats.label_counts.get(labels[label], 0) + 1
    stats.sha256 = digest.hexdigest()
    stats.examples_kept = stats.formats["classification"] = len(examples)
    stats.target_tokens = len(examples)  # one prediction per example
    refuse_empty(stats, examples, max_seq_len, "texts")
    return examples, stats


def collate(examples: list[TokenizedExample] | list[LabelledExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example in the batch; padded positions are masked out of loss and attention.

    ``labels`` is per token for ``TokenizedExample`` (padding ignored), one class id per row for ``LabelledExample``.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        if isinstance(e, TokenizedExample):
            labels[row, :n] = torch.tensor(e.labels)
    if isinstance(examples[0], LabelledExample):
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(rows: list[list[TokenizedExample]], pad_token_id: int,
                   width: int | None = None) -> dict[str, torch.Tensor]:
    """Each row holds whole examples back to back, padding-free: ``position_ids`` restart at 0 for each example and
    there is no ``attention_mask``, which transformers reads as packed sequences (a causal mask that stays inside
    each example, rotary positions of the example's own). An example's first token is no target: it would be
    predicted from the previous example's last token. Rows are right-padded to the longest; that padding is a
    segment of its own (positions from 0 again), attended by nothing else and never a target. ``width`` pads every
    row to that many tokens instead: one shape for every micro batch.
    """
    width = width or max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            end = start + len(e.input_ids)
            input_ids[r, start:end] = torch.tensor(e.input_ids)
            labels[r, start + 1 : end] = torch.tensor(e.labels[1:])
            position_ids[r, start:end] = torch.arange(end - start)
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def epoch_order(n_examples: int, epoch: int, seed: int) -> list[int]:
    """A deterministic shuffle per epoch, so a resumed run sees exactly the batches it would have seen."""
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
