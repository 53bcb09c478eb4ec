"""Data: both formats, role checks, loss only on assistant tokens, overlong handling, errors with file:line."""

import json

import pytest
from transformers import AutoTokenizer

from lora.data import IGNORE_INDEX, check_file, load_examples, to_messages, tokenize_messages
from lora.errors import DataError
from lora.model import builtin_smollm2
from lora.redact import redact_url


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(builtin_smollm2())


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "Code LCB-407?"},
    {"role": "assistant", "content": "Storage is full."},
]}


def test_loss_is_only_on_assistant_turns(tokenizer):
    _, messages = to_messages(CHAT, "x")
    example = tokenize_messages(messages, tokenizer)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == full
    targets = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "Hello there.<|im_end|>\nStorage is full.<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(example.input_ids, example.labels))


def test_instruction_format_becomes_a_user_and_assistant_turn():
    fmt, messages = to_messages({"instruction": "Answer.", "input": "Q?", "output": "A."}, "x")
    assert fmt == "instruction"
    assert messages == [{"role": "user", "content": "Answer.\n\nQ?"}, {"role": "assistant", "content": "A."}]
    _, no_input = to_messages({"instruction": "Answer.", "output": "A."}, "x")
    assert no_input[0]["content"] == "Answer."


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "out of order"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}, "out of order"),
        ({"messages": [{"role": "user", "content": "q"}]}, "out of order"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}, "empty content"),
        ({"messages": [{"role": "user"}]}, "string `role` and `content`"),
        ({"instruction": "", "output": "a"}, "must not be empty"),
        ({"prompt": "q", "completion": "a"}, "unknown record format"),
    ],
)
def test_bad_records_are_refused_naming_the_place(record, message):
    with pytest.raises(DataError, match=message) as caught:
        to_messages(record, "f.jsonl:7")
    assert str(caught.value).startswith("f.jsonl:7:")


def test_file_errors_name_file_and_line(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(CHAT) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        check_file(str(bad_json), {})
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(json.dumps(CHAT).encode() + b"\n" + '{"instruction": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8"):
        check_file(str(bad_utf8), {})
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"instruction": "x" * 10_000_000, "output": "y"}) + "\n")
    with pytest.raises(DataError, match=r"huge.jsonl:1: line is 10,000,0\d\d bytes"):
        check_file(str(huge), {})
    with pytest.raises(DataError, match="data file not found"):
        check_file(str(tmp_path / "missing.jsonl"), {})
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty dataset"):
        check_file(str(tmp_path / "empty.jsonl"), {})
    with pytest.raises(DataError, match="expected a JSON object"):
        check_file(write_jsonl(tmp_path / "list.jsonl", [[1, 2]]), {})


def test_overlong_examples_are_dropped_or_truncated_and_counted(tmp_path, tokenizer):
    short = {"instruction": "Q?", "output": "A."}
    long = {"instruction": "Q?", "output": "word " * 300}
    path = write_jsonl(tmp_path / "d.jsonl", [short, long, short])
    kept, stats = load_examples(path, {}, tokenizer, 64, "drop")
    assert (len(kept), stats.examples_read, stats.dropped_overlong) == (2, 3, 1)
    kept, stats = load_examples(path, {}, tokenizer, 64, "truncate")
    assert (len(kept), stats.truncated_overlong) == (3, 1)
    assert max(len(e.input_ids) for e in kept) == 64
    assert stats.tokens == sum(len(e.input_ids) for e in kept)
    assert len(stats.sha256) == 64 and stats.formats == {"instruction": 3}


def test_all_overlong_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q?", "output": "word " * 300}])
    with pytest.raises(DataError, match="longer than train.max_seq_len=16"):
        load_examples(path, {}, tokenizer, 16, "drop")


def test_bundled_datasets_are_large_and_valid(tokenizer):
    from tests.conftest import DATA

    for domain in ("medical", "legal", "support"):
        assert check_file(str(DATA / domain / "train.jsonl"), {}) >= 300
        assert check_file(str(DATA / domain / "eval.jsonl"), {}) >= 60
        kept, stats = load_examples(str(DATA / domain / "eval.jsonl"), {}, tokenizer, 256, "drop")
        assert stats.dropped_overlong == 0, "bundled data must fit the default max_seq_len"
        assert (DATA / domain / "DATACARD.md").is_file()


def test_urls_are_published_without_credentials():
    assert redact_url("s3://key:secret@bucket/x.jsonl") == "s3://bucket/x.jsonl"
    assert redact_url("/local/x.jsonl") == "/local/x.jsonl"
