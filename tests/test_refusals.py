"""Bad input refused cleanly: a diverging last update, output folders that cannot be
written, damaged checkpoints and saved runs. Each refusal: its exit code, one stderr line naming the
file or flag, no traceback, nothing written."""

from __future__ import annotations

import errno
import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bayes_adalora.train as train_module
from bayes_adalora.cli import main
from helpers import refused, train_argv


def argv(glue_dir, model, out, *extra) -> list[str]:
    return train_argv(glue_dir, model, out, *extra, max_steps=4, max_length=32, batch_size=8, max_eval_samples=8)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def run_with_checkpoint(tmp_path_factory, glue_dir, tiny_deberta) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(argv(glue_dir, tiny_deberta, out, "--save-steps", "2", "--mc-samples", "2")) == 0
    return out


# ----------------------------------------------------------------------------- the last update


@pytest.mark.parametrize("method", ["lora", "bayes-adalora"])
def test_a_run_whose_last_update_is_not_finite_stops_as_diverged_and_writes_nothing(method, capfd, tmp_path, glue_dir,
                                                                                      tiny_deberta, monkeypatch):
    """The loss of the last step is taken before its update: only a check of the weights sees that update."""
    make_optimizer = train_module.make_optimizer

    def overflowing_optimizer(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        step = optimizer.step

        def step_then_overflow(self, *a, **k):
            result = step(*a, **k)
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(float("inf"))
            return result

        optimizer.step = types.MethodType(step_then_overflow, optimizer)  # a method, as the scheduler wraps it
        return optimizer

    monkeypatch.setattr(train_module, "make_optimizer", overflowing_optimizer)
    out = tmp_path / "out"
    line = refused(capfd, argv(glue_dir, tiny_deberta, out, "--method", method, "--max-steps", "1"), code=1)
    assert "diverged at step 1" in line and "not finite after the last update" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- output folders


def test_an_output_folder_under_a_file_is_refused_before_training(capfd, tmp_path, glue_dir, tiny_deberta):
    (tmp_path / "afile").write_text("x")
    line = refused(capfd, argv(glue_dir, tiny_deberta, tmp_path / "afile" / "sub"))
    assert "afile" in line and "is a file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(capfd, glue_dir, tiny_deberta):
    line = refused(capfd, argv(glue_dir, tiny_deberta, Path("/proc/bayes-adalora-test/run")))  # even root cannot
    assert "/proc/bayes-adalora-test/run cannot be written" in line


def test_a_full_disk_at_the_end_leaves_no_half_written_run(capfd, tmp_path, glue_dir, tiny_deberta, monkeypatch):
    written = []

    def full_disk(obj, path):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        path.write_text("{}")

    monkeypatch.setattr(train_module, "write_json", full_disk)
    out = tmp_path / "out"
    line = refused(capfd, argv(glue_dir, tiny_deberta, out, "--method", "lora", "--max-steps", "1"))
    assert "No space left on device" in line and str(out) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt", "bayes-adalora-state.json"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(damaged, capfd, tmp_path, run_with_checkpoint, glue_dir,
                                                         tiny_deberta):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(run_with_checkpoint / "checkpoints" / "checkpoint-2", checkpoint)
    truncate(checkpoint / damaged)
    out = tmp_path / "resumed"
    line = refused(capfd, argv(glue_dir, tiny_deberta, out, "--mc-samples", "2", "--resume", str(checkpoint)))
    assert f"{checkpoint} is damaged ({damaged} cannot be read)" in line and "--resume-from-checkpoint PATH" in line
    assert not out.exists()


def test_a_resume_with_other_adapter_shapes_is_refused(capfd, tmp_path, run_with_checkpoint, glue_dir, tiny_deberta):
    checkpoint = run_with_checkpoint / "checkpoints" / "checkpoint-2"
    out = tmp_path / "resumed"
    line = refused(capfd, argv(glue_dir, tiny_deberta, out, "--init-r", "8", "--resume", str(checkpoint)))
    assert "trained with other settings (--init-r 6 there, 8 here)" in line and "--overwrite" in line
    assert not out.exists()


def test_a_resume_with_another_method_or_length_is_refused(capfd, tmp_path, run_with_checkpoint, glue_dir,
                                                            tiny_deberta):
    """AdamW's state in IVON (a KeyError mid-run before), or schedules that change half-way, are refused."""
    checkpoint = run_with_checkpoint / "checkpoints" / "checkpoint-2"
    out = tmp_path / "resumed"
    line = refused(capfd, argv(glue_dir, tiny_deberta, out, "--method", "adalora", "--resume", str(checkpoint)))
    assert "(--method 'bayes-adalora' there, 'adalora' here)" in line
    line = refused(capfd, argv(glue_dir, tiny_deberta, out, "--max-steps", "5", "--resume", str(checkpoint)))
    assert "(the step count 4 there, 5 here)" in line and "only --learning-rate" in line
    assert not out.exists()


def test_a_resume_on_other_training_data_is_refused_and_on_a_moved_copy_goes_on(capfd, tmp_path, run_with_checkpoint,
                                                                                glue_dir, tiny_deberta):
    """The data folder may move (its location is not a setting that trains), but not change: one label
    flipped would change what the rest of the run trains on, unseen."""
    checkpoint = run_with_checkpoint / "checkpoints" / "checkpoint-2"
    moved = tmp_path / "glue"
    shutil.copytree(glue_dir, moved)
    train_file = moved / "SST-2" / "train.tsv"
    original = train_file.read_text()
    header, first, *rest = original.splitlines()
    text, label = first.rsplit("\t", 1)
    train_file.write_text("\n".join([header, f"{text}\t{1 - int(label)}", *rest]) + "\n")
    out = tmp_path / "resumed"
    line = refused(capfd, argv(moved, tiny_deberta, out, "--mc-samples", "2", "--resume", str(checkpoint)))
    assert f"the checkpoint {checkpoint} was trained on other training data (64 examples in both, with other " \
           "contents)" in line and "--overwrite" in line
    assert not out.exists()
    train_file.write_text(original)
    assert main(argv(moved, tiny_deberta, out, "--mc-samples", "2", "--resume", str(checkpoint))) == 0
    # the lr the resume took from the checkpoint stays derived, as in the first run's config.json: --config of
    # the resumed run with --method adalora gets AdamW's lr, not IVON's
    assert "learning_rate" in json.loads((out / "config.json").read_text())["derived"]


# ----------------------------------------------------------------------------- saved runs


def damaged_copy(run: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    damage(copy)
    return copy


def non_finite_adapter(run: Path) -> None:
    path = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path, metadata={"format": "pt"})


DAMAGED_RUNS = {
    # name: (damage, extra evaluate flags, words the line must hold)
    "truncated adapter": (lambda r: truncate(r / "adapter" / "adapter_model.safetensors"), (),
                          ("adapter_model.safetensors is damaged",)),
    "config.json a list": (lambda r: (r / "config.json").write_text("[1, 2]\n"), (),
                           ("config.json holds a JSON list",)),
    "config.json without the plan": (lambda r: (r / "config.json").write_text('{"task": "sst2"}\n'), (),
                                     ("config.json does not hold a run's settings",)),
    "config.json with a NaN alpha": (lambda r: (r / "config.json").write_text(
        json.dumps({**json.loads((r / "config.json").read_text()), "lora_alpha": None})), (),
        ("config.json does not hold a valid configuration", "--lora-alpha")),
    "truncated posterior": (lambda r: truncate(r / "posterior.safetensors"), ("--mc-samples", "2"),
                            ("posterior.safetensors is damaged",)),
    "weights not finite": (non_finite_adapter, (), ("not finite", "diverged")),
}


@pytest.mark.parametrize("case", DAMAGED_RUNS)
def test_evaluate_refuses_a_damaged_run_in_one_line(case, capfd, tmp_path, run_with_checkpoint):
    damage, extra, words = DAMAGED_RUNS[case]
    run = damaged_copy(run_with_checkpoint, tmp_path, damage)
    line = refused(capfd, ["evaluate", str(run), "--device", "cpu", *extra])
    for word in words:
        assert word in line, (word, line)


def test_evaluate_refuses_a_data_file_that_is_not_utf8(capfd, tmp_path, run_with_checkpoint):
    data = tmp_path / "dev.tsv"
    data.write_bytes("sentence\tlabel\ncaf\u00e9 ok\t1\n".encode("latin-1"))
    line = refused(capfd, ["evaluate", str(run_with_checkpoint), "--data-file", str(data)])
    assert str(data) in line and "line 2" in line and "UTF-8" in line


# ----------------------------------------------------------------------------- very short runs


@pytest.mark.parametrize("method", ["bayes-adalora", "adalora-ivon", "adalora", "lora", "full"])
def test_runs_of_1_to_5_steps_work_or_are_refused_with_the_minimum(method, capfd, tmp_path, glue_dir, tiny_deberta):
    for steps in range(1, 6):
        out = tmp_path / f"steps-{steps}"
        args = argv(glue_dir, tiny_deberta, out, "--method", method, "--max-steps", str(steps), "--max-length", "16")
        if steps == 1 and method in ("adalora", "adalora-ivon"):  # peft's sensitivity allocator
            line = refused(capfd, args)
            assert "train 2 steps or more" in line and not out.exists()
            continue
        assert main(args) == 0, capfd.readouterr().err
        results = json.loads((out / "results.json").read_text())
        assert results["steps"] == steps and len(json.loads((out / "history.json").read_text())["loss"]) == steps
        if method in ("bayes-adalora", "adalora-ivon", "adalora"):  # the budget is met even so
            assert results["total_rank"] == 4 * len(results["final_ranks"])


# ----------------------------------------------------------------------------- evaluate's and plot's flags


@pytest.mark.parametrize("flags, words", [
    (("--mc-samples", "-1"), "--mc-samples must be 0 (off) or positive"),
    (("--max-eval-samples", "0"), "--max-eval-samples must be positive"),
    (("--seed", "-1"), "--seed must lie in [0, 4294967295]"),
    (("--mc-samples", "nan"), "invalid int value"),
    (("--device", "tpu"), "--device 'tpu' is not a device"),
])
def test_evaluate_refuses_bad_flags_like_train(flags, words, capfd, run_with_checkpoint):
    assert words in refused(capfd, ["evaluate", str(run_with_checkpoint), *flags])


def test_plot_refuses_an_output_folder_under_a_file(capfd, tmp_path, run_with_checkpoint):
    (tmp_path / "afile").write_text("x")
    line = refused(capfd, ["plot", str(run_with_checkpoint), "--output-dir", str(tmp_path / "afile" / "figures")])
    assert "is a file" in line and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
