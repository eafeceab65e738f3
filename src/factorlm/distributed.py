"""Ray plumbing for ``compress --ray``: a session and an order-keeping map over Ray tasks.

Why: a large model's factorizations are independent eigendecompositions, one per weight. Each
task receives only its weight's address on disk (``streaming.WeightSource``), its statistics and
its plan entry, and returns only the factors, so no worker (nor the driver) holds the whole
model. Results come back in submission order, with a bounded number of tasks in flight, so the
driver applies them exactly as the local loop does (bit-identical output) without holding more
than a window of factors.

Ray is the optional extra ``factorlm[ray]``; without it the caller gets one sentence naming it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from factorlm.errors import ConfigError

__all__ = ["RAY_INSTALL_HINT", "import_ray", "ordered_map", "ray_session"]

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = "pip install 'factorlm[ray]'"


def import_ray(what: str = "compress --ray") -> Any:
    """The ``ray`` module, or ConfigError in one sentence naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"{what} needs Ray, which is not installed: {RAY_INSTALL_HINT}."
        ) from None
    return ray


@contextmanager
def ray_session(address: str) -> Iterator[Any]:
    """Connect to Ray for the duration of the block and yield the module.

    ``"local"`` starts a private local Ray; ``"auto"`` joins the cluster named by
    ``RAY_ADDRESS`` or else starts a local one; anything else is a cluster address
    (``ray://host:10001`` or ``host:6379``). A Ray already initialized in this process is used
    as is and left running; one started here is shut down at the end.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        if address == "local":
            target: str | None = "local"
        elif address == "auto":
            target = os.environ.get("RAY_ADDRESS") or None
        else:
            target = address
        try:
            ray.init(
                address=target,
                log_to_driver=False,
                include_dashboard=False,
                logging_level=logging.WARNING,  # no banner in the CLI's output
            )
        except (ConnectionError, ValueError) as exc:
            raise ConfigError(f"cannot connect to Ray at {address!r}: {exc}") from None
        started = True
        logger.info("Ray started (%s): %s CPUs", address, ray.cluster_resources().get("CPU"))
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _call(func: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return func(*args)


_REMOTE: dict[int, Any] = {}


def ordered_map(
    func: Callable[..., Any],
    jobs: Iterable[tuple[Any, ...]],
    *,
    window: int | None = None,
) -> Iterator[Any]:
    """``func(*job)`` for every job as a Ray task (1 CPU each), yielded in job order.

    At most ``window`` tasks are in flight (default: twice the cluster's CPUs), so results
    waiting for an earlier one never pile up. ``func`` must be importable on the workers
    (a module-level function of an installed package).
    """
    ray = import_ray()
    key = id(ray)
    if key not in _REMOTE:
        _REMOTE[key] = ray.remote(num_cpus=1, max_retries=0)(_call)
    remote = _REMOTE[key]
    if window is None:
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: deque[Any] = deque()
    for job in jobs:
        pending.append(remote.remote(func, tuple(job)))
        if len(pending) >= window:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())
