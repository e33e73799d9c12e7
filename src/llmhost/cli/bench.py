"""`llmhost bench`: load-test any OpenAI-compatible server, or two of them side by side."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmhost.cli.options import ApiKey
from llmhost.errors import ConfigError


def _scenarios(
    concurrency: str | None,
    rate: str | None,
    requests: int,
    kind: str = "random",
    conversations: int = 8,
    turns: int = 6,
    sharegpt: str | None = None,
    use_file_answers: bool = False,
):
    from llmhost.ops.bench import SCENARIO_KINDS, Scenario, load_sharegpt

    if kind not in SCENARIO_KINDS[:3]:
        raise ConfigError("--scenario: random, multi-turn or shared-prefix")
    if sharegpt is not None:
        if kind != "random":
            raise ConfigError("--sharegpt replays its own conversations; drop --scenario")
        kind = "sharegpt"
    if kind != "random" and rate:
        raise ConfigError("--rate applies to the random scenario only")
    if conversations < 1 or turns < 1:
        raise ConfigError("--conversations and --turns must be >= 1")
    if kind == "multi-turn":
        return [
            Scenario(
                name=f"multi-turn {conversations}x{turns}",
                kind=kind,
                conversations=conversations,
                turns=turns,
            )
        ]
    if kind == "sharegpt":
        convs, skipped = load_sharegpt(sharegpt or "", conversations, turns)
        return [
            Scenario(
                name=f"sharegpt {len(convs)}x<={turns}",
                kind=kind,
                conversations=conversations,
                turns=turns,
                sharegpt=sharegpt,
                use_file_answers=use_file_answers,
                sharegpt_skipped=skipped,
            )
        ]
    if concurrency is None:
        concurrency = "8" if kind == "shared-prefix" else "1,8"
    out = []
    try:
        for c in (int(x) for x in concurrency.split(",") if x.strip()):
            if c < 1:
                raise ValueError
            name = f"shared-prefix c={c}" if kind == "shared-prefix" else f"c={c}"
            out.append(
                Scenario(name=name, concurrency=c, requests=requests or max(8, 4 * c), kind=kind)
            )
        for r in (float(x) for x in (rate or "").split(",") if x.strip()):
            if r <= 0:
                raise ValueError
            out.append(Scenario(name=f"rate={r:g}/s", rate=r, requests=requests or 32))
    except ValueError as exc:
        raise ConfigError(
            "--concurrency takes whole numbers >= 1 and --rate positive numbers, comma-separated"
        ) from exc
    if not out:
        raise ConfigError("give at least one --concurrency or --rate")
    return out


def _fmt(v: float, digits: int = 1) -> str:
    return "-" if v != v else f"{v:.{digits}f}"  # NaN when no sample


def _row(name: str, r: dict) -> list[str]:
    return [
        name,
        f"{r['completed']}/{r['completed'] + r['failed']}",
        _fmt(r["output_throughput"]),
        _fmt(r["request_throughput"], 2),
        _fmt(r["ttft_ms"]["p50"], 0),
        _fmt(r["ttft_ms"]["p99"], 0),
        _fmt(r["tpot_ms"]["p50"]),
        _fmt(r["itl_ms"]["p50"]),
        _fmt(r["itl_ms"]["p99"]),
        _fmt(r["e2e_ms"]["p50"], 0),
        _fmt(r["e2e_ms"]["p99"], 0),
        _fmt(r["goodput"], 2),
    ]


def _turn_table(title: str, rows: list[tuple[str, dict]]) -> Table | None:
    """Per-turn TTFT of the conversation workloads; None when no run has turns."""
    rows = [(n, r) for n, r in rows if r.get("ttft_by_turn_ms")]
    if not rows:
        return None
    table = Table("run", "turn", "n", "TTFT50", "TTFT90", title=title)
    for name, r in rows:
        for i, t in enumerate(r["ttft_by_turn_ms"]):
            last = i == len(r["ttft_by_turn_ms"]) - 1
            table.add_row(
                name if i == 0 else "",
                str(t["turn"]),
                str(t["n"]),
                _fmt(t["p50"], 0),
                _fmt(t["p90"], 0),
                end_section=last,
            )
    return table


COLUMNS = [
    "run",
    "ok",
    "tok/s",
    "req/s",
    "TTFT50",
    "TTFT99",
    "TPOT50",
    "ITL50",
    "ITL99",
    "E2E50",
    "E2E99",
    "good/s",
]


def _check_targets(report: list[dict], targets: list) -> int:
    """Adds each target's value and verdict to its scenario; returns how many were missed."""
    missed = 0
    for r in report:
        r["slo"] = []
        for t in targets:
            value, met = t.check(r)
            r["slo"].append({"target": t.text, "value": value, "met": met})
            missed += not met
    return missed


Compare = Annotated[
    tuple[str, str] | None,
    typer.Option(help="Two base URLs to run alternately; prints A/B ratios."),
]
Concurrency = Annotated[
    str | None,
    typer.Option(help="Closed-loop concurrencies, comma-separated [1,8; shared-prefix: 8]."),
]
SameBackend = Annotated[
    bool,
    typer.Option(
        "--same-backend",
        help="With --compare: A and B reach one backend (a gateway in front of it), so each "
        "side gets prompts of its own and neither answers from the other's prompt cache.",
    ),
]
Slo = Annotated[
    str | None,
    typer.Option(
        help="Targets to check, e.g. ttft=300ms,throughput=50,success=99.95% (the guide's); "
        "exit 1 when one is missed.",
    ),
]
ScenarioKind = Annotated[
    str,
    typer.Option(
        help="Workload: random (a fresh prompt per request), multi-turn (conversations "
        "behind one system prompt, each turn resending the history) or shared-prefix (one "
        "long system prompt, short distinct questions).",
    ),
]
Conversations = Annotated[
    int, typer.Option(help="multi-turn / --sharegpt: conversations, all at once.")
]
SystemTokens = Annotated[
    int | None,
    typer.Option(
        help="Shared system prompt in words (about tokens) [multi-turn 512, shared-prefix 1024].",
    ),
]
ShareGpt = Annotated[
    str | None,
    typer.Option(
        metavar="PATH",
        help="Replay a ShareGPT JSON file as multi-turn conversations (user turns from the "
        "file, answers generated); malformed records are skipped and counted.",
    ),
]
ShareGptAnswers = Annotated[
    bool,
    typer.Option(
        "--sharegpt-use-file-answers",
        help="With --sharegpt: the history holds the file's answers, not the generated ones.",
    ),
]
CachePrompt = Annotated[
    bool,
    typer.Option(
        "--cache-prompt/--no-cache-prompt",
        help="--no-cache-prompt sends cache_prompt: false with every request.",
    ),
]
Seed = Annotated[
    str | None,
    typer.Option(
        help="Seed of the prompt text, for the same prompts run after run [a fresh one "
        "per run, so no prompt cache holds them].",
    ),
]


def bench(
    url: str | None = typer.Argument(None, help="Server base URL, e.g. http://127.0.0.1:8080"),
    compare: Compare = None,
    concurrency: Concurrency = None,
    rate: str | None = typer.Option(None, help="Open-loop Poisson rates (req/s), comma-sep."),
    requests: int = typer.Option(0, help="Requests per scenario [8 or 4 x concurrency]."),
    prompt_tokens: int = typer.Option(32, help="Prompt length in words (about tokens)."),
    output_tokens: int = typer.Option(64, help="Tokens generated per request (ignore_eos)."),
    temperature: float = typer.Option(1.0),
    model: str | None = typer.Option(None, help="Model id [the server's first model]."),
    api_key: ApiKey = None,
    rounds: int = typer.Option(2, help="With --compare: alternations per scenario."),
    warmup: int = typer.Option(1, help="Requests sent before measuring."),
    slo_ttft_ms: float | None = typer.Option(None, help="Goodput SLO on TTFT."),
    slo_tpot_ms: float | None = typer.Option(None, help="Goodput SLO on TPOT."),
    slo_e2e_ms: float | None = typer.Option(None, help="Goodput SLO on end-to-end latency."),
    same_backend: SameBackend = False,
    slo: Slo = None,
    scenario: ScenarioKind = "random",
    conversations: Conversations = 8,
    turns: int = typer.Option(6, help="multi-turn / --sharegpt: user turns per conversation."),
    system_tokens: SystemTokens = None,
    sharegpt: ShareGpt = None,
    sharegpt_use_file_answers: ShareGptAnswers = False,
    cache_prompt: CachePrompt = True,
    seed: Seed = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line."),
) -> None:
    """Measure TTFT, TPOT, ITL, latency and throughput of an OpenAI-compatible server."""
    from llmhost.ops.bench import BenchConfig, parse_slo, run_scenarios
    from llmhost.ops.bench import compare as run_compare

    if (url is None) == (compare is None):
        raise ConfigError("give either a URL or --compare URL_A URL_B")
    if prompt_tokens < 1 or output_tokens < 1 or rounds < 1 or warmup < 0:
        raise ConfigError("token counts and --rounds must be >= 1, --warmup >= 0")
    scenarios = _scenarios(
        concurrency,
        rate,
        requests,
        scenario,
        conversations,
        turns,
        sharegpt,
        sharegpt_use_file_answers,
    )
    if system_tokens is None:
        system_tokens = 1024 if scenario == "shared-prefix" else 512
    if system_tokens < 0:
        raise ConfigError("--system-tokens must be >= 0")
    targets = parse_slo(slo) if slo else []
    # A and B get the same prompts, unseen by either unless a --seed repeats them
    nonce = seed if seed is not None else secrets.token_hex(4)

    def cfg(u: str) -> BenchConfig:
        return BenchConfig(
            url=u,
            model=model,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            temperature=temperature,
            api_key=api_key,
            slo_ttft_ms=slo_ttft_ms,
            slo_tpot_ms=slo_tpot_ms,
            slo_e2e_ms=slo_e2e_ms,
            system_tokens=system_tokens,
            cache_prompt=cache_prompt,
            nonce=f"{nonce}-{u}" if same_backend else nonce,
        )

    if url is not None:  # one server (the check above leaves this or --compare)
        report = asyncio.run(run_scenarios(cfg(url), scenarios, warmup=warmup))
        missed = _check_targets(report, targets)
        _print_run(url, report, as_json)
        if missed:
            raise typer.Exit(1)
    elif compare is not None:
        a, b = compare
        report = asyncio.run(run_compare(cfg(a), cfg(b), scenarios, rounds=rounds, warmup=warmup))
        _print_compare(a, b, report, as_json)


def _console() -> Console:
    return Console(width=max(Console().width, 120))


def _print_run(url: str, report: list[dict], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"target": url, "results": report}))
        return
    console = _console()
    table = Table(*COLUMNS, title=f"{url} (ms for latencies)")
    for r in report:
        table.add_row(*_row(r["scenario"]["name"], r))
    console.print(table)
    turns_table = _turn_table("TTFT by turn (ms)", [(r["scenario"]["name"], r) for r in report])
    if turns_table is not None:
        console.print(turns_table)
    for r in report:
        for t in r.get("slo", []):
            mark = "[green]met[/]" if t["met"] else "[bold red]missed[/]"
            console.print(f"{r['scenario']['name']}: {t['target']} -> {t['value']:.4g} {mark}")


def _print_compare(a: str, b: str, report: list[dict], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"a": a, "b": b, "results": report}))
        return
    table = Table(*COLUMNS, title=f"A={a}  B={b}")
    for r in report:
        name = r["scenario"]["name"]
        table.add_row(*_row(f"{name} A", r["a"]))
        table.add_row(*_row(f"{name} B", r["b"]))
        ratio = r["ratio_a_over_b"]
        table.add_row(
            f"{name} A/B",
            "",
            _fmt(ratio["output_throughput"], 2),
            _fmt(ratio["request_throughput"], 2),
            _fmt(ratio["ttft_ms.p50"], 2),
            "",
            _fmt(ratio["tpot_ms.p50"], 2),
            _fmt(ratio["itl_ms.p50"], 2),
            "",
            _fmt(ratio["e2e_ms.p50"], 2),
            "",
            "",
            end_section=True,
        )
    console = _console()
    console.print(table)
    rows = [(f"{r['scenario']['name']} {k.upper()}", r[k]) for r in report for k in ("a", "b")]
    turns_table = _turn_table("TTFT by turn (ms)", rows)
    if turns_table is not None:
        console.print(turns_table)
