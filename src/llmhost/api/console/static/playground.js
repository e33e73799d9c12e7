// The playground: one chat completion streamed through the console (POST /console/playground
// /chat with the session's CSRF token), the server-sent events read as they arrive, the
// answer shown as text with its time to first token and tokens per second.
"use strict";
(function () {
  const form = document.getElementById("chat");
  if (!form) return;
  const $ = (id) => document.getElementById(id);
  const transcript = $("transcript"), send = $("send"), stop = $("stop");
  const messages = [];
  let controller = null;

  function bubble(role, text) {
    const p = document.createElement("p");
    p.className = "msg " + role;
    const who = document.createElement("b");
    who.textContent = role + ": ";
    const body = document.createElement("span");
    body.textContent = text;
    p.append(who, body);
    transcript.append(p);
    return body;
  }

  function show(ttft, tps, tokens, status) {
    $("ttft").textContent = ttft === null ? "-" : ttft.toFixed(0);
    $("tps").textContent = tps === null ? "-" : tps.toFixed(1);
    $("tokens").textContent = String(tokens);
    $("status").textContent = status;
  }

  async function readStream(response, out, t0) {
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "", text = "", chunks = 0, usage = null, tFirst = null, tLast = null;
    let timing = null;  // the server's: a fast model's tokens reach the page in a few reads
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (event.startsWith("event: timing\ndata: ")) {
          timing = JSON.parse(event.slice(event.indexOf("\n") + 7));
          continue;
        }
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "error");
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = (choice.delta && choice.delta.content) || "";
          if (!piece) continue;
          const now = performance.now();
          if (tFirst === null) tFirst = now;
          tLast = now;
          chunks += 1;
          text += piece;
          out.textContent = text;
        }
      }
      const tokens = usage ? usage.completion_tokens : chunks;
      const secs = tFirst !== null && tLast > tFirst ? (tLast - tFirst) / 1000 : null;
      show(tFirst === null ? null : tFirst - t0, secs ? (tokens - 1) / secs : null, tokens,
           "streaming");
    }
    return {text, tokens: usage ? usage.completion_tokens : chunks, tFirst, tLast, timing};
  }

  // The chat request: the temperature only when one is given (empty: the model's default).
  function request(turn) {
    const body = {
      model: $("model").value,
      messages: messages.concat([turn]),
      max_tokens: Number($("max-tokens").value) || 128,
      stream: true,
      stream_options: {include_usage: true},
    };
    const temperature = $("temperature").value.trim();
    if (temperature !== "") body.temperature = Number(temperature);
    return body;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const content = $("message").value;
    if (!content.trim()) return;
    const turn = {role: "user", content};
    bubble("user", content);
    $("message").value = "";
    const out = bubble("assistant", "");
    send.disabled = true;
    stop.disabled = false;
    controller = new AbortController();
    show(null, null, 0, "waiting");
    const t0 = performance.now();
    try {
      const r = await fetch(form.dataset.src, {
        method: "POST",
        credentials: "same-origin",
        signal: controller.signal,
        headers: {"Content-Type": "application/json", "X-CSRF-Token": form.dataset.csrf},
        body: JSON.stringify(request(turn)),
      });
      if (!r.ok) {
        let message = "HTTP " + r.status;
        try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
        throw new Error(message);
      }
      const got = await readStream(r, out, t0);
      // The conversation keeps a turn once it is answered: a refused or stopped one is not
      // sent again with the next.
      messages.push(turn, {role: "assistant", content: got.text});
      // tokens/s from the server's times when it sent them, else from the page's own
      const secs = got.timing && got.timing.decode_ms ? got.timing.decode_ms / 1000
        : got.tFirst !== null && got.tLast > got.tFirst ? (got.tLast - got.tFirst) / 1000 : null;
      show(got.tFirst === null ? null : got.tFirst - t0,
           secs ? (got.tokens - 1) / secs : null, got.tokens, "done");
    } catch (e) {
      out.parentElement.classList.add("failed");
      $("status").textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
    } finally {
      send.disabled = false;
      stop.disabled = true;
      controller = null;
    }
  });
  stop.addEventListener("click", () => { if (controller) controller.abort(); });
})();
