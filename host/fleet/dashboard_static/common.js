/* toma-edge fleet dashboard: helpers shared by the pages (no build step, no framework).
   Everything a device sends goes into the page through textContent, never innerHTML. */
"use strict";

const TE = {
  /* an element with attributes and text (text is never parsed as HTML) */
  el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  },
  mib(bytes) { return bytes === null || bytes === undefined ? null : bytes / 1048576; },
  bytes(b) {
    if (b === null || b === undefined) return "–";
    const a = Math.abs(b);
    if (a >= 1073741824) return (b / 1073741824).toFixed(2) + " GiB";
    if (a >= 1048576) return (b / 1048576).toFixed(1) + " MiB";
    if (a >= 1024) return (b / 1024).toFixed(1) + " KiB";
    return b + " B";
  },
  ms(s) { return s === null || s === undefined ? "–" : (s * 1000).toFixed(1) + " ms"; },
  pct(r) { return r === null || r === undefined ? "–" : (r * 100).toFixed(2) + "%"; },
  ago(ts, now) {
    if (ts === null || ts === undefined) return "never";
    const s = Math.max(0, (now || Date.now() / 1000) - ts);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
    return (s / 86400).toFixed(1) + " d ago";
  },
  time(ts) { return ts === null || ts === undefined ? "–" : new Date(ts * 1000).toLocaleString(); },
  status(online) {
    if (online === true) return ["online", "pill ok"];
    if (online === false) return ["offline", "pill bad"];
    return ["unknown", "pill"];
  },
  /* the memory bar: peak against budget */
  memBar(peak, budget) {
    const box = TE.el("div", { class: "membox" });
    const bar = TE.el("div", { class: "bar", role: "img" });
    const fill = TE.el("div");
    let label = "no memory figures yet";
    if (peak !== null && budget) {
      const frac = peak / budget;
      fill.style.width = Math.min(100, Math.max(0, frac * 100)).toFixed(1) + "%";
      if (frac > 1) bar.classList.add("over"); else if (frac > 0.9) bar.classList.add("near");
      label = TE.bytes(peak) + " / " + TE.bytes(budget) + " (" + (frac * 100).toFixed(0) + "%)";
    } else if (peak !== null) {
      label = TE.bytes(peak) + " / no budget";
    }
    bar.setAttribute("aria-label", label);
    bar.appendChild(fill);
    box.appendChild(bar);
    box.appendChild(TE.el("div", { class: "memtext" }, label));
    return box;
  },
  /* server-sent events with a live indicator; EventSource reconnects by itself */
  stream(url, onData) {
    const live = document.getElementById("live");
    const es = new EventSource(url);
    es.onopen = () => { live.textContent = "live"; live.className = "live on"; };
    es.onerror = () => { live.textContent = "reconnecting…"; live.className = "live off"; };
    es.onmessage = (ev) => onData(JSON.parse(ev.data));
    return es;
  },
};
