"""Work spread over a Dask cluster: a local one started here, or a running scheduler.

Dask, not Ray, because what explore spreads is plain Python work (tree searches whose agents
call HTTP servers or small local models, and sandbox runs): Dask's distributed scheduler runs
it with no services beside the scheduler and its workers (Ray adds a GCS, a raylet per node
and an object store), a local cluster of two workers starts in about two seconds on two cores,
and a lost worker's tasks are run again on the others by the scheduler itself. The GPU side of
the pipeline does not need either: vLLM brings its own multi-node serving, and GPU stages go
to a Prefect work pool of GPU workers.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from bdc.config import ClusterSettings
from bdc.errors import BDCError

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClusterError(BDCError, RuntimeError):
    """The cluster could not be reached or started."""


def security(settings: ClusterSettings) -> Any:
    """Dask's ``Security`` for this client: mutual TLS from ``settings.tls`` (every file
    checked now, naming its key), else Dask's own configuration. A plain ``tcp://`` address
    off loopback is warned about: anyone who reaches that scheduler can submit work, which
    its workers run, and read the problems and trees in flight."""
    from urllib.parse import urlsplit

    from distributed.security import Security

    from bdc.processes import is_loopback

    host = urlsplit(settings.address or "").hostname or ""
    if (settings.address or "").startswith("tcp://") and not is_loopback(host):
        log.warning("explore.cluster.address = %s: plain tcp://, neither encrypted nor "
                    "authenticated: anyone who can reach the scheduler can submit work, which "
                    "its workers run (any code), and read the problems and trees in flight; "
                    "use a tls:// address with explore.cluster.tls", settings.address)
    if settings.tls is None:
        return Security()
    for key in ("ca_file", "cert_file", "key_file"):
        if not Path(getattr(settings.tls, key)).is_file():
            raise ClusterError(f"explore.cluster.tls.{key} = {getattr(settings.tls, key)}: "
                               "no such file")
    return Security(tls_ca_file=settings.tls.ca_file, tls_client_cert=settings.tls.cert_file,
                    tls_client_key=settings.tls.key_file, require_encryption=True)


@contextmanager
def dask_client(settings: ClusterSettings) -> Iterator[Any]:
    """A ``distributed.Client``: ``address: local`` starts a cluster of ``workers``
    processes (one thread each: a shard's searches share one event loop) for the block, on
    loopback; any other address is a running scheduler, reached with :func:`security`."""
    from distributed import Client, LocalCluster

    if settings.address == "local":
        with LocalCluster(n_workers=settings.workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=logging.WARNING,
                          host="127.0.0.1") as cluster, \
                Client(cluster) as client:
            yield client
        return
    try:
        client = Client(settings.address, timeout=30, security=security(settings))
    except OSError as exc:
        raise ClusterError(f"explore.cluster.address = {settings.address}: no Dask scheduler "
                           f"answers there ({exc})") from exc
    with client:
        try:  # tasks sent to a scheduler without workers wait for one, silently, forever
            client.wait_for_workers(1, timeout=settings.wait_for_workers_s)
        except TimeoutError as exc:  # checked on connecting; workers that leave later are
            raise ClusterError(      # waited for, as Dask does (a team may add some)
                f"explore.cluster.address = {settings.address}: the scheduler has no running "
                f"workers after {settings.wait_for_workers_s:g}s ({exc}; start some with "
                f"`dask worker {settings.address}`)") from exc
        yield client


def shards(items: Sequence[T], size: int) -> list[list[T]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def map_shards(client: Any, fn: Callable[..., Any], parts: list[list[T]], *args: Any,
               done: Callable[[list[T], Any], None],
               failed: Callable[[list[T], BaseException], None]) -> None:
    """``fn(part, *args)`` for every part on the cluster; each result is handed to ``done``
    as it arrives (in completion order), a part whose task failed (an error in ``fn``, or
    its workers lost more often than Dask allows) to ``failed``. The scheduler runs a lost
    worker's tasks again elsewhere."""
    from distributed import as_completed

    # keys unique to this call: a scheduler reuses a task whose key it already holds, so
    # fixed keys would hand one driver another driver's results on a shared cluster
    run = uuid.uuid4().hex[:12]
    futures = {client.submit(fn, part, *args, pure=False, key=f"{fn.__name__}-{run}-{i}"):
               part for i, part in enumerate(parts)}
    log.info("cluster: %d tasks on %d workers", len(futures),
             len(client.scheduler_info()["workers"]))
    for future in as_completed(futures):
        part = futures[future]
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - the part is recorded as failed, not lost
            failed(part, exc)
            continue
        done(part, result)
