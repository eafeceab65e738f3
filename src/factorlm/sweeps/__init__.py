"""``factorlm sweep``: grids over ``factorlm run`` configs, trials on Ray, the best one selected.

The package is ``factorlm.sweeps`` so that the API function ``factorlm.sweep`` is never
re-bound by the import system (as ``factorlm.benchmark`` and the ``factorlm.bench`` package).
Ray is imported only when trials run (``run.import_ray``), so validating a sweep file and the
selection logic work without the ``ray`` extra.
"""

from __future__ import annotations

from factorlm.sweeps.config import SelectRule, SweepConfig, load_sweep, parse_sweep
from factorlm.sweeps.grid import Trial, expand, trial_id
from factorlm.sweeps.run import SweepResult, plan_seeds, run_sweep
from factorlm.sweeps.select import Selection, TrialResult, pareto_front, select

__all__ = [
    "SelectRule",
    "Selection",
    "SweepConfig",
    "SweepResult",
    "Trial",
    "TrialResult",
    "expand",
    "load_sweep",
    "pareto_front",
    "parse_sweep",
    "plan_seeds",
    "run_sweep",
    "select",
    "trial_id",
]
