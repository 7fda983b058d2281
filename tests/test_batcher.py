"""The runtime's batcher: batches form when the device is free, one model per batch."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_runtime.batcher import GATHER_S, Arrivals, DeviceBatcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Device:
    """One call at a time, as long as the test holds ``gate`` shut; records every batch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.running = 0
        self.max_running = 0

    async def run(self, items: list[tuple[str, int]]) -> list[Any]:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            self.batches.append(items)
            await self.gate.wait()
            if any(n < 0 for _, n in items):
                raise ValueError("negative input")
            return [n * 10 for _, n in items]
        finally:
            self.running -= 1


async def until(cond: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.001)


def submit(b: DeviceBatcher[Any], key: str, n: int) -> asyncio.Task[Any]:
    return asyncio.ensure_future(b.submit(key, (key, n)))


async def occupy(dev: Device, b: DeviceBatcher[Any], key: str) -> asyncio.Task[Any]:
    """Hold the device with one request (the gate shut), so what follows must wait."""
    dev.gate.clear()
    task = submit(b, key, 0)
    await until(lambda: len(dev.batches) == 1)
    return task


async def test_requests_arriving_while_the_device_runs_make_one_full_batch() -> None:
    dev = Device()
    b = DeviceBatcher(dev.run, max_batch_size=32, batch_wait_timeout_s=0.0)
    first = await occupy(dev, b, "m")
    rest = [submit(b, "m", i) for i in range(1, 41)]
    await until(lambda: b.waiting == 40)
    dev.gate.set()
    results = await asyncio.gather(first, *rest)
    assert results == [i * 10 for i in range(41)]
    assert [len(x) for x in dev.batches] == [1, 32, 8]
    assert b.batch_sizes == {1: 1, 32: 1, 8: 1}


async def test_a_batch_holds_one_model_only() -> None:
    dev = Device()
    b = DeviceBatcher(dev.run, max_batch_size=32, batch_wait_timeout_s=0.0)
    warm = await occupy(dev, b, "a")
    mixed = [submit(b, "ab"[i % 2], i) for i in range(20)]
    await until(lambda: b.waiting == 20)
    dev.gate.set()
    assert await asyncio.gather(*mixed) == [i * 10 for i in range(20)]
    await warm
    assert all(len({k for k, _ in batch}) == 1 for batch in dev.batches)
    assert sorted(len(x) for x in dev.batches[1:]) == [10, 10]


async def test_a_full_queue_goes_before_an_older_partial_one() -> None:
    dev = Device()
    b = DeviceBatcher(dev.run, max_batch_size=4, batch_wait_timeout_s=60.0)
    dev.gate.clear()
    busy = [submit(b, "x", i) for i in range(4)]  # full at once: runs without waiting
    await until(lambda: len(dev.batches) == 1)
    old = submit(b, "a", 1)
    await until(lambda: b.waiting == 1)
    full = [submit(b, "b", i) for i in range(4)]
    await until(lambda: b.waiting == 5)
    dev.gate.set()
    await asyncio.gather(*busy, *full)
    assert [k for k, _ in dev.batches[1]] == ["b"] * 4
    assert not old.done()  # "a" still waits for company, up to its 60 s
    old.cancel()


async def test_a_lone_request_waits_for_company_until_its_deadline() -> None:
    dev = Device()
    b = DeviceBatcher(dev.run, max_batch_size=8, batch_wait_timeout_s=0.2)
    one = submit(b, "m", 1)
    await until(lambda: b.waiting == 1)
    two = submit(b, "m", 2)  # arrives inside the first one's window
    assert await asyncio.gather(one, two) == [10, 20]
    assert [len(x) for x in dev.batches] == [2]


async def test_a_bad_item_fails_only_its_own_request_and_the_next_batch_runs() -> None:
    dev = Device()
    b = DeviceBatcher(dev.run, max_batch_size=8, batch_wait_timeout_s=0.0)
    warm = await occupy(dev, b, "m")
    bad, good = submit(b, "m", -1), submit(b, "m", 2)
    await until(lambda: b.waiting == 2)
    dev.gate.set()
    await warm
    with pytest.raises(ValueError, match="negative input"):
        await bad
    assert await good == 20  # its batch failed; run alone, it did not
    assert [len(x) for x in dev.batches] == [1, 2, 1, 1]
    assert await b.submit("m", ("m", 3)) == 30


async def test_a_coalesced_calls_items_wait_for_each_other_and_run_as_one_batch() -> None:
    dev = Device()
    b = DeviceBatcher(dev.run, max_batch_size=32, batch_wait_timeout_s=0.0)
    arrivals = Arrivals(3)
    first = asyncio.ensure_future(b.submit("m", ("m", 1), arrivals))
    arrivals.arrived()
    await asyncio.sleep(0.005)  # the others are still on their way (being authorized)
    assert dev.batches == []  # without the call's announcement this would run alone
    rest = [asyncio.ensure_future(b.submit("m", ("m", n), arrivals)) for n in (2, 3)]
    arrivals.arrived()
    arrivals.arrived()
    assert await asyncio.gather(first, *rest) == [10, 20, 30]
    assert [len(x) for x in dev.batches] == [3]


async def test_an_announced_item_that_never_comes_delays_a_batch_only_briefly() -> None:
    dev = Device()
    b = DeviceBatcher(dev.run, max_batch_size=32, batch_wait_timeout_s=0.0)
    arrivals = Arrivals(2)  # the second item stalls (its model is loading, say)
    one = asyncio.ensure_future(b.submit("m", ("m", 1), arrivals))
    arrivals.arrived()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await one == 10
    assert loop.time() - t0 < GATHER_S + 0.5
    assert arrivals.pending == 1


async def test_a_wrong_number_of_results_is_an_error_not_a_shifted_answer() -> None:
    async def short(items: list[Any]) -> list[Any]:
        return items[:-1]

    b = DeviceBatcher(short, max_batch_size=8, batch_wait_timeout_s=0.05)
    tasks = [asyncio.ensure_future(b.submit("m", i)) for i in range(3)]
    for task in tasks:
        with pytest.raises(RuntimeError, match=r"\d results for \d requests"):
            await task


async def test_a_cancelled_request_is_not_run() -> None:
    dev = Device()
    b = DeviceBatcher(dev.run, max_batch_size=8, batch_wait_timeout_s=0.0)
    warm = await occupy(dev, b, "m")
    gone, kept = submit(b, "m", 1), submit(b, "m", 2)
    await until(lambda: b.waiting == 2)
    gone.cancel()
    dev.gate.set()
    assert await kept == 20
    await warm
    assert dev.batches[1] == [("m", 2)]


async def test_concurrent_batches_are_bounded() -> None:
    dev = Device()
    b = DeviceBatcher(dev.run, max_batch_size=1, batch_wait_timeout_s=0.0, max_concurrent_batches=2)
    dev.gate.clear()
    tasks = [submit(b, "m", i) for i in range(6)]
    await until(lambda: dev.running == 2)
    assert b.waiting == 4
    dev.gate.set()
    await asyncio.gather(*tasks)
    assert dev.max_running == 2


async def test_bad_options_are_refused() -> None:
    async def run(items: list[Any]) -> list[Any]:
        return items

    with pytest.raises(ValueError, match="max_batch_size"):
        DeviceBatcher(run, max_batch_size=0, batch_wait_timeout_s=0.0)


async def test_under_load_the_oldest_request_goes_first_even_before_a_full_queue() -> None:
    dev = Device()
    b = DeviceBatcher(dev.run, max_batch_size=4, batch_wait_timeout_s=0.0)
    busy = await occupy(dev, b, "x")
    old = submit(b, "a", 1)  # waited past its (zero) timeout: it goes next
    await until(lambda: b.waiting == 1)
    full = [submit(b, "b", i) for i in range(4)]
    await until(lambda: b.waiting == 5)
    dev.gate.set()
    await asyncio.gather(busy, old, *full)
    assert [k for k, _ in dev.batches[1]] == ["a"]
    assert [k for k, _ in dev.batches[2]] == ["b"] * 4
