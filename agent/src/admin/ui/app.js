// Ward's view of one node: the flows the agent holds (/v1/events) with ward observe's
// filters, and a pod's policies (/v1/show). Plain JavaScript, no network but the agent.
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
    const h = e.HTTP || {};
    return {
      time: e.Timestamp, type: "http", verdict: verdict(e),
      src: side(e.SourceEndpoint.Pod, e.SourceEndpoint.IP, e.SourceEndpoint.Port),
      dst: side(e.DestinationEndpoint.Pod, e.DestinationEndpoint.IP, e.DestinationEndpoint.Port),
      summary: h.Method + " http://" + h.Host + h.Path + " => " + h.Code + (e.Info ? ": " + e.Info : ""),
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
  tbody.replaceChildren();
  for (const f of rows) {
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
  document.body.dataset.rows = String(rows.length);
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

// Filters from the address (`/ui/?verdict=DROPPED&namespace=app`), as links share them.
for (const [k, v] of new URLSearchParams(location.search)) {
  if (form.elements[k]) form.elements[k].value = v;
}
form.addEventListener("input", render);
window.addEventListener("hashchange", showPod);
load();
showPod();
setInterval(load, 2000);
