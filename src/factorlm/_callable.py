"""Let a module double as its main function, so ``factorlm.compress(...)`` mirrors the CLI.

``factorlm.compress`` and ``factorlm.benchmark`` are modules (a package) whose names the Python
API also uses as verbs. Swapping the module's class for a callable subclass keeps
``from factorlm.compress import compress`` working and makes ``factorlm.compress(...)`` call it.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ["make_module_callable"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["__factorlm_call__"](*args, **kwargs)


def make_module_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Make ``sys.modules[module_name](...)`` call ``function``."""
    module = sys.modules[module_name]
    module.__dict__["__factorlm_call__"] = function
    module.__class__ = _CallableModule
