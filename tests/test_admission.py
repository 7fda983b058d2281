"""Model admission against a real Redis: leases per job, fair order, no starvation."""

from __future__ import annotations

import collections
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from worker.admission import NEXT, REFUSED, ModelAdmission


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def make(r: redis.Redis) -> Iterator[Callable[..., ModelAdmission]]:
    """Admissions on a namespace of this test's own, apart from any worker's."""
    ns = f"{{test-admission-{uuid.uuid4().hex[:8]}}}"

    def build(capacity: int, **kw: Any) -> ModelAdmission:
        return ModelAdmission(r, capacity, namespace=ns, **kw)

    yield build
    keys = list(r.scan_iter(match=f"{ns}*"))
    if keys:
        r.delete(*keys)


def wait_for(cond: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
    return value


def job() -> str:
    return uuid.uuid4().hex


# --- capacity and leases


def test_models_beyond_the_capacity_wait(make: Callable[..., ModelAdmission]) -> None:
    a = make(2, idle_s=60)
    j1, j2 = job(), job()
    assert a.admit("t:1", j1) and a.admit("t:2", j2)
    assert a.admit("t:1", job())  # an active model always gets in (nobody starves)
    assert not a.admit("t:3", job())
    assert a.leave("t:1", j1)
    assert not a.admit("t:3", job())  # t:1 still has a job in flight
    assert a.snapshot()["active"] == {"t:1": 1, "t:2": 1}
    assert a.snapshot()["waiting"] == ["t:3"]


def test_leave_ends_that_job_only_and_twice_changes_nothing(
    make: Callable[..., ModelAdmission],
) -> None:
    a = make(1, idle_s=0.1)
    j1, j2 = job(), job()
    assert a.admit("t:a", j1) and a.admit("t:a", j2)
    assert a.leave("t:a", j1)
    assert not a.leave("t:a", j1)  # idempotent: j2's lease is untouched
    assert not a.leave("t:a", "never-admitted")
    assert not a.leave("t:other", j2)  # the wrong model: nothing
    assert a.snapshot()["active"] == {"t:a": 1}
    time.sleep(0.2)
    assert not a.admit("t:b", job())  # t:a still runs j2, idle or not
    assert a.leave("t:a", j2)
    time.sleep(0.2)
    assert a.admit("t:b", job())
    assert a.snapshot()["active"] == {"t:b": 1}


def test_a_long_job_keeps_its_model_and_its_late_leave_corrupts_nothing(
    make: Callable[..., ModelAdmission],
) -> None:
    # A batch running far past idle_s and max_wait_s, renewing its lease, while another
    # model starves: its model drains but is not evicted while the batch runs.
    a = make(1, lease_s=0.5, idle_s=0.05, max_wait_s=0.2)
    batch = job()
    assert a.admit("t:batch", batch)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.2:  # over twice its lease
        assert not a.admit("t:waiting", job())
        assert a.renew("t:batch", batch)
        time.sleep(0.1)
    assert a.snapshot()["active"] == {"t:batch": 1}
    assert not a.admit("t:batch", job())  # draining: no new job for t:batch meanwhile
    assert a.leave("t:batch", batch)
    assert a.admit("t:waiting", job())  # drained and evicted at once
    assert not a.leave("t:batch", batch)  # a late second leave: nothing
    assert a.snapshot()["active"] == {"t:waiting": 1}


def test_a_lease_past_its_time_is_gone_and_its_leave_changes_nothing(
    make: Callable[..., ModelAdmission],
) -> None:
    a = make(1, lease_s=0.3, idle_s=0.05)
    overrun = job()
    assert a.admit("t:slow", overrun)
    time.sleep(0.4)  # the job overran its lease (the task's time limit) without renewing
    assert not a.renew("t:slow", overrun)  # nothing to renew: it is not resurrected
    assert a.admit("t:next", (nxt := job()))
    assert not a.leave("t:slow", overrun)  # the old bug: this decremented a count
    assert a.snapshot()["active"] == {"t:next": 1}
    assert not a.admit("t:slow", job())
    assert a.leave("t:next", nxt)


def test_a_dead_workers_lease_expires_and_leaks_nothing(
    r: redis.Redis, make: Callable[..., ModelAdmission]
) -> None:
    a = make(1, lease_s=0.3, idle_s=0.05)
    assert a.admit("t:orphan", job())  # never left: its worker died
    assert not a.admit("t:next", job())
    t0 = time.monotonic()
    wait_for(lambda: a.admit("t:next", job()))
    assert time.monotonic() - t0 < 1.0
    assert a.snapshot()["active"] == {"t:next": 1}
    assert not r.exists(f"{a.ns}:lease:t:orphan")


def test_renew_extends_a_live_lease(make: Callable[..., ModelAdmission]) -> None:
    a = make(1, lease_s=0.3, idle_s=0.01)
    j = job()
    assert a.admit("t:a", j)
    for _ in range(5):
        time.sleep(0.15)
        assert a.renew("t:a", j)
    assert not a.admit("t:b", job())
    assert a.leave("t:a", j)


# --- order and fairness


def test_waiters_are_admitted_in_arrival_order(make: Callable[..., ModelAdmission]) -> None:
    a = make(1, idle_s=0.05, max_wait_s=0)
    running = job()
    assert a.admit("t:a", running)
    base = time.time() - 10
    # Refused in the reverse of their arrival order: the line follows the arrival.
    arrival = {"t:b": base, "t:c": base + 1, "t:d": base + 2}
    for key in ("t:d", "t:c", "t:b"):
        assert not a.admit(key, job(), arrived_at=arrival[key])
    assert a.snapshot()["waiting"] == ["t:b", "t:c", "t:d"]
    assert a.leave("t:a", running)
    time.sleep(0.1)
    order = []
    for _ in range(3):
        # Every waiting model asks, latest first; only the oldest gets the free slot.
        for key in ("t:d", "t:c", "t:b"):
            if key in order:
                continue
            j = job()
            if a.admit(key, j, arrived_at=arrival[key]):
                order.append(key)
                assert a.leave(key, j)
                time.sleep(0.1)
                break
    assert order == ["t:b", "t:c", "t:d"]


def test_a_free_slot_waits_for_the_model_first_in_line(
    make: Callable[..., ModelAdmission],
) -> None:
    a = make(2, idle_s=0.05, max_wait_s=0)
    j1, j2 = job(), job()
    assert a.admit("t:a", j1) and a.admit("t:b", j2)
    assert not a.admit("t:first", job(), arrived_at=time.time() - 5)
    assert a.leave("t:a", j1)
    time.sleep(0.1)
    assert not a.admit("t:late", job())  # the free slot is t:first's
    assert a.admit("t:first", job(), arrived_at=time.time() - 5)


def test_a_republished_job_keeps_its_place(make: Callable[..., ModelAdmission]) -> None:
    # Its model's entry lapsed while the job went round the queue: the job's own
    # arrival time puts it back in front of a model that came later.
    a = make(1, idle_s=0.05, max_wait_s=0, waiter_ttl_s=0.2)
    running = job()
    assert a.admit("t:a", running)
    early = time.time() - 5
    assert not a.admit("t:early", job(), arrived_at=early)
    time.sleep(0.3)
    assert not a.admit("t:late", job(), arrived_at=time.time() - 1)
    assert a.snapshot()["waiting"] == ["t:late"]  # t:early's entry lapsed
    assert not a.admit("t:early", job(), arrived_at=early)  # back, in front
    assert a.snapshot()["waiting"] == ["t:early", "t:late"]
    assert a.leave("t:a", running)
    time.sleep(0.1)
    assert not a.admit("t:late", job())
    assert a.admit("t:early", job(), arrived_at=early)


def _steady_traffic(a: ModelAdmission, key: str, stop: threading.Event, threads: int) -> None:
    def loop() -> None:
        while not stop.is_set():
            j = job()
            if a.admit(key, j):
                time.sleep(0.01)
                a.leave(key, j)
            else:
                time.sleep(0.01)  # re-published; the next job comes at once

    for _ in range(threads):
        threading.Thread(target=loop, daemon=True).start()


@pytest.mark.parametrize("max_wait_s", [0.5, 0.0])
def test_a_model_with_steady_traffic_does_not_starve_another(
    make: Callable[..., ModelAdmission], max_wait_s: float
) -> None:
    a = make(1, idle_s=0.05, max_wait_s=max_wait_s)
    stop = threading.Event()
    _steady_traffic(a, "t:busy", stop, threads=4)
    try:
        wait_for(lambda: a.snapshot()["active"].get("t:busy"))
        arrived = time.time()
        got_in = None
        while time.time() - arrived < 3.0:
            if a.wait_for_turn("t:other", job(), arrived_at=arrived, timeout_s=1.0):
                got_in = time.time() - arrived
                break
        if max_wait_s:
            # The bound: max_wait_s, then t:busy drains (jobs of 10 ms) and is evicted.
            assert got_in is not None and got_in < max_wait_s + 0.5, got_in
        else:
            assert got_in is None  # without draining, the old starvation
    finally:
        stop.set()


def test_the_next_model_is_held_while_a_slot_drains_for_it(
    make: Callable[..., ModelAdmission],
) -> None:
    a = make(1, idle_s=5, max_wait_s=0.2)
    busy = job()
    assert a.admit("t:busy", busy)
    old = time.time() - 1  # waited past max_wait_s already
    time.sleep(0.25)  # t:busy active for max_wait_s: it drains
    assert a.try_admit("t:next", job(), arrived_at=old) == NEXT
    assert a.try_admit("t:third", job(), arrived_at=old + 0.5) == REFUSED  # not first in line
    threading.Timer(0.3, a.leave, ("t:busy", busy)).start()
    t0 = time.monotonic()
    assert a.wait_for_turn("t:next", job(), arrived_at=old, timeout_s=3)
    assert 0.2 < time.monotonic() - t0 < 1.5  # held, then in at once (idle_s is 5 s)
    t0 = time.monotonic()
    assert not a.wait_for_turn("t:third", job(), arrived_at=old + 0.5, timeout_s=3)
    assert time.monotonic() - t0 < 0.5  # not next: back to the queue without holding


# --- concurrency


def test_capacity_is_never_exceeded_under_concurrency(make: Callable[..., ModelAdmission]) -> None:
    a = make(2, idle_s=0.01, max_wait_s=0.3)
    models = [f"t:{i}" for i in range(6)]
    lock = threading.Lock()
    running: collections.Counter[str] = collections.Counter()
    worst = {"local": 0, "redis": 0, "admitted": 0}
    stop = threading.Event()

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        arrived = time.time()
        key = rnd.choice(models)
        while not stop.is_set():
            j = job()
            if not a.admit(key, j, arrived_at=arrived):
                time.sleep(0.002)
                continue
            with lock:  # counted after the grant, uncounted before the leave
                running[key] += 1
                worst["local"] = max(worst["local"], sum(1 for n in running.values() if n))
                worst["admitted"] += 1
            time.sleep(rnd.uniform(0, 0.01))
            with lock:
                running[key] -= 1
            assert a.leave(key, j)
            arrived, key = time.time(), rnd.choice(models)

    def sampler() -> None:
        while not stop.is_set():
            snap = a.snapshot()  # one atomic read of the Redis state
            assert len(snap["active"]) <= 2
            worst["redis"] = max(worst["redis"], sum(1 for n in snap["active"].values() if n))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    threads.append(threading.Thread(target=sampler))
    for t in threads:
        t.start()
    time.sleep(2.5)
    stop.set()
    for t in threads:
        t.join(10)
    assert worst["local"] <= 2 and worst["redis"] <= 2, worst
    assert worst["admitted"] > 50, worst


def _simulated_workers(
    a: ModelAdmission,
    jobs: list[tuple[str, float]],
    threads: int,
    *,
    run_s: float,
    turn_wait_s: float,
    deadline_s: float,
) -> dict[str, Any]:
    """A worker pool on a FIFO queue: a refused job is re-published at the end."""
    q: queue.Queue[tuple[str, str, float]] = queue.Queue()
    for key, arrived in jobs:
        q.put((key, job(), arrived))
    done: list[tuple[str, float]] = []
    lock = threading.Lock()
    stop = time.monotonic() + deadline_s

    def worker() -> None:
        while time.monotonic() < stop:
            try:
                key, j, arrived = q.get(timeout=0.1)
            except queue.Empty:
                with lock:
                    if len(done) == len(jobs):
                        return
                continue
            if not a.wait_for_turn(key, j, arrived_at=arrived, timeout_s=turn_wait_s):
                q.put((key, j, arrived))
                continue
            time.sleep(run_s)
            assert a.leave(key, j)
            with lock:
                done.append((key, time.time() - arrived))

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(deadline_s + 5)
    return {"done": done, "stats": a.snapshot()["stats"]}


def test_progress_when_every_thread_holds_a_job_whose_model_waits(
    make: Callable[..., ModelAdmission],
) -> None:
    # One slot, taken by a model whose worker died (its lease runs out only later);
    # four threads, each holding a job for another model, every one of which waits,
    # and past max_wait_s from the start: threads are held, the line still moves.
    a = make(1, lease_s=0.5, idle_s=0.05, max_wait_s=0.1, refuse_pause_s=0.01)
    assert a.admit("t:dead", job())
    start = time.time() - 1
    jobs = [(f"t:{i % 4}", start + i * 0.001) for i in range(40)]
    out = _simulated_workers(a, jobs, threads=4, run_s=0.005, turn_wait_s=2.0, deadline_s=20)
    assert len(out["done"]) == 40
    assert a.snapshot()["active"].get("t:dead") is None


def test_waves_keep_loads_low_and_every_model_gets_in(
    make: Callable[..., ModelAdmission],
) -> None:
    # W3 in small: 8 models in random order over 3 slots. Each activation is a load per
    # replica: waves give one per model, not the hundreds of a thrashing cache.
    a = make(3, idle_s=0.2, max_wait_s=30, refuse_pause_s=0.002)
    rnd = random.Random(3)
    start = time.time()
    jobs = [(f"t:{rnd.randrange(8)}", start + i * 1e-4) for i in range(400)]
    out = _simulated_workers(a, jobs, threads=16, run_s=0.01, turn_wait_s=1.0, deadline_s=60)
    assert len(out["done"]) == 400
    assert out["stats"]["activations"] <= 12, out["stats"]


def test_capacity_must_be_positive(make: Callable[..., ModelAdmission]) -> None:
    with pytest.raises(ValueError, match="capacity"):
        make(0)


# --- end to end: real workers, real Serve (needs the pipeline wired to this API)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_workers_with_admission_load_each_model_once_per_wave(
    admin: Any,
    worker_env: dict[str, str],
    redis_url: str,
    session_dir: Any,
    probe_app: Any,
) -> None:
    # W3 in small: two worker processes (4 threads each) with admission at the probe's
    # bound (1 replica x 2 models), 80 jobs over 4 models in random order. Waves load
    # each model about once; a thrashing LRU loads on most switches (dozens).
    from config import load_settings
    from tests.conftest import WorkerProcess
    from tests.fault_kit import path_counts, record_path
    from tests.test_serve_e2e import stats
    from tests.test_worker import PROBE, new_job, send, wait_final
    from worker.app import create_app

    url = redis_url.rsplit("/", 1)[0] + "/4"  # a broker of its own: no other worker
    env = {
        **worker_env,
        "REDIS_URL": url,
        "SYNAPSE_BRIDGE_METRICS_PORT": "0",
        "SYNAPSE_BRIDGE_ACTIVE_MODELS": "2",
        "SYNAPSE_BRIDGE_MODEL_IDLE": "0.3",
        "SYNAPSE_BRIDGE_MODEL_MAX_WAIT": "30",
    }
    redis.Redis.from_url(url).flushdb()
    models = [14, 15, 21, 22]
    before = stats(probe_app.app_name)["loads"]
    workers = [
        WorkerProcess(env, session_dir / f"worker-admission-{i}.log", concurrency=4).start()
        for i in range(2)
    ]
    producer = create_app(load_settings(redis_url=url))  # the producer's app on this broker
    try:
        rnd = random.Random(11)
        jobs = []
        for i in range(80):
            model = rnd.choice(models)
            body = {"sleep_s": 0.02, "tag": f"adm-{i}"}
            job_id = new_job(admin, model=model, release=PROBE, body=body)
            send(job_id, model=model, release=PROBE, body=body, app=producer)
            jobs.append(job_id)
        finals = [wait_final(admin, j, timeout=240) for j in jobs]
        assert [f["status"] for f in finals] == ["SUCCEEDED"] * len(jobs)
        loads = stats(probe_app.app_name)["loads"] - before
        assert loads <= 2 * len(models), f"{loads} loads for {len(models)} models"
        a = ModelAdmission(redis.Redis.from_url(url), 2)
        assert all(n == 0 for n in a.snapshot()["active"].values())  # no lease left
        counts = path_counts(admin, jobs)
        record_path(
            "A11 admission on, two workers",
            counts,
            f"80 jobs over 4 models, 2 admitted at a time; {loads} model loads",
        )
        assert (counts.lost, counts.stuck, counts.written_twice) == (0, 0, 0)
    finally:
        for w in workers:
            w.stop()
