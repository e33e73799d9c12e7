"""Locust users for an OpenAI-compatible server (run by `llmhost loadtest`, or by hand:
`locust -f $(python -c 'import llmhost.ops.locustfile as m; print(m.__file__)')`).

Each user alternates streaming chat completions (whose time to first token is reported as
its own entry, "TTFT") and non-streaming completions. Settings come from the environment:
LLMHOST_API_KEY, LLMHOST_LT_MODEL, LLMHOST_LT_MAX_TOKENS (default 64), LLMHOST_LT_PROMPT."""

from __future__ import annotations

import json
import os
import time

from locust import HttpUser, between, task

MAX_TOKENS = int(os.environ.get("LLMHOST_LT_MAX_TOKENS", "64"))
PROMPT = os.environ.get("LLMHOST_LT_PROMPT", "Explain in a few sentences what a load test is.")
MODEL = os.environ.get("LLMHOST_LT_MODEL") or None


class OpenAIUser(HttpUser):
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        key = os.environ.get("LLMHOST_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def _body(self, **extra) -> dict:
        body = {"max_tokens": MAX_TOKENS, **extra}
        if MODEL:
            body["model"] = MODEL
        return body

    @task(2)
    def chat_stream(self) -> None:
        body = self._body(messages=[{"role": "user", "content": PROMPT}], stream=True)
        t0 = time.perf_counter()
        first = None
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers=self.headers,
            stream=True,
            catch_response=True,
            name="/v1/chat/completions (stream)",
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            done = False
            for line in resp.iter_lines():
                if not line or not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    resp.failure(chunk["error"].get("message", "error in stream"))
                    return
                if first is None and any(
                    c.get("delta", {}).get("content") for c in chunk.get("choices", [])
                ):
                    first = time.perf_counter()
            if not done:
                resp.failure("stream ended without [DONE]")
                return
            resp.success()
        if first is not None:
            self.environment.events.request.fire(
                request_type="TTFT",
                name="time to first token",
                response_time=(first - t0) * 1000,
                response_length=0,
                exception=None,
                context={},
            )

    @task(1)
    def completion(self) -> None:
        with self.client.post(
            "/v1/completions",
            json=self._body(prompt=PROMPT),
            headers=self.headers,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
            elif resp.json().get("usage", {}).get("completion_tokens", 0) < 1:
                resp.failure("no tokens generated")
            else:
                resp.success()
