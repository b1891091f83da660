// The swarm dashboard page: polls api/state every POLL_MS and redraws in place (no reload, no build step).
// Text from the network (public names, device names) is only ever set with textContent.
"use strict";

(() => {
  const POLL_MS = 2000; // while the page is visible
  const HIDDEN_POLL_MS = 10000; // while the tab is in the background
  const TIMEOUT_MS = 10000; // one request
  const NUMBERS_UP_TO = 64; // coverage cells show their replica count when the model has at most this many blocks

  const sections = new Map(); // model key -> the model's section: its elements and view state
  let lastState = null;
  let lastGoodAt = null; // Date of the last successful poll

  // ------------------------------------------------------------------------------------------------
  // Helpers

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "text") node.textContent = value;
      else node[key] = value;
    }
    for (const child of children) node.append(child);
    return node;
  }

  const fmt = {
    bytes(n) {
      if (!n) return "0";
      const units = ["B", "KiB", "MiB", "GiB", "TiB"];
      let i = 0;
      while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
      return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
    },
    // "19.7 / 23.5 GiB" (one unit when both share it)
    memory(free, total) {
      if (!total) return "—";
      const [f, t] = [fmt.bytes(free), fmt.bytes(total)];
      const [fUnit, tUnit] = [f.split(" ")[1], t.split(" ")[1]];
      return fUnit === tUnit ? `${f.split(" ")[0]} / ${t}` : `${f} / ${t}`;
    },
    rate(x) {
      if (!x) return "0";
      return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
    },
    int: (n) => Number(n).toLocaleString("en-US"),
    duration(s) {
      if (s < 60) return `${Math.max(0, s).toFixed(0)} s`;
      if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
      if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
      return `${Math.floor(s / 86400)} d`;
    },
    ago(s) { return s < 1 ? "just now" : `${fmt.duration(s)} ago`; },
    shortId: (id) => (id.length > 10 ? `…${id.slice(-8)}` : id),
    // [[0, 3], [5, 6]] -> "0–2, 5"
    ranges: (list) => list.map(([s, e]) => (e - s === 1 ? `${s}` : `${s}–${e - 1}`)).join(", "),
    plural: (n, word) => `${fmt.int(n)} ${word}${n === 1 ? "" : "s"}`,
  };

  // Consecutive blocks satisfying `test`, as [start, end) ranges.
  function runs(values, test) {
    const out = [];
    values.forEach((v, i) => {
      if (!test(v)) return;
      const last = out[out.length - 1];
      if (last && last[1] === i) last[1] = i + 1; else out.push([i, i + 1]);
    });
    return out;
  }

  const replicaClass = (n) => (n <= 0 ? "r0" : n === 1 ? "r1" : n === 2 ? "r2" : "r3");

  function verdictReason(m) {
    if (m.num_blocks === 0) return "no peer announces this model";
    if (m.health === "broken") {
      return `no online peer serves block${m.missing.length === 1 && m.missing[0][1] - m.missing[0][0] === 1 ? "" : "s"} ` +
        fmt.ranges(m.missing);
    }
    if (m.health === "degraded") {
      const single = m.coverage.filter((c) => c === 1).length;
      return `one failure from broken: ${single === 1 ? "block" : "blocks"} ${fmt.ranges(runs(m.coverage, (c) => c === 1))} ` +
        `${single === 1 ? "has" : "have"} a single online peer`;
    }
    return "every block is served by at least 2 online peers";
  }

  // Seconds since the server read the DHT (the state's times are relative to that read).
  const staleness = (state) => (state.updated_at ? Math.max(0, Date.now() / 1000 - state.updated_at) : 0);

  // ------------------------------------------------------------------------------------------------
  // One model's section

  function buildSection(key) {
    const s = { key, filter: "", block: null, model: null };
    s.name = el("h2", { className: "model-name" });
    s.keyText = el("code", { className: "model-key" });
    s.verdict = el("span", { className: "verdict", dataset: { testid: "verdict" } });
    s.reason = el("p", { className: "reason", dataset: { testid: "verdict-reason" } });
    s.facts = el("div", { className: "facts", dataset: { testid: "facts" } });
    s.strip = el("div", { className: "strip", dataset: { testid: "coverage" }, role: "img" });
    s.axis = el("div", { className: "axis" });
    const legend = el("div", { className: "legend" }, "online peers per block:",
      ...[["r0", "0"], ["r1", "1"], ["r2", "2"], ["r3", "3+"]].map(([cls, label]) =>
        el("span", { className: "legend-item" }, el("span", { className: `swatch ${cls}` }), label)),
      el("span", { className: "hint", text: "click a block to list its peers" }));
    s.coordinator = el("div", { className: "coordinator", dataset: { testid: "coordinator" } });
    s.search = el("input", { type: "search", placeholder: "filter peers: name, id, state, device…", className: "search" });
    s.search.addEventListener("input", () => { s.filter = s.search.value.trim().toLowerCase(); renderPeers(s); });
    s.blockFilter = el("button", { className: "block-filter", hidden: true, type: "button" });
    s.blockFilter.addEventListener("click", () => { s.block = null; renderModel(s, s.model); });
    s.count = el("span", { className: "count", dataset: { testid: "peer-count" } });
    s.tbody = el("tbody", { dataset: { testid: "peers" } });
    const columns = [
      ["Name", "the peer's public name (--public-name)"], ["Peer", "peer id (hover a cell for the whole id)"],
      ["State", "joining, online or draining"], ["Blocks", "the range [start:end) this peer serves, on the model's blocks"],
      ["Device", "device kind and name"], ["dtype", "weights dtype"], ["Memory", "free / total device memory (RAM on CPU)"],
      ["tok/s", "decode throughput through one block, as the peer measured it"],
      ["Free KV", "KV-cache tokens still free"], ["Sessions", "inference sessions open now"],
      ["Seen", "time since the peer's last announcement"],
    ];
    const head = el("tr", {}, ...columns.map(([text, title]) => el("th", { text, title })));
    const table = el("table", { className: "peers" }, el("thead", {}, head), s.tbody);
    s.root = el("section", { className: "model", dataset: { modelKey: key, testid: "model" } },
      el("div", { className: "model-head" }, s.verdict, el("div", {}, s.name, s.keyText)),
      s.reason,
      s.facts,
      s.strip, s.axis, legend,
      s.coordinator,
      el("div", { className: "tools" }, s.search, s.blockFilter, s.count),
      el("div", { className: "table-wrap" }, table));
    s.strip.addEventListener("click", (event) => {
      const cell = event.target.closest(".cell");
      if (!cell) return;
      const block = Number(cell.dataset.block);
      s.block = s.block === block ? null : block;
      renderModel(s, s.model);
    });
    return s;
  }

  function renderModel(s, m) {
    s.model = m;
    s.name.textContent = m.model_name || m.model_key;
    s.keyText.textContent = m.model_key;
    s.verdict.textContent = m.health;
    s.verdict.className = `verdict v-${m.health}`;
    s.reason.textContent = verdictReason(m);
    const c = m.peer_counts;
    s.facts.textContent = [
      fmt.plural(m.num_blocks, "block"),
      `${fmt.int(c.online || 0)} online`,
      `${fmt.int(c.joining || 0)} joining`,
      `${fmt.int(c.draining || 0)} draining`,
      m.peers.some((p) => p.state === "online" && p.throughput > 0)
        ? `bottleneck ${fmt.rate(m.bottleneck_throughput)} tok/s` : "no throughput reported yet",
      fmt.plural(m.active_sessions, "session"),
      `${fmt.int(m.free_cache_tokens)} free KV tokens`,
    ].join(" · ");
    renderStrip(s, m);
    renderCoordinator(s, m.coordinator);
    if (s.block !== null && s.block >= m.num_blocks) s.block = null;
    s.blockFilter.hidden = s.block === null;
    s.blockFilter.textContent = s.block === null ? "" : `block ${s.block} only ✕`;
    renderPeers(s);
  }

  function renderStrip(s, m) {
    const n = m.num_blocks;
    if (s.strip.childElementCount !== n) {
      s.strip.replaceChildren(...Array.from({ length: n }, (_, i) => el("div", { dataset: { block: String(i) } })));
      s.strip.style.gridTemplateColumns = `repeat(${Math.max(n, 1)}, minmax(0, 1fr))`;
      s.strip.classList.toggle("dense", n > NUMBERS_UP_TO);
    }
    m.coverage.forEach((count, i) => {
      const cell = s.strip.children[i];
      cell.className = `cell ${replicaClass(count)}${s.block === i ? " selected" : ""}`;
      cell.dataset.replicas = String(count);
      cell.textContent = n <= NUMBERS_UP_TO ? String(count) : "";
      cell.title = `block ${i}: ${fmt.plural(count, "online peer")}, ${fmt.rate(m.block_throughput[i])} tok/s`;
    });
    s.strip.setAttribute("aria-label", `coverage of ${n} blocks: ${m.coverage.join(" ")}`);
    const step = n <= 16 ? 1 : n <= 48 ? 4 : n <= 128 ? 8 : 16;
    const ticks = [];
    for (let i = 0; i < n; i += step) ticks.push(i);
    s.axis.replaceChildren(...ticks.map((i) => {
      const tick = el("span", { text: String(i) });
      tick.style.left = `${((i + 0.5) / n) * 100}%`;
      return tick;
    }));
  }

  function renderCoordinator(s, co) {
    const parts = [];
    const fact = (label, value, title) => {
      const v = el("strong", { text: value });
      if (title) v.title = title;
      parts.push(el("span", { className: "fact" }, `${label} `, v));
    };
    if (co.present) {
      fact("leader", fmt.shortId(co.leader), co.leader);
      fact("plan epoch", co.plan_epoch === null ? "none yet" : String(co.plan_epoch));
      if (co.plan_age_s !== null) fact("plan made", fmt.ago(co.plan_age_s));
      if (co.plan_assigned_peers !== null) fact("assigns", fmt.plural(co.plan_assigned_peers, "peer"));
      if (co.plan_uncovered.length) fact("cannot cover blocks", fmt.ranges(co.plan_uncovered));
      fact("lease expires in", fmt.duration(co.lease_expires_in_s));
      fact("standbys", co.standbys.length ? co.standbys.map(fmt.shortId).join(", ") : "none",
        co.standbys.join("\n"));
    } else {
      parts.push(el("strong", { text: "no coordinator" }));
      parts.push(el("span", { className: "muted", text: " — peers plan their own ranges" +
        (co.last_plan_epoch !== null ? ` (last plan in the DHT: epoch ${co.last_plan_epoch})` : "") }));
    }
    const children = [el("span", { className: "label", text: "Coordinator" }), ...parts];
    if (co.plan_note) children.push(el("span", { className: "muted note", text: co.plan_note }));
    s.coordinator.className = `coordinator ${co.present ? "has-leader" : "no-leader"}`;
    s.coordinator.replaceChildren(...children);
  }

  function peerMatches(s, p) {
    if (s.block !== null && !(p.blocks && p.blocks[0] <= s.block && s.block < p.blocks[1])) return false;
    if (!s.filter) return true;
    return [p.public_name, p.peer_id, p.state, p.device_kind, p.device_name, p.dtype]
      .some((v) => v && v.toLowerCase().includes(s.filter));
  }

  function rangeCell(p, n) {
    const track = el("div", { className: "track" });
    const place = (node, [a, b]) => {
      node.style.left = `${(a / n) * 100}%`;
      node.style.width = `${((b - a) / n) * 100}%`;
      track.append(node);
    };
    if (p.planned_blocks && !(p.blocks && p.blocks[0] === p.planned_blocks[0] && p.blocks[1] === p.planned_blocks[1])) {
      const planned = el("div", { className: "planned" });
      planned.title = `the plan assigns ${p.planned_blocks[0]}:${p.planned_blocks[1]}`;
      place(planned, p.planned_blocks);
    }
    if (p.blocks && n) place(el("div", { className: `fill s-${p.state}` }), p.blocks);
    const label = p.blocks ? `${p.blocks[0]}:${p.blocks[1]}` : "—";
    return el("td", {}, el("div", { className: "range" }, track, el("span", { className: "range-label", text: label })));
  }

  function renderPeers(s) {
    const m = s.model;
    const extra = staleness(lastState);
    const shown = m.peers.filter((p) => peerMatches(s, p));
    const rows = shown.map((p) => {
      const row = el("tr", { className: `peer-row s-${p.state}`, dataset: { peerId: p.peer_id, state: p.state } });
      const name = el("td", {}, el("span", { className: p.public_name ? "clip name" : "clip muted",
        text: p.public_name || "—" }));
      name.title = p.public_name;
      const id = el("td", { className: "mono", text: fmt.shortId(p.peer_id) });
      id.title = p.peer_id;
      const device = el("td", {}, el("span", { className: "clip",
        text: p.device_name ? `${p.device_kind} · ${p.device_name}` : p.device_kind }));
      device.title = p.device_name || p.device_kind;
      const memory = el("td", { className: "num", text: fmt.memory(p.free_memory_bytes, p.total_memory_bytes) });
      const throughput = el("td", { className: "num", text: p.throughput > 0 ? fmt.rate(p.throughput) : "—" });
      if (!(p.throughput > 0)) throughput.title = "this peer reports no throughput measurement";
      row.append(
        name, id,
        el("td", {}, el("span", { className: `state s-${p.state}`, text: p.state })),
        rangeCell(p, m.num_blocks),
        device,
        el("td", { text: p.dtype }),
        memory,
        throughput,
        el("td", { className: "num", text: fmt.int(p.free_cache_tokens) }),
        el("td", { className: "num", text: fmt.int(p.active_sessions) }),
        el("td", { className: "num", text: fmt.ago(p.last_seen_s + extra) }),
      );
      if (p.software_version) row.title = `swarm ${p.software_version}`;
      return row;
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colSpan: 11, className: "muted empty-row",
        text: m.peers.length ? "no peer matches the filter" : "no live peer record" })));
    }
    s.tbody.replaceChildren(...rows);
    s.count.textContent = shown.length === m.peers.length ? fmt.plural(m.peers.length, "peer")
      : `${fmt.int(shown.length)} of ${fmt.plural(m.peers.length, "peer")}`;
  }

  // ------------------------------------------------------------------------------------------------
  // The page

  const WORST = { broken: 3, degraded: 2, healthy: 1 };

  function render(state) {
    lastState = state;
    const main = document.getElementById("models");
    const seen = new Set();
    for (const m of state.models) {
      seen.add(m.model_key);
      let s = sections.get(m.model_key);
      if (!s) {
        s = buildSection(m.model_key);
        sections.set(m.model_key, s);
        main.append(s.root);
      }
      renderModel(s, m);
    }
    for (const [key, s] of sections) {
      if (!seen.has(key)) { s.root.remove(); sections.delete(key); }
    }
    document.getElementById("empty").hidden = state.models.length > 0;
    if (!state.models.length) {
      document.getElementById("empty").textContent = "No model is served in this swarm yet. Start a peer: " +
        "swarm run-peer MODEL --initial-peers ADDR…";
    }
    const peers = state.models.reduce((sum, m) => sum + m.peers.length, 0);
    const worst = state.models.reduce((w, m) => (WORST[m.health] > WORST[w] ? m.health : w), "healthy");
    document.getElementById("summary").textContent = state.models.length
      ? `${fmt.plural(state.models.length, "model")} · ${fmt.plural(peers, "peer")} · worst: ${worst}` : "";
    document.title = state.models.length ? `${worst.toUpperCase()} · swarm dashboard` : "swarm dashboard";
  }

  function setBanner(text) {
    const banner = document.getElementById("banner");
    banner.hidden = !text;
    banner.textContent = text || "";
    document.body.classList.toggle("stale", Boolean(text));
  }

  function showUpdated() {
    const node = document.getElementById("updated");
    if (!lastState || !lastState.updated_at) return;
    const when = new Date(lastState.updated_at * 1000);
    node.textContent = `updated ${when.toLocaleTimeString("en-GB")} (${fmt.ago(staleness(lastState))})`;
  }

  async function poll() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      const response = await fetch("api/state", { cache: "no-store", signal: controller.signal });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const state = await response.json();
      render(state);
      lastGoodAt = new Date();
      setBanner(state.error ? `${state.error} — showing the last state read successfully; retrying.` : null);
    } catch (error) {
      const since = lastGoodAt ? ` since ${lastGoodAt.toLocaleTimeString("en-GB")}` : "";
      const reason = error.name === "AbortError" ? "no answer in time" : error.message;
      setBanner(`Cannot reach the dashboard server (${reason})${since}; the page shows old data and keeps retrying.`);
    } finally {
      clearTimeout(timer);
      showUpdated();
      setTimeout(poll, document.visibilityState === "hidden" ? HIDDEN_POLL_MS : POLL_MS);
    }
  }

  poll();
})();
