#!/usr/bin/env bash
# Sets up everything the tests need, then runs lint, the layer contract, mypy and the test suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."

LLMHOST_EXTRAS=dev,transformers ./scripts/install.sh

# Debian packages the tests drive for real: aria2 and nginx for the download benchmark's smoke
# run (curl and bc time it), redis-server for rate limits shared between instances, wrk for the
# gateway benchmark's smoke run, postgresql for the shared audit log, prometheus (with promtool)
# for the alert rules and a real scrape, chromium (headless) for a page on another origin
# calling the server through CORS and for the console, node and npm for a real OpenID Connect
# provider (npm's oidc-provider, installed into ~/.cache on first use) for the console's SSO
# (the tests start their own throwaway servers on loopback).
# Installed when missing and we may (root); otherwise the tests that need them skip, except
# under CI=true, where they fail.
need=()
command -v aria2c >/dev/null || need+=(aria2)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
command -v bc >/dev/null || need+=(bc)
command -v redis-server >/dev/null || need+=(redis-server)
command -v wrk >/dev/null || need+=(wrk)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
command -v promtool >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing ${need[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${need[@]}" >/dev/null
fi

echo "[test] ruff" >&2
.venv/bin/ruff check src tests benchmarks
echo "[test] import layers" >&2
.venv/bin/lint-imports --no-cache
echo "[test] mypy" >&2
.venv/bin/mypy
echo "[test] pytest" >&2
.venv/bin/python -m pytest "$@"
