"""Where filter_corpus's pass 1 runs: shard by shard in this process (`filter.engine: local`), or on a Dask
cluster (`dask`), a local one of `filter.workers` processes on 127.0.0.1 or a running one at `filter.scheduler`.

Why Dask distributed, measured on this workload (16 MB shards, 2 workers on 127.0.0.1; README, "filter_corpus
on a cluster"): 34 MB of pure Python with no conflict with constraints.txt, 2-3 s to start, 256 MiB idle,
3.6 MB/s (the in-process loop: 2.5); Ray: 255 MB and an unpinned protobuf, 5-7 s, 725 MiB, 4.0 MB/s; datatrove's
executors reach other machines only through Slurm or Ray, and need a filesystem shared by every task.
(MB = 10^6 bytes, MiB = 2^20.)

A map takes the function and the shards as (index, rows or None) in order; it yields (index, result or None)
in the same order, None where the shard was None (a shard an earlier run finished: not sent again). Shards go
to the workers over the network, no shared filesystem needed; at most `2 * workers` are in flight, so the
driver holds a bounded number of shards and results whatever the corpus size.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

from persona_lm.errors import PersonaError
from persona_lm.params import Filter

log = logging.getLogger("persona_lm")
WORKER_WAIT_S = 60  # how long a cluster may have no worker before the stage gives up
POLL_S = 5.0

T = TypeVar("T")
R = TypeVar("R")
Map = Callable[[Callable[[T], R], Iterable[tuple[int, T | None]]], Iterator[tuple[int, R | None]]]


def local(fn: Callable[[T], R], shards: Iterable[tuple[int, T | None]]) -> Iterator[tuple[int, R | None]]:
    """Each shard in this process, one at a time."""
    for k, shard in shards:
        yield k, None if shard is None else fn(shard)


@contextmanager
def shard_map(cfg: Filter) -> Iterator[Map]:
    """The map of `cfg.engine`; a local Dask cluster is started here and stopped on exit. Raises PersonaError when
    `cfg.scheduler` does not answer within 30 s or has no workers; the map raises PersonaError naming the shard
    whose scan failed on a worker (the worker's exception chained)."""
    if cfg.engine == "local":
        yield local
        return
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # not a line per worker started and stopped
    if cfg.scheduler is None:
        with LocalCluster(n_workers=cfg.workers, threads_per_worker=1, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0") as cluster, \
                Client(cluster) as client:
            log.info("filter_corpus: scanning shards on a local Dask cluster of %d worker(s)", cfg.workers)
            yield _dask(client, cfg.workers)
        return
    try:
        client = Client(cfg.scheduler, timeout=30)
    except OSError as e:
        raise PersonaError(f"filter_corpus: no Dask scheduler at {cfg.scheduler} ({e}); start one with "
                           "`dask scheduler` or set filter.scheduler: null for a local cluster") from None
    with client:
        try:  # workers started just before may not have registered yet
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            raise PersonaError(f"filter_corpus: the Dask scheduler at {cfg.scheduler} has had no workers for "
                               f"{WORKER_WAIT_S} s; start them with `dask worker {cfg.scheduler}`") from None
        workers = len(client.scheduler_info()["workers"])
        log.info("filter_corpus: scanning shards on %d Dask worker(s) at %s", workers, cfg.scheduler)
        yield _dask(client, workers)


def _dask(client, workers: int) -> Map:
    from distributed import wait

    def run(fn, shards):
        pending: deque = deque()

        def result():
            k, future = pending.popleft()
            if future is None:
                return k, None
            idle = 0.0
            while not future.done():  # a cluster that lost every worker never fails the future: watch for it
                try:
                    wait(future, timeout=POLL_S)
                except TimeoutError:
                    idle = idle + POLL_S if not client.scheduler_info()["workers"] else 0.0
                    if idle >= WORKER_WAIT_S:
                        raise PersonaError(f"filter_corpus: the Dask cluster has had no workers for "
                                           f"{WORKER_WAIT_S} s (see the workers' logs: a worker needs this "
                                           "project at the same commit); finished shards are kept") from None
            try:
                return k, future.result()
            except Exception as e:
                raise PersonaError(f"filter_corpus: shard {k} failed on the Dask cluster: "
                                   f"{type(e).__name__}: {e}") from e

        for k, shard in shards:
            pending.append((k, None if shard is None else client.submit(fn, shard, pure=False)))
            if len(pending) >= 2 * workers:
                yield result()
        while pending:
            yield result()

    return run
