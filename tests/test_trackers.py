"""`--report-to tensorboard`: loss, lr, rank budget, the main metric and IVON's sigma statistics, offline."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from bayes_adalora.cli import main

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_tensorboard_gets_the_history_and_sigma_percentiles_at_allocation_steps(tmp_path, glue_dir, tiny_deberta,
                                                                                capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "sst2", "--data-dir", str(glue_dir), "--model", str(tiny_deberta),
                 "--max-steps", "6", "--batch-size", "16", "--max-length", "32", "--init-r", "4", "--target-r", "2",
                 "--tinit", "2", "--tfinal", "0", "--delta-t", "2", "--eval-steps", "3", "--no-progress", "--no-plots",
                 "--report-to", "tensorboard", "--output-dir", str(out)]) == 0
    logs = next((out / "tensorboard" / "run").glob("events.out.tfevents.*")).parent
    events = event_accumulator.EventAccumulator(str(logs)).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    history = json.loads((out / "history.json").read_text())
    assert scalars["train/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in enumerate(history["loss"], 1)]
    assert scalars["train/lr"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in enumerate(history["lr"], 1)]
    assert scalars["train/rank_budget"] == [(s, v) for s, v in enumerate(history["budget"], 1)]
    assert scalars["eval/accuracy"] == [(e["step"], pytest.approx(e["accuracy"], rel=1e-6)) for e in history["eval"]]
    # allocation steps: after tinit, every delta_t steps (peft's budget schedule): 4 and 6
    assert [s for s, _ in scalars["sigma/lambda/median"]] == [4, 6]
    # at the last step, the percentiles of the sigma the run saved, computed here with numpy
    sigma = load_file(out / "posterior.safetensors")
    for factor, key in (("P", "lora_B"), ("lambda", "lora_E"), ("Q", "lora_A")):
        values = np.concatenate([v.numpy().ravel() for k, v in sigma.items()
                                 if f".{key}." in k and k.endswith(".sigma")])
        for tag, q in (("p01", 1), ("median", 50), ("p99", 99)):
            assert scalars[f"sigma/{factor}/{tag}"][-1] == (6, pytest.approx(np.percentile(values, q), rel=1e-5))
    assert scalars["sigma/P/p01"][-1][1] < scalars["sigma/P/p99"][-1][1]


def test_logging_steps_log_the_mean_loss_of_each_interval(tmp_path, glue_dir, tiny_deberta):
    out = tmp_path / "run"
    assert main(["train", "--task", "sst2", "--data-dir", str(glue_dir), "--model", str(tiny_deberta),
                 "--max-steps", "8", "--batch-size", "16", "--max-length", "32", "--no-progress", "--no-plots",
                 "--report-to", "tensorboard", "--logging-steps", "3", "--output-dir", str(out)]) == 0
    logs = next((out / "tensorboard" / "run").glob("events.out.tfevents.*")).parent
    events = event_accumulator.EventAccumulator(str(logs)).Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    history = json.loads((out / "history.json").read_text())["loss"]
    assert len(history) == 8  # history.json keeps every step
    means = [(3, np.mean(history[0:3])), (6, np.mean(history[3:6])), (8, np.mean(history[6:8]))]  # and the last
    assert loss == [(s, pytest.approx(v, rel=1e-6)) for s, v in means]


def test_a_tracker_whose_package_is_missing_is_refused_in_one_sentence(tmp_path, glue_dir, tiny_deberta, capsys,
                                                                       monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    out = tmp_path / "run"
    assert main(["train", "--task", "sst2", "--data-dir", str(glue_dir), "--model", str(tiny_deberta),
                 "--max-steps", "2", "--no-progress", "--report-to", "wandb", "--output-dir", str(out)]) == 2
    expected = "bayes-adalora: error: --report-to wandb needs the wandb package: pip install wandb\n"
    assert capsys.readouterr().err == expected
    assert not out.exists()


def test_a_failed_run_s_tensorboard_folder_neither_blocks_the_retry_nor_mixes_into_it(tmp_path, glue_dir, tiny_deberta,
                                                                                       capsys):
    out = tmp_path / "run"
    common = ["train", "--task", "sst2", "--data-dir", str(glue_dir), "--model", str(tiny_deberta),
              "--batch-size", "16", "--max-length", "32", "--no-progress", "--no-plots", "--report-to", "tensorboard",
              "--output-dir", str(out)]
    # diverges (exit 1) after the tracker has written its first steps: only tensorboard/ is left
    assert main([*common, "--max-steps", "6", "--learning-rate", "1e4", "--ivon-clip-radius", "1e6"]) == 1
    assert [p.name for p in out.iterdir()] == ["tensorboard"]
    capsys.readouterr()
    # the same command with a sane lr and no --overwrite runs, and its event file holds only its own steps
    assert main([*common, "--max-steps", "3"]) == 0
    event_files = list((out / "tensorboard" / "run").glob("events.out.tfevents.*"))  # (hparams go in a subfolder)
    assert len(event_files) == 1
    events = event_accumulator.EventAccumulator(str(event_files[0].parent)).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_a_run_that_fails_ends_its_tracker_run_as_failed_and_a_finished_one_as_finished(tmp_path, glue_dir,
                                                                                       tiny_deberta, capsys,
                                                                                       monkeypatch):
    import bayes_adalora.trackers as trackers

    ended = []

    class FakeWandbRun:
        def finish(self, exit_code=None):
            ended.append(("run.finish", exit_code))

    class FakeWandb:  # what accelerate's WandBTracker offers: name, run, log, finish
        name = "wandb"
        run = FakeWandbRun()

        def log(self, values, step):
            ended.append(("log", step))

        def finish(self):
            ended.append(("finish", None))

    monkeypatch.setattr(trackers, "start_tracker", lambda kind, out, config: FakeWandb())
    common = ["train", "--task", "sst2", "--data-dir", str(glue_dir), "--model", str(tiny_deberta),
              "--batch-size", "16", "--max-length", "32", "--no-progress", "--no-plots", "--report-to", "wandb"]
    assert main([*common, "--max-steps", "6", "--learning-rate", "1e4", "--ivon-clip-radius", "1e6",
                 "--output-dir", str(tmp_path / "diverges")]) == 1
    assert ended[-1] == ("run.finish", 1) and ("finish", None) not in ended  # after its logged steps
    assert any(e[0] == "log" for e in ended)
    ended.clear()
    assert main([*common, "--max-steps", "2", "--output-dir", str(tmp_path / "ok")]) == 0
    assert ended[-1] == ("finish", None) and [e for e in ended if e[0] != "log"] == [("finish", None)]


def test_a_tracker_that_fails_to_close_does_not_hide_the_run_s_own_error(tmp_path, monkeypatch):
    import bayes_adalora.trackers as trackers
    from bayes_adalora.errors import TrainingDiverged

    class BrokenRun:
        def finish(self, exit_code=None):
            raise OSError("network down")

    class BrokenWandb:
        name = "wandb"
        run = BrokenRun()

    monkeypatch.setattr(trackers, "start_tracker", lambda kind, out, config: BrokenWandb())
    with (pytest.warns(UserWarning, match=r"run was not closed \(OSError: network down\)"),
          pytest.raises(TrainingDiverged, match="diverged at step 3"),
          trackers.tracking("wandb", tmp_path, {})):
        raise TrainingDiverged("training diverged at step 3: the loss is NaN")


def test_a_wandb_run_is_named_after_the_folder_in_one_project_and_ends_failed_if_its_config_fails(tmp_path,
                                                                                              monkeypatch):
    """accelerate's WandBTracker takes its first argument as the project: each output folder became a project
    (and WANDB_PROJECT was overridden). A config that fails to store left the run "running"."""
    import accelerate.tracking
    import accelerate.utils

    import bayes_adalora.trackers as trackers

    made = []

    class FakeRun:
        def finish(self, exit_code=None):
            made.append(("finish", exit_code))

    class FakeWandBTracker:
        name = "wandb"

        def __init__(self, project, **kwargs):
            made.append((project, kwargs))
            self.run = FakeRun()

        def start(self):
            pass

        def store_init_configuration(self, values):
            raise OSError("network down")

    monkeypatch.setitem(accelerate.tracking.LOGGER_TYPE_TO_CLASS, "wandb", FakeWandBTracker)
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: True)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    with pytest.raises(OSError, match="network down"):
        trackers.start_tracker("wandb", tmp_path / "run-a", {"lr": 3.0})
    assert made == [("bayes-adalora", {"name": "run-a"}), ("finish", 1)]
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    made.clear()
    with pytest.raises(OSError):
        trackers.start_tracker("wandb", tmp_path / "run-b", {})
    assert made[0] == ("mine", {"name": "run-b"})
