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
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol, TypeVar

from factorlm.errors import ConfigError, FactorlmError

__all__ = [
    "RAY_INSTALL_HINT",
    "RayCall",
    "import_ray",
    "ordered_map",
    "ray_connection",
    "ray_scope",
    "ray_scope_on_demand",
    "ray_session",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

RAY_INSTALL_HINT = "pip install 'factorlm[ray]'"


def import_ray(what: str = "compress --ray", error: type[FactorlmError] = ConfigError) -> Any:
    """The ``ray`` module, or ``error`` in one sentence naming the extra to install.

    The one Ray import of factorlm: ``compress --ray`` (ConfigError) and ``factorlm sweep``
    (``sweeps.run.import_ray``: BackendUnavailableError) both come here.
    """
    try:
        import ray
    except ImportError:
        raise error(f"{what} needs Ray, which is not installed: {RAY_INSTALL_HINT}.") from None
    return ray


def _probe(address: str, timeout: float = 10.0) -> None:
    """Refuse an address nothing listens on at once (Ray itself retries for minutes)."""
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" or a name Ray resolves itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"Cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check the "
            "address (`ray status` on the head node prints it) or leave it out for a local Ray."
        ) from None


@contextmanager
def ray_connection(address: str | None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to Ray for the duration of the block, by Ray's own address rules; yield the module.

    ``None``: ``RAY_ADDRESS``, else the cluster last started on this machine, else a new local
    Ray; ``"auto"``: the same but never starts one; ``"local"``: always a new local Ray; anything
    else is a cluster address (``ray://host:10001`` or ``host:6379``), checked to answer first.
    ``num_cpus`` sizes a Ray started here. A Ray already initialized in this process is used as
    is and left running; one started here is shut down at the end. Shared by ``compress --ray``
    (:func:`ray_session`) and ``factorlm sweep``.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {
        "log_to_driver": False,
        "include_dashboard": False,
        "logging_level": logging.ERROR,  # no banner or start-up notices in the CLI's output
    }
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if address is not None:
        _probe(address)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError) as exc:
        where = address if address is not None else "its default address"
        reason = " ".join(str(exc).split()).rstrip(".")
        raise ConfigError(f"Cannot connect to Ray at {where}: {reason}.") from None
    logger.info("Ray started (%s): %s CPUs", address, ray.cluster_resources().get("CPU"))
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def ray_session(address: str) -> Iterator[Any]:
    """:func:`ray_connection` with ``compress --ray``'s address words; yield the module.

    ``"local"`` starts a private local Ray; ``"auto"`` joins the cluster named by
    ``RAY_ADDRESS`` or else starts a local one; anything else is a cluster address
    (``ray://host:10001`` or ``host:6379``).
    """
    target = (os.environ.get("RAY_ADDRESS") or None) if address == "auto" else address
    with ray_connection(target) as ray:
        yield ray


@contextmanager
def ray_scope(address: str | None) -> Iterator[Any]:
    """One Ray session around several Ray steps of one command; yield the module, or None.

    Why: ``compress --ray`` gathers the calibration Grams and then factorizes the weights, and
    each step opens :func:`ray_session`. Alone, each would start (and stop) its own local Ray
    (or connect to the cluster twice), paying the start-up and the workers' imports twice;
    inside this block both find the session initialized and use it. ``None``: no Ray.
    """
    if address is None:
        yield None
        return
    with ray_session(address) as ray:
        yield ray


class RayCall(Protocol):
    """``call(func, *args)``: ``func(*args)`` inside the shared Ray session (see below)."""

    def __call__(self, func: Callable[..., T], /, *args: Any) -> T: ...


@contextmanager
def ray_scope_on_demand(address: str | None) -> Iterator[RayCall]:
    """:func:`ray_scope` opened by the first step that needs it; yield ``call(func, *args)``.

    Why: ``factorlm run`` reuses the stages whose output is current, so a rerun whose calibrate
    and compress stages are both reused must not start Ray at all, while a run that does both
    shares one session. ``call`` opens the session (once, and only with an address) and then
    runs ``func(*args)``; the session ends with the block.
    """
    with ExitStack() as stack:
        opened: list[Any] = []

        def call(func: Callable[..., T], /, *args: Any) -> T:
            if address is not None and not opened:
                opened.append(stack.enter_context(ray_session(address)))
            return func(*args)

        yield call


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
