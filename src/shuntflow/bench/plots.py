"""PNG plots of a run: latency CDFs, percentile bars, the threshold sweep, CPU per request."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from shuntflow.bench.metrics import ModeSummary, Row, summarise

COLORS = {
    "host": "#2ca02c",
    "overlay": "#7f7f7f",
    "lib-overlay": "#bcbd22",
    "slim": "#d62728",
    "shuntflow": "#1f77b4",
}


def _pyplot() -> Any:
    import matplotlib

    # No display on a test host, and nothing here is interactive.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(mode: str) -> Any:
    if mode in COLORS:
        return COLORS[mode]
    base, _sep, t = mode.partition("@")
    if base == "shuntflow" and t.isdigit():
        import matplotlib

        # Sweep modes in shades of shuntflow's blue, darker for higher thresholds.
        shade = min(1.0, 0.3 + math.log2(int(t) + 1) / 10)
        return matplotlib.colormaps["Blues"](shade)
    return None


def _plain_ticks(axis: Any, lo: float, hi: float) -> None:
    """Plain numbers on a log axis: 20, 50, 100 read better than 2e1 in a narrow range."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(max(hi, 1e-9) / max(lo, 1e-9))
    subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, max(1, n))
    return math.ceil(n / cols), cols


def _axes(plt: Any, n: int, w: float = 5.0, h: float = 3.6) -> tuple[Any, list[Any]]:
    rows, cols = _grid(n)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def _save(fig: Any, plt: Any, path: Path) -> Path:
    # Leave room for the suptitle above the first row of subplot titles.
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdf(s: dict[str, list[ModeSummary]], path: Path) -> Path | None:
    items = [(lbl, ms) for lbl, ms in s.items() if any(m.cdf for m in ms)]
    if not items:
        return None
    plt = _pyplot()
    fig, axes = _axes(plt, len(items))
    for ax, (lbl, ms) in zip(axes, items, strict=True):
        for m in ms:
            if not m.cdf:
                continue
            xs = [v for v, _f in m.cdf]
            ys = [f for _v, f in m.cdf]
            ax.step(xs, ys, where="post", label=m.mode, color=_color(m.mode), linewidth=1.3)
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis, *ax.get_xlim())
        ax.set_title(lbl)
        ax.set_xlabel("latency µs (log)")
        ax.set_ylabel("fraction of requests ≤ x")
        ax.set_ylim(0, 1.005)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency CDF (the median repetition of each mode)")
    return _save(fig, plt, path)


def percentiles(s: dict[str, list[ModeSummary]], path: Path) -> Path | None:
    items = [(lbl, ms) for lbl, ms in s.items() if any(m.values["p50_us"] is not None for m in ms)]
    if not items:
        return None
    plt = _pyplot()
    fig, axes = _axes(plt, len(items))
    keys = (("avg_us", "avg"), ("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9"))
    for ax, (lbl, ms) in zip(axes, items, strict=True):
        width = 0.8 / max(1, len(ms))
        for i, m in enumerate(ms):
            vals = [_median(m, k) for k, _n in keys]
            xs = [j + i * width for j in range(len(keys))]
            ax.bar(xs, vals, width, label=m.mode, color=_color(m.mode))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([n for _k, n in keys])
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis, *ax.get_ylim())
        ax.set_ylabel("µs (log)")
        ax.set_title(lbl)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency by mode (medians over repetitions)")
    return _save(fig, plt, path)


def cpu_per_request(s: dict[str, list[ModeSummary]], path: Path) -> Path | None:
    items = [
        (lbl, ms)
        for lbl, ms in s.items()
        if any(m.values["cpu_us_per_req"] is not None for m in ms)
    ]
    if not items:
        return None
    plt = _pyplot()
    fig, axes = _axes(plt, len(items), 4.2, 3.2)
    for ax, (lbl, ms) in zip(axes, items, strict=True):
        names = [m.mode for m in ms]
        app = [_median(m, "cpu_us_per_req") for m in ms]
        router = [_median(m, "router_cpu_us_per_req") for m in ms]
        xs = list(range(len(ms)))
        ax.bar(xs, app, color=[_color(n) for n in names], label="server + client")
        ax.bar(xs, router, bottom=app, color="none", edgecolor="black", hatch="//",
               label="routers")  # fmt: skip
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        unit = ms[0].unit
        ax.set_ylabel(f"CPU µs per {unit}")
        top = max([a + r for a, r in zip(app, router, strict=True)] + [1e-9])
        # One broken mode (a 200 ms stall) must not flatten the others to nothing.
        finite = sorted(a + r for a, r in zip(app, router, strict=True))
        if len(finite) > 2 and top > 8 * finite[-2]:
            ax.set_yscale("log")
        ax.set_title(lbl)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("On-CPU time per request: server + client processes, and the two routers")
    return _save(fig, plt, path)


def _name(metric: str) -> str:
    return {"p50_us": "p50", "p99_us": "p99", "avg_us": "avg", "rps": "rate"}.get(metric, metric)


def _ratio_median(m: ModeSummary, ref: str, key: str) -> float:
    st = m.ratios[ref][key]
    return st.median if st else float("nan")


def _median(m: ModeSummary, key: str) -> float:
    st = m.values.get(key)
    return st.median if st else 0.0


def threshold_sweep(rows: list[Row], s: dict[str, list[ModeSummary]], path: Path) -> Path | None:
    swept = {r.threshold for r in rows if r.threshold is not None and r.ok}
    if len(swept) < 2:
        return None
    items = [(lbl, ms) for lbl, ms in s.items() if sum(m.threshold is not None for m in ms) >= 2]
    if not items:
        return None
    plt = _pyplot()
    fig, axes = _axes(plt, len(items))
    for ax, (lbl, ms) in zip(axes, items, strict=True):
        sweep = sorted((m for m in ms if m.threshold is not None), key=lambda m: m.threshold or 0)
        xs = [m.threshold for m in sweep]
        metric = "p50_us" if any(m.values["p50_us"] for m in sweep) else "rps"
        keys = [(metric, "-o"), ("p99_us", "--s")] if metric == "p50_us" else [(metric, "-o")]
        for key, style in keys:
            ys = [_ratio_median(m, "overlay", key) for m in sweep]
            ax.plot(xs, ys, style, color=COLORS["shuntflow"], label=f"shuntflow {_name(key)}")
        for ref in ("slim", "host"):
            m = next((m for m in ms if m.mode == ref), None)
            st = m.ratios["overlay"][metric] if m else None
            if st:
                ax.axhline(
                    st.median, color=COLORS[ref], linestyle=":", label=f"{ref} {_name(metric)}"
                )
        ax.axhline(1.0, color=COLORS["overlay"], linewidth=0.8, label="overlay")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("threshold (data syscalls before the switch)")
        ax.set_ylabel(f"{_name(metric)} ÷ overlay (median)")
        ax.set_title(lbl)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Threshold sweep: shuntflow@T relative to overlay")
    return _save(fig, plt, path)


def write_all(out: Path, rows: list[Row]) -> list[Path]:
    s = summarise(rows)
    made = [
        latency_cdf(s, out / "latency_cdf.png"),
        percentiles(s, out / "latency_percentiles.png"),
        cpu_per_request(s, out / "cpu_per_request.png"),
        threshold_sweep(rows, s, out / "threshold_sweep.png"),
    ]
    return [p for p in made if p is not None]
