"""The metrics registry on its own: names and types, TPOT arithmetic, the GPU collector with a
fake NVML (GPUs present, readings unsupported, no driver at all)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from llmhost.observability.gpu import GpuCollector, Nvml
from llmhost.observability.metrics import Metrics
from llmhost.types import EngineHealth, Usage


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """Two GPUs; the second reports neither power nor temperature (as some boards do)."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail_init: bool = False):
        self.fail_init = fail_init
        self.inits = 0

    def nvmlInit(self):
        self.inits += 1
        if self.fail_init:
            raise FakeNvmlError("Driver Not Loaded")

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA A100-SXM4-80GB" if h == 0 else "NVIDIA L40S"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h:04d}"

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=[87, 5][h], memory=40)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=[76 << 30, 2 << 30][h], total=[80 << 30, 48 << 30][h])

    def nvmlDeviceGetTemperature(self, h, sensor):
        if h == 1:
            raise FakeNvmlError("Not Supported")
        return 64

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise FakeNvmlError("Not Supported")
        return 312_500  # milliwatts

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"


def samples(metrics: Metrics) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def one(found: dict, metric: str, **labels) -> float:
    hits = [s.value for s in found[metric] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (metric, labels, found.get(metric))
    return hits[0]


def test_gpu_collector_with_fake_nvml():
    nv = FakeNvml()
    m = Metrics(nvml=nv)
    found = samples(m)
    assert one(found, "llmhost_gpu_count") == 2
    assert one(found, "llmhost_gpu_utilization_ratio", gpu="0") == 0.87
    assert one(found, "llmhost_gpu_utilization_ratio", gpu="1", name="NVIDIA L40S") == 0.05
    assert one(found, "llmhost_gpu_memory_used_bytes", gpu="0", uuid="GPU-0000") == 76 << 30
    assert one(found, "llmhost_gpu_memory_total_bytes", gpu="1") == 48 << 30
    assert one(found, "llmhost_gpu_power_watts", gpu="0") == 312.5
    assert one(found, "llmhost_gpu_temperature_celsius", gpu="0") == 64
    # unsupported readings are absent, not zero
    assert [s.labels["gpu"] for s in found["llmhost_gpu_power_watts"]] == ["0"]
    assert [s.labels["gpu"] for s in found["llmhost_gpu_temperature_celsius"]] == ["0"]
    samples(m)
    assert nv.inits == 1  # NVML is initialised once, not per scrape
    assert Nvml(nv).driver_version() == "550.54.15"


def test_no_gpu_is_a_state_not_an_error():
    m = Metrics(nvml=FakeNvml(fail_init=True))
    found = samples(m)
    assert one(found, "llmhost_gpu_count") == 0
    assert not any(
        name.startswith("llmhost_gpu_") and name != "llmhost_gpu_count" for name in found
    )
    nv = Nvml(FakeNvml(fail_init=True))
    assert nv.readings() == [] and "Driver Not Loaded" in nv.unavailable
    assert GpuCollector(nv).nvml is nv


def test_host_process_and_build_metrics():
    found = samples(Metrics(nvml=FakeNvml(fail_init=True), engine_name="llamacpp"))
    assert one(found, "llmhost_build_info", engine="llamacpp") == 1
    assert (
        one(found, "llmhost_system_memory_total_bytes")
        > one(found, "llmhost_system_memory_available_bytes")
        > 0
    )
    assert one(found, "llmhost_system_cpu_count") >= 1
    assert one(found, "llmhost_system_load1") >= 0
    assert one(found, "process_resident_memory_bytes") > 10 << 20
    assert "process_cpu_seconds_total" in found
    assert one(found, "llmhost_system_swap_total_bytes") >= 0


def test_tpot_and_tokens_and_engine_stats():
    m = Metrics(nvml=FakeNvml(fail_init=True))
    m.observe_finish("m", 0.9, Usage(prompt_tokens=7, completion_tokens=10))
    m.observe_finish("m", 0.0, Usage(prompt_tokens=3, completion_tokens=1))  # no TPOT from 1
    stats: dict = {"running": 3, "waiting": 1, "slots": 8}
    health: list = [EngineHealth(ok=True, stats=stats)]
    m.watch_engine(lambda: health[0])
    found = samples(m)
    assert one(found, "llmhost_time_per_output_token_seconds_count", model="m") == 1
    assert abs(one(found, "llmhost_time_per_output_token_seconds_sum", model="m") - 0.1) < 1e-9
    assert one(found, "llmhost_prompt_tokens_total", model="m") == 10
    assert one(found, "llmhost_completion_tokens_total", model="m") == 11
    assert one(found, "llmhost_requests_running") == 3
    assert one(found, "llmhost_requests_waiting") == 1
    assert one(found, "llmhost_engine_slots") == 8
    assert one(found, "llmhost_engine_up") == 1
    assert "llmhost_engine_kv_cache_usage_ratio" not in found  # this engine does not know it
    stats.clear()
    assert "llmhost_requests_running" not in samples(m)
    health[0] = None  # loading: down, and no load figures
    found = samples(m)
    assert one(found, "llmhost_engine_up") == 0 and "llmhost_engine_slots" not in found


def test_prompt_cache_statistics_become_counters_and_gauges():

    metrics = Metrics()
    stats = {
        "prefix_cache_queries": 40,
        "prefix_cache_hits": 12,
        "prefix_cache_requests_hit": 2,
        "prompt_cache_bytes": 1024,
        "prompt_cache_budget_bytes": 4096,
    }
    metrics.watch_engine(lambda: EngineHealth(ok=True, stats=stats))
    text = metrics.render().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["llmhost_prefix_cache_queries"].type == "counter"
    assert fams["llmhost_prefix_cache_hits"].samples[0].value == 12
    assert fams["llmhost_prefix_cache_requests_hit"].samples[0].value == 2
    assert fams["llmhost_prompt_cache_bytes"].samples[0].value == 1024
    assert fams["llmhost_prompt_cache_budget_bytes"].samples[0].value == 4096


def test_model_gauges_carry_the_model_and_each_gpu():
    m = Metrics(nvml=FakeNvml(fail_init=True))
    models = [
        {"id": "chat", "state": "loaded", "in_flight": 2, "waiting": 0, "memory_bytes": 5 << 30},
        {
            "id": "big",
            "state": "loaded",
            "in_flight": 0,
            "waiting": 1,
            "memory_bytes": 0,
            "gpu_memory_bytes": {0: 30 << 30, 1: 30 << 30},
        },
        {
            "id": "off",
            "state": "unloaded",
            "in_flight": 0,
            "waiting": 0,
            "memory_bytes": 1 << 30,
            "gpu_memory_bytes": {0: 1 << 30},
        },
    ]
    m.watch_models(lambda: models)
    found = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in found.values()
        for s in f.samples
        if s.name.startswith("llmhost_model_")
    }
    assert samples[("llmhost_model_in_flight", (("model", "chat"),))] == 2
    assert samples[("llmhost_model_memory_bytes", (("model", "off"),))] == 0  # unloaded
    gpu = "llmhost_model_gpu_memory_bytes"
    assert samples[(gpu, (("gpu", "1"), ("model", "big")))] == 30 << 30
    assert samples[(gpu, (("gpu", "0"), ("model", "off")))] == 0
    assert not any(k[0] == gpu and ("model", "chat") in k[1] for k in samples)
