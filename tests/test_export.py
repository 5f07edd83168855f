"""`bayes-adalora export`: the adapter with its model card and metadata, or the merged full model."""

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bayes_adalora import load_posterior_sigma, posterior_predictive
from bayes_adalora.cli import main
from bayes_adalora.run_folder import read_run
from bayes_adalora.run_io import load_run_model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, glue_dir, tiny_deberta):
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", "--task", "sst2", "--data-dir", str(glue_dir), "--model", str(tiny_deberta),
                 "--max-steps", "8", "--batch-size", "16", "--max-length", "32", "--init-r", "4", "--target-r", "2",
                 "--criterion", "snr", "--mc-samples", "4", "--no-progress", "--no-plots",
                 "--output-dir", str(out)]) == 0
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


def test_an_exported_ivon_run_copied_alone_gives_the_runs_mc_predictive_metrics(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--output-dir", str(tmp_path / "export")]) == 0
    alone = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(tmp_path / "export", alone)  # the folder alone, away from the run
    assert {"posterior.safetensors", "training_run.json", "adapter_model.safetensors", "README.md"} <= {
        f.name for f in alone.iterdir()}
    capsys.readouterr()
    assert main(["evaluate", str(alone), "--mc-samples", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    results = json.loads((tiny_run / "results.json").read_text())
    assert printed["metrics"]["point"] == results["metrics"]["final"]
    assert printed["metrics"]["mc"] == results["metrics"]["mc"]  # the run's own 4 draws, seeded alike


def test_the_exported_posterior_fits_a_model_loaded_with_stock_peft(tiny_run, tmp_path, tiny_deberta, glue_dir):
    assert main(["export", str(tiny_run), "--output-dir", str(tmp_path / "export")]) == 0
    export = tmp_path / "export"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_deberta, num_labels=2)
    model = PeftModel.from_pretrained(base, export).eval()  # stock peft: the adapter cut to its kept triplets
    sigma = load_posterior_sigma(export, model)
    run = read_run(tiny_run)
    pattern = json.loads((export / "adapter_config.json").read_text())["rank_pattern"]
    full = run.posterior("sigma")
    for key, keep in pattern.items():  # the kept rows of lambda and Q, the kept columns of P, as peft cut them
        name = "base_model.model." + key.rsplit(".", 1)[0]
        kept = torch.tensor(keep)
        assert torch.equal(sigma[f"{name}.lora_E.default"], full[f"{name}.lora_E.default"][kept])
        assert torch.equal(sigma[f"{name}.lora_A.default"], full[f"{name}.lora_A.default"][kept])
        assert torch.equal(sigma[f"{name}.lora_B.default"], full[f"{name}.lora_B.default"][:, kept])
    assert any(not all(keep) for keep in pattern.values())  # some triplet was cut, so the shapes differ
    _, trained = load_run_model(run, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_deberta)
    sentences = [line.split("\t")[0] for line in (glue_dir / "SST-2" / "dev.tsv").read_text().splitlines()[1:9]]
    batch = tokenizer(sentences, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():  # the same posterior mean (pruned triplets are zeros in one, absent in the other)
        point = model(**batch).logits
        assert torch.allclose(point, trained(**batch).logits, atol=1e-5)
    # the same sigma on the same weights, so the same posterior; the draws themselves differ in order
    zero = {name: torch.zeros_like(s) for name, s in sigma.items()}
    assert torch.allclose(posterior_predictive(model, zero, batch, samples=2), torch.softmax(point, -1), atol=1e-6)
    drawn = posterior_predictive(model, sigma, batch, samples=3, seed=0)
    assert not torch.equal(drawn, torch.softmax(point, -1))  # the draws move it (a tiny random model: a little)
    assert torch.equal(drawn, posterior_predictive(model, sigma, batch, samples=3, seed=0))


def test_the_model_card_has_the_hubs_front_matter(tiny_run, tmp_path):
    assert main(["export", str(tiny_run), "--output-dir", str(tmp_path / "export")]) == 0
    card = ModelCard.load(tmp_path / "export" / "README.md")
    results = json.loads((tiny_run / "results.json").read_text())
    assert card.data.library_name == "peft"
    assert card.data.base_model is None  # a local folder: no Hub id is claimed for it
    assert {"bayes-adalora", "adalora", "ivon"} <= set(card.data.tags)
    assert card.data.datasets == ["nyu-mll/glue"]
    scored = {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert scored[("accuracy", None)] == results["metrics"]["final"]["accuracy"]
    assert scored[("ece", None)] == results["metrics"]["final"]["ece"]
    assert scored[("nll", "nll (posterior predictive, 4 draws)")] == results["metrics"]["mc"]["nll"]
    assert {r.dataset_type for r in card.data.eval_results} == {"nyu-mll/glue"}
    assert "## Uncertainty" in card.text and "--mc-samples 16" in card.text


@pytest.mark.parametrize("resolved, expected", [
    ({"model": "/somewhere/minilm", "derived": ["model"]}, "sentence-transformers/all-MiniLM-L6-v2"),
    ({"model": "Qwen/Qwen2.5-0.5B", "derived": []}, "Qwen/Qwen2.5-0.5B"),
    ({"model": "gpt2", "derived": []}, "gpt2"),
    ({"model": "runs/my model", "derived": []}, None),
])
def test_base_model_id_is_the_hubs_where_known(resolved, expected):
    from bayes_adalora.export import base_model_id

    assert base_model_id(resolved) == expected


def test_a_local_base_folder_is_no_hub_id(tiny_deberta):
    from bayes_adalora.export import base_model_id

    assert base_model_id({"model": str(tiny_deberta), "derived": []}) is None


def test_export_refuses_the_posterior_where_there_is_none_to_write(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--merge", "--with-posterior", "--output-dir", str(tmp_path / "m")]) == 2
    assert "--with-posterior and --merge do not go together" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--output-dir", str(tmp_path / "e")]) == 0
    assert main(["export", str(tmp_path / "e"), "--output-dir", str(tmp_path / "again")]) == 2
    assert "is already an export" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--no-posterior", "--output-dir", str(tmp_path / "bare")]) == 0
    assert not (tmp_path / "bare" / "posterior.safetensors").exists()
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "bare"), "--mc-samples", "2"]) == 2
    assert "no posterior.safetensors" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--merge", "--output-dir", str(tmp_path / "merged")]) == 0
    assert main(["evaluate", str(tmp_path / "merged")]) == 2
    assert "an export without training_run.json (a merged model" in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial folder left
