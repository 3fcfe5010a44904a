"""The server's queue (server/jobs.py) with real threads and two CPU "devices": FIFO, one job
at a time per worker, the bound, cancellation; and a client that goes away losing its job."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from ldm_cli.server import jobs, renders
from tests.serving import live


def wait_until(condition, seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_two_workers_take_jobs_in_order_one_each_at_a_time():
    workers = jobs.Workers(["cpu", "cpu"], capacity=8)
    release, started, lock = threading.Event(), [], threading.Lock()
    running, most = [0], [0]

    def work(i):
        def run(slot, job):
            with lock:
                started.append((i, slot))
                running[0] += 1
                most[0] = max(most[0], running[0])
            release.wait(10)
            with lock:
                running[0] -= 1
            return i
        return run
    submitted = [workers.submit(work(i)) for i in range(5)]
    wait_until(lambda: len(started) == 2)
    time.sleep(0.1)
    assert len(started) == 2 and workers.waiting() == 3  # both workers busy, the rest queued
    assert {id(slot) for _, slot in started} == {id(s) for s in workers.slots}  # one job on each device
    release.set()
    assert [job.future.result(10) for job in submitted] == [0, 1, 2, 3, 4]
    assert [i for i, _ in started][:2] in ([0, 1], [1, 0]) and [i for i, _ in started][2:] in (
        [2, 3, 4], [3, 2, 4], [2, 4, 3], [3, 4, 2])  # FIFO: 2 and 3 start before 4
    assert most[0] == 2
    workers.close()


def test_the_queue_is_bounded_and_a_cancelled_job_never_runs():
    workers = jobs.Workers(["cpu"], capacity=1)
    release, ran = threading.Event(), []
    workers.submit(lambda slot, job: release.wait(10))
    wait_until(lambda: workers.running)
    queued = workers.submit(lambda slot, job: ran.append("queued"))
    with pytest.raises(jobs.QueueFull):
        workers.submit(lambda slot, job: None)
    queued.cancel()
    last = workers.submit(lambda slot, job: ran.append("last"))
    release.set()
    last.future.result(10)
    assert ran == ["last"] and queued.future.cancelled()
    workers.close()


def test_a_running_job_stops_at_its_next_step():
    workers = jobs.Workers(["cpu"], capacity=1)
    steps = []

    def run(slot, job):
        for i in range(1000):
            job.watch(i + 1, 1000)
            steps.append(i)
            time.sleep(0.001)
    job = workers.submit(run)
    wait_until(lambda: len(steps) > 5)
    job.cancel()
    with pytest.raises(jobs.Stopped):
        job.future.result(10)
    assert len(steps) < 1000
    workers.close()


def test_a_client_that_goes_away_loses_its_queued_job(monkeypatch):
    calls = []
    monkeypatch.setattr(renders, "run", lambda *args: calls.append(args) or [])
    release = threading.Event()
    with live() as server:
        server.workers.submit(lambda slot, job: release.wait(30))
        wait_until(lambda: server.workers.running)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64},
                       timeout=httpx.Timeout(5, read=0.5))
        time.sleep(1)  # the server notices within a poll
        release.set()
        wait_until(lambda: not server.workers.running and not server.workers.waiting())
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64})
    assert r.status_code == 200 and len(calls) == 1  # only the request that stayed


def test_two_workers_render_concurrent_requests_as_one_does():
    """Two CPU "devices", each its own model copy, rendering at once: every image is the one a
    single worker makes for its seed (no state shared between the workers' runs)."""
    from concurrent.futures import ThreadPoolExecutor

    def images(server, seeds):
        def one(seed):
            r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": seed, "steps": 4,
                                                                  "width": 64, "height": 64}, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["images"][0]
        with ThreadPoolExecutor(len(seeds)) as pool:
            return list(pool.map(one, seeds))
    with live(devices=("cpu", "cpu")) as two:
        together = images(two, [1, 2, 3, 4])
        assert all(slot.model is not None for slot in two.workers.slots)  # both workers rendered
        assert two.workers.slots[0].model is not two.workers.slots[1].model
    with live() as one:
        alone = [images(one, [seed])[0] for seed in (1, 2, 3, 4)]
    assert together == alone
