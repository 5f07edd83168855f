"""A real check on the real model: the packaged MiniLM on real SST-2, reloaded with plain peft."""

import json

import numpy as np
import pytest
import torch

from bayes_adalora.cli import main
from conftest import SHARED_GLUE

pytestmark = pytest.mark.skipif(not (SHARED_GLUE / "SST-2").is_dir(), reason="GLUE files not beside the checkout")


def test_minilm_adapter_reloads_in_plain_peft_with_the_same_dev_accuracy(tmp_path, minilm_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "run"
    code = main(["train", "--task", "sst2", "--data-dir", str(SHARED_GLUE), "--max-steps", "24",
                 "--batch-size", "16", "--max-train-samples", "800", "--max-eval-samples", "200", "--max-length", "64",
                 "--eval-steps", "12", "--output-dir", str(out), "--no-progress", "--no-plots"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["total_rank"] == 4 * len(results["final_ranks"])  # target_r 4 per matrix

    # Plain peft and plain tokenisation, written here without the package's data code.
    base = AutoModelForSequenceClassification.from_pretrained(results["model"], num_labels=2)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    rows = [
        line.rstrip("\n").split("\t") for line in (SHARED_GLUE / "SST-2" / "dev.tsv").read_text().splitlines()[1:201]
    ]
    with torch.no_grad():
        batch = tokenizer([r[0] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
        predictions = model(**batch).logits.argmax(-1).numpy()
    accuracy = float(np.mean(predictions == np.array([int(r[1]) for r in rows])))
    assert accuracy == results["metrics"]["final"]["accuracy"]
