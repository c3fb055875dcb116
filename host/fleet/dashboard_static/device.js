/* toma-edge fleet dashboard: one device, its latency and memory charts (uPlot), live */
"use strict";

(() => {
  const parts = location.pathname.split("/");          // ["", "device", fleet, device_id]
  const fleet = decodeURIComponent(parts[2] || "");
  const deviceId = decodeURIComponent(parts[3] || "");
  const api = "/api/device/" + encodeURIComponent(fleet) + "/" + encodeURIComponent(deviceId);
  document.getElementById("title").textContent = fleet + " / " + deviceId;
  document.title = deviceId + " – toma-edge";

  const tel = { seq: [], ts: [], p50: [], p95: [], p99: [], rss: [], peak: [], budget: [] };
  const HISTORY = 2000;
  let latency = null, memory = null;

  function ms(v) { return v === null || v === undefined ? null : v * 1000; }

  function append(t) {
    for (let i = 0; i < t.seq.length; i++) {
      tel.seq.push(t.seq[i]); tel.ts.push(t.ts[i]);
      tel.p50.push(ms(t.latency_p50_s[i])); tel.p95.push(ms(t.latency_p95_s[i]));
      tel.p99.push(ms(t.latency_p99_s[i]));
      tel.rss.push(TE.mib(t.rss_bytes[i])); tel.peak.push(TE.mib(t.peak_rss_bytes[i]));
      tel.budget.push(TE.mib(t.budget_bytes[i]));
    }
    const extra = tel.seq.length - HISTORY;
    if (extra > 0) for (const k of Object.keys(tel)) tel[k].splice(0, extra);
  }

  function width(id) { return Math.max(260, document.getElementById(id).clientWidth); }

  function opts(id, series) {
    return {
      width: width(id), height: 240,
      scales: { x: { time: true } },
      series: [{}, ...series],
      axes: [{}, { size: 60 }],
      legend: { live: true },
    };
  }

  function draw() {
    const lat = [tel.ts, tel.p50, tel.p95, tel.p99];
    const mem = [tel.ts, tel.rss, tel.peak, tel.budget];
    if (!latency) {
      latency = new uPlot(opts("latency-chart", [
        { label: "p50 ms", stroke: "#7ea6f0", width: 1 },
        { label: "p95 ms", stroke: "#3b6fd8", width: 1 },
        { label: "p99 ms", stroke: "#c62828", width: 2 },
      ]), lat, document.getElementById("latency-chart"));
      memory = new uPlot(opts("memory-chart", [
        { label: "RSS MiB", stroke: "#7ea6f0", width: 1 },
        { label: "peak MiB", stroke: "#3b6fd8", width: 2 },
        { label: "budget MiB", stroke: "#c62828", width: 2, dash: [6, 4] },
      ]), mem, document.getElementById("memory-chart"));
    } else {
      latency.setData(lat);
      memory.setData(mem);
    }
  }

  function facts(d, now) {
    const [st] = TE.status(d.online);
    const items = [
      ["status", st], ["model", d.model || "–"], ["version", d.model_version || "–"],
      ["target", d.target || "–"], ["last seen", TE.ago(d.last_seen, now)],
      ["p99 latency", TE.ms(d.latency_p99_s)], ["error rate", TE.pct(d.error_rate)],
      ["memory peak", TE.bytes(d.peak_rss_bytes)], ["budget", TE.bytes(d.budget_bytes)],
      ["headroom", TE.bytes(d.headroom_bytes)], ["rejected messages", d.rejected],
      ["last window", tel.seq.length ? "#" + tel.seq[tel.seq.length - 1] : "–"],
    ];
    const dl = document.getElementById("facts");
    dl.replaceChildren(...items.map(([k, v]) => {
      const div = TE.el("div", { "data-fact": k });
      div.appendChild(TE.el("dt", {}, k));
      div.appendChild(TE.el("dd", {}, v));
      return div;
    }));
  }

  function events(list) {
    const rows = list.slice().reverse().map((e) => {
      const tr = TE.el("tr");
      tr.appendChild(TE.el("td", { "data-label": "seq" }, e.seq));
      tr.appendChild(TE.el("td", { "data-label": "time" }, TE.time(e.ts)));
      tr.appendChild(TE.el("td", { "data-label": "kind" }, e.kind));
      tr.appendChild(TE.el("td", { "data-label": "fields" }, e.fields));
      return tr;
    });
    document.querySelector("#events tbody").replaceChildren(...rows);
  }

  function update(data) {
    append(data.telemetry);
    facts(data.device, data.now);
    events(data.events);
    draw();
  }

  window.addEventListener("resize", () => {
    if (latency) latency.setSize({ width: width("latency-chart"), height: 240 });
    if (memory) memory.setSize({ width: width("memory-chart"), height: 240 });
  });

  fetch(api).then((r) => r.json().then((body) => ({ ok: r.ok, body }))).then(({ ok, body }) => {
    if (!ok) {
      const note = document.getElementById("note");
      note.hidden = false;
      note.textContent = body.error || "this device is unknown";
      return;
    }
    update(body);
    const after = tel.seq.length ? tel.seq[tel.seq.length - 1] : 0;
    TE.stream(api + "/stream?after_seq=" + after, update);
  });
})();
