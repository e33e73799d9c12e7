"""Agent-style requests (tools, tool_choice, structured output, tool-result round trips, bad
input) against llmhost and llama.cpp's own llama-server (`--jinja`), side by side on the same
GGUF, sent with the openai SDK. For each case and server: how many of the seeds it got right,
how many runs hit max_tokens, and the median latency. Prints a readable table, the failures
(with the servers' own error text), and one JSON line last.

    PYTHONPATH=src .venv/bin/python benchmarks/agents_vs_llama_server.py            # 5 seeds
    PYTHONPATH=src .venv/bin/python benchmarks/agents_vs_llama_server.py --smoke    # 1 seed
    PYTHONPATH=src .venv/bin/python benchmarks/agents_vs_llama_server.py --model X.gguf
    ... --chat-template T.jinja   # serve a copy of the model with another chat template
    ... --servers llmhost         # one side only

The default model is the demo GGUF (random weights, ChatML with Hermes-style tools), so only
what constrained decoding guarantees is judged (a forced call's arguments match its schema, a
json_schema answer matches the schema) plus the protocol's shape (streamed tool-call deltas
in OpenAI's order, status codes of bad requests), never what the text says.

llama-server is built once into $LLMHOST_BENCH_CACHE (default ~/.cache/llmhost-bench) from the
llama.cpp sources vendored in the installed llama-cpp-python's sdist, with the flags
vs_llama_server.sh uses, unless --llama-server names a binary. Both servers get the same
threads, parallel sequences and context per sequence; requests go one at a time, alternating
servers, so neither competes with the other for the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
from openai import OpenAI
from pydantic import BaseModel, Field
from servers import CACHE, free_port, llama_server_binary, stop, wait_ready

from llmhost.store.demo import ensure_demo_model, gguf_chat_template

MARKUP = ("<tool_call", "</tool_call", "<|im_", "<tools>", "<tool_response")

# --- request material ---------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
FLIGHTS = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Find flights between two airports.",
        "parameters": {
            "type": "object",
            "properties": {
                "origin": {"type": "string", "maxLength": 3},
                "destination": {"type": "string", "maxLength": 3},
                "max_price": {"type": "integer", "minimum": 0, "maximum": 5000},
                "nonstop": {"type": "boolean"},
            },
            "required": ["origin", "destination", "max_price", "nonstop"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, FLIGHTS]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    active: bool


# What the openai SDK sends for Person in strict mode, written out.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16, "title": "Name"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120, "title": "Age"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"], "title": "Role"},
        "active": {"type": "boolean", "title": "Active"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
    "title": "Person",
}
PERSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "Person", "schema": PERSON_SCHEMA, "strict": True},
}

ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
ASK_TRIP = [{"role": "user", "content": "Weather in Oslo, and a flight OSL to CDG under 300?"}]
ASK_PERSON = [{"role": "user", "content": "Invent a person; answer as JSON."}]
ASK_JSON = [{"role": "user", "content": "Describe a cat as a JSON object."}]
CALL = {
    "id": "call_abc123",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
}
ROUND_TRIP = [
    *ASK_WEATHER,
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temp_c": 21, "sky": "clear"}'},
]
DANGLING_RESULT = [
    *ASK_WEATHER,
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_nobody_made", "content": '{"temp_c": 21}'},
]


# --- judging ------------------------------------------------------------------------------------


class Fail(Exception):
    """The server answered, wrongly."""


class Cut(Exception):
    """The answer stopped at max_tokens, so constrained output may be incomplete."""


def validate(text: str | None, schema: dict[str, Any], what: str) -> Any:
    try:
        value = json.loads(text or "")
    except ValueError as exc:
        raise Fail(f"{what} is not JSON ({exc}): {text!r:.160}") from None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise Fail(f"{what} breaks its schema: {exc.message:.160} in {text!r:.160}") from None
    return value


def check_calls(calls: list[Any], only: str | None) -> None:
    for c in calls:
        name = c.function.name
        if name not in SCHEMAS or (only and name != only):
            raise Fail(f"call to {name!r}, expected {only or list(SCHEMAS)}")
        if not c.id:
            raise Fail(f"call to {name!r} has no id")
        validate(c.function.arguments, SCHEMAS[name], f"{name} arguments")


def no_markup(content: str | None) -> None:
    for m in MARKUP:
        if content and m in content:
            raise Fail(f"tool markup {m!r} in content: {content!r:.160}")


@dataclass
class Ctx:
    client: OpenAI
    model: str
    seed: int
    max_tokens: int

    def kw(self, **extra: Any) -> dict[str, Any]:
        return {
            "model": self.model,
            "temperature": 1.0,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            **extra,
        }


def named_tool(ctx: Ctx) -> str:
    r = ctx.client.chat.completions.create(
        **ctx.kw(
            messages=ASK_WEATHER,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    )
    ch = r.choices[0]
    if ch.finish_reason == "length":
        raise Cut(f"length; content {ch.message.content!r:.80}")
    calls = ch.message.tool_calls or []
    if len(calls) != 1:
        raise Fail(
            f"{len(calls)} tool calls (finish {ch.finish_reason}); content "
            f"{ch.message.content!r:.160}"
        )
    check_calls(calls, "get_weather")
    no_markup(ch.message.content)
    if ch.finish_reason != "tool_calls":
        raise Fail(f"finish_reason {ch.finish_reason!r}, expected 'tool_calls'")
    return f"args {calls[0].function.arguments}"


def named_tool_stream(ctx: Ctx) -> str:
    stream = ctx.client.chat.completions.create(
        **ctx.kw(
            messages=ASK_WEATHER,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
        )
    )
    content, finish = "", None
    calls: dict[int, dict[str, str]] = {}
    for chunk in stream:
        for ch in chunk.choices:
            d = ch.delta
            content += d.content or ""
            for tc in d.tool_calls or ():
                fn = tc.function
                name = fn.name if fn else None
                args = (fn.arguments if fn else None) or ""
                if tc.index not in calls:
                    if not tc.id or not name:
                        raise Fail(
                            f"first delta of call {tc.index} lacks id or name: "
                            f"{tc.model_dump(exclude_none=True)}"
                        )
                    calls[tc.index] = {"id": tc.id, "name": name, "args": args}
                else:
                    if tc.id and tc.id != calls[tc.index]["id"]:
                        raise Fail(f"call {tc.index} changes id mid-stream to {tc.id!r}")
                    if name:
                        raise Fail(f"call {tc.index} repeats its name {name!r} in a later delta")
                    calls[tc.index]["args"] += args
            finish = ch.finish_reason or finish
    if finish == "length":
        raise Cut("length")
    no_markup(content)
    if list(calls) != [0] or calls[0]["name"] != "get_weather":
        raise Fail(f"calls {calls} (finish {finish}); content {content!r:.160}")
    validate(calls[0]["args"], SCHEMAS["get_weather"], "joined arguments")
    if finish != "tool_calls":
        raise Fail(f"finish_reason {finish!r}, expected 'tool_calls'")
    return f"args {calls[0]['args']}"


def required_two(ctx: Ctx) -> str:
    r = ctx.client.chat.completions.create(
        **ctx.kw(messages=ASK_TRIP, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    )
    ch = r.choices[0]
    if ch.finish_reason == "length":
        raise Cut(f"length; content {ch.message.content!r:.80}")
    calls = ch.message.tool_calls or []
    if not calls:
        raise Fail(
            f"no tool calls (finish {ch.finish_reason}); content {ch.message.content!r:.160}"
        )
    check_calls(calls, None)
    no_markup(ch.message.content)
    extra = " [more than one call despite parallel_tool_calls=false]" if len(calls) > 1 else ""
    return f"{len(calls)} call(s): {', '.join(c.function.name for c in calls)}{extra}"


def schema_strict(ctx: Ctx) -> str:
    r = ctx.client.chat.completions.create(
        **ctx.kw(messages=ASK_PERSON, response_format=PERSON_FORMAT)
    )
    ch = r.choices[0]
    if ch.finish_reason == "length":
        raise Cut(f"length; content {ch.message.content!r:.80}")
    validate(ch.message.content, PERSON_SCHEMA, "content")
    return ch.message.content or ""


def sdk_parse(ctx: Ctx) -> str:
    try:
        r = ctx.client.chat.completions.parse(**ctx.kw(messages=ASK_PERSON, response_format=Person))
    except openai.LengthFinishReasonError as exc:
        raise Cut(f"LengthFinishReasonError: {exc}") from None
    except Exception as exc:  # pydantic ValidationError etc. from the SDK's parsing
        if isinstance(exc, openai.APIError):
            raise
        raise Fail(f"SDK parse raised {type(exc).__name__}: {exc!s:.200}") from None
    parsed = r.choices[0].message.parsed
    if not isinstance(parsed, Person):
        raise Fail(f"parsed is {parsed!r:.120}; content {r.choices[0].message.content!r:.160}")
    return repr(parsed)


def schema_stream(ctx: Ctx) -> str:
    stream = ctx.client.chat.completions.create(
        **ctx.kw(messages=ASK_PERSON, response_format=PERSON_FORMAT, stream=True)
    )
    content, finish = "", None
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            if ch.delta.tool_calls:
                raise Fail(f"tool_calls delta in a json_schema answer: {ch.delta.tool_calls}")
            finish = ch.finish_reason or finish
    if finish == "length":
        raise Cut(f"length; content {content!r:.80}")
    validate(content, PERSON_SCHEMA, "joined content")
    return content


def json_object(ctx: Ctx) -> str:
    r = ctx.client.chat.completions.create(
        **ctx.kw(messages=ASK_JSON, response_format={"type": "json_object"})
    )
    ch = r.choices[0]
    if ch.finish_reason == "length":
        raise Cut(f"length; content {ch.message.content!r:.80}")
    if ch.finish_reason != "stop":
        raise Fail(f"finish_reason {ch.finish_reason!r}")
    validate(ch.message.content, {"type": "object"}, "content")
    return f"{len(ch.message.content or '')} chars"


def round_trip(ctx: Ctx) -> str:
    r = ctx.client.chat.completions.create(
        **ctx.kw(messages=ROUND_TRIP, tools=TOOLS, tool_choice="auto")
    )
    ch = r.choices[0]
    m = ch.message
    if m.role != "assistant":
        raise Fail(f"role {m.role!r}")
    if ch.finish_reason not in ("stop", "length", "tool_calls"):
        raise Fail(f"finish_reason {ch.finish_reason!r}")
    if m.content is not None and not isinstance(m.content, str):
        raise Fail(f"content {m.content!r:.80}")
    if m.tool_calls:
        check_calls(m.tool_calls, None)
    if ch.finish_reason == "tool_calls" and not m.tool_calls:
        raise Fail("finish_reason 'tool_calls' with no tool_calls")
    if m.tool_calls and ch.finish_reason != "tool_calls":
        raise Fail(f"tool_calls with finish_reason {ch.finish_reason!r}")
    if ch.finish_reason == "length":
        raise Cut(f"length; {len(m.content or '')} chars of content")
    return f"finish {ch.finish_reason}, {len(m.tool_calls or [])} calls"


def expect_400(send: Callable[[], Any]) -> str:
    try:
        r = send()
    except openai.APIStatusError as exc:
        if exc.status_code == 400:
            return f"400: {error_text(exc)}"
        raise Fail(f"{exc.status_code}: {error_text(exc)}") from None
    ch = r.choices[0]
    raise Fail(
        f"200 (finish {ch.finish_reason}, {len(ch.message.tool_calls or [])} calls, "
        f"content {ch.message.content!r:.60})"
    )


def bad_choice(ctx: Ctx) -> str:
    return expect_400(
        lambda: ctx.client.chat.completions.create(
            **ctx.kw(
                messages=ASK_WEATHER,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "book_hotel"}},
                max_tokens=8,
            )
        )
    )


def bad_result_id(ctx: Ctx) -> str:
    return expect_400(
        lambda: ctx.client.chat.completions.create(
            **ctx.kw(messages=DANGLING_RESULT, tools=TOOLS, max_tokens=8)
        )
    )


def bad_field(ctx: Ctx) -> str:
    return expect_400(
        lambda: ctx.client.chat.completions.create(
            **ctx.kw(messages=ASK_WEATHER, max_tokens=8, extra_body={"temprature": 0.2})
        )
    )


def bad_tool(ctx: Ctx) -> str:
    nameless = {"type": "function", "function": {"parameters": SCHEMAS["get_weather"]}}
    return expect_400(
        lambda: ctx.client.chat.completions.create(
            **ctx.kw(messages=ASK_WEATHER, tools=[nameless], max_tokens=8)
        )
    )


CASES: list[tuple[str, str, Callable[[Ctx], str]]] = [
    ("1_named_tool", "tool_choice named, non-stream", named_tool),
    ("2_named_tool_stream", "tool_choice named, streamed", named_tool_stream),
    ("3_required_2_tools", "required, 2 tools, parallel off", required_two),
    ("4a_json_schema", "json_schema strict, non-stream", schema_strict),
    ("4b_sdk_parse", "SDK .parse(pydantic model)", sdk_parse),
    ("5_json_schema_stream", "json_schema strict, streamed", schema_stream),
    ("6_json_object", "json_object (finish stop)", json_object),
    ("7_tool_round_trip", "tool result round trip, auto", round_trip),
    ("8a_bad_tool_choice", "400: tool_choice names no tool", bad_choice),
    ("8b_bad_tool_call_id", "400: tool result answers no call", bad_result_id),
    ("8c_unknown_field", "400: unknown field", bad_field),
    ("8d_tool_without_name", "400: tool without a name", bad_tool),
]


def error_text(exc: Exception) -> str:
    if isinstance(exc, openai.APIStatusError):
        try:
            body = exc.response.json()
            err = body.get("error", body) if isinstance(body, dict) else body
            msg = err.get("message", err) if isinstance(err, dict) else err
        except ValueError:
            msg = exc.response.text
        return f"{msg!s:.300}"
    return f"{type(exc).__name__}: {exc!s:.300}"


@dataclass
class Tally:
    passed: int = 0
    cut: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # distinct texts, in order
    samples: list[str] = field(default_factory=list)

    def note(self, kind: str, text: str) -> None:
        bucket = self.failures if kind == "fail" else self.samples
        if text not in bucket and len(bucket) < 6:
            bucket.append(text)

    def summary(self) -> dict[str, Any]:
        n = self.passed + self.cut + self.failed
        return {
            "n": n,
            "passed": self.passed,
            "length_cuts": self.cut,
            "failed": self.failed,
            "latency_ms_p50": round(statistics.median(self.latencies) * 1000, 1)
            if self.latencies
            else None,
            "failures": self.failures,
        }


def run_case(fn: Callable[[Ctx], str], ctx: Ctx, tally: Tally) -> None:
    t0 = time.perf_counter()
    try:
        detail = fn(ctx)
        tally.passed += 1
        tally.note("pass", detail)
    except Cut as exc:
        tally.cut += 1
        tally.note("cut", f"cut: {exc}")
    except Fail as exc:
        tally.failed += 1
        tally.note("fail", str(exc))
    except openai.APIStatusError as exc:
        tally.failed += 1
        tally.note("fail", f"HTTP {exc.status_code}: {error_text(exc)}")
    except Exception as exc:  # a server that drops the connection, a timeout, a bad stream
        tally.failed += 1
        tally.note("fail", error_text(exc))
    tally.latencies.append(time.perf_counter() - t0)


# --- servers ------------------------------------------------------------------------------------


def start_servers(
    args: argparse.Namespace, model: Path, which: list[str]
) -> tuple[dict[str, str], list[subprocess.Popen]]:
    """Start the servers named in `which`; their base URLs, and the processes to stop."""
    logs = CACHE / "agents-logs"
    logs.mkdir(parents=True, exist_ok=True)
    t, np_, ctx = args.threads, args.parallel, args.ctx
    commands = {
        "llmhost": lambda: (
            [
                sys.executable,
                "-m",
                "llmhost",
                "serve",
                str(model),
                *f"--threads {t} --parallel "
                f"{np_} --ctx-size {ctx} --no-auth --log-level warning".split(),
            ],
            "/ready",
        ),
        "llama_server": lambda: (
            [
                str(args.llama_server or llama_server_binary()),
                "-m",
                str(model),
                *f"--jinja -t {t} -tb {t} -np {np_} -c {args.parallel * args.ctx}".split(),
            ],
            "/health",
        ),
    }
    env = {**os.environ, "LLMHOST_HOME": str(CACHE / "home")}
    urls, procs, waits = {}, [], []
    for name in which:
        cmd, ready = commands[name]()
        port = free_port()
        log = logs / f"{name}.log"
        proc = subprocess.Popen(
            [*cmd, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(proc)
        urls[name] = f"http://127.0.0.1:{port}"
        waits.append((urls[name] + ready, proc, log))
    try:
        for w in waits:
            wait_ready(*w)
    except Exception:
        stop(procs)
        raise
    return urls, procs


def demo_model() -> Path:
    """The demo GGUF in the benchmark cache (rebuilt when its chat template is out of date)."""
    return ensure_demo_model(CACHE)


def with_template(model: Path, template: Path) -> Path:
    """A copy of `model` (in the cache) whose chat template is the Jinja file `template`."""
    out = CACHE / "agents-templates" / f"{model.stem}+{template.stem}.gguf"
    text = template.read_text()
    if not out.exists() or gguf_chat_template(out) != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "gguf.scripts.gguf_new_metadata",
                "--force",
                "--chat-template-file",
                str(template),
                str(model),
                str(out),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return out


def llama_server_caps(url: str) -> Any:
    try:
        with urllib.request.urlopen(f"{url}/props", timeout=5) as r:
            return json.loads(r.read()).get("chat_template_caps")
    except (OSError, ValueError) as exc:
        return f"unknown ({exc})"


# --- main ---------------------------------------------------------------------------------------


def table(results: dict[str, dict[str, dict[str, Any]]], servers: list[str]) -> str:
    head = f"{'case':<22} {'what':<34}" + "".join(
        f" | {s:<12} {'cut':>3} {'p50 ms':>7}" for s in servers
    )
    lines = [head, "-" * len(head)]
    for key, what, _ in CASES:
        row = f"{key:<22} {what:<34}"
        for s in servers:
            r = results[s][key]
            ok = f"{r['passed']}/{r['n']}"
            p50 = "-" if r["latency_ms_p50"] is None else f"{r['latency_ms_p50']:.0f}"
            row += f" | {ok:<12} {r['length_cuts']:>3} {p50:>7}"
        lines.append(row)
    totals = "".join(
        f" | {sum(r['passed'] for r in results[s].values())}/"
        f"{sum(r['n'] for r in results[s].values()):<9} {'':>3} {'':>7}"
        for s in servers
    )
    lines.append(f"{'total':<57}{totals}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="GGUF to serve (default: the demo model)")
    ap.add_argument(
        "--chat-template",
        type=Path,
        help="serve a copy of the model with this Jinja chat template, e.g. llama.cpp's "
        "models/templates/Qwen-Qwen2.5-7B-Instruct.jinja",
    )
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="one seed per case")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=2048, help="context tokens per sequence")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--llama-server", type=Path, help="llama-server binary (default: build)")
    ap.add_argument(
        "--servers", default="llmhost,llama_server", help="comma-separated: which to run"
    )
    ap.add_argument("--verbose", action="store_true", help="print a sample answer per case")
    args = ap.parse_args()
    seeds = 1 if args.smoke else args.seeds
    model = args.model or demo_model()
    if args.chat_template:
        model = with_template(model, args.chat_template)

    urls, procs = start_servers(args, model, args.servers.split(","))
    try:
        clients = {}
        for s, url in urls.items():
            c = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
            try:
                ids = [m.id for m in c.models.list().data]
            except (openai.APIError, httpx.HTTPError):
                ids = []
            clients[s] = (c, ids[0] if ids else model.stem)
            try:  # first-request costs (graph reserve, caches) stay out of the latencies
                c.chat.completions.create(
                    model=clients[s][1], messages=ASK_WEATHER, max_tokens=4, seed=0
                )
            except (openai.APIError, httpx.HTTPError) as exc:
                print(f"[bench] {s} warm-up failed: {error_text(exc)}", file=sys.stderr)
        caps = llama_server_caps(urls["llama_server"]) if "llama_server" in urls else None
        tallies = {s: {key: Tally() for key, _, _ in CASES} for s in urls}
        t0 = time.perf_counter()
        for seed in range(seeds):
            for key, _, fn in CASES:
                for s, (client, model_id) in clients.items():
                    ctx = Ctx(client, model_id, 1000 + seed, args.max_tokens)
                    run_case(fn, ctx, tallies[s][key])
            print(f"[bench] seed {seed + 1}/{seeds} done", file=sys.stderr)
        wall = time.perf_counter() - t0
    finally:
        stop(procs)

    servers = list(urls)
    results = {s: {k: t.summary() for k, t in tallies[s].items()} for s in servers}
    print(table(results, servers))
    for s in servers:
        for key, _, _ in CASES:
            t = tallies[s][key]
            for text in t.failures:
                print(f"[{s}] {key} FAIL: {text}")
            if args.verbose:
                for text in t.samples[:2]:
                    print(f"[{s}] {key} ok: {text}")
    out = {
        "model": str(model),
        "seeds": seeds,
        "temperature": 1.0,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "parallel": args.parallel,
        "ctx_per_seq": args.ctx,
        "llama_server_version": version("llama-cpp-python"),
        "template_mentions_tools": "tool" in (gguf_chat_template(model) or ""),
        "llama_server_template_caps": caps,
        "wall_s": round(wall, 1),
        "results": results,
        "totals": {
            s: {
                "passed": sum(r["passed"] for r in results[s].values()),
                "n": sum(r["n"] for r in results[s].values()),
                "length_cuts": sum(r["length_cuts"] for r in results[s].values()),
            }
            for s in servers
        },
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
