"""The console's parts on their own: rates sampled from the metrics' counters into a bounded
ring buffer and drawn inside the chart's box, sessions bounded, expiring and ended, the
audit page's filters read or refused, and the playground's stream timed as it goes by."""

from __future__ import annotations

import json

from llmhost.api.console.audit import MAX_PAGE, AuditQuery
from llmhost.api.console.charts import HEIGHT, KEEP, WIDTH, Sampler, chart, charts
from llmhost.api.console.proxy import StreamTimer
from llmhost.api.console.sessions import MAX_SESSIONS, Sessions
from llmhost.observability.metrics import Metrics
from llmhost.security.auth import Principal
from llmhost.types import Usage


def _sse(chunk: dict | str) -> bytes:
    return b"data: " + (chunk if isinstance(chunk, str) else json.dumps(chunk)).encode() + b"\n\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sampler_turns_counters_into_rates():
    m = Metrics(gpu=False)
    clock = Clock()
    sampler = Sampler(m, every=5, clock=clock)
    sampler.tick()
    assert not sampler.samples  # one reading is no rate yet
    for status in ("200", "200", "200", "500", "401"):
        m.requests.labels("/v1/chat/completions", "a", status).inc()
    m.ttft.labels("a").observe(0.1)
    m.ttft.labels("a").observe(0.3)
    m.observe_finish("a", 1.0, Usage(3, 50))
    clock.now += 5
    sampler.tick()
    (s,) = sampler.samples
    assert s.requests_per_s == 1.0
    assert s.errors_per_s == 2 / 5
    assert abs(s.ttft_ms - 200) < 1e-6
    assert s.tokens_per_s == 10.0
    clock.now += 5
    sampler.tick()  # nothing happened: zero rates, no TTFT
    assert sampler.samples[-1].requests_per_s == 0 and sampler.samples[-1].ttft_ms is None
    for _ in range(KEEP * 2):
        clock.now += 5
        sampler.tick()
    assert len(sampler.samples) == KEEP


def test_sampler_reads_the_engine_load_at_each_tick():
    m = Metrics(gpu=False)
    clock = Clock()
    held = [0.0]
    sampler = Sampler(m, every=5, clock=clock, load=lambda: held[0])
    sampler.tick()
    for n in (3.0, 7.0, 0.0):
        held[0] = n
        clock.now += 5
        sampler.tick()
    assert [s.load for s in sampler.samples] == [3.0, 7.0, 0.0]
    by_key = {c.key: c for c in charts(sampler.samples)}
    assert by_key["load"].peak == "7.00" and by_key["load"].latest == "0.00"
    assert [c.key for c in charts(sampler.samples)] == [
        "requests",
        "ttft",
        "tokens",
        "errors",
        "load",
    ]
    without = Sampler(m, every=5, clock=clock)  # no load to read: that chart stays empty
    without.tick()
    clock.now += 5
    without.tick()
    assert without.samples[-1].load is None
    assert {c.key: c for c in charts(without.samples)}["load"].points == ""


def test_chart_points_stay_in_the_box_and_gaps_are_skipped():
    c = chart("ttft", "TTFT", "ms", [None, 5.0, 0.0, None, 20.0])
    points = [tuple(map(float, p.split(","))) for p in c.points.split()]
    assert len(points) == 3
    for x, y in points:
        assert 0 <= x <= WIDTH and 0 <= y <= HEIGHT
    assert points[-1][0] > points[0][0]  # newest on the right
    assert min(y for _, y in points) == points[-1][1]  # the peak is highest
    assert c.latest == "20.00" and c.peak == "20.00"
    empty = chart("ttft", "TTFT", "ms", [None, None])
    assert empty.points == "" and empty.latest == "-" and empty.peak == "-"
    assert [c.key for c in charts([])] == ["requests", "ttft", "tokens", "errors", "load"]


def test_sessions_expire_end_and_stay_bounded():
    clock = Clock()
    sessions = Sessions(60, clock=clock)
    admin = Principal("root", "admin")
    sid, session = sessions.start(admin)
    assert sessions.get(sid) is session
    assert sessions.get(sid + "x") is None and sessions.get("") is None
    assert sessions.get("a" * 1000) is None
    clock.now += 61
    assert sessions.get(sid) is None
    sid, _ = sessions.start(admin)
    sessions.end(sid)
    assert sessions.get(sid) is None
    first, _ = sessions.start(admin)
    for _ in range(MAX_SESSIONS + 10):
        sessions.start(admin)
    assert len(sessions) == MAX_SESSIONS
    assert sessions.get(first) is None  # the oldest made room
    # expired sessions are swept when a new one starts
    clock.now += 61
    sessions.start(admin)
    assert len(sessions) == 1


def test_csrf_tokens_differ_per_session_and_are_compared_whole():
    sessions = Sessions(60)
    _, a = sessions.start(Principal("root", "admin"))
    _, b = sessions.start(Principal("root", "admin"))
    assert a.csrf != b.csrf and len(a.csrf) >= 40
    assert a.csrf_ok(a.csrf)
    assert not a.csrf_ok(b.csrf) and not a.csrf_ok(None) and not a.csrf_ok(a.csrf[:-1])


def test_audit_filters_are_read_bounded_or_refused():
    q = AuditQuery.from_params(
        {"user": " bob ", "status": "200", "since": "2026-01-31T13:45", "page": "3"}
    )
    assert q.error is None and q.user == "bob" and q.page == 3
    assert q.url(4) == "?user=bob&status=200&since=2026-01-31T13%3A45&page=4"
    assert AuditQuery.from_params({"user": "u" * 1000}).user == "u" * 128
    assert AuditQuery.from_params({"page": "9999"}).page == MAX_PAGE
    assert AuditQuery.from_params({"page": "-1"}).page == 1
    assert AuditQuery.from_params({"status": "abc"}).error
    assert AuditQuery.from_params({"status": "999"}).error
    assert AuditQuery.from_params({"until": "yesterday"}).error


def test_stream_timer_times_generated_pieces_only():
    role = _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    piece = _sse({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    tool = _sse({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]})
    usage = _sse({"choices": [], "usage": {"completion_tokens": 3}})
    timer = StreamTimer(start=10.0)
    timer.feed(role, 10.001)  # the role alone is no output
    assert timer.first is None
    timer.feed(piece[:9], 10.002)  # an event split across body messages counts when whole
    assert timer.first is None
    timer.feed(piece[9:] + piece, 10.004)
    timer.feed(b"data: {not json}\n\n" + b": a comment\n\n", 10.005)
    timer.feed(tool, 10.009)
    timer.feed(usage + _sse("[DONE]"), 10.020)
    assert (timer.first, timer.last) == (10.004, 10.009)
    event = timer.event()
    assert event.startswith(b"event: timing\ndata: ") and event.endswith(b"\n\n")
    times = json.loads(event.split(b"data: ", 1)[1])
    assert times == {"first_token_ms": 4.0, "decode_ms": 5.0}


def test_stream_timer_of_a_stream_with_nothing_generated():
    timer = StreamTimer(start=1.0)
    timer.feed(_sse({"error": {"message": "overloaded"}}) + _sse("[DONE]"), 1.5)
    assert json.loads(timer.event().split(b"data: ", 1)[1]) == {
        "first_token_ms": None,
        "decode_ms": None,
    }
