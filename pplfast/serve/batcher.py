"""The bounded queue and the scoring worker of one model.

Requests become :class:`Job` objects (their sequences, see :mod:`pplfast.serve.packing`) and
wait in a queue of at most ``max_queue`` jobs; a full queue refuses at once (the app answers 503
with ``Retry-After``). One worker thread per model gathers the queued jobs of one kind (scoring,
or comparison with one base model) until they hold ``max_batch_tokens`` tokens or the oldest has
waited ``max_wait_ms``, plans passes of at most ``max_batch_tokens`` tokens over all their
sequences, runs them, and settles each job's future on the event loop as soon as its last
sequence is scored. A job whose client left is dropped from the queue, or its rows are left out
of the passes not yet run; an exception in a pass fails the jobs with rows in it (the app answers
500) and the worker goes on with the next pass.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Callable, Hashable, List, Optional

from .packing import Sequence

_log = logging.getLogger("pplfast.serve")


class QueueFull(Exception):
    """The model's queue holds ``max_queue`` jobs."""


class Job:
    """One request's work for one model: ``sequences`` of one ``kind``."""

    def __init__(self, kind: Hashable, sequences: List[Sequence],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.kind, self.sequences, self.loop = kind, sequences, loop
        self.future: asyncio.Future = loop.create_future()
        self.tokens = sum(len(s) for s in sequences)
        self.arrival = time.monotonic()
        self.cancelled = False
        self._left = len(sequences)
        self._failed = False

    def _settle(self, error: Optional[BaseException]) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is None:
                self.future.set_result(self.sequences)
            else:
                self.future.set_exception(error)

        self.loop.call_soon_threadsafe(settle)


class Batcher:
    """Queue and worker of one model.

    ``plan(kind, sequences) -> passes`` and ``run(kind, pass)`` do the scoring (``run`` fills
    each sequence's ``result``); ``metrics`` and ``label`` feed the queue and pass metrics.
    """

    def __init__(self, label: str, plan: Callable, run: Callable, *, max_batch_tokens: int,
                 max_wait_ms: float, max_queue: int, metrics=None) -> None:
        self.label, self._plan, self._run = label, plan, run
        self.max_batch_tokens, self.max_wait = max_batch_tokens, max_wait_ms / 1000.0
        self.max_queue, self.metrics = max_queue, metrics
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=f"pplfast-serve-{label}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish what is queued, then end the worker (waiting at most ``timeout`` seconds)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> asyncio.Future:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue of model {self.label!r} is full ({self.max_queue} "
                                "requests waiting, --max-queue)")
            self._queue.append(job)
            self._depth()
            self._cond.notify_all()
        return job.future

    def cancel(self, job: Job) -> None:
        """The client left: drop the job, or its rows not yet run."""
        with self._cond:
            if job.cancelled or job.future.done():
                return
            job.cancelled = True
            try:
                self._queue.remove(job)
                self._depth()
            except ValueError:
                pass  # already taken by the worker: its rows are skipped
        if self.metrics is not None:
            self.metrics.cancelled.labels(self.label).inc()

    def _depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.label).set(len(self._queue))

    def _gather(self) -> Optional[List[Job]]:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            kind = self._queue[0].kind
            deadline = self._queue[0].arrival + self.max_wait
            while not self._stopping:
                tokens = sum(j.tokens for j in self._queue if j.kind == kind)
                left = deadline - time.monotonic()
                if tokens >= self.max_batch_tokens or left <= 0:
                    break
                self._cond.wait(left)
            taken, tokens = [], 0
            for job in list(self._queue):
                if job.kind != kind:
                    continue
                if taken and tokens + job.tokens > self.max_batch_tokens:
                    break
                taken.append(job)
                tokens += job.tokens
            for job in taken:
                self._queue.remove(job)
            self._depth()
            return taken

    def _work(self) -> None:
        while True:
            jobs = self._gather()
            if jobs is None:
                return
            try:
                self._score(jobs)
            except Exception as exc:  # planning failed: these jobs fail, the worker goes on
                _log.exception("pplfast serve: planning a batch failed")
                for job in jobs:
                    job._settle(exc)

    def _score(self, jobs: List[Job]) -> None:
        owner = {}
        for job in jobs:
            if not job.cancelled:
                for seq in job.sequences:
                    owner[id(seq)] = job
        seqs = [s for j in jobs if not j.cancelled for s in j.sequences]
        if not seqs:
            return
        kind = jobs[0].kind
        for planned in self._plan(kind, seqs):
            # rows of jobs whose client left, or that failed in an earlier pass, are not run
            p = planned.keeping(lambda s: not (owner[id(s)].cancelled or owner[id(s)]._failed))
            if p is None:
                continue
            in_pass = [owner[id(s)] for s in p.sequences]
            started = time.perf_counter()
            try:
                self._run(kind, p)
            except Exception as exc:
                _log.exception("pplfast serve: a forward pass failed")
                if self.metrics is not None:
                    self.metrics.failed_passes.labels(self.label).inc()
                for job in set(in_pass):
                    if not job._failed:
                        job._failed = True
                        job._settle(exc)
                continue
            if self.metrics is not None:
                self.metrics.batch_tokens.labels(self.label).observe(p.tokens)
                self.metrics.pass_seconds.labels(self.label).observe(
                    time.perf_counter() - started)
                fed = sum(len(s) for s in p.sequences)
                self.metrics.shared_tokens.labels(self.label).inc(
                    fed - sum(r.length for r in p.rows))
                self.metrics.scored_tokens.labels(self.label).inc(
                    sum(int(s.positions.numel()) for s in p.sequences))
            for job in in_pass:
                job._left -= 1
                if job._left == 0 and not job._failed:
                    job._settle(None)
