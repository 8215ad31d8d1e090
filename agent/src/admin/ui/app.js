// Ward's view of one node: a map and a table of the flows the agent holds (/v1/events)
// with ward observe's filters, and a pod's policies (/v1/show). Plain JavaScript, no
// network but the agent.
"use strict";

const form = document.getElementById("filters");
const tbody = document.querySelector("#flows tbody");

// Hubble's verdict of a record: Ward's `denied` is DROPPED.
function verdict(e) {
  if (e.type === "drop") return "DROPPED";
  const v = String(e.type === "http" ? e.Verdict : e.verdict).toLowerCase();
  return { denied: "DROPPED", forwarded: "FORWARDED", error: "ERROR" }[v] || "";
}

function side(pod, ip, port) {
  return { pod: pod || "", text: (pod || ip || "?") + (port ? ":" + port : "") };
}

// One record as a row's fields.
function flow(e) {
  if (e.type === "drop") {
    return {
      time: e.time, type: "drop", verdict: verdict(e),
      src: side(e.source.pod, e.source.ip, e.source.port),
      dst: side(e.destination.pod, e.destination.ip, e.destination.port),
      summary: e.reason + ", " + e.direction + (e.explanation ? ": " + e.explanation : ""),
    };
  }
  if (e.type === "http") {
    const h = e.HTTP;
    const tls = e.TLS ? " (TLS SNI " + (e.TLS.SNI || "none") + ", " + e.TLS.Mode + ")" : "";
    const request = h ? h.Method + " " + h.Scheme + "://" + h.Host + h.Path + " => " + h.Code : "session";
    return {
      time: e.Timestamp, type: "http", verdict: verdict(e),
      src: side(e.SourceEndpoint.Pod, e.SourceEndpoint.IP, e.SourceEndpoint.Port),
      dst: side(e.DestinationEndpoint.Pod, e.DestinationEndpoint.IP, e.DestinationEndpoint.Port),
      summary: request + tls + (e.Info ? ": " + e.Info : ""),
    };
  }
  if (e.type === "dns") {
    const [ip, port] = [e.client.replace(/:\d+$/, ""), e.client.replace(/^.*:/, "")];
    const src = e.source.includes("/") ? side(e.source, ip, port) : side("", ip, port);
    return {
      time: e.time, type: "dns", verdict: verdict(e), src: src, dst: side("", e.server, 0),
      summary: e.qname + " " + e.qtype + (e.rcode ? " => " + e.rcode : "") + (e.reason ? ": " + e.reason : ""),
    };
  }
  return null;
}

function filters() {
  const data = new FormData(form);
  return {
    verdict: data.get("verdict"), type: data.get("type"),
    namespace: data.get("namespace").trim(), pod: data.get("pod").trim(),
  };
}

const ns = (pod) => pod.split("/")[0];

// The filters of ward observe: --verdict, --type, --namespace (either side), --pod
// (either side, the name a prefix).
function matches(f, want) {
  if (want.verdict && f.verdict !== want.verdict.toUpperCase()) return false;
  if (want.type === "l7" && f.type !== "http" && f.type !== "dns") return false;
  if (want.type && want.type !== "l7" && f.type !== want.type) return false;
  const pods = [f.src.pod, f.dst.pod].filter(Boolean);
  if (want.namespace && !pods.some((p) => ns(p) === want.namespace)) return false;
  if (want.pod && !pods.some((p) => p.startsWith(want.pod))) return false;
  return true;
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function podCell(tr, s) {
  const td = cell(tr, "");
  if (s.pod) {
    const a = document.createElement("a");
    a.href = "#pod=" + encodeURIComponent(s.pod);
    a.textContent = s.text;
    td.appendChild(a);
  } else {
    td.textContent = s.text;
  }
}

let flows = [];

function render() {
  const want = filters();
  const rows = flows.filter((f) => matches(f, want));
  drawMap(rows);
  const shown = pair ? rows.filter((f) => key(f.src) === pair.from && key(f.dst) === pair.to) : rows;
  tbody.replaceChildren();
  for (const f of shown) {
    const tr = document.createElement("tr");
    tr.className = f.verdict;
    cell(tr, f.time);
    podCell(tr, f.src);
    podCell(tr, f.dst);
    cell(tr, f.type, "type");
    cell(tr, f.verdict, "verdict");
    cell(tr, f.summary);
    tbody.appendChild(tr);
  }
  document.body.dataset.rows = String(shown.length);
}

// The service map: the workloads of the filtered flows as boxes grouped by namespace
// (addresses without a pod under "outside"), an edge per pair coloured by the worst
// verdict (DROPPED red, ERROR orange, FORWARDED green) with the counts; a click on an
// edge shows only that pair's flows in the table.
const SVG = "http://www.w3.org/2000/svg";
let pair = null;

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

const key = (s) => s.pod || s.text.replace(/:\d+$/, "");
const group = (k) => (k.includes("/") ? ns(k) : "outside");

function drawMap(rows) {
  const svg = document.getElementById("map");
  svg.replaceChildren();
  // an arrowhead at the destination's end of every edge
  const marker = svgEl("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" });
  marker.appendChild(svgEl("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#334155" }));
  const defs = svgEl("defs", {});
  defs.appendChild(marker);
  svg.appendChild(defs);
  const edges = new Map();
  const groups = new Map();
  for (const f of rows) {
    const [a, b] = [key(f.src), key(f.dst)];
    for (const k of [a, b]) {
      if (!groups.has(group(k))) groups.set(group(k), new Set());
      groups.get(group(k)).add(k);
    }
    const id = a + "\u0000" + b;
    if (!edges.has(id)) edges.set(id, { from: a, to: b, DROPPED: 0, FORWARDED: 0, ERROR: 0 });
    edges.get(id)[f.verdict] = (edges.get(id)[f.verdict] || 0) + 1;
  }
  const pos = new Map();
  const names = [...groups.keys()].sort();
  let height = 60;
  names.forEach((name, i) => {
    const x = 20 + i * 240;
    const members = [...groups.get(name)].sort();
    const g = svgEl("g", { class: "ns", "data-namespace": name });
    g.appendChild(svgEl("rect", { x: x - 10, y: 10, width: 200, height: 40 + members.length * 44, class: "nsbox" }));
    g.appendChild(svgEl("text", { x: x, y: 30, class: "nslabel" }, name));
    members.forEach((m, j) => {
      const y = 42 + j * 44;
      pos.set(m, { x: x, y: y });
      const w = svgEl("g", { class: "workload", "data-workload": m });
      w.appendChild(svgEl("rect", { x: x, y: y, width: 180, height: 32, rx: 4 }));
      w.appendChild(svgEl("text", { x: x + 8, y: y + 21 }, m.includes("/") ? m.split("/")[1] : m));
      g.appendChild(w);
    });
    height = Math.max(height, 60 + members.length * 44);
    svg.appendChild(g);
  });
  for (const e of edges.values()) {
    const [p, q] = [pos.get(e.from), pos.get(e.to)];
    const worst = e.DROPPED ? "DROPPED" : e.ERROR ? "ERROR" : "FORWARDED";
    const same = p.x === q.x;
    const [x1, y1] = [p.x + 180, p.y + 16];
    const [x2, y2] = [same ? q.x + 180 : q.x, q.y + 16];
    // another column: straight; the same column: a curve on the right of the boxes
    const d = same
      ? `M ${x1} ${y1} C ${x1 + 50} ${y1}, ${x2 + 50} ${y2}, ${x2} ${y2}`
      : `M ${x1} ${y1} L ${x2} ${y2}`;
    const line = svgEl("path", {
      d: d, class: "edge " + worst, "marker-end": "url(#arrow)", "data-from": e.from, "data-to": e.to,
      "data-dropped": e.DROPPED, "data-forwarded": e.FORWARDED, "data-error": e.ERROR,
    });
    line.appendChild(svgEl("title", {}, e.from + " -> " + e.to + ": " +
      e.DROPPED + " dropped, " + e.FORWARDED + " forwarded, " + e.ERROR + " error"));
    line.addEventListener("click", () => {
      pair = pair && pair.from === e.from && pair.to === e.to ? null : e;
      render();
    });
    svg.appendChild(line);
    const count = e.DROPPED + e.FORWARDED + e.ERROR;
    const cx = same ? x1 + 40 : (x1 + x2) / 2;
    svg.appendChild(svgEl("text", { x: cx, y: (y1 + y2) / 2 - 4, class: "count " + worst }, String(count)));
  }
  svg.setAttribute("width", String(40 + names.length * 240));
  svg.setAttribute("height", String(height + 10));
}


async function load() {
  try {
    const status = await (await fetch("/v1/status")).json();
    document.getElementById("node").textContent = "node " + status.node;
    const text = await (await fetch("/v1/events?follow=false")).text();
    flows = text.split("\n").filter(Boolean).map((l) => flow(JSON.parse(l))).filter(Boolean);
    render();
    document.body.dataset.flowsReady = "1";
  } catch (err) {
    const p = document.getElementById("error");
    p.textContent = "cannot read the agent: " + err;
    p.hidden = false;
  }
}

// The pod page: isolation and the selecting policies, as ward policy show lists them.
async function showPod() {
  const section = document.getElementById("pod");
  const m = location.hash.match(/^#pod=(.+)$/);
  if (!m) {
    section.hidden = true;
    return;
  }
  const pod = decodeURIComponent(m[1]);
  const resp = await fetch("/v1/show?pod=" + encodeURIComponent(pod));
  const body = await resp.json();
  section.replaceChildren();
  const h = document.createElement("h2");
  h.textContent = pod;
  section.appendChild(h);
  if (!resp.ok) {
    section.appendChild(document.createTextNode(body.error));
  } else {
    const v = body[0];
    for (const dir of ["ingress", "egress"]) {
      const d = v[dir];
      const p = document.createElement("p");
      p.textContent = dir + ": " + (d.isolated ? "isolated by " + d.isolated_by.join(", ") : "not isolated");
      section.appendChild(p);
      const ul = document.createElement("ul");
      for (const pol of d.policies) {
        const li = document.createElement("li");
        li.className = "policy" + (pol.default_deny ? " isolated" : "");
        li.textContent = pol.policy + " [" + pol.tier + "]: " +
          (pol.rules.length ? pol.rules.map((r) => r.action + " " + r.ports.join(", ") + " " +
            (r.peer_pods.length ? r.peer_pods.join(", ") : r.peers)).join("; ") : "no rules");
        ul.appendChild(li);
      }
      section.appendChild(ul);
    }
  }
  section.hidden = false;
  document.body.dataset.podReady = "1";
}

// Filters from the address (`/ui/?verdict=DROPPED&namespace=app`), as links share them;
// `from` and `to` pick one edge of the map, as a click on it does.
const params = new URLSearchParams(location.search);
for (const [k, v] of params) {
  if (form.elements[k]) form.elements[k].value = v;
}
if (params.get("from") && params.get("to")) {
  pair = { from: params.get("from"), to: params.get("to") };
}
form.addEventListener("input", render);
window.addEventListener("hashchange", showPod);
load();
showPod();
setInterval(load, 2000);
