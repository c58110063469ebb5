"""Show evaluation results: a terminal table, the full JSON, and a PNG bar chart."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table_columns(metrics: dict[str, dict]) -> list[str]:
    """avg@n, std@n, pass@n, worst@n, maj@n for the n the first benchmark has."""
    first = next(iter(metrics.values()))
    n = first["n"]
    cols = [f"avg@{n}", f"std@{n}"]
    if n > 1:
        cols += [f"pass@{n}", f"worst@{n}", f"worst@{n}/bootstrap"]
    cols += [f"maj@{n}", "no_box"]
    return [c for c in cols if all(c in m for m in metrics.values())]


def format_table(metrics: dict[str, dict], average: dict | None = None) -> str:
    """Fixed-width table, one row per benchmark plus the unweighted average, in percent."""
    cols = table_columns(metrics)
    rows = [(name, m) for name, m in metrics.items()]
    if average and len(metrics) > 1:
        rows.append(("average", average))
    width = max(len("benchmark"), *(len(r[0]) for r in rows))
    head = f"{'benchmark':<{width}}  {'problems':>8}  " + "  ".join(f"{c:>10}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, m in rows:
        cells = "  ".join(f"{_pct(m.get(c)):>10}" for c in cols)
        lines.append(f"{name:<{width}}  {m.get('problems', ''):>8}  {cells}")
    return "\n".join(lines)


def write_json(path: str | Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    tmp.replace(path)
    return path


def plot_bars(
    path: str | Path, metrics: dict[str, dict], average: dict | None = None, title: str = ""
) -> Path:
    """Grouped bars per benchmark (avg@n, pass@n, worst@n, maj@n). Uses the Agg canvas
    directly, so it neither needs a display nor switches the process-wide pyplot backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = next(iter(metrics.values()))["n"]
    series = [
        c
        for c in (f"avg@{n}", f"pass@{n}", f"worst@{n}", f"maj@{n}")
        if all(c in m for m in metrics.values())
    ]
    series = list(dict.fromkeys(series))  # n == 1: avg, pass and worst are the same name
    rows = dict(metrics)
    if average and len(metrics) > 1:
        rows["average"] = average
    names = list(rows)
    fig = Figure(figsize=(max(6.0, 1.2 * len(names) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for j, s in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        vals = [100 * rows[b].get(s, 0.0) for b in names]
        bars = ax.bar(xs, vals, width, label=s)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title or f"accuracy over n={n} samples per problem")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
