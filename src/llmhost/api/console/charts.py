"""The console's live charts: a ring buffer of rates sampled every few seconds from the app's
own Prometheus counters (no Prometheus server involved), and the geometry of each chart's SVG
line, which the page's template draws."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from llmhost.observability.metrics import Metrics

T = TypeVar("T")  # the counters at one moment
S = TypeVar("S")  # the rates over an interval
SAMPLE_EVERY_S = 5.0
KEEP = 120  # samples: ten minutes at one per 5 s
WIDTH, HEIGHT, PAD = 320, 90, 4


@dataclass(frozen=True)
class Totals:
    """The counters' values at one moment."""

    at: float
    requests: float
    errors: float  # responses with status >= 400
    ttft_sum: float
    ttft_count: float
    tokens: float
    load: float | None = None  # requests the engines hold now (see Sampler)


@dataclass(frozen=True)
class Sample:
    """Rates over the interval that ended at `at`."""

    at: float
    requests_per_s: float
    ttft_ms: float | None  # mean TTFT of the requests whose first token came in the interval
    tokens_per_s: float
    errors_per_s: float
    load: float | None = None  # requests the engines held at the interval's end


def read_totals(metrics: Metrics, now: float) -> Totals:
    """The request, error, TTFT and token counters summed over their labels (a handful of
    series: routes x models x statuses, all bounded)."""
    requests = errors = ttft_sum = ttft_count = tokens = 0.0
    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                requests += s.value
                if s.labels.get("status", "").isdigit() and int(s.labels["status"]) >= 400:
                    errors += s.value
    for family in metrics.ttft.collect():
        for s in family.samples:
            if s.name.endswith("_sum"):
                ttft_sum += s.value
            elif s.name.endswith("_count"):
                ttft_count += s.value
    for family in metrics.completion_tokens.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                tokens += s.value
    return Totals(now, requests, errors, ttft_sum, ttft_count, tokens)


def rates(before: Totals, after: Totals) -> Sample:
    dt = max(after.at - before.at, 1e-6)
    ttft_n = after.ttft_count - before.ttft_count
    ttft_ms = (after.ttft_sum - before.ttft_sum) / ttft_n * 1000 if ttft_n > 0 else None
    return Sample(
        at=after.at,
        requests_per_s=(after.requests - before.requests) / dt,
        ttft_ms=ttft_ms,
        tokens_per_s=(after.tokens - before.tokens) / dt,
        errors_per_s=(after.errors - before.errors) / dt,
        load=after.load,
    )


class RateSampler(Generic[T, S]):
    """Reads counters every `every` seconds (`read`) and keeps the rates between two readings
    (`rates`), the last `KEEP` of them."""

    def __init__(
        self,
        read: Callable[[float], T],
        rates: Callable[[T, T], S],
        every: float = SAMPLE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read = read
        self.rates = rates
        self.every = every
        self.clock = clock
        self.samples: deque[S] = deque(maxlen=KEEP)
        self._last: T | None = None

    def tick(self) -> None:
        now = self.read(self.clock())
        if self._last is not None:
            self.samples.append(self.rates(self._last, now))
        self._last = now

    async def run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self.every)


class Sampler(RateSampler[Totals, Sample]):
    """Samples a server's `metrics`, and `load` (the requests its engines hold now: decoding,
    queued or waiting for their model to load) when given."""

    def __init__(
        self,
        metrics: Metrics,
        every: float = SAMPLE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        load: Callable[[], float] | None = None,
    ) -> None:
        def read(now: float) -> Totals:
            totals = read_totals(metrics, now)
            return totals if load is None else replace(totals, load=load())

        super().__init__(read, rates, every, clock)
        self.metrics = metrics


@dataclass(frozen=True)
class Chart:
    """One chart as the template draws it: a polyline's points in a WIDTH x HEIGHT box."""

    key: str
    title: str
    unit: str
    points: str  # "x,y x,y ...", empty while there is nothing to draw
    latest: str
    peak: str


SERIES: tuple[tuple[str, str, str, Callable[[Sample], float | None]], ...] = (
    ("requests", "Requests", "req/s", lambda s: s.requests_per_s),
    ("ttft", "Time to first token", "ms", lambda s: s.ttft_ms),
    ("tokens", "Output tokens", "tok/s", lambda s: s.tokens_per_s),
    ("errors", "Errors (status 4xx and 5xx)", "err/s", lambda s: s.errors_per_s),
    ("load", "Engine load (requests held)", "requests", lambda s: s.load),
)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.2f}"


def chart(key: str, title: str, unit: str, values: list[float | None]) -> Chart:
    """The chart of `values`, oldest first, one x step per slot of the ring buffer so that
    the line fills the box from the right as samples arrive; gaps (None) are skipped."""
    known = [v for v in values if v is not None]
    peak = max(known, default=0.0)
    scale = peak if peak > 0 else 1.0
    step = (WIDTH - 2 * PAD) / max(KEEP - 1, 1)
    x0 = WIDTH - PAD - step * (len(values) - 1)
    pts = []
    for i, v in enumerate(values):
        if v is None:
            continue
        x = x0 + i * step
        y = HEIGHT - PAD - (v / scale) * (HEIGHT - 2 * PAD)
        pts.append(f"{x:.1f},{y:.1f}")
    latest = next((v for v in reversed(values) if v is not None), None)
    return Chart(key, title, unit, " ".join(pts), _fmt(latest), _fmt(peak if known else None))


def charts(samples: deque[Sample] | list[Sample]) -> list[Chart]:
    data = list(samples)
    return [chart(key, title, unit, [get(s) for s in data]) for key, title, unit, get in SERIES]
