"""Run a pinned Mini-GLUE grid (v2, or v3 with `--driver mini_glue_v3`) N cells at a time (one thread each).

The cells, their commands and their order are the pinned checkout's own: this imports that checkout's
`benchmarks/<driver>.py` unchanged and calls its `jobs()` and `run_cell()`, so every cell's JSON
(with the pinned commit) is what the driver itself would write. Only the scheduling differs:
workers take the first cell that is neither on disk nor taken by another worker, and an extra seed
(3, 4) starts only once seeds 0-2 of adalora and bayes-adalora are all on disk, as the sequential
script would see them. Stopped (Ctrl-C or SIGTERM), it stops the running cells' `train` processes too, so
none goes on writing into a cell folder that a restarted grid hands out again; it resumes from the cells on
disk like the script. With
`--extra-seeds-first`, a decided extra seed is taken before the ablation's cells (the core cells stay
first): the same cells and commands, in an order that settles the main comparison sooner. `--first
NAMES` likewise takes the named cells before the others of their stage (the lambda cells, say, when the
default they decide is the next thing to settle).

    python benchmarks/grid_workers.py --pinned /work/grid --workers 2 --glue-dir ../shared/data/glue \
        --results /work/main/benchmarks/results/mini-glue-v2 --work /work/grid-runs
    python benchmarks/grid_workers.py --driver mini_glue_v3 --pinned /work/grid-v3 --workers 1 \
        --glue-dir /work/shared/data/glue --results /work/main/benchmarks/results/mini-glue-v3 --work /work/grid-v3-runs

A driver gives: SEEDS, EXTRA_SEEDS, CORE (cells with a `name`), cell_path(results, task, cell, seed),
chosen_lrs(results), jobs(results, work, glue_dir, lrs, extra) and run_cell(args, record, path, threads).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path

IDLE_SECONDS = 30  # how often a worker with nothing to start looks again (a tuning cell may be running)


DRIVERS = ("mini_glue_v2", "mini_glue_v3")


def load_pinned(checkout: Path, driver: str = "mini_glue_v2"):
    """The pinned checkout's driver module (what it imports, `baselines` or `mini_glue_v2`, from beside it)."""
    sys.path.insert(0, str(checkout / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"pinned_{driver}", checkout / "benchmarks" / f"{driver}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Scheduler:
    """Hands out the pinned grid's cells to workers, each cell once."""

    def __init__(self, grid, results: Path, work: Path, glue_dir: Path, extra: list[str] | None = None,
                 extra_seeds_first: bool = False, deadline: float = math.inf, first: tuple[str, ...] = ()):
        self.grid, self.results, self.work, self.glue_dir = grid, results, work, glue_dir
        self.extra_seeds_first = extra_seeds_first
        self.first = first  # cell names taken before the other cells of their stage
        self.deadline = deadline  # time.time() after which no new cell starts (the running ones finish)
        self.extra = extra or []  # more `train` flags for every cell, as mini_glue_v2's --extra-args
        self.taken: set[Path] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()  # set when a worker fails: the others start no new cell
        self.interrupted = False  # set when the grid was stopped: a cell failing then is one it stopped

    def decided(self, record: dict) -> bool:
        """Whether a cell may start now: an extra seed only once the first seeds it depends on are on disk."""
        g = self.grid
        if record.get("seed") not in g.EXTRA_SEEDS:
            return True
        return all(g.cell_path(self.results, record["task"], c, s).exists()
                   for c in ("adalora", "bayes-adalora") for s in g.SEEDS)

    def take(self):
        """(path, args, record) of the next cell, "wait" while only taken cells remain, or None when done."""
        g = self.grid
        with self.lock:
            if time.time() > self.deadline:
                return None
            lrs = g.chosen_lrs(self.results)
            ready = [(path, args, record)
                     for path, args, record in g.jobs(self.results, self.work, self.glue_dir, lrs, self.extra)
                     if not path.exists() and path not in self.taken and self.decided(record)]
            if self.extra_seeds_first or self.first:
                ready.sort(key=self.rank)  # stable: the plan's order within each rank
            if ready:
                self.taken.add(ready[0][0])
                return ready[0]
            return "wait" if self.taken else None

    def stage(self, job) -> int:
        """0: the sweep and the core cells' first seeds; 1: an extra seed; 2: an ablation cell."""
        record = job[2]
        if record.get("seed") in self.grid.EXTRA_SEEDS:
            return 1
        core = {cell.name for cell in self.grid.CORE}
        return 2 if record.get("cell", next(iter(core), None)) not in core else 0

    def rank(self, job) -> tuple[int, bool]:
        """The stage (the plan's, but for --extra-seeds-first: the extra seeds before the ablation), then
        whether the cell is one of --first's, which go first within their stage."""
        stage = self.stage(job)
        if not self.extra_seeds_first and stage == 1:
            stage = 2  # the extra seeds keep their place after the ablation's cells
        return stage, job[2].get("cell") not in self.first

    def done(self, path: Path) -> None:
        with self.lock:
            self.taken.discard(path)


def worker(scheduler: Scheduler, index: int, threads: int, failures: list) -> None:
    """Run cells until none is left, or until a worker fails (a failed cell is a bug to look at, as in
    mini_glue_v2: the grid stops, and the cells already written stay)."""
    while not scheduler.stop.is_set():
        try:
            job = scheduler.take()
            if job is None:
                return
            if job == "wait":
                scheduler.stop.wait(IDLE_SECONDS)
                continue
            path, args, record = job
            cell = scheduler.grid.run_cell(args, record, path, threads)
            outcome = cell.get("diverged") or (f"best {cell['metric']} {cell['best']:.4f} "
                                               f"({cell['train_seconds']:.0f} s)")
            print(f"{datetime.now():%H:%M} w{index} {path.relative_to(scheduler.results)}: {outcome}", flush=True)
            scheduler.done(path)
        except BaseException as exc:  # a bad --glue-dir, a broken cell file, a failed run, Ctrl-C
            scheduler.stop.set()
            if not isinstance(exc, KeyboardInterrupt) and not scheduler.interrupted:
                traceback.print_exc()
            failures.append(exc)
            return


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children first), read from Linux's /proc; empty where there is none."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = stat_fields(stat)
        if fields:  # else it ended while being read
            parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


def stop_cells(grace_seconds: float = 30.0) -> None:
    """SIGTERM to every process this grid started (the cells' `train` runs), SIGKILL to any still there after
    `grace_seconds`: a cell left running would go on writing into the folder a restarted grid reuses."""
    pids = descendants(os.getpid())
    send(signal.SIGTERM, pids)
    deadline = time.time() + grace_seconds
    while pids and time.time() < deadline:
        time.sleep(0.1)
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not is_zombie(pid)]
    send(signal.SIGKILL, pids)


def send(signum: int, pids) -> None:
    """`signum` to each of `pids` that is still there."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def is_zombie(pid: int) -> bool:
    """Whether `pid` has ended and waits only for its parent to read its status."""
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    return not fields or fields[0] == "Z"


def stat_fields(stat: Path) -> list[str]:
    """A /proc/<pid>/stat's fields after the command name (state, parent, ...); empty once the process is gone.
    The name, in parentheses, may hold spaces, so the fields start after its last ')'."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def interrupt(signum, frame):
    """SIGTERM handled as Ctrl-C, so that `main` stops the running cells before it exits."""
    raise KeyboardInterrupt


def run_workers(scheduler: Scheduler, workers: int, threads: int) -> list:
    """`workers` workers until the grid is done or one fails; what failed (empty when all went well)."""
    failures: list = []
    pool = [threading.Thread(target=worker, args=(scheduler, i, threads, failures)) for i in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pinned", type=Path, required=True, help="the pinned checkout (a git worktree)")
    parser.add_argument("--driver", choices=DRIVERS, default="mini_glue_v2",
                        help="the grid: benchmarks/<driver>.py of the pinned checkout")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per cell")
    parser.add_argument("--glue-dir", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--extra-args", default="", help="as mini_glue_v2.py's: more `train` flags for every cell")
    parser.add_argument("--extra-seeds-first", action="store_true",
                        help="take decided extra seeds (3, 4) before the ablation's cells")
    parser.add_argument("--first", default="", help="cells (names, comma-separated, e.g. adalora-lambda-paper) "
                        "taken before the other cells of their stage; the core cells stay first")
    parser.add_argument("--plan", help="as mini_glue_v2.py's: cpu (the default) or gpu")
    parser.add_argument("--minutes", type=float, help="start no new cell after this many minutes")
    args = parser.parse_args(argv)
    if not (args.pinned / "benchmarks" / f"{args.driver}.py").is_file():
        parser.error(f"the pinned checkout {args.pinned} has no benchmarks/{args.driver}.py")
    grid = load_pinned(args.pinned.resolve(), args.driver)
    if args.plan:
        if args.plan not in getattr(grid, "PLANS", ()):
            parser.error(f"--plan must be one of the pinned script's plans "
                         f"({', '.join(getattr(grid, 'PLANS', ())) or 'it has none'}), "
                         f"got {args.plan!r}")
        grid.use_plan(args.plan)
    deadline = time.time() + 60 * args.minutes if args.minutes is not None else math.inf
    # the glue folder resolved as mini_glue_v2.main resolves it: the cells' commands are the script's own
    scheduler = Scheduler(grid, args.results, args.work, args.glue_dir.resolve(), shlex.split(args.extra_args),
                          args.extra_seeds_first, deadline, tuple(n for n in args.first.split(",") if n))
    signal.signal(signal.SIGTERM, interrupt)
    try:
        failures = run_workers(scheduler, args.workers, args.threads)
    except KeyboardInterrupt:
        scheduler.interrupted = True
        scheduler.stop.set()  # no new cell starts; the running ones are stopped, and a restart reruns them
        stop_cells()
        print("stopped; the grid resumes from the cells on disk", file=sys.stderr, flush=True)
        return 130
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
