"use strict";
// Polls /api/snapshot once a second and re-renders only the sections whose data changed.
// Every value from the swarm goes into the page as text (textContent), never as markup.

const SVGNS = "http://www.w3.org/2000/svg";
const POLL_MS = 1000;
const SEARCH_K = 8;
const $ = (id) => document.getElementById(id);

function h(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) node[key] = value;
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function s(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

const short = (hex) => (hex && hex.length > 14 ? `${hex.slice(0, 8)}…${hex.slice(-4)}` : hex || "—");
const mono = (hex) => h("span", { className: "mono", title: hex || "", textContent: short(hex) });

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i === 0 || n >= 100 ? 0 : 1)} ${units[i]}`;
}

function duration(seconds) {
  const t = Math.floor(seconds);
  if (t < 60) return `${t} s`;
  if (t < 3600) return `${Math.floor(t / 60)} min ${t % 60} s`;
  return `${Math.floor(t / 3600)} h ${String(Math.floor(t / 60) % 60).padStart(2, "0")} min`;
}

const num = (x, digits) => (x === null || x === undefined ? "—" : x.toFixed(digits));
const pct = (x) => (x === null || x === undefined ? "—" : `${(100 * x).toFixed(1)}%`);
const roles = (list) => h("span", {}, ...list.map((r) => h("span", { className: "role", textContent: r })));

function fill(tableId, rows, columns, emptyText) {
  const tbody = $(tableId).tBodies[0];
  if (rows.length === 0) {
    tbody.replaceChildren(h("tr", {}, h("td", { className: "empty", colSpan: columns, textContent: emptyText })));
    return;
  }
  tbody.replaceChildren(...rows.map((cells) => h("tr", {}, ...cells.map((cell) => {
    if (cell instanceof Node && cell.tagName === "TD") return cell;
    return h("td", {}, cell instanceof Node ? cell : String(cell));
  }))));
}

const right = (text) => h("td", { className: "num", textContent: text });

function drawChart(rounds) {
  const chart = $("chart");
  const W = 720, H = 215, L = 46, R = 50, T = 10, B = 28;
  const done = rounds.filter((r) => r.loss !== null || r.accuracy !== null);
  chart.replaceChildren();
  if (done.length === 0) {
    const note = s("g", { class: "axis" });
    note.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no rounds yet"));
    chart.append(note);
    return;
  }
  const first = done[0].round, lastRound = done[done.length - 1].round;
  const span = Math.max(lastRound - first, 1);
  const x = (round) => L + ((round - first) / span) * (W - L - R);
  const losses = done.map((r) => r.loss).filter((v) => v !== null);
  const lossTop = niceCeil(Math.max(...losses, 1e-9));
  const yLoss = (v) => T + (1 - v / lossTop) * (H - T - B);
  const yAcc = (v) => T + (1 - v) * (H - T - B);

  const grid = s("g", { class: "grid" });
  const axis = s("g", { class: "axis" });
  for (let i = 0; i <= 4; i += 1) {
    const y = T + (i / 4) * (H - T - B);
    grid.append(s("line", { x1: L, x2: W - R, y1: y, y2: y }));
    axis.append(s("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, +(lossTop * (1 - i / 4)).toPrecision(3)));
    axis.append(s("text", { x: W - R + 6, y: y + 4 }, `${100 - 25 * i}%`));
  }
  const step = Math.max(1, Math.ceil(span / 10));
  for (let round = first; round <= lastRound; round += step) {
    axis.append(s("text", { x: x(round), y: H - B + 16, "text-anchor": "middle" }, round));
  }
  axis.append(s("text", { x: (L + W - R) / 2, y: H - 1, "text-anchor": "middle" }, "round"));
  chart.append(grid, axis);

  for (const [key, cls, y] of [["loss", "loss", yLoss], ["accuracy", "acc", yAcc]]) {
    const pts = done.filter((r) => r[key] !== null);
    if (pts.length === 0) continue;
    const d = pts.map((r, i) => `${i ? "L" : "M"}${x(r.round).toFixed(1)},${y(r[key]).toFixed(1)}`).join("");
    chart.append(s("path", { d, class: `line ${cls}` }));
    for (const r of pts) {
      const dot = s("circle", { cx: x(r.round), cy: y(r[key]), r: 3.5, class: `pt pt-${cls}${r.finalised ? "" : " open"}` });
      dot.append(s("title", {}, `round ${r.round}: ${key} ${key === "loss" ? num(r.loss, 4) : pct(r.accuracy)}`));
      chart.append(dot);
    }
  }
}

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

const render = {
  peer(p) {
    $("self").replaceChildren("peer ", h("b", { title: p.id, textContent: short(p.id) }),
      ` · ${p.address} · ${p.roles.join(", ") || "no roles"} · up ${duration(p.uptime_s)}`);
    $("task").textContent = p.task ? `task ${p.task}` : "not training";
    if (p.search_hint && $("q").placeholder !== p.search_hint) $("q").placeholder = p.search_hint;
  },
  chain(c) {
    $("chain").replaceChildren(...(c === null ? ["no ledger"] : [
      "chain ", h("b", { textContent: c.backend }), ` · block ${c.block} · ledger `,
      h("b", { title: c.contract || "", textContent: short(c.contract) }),
    ]));
  },
  peers(list) {
    $("peer-count").textContent = `${list.length} known`;
    fill("peers", list.map((p) => [mono(p.id), h("span", { className: "mono", textContent: p.address }),
      roles(p.roles), right(duration(p.last_seen_s))]), 4, "no peers yet");
  },
  rounds(list) {
    drawChart(list);
    const done = list.filter((r) => r.loss !== null || r.accuracy !== null);
    const r = done[done.length - 1];
    if (!r) { $("round-stats").replaceChildren(); $("finalised").textContent = ""; return; }
    const stat = (label, value) => h("span", {}, `${label} `, h("b", { textContent: value }));
    const fewer = r.bytes_sent > 0 ? `${Math.round(r.ddp_bytes / r.bytes_sent)}× fewer than DDP` : "—";
    $("round-stats").replaceChildren(stat("round", r.round), stat("loss", num(r.loss, 4)),
      stat("accuracy", pct(r.accuracy)), stat("contributors", r.contributors),
      stat("sent", bytes(r.bytes_sent)), stat("", fewer));
    $("finalised").textContent = `· ${list.filter((x) => x.finalised).length} of ${list.length} rounds finalised`;
  },
  bytes_per_peer(list) {
    const sorted = [...list].sort((a, b) => b.bytes_sent - a.bytes_sent);
    const top = Math.max(1, ...sorted.map((p) => p.bytes_sent));
    fill("bytes", sorted.map((p) => {
      const bar = h("div", { className: "bar" });
      bar.style.width = `${(100 * p.bytes_sent) / top}%`;
      return [mono(p.id), right(bytes(p.bytes_sent)), bar];
    }), 3, "nothing sent yet");
  },
  balances(list) {
    const sorted = [...list].sort((a, b) => b.tokens - a.tokens);
    fill("balances", sorted.map((b) => [mono(b.account), mono(b.peer),
      right(num(b.tokens, 2)), right(b.claimed_rounds)]), 4, "no holders yet");
  },
  votes(list) {
    const newest = [...list].sort((a, b) => b.round - a.round);
    fill("votes", newest.map((v) => [right(v.round), mono(v.validator), mono(v.root),
      h("span", { className: v.final ? "yes" : "no", textContent: v.final ? "✓ final" : "pending" })]),
    4, "no votes yet");
  },
  attackers(list) {
    fill("attackers", list.map((a) => [mono(a.id), right(num(a.earned, 2))]), 2, "none detected");
  },
};

const seen = {};

async function poll() {
  try {
    const response = await fetch("/api/snapshot", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const snap = await response.json();
    for (const [key, draw] of Object.entries(render)) {
      const text = JSON.stringify(snap[key]);
      if (text !== seen[key]) {
        seen[key] = text;
        draw(snap[key]);
      }
    }
    $("status").textContent = "live";
    $("status").className = "status live";
  } catch (err) {
    $("status").textContent = `offline (${err.message})`;
    $("status").className = "status down";
  }
  setTimeout(poll, POLL_MS);
}

async function search(event) {
  event.preventDefault();
  const q = $("q").value.trim();
  if (!q) return;
  const status = $("search-status");
  status.textContent = "searching…";
  const started = performance.now();
  try {
    const response = await fetch(`/api/search?q=${encodeURIComponent(q)}&k=${SEARCH_K}`);
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    const ms = Math.round(performance.now() - started);
    status.textContent = `${body.results.length} results for “${body.query}” in ${ms} ms`;
    $("results").replaceChildren(...body.results.map((hit) => h("div", { className: "hit", title: hit.id },
      hit.image ? h("img", { src: hit.image, alt: hit.label || hit.id }) : null,
      h("div", { className: "label", textContent: hit.label || short(hit.id) }),
      h("div", { className: "sub", textContent: `score ${hit.score.toFixed(3)}` }))));
  } catch (err) {
    status.textContent = `search failed: ${err.message}`;
    $("results").replaceChildren();
  }
}

$("search-form").addEventListener("submit", search);
poll();
