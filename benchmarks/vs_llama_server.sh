#!/usr/bin/env bash
# llmhost vs llama.cpp's own llama-server (and llama-bench), side by side, on one machine.
#
#   ./benchmarks/vs_llama_server.sh            # TinyLlama-1.1B-shaped Q4_0 model (full run)
#   ./benchmarks/vs_llama_server.sh --smoke    # the tiny demo model, few requests
#   ./benchmarks/vs_llama_server.sh --upstream # llmhost (--engine openai) in front of
#                                              # llama-server vs llama-server direct
#
# Builds llama-server and llama-bench once into $LLMHOST_BENCH_CACHE (default
# ~/.cache/llmhost-bench) from the llama.cpp sources vendored in the llama-cpp-python sdist of
# the version installed here, so both sides run the same llama.cpp. The model has TinyLlama's
# exact shape (22 layers, 2048 wide, 32 heads / 4 KV heads, 32000 vocab) with random weights,
# so the timings are those of the real model; the text is meaningless.
# Prints one JSON line: llama-bench tg/pp, both servers at concurrency 1 and 8, and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0; UPSTREAM=0
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        --upstream) UPSTREAM=1 ;;
        *) echo "unknown argument $arg" >&2; exit 2 ;;
    esac
done
THREADS="${THREADS:-2}"
PARALLEL="${PARALLEL:-8}"
CTX="${CTX:-1024}"              # context per sequence, both servers
OUT_TOKENS="${OUT_TOKENS:-64}"
PROMPT_TOKENS="${PROMPT_TOKENS:-32}"
ROUNDS="${ROUNDS:-2}"
CACHE="${LLMHOST_BENCH_CACHE:-$HOME/.cache/llmhost-bench}"
PY=.venv/bin/python
LLMHOST=.venv/bin/llmhost
log() { printf '[bench] %s\n' "$*" >&2; }

[ -x "$LLMHOST" ] || { log "run ./scripts/install.sh first"; exit 1; }
VERSION=$($PY -c "from importlib.metadata import version; print(version('llama-cpp-python'))")
BIN="$CACHE/llama.cpp-$VERSION/bin"
mkdir -p "$CACHE"

if [ ! -x "$BIN/llama-server" ] || [ ! -x "$BIN/llama-bench" ]; then
    log "building llama-server and llama-bench from llama-cpp-python $VERSION (several minutes)"
    SRC="$CACHE/src-$VERSION"
    if [ ! -d "$SRC" ]; then
        tmp=$(mktemp -d)
        $PY -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$tmp"
        mkdir -p "$SRC" && tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$SRC" --strip-components=1
        rm -rf "$tmp"
    fi
    # Same portable flags as the engine build (the native build crashes on AMX CPUs).
    cmake -S "$SRC/vendor/llama.cpp" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
    cmake --build "$SRC/build" --target llama-server llama-bench -j "$(nproc)" >&2
    mkdir -p "$BIN" && cp "$SRC/build/bin/llama-server" "$SRC/build/bin/llama-bench" "$BIN/"
fi

if [ "$SMOKE" = 1 ]; then
    MODEL_DIR="$CACHE/demo"; SHAPE=demo; QUANT=f32; REQ1=4; REQ8=8; ROUNDS=1
else
    MODEL_DIR="$CACHE/tinyllama-q4_0"; SHAPE=tinyllama; QUANT=q4_0; REQ1=6; REQ8=16
fi
MODEL="$MODEL_DIR/llmhost-$SHAPE.gguf"
log "the $SHAPE-shaped $QUANT model (built on first use, rebuilt when out of date)"
# Rebuilt when an older llmhost built it (another tokenizer, say).
$PY -c "import sys; from llmhost.store import demo as d; d.ensure_model(sys.argv[1], \
    {'demo': d.DEMO_SHAPE, 'tinyllama': d.TINYLLAMA_SHAPE}[sys.argv[2]], sys.argv[3])" \
    "$MODEL" "$SHAPE" "$QUANT" >&2

log "llama-bench"
BENCH_JSON=$("$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p "$PROMPT_TOKENS" -n "$OUT_TOKENS" \
    -r 3 -o json 2>/dev/null)

free_port() { $PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
P_LS=$(free_port); P_LH=$(free_port)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$BIN/llama-server" -m "$MODEL" -t "$THREADS" -tb "$THREADS" -np "$PARALLEL" \
    -c $((PARALLEL * CTX)) --host 127.0.0.1 --port "$P_LS" > "$CACHE/llama-server.log" 2>&1 &
pids+=($!)
if [ "$UPSTREAM" = 1 ]; then
    curl_wait() { for _ in $(seq 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done; }
    curl_wait "http://127.0.0.1:$P_LS/health"
    LLMHOST_HOME="$CACHE/home" $LLMHOST serve --engine openai \
        --upstream-url "http://127.0.0.1:$P_LS" --port "$P_LH" --no-auth --log-level warning \
        > "$CACHE/llmhost.log" 2>&1 &
else
    LLMHOST_HOME="$CACHE/home" $LLMHOST serve "$MODEL" --threads "$THREADS" \
        --parallel "$PARALLEL" --ctx-size "$CTX" --port "$P_LH" --no-auth --log-level warning \
        > "$CACHE/llmhost.log" 2>&1 &
fi
pids+=($!)

wait_ok() {
    for _ in $(seq 600); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    log "not ready: $1"; exit 1
}
wait_ok "http://127.0.0.1:$P_LS/health"
wait_ok "http://127.0.0.1:$P_LH/ready"

SAME=(); [ "$UPSTREAM" = 1 ] && SAME=(--same-backend)
run_compare() {  # $1 concurrency, $2 requests
    $LLMHOST bench --compare "http://127.0.0.1:$P_LH" "http://127.0.0.1:$P_LS" "${SAME[@]}" \
        --concurrency "$1" --requests "$2" --rounds "$ROUNDS" --output-tokens "$OUT_TOKENS" \
        --prompt-tokens "$PROMPT_TOKENS" --warmup 1 --json
}
log "concurrency 1"; C1=$(run_compare 1 "$REQ1")
log "concurrency $PARALLEL"; C8=$(run_compare "$PARALLEL" "$REQ8")

$PY - "$BENCH_JSON" "$C1" "$C8" "$SHAPE" "$THREADS" "$PARALLEL" "$CTX" "$UPSTREAM" <<'PYEOF'
import json, sys
bench, c1, c8 = (json.loads(a) for a in sys.argv[1:4])
shape, threads, parallel, ctx, upstream = sys.argv[4], *map(int, sys.argv[5:9])
tg = next(b["avg_ts"] for b in bench if b.get("n_gen", 0) > 0)
pp = next(b["avg_ts"] for b in bench if b.get("n_prompt", 0) > 0)
r1, r8 = c1["results"][0], c8["results"][0]

def side(r, k):
    s = r[k]
    return {"output_tok_s": s["output_throughput"], "req_s": s["request_throughput"],
            "ttft_ms_p50": s["ttft_ms"]["p50"], "ttft_ms_p99": s["ttft_ms"]["p99"],
            "tpot_ms_p50": s["tpot_ms"]["p50"], "itl_ms_p50": s["itl_ms"]["p50"],
            "e2e_ms_p50": s["e2e_ms"]["p50"], "completed": s["completed"], "failed": s["failed"]}

out = {
    "model": f"{shape} random weights", "threads": threads, "parallel": parallel,
    "ctx_per_seq": ctx,
    "llama_bench": {"tg_tok_s": tg, "pp_tok_s": pp},
    "c1": {"llmhost": side(r1, "a"), "llama_server": side(r1, "b")},
    f"c{parallel}": {"llmhost": side(r8, "a"), "llama_server": side(r8, "b")},
}
lh1, ls1 = out["c1"]["llmhost"], out["c1"]["llama_server"]
lh8, ls8 = out[f"c{parallel}"]["llmhost"], out[f"c{parallel}"]["llama_server"]
out["ratios"] = {
    f"c{parallel}_tok_s_vs_llama_server": lh8["output_tok_s"] / ls8["output_tok_s"],
    "c1_tok_s_vs_llama_server": lh1["output_tok_s"] / ls1["output_tok_s"],
    "c1_ttft_p50_vs_llama_server": lh1["ttft_ms_p50"] / ls1["ttft_ms_p50"],
    "c1_tok_s_vs_llama_bench_tg": lh1["output_tok_s"] / tg,
    # llama-bench tg times decode alone; a served request also pays its prefill (TTFT), so
    # the decode rate (1 / TPOT) is the like-for-like figure.
    "c1_decode_tok_s_vs_llama_bench_tg": 1000 / lh1["tpot_ms_p50"] / tg,
    "llama_server_c1_decode_tok_s_vs_llama_bench_tg": 1000 / ls1["tpot_ms_p50"] / tg,
    f"llama_server_c{parallel}_over_c1": ls8["output_tok_s"] / ls1["output_tok_s"],
    f"llmhost_c{parallel}_over_c1": lh8["output_tok_s"] / lh1["output_tok_s"],
}
r = out["ratios"]
out["targets_met"] = {
    f"c{parallel}_tok_s>=1.0x": r[f"c{parallel}_tok_s_vs_llama_server"] >= 1.0,
    "c1_tok_s>=1.0x": r["c1_tok_s_vs_llama_server"] >= 1.0,
    "c1_ttft_p50<=1.1x": r["c1_ttft_p50_vs_llama_server"] <= 1.1,
    "c1_tok_s>=0.85x_tg": r["c1_tok_s_vs_llama_bench_tg"] >= 0.85,
    "c1_decode_tok_s>=0.85x_tg": r["c1_decode_tok_s_vs_llama_bench_tg"] >= 0.85,
}
if upstream:  # llmhost only forwards: what it costs on top of llama-server
    out["mode"] = "llmhost --engine openai in front of llama-server vs llama-server direct"
    out["upstream_overhead"] = {
        "c1_tok_s_loss": 1 - r["c1_tok_s_vs_llama_server"],
        f"c{parallel}_tok_s_loss": 1 - r[f"c{parallel}_tok_s_vs_llama_server"],
        "c1_ttft_added_ms_p50": lh1["ttft_ms_p50"] - ls1["ttft_ms_p50"],
        f"c{parallel}_ttft_added_ms_p50": lh8["ttft_ms_p50"] - ls8["ttft_ms_p50"],
    }
    out["targets_met"] = {
        "tok_s_loss<=2%": max(out["upstream_overhead"]["c1_tok_s_loss"],
                              out["upstream_overhead"][f"c{parallel}_tok_s_loss"]) <= 0.02,
        "ttft_added<=5ms": out["upstream_overhead"]["c1_ttft_added_ms_p50"] <= 5,
    }
print(json.dumps(out))
PYEOF
