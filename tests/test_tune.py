"""The tune stage on the tiny model: ASHA stops the weak arm, the best trial is the lowest loss, outputs file by
file, resume re-runs nothing, a given-back base model trains exactly like a fresh one, bad search spaces exit 2."""

import math
from pathlib import Path

import matplotlib.image
import pytest
import torch
from typer.testing import CliRunner

from lora.config import ConfigError, load_config
from ray.tune.schedulers import ASHAScheduler

from pipelines import sweep, train_worker, tune
from pipelines.run_folder import data_fingerprint
from pipelines.cli import app
from tests.conftest import read_json

runner = CliRunner()

# A 2 x 2 grid run one trial at a time, so ASHA's decisions do not depend on which trial reports first: each
# lr=1e-7 arm reaches the first rung (step 1) after an lr=1e-2 arm is recorded there, and is clearly worse.
SWEEP = {
    "train": {"max_steps": 4, "eval_every": 1, "checkpoint_every": 2},
    "tune": {"search": "grid", "ranks": [2, 4], "alphas": [2.0], "learning_rates": [1e-2, 1e-7],
             "grace_evals": 1, "reduction_factor": 2, "max_concurrent_trials": 1},
}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def result_counts(experiment: str) -> dict[str, int]:
    """Reports Tune recorded per trial folder: a trial that ran again would add lines."""
    return {p.parent.name: len(p.read_text().splitlines()) for p in sorted(Path(experiment).glob("*/result.json"))}


def test_sweep_stops_the_weak_arm_picks_the_best_and_resumes_without_rerunning(ray_cluster, tiny_config_file):
    config = tiny_config_file(**SWEEP)
    result = invoke("tune", config)
    assert result.exit_code == 0, result.output
    assert "loramill tune: medical (grid, 4 trials, 1 at once, 4 steps each)" in result.output

    folder = config.parent / "output/medical/tune"
    assert sorted(p.name for p in folder.iterdir()) == ["best.json", "tune.png", "tune_results.json"]
    sweep = read_json(folder / "tune_results.json")
    trials = sweep["trials"]
    assert len(trials) == 4 and all(t["error"] is None for t in trials)
    assert sorted((t["r"], t["learning_rate"]) for t in trials) == [(2, 1e-7), (2, 1e-2), (4, 1e-7), (4, 1e-2)]
    assert all(t["alpha"] == 2.0 * t["r"] for t in trials)

    stopped = [t for t in trials if t["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial"
    assert all(t["learning_rate"] == 1e-7 and t["steps"] < 4 for t in stopped)
    assert all(t["steps"] == 4 for t in trials if t["status"] == "finished")
    # Every trial reports eval_loss at every step (eval_every=1) from step 0, the base model.
    assert all([step for step, _ in t["curve"]] == list(range(t["steps"] + 1)) for t in trials)
    # Trials after the first ran on the actor's given-back base model: its loss is the fresh base's, exactly.
    assert len({t["curve"][0][1] for t in trials}) == 1

    lowest = min(trials, key=lambda t: t["eval_loss"])
    best = read_json(folder / "best.json")
    assert sweep["best"] == best["trial_id"] == lowest["trial_id"]
    assert best["eval_loss"] == lowest["eval_loss"] and best["learning_rate"] == 1e-2
    assert best["lora"] == {"r": lowest["r"], "alpha": lowest["alpha"], "dropout": 0.0, "target_modules": "all-linear"}
    tuned = tune.best_config(load_config(config), "medical")
    assert (tuned.lora.r, tuned.lora.alpha, tuned.train.learning_rate) == (lowest["r"], lowest["alpha"], 1e-2)

    png = (folder / "tune.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, channels = matplotlib.image.imread(folder / "tune.png").shape
    assert width > height > 200 and channels in (3, 4)

    # A finished sweep resumed: no trial runs again, the results are the same.
    counts = result_counts(sweep["experiment"])
    assert sorted(name.rsplit("-", 1)[1] for name in counts) == sorted(t["trial_id"] for t in trials)
    assert invoke("tune", config).exit_code == 2  # without --resume it would orphan the finished trials
    resumed = invoke("tune", config, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert result_counts(sweep["experiment"]) == counts
    assert read_json(folder / "tune_results.json")["trials"] == trials


def test_a_run_on_a_given_back_base_model_reproduces_a_fresh_one(tiny_config_file):
    """train_domain in this process, no Ray: A on a fresh base, B (another rank) on the given-back one, A again."""
    cfg = load_config(tiny_config_file(lora={"r": 4, "alpha": 8, "dropout": 0.1}))
    other = load_config(tiny_config_file(lora={"r": 2, "alpha": 16, "dropout": 0.0}))

    def history(c) -> list[dict]:
        reports = []
        session = train_worker.WorkerSession(0, 1, 0, lambda: None, lambda metrics, checkpoint=None: reports.append(metrics))
        train_worker.train_domain(c, c.domain("medical"), session)
        return [{k: v for k, v in m.items() if k not in ("train_seconds", "tokens_per_second")} for m in reports]

    threads = torch.get_num_threads()
    try:
        train_worker._idle_base_models.clear()
        first = history(cfg)
        [base] = train_worker._idle_base_models.values()
        history(other)
        again = history(cfg)
        assert next(iter(train_worker._idle_base_models.values())) is base  # reused, not reloaded
    finally:
        torch.set_num_threads(threads)  # train_domain sets one thread per cpus_per_worker
        train_worker._idle_base_models.clear()
    assert [m["step"] for m in first] == [0, 2, 4]
    assert again == first  # losses, lr, perplexity: bit for bit


def test_a_run_reuses_an_identical_measurement_of_the_base_and_says_so(tiny_config_file, tmp_path, monkeypatch):
    """train_domain in this process, no Ray. A second run on the same base and eval examples (in a new process: the
    in-process copy is dropped) takes the base's metrics from the first run's measurement under the model cache
    instead of evaluating the base again, and its run_info says so (the audit: test_pipeline); other eval examples
    are measured."""
    import json

    import lora.base_eval
    import lora.train
    from pipelines.records import RUN_INFO_FILE, RunInfo

    monkeypatch.setenv("LORAMILL_CACHE", str(tmp_path / "cache"))
    evaluations = []
    evaluate = lora.train.evaluate
    monkeypatch.setattr(lora.train, "evaluate", lambda *a, **k: evaluations.append(1) or evaluate(*a, **k))

    def run(c) -> tuple[list[dict], RunInfo, int]:
        reports, infos = [], []
        lora.base_eval._kept.clear()  # as in a new process

        def report(metrics, checkpoint=None):
            reports.append(metrics)
            if checkpoint is not None:
                infos.append(RunInfo.model_validate_json((Path(checkpoint.path) / RUN_INFO_FILE).read_text()))

        evaluations.clear()
        session = train_worker.WorkerSession(0, 1, 0, lambda: None, report)
        train_worker.train_domain(c, c.domain("medical"), session)
        return reports, infos[-1], len(evaluations)

    cfg = load_config(tiny_config_file())
    threads = torch.get_num_threads()
    try:
        first, first_info, first_evaluations = run(cfg)
        second, second_info, second_evaluations = run(cfg)
        other, other_info, _ = run(load_config(tiny_config_file(train={"max_eval_examples": 1})))
    finally:
        torch.set_num_threads(threads)  # train_domain sets one thread per cpus_per_worker
        train_worker._idle_base_models.clear()
    kept = [json.loads(f.read_text()) for f in (tmp_path / "cache" / "base-evals").iterdir()]
    assert len(kept) == 2  # first's measurement and other's, each written whole
    assert first_info.base_eval == other_info.base_eval == "measured in this run"
    assert second_info.base_eval.startswith("reused: measured at ")
    assert second[0] == first[0] and second[0]["step"] == 0  # the base's metrics, bit for bit
    assert second_evaluations == first_evaluations - 1  # the base was not evaluated again
    assert other[0]["eval_loss"] != first[0]["eval_loss"]
    assert {k: v for k, v in first[0].items() if k != "step"} in [k["metrics"] for k in kept]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tune.ranks=[]"], "tune.ranks: empty list"),
        (["tune.ranks=[4, 0]"], "tune.ranks.1: Input should be greater than 0"),
        (["tune.alphas=[-1]"], "tune.alphas.0: Input should be greater than 0"),
        (["tune.lr_min=0.01", "tune.lr_max=0.0001"], "lr_min (0.01) must be below lr_max (0.0001)"),
        (["tune.lr_min=0"], "tune.lr_min: Input should be greater than 0"),
        (["tune.learning_rates=[]"], "tune.learning_rates: empty list"),
        (["tune.target_module_sets=[[]]"], "tune.target_module_sets: an empty module list"),
        (["train.eval_every=4"], "train.eval_every: 4 leaves no evaluation before the last of the 4 steps"),
    ],
    ids=["no-ranks", "rank-0", "alpha-negative", "lr-inverted", "lr-0", "no-lrs", "empty-targets", "no-mid-eval"],
)
def test_bad_search_spaces_exit_2_before_anything_runs(tiny_config_file, overrides, message):
    config = tiny_config_file()
    result = invoke("tune", config, *overrides)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (config.parent / "output").exists() and not (config.parent / "runs").exists()


def test_trials_the_cluster_can_never_hold_exit_2(ray_cluster, tiny_config_file):
    cpus = ray_cluster.cluster_resources()["CPU"]
    config = tiny_config_file()
    # Two workers of half the cluster each, plus the trial's own 0.01 CPU: never fits.
    result = invoke("tune", config, "cluster.workers_per_domain=2", f"cluster.cpus_per_worker={cpus / 2}")
    assert result.exit_code == 2 and "cannot hold one" in result.output, result.output
    result = invoke("tune", config, f"tune.max_concurrent_trials={math.floor(cpus) + 1}")
    assert result.exit_code == 2 and f"holds at most {math.floor(cpus)}" in result.output, result.output
    result = invoke("tune", config, f"cluster.cpus_per_worker={cpus + 1}")
    assert result.exit_code == 2, result.output
    assert not (config.parent / "output").exists() and not (config.parent / "runs").exists()


def test_train_from_tune_without_a_sweep_exits_2(tiny_config_file):
    result = invoke("train", tiny_config_file(), "--from-tune")
    assert result.exit_code == 2
    assert "no tune result for domain 'medical'" in result.output and "loramill tune" in result.output


def test_grace_at_or_past_the_last_evaluation_warns(tiny_config_file):
    cfg = load_config(tiny_config_file(**SWEEP), ["tune.grace_evals=4"])
    schedule = tune.plan_schedule(cfg, cfg.domain("medical"))
    assert schedule.steps == 4 and schedule.grace_steps == 4
    assert "ASHA can stop no trial" in schedule.warnings[0]
    assert tune.plan_schedule(load_config(tiny_config_file(**SWEEP)), cfg.domain("medical")).warnings == []


def test_search_space_and_trial_values():
    from ray.tune.search.sample import Categorical, Float

    from lora.config import TuneSettings

    grid = sweep.search_space(TuneSettings(search="grid", ranks=[4, 8], learning_rates=[1e-3],
                                          target_module_sets=["all-linear", ["q_proj", "v_proj"]]))
    assert grid["r"] == {"grid_search": [4, 8]} and grid["learning_rate"] == {"grid_search": [1e-3]}
    assert grid["target_modules"] == {"grid_search": ["all-linear", "q_proj,v_proj"]}
    sampled = sweep.search_space(TuneSettings(search="optuna", alpha_per_rank=False, alphas=[16.0], dropouts=[0.1]))
    assert isinstance(sampled["alpha"], Categorical) and isinstance(sampled["learning_rate"], Float)
    assert set(sampled) == {"r", "alpha", "learning_rate", "dropout"}


def test_trial_config_and_experiment_name(tiny_config_file):
    cfg = load_config(tiny_config_file(**SWEEP))
    params = {"r": 8, "alpha_ratio": 0.5, "learning_rate": 3e-4, "target_modules": "q_proj,v_proj"}
    trial = sweep.trial_config(cfg, params)
    assert (trial.lora.r, trial.lora.alpha, trial.train.learning_rate) == (8, 4.0, 3e-4)
    assert trial.lora.target_modules == ["q_proj", "v_proj"] and trial.lora.dropout == cfg.lora.dropout
    with pytest.raises(ConfigError, match="no domain named"):
        tune.best_config(cfg, "finance")

    domain = cfg.domain("medical")
    data = data_fingerprint(domain)
    name = tune.experiment_name(cfg, domain, data)
    assert name.startswith("medical-") and name == tune.experiment_name(load_config(tiny_config_file(**SWEEP)),
                                                                        domain, data)
    capped = load_config(tiny_config_file(**SWEEP), ["tune.max_concurrent_trials=2"])
    assert tune.experiment_name(capped, domain, data) == name  # resuming with another cap is the same sweep
    assert tune.experiment_name(load_config(tiny_config_file(**SWEEP), ["tune.ranks=[8]"]), domain, data) != name
    assert tune.experiment_name(cfg, domain, data | {"train": "0" * 64}) != name  # new bytes, new sweep


def test_domains_swept_side_by_side_each_train_their_own_data(ray_cluster, tiny_config_file):
    one_trial = {"search": "grid", "ranks": [2], "alphas": [2.0], "learning_rates": [1e-2], "max_concurrent_trials": 1}
    config = tiny_config_file(domains=("medical", "legal"), tune=one_trial,
                              train={"max_steps": 2, "eval_every": 1, "checkpoint_every": 2})
    result = invoke("tune", config)
    assert result.exit_code == 0, result.output
    for domain in ("medical", "legal"):
        experiment = read_json(config.parent / f"output/{domain}/tune/tune_results.json")["experiment"]
        [run_info] = [read_json(p) for p in Path(experiment).glob("*/checkpoint_*/run_info.json")]
        assert run_info["domain"] == domain
        assert f"/{domain}/" in run_info["data"]["train"]["url"]  # the data it trained on, not the other sweep's


def test_asha_rungs_survive_a_resume():
    """What Tune does on --resume, by hand: the Tuner's state (scheduler and callbacks, pickled together before any
    result) is unpickled, then the callbacks' saved state is set. A weak trial started after the resume must meet the
    rungs the finished trials left, as it would have without the interruption."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    def asha_and_callback():
        scheduler = ASHAScheduler(time_attr=sweep.STEP, max_t=8, grace_period=2, reduction_factor=2,
                                       stop_last_trials=False, metric=sweep.METRIC, mode="min")
        return scheduler, sweep.AshaRungs(scheduler)

    def report(scheduler, trial_id, step, loss):
        trial = SimpleNamespace(trial_id=trial_id)
        if step == 1:
            scheduler.on_trial_add(None, trial)
        return scheduler.on_trial_result(None, trial, {sweep.STEP: step, sweep.METRIC: loss})

    scheduler, callback = asha_and_callback()
    tuner_state = pickle.dumps((scheduler, callback))  # as Tuner saves it when the sweep starts
    for trial_id, loss in (("a", 1.0), ("b", 1.5)):
        for step in range(1, 9):
            report(scheduler, trial_id, step, loss / step)
    saved = callback.get_state()

    restored_scheduler, restored_callback = pickle.loads(tuner_state)
    restored_callback.set_state(saved)
    assert restored_callback.get_state() == saved
    assert report(restored_scheduler, "weak", 1, 9.0) == TrialScheduler.CONTINUE
    assert report(restored_scheduler, "weak", 2, 8.0) == TrialScheduler.STOP  # below the cut at rung 2

    fresh_scheduler, _ = pickle.loads(tuner_state)  # without the callback's state: empty rungs, nothing to beat
    report(fresh_scheduler, "weak", 1, 9.0)
    assert report(fresh_scheduler, "weak", 2, 8.0) == TrialScheduler.CONTINUE


def test_a_sweep_whose_trials_all_fail_ends_in_one_line(ray_cluster, tiny_config_file):
    """Every trial fails in its worker: no example fits train.max_seq_len=16, which only tokenizing shows. The CLI
    exits 1 with the train stage's one-line error, naming the domain and the cause, and no traceback."""
    one_trial = {"search": "grid", "ranks": [2], "alphas": [2.0], "learning_rates": [1e-2], "max_concurrent_trials": 1}
    config = tiny_config_file(tune=one_trial, train={"max_steps": 2, "eval_every": 1, "checkpoint_every": 2,
                                                     "max_seq_len": 16}, cluster={"max_failures": 0})
    result = invoke("tune", config)
    assert result.exit_code == 1, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert "domain 'medical'" in line and "longer than train.max_seq_len=16" in line, line
    assert "Traceback" not in result.output, result.output
