"""Worker processes for the math-verify stage of answer equivalence (``reward.num_workers``).

``AnswerMatcher.prepare(groups)`` finds the groups whose clustering needs math-verify (a dry run of the
fast stages) and hands them here; each worker clusters its groups with its own ``AnswerMatcher`` (built with
the parent's settings, so its verdicts are the parent's) and sends back every pair verdict it computed; the
parent stores them in its pair cache, where ``cluster`` then finds them. The workers live as long as the
pool (their parse caches carry across steps too); ``close()`` stops them.

Processes are started with ``spawn`` (no fork of a process that holds CUDA contexts, Ray threads or
locks), import math-verify once at start, and run on their main thread, where the time limit works.
Nothing here decides a verdict: a lost worker (``BrokenProcessPool``) leaves the groups to the parent.
"""

from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any

Verdicts = tuple[list[tuple[tuple[str, str], bool]], int, int, int]
"""(pair verdicts computed, timeouts, math-verify calls, fast-path decisions) of one chunk of groups."""

_WORKER_MATCHER: Any = None


MAX_AUTO_WORKERS = 8
"""The most workers ``-1`` starts: each holds its own Python with sympy (~250 MB with torch imported by the
package), and what the fast path leaves to math-verify rarely keeps more busy."""


def free_cores() -> int:
    """The cores this process may use that are not busy: usable CPUs minus the 1-minute load (rounded up),
    at most all but one (the caller's) and ``MAX_AUTO_WORKERS``; >= 0. Read once, when the pool starts."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(0, min(cpus - 1, cpus - math.ceil(load), MAX_AUTO_WORKERS))


def _start_worker(settings: dict[str, Any]) -> None:
    global _WORKER_MATCHER
    from mmupt_megatron.algorithms.equivalence import AnswerMatcher

    _WORKER_MATCHER = AnswerMatcher(**settings, num_workers=0)
    _WORKER_MATCHER.equal(r"\sin(x)", r"\cos(x)")  # import sympy / math-verify now, not in the first chunk


def _cluster_chunk(groups: list[list[str]]) -> Verdicts:
    matcher = _WORKER_MATCHER
    timeouts, calls, fast = matcher.num_timeouts, matcher.num_symbolic_calls, matcher.num_fast_decisions
    matcher._journal = []
    try:
        for answers in groups:
            matcher.cluster(answers)
        journal = matcher._journal
    finally:
        matcher._journal = None
    return (journal, matcher.num_timeouts - timeouts, matcher.num_symbolic_calls - calls,
            matcher.num_fast_decisions - fast)


class VerifyPool:
    """A persistent pool of ``num_workers`` processes (-1: ``free_cores()``); fewer than 2 means no pool."""

    def __init__(self, num_workers: int, settings: dict[str, Any]) -> None:
        self.num_workers = free_cores() if num_workers == -1 else num_workers
        self.settings = settings
        self.lost = 0
        """Times a worker died and its groups were left to the parent."""
        self._executor: ProcessPoolExecutor | None = None

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.num_workers, mp_context=get_context("spawn"),
                                                 initializer=_start_worker, initargs=(self.settings,))
        return self._executor

    def start(self) -> bool:
        """Start every worker now (import math-verify in each) instead of on the first batch; False when
        they could not start (the parent then works alone)."""
        if self.num_workers < 2:
            return False
        try:
            list(self._start().map(_cluster_chunk, [[] for _ in range(self.num_workers)]))
        except BrokenProcessPool:
            self._lose()
            return False
        return True

    def cluster(self, groups: list[list[str]]) -> list[Verdicts]:
        """The verdicts of clustering ``groups`` in the workers (chunks of similar cost, round robin)."""
        if self.num_workers < 2 or not groups:
            return []
        chunks = [groups[i :: self.num_workers * 4] for i in range(min(len(groups), self.num_workers * 4))]
        try:
            return list(self._start().map(_cluster_chunk, chunks))
        except BrokenProcessPool:
            self._lose()
            return []

    def _lose(self) -> None:
        """A worker died (killed, out of memory, a main module a child cannot import): work alone from now on."""
        self.lost += 1
        self.close()
        self.num_workers = 0

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown the executor may be half gone
            self.close()
