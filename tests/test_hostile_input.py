"""Hostile and malformed input through the real CLI: every case exits 2 with a message naming the field, the file and
line, or the name at fault, and writes nothing (no output or run folder, no byte on the store, no pulled folder).

The registry's own refusals are in tests/test_registry.py (bad names and URLs on every backend, tampering, pickles);
here they are reached from the command line, as a user or a script would. Property-based tests at the end throw
random junk at config overrides, names, URLs and data files.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from infra.registry import Registry, RegistryError, validate_name
from infra.store import StoreInfo
from lora.config import ConfigError, Domain, load_config
from lora.data import MAX_LINE_BYTES, check_file
from lora.errors import DataError
from lora.redact import redact_url
from pipelines.cli import app

runner = CliRunner()


# ------------------------------------------------------------------ the corpus


@dataclass
class Ctx:
    """One case's world: its folder, a valid config to spoil, the data to spoil, and the registry on the store."""

    tmp: Path
    data: Path
    raw: dict
    registry: Registry
    checks: list[Callable[[str], None]] = field(default_factory=list)
    """Extra checks of the command's output and effects, e.g. that a file the case owns is unchanged."""

    def config(self, edit: Callable[[dict], object] = lambda raw: None) -> Path:
        raw = json.loads(json.dumps(self.raw))
        edit(raw)
        path = self.tmp / "hostile.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def raw_config(self, content: bytes) -> Path:
        path = self.tmp / "hostile.yaml"
        path.write_bytes(content)
        return path

    def train_file(self, content: bytes) -> Path:
        path = self.data / "medical/train.jsonl"
        path.write_bytes(content)
        return path



def setting(dotted: str, value) -> Callable[[dict], None]:
    """An edit that sets `dotted` (list items by index) to `value` in the raw config."""

    def edit(raw: dict) -> None:
        *parents, last = dotted.split(".")
        node = raw
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[int(last) if isinstance(node, list) else last] = value

    return edit


def dropping(dotted: str) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        *parents, last = dotted.split(".")
        node = raw
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]

    return edit


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def chat(*turns: tuple[object, object]) -> bytes:
    return (json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n").encode()


GOOD = chat(("user", "Is rest enough?"), ("assistant", "For a sprain, mostly."))
BIG_LINE = b'{"instruction": "' + b"x" * (10 * 2**20) + b'", "output": "y"}\n'


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Ctx], list]
    expect: str | Callable[[Ctx], str]
    """A piece of the message: the dotted field, the file and line, or the name at fault, and what is wrong."""
    needs_version: bool = False


def train(edit=lambda raw: None, *extra) -> Callable[[Ctx], list]:
    return lambda ctx: ["train", ctx.config(edit), *extra]


def train_on(content: bytes) -> Callable[[Ctx], list]:
    def argv(ctx: Ctx) -> list:
        ctx.train_file(content)
        return ["train", ctx.config()]

    return argv


def pull(ref: str, edit=lambda raw: None) -> Callable[[Ctx], list]:
    return lambda ctx: ["pull", ref, "--to", ctx.tmp / "pulled", "-c", ctx.config(edit)]


def promote(domain: str, version: str, alias: str = "production") -> Callable[[Ctx], list]:
    return lambda ctx: ["promote", domain, version, "--alias", alias, "-c", ctx.config()]


def python_tag(ctx: Ctx) -> list:
    marker = ctx.tmp / "pwned"
    ctx.checks.append(lambda output: _assert(not marker.exists(), "a YAML tag ran a command"))
    return ["train", ctx.config(), f"lora.r=!!python/object/apply:os.system ['touch {marker}']"]


def pull_into_existing(ctx: Ctx) -> list:
    mine = ctx.tmp / "pulled"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    ctx.checks.append(lambda output: _assert([p.name for p in mine.iterdir()] == ["keep.txt"], "pull wrote into it"))
    return ["pull", "medical", "--to", mine, "-c", ctx.config()]


def data_elsewhere(ctx: Ctx) -> list:
    # A data path that walks out of the data folder to a system file: read as data, refused by line, and the
    # message shows none of the file's content.
    escaping = f"file://{ctx.data}/medical/" + "../" * 12 + "etc/passwd"
    ctx.checks.append(lambda output: _assert("root:" not in output, "the message echoed /etc/passwd"))
    return ["train", ctx.config(setting("domains.0.train", escaping))]


def _assert(condition: bool, message: str) -> None:
    assert condition, message


CASES = [
    # --- config: types, keys, ranges, structure
    Case("lora-r-not-a-number", train(setting("lora.r", "eight")), "lora.r: Input should be a valid integer"),
    Case("unknown-key", train(setting("train.lerning_rate", 0.1)), "train.lerning_rate: unknown key"),
    Case("lora-r-zero", train(setting("lora.r", 0)), "lora.r: Input should be greater than 0"),
    Case("lora-r-negative-override", train(lambda raw: None, "lora.r=-4"), "lora.r: Input should be greater than 0"),
    Case("lora-alpha-zero", train(setting("lora.alpha", 0)), "lora.alpha: Input should be greater than 0"),
    Case("workers-zero", train(setting("cluster.workers_per_domain", 0)), "cluster.workers_per_domain:"),
    Case("learning-rate-a-list", train(setting("train.learning_rate", [1, 2])), "train.learning_rate:"),
    Case("section-is-a-string", train(setting("lora", "big")), "lora: Input should be a valid dictionary"),
    Case("domains-empty", train(setting("domains", [])), "domains: List should have at least 1 item"),
    Case("domains-repeated", train(lambda raw: raw["domains"].append(dict(raw["domains"][0]))),
         "repeated: medical"),
    Case("domain-field-missing", train(dropping("domains.0.intended_use")), "domains.0.intended_use: required"),
    Case("schedule-not-cron", train(setting("domains.0.schedule", "every tuesday")), "domains.0.schedule:"),
    Case("path-with-nul-byte", train(setting("domains.0.train", "train\x00.jsonl")),
         "domains.0.train: contains a NUL byte"),
    Case("config-file-missing", lambda ctx: ["train", ctx.tmp / "nope.yaml"], "config file not found"),
    Case("config-not-yaml", lambda ctx: ["train", ctx.raw_config(b"lora: [unclosed\n")], "not valid YAML"),
    Case("config-invalid-utf8", lambda ctx: ["train", ctx.raw_config(b"lora:\n  r: \xff\xfe\n")], "not valid YAML"),
    Case("config-top-level-list", lambda ctx: ["train", ctx.raw_config(b"- lora\n- train\n")],
         "the top level must be a mapping"),
    # --- names and paths: traversal, absolute paths, control characters
    Case("domain-name-dotdot", train(setting("domains.0.name", "../etc")), "domains.0.name: '../etc' is not a valid"),
    Case("domain-name-absolute", train(setting("domains.0.name", "/etc/passwd")),
         "domains.0.name: '/etc/passwd' is not a valid"),
    Case("domain-name-newline", train(setting("domains.0.name", "medical\n")), "domains.0.name: 'medical\\n' is not"),
    Case("gate-alias-dotdot", train(setting("publish.gate_alias", "../production")),
         "publish.gate_alias: '../production' is not a valid"),
    # --- overrides
    Case("override-not-yaml", train(lambda raw: None, "lora.r=["), "lora.r: value '[' is not valid YAML"),
    Case("override-python-tag", python_tag, 'lora.r: value "!!python/object/apply:os.system'),
    Case("override-without-equals", train(lambda raw: None, "lora.r"), "overrides look like key=value"),
    Case("override-into-a-value", train(lambda raw: None, "lora.r.deep=1"), "lora.r: is a value, not a section"),
    Case("override-list-index-out-of-range", train(lambda raw: None, "domains.7.name=x"), "no list item '7'"),
    # --- registry URLs
    Case("registry-bad-bucket", pull("medical", setting("publish.registry", "s3://Bad_Bucket/x")),
         "bucket name 'Bad_Bucket'"),
    Case("registry-ip-bucket", pull("medical", setting("publish.registry", "s3://127.0.0.1/x")),
         "bucket name '127.0.0.1'"),
    Case("registry-file-relative", pull("medical", setting("publish.registry", "file://relative/x")),
         "must be absolute"),
    Case("registry-file-escapes-its-root", lambda ctx: pull("medical", setting(
        "publish.registry", f"file://{ctx.tmp}/registry/../../../etc"))(ctx), "path part '..'"),
    Case("registry-s3-dotdot", pull("medical", setting("publish.registry", "s3://loramill/adapters/../../other")),
         "path part '..'"),
    Case("registry-unsupported-scheme", pull("medical", setting("publish.registry", "http://127.0.0.1:9/x")),
         "is not supported"),
    # --- data files
    Case("data-missing-file", lambda ctx: (ctx.data / "medical/train.jsonl").unlink() or ["train", ctx.config()],
         "medical/train.jsonl: data file not found"),
    Case("data-is-a-folder",
         train(lambda raw: raw["domains"][0].update(eval=str(Path(raw["domains"][0]["eval"]).parent))),
         "medical: is a folder"),
    Case("data-empty-file", train_on(b""), "medical/train.jsonl: empty dataset"),
    Case("data-only-blank-lines", train_on(b"\n  \n\t\n"), "medical/train.jsonl: empty dataset"),
    Case("data-invalid-utf8", train_on(GOOD + b'{"instruction": "caf\xe9", "output": "x"}\n'),
         "medical/train.jsonl:2: not valid UTF-8"),
    Case("data-nul-bytes", train_on(GOOD + GOOD + b"\x00\x00\x00\n"), "medical/train.jsonl:3: malformed JSON"),
    Case("data-malformed-json", train_on(b'{"messages": [}\n'), "medical/train.jsonl:1: malformed JSON"),
    Case("data-json-array", train_on(b'[{"role": "user"}]\n'),
         "medical/train.jsonl:1: expected a JSON object, got list"),
    Case("data-unknown-format", train_on(b'{"prompt": "q", "completion": "a"}\n'),
         "medical/train.jsonl:1: unknown record format (keys: completion, prompt)"),
    Case("data-empty-messages", train_on(b'{"messages": []}\n'),
         "medical/train.jsonl:1: `messages` must be a non-empty list"),
    Case("data-empty-content", train_on(GOOD + chat(("user", "Why?"), ("assistant", "   "))),
         "medical/train.jsonl:2: messages[1] (assistant) has empty content"),
    Case("data-role-not-a-string", train_on(chat((3, "Why?"), ("assistant", "Because."))),
         "medical/train.jsonl:1: messages[0] needs string `role` and `content`"),
    Case("data-roles-out-of-order", train_on(chat(("assistant", "Hello."), ("user", "Hi."))),
         "medical/train.jsonl:1: roles ['assistant', 'user'] are out of order"),
    Case("data-output-not-a-string", train_on(b'{"instruction": "q", "output": 5}\n'),
         "medical/train.jsonl:1: `output` must be a string"),
    Case("data-10mb-line", train_on(GOOD + GOOD + BIG_LINE),
         f"medical/train.jsonl:3: line is {len(BIG_LINE):,} bytes (limit {MAX_LINE_BYTES:,})"),
    Case("data-path-escapes-the-data-folder", data_elsewhere, "etc/passwd:1: malformed JSON"),
    Case("data-unknown-protocol", train(setting("domains.0.train", "nosuchproto://x/train.jsonl")),
         "nosuchproto://x/train.jsonl: cannot read the data"),
    Case("data-server-unreachable", lambda ctx: train(lambda raw: raw["domains"][0].update(
        train="s3://loramill/train.jsonl", storage_options={
            "endpoint_url": f"http://127.0.0.1:{closed_port()}", "key": "k" * 16, "secret": "s" * 32,
            "config_kwargs": {"retries": {"total_max_attempts": 1}}}))(ctx),
         "s3://loramill/train.jsonl: cannot read the data"),
    # --- names on the command line, against the real store
    Case("pull-domain-dotdot", pull("../medical"), "domain name '../medical' is invalid"),
    Case("pull-domain-absolute", pull("/etc/passwd"), "domain name '/etc/passwd' is invalid"),
    Case("pull-domain-newline", pull("medical\n"), "domain name 'medical\\n' is invalid"),
    Case("pull-alias-dotdot", pull("medical@../production"), "alias name '../production' is invalid", True),
    Case("pull-missing-version", pull("medical@v99"), "has no complete version v99", True),
    Case("pull-into-existing-folder", pull_into_existing, "already exists: pull never overwrites", True),
    Case("promote-alias-dotdot", promote("medical", "v1", "../production"), "alias name '../production' is invalid",
         True),
    Case("promote-alias-like-a-version", promote("medical", "v1", "v2"), "looks like a version number", True),
    Case("promote-domain-with-slash", promote("a/b", "v1"), "domain name 'a/b' is invalid"),
    Case("promote-version-dotdot", promote("medical", "../1"), "alias name '../1' is invalid", True),
    Case("gc-domain-dotdot", lambda ctx: ["gc", "../medical", "--grace-s", "0", "-c", ctx.config()],
         "domain name '../medical' is invalid", True),
    Case("publish-domain-dotdot", lambda ctx: ["publish", ctx.config(), "--domain", "../x", "--from", ctx.tmp],
         "no domain named '../x'"),
    Case("publish-not-a-run", lambda ctx: ["publish", ctx.config(), "--domain", "medical", "--from", ctx.data],
         "is not a finished loramill run"),
    Case("train-domain-dotdot", train(lambda raw: None, "--domain", "../x"), "no domain named '../x'"),
]


@pytest.fixture(scope="module")
def published_url(s3_store: StoreInfo, tmp_path_factory) -> str:
    """A registry prefix holding a complete v1 of `medical`, so that alias and version refs reach the registry's
    own checks. Shared by the cases that need it: each checks that it is unchanged afterwards."""
    url = f"s3://{s3_store.bucket}/hostile-{uuid.uuid4().hex[:12]}"
    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert Registry(url, s3_store.storage_options()).publish("medical", folder, {}).version == 1
    return url


@pytest.fixture(scope="module")
def store_fs(s3_store: StoreInfo):
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, **s3_store.storage_options())


@pytest.fixture
def ctx(request, tiny_config_file, small_data, s3_store: StoreInfo, registry_url: str) -> Ctx:
    case = getattr(request, "param", None)
    url = request.getfixturevalue("published_url") if case is not None and case.needs_version else registry_url
    options = s3_store.storage_options()
    path = tiny_config_file(domains=("medical",), publish={"registry": url, "storage_options": options})
    raw = yaml.safe_load(path.read_text())
    path.unlink()
    return Ctx(tmp=path.parent, data=small_data, raw=raw, registry=Registry(url, options))


def _store_state(fs, registry: Registry) -> dict[str, bytes]:
    root = registry.url.removeprefix("s3://")
    found = fs.find(root, detail=True)
    return {name: fs.cat_file(name) for name, entry in found.items() if entry["type"] == "file"}


def _local_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("ctx", CASES, ids=[c.id for c in CASES], indirect=True)
def test_hostile_input_exits_2_naming_the_fault_and_writes_nothing(ctx: Ctx, request, store_fs):
    case: Case = request.node.callspec.params["ctx"]
    argv = [str(a) for a in case.argv(ctx)]
    store_before = _store_state(store_fs, ctx.registry)
    local_before = _local_state(ctx.tmp)

    result = runner.invoke(app, argv)

    expect = case.expect(ctx) if callable(case.expect) else case.expect
    assert result.exit_code == 2, f"exit {result.exit_code}:\n{result.output}"
    assert "Traceback" not in result.output
    assert expect in result.output, result.output
    assert _store_state(store_fs, ctx.registry) == store_before  # not a byte written to the store
    # No output, run, store or pulled folder, no partial download: the case's folder is exactly as it was.
    assert _local_state(ctx.tmp) == local_before
    for name in ("output", "runs", ".loramill", "pulled"):
        assert name == "pulled" and case.id == "pull-into-existing-folder" or not (ctx.tmp / name).exists()
    assert not [p for p in ctx.tmp.iterdir() if p.name.endswith(".partial")]
    for check in ctx.checks:
        check(result.output)


def test_the_corpus_is_large_and_every_id_is_unique():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)


def test_data_messages_never_echo_the_file_content(ctx: Ctx):
    secret_line = b'{"instruction": "the launch code is 0000-SECRET", "output": 7}\n'
    ctx.train_file(GOOD + secret_line)
    result = runner.invoke(app, ["train", str(ctx.config())])
    assert result.exit_code == 2 and "medical/train.jsonl:2: `output` must be a string" in result.output
    assert "SECRET" not in result.output


# ------------------------------------------------------------------ properties


@pytest.fixture(scope="module")
def plain_config(tmp_path_factory) -> Path:
    """A valid config whose files need not exist: load_config checks fields, not data."""
    path = tmp_path_factory.mktemp("plain") / "config.yaml"
    path.write_text(yaml.safe_dump({"domains": [{"name": "medical", "train": "data/train.jsonl",
                                                 "eval": "data/eval.jsonl", "intended_use": "tests",
                                                 "limitations": "none"}]}))
    return path


KNOWN_KEYS = [
    "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "train.max_steps", "train.learning_rate",
    "train.micro_batch_size", "train.warmup_steps", "cluster.workers_per_domain", "cluster.cpus_per_worker",
    "cluster.storage_url", "cluster.storage_options", "publish.registry", "publish.gate_alias", "model.id",
    "model.revision", "quant.mode", "domains", "domains.0", "domains.0.name", "domains.0.train",
    "domains.0.schedule", "domains.0.storage_options", "tune.ranks", "lora", "",
]
JUNK = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["[", "{", "!!python/object/apply:os.system ['true']", "*alias", "&a [*a]", "~", "null",
                     "-1", "1e400", ".nan", "'\\x00'", '"\\0"', "../../etc", "/", "{a: {b: [}", "? x", "|", "%"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=20)), value=JUNK)
@example(key="domains.0.train", value='"a\\0b"')
@example(key="domains", value="1")
@example(key="lora.r", value="[")
@example(key="cluster.storage_url", value="~0")  # the home of a user this machine does not have (hypothesis found it)
def test_junk_overrides_are_config_errors_never_crashes(plain_config: Path, key: str, value: str):
    try:
        load_config(plain_config, [f"{key}={value}"])
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


@pytest.mark.parametrize("key", ["cluster.storage_url", "domains.0.train", "publish.store_dir", "model.id"])
def test_a_path_in_an_unknown_users_home_folder_is_a_config_error_naming_the_key(plain_config: Path, key: str):
    with pytest.raises(ConfigError) as raised:
        load_config(plain_config, [f"{key}=~no-such-user-on-this-machine/data"])
    assert raised.value.problems == [f"{key}: '~no-such-user-on-this-machine/data' starts with a home folder this "
                                     "machine does not have; write the path in full"]


@settings(max_examples=15, deadline=None)
@given(key=st.sampled_from(KNOWN_KEYS), value=JUNK)
@example(key="domains", value="1")
def test_junk_overrides_through_the_cli_exit_0_or_2(plain_config: Path, key: str, value: str):
    result = runner.invoke(app, ["validate", str(plain_config), f"{key}={value}"])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=70), st.from_regex(r"[a-z0-9_./-]{0,66}\n?", fullmatch=True)))
@example("medical\n")
@example("x" * 64)
@example("x" * 65)
def test_config_and_registry_accept_the_same_names(name: str):
    """A domain the config accepts can always be published, and a name the registry accepts is one the config
    would: the two rules (pydantic's and the registry's regex) agree exactly."""
    try:
        Domain(name=name, train="t.jsonl", eval="e.jsonl", intended_use="u", limitations="l")
        config_ok = True
    except ValidationError:
        config_ok = False
    try:
        validate_name(name)
        registry_ok = True
    except RegistryError:
        registry_ok = False
    assert config_ok == registry_ok


_PASSWORD = st.text(st.sampled_from("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789@:!$%&*+=~"), min_size=8, max_size=30)


@settings(max_examples=100, deadline=None)
@given(
    scheme=st.sampled_from(["s3", "https", "http", "gs", "hf"]),
    user=st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789._-"), max_size=12),
    password=_PASSWORD.filter(lambda p: any(c.isalnum() for c in p)),
    host=st.from_regex(r"[a-z][a-z0-9.-]{0,20}(:[0-9]{1,5})?", fullmatch=True),
    path=st.from_regex(r"(/[a-z0-9._@-]{0,12}){0,4}", fullmatch=True),
)
@example(scheme="s3", user="user", password="p@ss@word1", host="host", path="/data.jsonl")
def test_redact_url_never_keeps_a_password(scheme, user, password, host, path):
    url = f"{scheme}://{user}:{password}@{host}{path}"
    shown = redact_url(url)
    assert shown == f"{scheme}://{host}{path}"
    assert redact_url(shown) == shown  # a URL without credentials is left alone


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("junk-data")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["messages", "role", "content", "instruction", "input", "output", "x"]),
                      inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.one_of(st.binary(max_size=60), _JSON.map(lambda v: json.dumps(v).encode())), max_size=6))
@example(lines=[b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'])
def test_junk_data_is_a_data_error_never_a_crash(scratch: Path, lines: list[bytes]):
    path = scratch / "junk.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        assert check_file(str(path), {}) >= 1
    except DataError as e:
        assert str(path) in str(e)
