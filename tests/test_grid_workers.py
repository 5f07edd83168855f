"""benchmarks/grid_workers.py: a pinned grid's cells, each run once, by several workers."""

import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import grid_workers


def fake_grid(results: Path, log: list):
    """A grid of 2 tuning cells (the sweep), then adalora and bayes-adalora with seeds 0-2 and 3-4."""
    seeds, extra = (0, 1, 2), (3, 4)

    def cell_path(results, task, cell, seed):
        return results / task / f"{cell}-{seed}.json"

    def chosen_lrs(results):
        return {"lr": 1} if all((results / f"tune{i}.json").exists() for i in (0, 1)) else None

    def jobs(results, work, glue_dir, lrs, extra_args):
        for i in (0, 1):
            yield results / f"tune{i}.json", ["tune", str(i)], {"tune": i}
        if lrs is None:
            return
        for seed in (*seeds, *extra):
            for cell in ("adalora", "bayes-adalora"):
                yield cell_path(results, "mrpc", cell, seed), [cell, str(seed)], {"task": "mrpc", "seed": seed}

    lock = threading.Lock()

    def run_cell(args, record, path, threads):
        with lock:
            log.append(("start", path.name, sorted(p.name for p in results.rglob("*.json"))))
        time.sleep(0.05)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        return {"metric": "f1", "best": 0.8, "train_seconds": 1}

    return SimpleNamespace(SEEDS=seeds, EXTRA_SEEDS=extra, cell_path=cell_path, chosen_lrs=chosen_lrs, jobs=jobs,
                           run_cell=run_cell)


def test_workers_run_every_cell_once_and_an_extra_seed_only_after_the_first_three(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grid_workers, "IDLE_SECONDS", 0.01)
    log = []
    scheduler = grid_workers.Scheduler(fake_grid(tmp_path, log), tmp_path, tmp_path / "work", tmp_path)
    failures = grid_workers.run_workers(scheduler, 3, 1)
    started = [name for _, name, _ in log]
    assert not failures and len(started) == len(set(started)) == 2 + 10  # every cell once
    assert capsys.readouterr().out.count(": best f1 0.8000") == 12
    for _, name, on_disk in log:
        if name.startswith("adalora-") or name.startswith("bayes-adalora-"):
            assert {"tune0.json", "tune1.json"} <= set(on_disk)  # the sweep came first
        if name.endswith(("-3.json", "-4.json")):  # the three first seeds of both cells were on disk
            assert {f"{c}-{s}.json" for c in ("adalora", "bayes-adalora") for s in (0, 1, 2)} <= set(on_disk)


def test_extra_seeds_first_takes_them_before_the_ablation_and_after_the_core(tmp_path, monkeypatch):
    """One worker, so the order is the scheduler's: the core's seeds 0-2, then 3-4, then the ablation."""
    monkeypatch.setattr(grid_workers, "IDLE_SECONDS", 0.01)
    log = []
    grid = fake_grid(tmp_path, log)
    core_jobs = grid.jobs

    def jobs(results, work, glue_dir, lrs, extra_args):  # the plan: tuning, core 0-2, ablation 0-2, extra 3-4
        planned = list(core_jobs(results, work, glue_dir, lrs, extra_args))
        tuning = [j for j in planned if "tune" in j[2]]
        first = [(p, a, {**r, "cell": p.name.rsplit("-", 1)[0]}) for p, a, r in planned if r.get("seed") in (0, 1, 2)]
        extra = [(p, a, {**r, "cell": p.name.rsplit("-", 1)[0]}) for p, a, r in planned if r.get("seed") in (3, 4)]
        ablation = [(results / "mrpc" / f"bayes-snr-{s}.json", ["snr", str(s)], {"task": "mrpc", "seed": s,
                     "cell": "bayes-snr"}) for s in (0, 1, 2)]
        return iter(tuning + first + ablation + extra if lrs is not None else tuning)

    grid.jobs, grid.CORE = jobs, (SimpleNamespace(name="adalora"), SimpleNamespace(name="bayes-adalora"))
    scheduler = grid_workers.Scheduler(grid, tmp_path, tmp_path / "work", tmp_path, extra_seeds_first=True)
    assert not grid_workers.run_workers(scheduler, 1, 1)
    started = [name.removesuffix(".json") for _, name, _ in log]
    assert started[:2] == ["tune0", "tune1"] and started[-3:] == ["bayes-snr-0", "bayes-snr-1", "bayes-snr-2"]
    assert [name[-1] for name in started[2:-3]] == list("0011223344")


def test_the_pinned_checkout_s_script_loads_as_a_module_of_its_own():
    checkout = Path(__file__).resolve().parents[1]  # this checkout stands in for the pinned one
    grid = grid_workers.load_pinned(checkout)
    assert grid.__file__ == str(checkout / "benchmarks" / "mini_glue_v2.py")
    assert grid.TaskPlan(steps=3, max_length=8).eval_times == 4  # its dataclasses work (they need sys.modules)
    assert callable(grid.jobs) and callable(grid.run_cell) and grid.SEEDS == (0, 1, 2)


def test_a_failure_anywhere_stops_every_worker_and_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grid_workers, "IDLE_SECONDS", 0.01)
    log = []
    grid = fake_grid(tmp_path, log)
    run_cell = grid.run_cell

    def failing(args, record, path, threads):
        if path.name == "adalora-1.json":
            raise RuntimeError("cell adalora-1.json failed (exit 3)")
        return run_cell(args, record, path, threads)

    grid.run_cell = failing
    scheduler = grid_workers.Scheduler(grid, tmp_path, tmp_path / "work", tmp_path)
    failures = grid_workers.run_workers(scheduler, 2, 1)
    assert [str(f) for f in failures] == ["cell adalora-1.json failed (exit 3)"]
    started = [name for _, name, _ in log]
    assert len(started) <= 2 + 4 and "adalora-3.json" not in started  # nothing new after the failure
    assert "RuntimeError: cell adalora-1.json failed" in capsys.readouterr().err

    # a failure while choosing the next cell (a wrong --glue-dir, a broken cell file) too
    def broken_jobs(*args):
        raise FileNotFoundError("../nowhere/SST-2/train.tsv")
        yield

    grid.jobs = broken_jobs
    scheduler, failures = grid_workers.Scheduler(grid, tmp_path, tmp_path / "work", tmp_path), []
    grid_workers.worker(scheduler, 0, 1, failures)
    assert isinstance(failures[0], FileNotFoundError) and scheduler.stop.is_set()


def test_no_cell_starts_after_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(grid_workers, "IDLE_SECONDS", 0.01)
    log = []
    scheduler = grid_workers.Scheduler(fake_grid(tmp_path, log), tmp_path, tmp_path / "work", tmp_path,
                                       deadline=time.time() - 1)
    assert not grid_workers.run_workers(scheduler, 2, 1) and log == []
    scheduler.deadline = time.time() + 60
    assert not grid_workers.run_workers(scheduler, 2, 1) and len(log) == 2 + 10


def test_first_takes_the_named_cells_before_the_rest_of_their_stage_and_after_the_core(tmp_path, monkeypatch):
    monkeypatch.setattr(grid_workers, "IDLE_SECONDS", 0.01)
    log = []
    grid = fake_grid(tmp_path, log)
    core_jobs = grid.jobs

    def jobs(results, work, glue_dir, lrs, extra_args):  # tuning, core 0-2, ablation (snr, then lambda) 0-2, extra
        planned = list(core_jobs(results, work, glue_dir, lrs, extra_args))
        tuning = [j for j in planned if "tune" in j[2]]
        core = [(p, a, {**r, "cell": p.name.rsplit("-", 1)[0]}) for p, a, r in planned if r.get("seed") in (0, 1, 2)]
        ablation = [(results / "mrpc" / f"{c}-{s}.json", [c, str(s)], {"task": "mrpc", "seed": s, "cell": c})
                    for s in (0, 1, 2) for c in ("bayes-snr", "lambda-paper")]
        return iter(tuning + core + ablation if lrs is not None else tuning)

    grid.jobs, grid.CORE = jobs, (SimpleNamespace(name="adalora"), SimpleNamespace(name="bayes-adalora"))
    scheduler = grid_workers.Scheduler(grid, tmp_path, tmp_path / "work", tmp_path, first=("lambda-paper",))
    assert not grid_workers.run_workers(scheduler, 1, 1)
    started = [name.removesuffix(".json") for _, name, _ in log]
    assert started[:2] == ["tune0", "tune1"] and len(started) == 2 + 6 + 6
    assert [n.rsplit("-", 1)[0] for n in started[8:]] == ["lambda-paper"] * 3 + ["bayes-snr"] * 3
    assert {n.rsplit("-", 1)[0] for n in started[2:8]} == {"adalora", "bayes-adalora"}  # the core first


def test_the_workers_drive_the_pinned_v3_grid_each_job_once_and_its_sweep_first(tmp_path, glue_dir, monkeypatch):
    """v3 through --driver: its own jobs and order, with run_cell stubbed (no training here)."""
    monkeypatch.setattr(grid_workers, "IDLE_SECONDS", 0.01)
    checkout = Path(__file__).resolve().parents[1]
    v3 = grid_workers.load_pinned(checkout, "mini_glue_v3")
    assert v3.__file__ == str(checkout / "benchmarks" / "mini_glue_v3.py") and v3.CORE[1].name == "bayes-adalora"
    v3.TASKS = {"sst2": v3.TASKS["sst2"]}  # the fixture's task; a module of this test's own, nothing to restore
    v3.LADDERS = {"adalora": (1e-3, 2e-3), "ivon": (1.0, 2.0), "lora": (1e-3,)}
    v3.EXTRA_ROUNDS = 0
    order, lock = [], threading.Lock()

    def run_cell(args, record, path, threads):
        with lock:
            order.append((record["stage"], record["cell"], record["seed"], record["lr"]))
        done = {"metric": "accuracy", "best": 0.8, "final": 0.8, "train_seconds": 1,
                "metrics": {"final": {"accuracy": 0.8 + (record.get("lr") == 2e-3) / 10}}}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")  # whole or absent, as v2.run_cell writes it: the other worker reads it
        tmp.write_text(json.dumps({**record, **done}))
        tmp.replace(path)
        return done

    v3.run_cell = run_cell
    scheduler = grid_workers.Scheduler(v3, tmp_path, tmp_path / "work", glue_dir)
    assert not grid_workers.run_workers(scheduler, 2, 1)
    planned = [c for c in v3.planned_cells() if c[1] == "sst2"]
    assert len(order) == len(set(order)) == 4 + 1 + len(planned)  # the sweeps (adalora+ivon, lora), every cell
    assert {o[0] for o in order[:4]} == {"tune"}  # nothing before the main contrast's sweep is done
    lrs = v3.chosen_lrs(tmp_path)["sst2"]
    assert lrs["adalora"] == 2e-3 and lrs["ivon"] == 1.0 and lrs["ivon-v2"] == 4.24
    extra = [i for i, (s, *_) in enumerate(order) if s == "extra"]
    core = [i for i, (s, c, seed, _) in enumerate(order) if c in ("adalora", "bayes-adalora") and seed in (0, 1, 2)
            and s != "tune"]
    assert min(extra) > max(core)  # seeds 3-4 only once seeds 0-2 of the main contrast are on disk


def test_an_unknown_driver_or_one_the_pinned_checkout_lacks_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        grid_workers.main(["--pinned", str(tmp_path), "--driver", "mini_glue_v3", "--glue-dir", ".", "--results", ".",
                           "--work", "."])
    assert exit_.value.code == 2 and "has no benchmarks/mini_glue_v3.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grid_workers.main(["--pinned", str(tmp_path), "--driver", "mini_glue", "--glue-dir", ".", "--results", ".",
                           "--work", "."])


FAKE_DRIVER = '''
import subprocess, sys
from pathlib import Path
SEEDS, EXTRA_SEEDS, CORE = (0,), (), ()

def cell_path(results, task, cell, seed):
    return results / f"{cell}-{seed}.json"

def chosen_lrs(results):
    return {}

def jobs(results, work, glue_dir, lrs, extra):
    for cell in ("a", "b", "c"):
        yield cell_path(results, "t", cell, 0), [str(work / cell)], {"cell": cell, "seed": 0}

def run_cell(args, record, path, threads):  # a cell that runs until it is stopped, as a long `train` does
    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)"
    subprocess.run([sys.executable, "-c", code, args[0]], check=True)
    path.write_text("{}")
    return {"metric": "f1", "best": 0.8, "train_seconds": 1}
'''


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the running cells are found through /proc")
def test_a_stopped_grid_stops_its_running_cells_and_writes_no_cell(tmp_path):
    """SIGTERM (what `kill` sends) to the grid: its cells' processes end too, rather than running on into the
    folders that a restarted grid hands out again."""
    import signal
    import subprocess

    (tmp_path / "pinned" / "benchmarks").mkdir(parents=True)
    (tmp_path / "pinned" / "benchmarks" / "mini_glue_v2.py").write_text(FAKE_DRIVER)
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "grid_workers.py"
    grid = subprocess.Popen([sys.executable, str(script), "--pinned", str(tmp_path / "pinned"), "--workers", "2",
                             "--glue-dir", str(tmp_path), "--results", str(results), "--work", str(work)],
                            stderr=subprocess.PIPE, text=True)
    deadline, cells = time.time() + 60, []
    try:
        while len(cells) < 2 and time.time() < deadline:  # until both workers' cells are running
            time.sleep(0.1)
            cells = [int(text) for p in work.iterdir() if (text := p.read_text())]
        assert len(cells) == 2
        grid.send_signal(signal.SIGTERM)
        _, err = grid.communicate(timeout=60)
        assert grid.returncode == 130 and "stopped; the grid resumes from the cells on disk" in err
        assert "Traceback" not in err  # the cells it stopped are not reported as failures
        for pid in cells:  # gone (or only a zombie waiting for init to read its status)
            assert not Path(f"/proc/{pid}").exists() or grid_workers.is_zombie(pid)
    finally:  # a failed check leaves no process behind
        grid_workers.send(signal.SIGKILL, (*grid_workers.descendants(grid.pid), *cells, grid.pid))
    assert not list(results.rglob("*.json"))
