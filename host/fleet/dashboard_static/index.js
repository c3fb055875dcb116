/* toma-edge fleet dashboard: the device list, updated live from /api/devices/stream */
"use strict";

(() => {
  let snapshot = null;
  const tbody = document.querySelector("#devices tbody");
  const filter = document.getElementById("filter");

  function cell(label, content, cls) {
    const td = TE.el("td", { "data-label": label });
    if (cls) td.className = cls;
    if (content instanceof Node) td.appendChild(content); else td.textContent = content;
    return td;
  }

  function render() {
    if (!snapshot) return;
    const s = snapshot;
    document.getElementById("n-total").textContent = s.total;
    document.getElementById("n-online").textContent = s.online;
    document.getElementById("n-over").textContent = s.over_budget;
    const note = document.getElementById("note");
    note.hidden = s.shown >= s.total;
    note.textContent = "Showing the first " + s.shown + " of " + s.total + " devices.";
    document.getElementById("empty").hidden = s.total > 0;
    const q = filter.value.trim().toLowerCase();
    const rows = [];
    for (const d of s.devices) {
      const hay = [d.fleet, d.device_id, d.model || "", d.model_version || ""].join(" ").toLowerCase();
      if (q && !hay.includes(q)) continue;
      const tr = TE.el("tr", { "data-device": d.device_id, "data-fleet": d.fleet });
      tr.appendChild(cell("fleet", d.fleet));
      const link = TE.el("a", {
        href: "/device/" + encodeURIComponent(d.fleet) + "/" + encodeURIComponent(d.device_id),
      }, d.device_id);
      tr.appendChild(cell("device", link));
      const [st, stCls] = TE.status(d.online);
      tr.appendChild(cell("status", TE.el("span", { class: stCls }, st), "status"));
      const model = d.model ? d.model + (d.model_version ? " " + d.model_version : "") : "–";
      tr.appendChild(cell("model", model, "model"));
      tr.appendChild(cell("memory", TE.memBar(d.peak_rss_bytes, d.budget_bytes), "mem"));
      tr.appendChild(cell("p99", TE.ms(d.latency_p99_s), "p99"));
      const err = TE.pct(d.error_rate) + (d.rejected ? " (" + d.rejected + " rejected)" : "");
      tr.appendChild(cell("errors", err, d.error_rate > 0.05 || d.rejected ? "errors bad" : "errors"));
      tr.appendChild(cell("last seen", TE.ago(d.last_seen), "seen"));
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
  }

  filter.addEventListener("input", render);
  setInterval(render, 5000);  // "last seen" keeps counting between updates
  TE.stream("/api/devices/stream", (data) => { snapshot = data; render(); });
})();
