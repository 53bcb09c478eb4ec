"""Operating loramill: ``loramill submit`` to a real Ray head started with ``ray start``, ``loramill schedule`` ticks
against the real registry on SeaweedFS. Placement by custom resources is tested on two nodes in test_two_nodes.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
import yaml
from ray.job_submission import JobSubmissionClient
from typer.testing import CliRunner

from infra.registry import Registry
from lora.config import Config, ConfigError, load_config
from pipelines import schedule, submit
from pipelines.records import ManifestMetadata, RunRecord
from pipelines.run_folder import data_fingerprint
from pipelines.cli import app

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# loramill submit
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ray_head():
    """A Ray head started as an operator starts one (``ray start --head``), on loopback ports of its own next to
    the session's ``ray.init()`` cluster, without any AWS credential in its environment. Yields its dashboard URL.

    Stopped by signalling exactly the processes it started: ``ray stop`` would kill every Ray process on the
    machine, the session cluster of this very test run included.
    """
    temp = Path(tempfile.mkdtemp(prefix="lm-head-"))  # short: Ray's socket paths must stay under 107 characters
    gcs, dashboard, client, agent = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))} | {
        "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_TMPDIR": str(temp),
        # Ray processes that look their cluster up (Train's placement-group cleaner) would otherwise find two on
        # this machine, this one and the session's, and give up.
        "RAY_ADDRESS": f"127.0.0.1:{gcs}",
        # The job runs `loramill` from the PATH of whoever ran `ray start`.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", "--object-store-memory=200000000",
        "--disable-usage-stats", f"--temp-dir={temp}",
    ]
    # Its own session: `ray start` exits, and the daemons it leaves keep its process group id.
    starter = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = starter.communicate(timeout=120)
        assert starter.returncode == 0, output
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_server(address)
        yield address
    finally:
        _stop_process_group(starter.pid)
        shutil.rmtree(temp, ignore_errors=True)  # with <temp>/ray_current_cluster


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for_job_server(address: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _stop_process_group(pgid: int) -> None:
    """SIGTERM the group and every descendant (Ray workers and job drivers start sessions of their own), then
    SIGKILL what is left after 5 s (gcs_server takes longer to heed SIGTERM, and keeps nothing we need)."""
    group = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                group.append(process)
        except (ProcessLookupError, psutil.Error):
            pass
    processes = set(group)
    for process in group:
        try:
            processes.update(process.children(recursive=True))
        except psutil.Error:
            pass
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


def test_submit_runs_the_pipeline_as_a_ray_job_shows_no_credential_and_fails_with_the_job(ray_head, tiny_config_file,
                                                                                          s3_store):
    # The embedded registry on the test store: the job must find it through the store folder (s3.json, 0600).
    config = tiny_config_file(
        publish={"registry": "embedded", "store_dir": str(s3_store.data_dir.parent), "audit_prompts": 0},
        train={"max_steps": 2, "eval_every": 1, "checkpoint_every": 2},
    )
    registry = Registry(f"s3://{s3_store.bucket}/adapters", s3_store.storage_options())
    before = registry.versions("medical")

    started = time.monotonic()
    result = runner.invoke(app, ["submit", str(config), "--address", ray_head, "--working-dir", str(config.parent),
                                 "--wait"])
    assert result.exit_code == 0, result.output
    assert registry.versions("medical") == [*before, (before[-1] if before else 0) + 1]
    job_id = re.search(r"job (loramill-\S+): SUCCEEDED", result.output).group(1)
    print(f"submitted job ran in {time.monotonic() - started:.0f} s")

    client = JobSubmissionClient(ray_head)
    info = client.get_job_info(job_id)
    assert info.entrypoint.startswith("loramill run config.yaml ") and "publish.store_dir=" in info.entrypoint
    shown = {
        "submit output": result.output,
        "job info": info.model_dump_json(),
        "job list": json.dumps([job.model_dump(mode="json") for job in client.list_jobs()]),
        "job logs": client.get_job_logs(job_id),
    }
    assert "published" in shown["job logs"]
    for credential in (s3_store.secret, s3_store.access_key):
        for where, text in shown.items():
            assert credential not in text, f"a store credential is in the {where}"

    # A job that fails on the cluster: its data lies in a folder the upload leaves out (build/).
    raw = yaml.safe_load(config.read_text())
    (config.parent / "build").mkdir()
    shutil.copy(raw["domains"][0]["train"], config.parent / "build/train.jsonl")
    raw["domains"][0]["train"] = "build/train.jsonl"
    broken = config.with_name("broken.yaml")
    broken.write_text(yaml.safe_dump(raw))
    failed = runner.invoke(app, ["submit", str(broken), "--address", ray_head, "--working-dir", str(config.parent),
                                 "--wait"])
    assert failed.exit_code == 1, failed.output
    assert re.search(r"job loramill-\S+ FAILED", failed.output) and "build/train.jsonl: data file not found" in \
        failed.output


def test_submit_waits_for_a_head_whose_job_agent_is_not_up_yet():
    """A head started seconds ago refuses jobs with Ray's "No available agent to submit job, please try again later"
    (seen in CI against a fresh local head). Submitting tries again until the agent answers; other errors, and the
    same one after the wait, go to the user. The condition depends on timing, so a client that answers as such a
    head does stands in for it; the real head is the job test above."""
    class JustStartedHead:
        def __init__(self, refusals: int, error: str = "Request failed with status code 500: No available agent to "
                                                      "submit job, please try again later..") -> None:
            self.refusals, self.error, self.calls = refusals, error, []

        def submit_job(self, **job):
            self.calls.append(job)
            if len(self.calls) <= self.refusals:
                raise RuntimeError(self.error)
            return job["submission_id"]

    head = JustStartedHead(refusals=2)
    assert submit.submit_when_an_agent_answers(head, entrypoint="loramill run c.yaml", submission_id="j1") == "j1"
    assert len(head.calls) == 3 and all(call["submission_id"] == "j1" for call in head.calls)
    with pytest.raises(RuntimeError, match="No available agent"):
        submit.submit_when_an_agent_answers(JustStartedHead(refusals=10**6), wait_s=1.5, submission_id="j2")
    other = JustStartedHead(refusals=1, error="Request failed with status code 400: bad runtime_env")
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        submit.submit_when_an_agent_answers(other, submission_id="j3")
    assert len(other.calls) == 1


def test_submit_refuses_what_would_fail_on_the_cluster(tiny_config_file, tmp_path):
    config = tiny_config_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (closed_port,) = _free_ports(1)
    outside = runner.invoke(app, ["submit", str(config), "--address", f"http://127.0.0.1:{closed_port}",
                                  "--working-dir", str(elsewhere)])
    assert outside.exit_code == 2 and "lies outside" in outside.output

    nobody = runner.invoke(app, ["submit", str(config), "--address", f"http://127.0.0.1:{closed_port}",
                                 "--working-dir", str(config.parent)])
    assert nobody.exit_code == 2 and "Is a Ray head running there" in nobody.output

    secret = runner.invoke(app, ["submit", str(config), "publish.storage_options.secret=hunter2", "--address",
                                 f"http://127.0.0.1:{closed_port}", "--working-dir", str(config.parent)])
    assert secret.exit_code == 2 and "publish.storage_options.secret: a credential on the command line" in secret.output
    in_file = load_config(config, ["publish.storage_options={endpoint_url: 'http://s3', key: K3Y, secret: S3CRET}"])
    [note] = submit.credential_notes(in_file)
    assert "publish.storage_options.key, publish.storage_options.secret" in note
    assert "K3Y" not in note and "S3CRET" not in note

    assert not submit.head_is_local("http://10.1.2.3:8265")
    with pytest.raises(ConfigError, match="'embedded' is this machine's own store"):
        submit.pinned_paths(load_config(config), local_head=False)
    s3 = load_config(config, ["publish.registry=s3://bucket/adapters"])
    assert submit.pinned_paths(s3, local_head=False) == []
    assert submit.pinned_paths(s3, local_head=True) == [
        f'cluster.storage_url="{tmp_path / "runs"}"', f'cluster.output_dir="{tmp_path / "output"}"']


def test_the_uploaded_working_dir_is_the_project_without_tool_state(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "package.zip"
    # include_gitignore=False: the excludes alone must keep .venv (GBs) and the store out.
    create_package(str(submit.REPO_ROOT), package, include_gitignore=False, excludes=submit.WORKING_DIR_EXCLUDES)
    names = zipfile.ZipFile(package).namelist()
    assert {"pipelines/submit.py", "configs/default.yaml", "data/medical/train.jsonl"} <= set(names)
    assert [n for n in names if n.startswith(".") or "/." in n or "__pycache__" in n] == []
    assert package.stat().st_size < 5_000_000


# ---------------------------------------------------------------------------------------------
# loramill schedule
# ---------------------------------------------------------------------------------------------


def _with_schedule(config: Path, cron: str) -> Path:
    raw = yaml.safe_load(config.read_text())
    for domain in raw["domains"]:
        domain["schedule"] = cron
    config.write_text(yaml.safe_dump(raw))
    return config


def test_schedule_once_retrains_on_new_data_only_inside_the_envelope_and_never_twice_at_once(
        ray_cluster, tiny_config_file, s3_store, registry_url, small_data):
    options = s3_store.storage_options()
    config = _with_schedule(tiny_config_file(
        publish={"registry": registry_url, "storage_options": options, "audit_prompts": 0},
        train={"max_steps": 2, "eval_every": 1, "checkpoint_every": 2},
    ), "0 3 * * 1")
    registry = Registry(registry_url, options)

    first = runner.invoke(app, ["schedule", str(config), "--once"])
    assert first.exit_code == 0, first.output
    assert "medical: retrain — no published version yet" in first.output
    assert "medical: published v1" in first.output and registry.versions("medical") == [1]

    second = runner.invoke(app, ["schedule", str(config), "--once"])
    assert second.exit_code == 0, second.output
    assert "medical: skip — data unchanged since v1" in second.output and registry.versions("medical") == [1]

    train_file = small_data / "medical/train.jsonl"
    train_file.write_text("".join(train_file.read_text().splitlines(keepends=True)[:-4]))
    domain = load_config(config).domain("medical")
    decision = schedule.decide(registry, "medical", data_fingerprint(domain), force=False)
    assert decision.retrain and decision.reason.startswith("train data changed since v1")

    with registry.lock("medical", schedule.LOCK_NAME, ttl_s=300):
        held = runner.invoke(app, ["schedule", str(config), "--once"])
    assert held.exit_code == 0, held.output
    assert "medical: skip — another tick is at it: lock 'retrain' of medical is held" in held.output

    outside = runner.invoke(app, ["schedule", str(config), "--once", "lora.r=16", "quant.mode=none"])
    assert outside.exit_code == 2, outside.output
    assert "lora.r: 16 is outside medical's retraining envelope [4, 4] declared by v1" in outside.output
    assert "quant.mode: 'none' differs from 'nf4'" in outside.output
    assert registry.versions("medical") == [1]

    # Changed bytes at the same URL are a new run: v2 trains every step on them, and says so.
    retrained = runner.invoke(app, ["schedule", str(config), "--once"])
    assert retrained.exit_code == 0, retrained.output
    assert "medical: published v2" in retrained.output and registry.versions("medical") == [1, 2]
    v1, v2 = (ManifestMetadata.of(registry.manifest("medical", v)) for v in (1, 2))
    assert v2.data["train"].sha256 == hashlib.sha256(train_file.read_bytes()).hexdigest() != v1.data["train"].sha256
    assert v2.run_name != v1.run_name
    assert _trained_every_step(config, v2.run_name, steps=2)
    weights = [registry.manifest("medical", v).files["adapter_model.safetensors"].sha256 for v in (1, 2)]
    assert weights[0] != weights[1]
    # The eval set did not change: the gate compared the stored losses, and the audit says which checks ran.
    assert v2.gate.current_version == 1 and v2.gate.compared_on.startswith("stored losses, same eval set")
    assert v2.gate.eval_set == v1.metrics.eval_set == v2.metrics.eval_set
    assert {c.name: c.status for c in v2.checks}["held-out prompts answered by base and adapter side by side"] \
        == "not run"
    assert all(c.evidence for c in v2.checks)

    unchanged = runner.invoke(app, ["schedule", str(config), "--once"])
    assert unchanged.exit_code == 0, unchanged.output
    assert "medical: skip — data unchanged since v2" in unchanged.output and registry.versions("medical") == [1, 2]

    # --force retrains the same bytes from scratch instead of resuming the finished run of v2.
    forced = runner.invoke(app, ["schedule", str(config), "--once", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "medical: published v3" in forced.output
    v3 = ManifestMetadata.of(registry.manifest("medical", 3))
    assert v3.data == v2.data and v3.run_name != v2.run_name and _trained_every_step(config, v3.run_name, steps=2)


def test_schedule_once_reports_each_domain_on_one_line_and_fails_when_one_fails(tmp_path, small_data):
    """A tick over a domain another tick holds (skipped) and one with malformed data (failed): each gets its line,
    the exit status says a domain failed, and nothing trains."""
    (small_data / "legal/train.jsonl").write_text('{"messages": [}\n')
    registry = Registry(f"file://{tmp_path / 'registry'}")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "publish": {"registry": registry.url},
        "domains": [{"name": name, "train": str(small_data / name / "train.jsonl"),
                     "eval": str(small_data / name / "eval.jsonl"), "intended_use": "tests", "limitations": "none"}
                    for name in ("medical", "legal")],
    }))

    with registry.lock("medical", schedule.LOCK_NAME, ttl_s=300):
        tick = runner.invoke(app, ["schedule", str(config), "--once"])

    assert tick.exit_code == 1, tick.output
    summary = [line.split(" ", 2)[2] for line in tick.output.splitlines()[-2:]]  # after the UTC time stamp
    assert summary[0].startswith("medical: skipped (another tick is at it: lock 'retrain' of medical is held")
    assert summary[1] == f"legal: failed: {small_data}/legal/train.jsonl:1: malformed JSON (Expecting value at " \
        "column 15)"
    assert "Traceback" not in tick.output and registry.versions("medical") == registry.versions("legal") == []


def _trained_every_step(config: Path, run_name: str, steps: int) -> bool:
    """The run trained ``steps`` steps itself: it resumed from no checkpoint (a finished run resumed trains none)."""
    record = RunRecord.load(config.parent / "output" / "medical" / run_name)
    return record.steps == steps and record.info.resumed_from_step == []


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_schedule_loop_waits_for_the_cron_time_and_stops_cleanly(tiny_config_file, tmp_path, stop):
    config = _with_schedule(tiny_config_file(), "0 0 1 1 *")
    log = tmp_path / "schedule.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "schedule", str(config)], cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while "next: medical at" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        process.send_signal(stop)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        process.kill()  # a no-op once it has exited; otherwise it would outlive a failed test
    text = log.read_text()
    assert f"next: medical at {datetime.now(UTC).year + 1}-01-01 00:00 UTC" in text
    assert "scheduler stopped" in text and "Traceback" not in text


def test_next_due_is_the_first_cron_time_after_now_in_utc():
    entry = {"train": "t.jsonl", "eval": "e.jsonl", "intended_use": "u", "limitations": "l"}
    domains = Config.model_validate({"domains": [
        entry | {"name": "weekly", "schedule": "0 3 * * 1"},
        entry | {"name": "daily", "schedule": "0 3 * * *"},
        entry | {"name": "hourly", "schedule": "30 * * * *"},
    ]}).domains
    monday = datetime(2026, 11, 23, 2, 45, tzinfo=UTC)
    assert schedule.next_due(domains, monday) == (datetime(2026, 11, 23, 3, 0, tzinfo=UTC), ["weekly", "daily"])
    assert schedule.next_due(domains[1:], datetime(2026, 11, 24, 3, 0, tzinfo=UTC)) == (
        datetime(2026, 11, 24, 3, 30, tzinfo=UTC), ["hourly"])
