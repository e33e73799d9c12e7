#!/usr/bin/env bash
# Download figures, one JSON line: a file served by nginx on loopback, throttled per connection
# (as a remote mirror or CDN edge is), fetched by `llmhost pull` (default 8 streams, and 16),
# by `aria2c -x16 -s16` (the deployment guide's command) and by one plain stream (curl).
# Each run is alternated round by round; the best wall time of ROUNDS counts.
#
#   ./benchmarks/pull_vs_aria2.sh                    # 1 GiB at 20 MB/s per connection
#   SIZE_MB=256 RATE=20m ROUNDS=1 ./benchmarks/pull_vs_aria2.sh
#
# nginx lets the first second of each response through unthrottled, as its limit_rate does.
# Needs Debian's aria2 and nginx (installed when missing and run as root). llmhost's time
# includes everything a pull does: probe, disk check, download, sha256, layout check, manifest.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB="${SIZE_MB:-1024}"
RATE="${RATE:-20m}"
ROUNDS="${ROUNDS:-2}"
SINGLE="${SINGLE:-1}"          # 0 skips the (slow) single-stream baseline
CACHE="${LLMHOST_BENCH_CACHE:-/var/tmp/llmhost-bench}/pull"
PY=.venv/bin/python

need=()
command -v aria2c >/dev/null || need+=(aria2)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

mkdir -p "$CACHE/www"
FILE="$CACHE/www/model-${SIZE_MB}m.dat"
if [ ! -f "$FILE" ] || [ "$(stat -c %s "$FILE")" -ne $((SIZE_MB << 20)) ]; then
    head -c $((SIZE_MB << 20)) /dev/urandom > "$FILE.tmp" && mv "$FILE.tmp" "$FILE"
fi
SHA=$(sha256sum "$FILE" | cut -d' ' -f1)

PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUN="$(mktemp -d)"
trap '[ -f "$RUN/nginx.pid" ] && kill "$(cat "$RUN/nginx.pid")" 2>/dev/null; rm -rf "$RUN"' EXIT
cat > "$RUN/nginx.conf" <<EOF
daemon on;
user $(id -un);
worker_processes 1;
pid $RUN/nginx.pid;
error_log $RUN/error.log;
events { worker_connections 256; }
http {
    access_log off;
    sendfile on;
    client_body_temp_path $RUN; proxy_temp_path $RUN; fastcgi_temp_path $RUN;
    uwsgi_temp_path $RUN; scgi_temp_path $RUN;
    server {
        listen 127.0.0.1:$PORT;
        root $CACHE/www;
        limit_rate $RATE;
    }
}
EOF
"$NGINX" -c "$RUN/nginx.conf" -p "$RUN"
URL="http://127.0.0.1:$PORT/$(basename "$FILE")"
for _ in $(seq 50); do curl -sfI "$URL" >/dev/null && break; sleep 0.1; done
curl -sfI "$URL" >/dev/null || { echo "nginx does not serve $URL:" >&2; cat "$RUN/error.log" >&2; exit 1; }

now() { date +%s.%N; }
clean() { rm -rf "$RUN/out" "$RUN/home"; mkdir -p "$RUN/out"; sync; }
t_llmhost() {
    clean
    local t0; t0=$(now)
    LLMHOST_HOME="$RUN/home" .venv/bin/llmhost pull "$URL" --name bench:x -q -x "$1" --sha256 "$SHA" >/dev/null || return 1
    echo "$(now) - $t0" | bc
}
t_aria2() {
    clean
    local t0; t0=$(now)
    aria2c -q -x16 -s16 -d "$RUN/out" -o f --checksum="sha-256=$SHA" "$URL" || return 1
    echo "$(now) - $t0" | bc
}
t_single() {
    clean
    local t0; t0=$(now)
    curl -sf -o "$RUN/out/f" "$URL" || return 1
    echo "$SHA  $RUN/out/f" | sha256sum -c --quiet || return 1
    echo "$(now) - $t0" | bc
}

best() { printf '%s\n' "$@" | sort -g | head -1; }
L8=(); L16=(); A=(); S=()
fail() { echo "pull_vs_aria2: $1 failed (see above)" >&2; exit 1; }
for r in $(seq "$ROUNDS"); do
    v=$(t_llmhost 8) || fail "llmhost pull -x 8"; L8+=("$v")
    v=$(t_aria2) || fail "aria2c"; A+=("$v")
    v=$(t_llmhost 16) || fail "llmhost pull -x 16"; L16+=("$v")
    echo "round $r: llmhost-x8 ${L8[-1]} s, aria2c-x16 ${A[-1]} s, llmhost-x16 ${L16[-1]} s" >&2
done
if [ "$SINGLE" = 1 ]; then
    v=$(t_single) || fail "curl"; S+=("$v"); echo "single stream ${S[-1]} s" >&2
fi

$PY - "$SIZE_MB" "$RATE" "$(best "${L8[@]}")" "$(best "${L16[@]}")" "$(best "${A[@]}")" \
    "${S[0]:-nan}" <<'EOF'
import json, os, sys
size_mb, rate, l8, l16, a, s = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
mb = int(size_mb) * (1 << 20) / 1e6
out = {
    "bytes": int(size_mb) << 20, "rate_per_connection": rate, "cores": os.cpu_count(),
    "llmhost_x8_s": round(l8, 2), "llmhost_x16_s": round(l16, 2), "aria2c_x16_s": round(a, 2),
    "single_stream_s": round(s, 2) if s == s else None,
    "llmhost_x8_MB_s": round(mb / l8, 1), "llmhost_x16_MB_s": round(mb / l16, 1),
    "aria2c_x16_MB_s": round(mb / a, 1),
    "ratio_llmhost_x16_vs_aria2c_time": round(l16 / a, 3),
    "ratio_llmhost_x8_vs_aria2c_time": round(l8 / a, 3),
    "speedup_llmhost_x8_vs_single": round(s / l8, 2) if s == s else None,
    "speedup_llmhost_x16_vs_single": round(s / l16, 2) if s == s else None,
}
print(json.dumps(out))
EOF
