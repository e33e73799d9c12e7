"""The model pool with scripted engines: load on demand, shared loads, failures reported to
every waiter, the memory budget with least-recently-used eviction (never busy or pinned
models), keep-alive, and the admin load and unload."""

from __future__ import annotations

import asyncio

import pytest

from llmhost.engines.fake import FakeEngine
from llmhost.engines.pool import ModelSpec, Pool
from llmhost.errors import EngineNotReady, InvalidRequest, ModelLoadError, ModelNotFound, Overloaded

GIB = 1 << 30


class SlowEngine(FakeEngine):
    """Takes `delay` seconds to start, or fails; counts its starts and closes."""

    def __init__(self, model_id: str, log: list[str], delay: float = 0.0, fail: str = ""):
        super().__init__(model_id=model_id)
        self.log, self.delay, self.fail = log, delay, fail

    async def start(self) -> None:
        self.log.append(f"start {self.model_info.id}")
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError(self.fail)
        await super().start()

    async def close(self) -> None:
        self.log.append(f"close {self.model_info.id}")
        await super().close()


def spec(name: str, log: list[str], need: float = 1, **kw) -> ModelSpec:
    engine_kw = {k: kw.pop(k) for k in ("delay", "fail") if k in kw}
    return ModelSpec(
        id=name,
        build=lambda: SlowEngine(name, log, **engine_kw),
        need_bytes=int(need * GIB),
        **kw,
    )


async def test_loads_on_demand_once_for_every_waiter():
    log: list[str] = []
    pool = Pool([spec("a", log), spec("b", log, delay=0.05)])
    engines = await asyncio.gather(*(pool.acquire("b") for _ in range(5)))
    assert log == ["start b"] and len({id(e) for e in engines}) == 1
    assert [m["state"] for m in pool.status()] == ["unloaded", "loaded"]
    assert pool.status()[1]["in_flight"] == 5
    for _ in range(5):
        pool.release("b")
    assert pool.status()[1]["in_flight"] == 0
    await pool.close()
    assert log == ["start b", "close b"]


async def test_unknown_model_lists_what_exists():
    pool = Pool([spec("a", []), spec("b", [])])
    with pytest.raises(ModelNotFound, match="serves: a, b"):
        await pool.acquire("c")
    assert (await pool.acquire(None)).model_info.id == "a"  # the first is the default


async def test_a_failed_load_answers_every_waiter_and_the_next_request_retries():
    log: list[str] = []
    pool = Pool([spec("bad", log, delay=0.05, fail="no such file: x.gguf")])
    got = await asyncio.gather(*(pool.acquire("bad") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(g, ModelLoadError) and "no such file: x.gguf" in str(g) for g in got)
    assert log == ["start bad"]
    (status,) = pool.status()
    assert status["state"] == "unloaded" and "no such file" in status["error"]
    with pytest.raises(ModelLoadError):
        await pool.acquire("bad")
    assert log == ["start bad", "start bad"]


async def test_a_load_past_the_timeout_is_a_503_and_goes_on():
    log: list[str] = []
    pool = Pool([spec("slow", log, delay=0.3)], load_timeout=0.05)
    with pytest.raises(EngineNotReady) as err:
        await pool.acquire("slow")
    assert err.value.retry_after == 5
    await asyncio.sleep(0.35)
    assert pool.status()[0]["state"] == "loaded"
    assert (await pool.acquire("slow")).model_info.id == "slow"


async def test_budget_evicts_the_least_recently_used_idle_model():
    log: list[str] = []
    pool = Pool([spec(n, log) for n in "abc"], budget_bytes=2 * GIB)
    for name in "ab":
        await pool.acquire(name)
        pool.release(name)
    await pool.acquire("a")  # a is now the most recent
    pool.release("a")
    await pool.acquire("c")
    assert [m["state"] for m in pool.status()] == ["loaded", "unloaded", "loaded"]
    assert log[-2:] == ["close b", "start c"]
    assert pool.used_bytes() == 2 * GIB


async def test_busy_and_pinned_models_are_never_evicted():
    log: list[str] = []
    pool = Pool(
        [spec("p", log, pinned=True), spec("busy", log), spec("new", log)], budget_bytes=2 * GIB
    )
    await pool.start()
    await pool.acquire("busy")  # held
    with pytest.raises(Overloaded, match="held by models in use or pinned"):
        await pool.acquire("new")
    pool.release("busy")
    await pool.acquire("new")
    assert [m["state"] for m in pool.status()] == ["loaded", "unloaded", "loaded"]


async def test_a_model_that_can_never_fit_is_a_400_with_the_sizes():
    pool = Pool([spec("huge", [], need=40)], budget_bytes=24 * GIB)
    with pytest.raises(InvalidRequest, match=r"needs about 40\.0 GiB.*budget of 24\.0 GiB"):
        await pool.acquire("huge")


async def test_each_gpu_has_its_own_budget_and_only_holders_of_the_short_one_go():
    log: list[str] = []
    pool = Pool(
        [
            spec("cpu", log, need=1),
            spec("g0", log, need=0, gpu_bytes={0: 6 * GIB}),
            spec("g1", log, need=0, gpu_bytes={1: 6 * GIB}),
            spec("g0b", log, need=0, gpu_bytes={0: 6 * GIB}),
            spec("split", log, need=0, gpu_bytes={0: 5 * GIB, 1: 5 * GIB}),
        ],
        budget_bytes=4 * GIB,
        gpu_budget={0: 10 * GIB, 1: 10 * GIB},
    )
    for name in ("cpu", "g1", "g0"):  # g0 used last
        await pool.acquire(name)
        pool.release(name)
    await pool.acquire("g0b")  # GPU 0 is short: g0 goes, though cpu and g1 are older
    pool.release("g0b")
    assert log[-2:] == ["close g0", "start g0b"]
    assert pool.gpu_used_bytes() == {0: 6 * GIB, 1: 6 * GIB} and pool.used_bytes() == GIB
    await pool.acquire("split")  # short on both GPUs: g1 (older), then g0b
    assert log[-3:] == ["close g1", "close g0b", "start split"]
    assert {m["id"]: m["state"] for m in pool.status()}["cpu"] == "loaded"
    assert pool.status()[4]["gpu_memory_bytes"] == {0: 5 * GIB, 1: 5 * GIB}
    with pytest.raises(Overloaded, match="GPU 0 memory"):
        await pool.acquire("g0")  # split holds GPU 0 and is in use
    huge = Pool([spec("h", [], need=0, gpu_bytes={1: 40 * GIB})], gpu_budget={1: 10 * GIB})
    with pytest.raises(InvalidRequest, match=r"40\.0 GiB of GPU 1 memory.*10\.0 GiB"):
        await huge.acquire("h")


async def test_keep_alive_unloads_an_idle_model_and_a_request_can_set_it():
    log: list[str] = []
    pool = Pool([spec("a", log, keep_alive=0.05), spec("b", log)])
    await pool.acquire("a")
    await asyncio.sleep(0.1)
    assert pool.status()[0]["state"] == "loaded"  # in use: never unloaded
    pool.release("a")
    assert pool.status()[0]["expires_at"] is not None
    await asyncio.sleep(0.15)
    assert pool.status()[0]["state"] == "unloaded" and log[-1] == "close a"
    await pool.acquire("b", keep_alive=0)  # Ollama's keep_alive: 0 unloads once idle
    pool.release("b")
    await asyncio.sleep(0.02)
    assert pool.status()[1]["state"] == "unloaded"
    await pool.acquire("a", keep_alive=3600)
    pool.release("a")
    await asyncio.sleep(0.1)
    assert pool.status()[0]["state"] == "loaded" and pool.status()[0]["keep_alive_s"] == 3600
    with pytest.raises(InvalidRequest) as err:
        await pool.acquire("a", keep_alive=-1)
    assert err.value.param == "keep_alive"
    await pool.close()


async def test_admin_load_and_unload():
    log: list[str] = []
    pool = Pool([spec("a", log), spec("b", log)])
    await pool.load("b")
    assert pool.status()[1]["state"] == "loaded" and pool.status()[1]["in_flight"] == 0
    await pool.acquire("b")
    assert await pool.unload("b") is False  # requests in flight
    pool.release("b")
    assert await pool.unload("b") is True
    assert pool.status()[1]["state"] == "unloaded" and log == ["start b", "close b"]
