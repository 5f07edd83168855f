"""Does `bayes-adalora export RUN --merge` give a model that predicts as the run did?

Reads the run's GLUE dev split with the package's own reader, scores it with the merged folder loaded by
plain `transformers` (no peft), and with the run's adapter model as `evaluate` rebuilds it (stock peft), and
prints both accuracies, the run's recorded final accuracy and the largest logit difference, as JSON:

    bayes-adalora export runs/sst2-quickstart --merge
    python benchmarks/merged_check.py runs/sst2-quickstart runs/sst2-quickstart/merged --data-dir $GLUE_DIR
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bayes_adalora.data import load_task_data
from bayes_adalora.run_folder import read_run
from bayes_adalora.run_io import load_run_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("merged")
    parser.add_argument("--data-dir", required=True, help="folder of GLUE TSVs")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    run = read_run(args.run)
    spec = run.spec
    split = spec.dev_splits[0]
    dev = load_task_data(spec, args.data_dir).dev[split]
    tokenizer = AutoTokenizer.from_pretrained(args.merged)
    merged = AutoModelForSequenceClassification.from_pretrained(args.merged).eval()
    _, adapter_model = load_run_model(run, torch.device("cpu"))
    adapter_model.eval()

    correct, worst = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(dev), args.batch_size):
            texts = dev.texts[start:start + args.batch_size]
            labels = torch.tensor(dev.labels[start:start + args.batch_size])
            columns = list(zip(*texts))
            enc = tokenizer(*columns, truncation=True, max_length=run.config.max_length, padding=True,
                            return_tensors="pt")
            a, b = merged(**enc).logits, adapter_model(**enc).logits
            worst = max(worst, (a - b).abs().max().item())
            correct += int((a.argmax(-1) == labels).sum())
    final = run.results["metrics"]["final"]
    print(json.dumps({"run": str(args.run), "task": spec.name, "examples": len(dev),
                      "merged_accuracy": correct / len(dev), "run_final_accuracy": final.get("accuracy"),
                      "max_abs_logit_diff_vs_adapter_model": worst}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
