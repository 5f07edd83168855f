"""Do the posterior criteria allocate ranks differently now that sigma varies? Mini-GLUE v3's ablation runs.

In v2, with sigma at its prior, `snr` and `mean_abs` made identical masks in every run, so "magnitude, not variance,
carries importance" (claim 4) could not be told from a tautology. This reads the v3 grid's run folders and asks two
things of each ablation task and seed:

- **Final masks.** Each arm's final rank pattern (peft's `rank_pattern` in the exported adapter) against
  bayes-adalora's (snr_abs) at the same seed: the share of triplets whose keep/mask flag differs and the number of
  matrices whose rank differs. The runs share seed, data order and learning rate, so two criteria that ranked every
  triplet alike would give the same masks.
- **One state, every criterion.** On bayes-adalora's final posterior (`posterior.safetensors`: mu and sigma of every
  P, lambda and Q entry), the triplet scores S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj) under each posterior
  criterion, and their Spearman correlation with snr_abs over the triplets the run kept.

    python benchmarks/mask_agreement.py --work ../grid-v3-runs

Reads only what the grid wrote; writes `results/mask-agreement.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import mini_glue_v3 as v3  # noqa: E402

REFERENCE = "bayes-adalora"
ARMS = ("bayes-mean_abs", "bayes-inv_sigma", "bayes-snr", "adalora-ivon", "adalora")
SAME_STATE = ("snr", "mean_abs", "inv_sigma", "e_abs")  # against snr_abs, on bayes-adalora's final posterior


def run_folder(work: Path, task: str, arm: str, seed: int) -> Path:
    return work / "grid" / task / f"{arm}-seed{seed}"


def final_pattern(folder: Path) -> dict[str, list[bool]] | None:
    """peft's rank pattern of a finished run's adapter; None when the run has not finished."""
    config = folder / "adapter" / "adapter_config.json"
    if not (folder / "results.json").exists() or not config.exists():
        return None
    return json.loads(config.read_text())["rank_pattern"]


def compare_patterns(a: dict[str, list[bool]], b: dict[str, list[bool]]) -> dict:
    """Share of triplet flags that differ, and matrices whose rank differs, between two patterns of one model."""
    if a.keys() != b.keys():
        raise ValueError("the two rank patterns are of different models")
    flags = sum(len(a[k]) for k in a)
    differ = sum(x != y for k in a for x, y in zip(a[k], b[k], strict=True))
    return {"triplets": flags, "flags_differ": differ / flags,
            "matrices_rank_differs": sum(sum(a[k]) != sum(b[k]) for k in a), "matrices": len(a)}


def triplet_scores(posterior: dict, criterion: str, matrices: list[str]):
    """S_k of every triplet of `matrices` (peft's rank-pattern keys, "<module>.lora_E"), in that order, from the
    posterior's mu and sigma by name."""
    import torch

    from bayes_adalora.adapters import BASE_PREFIX
    from bayes_adalora.importance import posterior_score

    def s(module, part):
        name = f"{BASE_PREFIX}{module}.{part}.default"
        return posterior_score(criterion, posterior[f"{name}.mean"], posterior[f"{name}.sigma"])

    out = []
    for matrix in matrices:
        module = matrix.removesuffix(".lora_E")
        # peft's AdaLoRA: lora_B is P (out x r), lora_E is lambda (r x 1), lora_A is Q (r x in)
        out.append(s(module, "lora_E").reshape(-1) + s(module, "lora_B").mean(0) + s(module, "lora_A").mean(1))
    return torch.cat(out)


def same_state(folder: Path, pattern: dict[str, list[bool]]) -> dict | None:
    """Spearman correlation of each criterion's triplet scores with snr_abs's, over the triplets the run kept
    (`pattern`: its final rank pattern)."""
    import torch
    from safetensors.torch import load_file

    from bayes_adalora.adapters import POSTERIOR_FILE
    from bayes_adalora.evaluation import rank_correlation

    path = folder / POSTERIOR_FILE
    if not path.exists():
        return None
    posterior = load_file(str(path))
    matrices = list(pattern)
    kept = torch.tensor([flag for m in matrices for flag in pattern[m]], dtype=torch.bool)
    reference = triplet_scores(posterior, "snr_abs", matrices)[kept]
    return {c: rank_correlation(reference, triplet_scores(posterior, c, matrices)[kept]) for c in SAME_STATE}


def collect(work: Path) -> dict:
    table = {}
    for task in v3.ABLATION_TASKS:
        rows = {arm: [] for arm in ARMS}
        state = []
        for seed in (*v3.SEEDS, *v3.EXTRA_SEEDS):
            ref_folder = run_folder(work, task, REFERENCE, seed)
            ref = final_pattern(ref_folder)
            if ref is None:
                continue
            for arm in ARMS:
                other = final_pattern(run_folder(work, task, arm, seed))
                if other is not None:
                    rows[arm].append({"seed": seed, **compare_patterns(other, ref)})
            if seed in v3.SEEDS and (s := same_state(ref_folder, ref)) is not None:
                state.append({"seed": seed, **s})
        table[task] = {"final_masks": {a: r for a, r in rows.items() if r}, "same_state": state}
    return table


def markdown(table: dict) -> str:
    lines = ["# Do the criteria allocate ranks differently? (Mini-GLUE v3 ablation runs)", "",
             "Written by `benchmarks/mask_agreement.py` from the v3 grid's run folders. Each arm's final rank "
             "pattern against bayes-adalora's (snr_abs) at the same seed, and, on bayes-adalora's final posterior, "
             "each criterion's triplet scores against snr_abs's (Spearman, over the triplets the run kept). Once "
             "two runs' masks differ their training differs too, so the share of differing flags bounds the "
             "criterion's own effect from above; the one-state correlation is the cleaner measure of it. adalora "
             "(AdamW, its own lr) shows how far apart two unrelated runs' masks fall.", "",
             "## Final masks against bayes-adalora (snr_abs), same seed", "",
             "| task | arm | seeds | triplet flags that differ (mean; per seed) | matrices whose rank differs (mean of "
             "the matrices) |", "|---|---|---|---|---|"]
    for task, t in table.items():
        for arm, rows in t["final_masks"].items():
            per_seed = ", ".join(f"{r['flags_differ']:.3f}" for r in rows)
            lines.append(f"| {task} | {arm} | {len(rows)} | {statistics.mean(r['flags_differ'] for r in rows):.3f} "
                         f"({per_seed}) | {statistics.mean(r['matrices_rank_differs'] for r in rows):.1f} of "
                         f"{rows[0]['matrices']} |")
    lines += ["", "## One state, every criterion: Spearman with snr_abs over the kept triplets", "",
              "| task | seeds | " + " | ".join(SAME_STATE) + " |", "|---|---|" + "---|" * len(SAME_STATE)]
    for task, t in table.items():
        if t["same_state"]:
            cells = [f"{statistics.mean(r[c] for r in t['same_state']):.3f}" for c in SAME_STATE]
            lines.append(f"| {task} | {len(t['same_state'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the v3 grid's work folder (its grid/ subfolder)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "mask-agreement.json")
    args = parser.parse_args(argv)
    if not (args.work / "grid").is_dir():
        parser.error(f"{args.work} has no grid/ folder: pass the work folder the v3 grid ran in")
    table = collect(args.work)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(table))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
