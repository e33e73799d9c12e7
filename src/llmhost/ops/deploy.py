"""Blue-green deployments behind `llmhost router`.

The router knows both colours as upstreams named `blue` and `green`; one is live. A deploy:
1. takes all weight off the idle colour (so it gets no traffic however healthy it looks),
2. starts `llmhost serve` for the new model on the idle colour's port,
3. waits for /ready and a smoke generation; on failure stops it: it never saw traffic,
4. shifts traffic to it (at once, or in steps), then waits for the old colour to drain,
5. watches the new colour's error ratio and p99 latency at the router for a window; on a
   breach it shifts traffic back and stops the new colour (automatic rollback),
6. otherwise stops the old colour (SIGTERM: its last streams finish) and records the switch.

State (which colour is live, the process of each, the model) is kept in
`$LLMHOST_HOME/deploy.json`, so `status`, `promote` and `rollback` work from any shell."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from llmhost.errors import ConfigError, DeployError
from llmhost.store.manifest import atomic_write

log = logging.getLogger("llmhost.deploy")
COLOURS = ("blue", "green")


@dataclass
class Colour:
    port: int
    model: str | None = None
    pid: int | None = None
    args: list[str] = field(default_factory=list)


@dataclass
class DeployState:
    router: str
    live: str = "blue"
    canary: str | None = None  # the colour that has part of the traffic, awaiting promote
    colours: dict[str, Colour] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> DeployState:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"no deployment yet ({path}); run `llmhost deploy init`") from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable {path}: {exc}") from exc
        raw["colours"] = {k: Colour(**v) for k, v in raw.get("colours", {}).items()}
        return cls(**raw)

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self), indent=1).encode())

    @property
    def idle(self) -> str:
        return "green" if self.live == "blue" else "blue"


@dataclass(frozen=True)
class Guard:
    """When the new colour counts as failing after the switch."""

    watch_s: float = 60.0
    max_error_ratio: float = 0.05
    max_p99_s: float = 30.0
    min_requests: int = 10  # fewer in the window: judge by errors only if there are any


class Deployer:
    def __init__(
        self,
        state_path: Path,
        *,
        admin_token: str | None,
        python: Sequence[str] = (sys.executable, "-m", "llmhost"),
        say: Callable[[str], None] = log.info,
    ):
        self.state_path = state_path
        self.token = admin_token
        self.python = list(python)
        self.say = say

    # --- router ----------------------------------------------------------------------------

    def _status(self, st: DeployState) -> dict[str, dict]:
        try:
            r = httpx.get(st.router + "/router/status", timeout=5, headers=self._auth())
            if r.status_code == 401:
                raise DeployError(
                    f"router {st.router} refused its admin token: set LLMHOST_ROUTER_TOKEN or "
                    "pass --admin-token-file"
                )
            r.raise_for_status()
        except httpx.HTTPError as exc:
            raise DeployError(f"router {st.router} does not answer: {exc}") from exc
        return {u["name"]: u for u in r.json()["upstreams"]}

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token or ''}"}

    def _weights(self, st: DeployState, weights: dict[str, float]) -> None:
        try:
            r = httpx.put(
                st.router + "/router/weights",
                json=weights,
                timeout=5,
                headers=self._auth(),
            )
        except httpx.HTTPError as exc:
            raise DeployError(f"router {st.router} does not answer: {exc}") from exc
        if r.status_code != 200:
            raise DeployError(f"router refused the weights: {r.text[:300]}")

    # --- processes -------------------------------------------------------------------------

    def _start(self, colour: Colour, home: Path, log_path: Path) -> int:
        cmd = [
            *self.python,
            "serve",
            *([colour.model] if colour.model else []),
            "--port",
            str(colour.port),
            *colour.args,
        ]
        proc = subprocess.Popen(
            cmd,
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "LLMHOST_HOME": str(home)},
            start_new_session=True,
        )
        return proc.pid

    @staticmethod
    def _stop(pid: int | None, timeout: float = 60.0) -> None:
        if not pid:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    return
            except ChildProcessError:  # not our child: poll for it instead
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    def _ready_and_smoke(self, url: str, pid: int, timeout: float, headers: dict) -> str | None:
        """None when the server is ready and generates; else what went wrong."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return "the server exited during start-up"
            except (ProcessLookupError, ChildProcessError):
                return "the server exited during start-up"
            try:
                r = httpx.get(url + "/ready", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            return f"not ready within {timeout:.0f} s"
        try:
            r = httpx.post(
                url + "/v1/completions",
                headers=headers,
                timeout=60,
                json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True},
            )
        except httpx.HTTPError as exc:
            return f"smoke generation failed: {exc}"
        if r.status_code != 200:
            return f"smoke generation answered {r.status_code}: {r.text[:200]}"
        if r.json().get("usage", {}).get("completion_tokens", 0) < 1:
            return "smoke generation produced no tokens"
        return None

    def _drain(self, st: DeployState, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._status(st)[name]["outstanding"] == 0:
                return
            time.sleep(0.2)
        self.say(f"{name} still had requests after {timeout:.0f} s; stopping it gracefully")

    def _breach(self, st: DeployState, name: str, guard: Guard) -> str | None:
        end = time.monotonic() + guard.watch_s
        while time.monotonic() < end:
            u = self._status(st)[name]
            w = u["last_minute"]
            n, ratio, p99 = w["requests"], w["error_ratio"], w["p99_seconds"]
            if not u["healthy"]:
                return "it failed its health checks"
            if n and (n >= guard.min_requests or ratio == 1.0) and ratio > guard.max_error_ratio:
                return f"error ratio {ratio:.1%} > {guard.max_error_ratio:.1%} over {n} requests"
            if n >= guard.min_requests and p99 > guard.max_p99_s:
                return f"p99 latency {p99:.2f} s > {guard.max_p99_s:.2f} s"
            time.sleep(0.5)
        return None

    # --- commands --------------------------------------------------------------------------

    def init(
        self,
        router: str,
        blue_port: int,
        green_port: int,
        live: str = "blue",
        live_pid: int | None = None,
        live_model: str | None = None,
    ) -> DeployState:
        if live not in COLOURS:
            raise ConfigError("the live colour is blue or green")
        st = DeployState(
            router=router.rstrip("/"),
            live=live,
            colours={"blue": Colour(blue_port), "green": Colour(green_port)},
        )
        st.colours[live].pid, st.colours[live].model = live_pid, live_model
        self._status(st)  # the router must know both colours
        st.save(self.state_path)
        return st

    def start(
        self,
        model: str,
        *,
        home: Path,
        args: Sequence[str] = (),
        steps: Sequence[float] = (1.0,),
        step_s: float = 5.0,
        guard: Guard = Guard(),
        ready_timeout: float = 300.0,
        smoke_headers: dict | None = None,
    ) -> DeployState:
        st = DeployState.load(self.state_path)
        old, new = st.live, st.idle
        ups = self._status(st)
        if new not in ups or old not in ups:
            raise DeployError(f"the router at {st.router} needs upstreams named blue and green")
        target = st.colours[new]
        if target.pid:
            self._stop(target.pid)
        self._weights(st, {new: 0.0, old: 1.0})
        target.model, target.args = model, list(args)
        target.pid = self._start(target, home, home / f"deploy-{new}.log")
        st.save(self.state_path)  # a deploy killed from here on leaves its process on record
        url = ups[new]["url"]
        self.say(f"starting {model} on {new} ({url}), pid {target.pid}")
        problem = self._ready_and_smoke(url, target.pid, ready_timeout, smoke_headers or {})
        if problem:
            self._stop(target.pid)
            target.pid = None
            st.history.append(
                {
                    "t": time.time(),
                    "event": "smoke-failed",
                    "colour": new,
                    "model": model,
                    "why": problem,
                }
            )
            st.save(self.state_path)
            raise DeployError(
                f"{new} failed its smoke test ({problem}); it got no traffic, "
                f"{old} stays live. Log: {home / f'deploy-{new}.log'}"
            )
        # wait until the router itself has seen it healthy, or the shift would go nowhere
        deadline = time.monotonic() + 30
        while not self._status(st)[new]["healthy"]:
            if time.monotonic() > deadline:
                self._stop(target.pid)
                raise DeployError(f"the router does not see {new} as healthy")
            time.sleep(0.2)
        for share in steps:
            self._weights(st, {new: share, old: round(1.0 - share, 6)})
            self.say(f"traffic: {share:.0%} to {new}")
            if share < 1.0:
                why = self._breach(
                    st,
                    new,
                    Guard(step_s, guard.max_error_ratio, guard.max_p99_s, guard.min_requests),
                )
                if why:
                    return self._rollback(st, old, new, why)
        if steps[-1] < 1.0:
            st.canary = new
            st.history.append(
                {
                    "t": time.time(),
                    "event": "canary",
                    "colour": new,
                    "model": model,
                    "share": steps[-1],
                }
            )
            st.save(self.state_path)
            self.say(f"{new} takes {steps[-1]:.0%}; `llmhost deploy promote` to finish")
            return st
        return self._go_live(st, old, new, guard)

    def promote(self, guard: Guard = Guard()) -> DeployState:
        """Finish a canary deploy: all traffic to it, drain, watch, stop the old colour."""
        st = DeployState.load(self.state_path)
        if st.canary is None:
            raise DeployError("no canary to promote (`llmhost deploy status`)")
        new, old = st.canary, st.live
        self._weights(st, {new: 1.0, old: 0.0})
        return self._go_live(st, old, new, guard)

    def _go_live(self, st: DeployState, old: str, new: str, guard: Guard) -> DeployState:
        model = st.colours[new].model
        self._drain(st, old, timeout=120)
        why = self._breach(st, new, guard)
        if why:
            return self._rollback(st, old, new, why)
        self._stop(st.colours[old].pid)
        st.colours[old].pid = None
        st.live, st.canary = new, None
        st.history.append({"t": time.time(), "event": "live", "colour": new, "model": model})
        st.save(self.state_path)
        self.say(f"{new} is live with {model}; {old} stopped")
        return st

    def _rollback(self, st: DeployState, old: str, new: str, why: str) -> DeployState:
        self.say(f"rolling back: {new} breached ({why})")
        self._weights(st, {old: 1.0, new: 0.0})
        self._drain(st, new, timeout=60)
        self._stop(st.colours[new].pid)
        st.colours[new].pid = None
        st.canary = None
        st.history.append({"t": time.time(), "event": "rolled-back", "colour": new, "why": why})
        st.save(self.state_path)
        raise DeployError(f"rolled back to {old}: {new} {why}")

    def rollback(self) -> DeployState:
        """Manual: a canary loses its share and stops; otherwise traffic goes back to the
        previous colour, if it still runs."""
        st = DeployState.load(self.state_path)
        if st.canary is not None:
            canary = st.canary
            self._weights(st, {st.live: 1.0, canary: 0.0})
            self._drain(st, canary, timeout=60)
            self._stop(st.colours[canary].pid)
            st.colours[canary].pid = None
            st.canary = None
            st.history.append({"t": time.time(), "event": "manual-rollback", "colour": canary})
            st.save(self.state_path)
            return st
        other = st.idle
        if not self._status(st)[other]["healthy"]:
            raise DeployError(f"{other} is not running any more; deploy it again instead")
        self._weights(st, {other: 1.0, st.live: 0.0})
        st.history.append({"t": time.time(), "event": "manual-rollback", "colour": other})
        st.live = other
        st.save(self.state_path)
        return st
