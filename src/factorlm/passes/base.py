"""The loop every factor-rewrite pass shares: planned factors in, one rewrite per candidate out.

Each pass differs only in which candidates it can rewrite and how it rewrites one, so the
bookkeeping (editor, plan lookup, counting, model tag, log line, ``PassResult``) lives here once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import ClassVar, Generic, TypeVar

import onnx_ir as ir

from factorlm.passes.analysis import Candidate, analyze
from factorlm.passes.editor import GraphEditor

__all__ = ["PlannedFactorPass"]

F = TypeVar("F")


class PlannedFactorPass(ir.passes.InPlacePass, Generic[F]):
    """Rewrite every analyzed candidate that has planned factors and that the pass supports.

    Subclasses set ``summary`` (a log format with one ``%s`` for the count) and implement
    ``_accepts`` and ``_rewrite``; ``_candidates`` may be overridden to analyze differently.

    Attributes:
        factors: initializer (or candidate) name -> factors of the subclass's form. Names that
            are not supported candidates of the model are ignored (the plan validates them).
    """

    summary: ClassVar[str]

    def __init__(self, factors: Mapping[str, F]) -> None:
        super().__init__()
        self.factors = dict(factors)

    def _candidates(self, model: ir.Model) -> Sequence[Candidate]:
        """The candidates to consider, in rewrite order."""
        return analyze(model).candidates

    def _accepts(self, cand: Candidate) -> bool:
        """Whether this pass can rewrite ``cand`` (planned factors are checked separately)."""
        raise NotImplementedError

    def _rewrite(self, editor: GraphEditor, cand: Candidate, factors: F) -> None:
        """Rewrite the uses of one accepted candidate with its planned ``factors``."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        editor = GraphEditor(model)
        count = 0
        for cand in self._candidates(model):
            factors = self.factors.get(cand.name)
            if factors is None or not self._accepts(cand):
                continue
            self._rewrite(editor, cand, factors)
            count += 1
        editor.tag_model()
        # Log under the subclass's module so callers' logger filters keep working.
        logging.getLogger(type(self).__module__).info(self.summary, count)
        return ir.passes.PassResult(model, modified=count > 0)
