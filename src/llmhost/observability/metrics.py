"""Prometheus metrics of one llmhost process, on a registry of its own (no global state):
requests, latency, TTFT/TPOT, tokens, engine load, limits, auth, audit lag, process, host
and GPU. The api layer feeds the recorders; everything read from elsewhere (engine stats,
psutil, NVML) is collected when Prometheus scrapes, so nothing polls in the background."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Mapping

import psutil
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    exposition,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmhost import __version__
from llmhost.observability.gpu import GpuCollector
from llmhost.types import EngineHealth, Usage

# generate_latest writes the 0.0.4 text format, which CONTENT_TYPE_LATEST names before
# prometheus-client 0.22; from 0.22 on it names 1.0.0 and the 0.0.4 one has a name of its own.
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

# Whole requests: a short completion takes tens of ms, a long CPU stream minutes.
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
# First token: the guide's latency target is 2 s, so resolve well below and above it.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)
# One output token: ~5 ms on a GPU, ~20-200 ms on a CPU under batching.
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
AUDIT_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)

StatsSource = Callable[[], Mapping[str, float] | None]


class _CallbackCollector(Collector):
    """Gauges whose values are read at scrape time from `source`; a missing key or a source
    that returns None leaves the gauge out rather than reporting a made-up zero."""

    def __init__(self, source: StatsSource, gauges: Iterable[tuple[str, str, str]]):
        self.source = source
        self.gauges = tuple(gauges)  # (metric name, key in the stats, help)

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(name, doc) for name, _, doc in self.gauges]

    def collect(self) -> Iterable[Metric]:
        yield from self._gauges(self.source())

    def _gauges(self, stats: Mapping[str, float] | None) -> Iterable[Metric]:
        if not stats:
            return
        for name, key, doc in self.gauges:
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))


ENGINE_UP = ("llmhost_engine_up", "1 when the model is loaded and the engine healthy.")
ENGINE_GAUGES = (
    ("llmhost_requests_running", "running", "Requests the engine is decoding."),
    ("llmhost_requests_waiting", "waiting", "Requests queued for a free slot."),
    ("llmhost_engine_slots", "slots", "Sequences the engine decodes together."),
    ("llmhost_engine_kv_cache_usage_ratio", "kv_cache_usage", "Share of the KV cache in use."),
    ("llmhost_prompt_cache_bytes", "prompt_cache_bytes", "Host memory held by cached prompts."),
    (
        "llmhost_prompt_cache_budget_bytes",
        "prompt_cache_budget_bytes",
        "Host memory cached prompts may hold.",
    ),
)
# Cumulative counts the engine keeps, exposed as counters (vLLM's prefix_cache_queries and
# prefix_cache_hits count tokens the same way).
ENGINE_COUNTERS = (
    (
        "llmhost_prefix_cache_queries",
        "prefix_cache_queries",
        "Prompt tokens looked up in the prompt cache.",
    ),
    (
        "llmhost_prefix_cache_hits",
        "prefix_cache_hits",
        "Prompt tokens found in the prompt cache, not prefilled again.",
    ),
    (
        "llmhost_prefix_cache_requests_hit",
        "prefix_cache_requests_hit",
        "Requests that reused at least one cached prompt token.",
    ),
)


class _EngineCollector(_CallbackCollector):
    """Whether the engine is up, and the load its health statistics report, from one read of
    its health per scrape (None while the model loads)."""

    def __init__(self, health: Callable[[], EngineHealth | None]):
        super().__init__(lambda: None, ENGINE_GAUGES)
        self.health = health

    def describe(self) -> Iterable[Metric]:
        counters = [CounterMetricFamily(name, doc) for name, _, doc in ENGINE_COUNTERS]
        return [GaugeMetricFamily(*ENGINE_UP), *super().describe(), *counters]

    def collect(self) -> Iterable[Metric]:
        h = self.health()
        yield GaugeMetricFamily(*ENGINE_UP, value=1.0 if h is not None and h.ok else 0.0)
        stats = None if h is None else h.stats
        yield from self._gauges(stats)
        for name, key, doc in ENGINE_COUNTERS:
            if stats and key in stats:
                yield CounterMetricFamily(name, doc, value=float(stats[key]))


MODEL_GAUGES = (
    ("llmhost_model_loaded", "1 while the model is loaded.", lambda m: m["state"] == "loaded"),
    ("llmhost_model_loading", "1 while the model loads.", lambda m: m["state"] == "loading"),
    ("llmhost_model_in_flight", "Requests holding the model.", lambda m: m["in_flight"]),
    ("llmhost_model_waiting", "Requests waiting for it to load.", lambda m: m["waiting"]),
    (
        "llmhost_model_memory_bytes",
        "Memory the model holds once loaded (estimate).",
        lambda m: m["memory_bytes"] if m["state"] != "unloaded" else 0,
    ),
)


class _ModelCollector(Collector):
    """Per-model state of the server's models (loaded on demand), one read per scrape."""

    def __init__(self, status: Callable[[], list[dict]]):
        self.status = status

    def describe(self) -> Iterable[Metric]:
        out = [GaugeMetricFamily(name, doc, labels=["model"]) for name, doc, _ in MODEL_GAUGES]
        return [*out, self._gpu_family()]

    @staticmethod
    def _gpu_family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "llmhost_model_gpu_memory_bytes",
            "GPU memory the model holds once loaded (estimate), per GPU.",
            labels=["model", "gpu"],
        )

    def collect(self) -> Iterable[Metric]:
        models = self.status()
        for name, doc, value in MODEL_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for m in models:
                family.add_metric([m["id"]], float(value(m)))
            yield family
        gpu = self._gpu_family()
        for m in models:
            for index, n in (m.get("gpu_memory_bytes") or {}).items():
                gpu.add_metric([m["id"], str(index)], float(n if m["state"] != "unloaded" else 0))
        yield gpu


def host_stats() -> dict[str, float]:
    """System memory, swap and load average, as the guide's psutil metrics."""
    mem = psutil.virtual_memory()
    swap = psutil.swap_memory()
    load1, load5, load15 = psutil.getloadavg()
    return {
        "memory_total": mem.total,
        "memory_available": mem.available,
        "swap_total": swap.total,
        "swap_used": swap.used,
        "load1": load1,
        "load5": load5,
        "load15": load15,
        "cpus": psutil.cpu_count() or os.cpu_count() or 1,
    }


HOST_GAUGES = (
    ("llmhost_system_memory_total_bytes", "memory_total", "Host memory."),
    (
        "llmhost_system_memory_available_bytes",
        "memory_available",
        "Host memory available without swapping.",
    ),
    ("llmhost_system_swap_total_bytes", "swap_total", "Swap space."),
    ("llmhost_system_swap_used_bytes", "swap_used", "Swap in use."),
    ("llmhost_system_load1", "load1", "Load average over 1 minute."),
    ("llmhost_system_load5", "load5", "Load average over 5 minutes."),
    ("llmhost_system_load15", "load15", "Load average over 15 minutes."),
    ("llmhost_system_cpu_count", "cpus", "Logical CPUs of the host."),
)


class Metrics:
    """All metrics of one server. Names follow Prometheus conventions: `llmhost_` prefix,
    base units (`_seconds`, `_bytes`), `_total` on counters."""

    def __init__(self, *, engine_name: str = "", nvml=None, gpu: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        self._add_request_metrics()
        self._add_edge_metrics()
        self._add_audit_metrics()
        self._add_process_metrics(engine_name, nvml, gpu)

    def _add_request_metrics(self) -> None:
        """Requests, their latency, TTFT, TPOT and tokens (fed by the api layer)."""
        r = self.registry
        self.requests = Counter(
            "llmhost_requests",
            "HTTP requests answered, by route, model and status code.",
            ["route", "model", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "llmhost_request_duration_seconds",
            "Time from request to last byte of the response (streams included).",
            ["route", "model", "stream"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llmhost_time_to_first_token_seconds",
            "Time from request to the first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "llmhost_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llmhost_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "llmhost_completion_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.in_flight = Gauge(
            "llmhost_http_requests_in_flight",
            "Generation requests being answered now (waiting or running).",
            registry=r,
        )

    def _add_edge_metrics(self) -> None:
        """Refusals at the edge: rate limits and failed authentication."""
        r = self.registry
        self.rate_limited = Counter(
            "llmhost_rate_limit_rejections",
            "Requests refused with 429, by the limit that refused them.",
            ["limit"],
            registry=r,
        )
        for scope in ("instance", "user_requests", "user_tokens", "auth_failures", "model"):
            self.rate_limited.labels(scope)  # present at 0, so rate() sees the first refusal
        self.auth_failures = Counter(
            "llmhost_auth_failures", "Requests refused with 401.", registry=r
        )

    def _add_audit_metrics(self) -> None:
        """Audit records written and dropped, and how long they waited."""
        r = self.registry
        self.audit_records = Counter(
            "llmhost_audit_records_written", "Audit records written.", registry=r
        )
        self.audit_dropped = Counter(
            "llmhost_audit_records_dropped",
            "Audit records that could not be written after every retry (each is logged).",
            registry=r,
        )
        self.audit_lag = Histogram(
            "llmhost_audit_write_lag_seconds",
            "Time an audit record waited in memory before it was stored.",
            buckets=AUDIT_LAG_BUCKETS,
            registry=r,
        )

    def _add_process_metrics(self, engine_name: str, nvml, gpu: bool) -> None:
        """The build, the process, the host, and the GPUs (unless `gpu` is off)."""
        r = self.registry
        build = Gauge(
            "llmhost_build_info",
            "Version of llmhost and of the Python running it.",
            ["version", "python", "engine"],
            registry=r,
        )
        build.labels(__version__, platform.python_version(), engine_name).set(1)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total
        r.register(_CallbackCollector(host_stats, HOST_GAUGES))
        if gpu:
            r.register(GpuCollector(nvml))

    # --- sources read at scrape time -------------------------------------------------------

    def watch_engine(self, health: Callable[[], EngineHealth | None]) -> None:
        """Engine up/down and load (running, waiting, slots, KV usage) from its health."""
        self.registry.register(_EngineCollector(health))

    def watch_models(self, status: Callable[[], list[dict]]) -> None:
        """Each model's state, requests and memory (the model pool's status)."""
        self.registry.register(_ModelCollector(status))

    def watch_audit_queue(self, length: Callable[[], int]) -> None:
        Gauge(
            "llmhost_audit_queue_length",
            "Audit records waiting to be written.",
            registry=self.registry,
        ).set_function(lambda: float(length()))

    # --- recorders ---------------------------------------------------------------------------

    def observe_audit_write(self, records: int, oldest_wait_s: float) -> None:
        self.audit_records.inc(records)
        self.audit_lag.observe(oldest_wait_s)

    def observe_finish(self, model: str, decode_s: float, usage: Usage) -> None:
        """A generation finished; `decode_s` runs from its first token to its last."""
        if usage.completion_tokens > 1:
            self.tpot.labels(model).observe(decode_s / (usage.completion_tokens - 1))
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.completion_tokens.labels(model).inc(usage.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
