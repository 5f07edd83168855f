"""PNG figures of a run folder, drawn from its files only (results.json, history.json,
posterior.safetensors, correlations.json) with matplotlib's Agg canvas (no display, no pyplot state).

- ranks.png: the final rank of every adapted matrix, layers x modules, numbers in the cells;
- training.png: the total rank budget, the training loss and the main dev metric over steps;
- sigma.png (IVON runs): posterior sigma per module type, for P, lambda and Q (log scale);
- correlations.png (when logged): Spearman correlations of triplet scores over allocation steps.

Each `plot_*` returns a matplotlib Figure, or None where the run lacks what it shows.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .adapters import FACTORS, parameter_module
from .errors import UserError
from .paths import exists_at_all
from .run_folder import SavedRun, check_output_folder, folder_kind, read_run

_LAYER = re.compile(r"^(?P<stack>.*?)\.?(?:layer|layers|h|block|blocks)\.(?P<index>\d+)\.(?P<module>.+)$")
_FACTOR_COLORS = {"P": "#4C72B0", "λ": "#DD8452", "Q": "#55A868", "head": "#8C8C8C"}
_CRITERION_COLORS = {"snr_abs": "#4C72B0", "snr": "#DD8452", "mean_abs": "#55A868", "inv_sigma": "#C44E52",
                     "e_abs": "#8172B3"}


def split_layer_module(name: str) -> tuple[int | None, str]:
    """(layer index, module within the layer) of a module name, e.g. `bert.encoder.layer.3.attention.self.query`
    -> (3, "attention.self.query"); outside the layers (None, the name without the model's own prefix),
    e.g. `bert.pooler.dense` -> (None, "pooler.dense")."""
    match = _LAYER.match(name)
    if match:
        return int(match["index"]), match["module"]
    parts = name.split(".")
    return None, ".".join(parts[1:]) if len(parts) > 2 else name


def wrapped(name: str, width: int = 14) -> str:
    """A dotted module name broken into lines of about `width` characters at its dots, so that tick
    labels can stay horizontal: "attention.output.dense" -> "attention.\noutput.dense"."""
    lines = [""]
    for part in name.split("."):
        piece = part if not lines[-1] else "." + part
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines[-1] += "."
            lines.append(part)
        else:
            lines[-1] += piece
    return "\n".join(lines)


def _figure(width: float, height: float):
    return Figure(figsize=(width, height), layout="constrained", dpi=110)


# ----------------------------------------------------------------------------- ranks


def rank_grid(final_ranks: dict[str, int]) -> tuple[np.ndarray, list[str], list[str], dict[str, int]]:
    """(ranks layers x modules with NaN where a layer has no such matrix, layer labels, module labels,
    {name: rank} of the matrices outside the layers)."""
    inside, outside, layers, modules = {}, {}, [], []
    for name, rank in final_ranks.items():
        layer, module = split_layer_module(name)
        if layer is None:
            outside[module] = rank
            continue
        inside[layer, module] = rank
        layers += [layer] if layer not in layers else []
        modules += [module] if module not in modules else []
    layers.sort()
    grid = np.full((len(layers), len(modules)), np.nan)
    for (layer, module), rank in inside.items():
        grid[layers.index(layer), modules.index(module)] = rank
    return grid, [f"layer {i}" for i in layers], modules, outside


def _annotated_cells(ax, values: np.ndarray, vmax: float, cmap) -> object:
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=9,
                    color="white" if v < 0.55 * vmax else "black")
    return image


def plot_ranks(run: SavedRun):
    ranks = run.results.get("final_ranks") or {}
    if not ranks:
        return None
    grid, layer_labels, module_labels, outside = rank_grid(ranks)
    vmax = max([*ranks.values(), run.resolved.get("init_r") or 0, run.resolved.get("lora_r") or 0, 1])
    cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")
    rows = len(layer_labels) + (1.6 if outside else 0)
    fig = _figure(max(6.0, 1.05 * max(len(module_labels), len(outside)) + 2.5), 1.6 + 0.42 * rows + 0.9)
    heights = [max(len(layer_labels), 1)] + ([1.0] if outside else [])
    axes = fig.subplots(len(heights), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)[:, 0]
    if layer_labels:
        image = _annotated_cells(axes[0], grid, vmax, cmap)
        axes[0].set_xticks(range(len(module_labels)), [wrapped(m) for m in module_labels])
        axes[0].set_yticks(range(len(layer_labels)), layer_labels)
        axes[0].set_xlabel("adapted module")
        axes[0].tick_params(length=0)
    if outside:
        ax = axes[-1]
        image = _annotated_cells(ax, np.array([list(outside.values())], dtype=float), vmax, cmap)
        ax.set_xticks(range(len(outside)), [wrapped(m) for m in outside])
        ax.set_yticks([0], ["outside layers"])
        ax.set_xlabel("adapted module outside the layers")
        ax.tick_params(length=0)
    fig.colorbar(image, ax=list(axes), label="final rank", shrink=0.9)
    fig.suptitle(f"Final rank per adapted matrix: {run.method} on {run.spec.name} "
                 f"(total {run.results.get('total_rank', sum(ranks.values()))})")
    return fig


# ----------------------------------------------------------------------------- training curves


def moving_average(values, window: int) -> np.ndarray:
    """Mean of the last `window` values at each step (fewer at the start)."""
    values = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_training(run: SavedRun):
    history = run.json("history.json")
    if not history or not history.get("loss"):
        return None
    steps = np.arange(1, len(history["loss"]) + 1)
    budget = history.get("budget") or []
    has_budget = any(b is not None for b in budget)
    metric = run.results.get("main_metric") or run.spec.main_metric_name
    panels = 3 if has_budget else 2
    fig = _figure(8.0, 2.3 * panels + 0.6)
    axes = fig.subplots(panels, 1, sharex=True)
    ax = iter(axes)
    if has_budget:
        a = next(ax)
        a.plot(steps, [np.nan if b is None else b for b in budget], color="#4C72B0")
        a.set_ylabel("total rank budget")
        a.set_title("AdaLoRA rank budget")
    a = next(ax)
    loss = np.array([np.nan if v is None else v for v in history["loss"]], dtype=float)
    window = max(1, len(loss) // 25)
    if window > 1:
        a.plot(steps, loss, color="#BBBBBB", linewidth=0.8, label="per step")
        a.plot(steps, moving_average(np.nan_to_num(loss, nan=np.nanmean(loss)), window), color="#C44E52",
               label=f"mean of the last {window} steps")
        a.legend(loc="upper right", fontsize=8)
    else:
        a.plot(steps, loss, color="#C44E52")
    a.set_ylabel("training loss")
    a.set_title("Training loss")
    a = next(ax)
    evals = [e for e in history.get("eval", []) if e.get(metric) is not None]
    if evals:
        a.plot([e["step"] for e in evals], [e[metric] for e in evals], marker="o", color="#55A868")
    a.set_ylabel(f"dev {metric}")
    a.set_title(f"Dev {metric}")
    a.set_xlabel("step")
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(f"{run.method} on {run.spec.name}")
    return fig


# ----------------------------------------------------------------------------- posterior sigma


def sigma_groups(sigma: dict) -> dict[str, dict[str, np.ndarray]]:
    """Posterior sigmas by module type, then by factor (P, λ, Q of the adapters; "head" for modules
    trained in full), all layers pooled. Keys are parameter names as in posterior.safetensors."""
    groups: dict[str, dict[str, list]] = {}
    for name, values in sigma.items():
        module, label = parameter_module(name)
        layer, kind = split_layer_module(module)
        kind = kind if layer is not None else module.split(".", 1)[-1] if module.count(".") > 1 else module
        groups.setdefault(kind, {}).setdefault(label, []).append(np.asarray(values, dtype=float).reshape(-1))
    return {k: {f: np.concatenate(v) for f, v in fs.items()} for k, fs in groups.items()}


def plot_sigma(run: SavedRun):
    sigma = run.posterior("sigma")
    if not sigma:
        return None
    groups = sigma_groups(sigma)
    in_layers = [split_layer_module(n)[1] for n in run.results.get("final_ranks") or {}]
    order = list(dict.fromkeys(k for k in in_layers if k in groups))  # the model's order, then the rest
    kinds = order + sorted(k for k in groups if k not in order)
    fig = _figure(max(7.0, 1.25 * len(kinds) + 2.0), 4.8)
    ax = fig.subplots()
    positions, data, colors = [], [], []
    for i, kind in enumerate(kinds):
        factors = [f for f in ("P", "λ", "Q", "head") if f in groups[kind]]
        for j, factor in enumerate(factors):
            positions.append(i + (j - (len(factors) - 1) / 2) * 0.26)
            data.append(groups[kind][factor])
            colors.append(_FACTOR_COLORS[factor])
    boxes = ax.boxplot(data, positions=positions, widths=0.22, whis=(1, 99), showfliers=False, patch_artist=True,
                       medianprops={"color": "black"})
    for patch, color in zip(boxes["boxes"], colors):
        patch.set_facecolor(color)
    ax.set_yscale("log")
    low, high = min(np.percentile(d, 1) for d in data), max(np.percentile(d, 99) for d in data)
    if high < 10 * low:  # under a decade: show a whole decade around it, so the ticks stay plain powers
        middle = np.sqrt(low * high)
        ax.set_ylim(middle / 10**0.6, middle * 10**0.6)
        ax.text(0.01, 0.03, f"1st-99th percentiles of all groups within {low:.4g} .. {high:.4g}",
                transform=ax.transAxes, fontsize=8, color="#444444")
    ax.set_xticks(range(len(kinds)), [wrapped(k) for k in kinds])
    ax.set_ylabel("posterior sigma (log scale)")
    ax.set_xlabel("module type (all layers)")
    ax.grid(axis="y", alpha=0.3, which="both")
    present = [f for f in ("P", "λ", "Q", "head") if any(f in g for g in groups.values())]
    labels = {**{role: f"{role} ({name})" for name, role in FACTORS.items()}, "head": "trained in full"}
    ax.legend(
        [Patch(color=_FACTOR_COLORS[f]) for f in present],
        [labels[f] for f in present],
        fontsize=8,
        loc="best",
    )
    ax.set_title(f"IVON posterior sigma per module: {run.method} on {run.spec.name} "
                 f"(boxes: quartiles, whiskers: 1st-99th percentile)", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- correlations


def plot_correlations(run: SavedRun):
    log = run.json("correlations.json")
    if not log or not log.get("steps"):
        return None
    steps = [e["step"] for e in log["steps"]]

    def series(block: str, key: str) -> list[float]:
        return [np.nan if e[block].get(key) is None else e[block][key] for e in log["steps"]]

    fig = _figure(12.0, 5.2)
    left, right = fig.subplots(1, 2, sharey=True)
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1))]  # snr and mean_abs may coincide: keep both visible
    for name, style in zip(log["steps"][0]["sensitivity"], styles):
        left.plot(steps, series("sensitivity", name), marker="o", markersize=3, label=name, linestyle=style,
                  color=_CRITERION_COLORS.get(name))
    left.set_title("sensitivity vs each posterior criterion")
    left.set_ylabel("Spearman correlation of triplet scores")
    right.plot(steps, series("snr", "mean_abs"), marker="o", markersize=3, color=_CRITERION_COLORS["mean_abs"],
               label="snr vs mean_abs (magnitude |mu|)")
    right.plot(steps, series("snr", "inv_sigma"), marker="o", markersize=3, color=_CRITERION_COLORS["inv_sigma"],
               label="snr vs inv_sigma (precision 1/sigma)")
    right.set_title("what snr = |mu| / sigma follows")
    for ax in (left, right):
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("allocation step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.suptitle(f"Triplet-score rank correlations at allocation steps: {run.method} on {run.spec.name}\n"
                 f"sensitivity = {log.get('sensitivity', '?')}", fontsize=10)
    return fig


PLOTS = {"ranks.png": plot_ranks, "training.png": plot_training, "sigma.png": plot_sigma,
         "correlations.png": plot_correlations}


PLOT_SOURCES = {"ranks.png": "results.json", "training.png": "history.json", "sigma.png": "posterior.safetensors",
                "correlations.png": "correlations.json"}  # the file each figure is drawn from
FIGURE_SOFTWARE = "bayes-adalora"  # in each PNG's Software text chunk: a later plot may replace the figure


def is_our_figure(path: Path) -> bool:
    """Whether the PNG at `path` was drawn by `plot_run` (its text chunks come before the image data)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"tEXtSoftware\x00" + FIGURE_SOFTWARE.encode() in head


def plot_run(folder: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Write the run's figures (those its files allow) into `output_dir` (default: the run folder)."""
    run = read_run(folder)
    out = Path(output_dir) if output_dir else run.folder
    if output_dir:
        check_output_folder(out)
        if folder_kind(out) == "run" and out.resolve() != run.folder.resolve():
            raise UserError(f"--output-dir {out} holds another run, whose figures these would replace: "
                            f"choose another folder")
        taken = [name for name in PLOTS if exists_at_all(out / name) and not is_our_figure(out / name)]
        if taken:
            raise UserError(f"--output-dir {out} already holds {taken[0]}, which bayes-adalora did not write: "
                            f"remove it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in PLOTS.items():
        try:
            figure = plot(run)
        except UserError:  # already one sentence naming its file (a UserError is a ValueError too)
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:  # a file of the wrong shape
            raise UserError(f"{run.folder / PLOT_SOURCES[name]} does not hold what a run writes there "
                            f"({type(err).__name__}: {err}): the run is damaged; train it again") from None
        if figure is not None:
            figure.savefig(out / name, metadata={"Software": FIGURE_SOFTWARE})
            written.append(out / name)
    return written
