"""PNG plots next to the benchmark tables.

Figures are built on matplotlib's object API with the Agg canvas, so no pyplot global state
and no display are involved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

DPI = 110


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def overhead(
    concurrency: Sequence[int],
    added_p50_ms: Sequence[float],
    added_p99_ms: Sequence[float],
    path: Path,
) -> Path:
    """Grouped bars: time the stack adds to the first token, per concurrency level."""
    figure = Figure(figsize=(6, 3.6))
    axes = figure.add_subplot()
    positions = list(range(len(concurrency)))
    width = 0.38
    axes.bar([p - width / 2 for p in positions], added_p50_ms, width, label="added p50")
    axes.bar([p + width / 2 for p in positions], added_p99_ms, width, label="added p99")
    axes.set_xticks(positions, [str(c) for c in concurrency])
    axes.set_xlabel("concurrent streams")
    axes.set_ylabel("stack minus direct, ms")
    axes.set_title("Time added to the first token by the stack")
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def throughput(
    offered_rps: Sequence[float],
    p99_ttft_ms: Sequence[float],
    passed: Sequence[bool],
    limit_ms: float,
    path: Path,
) -> Path:
    """Each probe of the search: p99 time to first token against the offered rate."""
    figure = Figure(figsize=(6, 3.6))
    axes = figure.add_subplot()
    for ok, colour, label in ((True, "tab:green", "sustained"), (False, "tab:red", "not")):
        xs = [r for r, p in zip(offered_rps, passed, strict=True) if p is ok]
        ys = [t for t, p in zip(p99_ttft_ms, passed, strict=True) if p is ok]
        axes.scatter(xs, ys, color=colour, label=label, zorder=3)
    axes.axhline(limit_ms, color="grey", linestyle="--", label=f"p99 limit {limit_ms:.0f} ms")
    axes.set_yscale("log")
    axes.set_xlabel("offered streamed requests per second")
    axes.set_ylabel("p99 time to first token, ms")
    axes.set_title("Throughput search")
    axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, path)


def race_cdfs(
    measured: Mapping[str, Mapping[int, Sequence[float]]],
    analytical: Mapping[str, Mapping[int, tuple[Sequence[float], Sequence[float]]]],
    deadline_ms: float,
    path: Path,
) -> Path:
    """One panel per distribution: the measured first-token CDF for each k as steps, the
    analytical CDF of the minimum of k draws as a dashed line."""
    names = list(measured)
    figure = Figure(figsize=(4.2 * len(names), 3.8))
    colours = {1: "tab:blue", 2: "tab:orange", 3: "tab:green"}
    for index, name in enumerate(names):
        axes = figure.add_subplot(1, len(names), index + 1)
        for k, samples in sorted(measured[name].items()):
            ordered = sorted(samples)
            n = len(ordered)
            if n == 0:
                continue
            ys = [(i + 1) / n for i in range(n)]
            axes.step(ordered, ys, where="post", color=colours.get(k), label=f"k={k} measured")
            if k in analytical.get(name, {}):
                xs, cdf = analytical[name][k]
                axes.plot(xs, cdf, color=colours.get(k), linestyle="--", linewidth=1)
        axes.axvline(deadline_ms, color="grey", linestyle=":", label="δ")
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("first token, ms (unscaled)")
        axes.set_title(name)
        axes.grid(alpha=0.3)
        if index == 0:
            axes.set_ylabel("share of races (dashed: analytical)")
            axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def split(
    modes: Sequence[str], p50_ms: Sequence[float], p95_ms: Sequence[float], path: Path
) -> Path:
    figure = Figure(figsize=(7, 3.6))
    axes = figure.add_subplot()
    positions = list(range(len(modes)))
    width = 0.38
    axes.barh([p - width / 2 for p in positions], p50_ms, width, label="p50")
    axes.barh([p + width / 2 for p in positions], p95_ms, width, label="p95")
    axes.set_yticks(positions, list(modes))
    axes.invert_yaxis()
    axes.set_xlabel("time to last token, ms")
    axes.set_title("Split vs. direct")
    axes.legend()
    axes.grid(axis="x", alpha=0.3)
    return _save(figure, path)


def scheduling(
    thresholds_s: Sequence[float],
    attainment: Mapping[str, Sequence[float]],
    mean_latency_s: Mapping[str, float],
    slo_s: float,
    path: Path,
) -> Path:
    """Left: SLO attainment against the SLO threshold per strategy. Right: mean latency."""
    figure = Figure(figsize=(10, 3.8))
    curves = figure.add_subplot(1, 2, 1)
    for strategy, shares in attainment.items():
        curves.plot(thresholds_s, [100 * s for s in shares], label=strategy)
    curves.axvline(slo_s, color="grey", linestyle=":", label=f"headline SLO {slo_s:.0f} s")
    curves.set_xlabel("SLO threshold on request latency, s (unscaled)")
    curves.set_ylabel("requests within SLO, %")
    curves.set_title("SLO attainment")
    curves.grid(alpha=0.3)
    curves.legend(fontsize="small")
    bars = figure.add_subplot(1, 2, 2)
    names = list(mean_latency_s)
    bars.barh(names, [mean_latency_s[n] for n in names], color="tab:purple")
    bars.invert_yaxis()
    bars.set_xlabel("mean request latency, s (unscaled)")
    bars.set_title("Mean latency")
    bars.grid(axis="x", alpha=0.3)
    return _save(figure, path)
