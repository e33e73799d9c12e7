"""Load generator for any OpenAI-compatible server, reporting the serving-benchmark figures
used by vLLM: TTFT, TPOT, ITL and end-to-end latency (mean, p50/p90/p99), output tokens/s,
requests/s and goodput against SLOs.

Closed loop: N workers each send their next request when the previous one finishes.
Open loop: requests arrive as a Poisson process at a given rate, whatever the server's state.
Every request streams (`ignore_eos`) so token timings are seen as the client sees them.

Workloads: `random` sends a fresh prompt per request to `/v1/completions`; `multi-turn`,
`shared-prefix` and `sharegpt` talk to `/v1/chat/completions` with a system prompt shared by
all requests, conversations growing turn by turn with the answers streamed back (or, for
ShareGPT, optionally the file's own answers), so that prompt caching shows in the figures.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import secrets
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from llmhost.errors import ConfigError, InvalidRequest, ServiceUnavailable

_WORDS = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "be",
    "are",
    "or",
    "it",
    "an",
    "was",
    "have",
    "not",
    "which",
    "but",
    "all",
    "can",
    "more",
    "one",
    "has",
    "their",
    "will",
    "about",
    "been",
    "other",
    "its",
    "time",
    "up",
    "out",
    "so",
    "what",
)


def make_prompt(n_words: int, seed: int | str) -> str:
    """A deterministic prompt of about `n_words` tokens. Each request gets its own seed, and
    each run its own nonce, so no server can answer from a prompt cache warmed by an earlier
    run (llama-server keeps one)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    turn: int | None = None  # 1-based turn of a conversation; None outside conversations
    text: str = ""  # the streamed answer (chat workloads)

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class BenchConfig:
    url: str
    model: str | None = None
    prompt_tokens: int = 32
    output_tokens: int = 64
    temperature: float = 1.0
    api_key: str | None = None
    timeout: float = 600.0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = None
    system_tokens: int = 512  # chat workloads: length of the shared system prompt (words)
    cache_prompt: bool = True  # False: each request sends `cache_prompt: false`
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _dist(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    v = [x * scale for x in values]
    return {
        "mean": statistics.fmean(v) if v else float("nan"),
        "p50": _pct(v, 50),
        "p90": _pct(v, 90),
        "p99": _pct(v, 99),
    }


def summarize(results: list[RequestResult], duration: float, cfg: BenchConfig) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    good = [r for r in ok if _meets_slo(r, cfg)]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "goodput": len(good) / duration if duration else 0.0,
        "ttft_ms": _dist([r.ttft for r in ok]),
        "tpot_ms": _dist([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _dist([x for r in ok for x in r.itl]),
        "e2e_ms": _dist([r.e2e for r in ok]),
        **({"ttft_by_turn_ms": ttft_by_turn(ok)} if any(r.turn for r in ok) else {}),
    }


def ttft_by_turn(results: list[RequestResult]) -> list[dict]:
    """TTFT p50/p90 of each conversation turn (1..T): with a prompt cache the later turns,
    whose prompt is mostly the earlier ones, should not slow down as the history grows."""
    by: dict[int, list[float]] = {}
    for r in results:
        if r.ok and r.turn:
            by.setdefault(r.turn, []).append(r.ttft * 1000)
    return [
        {"turn": t, "n": len(v), "p50": _pct(v, 50), "p90": _pct(v, 90)}
        for t, v in sorted(by.items())
    ]


def _meets_slo(r: RequestResult, cfg: BenchConfig) -> bool:
    tpot = r.tpot or 0.0
    return not (
        (cfg.slo_ttft_ms is not None and r.ttft * 1000 > cfg.slo_ttft_ms)
        or (cfg.slo_tpot_ms is not None and tpot * 1000 > cfg.slo_tpot_ms)
        or (cfg.slo_e2e_ms is not None and r.e2e * 1000 > cfg.slo_e2e_ms)
    )


# --- conversations ---------------------------------------------------------------------------


@dataclass
class Conversation:
    """A system prompt and the user turns; `answers` from a file, when given, replace the
    generated ones in the history sent with the following turns."""

    system: str
    users: list[str]
    answers: list[str] | None = None

    def messages(self, turn: int, history: list[str]) -> list[dict]:
        """The messages of 0-based `turn`: system, then every earlier user turn followed by
        its answer (`history[i]`, or the file's), then this turn's user message."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for i in range(turn):
            answer = self.answers[i] if self.answers is not None else history[i]
            out.append({"role": "user", "content": self.users[i]})
            out.append({"role": "assistant", "content": answer})
        out.append({"role": "user", "content": self.users[turn]})
        return out


def build_conversations(
    n: int, turns: int, system_tokens: int, user_tokens: int, seed: int | str
) -> list[Conversation]:
    """`n` conversations of `turns` user messages of about `user_tokens` words, all behind one
    system prompt of about `system_tokens` words; deterministic from `seed`."""
    system = make_prompt(system_tokens, f"{seed}-system") if system_tokens else ""
    return [
        Conversation(
            system,
            [
                f"Question {c}.{t}: " + make_prompt(user_tokens, f"{seed}-{c}-{t}")
                for t in range(turns)
            ],
        )
        for c in range(n)
    ]


MAX_SHAREGPT_BYTES = 1 << 30
_HUMAN = {"human", "user"}
_GPT = {"gpt", "assistant", "chatgpt", "bard", "bing"}


def parse_sharegpt(
    data: object, max_conversations: int, max_turns: int
) -> tuple[list[Conversation], int]:
    """ShareGPT records (`[{"conversations": [{"from": ..., "value": ...}, ...]}, ...]`) as
    conversations of at most `max_turns` user turns, the first `max_conversations` usable ones;
    returns them and how many records were skipped as malformed (or holding no user turn)."""
    if not isinstance(data, list):
        raise ConfigError("a ShareGPT file holds a JSON list of {'conversations': [...]}")
    out: list[Conversation] = []
    skipped = 0
    for rec in data:
        if len(out) >= max_conversations:
            break
        conv = _sharegpt_record(rec, max_turns)
        if conv is None:
            skipped += 1
        else:
            out.append(conv)
    return out, skipped


def _sharegpt_record(rec: object, max_turns: int) -> Conversation | None:
    msgs = rec.get("conversations") if isinstance(rec, dict) else None
    if not isinstance(msgs, list) or not msgs:
        return None
    system: list[str] = []
    users: list[str] = []
    answers: list[str] = []
    for m in msgs:
        if not isinstance(m, dict):
            return None
        role, value = m.get("from"), m.get("value")
        if not isinstance(role, str) or not isinstance(value, str):
            return None
        role = role.lower()
        if role == "system":
            system.append(value)
        elif role in _HUMAN:
            if len(users) > len(answers):  # two user messages in a row: one turn
                users[-1] += "\n" + value
            else:
                users.append(value)
        elif role in _GPT:
            if len(users) > len(answers):
                answers.append(value)
            elif answers:  # two answers in a row: one answer
                answers[-1] += "\n" + value
            # an answer before any user turn (a greeting) is dropped
        else:
            return None
    if not users or any(not u.strip() for u in users):
        return None
    users = users[:max_turns]
    answers = (answers + [""] * len(users))[: len(users)]
    return Conversation("\n".join(system), users, answers)


def load_sharegpt(
    path: str | Path, max_conversations: int, max_turns: int, max_bytes: int = MAX_SHAREGPT_BYTES
) -> tuple[list[Conversation], int]:
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ConfigError(f"--sharegpt {path}: {exc.strerror or exc}") from exc
    if size > max_bytes:
        raise ConfigError(
            f"--sharegpt {path}: {size} bytes, more than the {max_bytes} bytes read at most; "
            "cut the file down first"
        )
    try:
        data = json.loads(p.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--sharegpt {path}: not readable JSON: {exc}") from exc
    convs, skipped = parse_sharegpt(data, max_conversations, max_turns)
    if not convs:
        raise ConfigError(f"--sharegpt {path}: no usable conversation ({skipped} malformed)")
    return convs, skipped


class Bench:
    """Runs load against one server."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(timeout=cfg.timeout, headers=headers, limits=limits)
        self._seed = 0
        self._runs = 0  # each run of a chat scenario gets prompts of its own
        self._sharegpt: dict[tuple, list[Conversation]] = {}

    async def __aenter__(self) -> Bench:
        if self.cfg.model is None:
            self.cfg.model = await self._first_model()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def _first_model(self) -> str:
        try:
            r = await self.client.get(self.base + "/models")
            r.raise_for_status()
            return r.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise ServiceUnavailable(f"cannot list models at {self.base}/models: {exc}") from exc

    async def one(self) -> RequestResult:
        self._seed += 1
        body = {
            "model": self.cfg.model,
            "prompt": make_prompt(self.cfg.prompt_tokens, f"{self.cfg.nonce}-{self._seed}"),
        }
        return await self._stream("/completions", body)

    async def chat(self, messages: list[dict], turn: int | None = None) -> RequestResult:
        """One streamed chat completion; the answer's text comes back in `.text`."""
        res = await self._stream(
            "/chat/completions", {"model": self.cfg.model, "messages": messages}
        )
        res.turn = turn
        return res

    async def _stream(self, path: str, body: dict) -> RequestResult:
        body |= {
            "max_tokens": self.cfg.output_tokens,
            "temperature": self.cfg.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if not self.cfg.cache_prompt:  # sent only when asked: older servers refuse the field
            body["cache_prompt"] = False
        res = RequestResult(ok=False)
        start = time.perf_counter()
        last = None
        chunks = 0
        parts: list[str] = []
        try:
            async with self.client.stream("POST", self.base + path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    res.error = f"HTTP {r.status_code}: {r.text[:200]}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        res.error = str(obj["error"].get("message", obj["error"]))[:200]
                        return res
                    if obj.get("usage"):
                        res.prompt_tokens = obj["usage"].get("prompt_tokens", 0)
                        res.output_tokens = obj["usage"].get("completion_tokens", 0)
                    choices = obj.get("choices") or []
                    if not choices:
                        continue
                    c = choices[0]
                    piece = c.get("text") or (c.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                        parts.append(piece)
        except httpx.HTTPError as exc:
            res.error = f"{type(exc).__name__}: {exc}"
            return res
        res.e2e = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.text = "".join(parts)
        res.ok = last is not None
        if not res.ok:
            res.error = "no tokens received"
        return res

    async def closed_loop(self, concurrency: int, n_requests: int) -> tuple[list, float]:
        results: list[RequestResult] = []
        remaining = n_requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                results.append(await self.one())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0

    async def open_loop(self, rate: float, n_requests: int, seed: int = 0) -> tuple[list, float]:
        if rate <= 0:
            raise InvalidRequest("the request rate must be positive")
        rng = random.Random(seed)
        tasks = []
        t0 = time.perf_counter()
        for _ in range(n_requests):
            tasks.append(asyncio.create_task(self.one()))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0

    async def conversations(self, convs: list[Conversation]) -> tuple[list, float]:
        """Every conversation at once, each one's turns in sequence; a failed turn ends its
        conversation (the next turn would lack the answer)."""
        results: list[RequestResult] = []

        async def talk(conv: Conversation) -> None:
            history: list[str] = []
            for t in range(len(conv.users)):
                res = await self.chat(conv.messages(t, history), turn=t + 1)
                results.append(res)
                if not res.ok:
                    return
                history.append(res.text)

        t0 = time.perf_counter()
        await asyncio.gather(*(talk(c) for c in convs))
        return results, time.perf_counter() - t0

    async def shared_prefix(self, concurrency: int, n_requests: int) -> tuple[list, float]:
        """Closed loop of single-turn chats: one long system prompt (new for each run, so each
        run meets it cold), distinct short questions."""
        system = make_prompt(self.cfg.system_tokens, f"{self.cfg.nonce}-system-{self._runs}")
        results: list[RequestResult] = []
        remaining = n_requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                self._seed += 1
                q = make_prompt(self.cfg.prompt_tokens, f"{self.cfg.nonce}-q{self._seed}")
                msgs = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Question {self._seed}: {q}"},
                ]
                results.append(await self.chat(msgs))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0

    async def run(self, sc: Scenario) -> tuple[list[RequestResult], float]:
        self._runs += 1
        if sc.kind == "multi-turn":
            convs = build_conversations(
                sc.conversations,
                sc.turns,
                self.cfg.system_tokens,
                self.cfg.prompt_tokens,
                f"{self.cfg.nonce}-{sc.name}-{self._runs}",
            )
            return await self.conversations(convs)
        if sc.kind == "sharegpt":
            key = (sc.sharegpt or "", sc.conversations, sc.turns)
            if key not in self._sharegpt:
                self._sharegpt[key] = load_sharegpt(*key)[0]
            convs = self._sharegpt[key]
            if not sc.use_file_answers:
                convs = [Conversation(c.system, c.users) for c in convs]
            return await self.conversations(convs)
        if sc.kind == "shared-prefix":
            return await self.shared_prefix(sc.concurrency or 1, sc.requests)
        if sc.rate is not None:
            return await self.open_loop(sc.rate, sc.requests)
        return await self.closed_loop(sc.concurrency or 1, sc.requests)


SCENARIO_KINDS = ("random", "multi-turn", "shared-prefix", "sharegpt")


@dataclass
class Scenario:
    """`random`: closed loop at `concurrency`, or open loop at `rate` requests/s, `requests`
    in all, fresh prompts. `shared-prefix`: closed loop, `requests` chats behind one system
    prompt. `multi-turn` / `sharegpt`: `conversations` at once, `turns` each."""

    name: str
    concurrency: int | None = None
    rate: float | None = None
    requests: int = 16
    kind: str = "random"
    conversations: int = 8
    turns: int = 6
    sharegpt: str | None = None
    use_file_answers: bool = False
    sharegpt_skipped: int | None = None  # malformed records the file held (reported)


async def run_scenarios(cfg: BenchConfig, scenarios: list[Scenario], warmup: int = 1) -> list:
    async with Bench(cfg) as bench:
        for _ in range(warmup):
            await bench.one()
        out = []
        for sc in scenarios:
            results, duration = await bench.run(sc)
            out.append(
                {"scenario": asdict(sc), "model": cfg.model, **summarize(results, duration, cfg)}
            )
        return out


RATIO_KEYS = (
    "output_throughput",
    "request_throughput",
    "ttft_ms.p50",
    "tpot_ms.p50",
    "itl_ms.p50",
    "e2e_ms.p50",
)


def _get(d: dict, dotted: str) -> float:
    for part in dotted.split("."):
        d = d[part]
    return d  # type: ignore[return-value]


async def compare(
    cfg_a: BenchConfig,
    cfg_b: BenchConfig,
    scenarios: list[Scenario],
    rounds: int = 2,
    warmup: int = 1,
) -> list[dict]:
    """Runs every scenario on A and B alternately for `rounds` rounds, so that drift on the
    machine hits both alike; each side's requests are pooled and A/B ratios reported."""
    async with Bench(cfg_a) as a, Bench(cfg_b) as b:
        for _ in range(warmup):
            await a.one()
            await b.one()
        report = []
        for sc in scenarios:
            pooled: dict[str, tuple[list[RequestResult], float]] = {"a": ([], 0.0), "b": ([], 0.0)}
            for _ in range(rounds):
                for key, bench in (("a", a), ("b", b)):
                    results, duration = await bench.run(sc)
                    prev, spent = pooled[key]
                    pooled[key] = (prev + results, spent + duration)
            sa = summarize(*pooled["a"], cfg_a)
            sb = summarize(*pooled["b"], cfg_b)
            ratios = {}
            for key in RATIO_KEYS:
                va, vb = _get(sa, key), _get(sb, key)
                ratios[key] = va / vb if vb else float("nan")
            report.append(
                {
                    "scenario": asdict(sc),
                    "a": {"url": cfg_a.url, **sa},
                    "b": {"url": cfg_b.url, **sb},
                    "ratio_a_over_b": ratios,
                }
            )
        return report


# --- service-level targets -----------------------------------------------------------------

_LATENCIES = {"ttft": "ttft_ms", "tpot": "tpot_ms", "itl": "itl_ms", "e2e": "e2e_ms"}


@dataclass(frozen=True)
class Target:
    """One figure a run must reach: `path` in a scenario's summary, at most or at least."""

    text: str
    path: str
    limit: float
    at_most: bool

    def check(self, summary: dict) -> tuple[float, bool]:
        if self.path == "success":
            done = summary["completed"] + summary["failed"]
            value = summary["completed"] / done if done else 0.0
        else:
            value = _get(summary, self.path)
        return value, (value <= self.limit if self.at_most else value >= self.limit)


def _duration_ms(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", text.strip())
    if not m:
        raise ConfigError(f"{text!r}: a duration such as 300ms or 2s")
    return float(m.group(1)) * (1.0 if m.group(2) == "ms" else 1000.0)


def parse_slo(text: str) -> list[Target]:
    """`ttft=300ms,tpot_p99=100ms,e2e_p90=5s,throughput=50,success=99.95%`: latencies at p50
    unless a percentile (p50, p90, p99) is named; throughput in output tokens/s; success as
    the share of requests that completed."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--slo {part!r}: NAME=VALUE")
        name, _, pct = key.strip().lower().partition("_")
        if name in _LATENCIES:
            pct = pct or "p50"
            if pct not in ("p50", "p90", "p99", "mean"):
                raise ConfigError(f"--slo {part!r}: percentile p50, p90, p99 or mean")
            out.append(Target(part, f"{_LATENCIES[name]}.{pct}", _duration_ms(value), True))
        elif key == "throughput":
            try:
                out.append(Target(part, "output_throughput", float(value), False))
            except ValueError as exc:
                raise ConfigError(f"--slo {part!r}: output tokens/s, e.g. 50") from exc
        elif key == "success":
            try:
                share = float(value.rstrip("%")) / (100.0 if value.endswith("%") else 1.0)
            except ValueError as exc:
                raise ConfigError(f"--slo {part!r}: a share such as 99.95%") from exc
            if not 0 < share <= 1:
                raise ConfigError(f"--slo {part!r}: a share between 0 and 100%")
            out.append(Target(part, "success", share, False))
        else:
            raise ConfigError(
                f"--slo {part!r}: one of ttft, tpot, itl, e2e (with _p90/_p99), throughput, success"
            )
    if not out:
        raise ConfigError("--slo names no target")
    return out
