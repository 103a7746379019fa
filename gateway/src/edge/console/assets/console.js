// infergate console: live status from /console/api/events (server-sent
// events, read with fetch so the key goes in a header), and a playground
// that calls the client API through /console/api/play/... . Plain
// JavaScript, no dependencies. Nothing from the server is put in the page
// as HTML: every text goes in with textContent.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  /** The credential, in this tab's memory only (never stored). */
  let key = null;
  /** What /console/api/session said: role, public_url, ... */
  let session = null;
  /** The status stream now (an AbortController). */
  let stream = null;
  /** /v1/models, by id. */
  let models = new Map();

  // ---- DOM helpers -------------------------------------------------------

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role" || k === "for" || k === "scope") el.setAttribute(k, v);
      else el[k] = v;
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }

  const fmt = (x, digits = 1) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits));
  const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
  const badge = (text) => h("span", { class: "badge " + text }, text);

  function headers(extra) {
    const all = Object.assign({}, extra);
    if (key) all.Authorization = "Bearer " + key;
    return all;
  }

  // ---- session -----------------------------------------------------------

  async function start() {
    bindTabs();
    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      signIn($("key").value.trim());
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    $("play-form").addEventListener("submit", (e) => {
      e.preventDefault();
      run();
    });
    $("model").addEventListener("change", () => pickModel());
    $("copy-curl").addEventListener("click", copyCurl);
    await signIn(null);
  }

  async function signIn(candidate) {
    key = candidate || null;
    $("login-error").textContent = "";
    let r;
    try {
      r = await fetch("/console/api/session", { headers: headers() });
    } catch (e) {
      showLogin("The gateway cannot be reached.");
      return;
    }
    if (r.ok) {
      const s = await r.json();
      if (s.sign_in) {
        key = null;
        showLogin("");
        return;
      }
      session = s;
      enter();
      return;
    }
    key = null;
    showLogin(r.status === 403 ? "This key may not use the console." : "That key was refused.");
  }

  function showLogin(message) {
    stopStream();
    session = null;
    for (const id of ["view-status", "view-play", "tabs", "sign-out"]) $(id).hidden = true;
    $("who").textContent = "";
    $("login").hidden = false;
    $("login-error").textContent = message;
    $("key").value = "";
    $("key").focus();
  }

  function signOut(message) {
    key = null;
    showLogin(message);
  }

  function enter() {
    $("login").hidden = true;
    $("tabs").hidden = false;
    $("sign-out").hidden = !key;
    $("who").textContent = session.who ? `${session.who} (${session.role})` : session.role === "admin" ? "open console" : session.role;
    const mayPlay = session.playground;
    $("play-denied").hidden = mayPlay;
    $("play-form").hidden = !mayPlay;
    $("play-form").nextElementSibling.hidden = !mayPlay;
    select(location.hash === "#playground" ? "tab-play" : "tab-status", false);
    follow();
    if (mayPlay) loadModels();
  }

  // ---- tabs --------------------------------------------------------------

  const TABS = ["tab-status", "tab-play"];

  function bindTabs() {
    for (const id of TABS) {
      $(id).addEventListener("click", () => select(id, true));
      $(id).addEventListener("keydown", (e) => {
        const i = TABS.indexOf(id);
        let next = null;
        if (e.key === "ArrowRight") next = TABS[(i + 1) % TABS.length];
        else if (e.key === "ArrowLeft") next = TABS[(i + TABS.length - 1) % TABS.length];
        else if (e.key === "Home") next = TABS[0];
        else if (e.key === "End") next = TABS[TABS.length - 1];
        if (next) {
          e.preventDefault();
          select(next, true);
        }
      });
    }
  }

  function select(id, focus) {
    for (const tab of TABS) {
      const on = tab === id;
      $(tab).setAttribute("aria-selected", String(on));
      $(tab).tabIndex = on ? 0 : -1;
      $($(tab).getAttribute("aria-controls")).hidden = !on;
    }
    history.replaceState(null, "", id === "tab-play" ? "#playground" : "#status");
    if (focus) $(id).focus();
  }

  // ---- status ------------------------------------------------------------

  function setLive(on) {
    $("live").dataset.live = on ? "on" : "off";
    $("live").textContent = on ? "live" : "reconnecting";
  }

  function stopStream() {
    if (stream) stream.abort();
    stream = null;
  }

  /** Follow the status stream; reconnect a second after it ends. */
  async function follow() {
    stopStream();
    const ctl = new AbortController();
    stream = ctl;
    try {
      const r = await fetch("/console/api/events", { headers: headers(), signal: ctl.signal });
      if (r.status === 401 || r.status === 403) {
        signOut("The gateway no longer accepts this key.");
        return;
      }
      if (!r.ok) throw new Error("status " + r.status);
      setLive(true);
      await readEvents(r, (event) => {
        if (event.event === "status") renderStatus(JSON.parse(event.data));
      });
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    if (stream !== ctl) return;
    setLive(false);
    setTimeout(() => {
      if (stream === ctl) follow();
    }, 1000);
  }

  /** Read the server-sent events of `r`'s body, calling `onEvent` with each. */
  async function readEvents(r, onEvent) {
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buf.slice(0, end));
        buf = buf.slice(end + 2);
        if (event) onEvent(event);
      }
    }
  }

  function parseEvent(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    return data.length ? { event, data: data.join("\n") } : null;
  }

  function renderStatus(s) {
    $("pools").replaceChildren(...s.pools.map(renderPool));
    const t = s.traffic;
    $("window-note").textContent = `(figures: last ${t.summary_seconds} s; charts: last ${(t.chart_seconds || 300) / 60} min)`;
    const rows = t.models.map((m) =>
      h(
        "tr",
        { "data-model": m.model },
        h("th", { scope: "row" }, m.model),
        h("td", { class: "num" }, fmt(m.rate, 2)),
        h("td", { class: "num" }, pct(m.error_rate)),
        h("td", { class: "num" }, pct(m.refused_rate)),
        h("td", { class: "num" }, fmt(m.p50_ms)),
        h("td", { class: "num" }, fmt(m.p99_ms)),
        h("td", { class: "num" }, fmt(m.overhead_p50_ms, 3)),
        h("td", {}, chart(m.chart, ["rate", "errors"], `${m.model} requests and 5xx per second`)),
        h("td", {}, chart(m.chart, ["p50_ms", "p99_ms"], `${m.model} latency p50 and p99`)),
        h("td", {}, chart(m.chart, ["overhead_p50_ms"], `${m.model} gateway overhead p50`)),
      ),
    );
    $("models").tBodies[0].replaceChildren(
      ...(rows.length ? rows : [h("tr", {}, h("td", { colSpan: 10, class: "empty" }, "No requests yet."))]),
    );
    renderAliases(s.aliases);
    $("cache").replaceChildren(
      t.cache_hit_ratio === null
        ? h("p", { class: "empty" }, `No cache lookups in the last ${t.summary_seconds} s.`)
        : h("p", { id: "cache-ratio" }, h("b", {}, pct(t.cache_hit_ratio)), ` of ${t.cache_lookups} lookups hit (last ${t.summary_seconds} s)`),
    );
    const errors = t.errors.map((e) =>
      h(
        "tr",
        { "data-request-id": e.request_id },
        h("td", {}, new Date(e.at_ms).toLocaleTimeString()),
        h("td", {}, e.grpc_status === null ? String(e.status) : `${e.status} (grpc ${e.grpc_status})`),
        h("td", {}, h("code", {}, e.route)),
        h("td", {}, e.model),
        h("td", {}, h("code", {}, e.request_id)),
        h("td", { class: "detail" }, e.detail),
      ),
    );
    $("errors").tBodies[0].replaceChildren(
      ...(errors.length ? errors : [h("tr", {}, h("td", { colSpan: 6, class: "empty" }, "No errors."))]),
    );
  }

  function renderPool(p) {
    const workers = p.workers.map((w) =>
      h(
        "tr",
        { "data-worker": w.id, "data-state": w.state },
        h("th", { scope: "row" }, w.id),
        h("td", {}, badge(w.state)),
        h("td", { class: "num pid" }, w.pid === null || w.pid === undefined ? "–" : String(w.pid)),
        h("td", { class: "num" }, String(w.in_flight)),
        h("td", { class: "num" }, fmt(w.latency_ms)),
        h("td", { class: "num restarts" }, w.restarts === null || w.restarts === undefined ? "–" : String(w.restarts)),
        h("td", {}, h("code", { title: w.address }, shortAddress(w.address))),
      ),
    );
    return h(
      "article",
      { class: "card pool", "data-pool": p.name, "aria-label": `pool ${p.name}` },
      h(
        "h3",
        {},
        p.name,
        badge(p.circuit),
        p.models && p.models.join(",") !== p.name ? h("small", {}, "serves " + p.models.join(", ")) : null,
      ),
      h(
        "div",
        { class: "facts" },
        `ready ${p.ready_workers ?? "–"}/${p.workers.length} · active ${p.active} of ${p.slots} slots · queued ${p.queued}` +
          ` · batch queue ${p.batch_queued} · admitted ${pct(p.admitted_share)}`,
      ),
      p.load_error ? h("p", { class: "error" }, "Cannot load: " + p.load_error) : null,
      h(
        "div",
        { class: "scroll" },
        h(
          "table",
          { class: "grid workers" },
          h(
            "thead",
            {},
            h("tr", {}, ...["Worker", "State", "PID", "In flight", "Latency ms", "Restarts", "Address"].map((c) => h("th", { scope: "col" }, c))),
          ),
          h("tbody", {}, ...(workers.length ? workers : [h("tr", {}, h("td", { colSpan: 7, class: "empty" }, "No workers."))])),
        ),
      ),
    );
  }

  /** A Unix socket by its file name (the directory is the gateway's own); others as they are. */
  const shortAddress = (a) => (a.startsWith("unix:") ? "unix:…/" + a.split("/").pop() : a);

  function renderAliases(aliases) {
    if (!aliases.length) {
      $("aliases").replaceChildren(h("p", { class: "empty" }, "No aliases configured."));
      return;
    }
    const rows = aliases.flatMap((a) =>
      a.variants.map((v, i) =>
        h(
          "tr",
          { "data-alias": a.alias, "data-variant": v.name },
          i === 0 ? h("th", { scope: "rowgroup", rowSpan: a.variants.length }, a.alias) : null,
          h("td", {}, v.name),
          h("td", { class: "num" }, String(v.weight)),
          h("td", { class: "num" }, fmt(v.effective_weight)),
          h("td", {}, badge(v.state)),
        ),
      ),
    );
    const head = h("thead", {}, h("tr", {}, ...["Alias", "Variant", "Weight", "Effective", "State"].map((c) => h("th", { scope: "col" }, c))));
    $("aliases").replaceChildren(h("table", { class: "grid" }, head, h("tbody", {}, ...rows)));
  }

  const SVG = "http://www.w3.org/2000/svg";

  /** A small line chart of `series` (fields of each point), each scaled to the largest value. */
  function chart(points, series, title) {
    const W = 180;
    const H = 36;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "chart");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const max = Math.max(1e-9, ...points.flatMap((p) => series.map((s) => p[s] || 0)));
    const label = document.createElementNS(SVG, "title");
    label.textContent = `${title}; peak ${fmt(max, 2)}`;
    svg.append(label);
    for (const s of series) {
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", s.replace("_ms", "").replace("_p50", ""));
      const step = points.length > 1 ? W / (points.length - 1) : W;
      line.setAttribute(
        "points",
        points.map((p, i) => `${(i * step).toFixed(1)},${(H - 2 - ((p[s] || 0) / max) * (H - 4)).toFixed(1)}`).join(" "),
      );
      svg.append(line);
    }
    return svg;
  }

  // ---- playground --------------------------------------------------------

  const PLAY = "/console/api/play";
  const playHeaders = (extra) => headers(Object.assign({ "x-infergate-console": "1" }, extra));

  async function loadModels() {
    const r = await fetch(PLAY + "/v1/models", { headers: playHeaders() });
    if (!r.ok) {
      $("play-output").textContent = "Cannot list the models: " + r.status;
      return;
    }
    const list = (await r.json()).data.sort((a, b) => a.id.localeCompare(b.id));
    models = new Map(list.map((m) => [m.id, m]));
    const current = $("model").value;
    $("model").replaceChildren(
      ...list.map((m) => h("option", { value: m.id, selected: m.id === current }, `${m.id} (${m.streaming ? "chat, " : ""}${m.kind})`)),
    );
    await pickModel();
  }

  /** The ways `m` can be called: chat (streamed), embeddings, tensors. */
  function modesOf(m) {
    const modes = [];
    if (m.streaming || m.kind === "generate") modes.push(["chat", "Chat (streamed)"]);
    if (m.kind === "embed") modes.push(["embeddings", "Embeddings"]);
    if (m.kind === "infer") modes.push(["tensors", "Tensors (OIP)"]);
    return modes.length ? modes : [["tensors", "Tensors (OIP)"]];
  }

  function mode() {
    const checked = document.querySelector("input[name=mode]:checked");
    return checked ? checked.value : "tensors";
  }

  async function pickModel() {
    const m = models.get($("model").value);
    if (!m) return;
    const modes = modesOf(m);
    $("modes").replaceChildren(
      h("legend", {}, "Call"),
      ...modes.map(([value, text], i) =>
        h("label", {}, h("input", { type: "radio", name: "mode", value, checked: i === 0, onchange: () => renderInputs(m) }), text),
      ),
    );
    await renderInputs(m);
  }

  async function renderInputs(m) {
    const box = $("play-inputs");
    const which = mode();
    if (which === "chat") {
      box.replaceChildren(
        h("label", { for: "chat-message" }, "Message"),
        h("textarea", { id: "chat-message", value: "Stream this answer back to me one word at a time, please." }),
        h("label", { for: "max-tokens" }, "Max tokens (empty: the model's own limit)"),
        h("input", { id: "max-tokens", type: "number", min: 1, inputMode: "numeric" }),
      );
    } else if (which === "embeddings") {
      box.replaceChildren(
        h("label", { for: "embed-inputs" }, "Texts, one per line (norms and pairwise cosine are shown)"),
        h("textarea", { id: "embed-inputs", value: "A cat sits on the mat.\nA kitten rests on a rug.\nThe stock market fell today." }),
      );
    } else {
      box.replaceChildren(h("p", { class: "note" }, "Reading the model's metadata…"));
      const r = await fetch(`${PLAY}/v2/models/${encodeURIComponent(m.id)}`, { headers: playHeaders() });
      const meta = r.ok ? await r.json() : { inputs: [] };
      box.replaceChildren(...tensorForm(meta.inputs || []));
    }
  }

  /** An input [?, 3, H, W] of FP32 is an image: a JPEG or PNG is sent as it is. */
  const isImage = (t) => t.datatype === "FP32" && t.shape.length === 4 && t.shape[1] === 3;

  function tensorForm(inputs) {
    if (inputs.length === 1 && isImage(inputs[0])) {
      const t = inputs[0];
      return [
        h("label", { for: "image-file" }, `Image (JPEG or PNG) for ${t.name}, resized to ${t.shape[2]}×${t.shape[3]}`),
        h("input", { id: "image-file", type: "file", accept: "image/jpeg,image/png" }),
      ];
    }
    if (!inputs.length) {
      const example = { inputs: [{ name: "x", datatype: "FP32", shape: [3], data: [1, 2, 3] }] };
      return [
        h("label", { for: "tensor-json" }, "The model declares no inputs: an OIP request body"),
        h("textarea", { id: "tensor-json", value: JSON.stringify(example, null, 2) }),
      ];
    }
    return inputs.flatMap((t) => {
      const id = "input-" + t.name;
      const bytes = t.datatype === "BYTES";
      return [
        h("label", { for: id }, `${t.name} — ${t.datatype} [${t.shape.join(", ")}]`, h("br"), h("small", {}, bytes ? "one element per line" : "numbers, separated by commas or spaces")),
        h("textarea", { id, "data-input": t.name, "data-datatype": t.datatype, "data-shape": JSON.stringify(t.shape), value: bytes ? "I love how fast this is.\nThis was a terrible experience." : "" }),
      ];
    });
  }

  /** The shape of `n` elements given a declared shape (-1: fits the rest). */
  function shapeFor(declared, n) {
    const known = declared.filter((d) => d > 0).reduce((a, b) => a * b, 1);
    const free = declared.filter((d) => d < 0).length;
    if (!free) return declared;
    let first = true;
    return declared.map((d) => {
      if (d >= 0) return d;
      if (first) {
        first = false;
        return Math.max(1, Math.round(n / known));
      }
      return 1;
    });
  }

  function tensorBody() {
    const raw = $("tensor-json");
    if (raw) return JSON.parse(raw.value);
    const inputs = [...document.querySelectorAll("#play-inputs textarea[data-input]")].map((el) => {
      const datatype = el.dataset.datatype;
      const data =
        datatype === "BYTES"
          ? el.value.split("\n").filter((l) => l.length)
          : el.value.split(/[\s,]+/).filter((x) => x.length).map(Number);
      return { name: el.dataset.input, datatype, shape: shapeFor(JSON.parse(el.dataset.shape), data.length), data };
    });
    return { inputs };
  }

  /** A shell word: single-quoted. */
  const sh = (s) => "'" + String(s).replace(/'/g, "'\\''") + "'";

  function curlFor(path, body, contentType, options) {
    const parts = ["curl -sS" + (options.stream ? "N" : ""), sh(session.public_url + path)];
    if (session.auth) parts.push('-H "Authorization: Bearer $INFERGATE_KEY"');
    parts.push("-H " + sh("Content-Type: " + contentType));
    parts.push(options.file ? "--data-binary " + sh("@" + options.file) : "-d " + sh(body));
    return parts.join(" \\\n  ");
  }

  function setState(state, text) {
    $("play-state").dataset.state = state;
    $("play-state").textContent = text;
  }

  const HIDDEN_HEADERS = new Set([
    "content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy", "cache-control",
    "date", "content-length", "connection", "transfer-encoding", "vary",
  ]);

  function showHeaders(r) {
    const rows = [];
    r.headers.forEach((value, name) => {
      if (!HIDDEN_HEADERS.has(name)) rows.push(h("tr", { "data-header": name }, h("th", { scope: "row" }, name), h("td", {}, h("code", {}, value))));
    });
    rows.sort((a, b) => a.dataset.header.localeCompare(b.dataset.header));
    $("play-headers").tBodies[0].replaceChildren(...rows);
  }

  function stats(pairs) {
    $("play-stats").replaceChildren(...pairs.map(([k, v, id]) => h("span", { id }, k + " ", h("b", {}, v))));
  }

  async function run() {
    const m = models.get($("model").value);
    if (!m) return;
    $("run").disabled = true;
    $("copied").textContent = "";
    setState("running", "running…");
    $("play-output").replaceChildren();
    $("play-headers").tBodies[0].replaceChildren();
    stats([]);
    try {
      const which = mode();
      if (which === "chat") await runChat(m);
      else if (which === "embeddings") await runEmbeddings(m);
      else await runTensors(m);
    } catch (e) {
      setState("error", "failed");
      $("play-output").replaceChildren(h("p", { class: "error" }, String(e.message || e)));
    } finally {
      $("run").disabled = false;
    }
  }

  /** Send a playground request; a problem answer becomes an Error with its detail. */
  async function send(path, init) {
    const started = performance.now();
    const r = await fetch(PLAY + path, init);
    showHeaders(r);
    if (!r.ok) {
      let detail = r.statusText;
      try {
        const p = await r.json();
        detail = p.detail || (p.error && p.error.message) || detail;
      } catch (e) {
        // Not JSON: the status says it.
      }
      throw new Error(`${r.status}: ${detail}`);
    }
    return [r, started];
  }

  async function runChat(m) {
    const body = {
      model: m.id,
      messages: [{ role: "user", content: $("chat-message").value }],
      stream: true,
      stream_options: { include_usage: true },
    };
    const max = parseInt($("max-tokens").value, 10);
    if (max > 0) body.max_tokens = max;
    const text = JSON.stringify(body);
    $("curl").textContent = curlFor("/v1/chat/completions", text, "application/json", { stream: true });
    const [r, started] = await send("/v1/chat/completions", { method: "POST", headers: playHeaders({ "Content-Type": "application/json" }), body: text });
    const answer = h("div", { id: "chat-answer", "aria-live": "polite" });
    $("play-output").replaceChildren(answer);
    setState("streaming", "streaming…");
    let first = null;
    let usage = null;
    let chunks = 0;
    await readEvents(r, (event) => {
      if (event.data === "[DONE]") return;
      const chunk = JSON.parse(event.data);
      if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
      if (delta) {
        if (first === null) first = performance.now() - started;
        chunks += 1;
        answer.append(delta);
        stats([["time to first token", fmt(first) + " ms", "ttft"], ["chunks", String(chunks), "chunks"]]);
      }
    });
    const total = performance.now() - started;
    const shown = [["time to first token", fmt(first) + " ms", "ttft"], ["total", fmt(total) + " ms", "total"], ["chunks", String(chunks), "chunks"]];
    if (usage) shown.push(["tokens", `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens}`, "usage"]);
    stats(shown);
    setState("done", "done");
  }

  async function runEmbeddings(m) {
    const texts = $("embed-inputs").value.split("\n").map((t) => t.trim()).filter((t) => t.length);
    const text = JSON.stringify({ model: m.id, input: texts });
    $("curl").textContent = curlFor("/v1/embeddings", text, "application/json", {});
    const [r, started] = await send("/v1/embeddings", { method: "POST", headers: playHeaders({ "Content-Type": "application/json" }), body: text });
    const out = await r.json();
    const total = performance.now() - started;
    const vectors = out.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
    const norms = vectors.map((v) => Math.sqrt(v.reduce((a, x) => a + x * x, 0)));
    const cosine = (i, j) => vectors[i].reduce((a, x, k) => a + x * vectors[j][k], 0) / (norms[i] * norms[j]);
    const list = h(
      "table",
      { class: "grid", id: "norms" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "#"), h("th", { scope: "col" }, "Text"), h("th", { scope: "col" }, "Dimensions"), h("th", { scope: "col" }, "Norm"))),
      h("tbody", {}, ...texts.map((t, i) => h("tr", {}, h("td", {}, String(i + 1)), h("td", {}, t), h("td", { class: "num" }, String(vectors[i].length)), h("td", { class: "num", "data-norm": norms[i] }, fmt(norms[i], 4))))),
    );
    const matrix = h(
      "table",
      { class: "grid", id: "cosine" },
      h("caption", {}, "Pairwise cosine similarity"),
      h("thead", {}, h("tr", {}, h("th", {}, ""), ...texts.map((_, j) => h("th", { scope: "col" }, String(j + 1))))),
      h(
        "tbody",
        {},
        ...texts.map((_, i) =>
          h("tr", {}, h("th", { scope: "row" }, String(i + 1)), ...texts.map((__, j) => {
            const c = cosine(i, j);
            return h("td", { class: "num", "data-i": i, "data-j": j, "data-cosine": c }, c.toFixed(4));
          })),
        ),
      ),
    );
    $("play-output").replaceChildren(list, matrix);
    stats([["time", fmt(total) + " ms", "total"], ["tokens", String(out.usage ? out.usage.prompt_tokens : "–"), "usage"]]);
    setState("done", "done");
  }

  async function runTensors(m) {
    const path = `/v2/models/${encodeURIComponent(m.id)}/infer`;
    let init;
    const file = $("image-file");
    if (file) {
      const picked = file.files[0];
      if (!picked) throw new Error("pick an image first");
      const type = picked.type || "image/jpeg";
      $("curl").textContent = curlFor(path, null, type, { file: picked.name });
      init = { method: "POST", headers: playHeaders({ "Content-Type": type }), body: picked };
    } else {
      const text = JSON.stringify(tensorBody());
      $("curl").textContent = curlFor(path, text, "application/json", {});
      init = { method: "POST", headers: playHeaders({ "Content-Type": "application/json" }), body: text };
    }
    const [r, started] = await send(path, init);
    const out = await r.json();
    const total = performance.now() - started;
    const rows = (out.outputs || []).map((t) =>
      h("tr", { "data-output": t.name }, h("th", { scope: "row" }, t.name), h("td", {}, t.datatype), h("td", {}, "[" + t.shape.join(", ") + "]"),
        h("td", { class: "detail" }, h("code", { class: "data" }, clip(JSON.stringify(t.data))))),
    );
    $("play-output").replaceChildren(
      h("table", { class: "grid", id: "outputs" },
        h("thead", {}, h("tr", {}, ...["Output", "Type", "Shape", "Data"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, ...rows)),
    );
    stats([["time", fmt(total) + " ms", "total"], ["model", `${out.model_name} ${out.model_version || ""}`, "answered-by"]]);
    setState("done", "done");
  }

  const clip = (s) => (s.length > 600 ? s.slice(0, 600) + " …" : s);

  async function copyCurl() {
    const text = $("curl").textContent;
    if (!text) return;
    try {
      await navigator.clipboard.writeText(text);
      $("copied").textContent = "Copied.";
    } catch (e) {
      const range = document.createRange();
      range.selectNodeContents($("curl"));
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      $("copied").textContent = "Selected: press Ctrl+C to copy.";
    }
  }

  document.addEventListener("DOMContentLoaded", start);
})();
