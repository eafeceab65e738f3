"""The benchmark stage: latency and accuracy of candidates against the original, as a CI gate.

``run_benchmark(reference, candidates, options)`` returns a ``Report``; ``Report.write(folder)`` writes
report.json (schema in ``factorlm.bench.report``), report.md, report.html and junit.xml, and
``Report.passed`` decides the exit status. Runners (``OrtRunner``, ``TrtRunner``) share one
protocol and can be used on their own.
"""

from __future__ import annotations

import logging

from factorlm.bench.goals import Goal, GoalResult, goals_from_options, load_goals
from factorlm.bench.report import SCHEMA_VERSION, Report, load_report
from factorlm.bench.run import run_benchmark
from factorlm.bench.runners import OrtRunner, Runner, TensorMeta, TrtRunner, load_runner

__all__ = [
    "SCHEMA_VERSION",
    "Goal",
    "GoalResult",
    "OrtRunner",
    "Report",
    "Runner",
    "TensorMeta",
    "TrtRunner",
    "goals_from_options",
    "load_goals",
    "load_report",
    "load_runner",
    "run_benchmark",
]

logger = logging.getLogger(__name__)
