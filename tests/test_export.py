"""`bayes-adalora export`: the adapter with its model card and metadata, or the merged full model."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bayes_adalora.cli import main
from bayes_adalora.run_folder import read_run
from bayes_adalora.run_io import load_run_model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, glue_dir, tiny_deberta):
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", "--task", "sst2", "--data-dir", str(glue_dir), "--model", str(tiny_deberta),
                 "--max-steps", "8", "--batch-size", "16", "--max-length", "32", "--init-r", "4", "--target-r", "2",
                 "--criterion", "snr", "--no-progress", "--no-plots", "--output-dir", str(out)]) == 0
    return out


def test_export_writes_the_adapter_with_a_model_card_and_its_budget_in_the_metadata(tiny_run, tmp_path):
    out = tmp_path / "adapter"
    assert main(["export", str(tiny_run), "--output-dir", str(out)]) == 0
    results = json.loads((tiny_run / "results.json").read_text())
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(safe_open(str(tiny_run / "adapter" / "adapter_model.safetensors"), "pt").keys())
    assert meta["format"] == "pt"
    assert (meta["bayes_adalora.criterion"], meta["bayes_adalora.init_r"], meta["bayes_adalora.target_r"]) == (
        "snr", "4", "2")
    assert int(meta["bayes_adalora.total_rank"]) == results["total_rank"] == 2 * len(results["final_ranks"])
    card = (out / "README.md").read_text()
    for expected in ("base model:", "method: bayes-adalora", "criterion: snr",
                     f"final total rank {results['total_rank']}",
                     f"| ece | {results['metrics']['final']['ece']:.4f} |", "--criterion snr", "--max-steps 8"):
        assert expected in card, expected


def test_export_merge_writes_a_model_plain_transformers_loads_predicting_as_the_run(tiny_run, tmp_path, glue_dir):
    out = tmp_path / "merged"
    assert main(["export", str(tiny_run), "--merge", "--output-dir", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)
    sentences = [line.split("\t")[0] for line in (glue_dir / "SST-2" / "dev.tsv").read_text().splitlines()[1:17]]
    batch = tokenizer(sentences, truncation=True, max_length=32, padding=True, return_tensors="pt")
    _, adapter_model = load_run_model(read_run(tiny_run), torch.device("cpu"))
    with torch.no_grad():
        merged_logits, run_logits = merged(**batch).logits, adapter_model(**batch).logits
    assert (merged_logits - run_logits).abs().max() < 1e-5
    assert "merge_and_unload" in (out / "README.md").read_text()


def test_export_refuses_an_existing_output_and_a_folder_that_is_not_a_run(tiny_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    assert main(["export", str(tiny_run), "--output-dir", str(taken)]) == 2
    assert main(["export", str(tmp_path), "--merge"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [f"bayes-adalora: error: --output-dir {taken} already exists: remove it or choose another folder",
                      f"bayes-adalora: error: {tmp_path} is not a finished run: it has no config.json"]
    assert list(taken.iterdir()) == []


def test_export_refuses_a_damaged_adapter_in_one_sentence_and_leaves_no_folder_behind(tiny_run, tmp_path, capsys,
                                                                                      monkeypatch):
    import shutil

    from bayes_adalora import export

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "new" / "a" / "export"
    assert main(["export", str(run), "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"bayes-adalora: error: {weights} is damaged (it cannot be read): train the run again, or restore the file"]
    assert not (tmp_path / "new").exists()

    def another_export_meanwhile(path, load=export.load_file):  # writes beside this one's folders, then reads
        (tmp_path / "new" / "b").mkdir()
        (tmp_path / "new" / "b" / "done").write_text("")
        return load(path)

    monkeypatch.setattr(export, "load_file", another_export_meanwhile)
    assert main(["export", str(run), "--output-dir", str(out)]) == 2
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["b"]  # its work stays; this one's "a" goes
