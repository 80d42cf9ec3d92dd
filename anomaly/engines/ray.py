"""The Ray engine: Ray Data's batch-inference pattern over a pool of actors.

The dataset's rows are block descriptors (:class:`anomaly.data.shards.Block`); each actor is a
:class:`RayScorer` that loads and verifies the artifact once in its constructor and then reads,
scores and writes whole blocks. Ray Data restarts a dead actor and retries its block
(``max_restarts=-1``, ``max_task_retries=-1``, its defaults for actor pools); a retried block
rewrites the same part file through a rename, so it never appears twice.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from anomaly.data.shards import Block
from anomaly.engines.blocks import BlockScorer
from anomaly.errors import AnomalyError, ConfigError, expected
from anomaly.extras import install_hint

EXTRA_HINT = install_hint("ray")
#: Seconds to wait for a cluster address to answer before saying it does not.
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    """``ray`` (and Ray Data), or a clear error naming the ``ray`` extra."""
    try:
        import ray
        import ray.data  # Ray Core alone lacks it: the extra installs ray[data]
    except ImportError as exc:
        raise expected("Ray (with Ray Data) installed for --engine ray",
                       f"ImportError: {exc}", hint=EXTRA_HINT, cls=ConfigError) from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail in seconds, naming the address, instead of Ray's long retry loop."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise expected("a Ray address: auto, HOST:PORT or ray://HOST:PORT",
                       repr(address), cls=ConfigError)
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise expected("a Ray cluster answering at the address", f"{address} "
                       f"({exc.strerror or type(exc).__name__})", hint="Start it with "
                       "'ray start --head', or leave out --address for a local Ray.",
                       cls=ConfigError) from None


def _init(ray, address: str | None) -> None:
    if ray.is_initialized():
        return
    if address is not None:
        _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    except ConnectionError as exc:
        raise expected("a Ray cluster answering at the address", f"{address} ({exc})",
                       cls=ConfigError) from None


class RayScorer:
    """Ray Data's callable class: one artifact load per actor, then one block per call."""

    def __init__(self, **scorer_kwargs):
        self.scorer = BlockScorer(**scorer_kwargs)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        counts = [self.scorer.score_block(Block.from_json(str(b))) for b in batch["block"]]
        return {k: np.asarray([c[k] for c in counts]) for k in counts[0]}


def _our_error(exc: BaseException) -> AnomalyError | None:
    """The project's own error inside Ray's wrappers (RayTaskError, UserCodeException)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, AnomalyError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def run(pending: list[Block], scorer_kwargs: dict, *, address: str | None = None,
        num_actors: int | None = None, cpus_per_actor: float = 1.0,
        actor_cls: type = RayScorer, **_) -> Iterator[dict]:
    """Score ``pending`` blocks on Ray; yields each block's counts as it finishes.

    Args:
        address: the cluster (``None``: a local Ray on this machine's CPUs).
        num_actors: actors in the pool (default: the cluster's CPUs / ``cpus_per_actor``, at
            most one per block).
        cpus_per_actor: Ray CPUs each actor holds, and its runtime's threads.
        actor_cls: the callable class Ray Data runs (:class:`RayScorer`, or one that wraps it:
            a GPU variant, fault injection in tests).
    """
    import logging

    ray = import_ray()
    _init(ray, address)
    # Ray Data logs each execution's start and end at INFO on stderr: our progress says it.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if num_actors is None:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        num_actors = max(1, int(cpus // cpus_per_actor))
    num_actors = max(1, min(int(num_actors), len(pending)))
    threads = max(1, int(cpus_per_actor))
    ds = ray.data.from_items([{"block": b.to_json()} for b in pending],
                             override_num_blocks=len(pending))
    ds = ds.map_batches(actor_cls, batch_size=1, compute=ray.data.ActorPoolStrategy(
        size=num_actors), num_cpus=cpus_per_actor,
        fn_constructor_kwargs={**scorer_kwargs, "threads": threads})
    try:
        for row in ds.iter_rows():
            yield {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    except Exception as exc:  # Ray wraps what the actors raised; show ours as ours
        ours = _our_error(exc)
        if ours is not None:
            raise ours from None
        raise
