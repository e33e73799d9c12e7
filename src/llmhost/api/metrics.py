"""Request metrics at the edge of the app, and the `/metrics` endpoint's body.

The middleware counts every response by route, model and status and times it to its last
byte, so a stream is measured whole; TTFT, TPOT and tokens come from the serving layer."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send

from llmhost.api.audit import AUDITED, ResponseOutcome
from llmhost.api.cors import is_preflight
from llmhost.api.record import request_record
from llmhost.observability.metrics import Metrics

METRICS_PATH = "/metrics"


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]):
        self.app = app
        self.metrics = metrics
        # Only known paths become label values: a scanner probing random URLs must not create
        # a time series per URL.
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A preflight is the browser asking, not an API request: with CORS on it never gets
        # here, with CORS off it is refused and must not count as a client error.
        if scope["type"] != "http" or is_preflight(scope):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else "other"
        generation = path in AUDITED
        t0 = time.perf_counter()
        outcome = ResponseOutcome(send)
        if generation:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, outcome)
        finally:
            if generation:
                self.metrics.in_flight.dec()
            status = outcome.final_status
            rec = request_record(scope)
            model = rec.model
            stream = "true" if rec.stream else "false"
            m = self.metrics
            m.requests.labels(route, model, str(status)).inc()
            m.request_seconds.labels(route, model, stream).observe(time.perf_counter() - t0)
