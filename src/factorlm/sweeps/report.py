"""The sweep's results: ``sweep.json``, ``sweep.md``, ``sweep.png`` and ``best.yaml``.

``best.yaml`` is the selected trial's complete run config (every default spelled out, absolute
input paths) with a fresh ``output_dir`` beside it, so ``factorlm run best.yaml`` rebuilds the
chosen engine without the sweep.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from factorlm._common.files import write_bytes_atomic, write_text_atomic
from factorlm.sweeps.grid import Trial
from factorlm.sweeps.select import Selection, TrialResult

__all__ = ["BEST_FILE", "JSON_FILE", "MD_FILE", "PLOT_FILE", "SCHEMA_VERSION", "write_results"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
JSON_FILE = "sweep.json"
MD_FILE = "sweep.md"
PLOT_FILE = "sweep.png"
BEST_FILE = "best.yaml"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _markdown(
    header: dict[str, Any], axes: Sequence[str], results: Sequence[TrialResult], sel: Selection
) -> str:
    metric = next((r.metric for r in results if r.metric), None) or "quality"
    front = {r.id for r in sel.front}
    lines = [
        "# factorlm sweep",
        "",
        f"- sweep: `{header['source']}`",
        f"- trials: {header['counts']['total']} ({header['counts']['done']} done, "
        f"{header['counts']['failed']} failed, {header['counts']['resumed']} from an earlier "
        f"run); this run: {header['wall_seconds']:.1f} s on {header['nodes']} Ray node(s)",
        f"- rule: {sel.reason}",
        "",
    ]
    cols = ["trial", *axes, metric, "drop", "speedup", "pareto", "status"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in results:
        status = "failed: " + (r.error or "").replace("|", "\\|") if not r.ok else "done"
        if sel.best is not None and r.id == sel.best.id:
            status = "**best**"
        drop = f"{r.drop:.2f} {r.drop_unit or ''}".strip() if r.drop is not None else "-"
        row = [
            f"`{r.id}`",
            *(_fmt(r.params.get(a)) for a in axes),
            _fmt(r.quality, 4),
            drop,
            f"{r.speedup:.2f}x" if r.speedup is not None else "-",
            "yes" if r.id in front else "",
            status,
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if sel.best is not None:
        lines += [f"Best configuration: `{BEST_FILE}` (`factorlm run {BEST_FILE}`).", ""]
    return "\n".join(lines)


def _xy(results: Sequence[TrialResult]) -> tuple[list[float], list[float]]:
    pairs = [(r.speedup, r.quality) for r in results]
    return [s for s, q in pairs if s is not None and q is not None], [
        q for s, q in pairs if s is not None and q is not None
    ]


def _plot(results: Sequence[TrialResult], sel: Selection) -> bytes | None:
    """Quality vs speedup, the Pareto front joined and the best trial starred (PNG)."""
    points = [r for r in results if r.ok and r.speedup is not None and r.quality is not None]
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys = _xy(points)
    ax.scatter(xs, ys, color="#9aa5b1", label="trial", zorder=2)
    front = sorted(sel.front, key=lambda r: r.speedup or 0.0)
    fx, fy = _xy(front)
    if fx:
        ax.plot(fx, fy, "o-", color="#1f77b4", label="Pareto front", zorder=3)
        for r, x, y in zip(front, fx, fy, strict=False):
            ax.annotate(r.id[:6], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    bx, by = _xy([sel.best] if sel.best is not None else [])
    if bx and sel.best is not None:
        ax.scatter(bx, by, marker="*", s=220, color="#d62728",
                   label=f"best ({sel.best.id[:6]})", zorder=4)  # fmt: skip
    metric = points[0].metric or "quality"
    lower = points[0].higher_is_better is False
    ax.set_xlabel("speedup vs reference (slowest shape, x)")
    ax.set_ylabel(f"{metric}{' (lower is better)' if lower else ''}")
    ax.axvline(1.0, color="#cccccc", lw=0.8, zorder=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("factorlm sweep: quality vs speedup")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _best_yaml(trial: Trial, source: str) -> str:
    config = trial.config.model_dump(mode="json")
    config["output_dir"] = "best-run"  # relative: resolves beside best.yaml
    head = (
        f"# Best trial {trial.id} of the sweep {source}: {trial.label()}\n"
        f"# Run it with: factorlm run {BEST_FILE}\n"
    )
    return head + yaml.safe_dump(config, sort_keys=False)


def write_results(
    root: Path,
    header: dict[str, Any],
    trials: Sequence[Trial],
    results: Sequence[TrialResult],
    selection: Selection,
) -> dict[str, Path]:
    """Write the result files into ``root``; returns their paths (``best`` only when selected)."""
    axes = list(trials[0].params) if trials else []
    paths = {"json": root / JSON_FILE, "md": root / MD_FILE}
    document = {
        "schema_version": SCHEMA_VERSION,
        **header,
        "selection": selection.to_dict(),
        "trials": [r.to_dict() for r in results],
    }
    write_text_atomic(paths["json"], json.dumps(document, indent=2, default=str) + "\n")
    write_text_atomic(paths["md"], _markdown(header, axes, results, selection))
    png = _plot(results, selection)
    if png is not None:
        paths["plot"] = write_bytes_atomic(root / PLOT_FILE, png)
    best_path = root / BEST_FILE
    if selection.best is not None:
        best = next(t for t in trials if t.id == selection.best.id)
        paths["best"] = write_text_atomic(best_path, _best_yaml(best, header["source"]))
    elif best_path.exists():
        best_path.unlink()  # a stale best from an earlier run of this sweep would mislead
    return paths
