"""Issue 27: nothing lost, nothing silently misread. Each class of what a hostile user tried, in several
variants: the exit code, the one sentence printed, and that nothing was written over (byte for byte)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bayes_adalora.cli import main


def train_argv(glue_dir, model, out, *extra) -> list[str]:
    return ["train", "--task", "sst2", "--data-dir", str(glue_dir), "--model", str(model), "--output-dir", str(out),
            "--method", "lora", "--max-steps", "2", "--max-length", "16", "--batch-size", "8",
            "--max-eval-samples", "8", "--no-progress", "--no-plots", *extra]


def refused(capfd, args: list, code: int = 2) -> str:
    """The one line printed by a refused command (exit `code`, no traceback)."""
    capfd.readouterr()
    got = main([str(a) for a in args])
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and "Traceback" not in err, (got, err)
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, glue_dir, tiny_deberta) -> Path:
    out = tmp_path_factory.mktemp("adversarial") / "run"
    assert main(train_argv(glue_dir, tiny_deberta, out, "--save-steps", "1")) == 0
    return out


# ----------------------------------------------------------------------------- data loss: evaluate --predictions


def predictions_targets(run: Path, tmp_path: Path, glue_dir: Path) -> dict[str, Path]:
    """Paths that already hold something: --predictions must write over none of them."""
    other = tmp_path / "notes.csv"
    other.write_text("mine\n")
    data = tmp_path / "dev.tsv"
    shutil.copy(glue_dir / "SST-2" / "dev.tsv", data)
    link = tmp_path / "link.csv"
    link.symlink_to(other)
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "nowhere.csv")
    return {"the run's results.json": run / "results.json", "the run's config.json": run / "config.json",
            "the evaluated data file": data, "a file of the user's": other, "a symlink to a file": link,
            "a dangling symlink": dangling}


@pytest.mark.parametrize("target", ["the run's results.json", "the run's config.json", "the evaluated data file",
                                    "a file of the user's", "a symlink to a file", "a dangling symlink"])
def test_evaluate_never_writes_predictions_over_an_existing_path(target, run, tmp_path, glue_dir, capfd):
    path = predictions_targets(run, tmp_path, glue_dir)[target]
    data = tmp_path / "dev.tsv"
    before, run_before = snapshot(tmp_path), snapshot(run)
    line = refused(capfd, ["evaluate", run, "--data-file", data, "--predictions", path, "--device", "cpu"])
    kind = "a symbolic link to nothing" if target == "a dangling symlink" else "a file"
    assert line == (f"bayes-adalora: error: --predictions {path} already exists ({kind}): bayes-adalora writes only "
                    f"new files here; remove it or choose another name")
    assert snapshot(tmp_path) == before and snapshot(run) == run_before


@pytest.mark.parametrize("inside", ["adapter/predictions.csv", "checkpoints/predictions.csv",
                                    "adapter/new/predictions.csv"])
def test_evaluate_writes_no_predictions_inside_the_runs_own_folders(inside, run, capfd):
    before = snapshot(run)
    line = refused(capfd, ["evaluate", run, "--predictions", run / inside, "--device", "cpu"])
    top = inside.split("/")[0]
    assert line == (f"bayes-adalora: error: --predictions {run / inside} lies inside {run / top}, part of the run "
                    f"in {run}; choose a folder outside the run's own files")
    assert snapshot(run) == before


def test_evaluate_writes_a_new_predictions_file_beside_the_run(run, capfd):
    path = run / "predictions.csv"  # beside the run's files, not inside them: allowed, and new
    try:
        assert main(["evaluate", str(run), "--predictions", str(path), "--device", "cpu"]) == 0
        assert path.read_text().splitlines()[0] == "index,prediction,probability"
    finally:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- data loss: what a run is


def test_a_transformers_model_folder_is_not_a_run_even_with_overwrite(tiny_deberta, tmp_path, glue_dir, capfd):
    model = tmp_path / "model"
    shutil.copytree(tiny_deberta, model)
    before = snapshot(model)
    line = refused(capfd, train_argv(glue_dir, tiny_deberta, model, "--overwrite"))
    assert line.startswith(f"bayes-adalora: error: --output-dir {model} holds files that are not a bayes-adalora "
                           f"run (") and "config.json" in line and line.endswith(
        "which --overwrite never replaces: choose a new or empty folder")
    assert snapshot(model) == before


@pytest.mark.parametrize("files", [
    {"config.json": '{"model_type": "bert"}\n'},  # a lone config.json
    {"config.json": '{"task": "sst2", "method": "lora"}\n', "results.json": "{}\n"},  # looks close, lacks the plan
    {"results.json": '{"accuracy": 1.0}\n'},  # someone else's results
    {"history.json": "[]\n", "adapter/x.bin": "weights"},  # names a run also uses
])
def test_a_folder_with_run_like_names_but_no_run_is_not_overwritten(files, tmp_path, glue_dir, tiny_deberta, capfd):
    out = tmp_path / "folder"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    line = refused(capfd, train_argv(glue_dir, tiny_deberta, out, "--overwrite"))
    assert "holds files that are not a bayes-adalora run" in line and "--overwrite never replaces" in line
    assert snapshot(out) == before


def test_a_run_of_an_older_version_without_the_marker_is_still_a_run(run, tmp_path, glue_dir, tiny_deberta, capfd):
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("checkpoints"))
    (old / "bayes-adalora.json").unlink()  # as written before the marker existed
    assert "already holds a run: pass --overwrite" in refused(capfd, train_argv(glue_dir, tiny_deberta, old))
    assert main(train_argv(glue_dir, tiny_deberta, old, "--overwrite")) == 0
    assert json.loads((old / "bayes-adalora.json").read_text()) == {"written_by": "bayes-adalora", "kind": "run"}


def test_overwrite_removes_the_old_runs_exports_and_keeps_the_users_folders(run, tmp_path, glue_dir, tiny_deberta,
                                                                           capfd):
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints"))
    assert main(["export", str(out)]) == 0 and main(["export", str(out), "--merge"]) == 0
    assert (out / "export" / "README.md").read_text().startswith("# lora on sst2")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("mine\n")
    assert main(train_argv(glue_dir, tiny_deberta, out, "--overwrite", "--method", "adalora")) == 0
    assert not (out / "export").exists() and not (out / "merged").exists()
    assert (out / "notes" / "todo.txt").read_text() == "mine\n"
    assert main(["export", str(out)]) == 0
    assert (out / "export" / "README.md").read_text().startswith("# adalora on sst2")


# ----------------------------------------------------------------------------- data loss: outputs inside a run


@pytest.mark.parametrize("inside", ["adapter", "adapter/sub", "checkpoints/x", "results.json"])
def test_export_refuses_an_output_inside_the_runs_own_files(inside, run, capfd):
    before = snapshot(run)
    line = refused(capfd, ["export", run, "--output-dir", run / inside])
    top = run / inside.split("/")[0]
    assert line.endswith((f"lies inside {top}, part of the run in {run}; choose a folder outside the run's own files",
                          "remove it or choose another folder"))
    assert snapshot(run) == before


def test_train_and_plot_refuse_outputs_inside_a_runs_own_files(run, tmp_path, glue_dir, tiny_deberta, capfd):
    before = snapshot(run)
    for args in (train_argv(glue_dir, tiny_deberta, run / "adapter" / "new"),
                 train_argv(glue_dir, tiny_deberta, run / "checkpoints" / "new"),
                 ["plot", run, "--output-dir", run / "adapter"]):
        assert "part of the run in" in refused(capfd, args)
    assert snapshot(run) == before


def test_plot_writes_over_no_figure_it_did_not_draw_and_no_other_run(run, tmp_path, capfd):
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "training.png").write_bytes(b"\x89PNG a figure of the user's")
    before = snapshot(figures)
    line = refused(capfd, ["plot", run, "--output-dir", figures])
    assert line == (f"bayes-adalora: error: --output-dir {figures} already holds training.png, which bayes-adalora "
                    f"did not write: remove it or choose another folder")
    assert snapshot(figures) == before
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints"))
    other_before = snapshot(other)
    assert "holds another run" in refused(capfd, ["plot", run, "--output-dir", other])
    assert snapshot(other) == other_before
    # figures it drew itself it may draw again
    mine = tmp_path / "mine"
    assert main(["plot", str(run), "--output-dir", str(mine)]) == 0
    assert main(["plot", str(run), "--output-dir", str(mine)]) == 0


# ----------------------------------------------------------------------------- messages: what a path is


def test_a_fifo_and_a_symlink_loop_are_named_for_what_they_are(run, tmp_path, glue_dir, tiny_deberta, capfd):
    fifo = tmp_path / "pipe.tsv"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    assert refused(capfd, train_argv(glue_dir, tiny_deberta, fifo)).endswith(
        f"--output-dir {fifo} is a FIFO (named pipe), not a folder")
    assert refused(capfd, ["evaluate", loop]).endswith(f"the run folder {loop} is a symlink loop, not a folder")
    assert refused(capfd, ["evaluate", run, "--data-file", fifo]).endswith(
        f"data file {fifo} is a FIFO (named pipe), not a file")
    assert refused(capfd, ["evaluate", run, "--data-file", loop]).endswith(
        f"data file {loop} is a symlink loop, not a file")
    assert refused(capfd, ["train", "--config", fifo]).endswith(f"--config {fifo} is a FIFO (named pipe), not a file")
    assert refused(capfd, ["plot", run, "--output-dir", loop]).endswith(
        f"--output-dir {loop} is a symlink loop, not a folder")
