"""Stands in for the `vllm` executable in tests: records its command line, then becomes an
llmhost server with the scripted engine on the port and model name vLLM was asked for.
STANDIN_FAIL=1 makes it die at start, as vLLM does on a bad model or no GPU."""

from __future__ import annotations

import json
import os
import sys
import tempfile


def main() -> None:
    args = sys.argv[1:]
    record = os.environ.get("STANDIN_RECORD")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "argv": args}) + "\n")
    if os.environ.get("STANDIN_FAIL"):
        print("ValueError: no CUDA device", file=sys.stderr)
        sys.exit(1)
    assert args[0] == "serve"
    port = args[args.index("--port") + 1]
    name = args[args.index("--served-model-name") + 1]
    env = {
        **os.environ,
        "LLMHOST_HOME": tempfile.mkdtemp(prefix="standin-"),
        "LLMHOST_AUDIT": "false",
    }
    os.execve(
        sys.executable,
        [
            sys.executable,
            "-m",
            "llmhost",
            "serve",
            "--engine",
            "fake",
            "--port",
            port,
            "--model-name",
            name,
            "--no-auth",
            "--log-level",
            "warning",
        ],
        env,
    )


if __name__ == "__main__":
    main()
