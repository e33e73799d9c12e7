"""Logging set-up: readable text for a terminal, one JSON object per line for log shippers.
Every line passes through the redactor (e-mail, phones, ID and card numbers, keys, tokens,
passwords) before it is written; llmhost never logs prompt or completion text itself."""

from __future__ import annotations

import json
import logging
import time

MAX_LINE_CHARS = 4096  # a log line is cut here (a 64 KB URL in an access line, say)


class RedactingFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        from llmhost.security.redact import Redactor

        self.redactor = Redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        done = self.redactor.run(message, limit=MAX_LINE_CHARS)
        clean = done.text + (f"…[{done.truncated} more characters]" if done.truncated else "")
        if clean != message:
            record.msg, record.args = clean, ()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access lines go through the same handler so JSON mode stays one format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
