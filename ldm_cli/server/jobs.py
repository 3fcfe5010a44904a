"""The work queue: one FIFO queue, bounded, and one worker thread per device, each with its own
loaded model (model_slot.ModelSlot). A job is a function of the worker's slot and of the job
itself (for its progress and stop flag); its caller waits on its future."""
from __future__ import annotations

import threading
from collections import deque
import time
from concurrent.futures import Future
from typing import Any, Callable

from ldm_cli.model_slot import ModelSlot

RETRY_AFTER_S = 5  # what a 503 suggests: about one small image's time


class QueueFull(Exception):
    """More jobs are waiting than the queue holds."""


class Stopped(Exception):
    """The job was interrupted (A1111's interrupt or skip, its client gone, the server stopping)."""


class Job:
    def __init__(self, work: Callable[[ModelSlot, Job], Any], kind: str):
        self.work, self.kind = work, kind
        self.future: Future = Future()
        self.stop = threading.Event()
        self.steps_done, self.steps_total = 0, 0
        self.started: float | None = None

    def watch(self, done: int, total: int) -> None:
        """A step was taken (commands.RunOptions.watch): counted, and the job stopped if asked."""
        self.steps_done, self.steps_total = done, total
        if self.stop.is_set():
            raise Stopped()

    def cancel(self) -> None:
        """Drop it if still queued; stop it at its next step if running."""
        self.stop.set()
        self.future.cancel()


class Workers:
    def __init__(self, devices: list[str], capacity: int):
        self.capacity = capacity
        self.waiting_jobs: deque[Job] = deque()  # FIFO; a cancelled job leaves it at once
        self.changed = threading.Condition()
        self.closing = False
        self.slots = [ModelSlot(device) for device in devices]
        self.running: dict[int, Job] = {}  # by worker
        self.interrupted = False  # A1111's progress reports the last interrupt
        self.threads = [threading.Thread(target=self._serve, args=(i,), daemon=True, name=f"ldm-worker-{i}")
                        for i in range(len(self.slots))]
        for thread in self.threads:
            thread.start()

    def submit(self, work: Callable[[ModelSlot, Job], Any], kind: str = "job") -> Job:
        job = Job(work, kind)
        with self.changed:
            if len(self.waiting_jobs) >= self.capacity:
                raise QueueFull()
            self.waiting_jobs.append(job)
            self.changed.notify()
        job.future.add_done_callback(lambda f: self._forget(job))
        return job

    def _forget(self, job: Job) -> None:
        with self.changed:
            if job in self.waiting_jobs:
                self.waiting_jobs.remove(job)

    def _next(self) -> Job | None:
        with self.changed:
            while not self.waiting_jobs and not self.closing:
                self.changed.wait()
            return None if self.closing else self.waiting_jobs.popleft()

    def _serve(self, index: int) -> None:
        while (job := self._next()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            self.running[index], job.started = job, time.monotonic()
            try:
                job.future.set_result(job.work(self.slots[index], job))
            except BaseException as e:  # handed to the request that waits on it
                job.future.set_exception(e)
            finally:
                self.running.pop(index, None)

    def jobs_running(self) -> list[Job]:
        """The running jobs, read while workers change them (by index: never a dict being resized)."""
        return [job for i in range(len(self.slots)) if (job := self.running.get(i)) is not None]

    def interrupt(self) -> None:
        """Stop every running job at its next step (A1111's interrupt: the images done are kept)."""
        self.interrupted = True
        for job in self.jobs_running():
            job.stop.set()

    def waiting(self) -> int:
        return len(self.waiting_jobs)

    def close(self) -> None:
        """Stop the running jobs, drop the queued ones, and let the workers end."""
        with self.changed:
            dropped = list(self.waiting_jobs)
            self.closing = True
            self.changed.notify_all()
        for job in dropped:
            job.cancel()
        self.interrupt()
        for thread in self.threads:
            thread.join(timeout=30)
        for slot in self.slots:
            slot.clear()
