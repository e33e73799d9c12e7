// The overview's live part (models and charts): fetched from the server every few seconds
// and swapped in. The server renders it (the charts are SVG); this only moves it into place.
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!live) return;
  const src = live.dataset.src;
  const every = Math.max(1, Number(live.dataset.every) || 5) * 1000;
  let busy = false;

  async function refresh() {
    if (busy || document.hidden) return;
    // not while the user is typing into a form of the live part (a weight, say)
    const typing = document.activeElement;
    if (typing && typing.tagName === "INPUT" && live.contains(typing)) return;
    busy = true;
    try {
      const r = await fetch(src, {credentials: "same-origin", cache: "no-store"});
      if (r.status === 401) {
        window.location.reload();  // the session ended: the page sends us to the login
        return;
      }
      if (!r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      live.replaceChildren(...doc.body.childNodes);
      live.dataset.refreshed = String(Date.now());
    } catch (e) {
      // the server restarting: try again at the next tick
    } finally {
      busy = false;
    }
  }
  setInterval(refresh, every);
})();
