"""What several test files share: references the tests compare the package against (written independently of
it), and the checks of a refused command."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import torch


def triplet_scores(score_p: torch.Tensor, score_lambda: torch.Tensor, score_q: torch.Tensor) -> torch.Tensor:
    """AdaLoRA's triplet score for one matrix, per triplet k: S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj).

    score_p: (out, r) scores of P (peft's lora_B), score_lambda: (r, 1) or (r,), score_q: (r, in)
    scores of Q (peft's lora_A). Returns shape (r,).
    """
    return score_lambda.reshape(-1) + score_p.mean(dim=0) + score_q.mean(dim=1)


def rounding_bound(reference: torch.Tensor, reduction: int, depth: int) -> float:
    """How far two correct float computations of `reference` may lie apart when they differ only in the
    order of their sums (another kernel, another SIMD width: ATEN_CPU_CAPABILITY), from the dtype's
    precision and the size of the computation, not from one machine's kernels.

    A sum of n terms carries a rounding error of about eps * sqrt(n) of its terms' scale (errors of random
    sign: Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 2.8); `depth` such sums
    (layers, forward and backward) add theirs; the scale is the largest |value| compared; 8 is the margin
    for the constant. A wrong term (a missing adapter branch, a wrong scaling) is orders of magnitude larger.
    """
    eps = torch.finfo(reference.dtype).eps
    return 8 * eps * math.sqrt(reduction) * depth * reference.detach().abs().max().item()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def train_argv(data_dir, model, out, *extra: str, task: str = "sst2", plots: bool = False, **flags) -> list[str]:
    """`bayes-adalora train`'s arguments for a test run on GLUE files: the task, data, model and output folder, no
    progress bar (nor figures unless `plots`), then `flags` (`max_steps=8` is `--max-steps 8`) and `extra`."""
    words = ["train", "--task", task, "--data-dir", str(data_dir), "--model", str(model), "--output-dir", str(out),
             "--no-progress", *([] if plots else ["--no-plots"])]
    for name, value in flags.items():
        words += ["--" + name.replace("_", "-"), str(value)]
    return [*words, *extra]


def refused(capfd, args: list, *words: str, code: int = 2) -> str:
    """The one stderr line of a refused `bayes-adalora` command: exit `code` (2: bad input), no traceback, and
    each of `words` in it."""
    from bayes_adalora.cli import main

    capfd.readouterr()
    got = main([str(a) for a in args])
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and "Traceback" not in err, (got, err)
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def complete_checkpoints(out: Path) -> list[int]:
    """The steps of a run's complete checkpoints (the run's state file is written last)."""
    folder = Path(out) / "checkpoints"
    found = folder.glob("checkpoint-*/bayes-adalora-state.json") if folder.is_dir() else []
    return sorted(int(p.parent.name.split("-")[1]) for p in found)


def kill_at_checkpoint(command: list[str], out: Path, step: int, deadline_s: float = 600) -> None:
    """Start `command` (a run writing into `out`), and SIGKILL it and every process it started once checkpoint
    `step` (or a later one) is complete; fail, with the run's last error lines, where it ends first or where the
    checkpoint does not come within `deadline_s`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = Path(out).with_name(Path(out).name + ".stderr")
    with log.open("w") as stderr:
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + deadline_s
        try:
            while child.poll() is None and not (complete_checkpoints(out) and max(complete_checkpoints(out)) >= step):
                if time.time() > deadline:
                    raise TimeoutError(f"checkpoint {step} did not come within {deadline_s} s")
                time.sleep(0.05)
            assert child.poll() is None, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
        finally:
            kill_tree(child.pid)  # the launcher and every process it started (torchrun's in sessions of their own)
            child.wait()
    assert not (Path(out) / "results.json").exists()


def kill_tree(pid: int) -> None:
    """SIGKILL process `pid` and all its descendants, found in /proc, at once (stopped first, so none can start
    another or notice the others' end)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])  # after the command name, which may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for member in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, sig)
