"""The benchmark report: one JSON document, rendered as Markdown, HTML and JUnit XML.

report.json schema, version 1 (``schema`` = ``"factorlm.bench"``, ``schema_version`` = 1):

```
created            ISO-8601 UTC time
environment        {cpu, cpu_count, affinity, platform, python, libraries: {name: version}}
settings           {shapes: ["1x128", ...], warmup, iterations, seed, confidence, task, data,
                    regression_basis, ...}
reference          {name, path, backend, file, session: {providers, intra_op_threads,
                    inter_op_threads, graph_optimization_level}, inputs, outputs, manifest}
candidates         [same as reference, one per candidate]
latency            [{shape, batch, seq,
                     results: {model name: {samples_ms: [...], p50_ms, p90_ms, p99_ms, mean_ms,
                                            std_ms, throughput_per_s}},
                     speedup: {candidate name: {estimate, ci_low, ci_high, confidence}}}]
                   samples_ms[i] of every model come from the same alternation round i
                   decoders exported with past: shape is "prefill 1x128" or
                   "decode 4x1 past 512"; the entry adds phase ("prefill" | "decode"), past
                   (cache length), tokens (batch x new tokens per inference) and every result
                   adds ms_per_token (p50_ms / tokens) and tokens_per_s (tokens / p50)
engines            {model name: {size_bytes (engine file + external data), files,
                    memory: {resident_bytes, peak_bytes, probe (grid point of the probe
                    inference), method}}} (see factorlm.bench.footprint)
fidelity           {candidate name: {inputs: "data" | "random",
                                     outputs: {output: {rows, cosine_mean, cosine_min,
                                       max_abs_error, rel_l2_error, argmax_agreement,
                                       kl_divergence, pooled_cosine_mean?, pooled_cosine_min?}},
                                     random: {...same outputs block on random feeds...}}}
                   (decoders: random feeds of the prefill points only; a random cache is no
                   input a model meets)
task               null or {task, metric, higher_is_better, drop_unit ("points" | "percent"),
                            reference, candidates: {name: value}, drop: {name: value}, details,
                            classification only: drop_interval: {name: [low, high]} (paired
                            bootstrap over rows, details.confidence), agreement: {name: rate};
                            generation: value = token agreement percent, details
                            {first_divergence_mean, exact_match_rate, tokens_per_s, ...},
                            samples: [{prompt, reference, candidates: {name: text}}];
                            reference_replay?: {record, replayed, ran} when the reference's
                            task outputs came from a recording (factorlm.bench.replay)}
prediction         optional (latency-targeted plans): {candidate name: {shape, predicted_speedup,
                    measured_speedup, ci_low, ci_high, error_pct, predicted_ms, model_ms}}
goals              [{type, value, candidate, passed, measured, margin, detail}]
passed             true when every goal passed (true when there are no goals)
```

A later schema version only adds keys; readers check ``schema_version <= SCHEMA_VERSION``.
Files are written under a temporary name in the output folder and renamed into place.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from factorlm._common.files import write_text_atomic
from factorlm.bench.goals import GoalResult
from factorlm.errors import ConfigError

__all__ = ["SCHEMA", "SCHEMA_VERSION", "Report", "load_report"]

logger = logging.getLogger(__name__)

SCHEMA = "factorlm.bench"
SCHEMA_VERSION = 1


@dataclass
class Report:
    """A finished benchmark; ``data`` follows the schema above, ``goals`` are the judged goals."""

    data: dict[str, Any]
    goals: list[GoalResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.goals)

    @property
    def failed_goals(self) -> list[GoalResult]:
        return [g for g in self.goals if not g.passed]

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.data)
        out["goals"] = [g.to_dict() for g in self.goals]
        out["passed"] = self.passed
        return out

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2, sort_keys=False) + "\n"

    def write(self, out_dir: Path, *, html_report: bool = True) -> dict[str, Path]:
        """Write report.json, report.md, report.html and junit.xml into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {
            "json": out_dir / "report.json",
            "markdown": out_dir / "report.md",
            "junit": out_dir / "junit.xml",
        }
        write_text_atomic(files["json"], self.to_json())
        write_text_atomic(files["markdown"], render_markdown(self))
        write_text_atomic(files["junit"], render_junit(self))
        if html_report:
            files["html"] = out_dir / "report.html"
            write_text_atomic(files["html"], render_html(self))
        return files


def load_report(path: Path) -> dict[str, Any]:
    """Read a stored report.json (a baseline); any problem is one ConfigError sentence."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Baseline report {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"Baseline report {path} is unreadable ({type(exc).__name__}).") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ConfigError(f"Baseline report {path} is not a factorlm bench report.json.")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ConfigError(
            f"Baseline report {path} has schema version {version!r}; this factorlm reads up to "
            f"{SCHEMA_VERSION}."
        )
    try:
        ref = data["reference"]["name"]
        for entry in data["latency"]:
            names = [ref] + [c["name"] for c in data["candidates"]]
            for name in names:
                if not entry["results"][name]["samples_ms"]:
                    raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"Baseline report {path} lacks latency samples.") from None
    return data


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _tables(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the Markdown and HTML renderings."""
    d = report.data
    ref = d["reference"]["name"]
    tables = []
    rows = []
    per_token = any("tokens" in entry for entry in d["latency"])
    for entry in d["latency"]:
        for name, res in entry["results"].items():
            sp = entry["speedup"].get(name)
            speed = (
                f"{sp['estimate']:.3f}x [{sp['ci_low']:.3f}, {sp['ci_high']:.3f}]"
                if sp
                else "1 (reference)"
            )
            if per_token:  # a decoder: per-token figures instead of p99 and sequences/s
                rows.append(
                    [
                        entry["shape"],
                        name,
                        f"{res['p50_ms']:.3f}",
                        f"{res['p90_ms']:.3f}",
                        _fmt(res.get("ms_per_token")),
                        _rate(res.get("tokens_per_s")),
                        speed,
                    ]
                )
                continue
            rows.append(
                [
                    entry["shape"],
                    name,
                    f"{res['p50_ms']:.3f}",
                    f"{res['p90_ms']:.3f}",
                    f"{res['p99_ms']:.3f}",
                    f"{res['throughput_per_s']:.1f}",
                    speed,
                ]
            )
    conf = d["settings"].get("confidence", 0.95)
    middle = ["ms/token", "tokens/s"] if per_token else ["p99 ms", "seq/s"]
    tables.append(
        (
            "Latency",
            ["shape", "model", "p50 ms", "p90 ms", *middle, f"speedup [{conf:.0%} CI]"],
            rows,
        )
    )
    predicted = d.get("prediction") or {}
    if predicted:  # a latency-targeted plan's prediction against this measurement
        tables.append(
            (
                "Predicted vs measured speedup",
                ["candidate", "shape", "predicted", "measured", "measured / predicted - 1"],
                [
                    [
                        name,
                        p["shape"],
                        f"{p['predicted_speedup']:.3f}x",
                        _fmt(p.get("measured_speedup")),
                        f"{p['error_pct']:+.1f} %" if p.get("error_pct") is not None else "-",
                    ]
                    for name, p in predicted.items()
                ],
            )
        )
    engines = d.get("engines") or {}
    if engines:
        rows = []
        for name, info in engines.items():
            memory = info.get("memory") or {}
            rows.append(
                [
                    name,
                    _mb(info.get("size_bytes")),
                    _mb(memory.get("resident_bytes")),
                    _mb(memory.get("peak_bytes")),
                    str(memory.get("probe") or "–"),
                ]
            )
        tables.append(
            (
                "Engine size and session memory",
                ["model", "on disk MB", "resident MB", "peak MB", "probe inference"],
                rows,
            )
        )
    rows = []
    for name, block in d["fidelity"].items():
        for output, m in block["outputs"].items():
            rows.append(
                [
                    name,
                    output,
                    block["inputs"],
                    _fmt(m.get("cosine_mean"), 6),
                    _fmt(m.get("cosine_min"), 6),
                    _fmt(m.get("pooled_cosine_mean"), 6),
                    _fmt(m.get("max_abs_error")),
                    _fmt(m.get("rel_l2_error")),
                    _fmt(m.get("argmax_agreement")),
                    _fmt(m.get("kl_divergence")),
                ]
            )
    tables.append(
        (
            f"Fidelity against {ref}",
            [
                "candidate",
                "output",
                "inputs",
                "cosine mean",
                "cosine min",
                "pooled cosine",
                "max abs err",
                "rel L2 err",
                "argmax agree",
                "KL (nats)",
            ],
            rows,
        )
    )
    task = d.get("task")
    if task:
        unit = "%" if task["drop_unit"] == "percent" else " pts"
        rows = [[ref, _fmt(task["reference"], 6), "–"]]
        rows += [
            [n, _fmt(v, 6), f"{task['drop'][n]:+.3f}{unit}"] for n, v in task["candidates"].items()
        ]
        header = ["model", task["metric"], "drop"]
        intervals, agreement = task.get("drop_interval") or {}, task.get("agreement") or {}
        if intervals:  # classification: paired bootstrap interval of the drop, agreement rate
            level = f"{100 * task['details'].get('confidence', 0.95):g} % interval"
            header += [level, "agreement"]
            rows[0] += ["–", "–"]
            for row in rows[1:]:
                low, high = intervals.get(row[0], (None, None))
                span = "–" if low is None else f"[{low:+.3f}, {high:+.3f}]{unit}"
                row += [span, _fmt(agreement.get(row[0]), 4)]
        if task["task"] == "generation":
            details = task["details"]
            header += ["first divergence (mean token)", "all tokens agree", "tokens/s"]
            for row in rows:
                first = details["first_divergence_mean"].get(row[0])
                exact = details["exact_match_rate"].get(row[0])
                row += [
                    _fmt(first, 4),
                    "–" if exact is None else f"{exact:.0%}",
                    _rate(details["tokens_per_s"].get(row[0])),
                ]
        tables.append((f"Task: {task['task']} ({task['metric']})", header, rows))
    if report.goals:
        rows = [
            [g.candidate, g.goal.label, "PASS" if g.passed else "FAIL", _fmt(g.measured), g.detail]
            for g in report.goals
        ]
        tables.append(("Goals", ["candidate", "goal", "result", "measured", "detail"], rows))
    return tables


def _mb(value: Any) -> str:
    return "–" if value is None else f"{value / 1e6:.1f}"


def _rate(value: Any) -> str:
    return "–" if value is None else f"{value:.1f}"


def _samples(report: Report, width: int | None) -> tuple[list[str], list[list[str]]]:
    """Generation samples: prompt, the reference's continuation, each candidate's (cut to width)."""
    task = report.data.get("task") or {}
    samples = task.get("samples") or []
    if not samples:
        return [], []
    ref = report.data["reference"]["name"]
    names = list(samples[0]["candidates"])

    def cut(text: str) -> str:
        text = " ".join(str(text).split())
        return text if width is None or len(text) <= width else text[: width - 1] + "…"

    header = ["prompt", f"{ref} (reference)", *names]
    rows = [
        [cut(s["prompt"]), cut(s["reference"]), *(cut(s["candidates"].get(n, "")) for n in names)]
        for s in samples
    ]
    return header, rows


def _summary_line(report: Report) -> str:
    if not report.goals:
        return "No goals were set."
    failed = report.failed_goals
    if not failed:
        return f"All {len(report.goals)} goals passed."
    return f"{len(failed)} of {len(report.goals)} goals failed: " + "; ".join(
        f"{g.candidate} {g.goal.label} ({g.detail})" for g in failed
    )


def _environment_line(report: Report) -> str:
    env = report.data["environment"]
    libs = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items())
    ref = report.data["reference"]
    session = ref.get("session", {})
    threads = session.get("intra_op_threads")
    return (
        f"{env.get('cpu')} ({env.get('cpu_count')} cores), {env.get('platform')}, Python "
        f"{env.get('python')}; {libs}. Backend {ref['backend']}"
        + (
            f", providers {', '.join(session.get('providers', []))}, intra-op threads "
            f"{threads or 'auto'}, graph optimization {session.get('graph_optimization_level')}"
            if session
            else ""
        )
        + "."
    )


def render_markdown(report: Report) -> str:
    d = report.data
    s = d["settings"]
    lines = [
        "# factorlm benchmark",
        "",
        f"**{'PASS' if report.passed else 'FAIL'}** — {_summary_line(report)}",
        "",
        f"Reference `{d['reference']['name']}` ({d['reference']['path']}); candidates: "
        + ", ".join(f"`{c['name']}` ({c['path']})" for c in d["candidates"])
        + ".",
        "",
        f"Latency: {s['iterations']} alternating rounds after {s['warmup']} warm-up rounds per "
        f"shape; speedup = median of per-round t_ref / t_cand with a bootstrap CI.",
        "",
        f"Machine: {_environment_line(report)}",
        "",
    ]
    for title, header, rows in _tables(report):
        lines += [f"## {title}", "", _markdown_table(header, rows), ""]
    header, rows = _samples(report, 60)
    if rows:
        escaped = [[cell.replace("|", "\\|") for cell in row] for row in rows]
        lines += ["## Generation samples", "", _markdown_table(header, escaped), ""]
    return "\n".join(lines)


def render_junit(report: Report) -> str:
    cases = []
    for g in report.goals:
        name = quoteattr(f"{g.candidate}: {g.goal.label}")
        body = (
            ""
            if g.passed
            else (
                f'<failure message={quoteattr(g.detail)} type="GoalFailed">{escape(g.detail)}</failure>'
            )
        )
        cases.append(
            f'    <testcase classname="factorlm.bench" name={name} time="0">{body}</testcase>'
        )
    failures = len(report.failed_goals)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<testsuites tests="{len(report.goals)}" failures="{failures}">\n'
        f'  <testsuite name="factorlm.bench" tests="{len(report.goals)}" failures="{failures}" '
        f'errors="0" skipped="0" timestamp={quoteattr(report.data.get("created", ""))}>\n'
        + "".join(c + "\n" for c in cases)
        + "  </testsuite>\n</testsuites>\n"
    )


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(report: Report) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    d = report.data
    ref = d["reference"]["name"]
    out = []
    latency = d["latency"]
    names = list(latency[0]["results"]) if latency else []
    if latency:
        fig, axes = plt.subplots(1, len(latency), figsize=(4.2 * len(latency), 3.2), squeeze=False)
        for ax, entry in zip(axes[0], latency, strict=True):
            ax.boxplot([entry["results"][n]["samples_ms"] for n in names], showfliers=True)
            ax.set_xticks(range(1, len(names) + 1), names, rotation=20, fontsize=8)
            ax.set_title(f"shape {entry['shape']}")
            ax.set_ylabel("ms per inference")
        fig.tight_layout()
        out.append(("Latency distributions", _png(fig)))
        plt.close(fig)
        cands = [c["name"] for c in d["candidates"]]
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        width = 0.8 / max(len(cands), 1)
        for k, name in enumerate(cands):
            est = [e["speedup"][name]["estimate"] for e in latency]
            lo = [e["speedup"][name]["estimate"] - e["speedup"][name]["ci_low"] for e in latency]
            hi = [e["speedup"][name]["ci_high"] - e["speedup"][name]["estimate"] for e in latency]
            xs = [i + (k - (len(cands) - 1) / 2) * width for i in range(len(latency))]
            ax.bar(xs, est, width, yerr=[lo, hi], capsize=3, label=name)
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_xticks(range(len(latency)), [e["shape"] for e in latency])
        ax.set_ylabel(f"speedup vs {ref}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out.append(("Speedup per shape", _png(fig)))
        plt.close(fig)
    if len(d["candidates"]) >= 2 and latency:
        task = d.get("task")
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for c in d["candidates"]:
            name = c["name"]
            speed = min(e["speedup"][name]["estimate"] for e in latency)
            if task:
                y, ylabel = task["candidates"][name], task["metric"]
            else:
                y = min(m.get("cosine_mean", 1.0) for m in d["fidelity"][name]["outputs"].values())
                ylabel = "worst output cosine"
            ax.scatter([speed], [y])
            ax.annotate(name, (speed, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        if task:
            ax.scatter([1.0], [task["reference"]], marker="*", s=120, label=ref)
            ax.legend(fontsize=8)
        ax.set_xlabel("speedup (worst shape)")
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        out.append(("Accuracy vs speed", _png(fig)))
        plt.close(fig)
    return out


def render_html(report: Report) -> str:
    """A self-contained page: tables plus plots embedded as base64 PNG."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>factorlm benchmark</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 7px;text-align:left}.pass{color:#176f2c}.fail{color:#b00020}</style>",
        "</head><body><h1>factorlm benchmark</h1>",
        f"<p class='{'pass' if report.passed else 'fail'}'><b>{'PASS' if report.passed else 'FAIL'}"
        f"</b> — {html.escape(_summary_line(report))}</p>",
        f"<p>Machine: {html.escape(_environment_line(report))}</p>",
    ]
    for title, header, rows in _tables(report):
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>")
        parts += [f"<th>{html.escape(h)}</th>" for h in header]
        parts.append("</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    header, rows = _samples(report, None)
    if rows:  # side by side: what the reference and each candidate wrote after the same prompt
        parts.append("<h2>Generation samples</h2><table class='samples'><tr>")
        parts += [f"<th>{html.escape(h)}</th>" for h in header]
        parts.append("</tr>")
        for row in rows:
            parts.append(
                "<tr>"
                + "".join(
                    f"<td style='white-space:pre-wrap;vertical-align:top;"
                    f"max-width:360px'>{html.escape(c)}</td>"
                    for c in row
                )
                + "</tr>"
            )
        parts.append("</table>")
    for title, png in _plots(report):
        parts.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{png}'>"
        )
    parts.append("</body></html>\n")
    return "".join(parts)
