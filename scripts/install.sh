#!/usr/bin/env bash
# Installs llmhost with its llama.cpp engine into ./.venv (idempotent; re-run to update).
#
#   ./scripts/install.sh                      # server + llama.cpp engine
#   LLMHOST_EXTRAS=dev,transformers ./scripts/install.sh   # plus test tools / other engines
#
# llama-cpp-python compiles llama.cpp from source. Its default build uses -march=native, and on
# some Xeon CPUs (those with AMX) the resulting binary crashes with SIGSEGV/SIGILL at the first
# decode. We build a portable AVX2/FMA/F16C binary instead; set CMAKE_ARGS yourself to override
# (for example add -DGGML_AVX512=ON on CPUs that have it, or -DGGML_CUDA=ON for NVIDIA GPUs).
#
# llama-cpp-python is always compiled here with these CMAKE_ARGS, never taken from pip's wheel
# cache (a wheel cached from another build would carry that build's flags). The flags used are
# kept in .venv/.llmhost-llama-cmake-args; a run with other CMAKE_ARGS rebuilds it, a run with
# the same ones leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
EXTRAS="llamacpp${LLMHOST_EXTRAS:+,$LLMHOST_EXTRAS}"
LLAMA_SPEC="llama-cpp-python>=0.3.16"  # as in pyproject.toml's llamacpp extra
LLAMA_STAMP=.venv/.llmhost-llama-cmake-args
say() { printf '\033[1m[install]\033[0m %s\n' "$*" >&2; }

apt_install() {
    # Only on Debian/Ubuntu and only as root (or with sudo); otherwise say what is missing.
    local sudo=""
    [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null && sudo="sudo -n"; }
    if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
        say "installing system packages: $*"
        $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
    else
        say "please install these system packages first: $*"; exit 1
    fi
}

"$PY" - <<'PYCHECK' || { say "llmhost needs Python >= 3.10 (set PYTHON=/path/to/python3.x)"; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYCHECK

need=()
command -v g++ >/dev/null || need+=(build-essential)
command -v cmake >/dev/null || need+=(cmake)
"$PY" -c "import venv, ensurepip" 2>/dev/null || need+=("python3-venv")
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
built_with="$(cat "$LLAMA_STAMP" 2>/dev/null || true)"
llama_pip=(install -q --no-cache-dir --no-binary llama-cpp-python)
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    why="not installed"
elif [ "$built_with" != "$CMAKE_ARGS" ]; then
    why="built with ${built_with:-unrecorded flags}, now CMAKE_ARGS differ"
    llama_pip+=(--force-reinstall --no-deps)
else
    why=""
fi
if [ -n "$why" ]; then
    say "building llama-cpp-python ($why; compiles llama.cpp: ~5 minutes on 2 cores) with CMAKE_ARGS=$CMAKE_ARGS"
    rm -f "$LLAMA_STAMP"
    .venv/bin/python -m pip "${llama_pip[@]}" "$LLAMA_SPEC"
    printf '%s\n' "$CMAKE_ARGS" > "$LLAMA_STAMP"
else
    say "llama-cpp-python already built with CMAKE_ARGS=$CMAKE_ARGS"
fi
if [[ ",$EXTRAS," == *",transformers,"* ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # The CPU build of torch is enough for the transformers engine's tests and small models.
    .venv/bin/python -m pip install -q "torch>=2.1,<=2.13.0"
fi
say "installing llmhost[$EXTRAS]"
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
if ! info="$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode().strip())')"; then
    say "llama-cpp-python does not load (see above); remove $LLAMA_STAMP and run this script again"
    exit 1
fi
say "llama.cpp build in use: $info"
.venv/bin/llmhost version >&2
say "done. Start the demo server with: .venv/bin/llmhost serve --demo"
