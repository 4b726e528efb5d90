// The page of `edgetl serve`: plain ES2017, no dependencies, loaded with `defer`.
// Everything that comes from the server (labels, head names, errors) goes into the DOM
// through textContent: labels are user data and never parsed as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "edgetl.serve.token";
  const $ = (id) => document.getElementById(id);

  const el = {
    token: $("token"),
    tokenStatus: $("token-status"),
    model: $("model"),
    head: $("head"),
    topk: $("topk"),
    drop: $("drop"),
    file: $("file"),
    preview: $("preview"),
    cameraNote: $("camera-note"),
    cameraStart: $("camera-start"),
    cameraFrame: $("camera-frame"),
    liveRate: $("live-rate"),
    live: $("live"),
    liveAchieved: $("live-rate-achieved"),
    video: $("video"),
    canvas: $("canvas"),
    error: $("error"),
    resultHead: $("result-head"),
    result: $("result"),
    moreHeads: $("more-heads"),
    latency: $("latency"),
    latencyTitle: $("latency-title"),
    resultEmpty: $("result-empty"),
  };

  let modelVersion = null;
  let previewUrl = null;
  let stream = null;
  let requestSeq = 0; // the newest request wins; older answers are dropped
  let lastImage = null; // the last file or frame sent, sent again when the head or top-k changes
  let live = { on: false, timer: null, inFlight: false, done: [] };

  // ---- small DOM helpers (textContent only) ----
  function make(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.error.hidden = true;
  }

  // ---- token ----
  function token() {
    return el.token.value.trim();
  }

  function authHeaders() {
    const t = token();
    return t ? { Authorization: "Bearer " + t } : {};
  }

  function setTokenStatus(ok) {
    el.tokenStatus.textContent = ok ? "" : "token required or wrong";
    el.token.classList.toggle("invalid", !ok);
  }

  // One error line from a response: the JSON `error` field when there is one.
  async function errorText(resp) {
    let message = "";
    try {
      const data = await resp.json();
      if (data && typeof data.error === "string") message = data.error;
    } catch (e) {
      // not JSON (e.g. a proxy's page): fall back to the status line
    }
    return "HTTP " + resp.status + (message ? ": " + message : resp.statusText ? " " + resp.statusText : "");
  }

  // ---- model summary ----
  async function loadModel() {
    let resp;
    try {
      resp = await fetch("/v1/model", { headers: authHeaders(), cache: "no-store" });
    } catch (e) {
      showError("cannot reach the server: " + e.message);
      return;
    }
    if (resp.status === 401) {
      setTokenStatus(false);
      renderModel(null);
      return;
    }
    setTokenStatus(true);
    if (!resp.ok) {
      showError(await errorText(resp));
      return;
    }
    const m = await resp.json();
    clearError();
    renderModel(m);
    renderHeads(m);
  }

  function renderModel(m) {
    clear(el.model);
    const rows = m
      ? [
          ["Backbone", m.backbone && m.backbone.name ? m.backbone.name : "?"],
          ["Variant", m.variant],
          ["Runtime", m.runtime],
          ["Version", m.version],
        ]
      : [["Model", "enter the token to load the model"]];
    for (const [k, v] of rows) {
      el.model.appendChild(make("dt", k));
      el.model.appendChild(make("dd", v === undefined || v === null ? "?" : v));
    }
    modelVersion = m ? m.version : null;
  }

  function renderHeads(m) {
    const names = Object.keys(m.heads || {});
    const previous = el.head.value;
    clear(el.head);
    for (const name of names) {
      const opt = make("option", name);
      opt.value = name;
      el.head.appendChild(opt);
    }
    if (names.length > 1) {
      const opt = make("option", "all heads");
      opt.value = "all";
      el.head.appendChild(opt);
    }
    const wanted = names.indexOf(previous) >= 0 || (previous === "all" && names.length > 1) ? previous : m.default_head;
    if (wanted && (names.indexOf(wanted) >= 0 || wanted === "all")) el.head.value = wanted;
  }

  // ---- prediction ----
  function topK() {
    const k = parseInt(el.topk.value, 10);
    return Number.isFinite(k) && k >= 1 ? k : 5;
  }

  // POST the bytes; resolves to {ok, status, retryAfter, data|message, roundTrip}.
  async function predict(blob) {
    const params = new URLSearchParams();
    if (el.head.value) params.set("head", el.head.value);
    params.set("top_k", String(topK()));
    const headers = authHeaders();
    headers["Content-Type"] = blob.type || "application/octet-stream";
    const t0 = performance.now();
    let resp;
    try {
      resp = await fetch("/v1/predict?" + params.toString(), {
        method: "POST",
        headers: headers,
        body: blob,
        cache: "no-store",
      });
    } catch (e) {
      return { ok: false, status: 0, message: "cannot reach the server: " + e.message };
    }
    if (!resp.ok) {
      const retry = parseFloat(resp.headers.get("Retry-After") || "");
      return {
        ok: false,
        status: resp.status,
        retryAfter: Number.isFinite(retry) ? retry : null,
        message: await errorText(resp),
      };
    }
    const data = await resp.json();
    return { ok: true, status: resp.status, data: data, roundTrip: performance.now() - t0 };
  }

  // Send one image and show the answer (unless a newer request was sent meanwhile).
  async function classify(blob) {
    lastImage = blob;
    const seq = ++requestSeq;
    const out = await predict(blob);
    if (seq === requestSeq) show(out);
    return out;
  }

  function show(out) {
    if (!out.ok) {
      if (out.status === 401) setTokenStatus(false);
      showError(out.message);
      return;
    }
    setTokenStatus(true);
    clearError();
    renderResult(out.data);
    renderLatency(out.data, out.roundTrip);
    if (out.data.model && modelVersion && out.data.model.version !== modelVersion) loadModel(); // hot swap
  }

  function fillList(list, record) {
    clear(list);
    const items = record.top_k && record.top_k.length ? record.top_k : [{ label: record.label, score: record.score }];
    for (const item of items) {
      const li = make("li");
      li.appendChild(make("span", item.label, "label"));
      const meter = make("meter", null, "bar");
      meter.min = 0;
      meter.max = 1;
      meter.value = Math.max(0, Math.min(1, Number(item.score) || 0));
      li.appendChild(meter);
      li.appendChild(make("span", (100 * (Number(item.score) || 0)).toFixed(1) + "%", "score"));
      list.appendChild(li);
    }
  }

  // A head with stored statistics says whether the image is unlike what it learned (docs/on-device.md).
  function unfamiliarNote(record) {
    return record.unfamiliar === true ? "unfamiliar: unlike the images this head learned" : "";
  }

  function renderResult(data) {
    const records = data.records || [];
    clear(el.moreHeads);
    el.resultEmpty.hidden = true;
    if (!records.length) {
      clear(el.result);
      el.resultHead.textContent = "";
      return;
    }
    const first = [records.length > 1 ? "head: " + records[0].head : "", unfamiliarNote(records[0])];
    el.resultHead.textContent = first.filter(Boolean).join(" · ");
    fillList(el.result, records[0]);
    for (const rec of records.slice(1)) {
      el.moreHeads.appendChild(make("h3", ["head: " + rec.head, unfamiliarNote(rec)].filter(Boolean).join(" · ")));
      const list = make("ol", null, "result");
      fillList(list, rec);
      el.moreHeads.appendChild(list);
    }
  }

  function renderLatency(data, roundTrip) {
    clear(el.latency);
    el.latencyTitle.hidden = false;
    const lat = data.latency_ms || {};
    const rows = [];
    for (const key of ["decode", "preprocess", "queue", "inference", "total"]) {
      if (typeof lat[key] === "number") rows.push([key, lat[key].toFixed(1) + " ms"]);
    }
    rows.push(["round trip (browser)", roundTrip.toFixed(1) + " ms"]);
    if (typeof data.batch === "number") rows.push(["batch", String(data.batch)]);
    for (const [k, v] of rows) {
      el.latency.appendChild(make("dt", k));
      el.latency.appendChild(make("dd", v));
    }
  }

  // ---- file input and drop zone ----
  function useFile(file) {
    if (!file) return;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    el.preview.src = previewUrl;
    el.preview.alt = "the chosen image";
    el.preview.hidden = false;
    classify(file);
  }

  el.file.addEventListener("change", () => {
    useFile(el.file.files && el.file.files[0]);
    el.file.value = ""; // choosing the same file again fires `change` again
  });
  el.drop.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    el.drop.classList.add("over");
  });
  el.drop.addEventListener("dragleave", () => el.drop.classList.remove("over"));
  el.drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    el.drop.classList.remove("over");
    const files = ev.dataTransfer && ev.dataTransfer.files;
    if (files && files.length) useFile(files[0]);
  });
  document.addEventListener("paste", (ev) => {
    const items = (ev.clipboardData && ev.clipboardData.files) || [];
    if (items.length) useFile(items[0]);
  });

  function reclassify() {
    if (lastImage && !live.on) classify(lastImage);
  }
  el.head.addEventListener("change", reclassify);
  el.topk.addEventListener("change", reclassify);

  // ---- camera ----
  const cameraAvailable = !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
  if (!cameraAvailable) {
    el.cameraNote.textContent =
      "The camera is unavailable here: browsers allow it only on https:// pages or on http://localhost" +
      " (start the server with --tls-cert/--tls-key, or open it through localhost).";
    el.cameraStart.disabled = true;
  } else {
    el.cameraNote.textContent = "The camera stays in this browser; only the frames you classify are sent.";
  }

  async function startCamera() {
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
    } catch (e) {
      showError("camera: " + (e.name ? e.name + ": " : "") + e.message);
      return;
    }
    el.video.srcObject = stream;
    el.video.hidden = false;
    el.cameraStart.textContent = "Stop camera";
    el.cameraFrame.disabled = false;
    el.live.disabled = false;
    await el.video.play().catch(() => {}); // muted + playsinline: allowed without a gesture too
  }

  function stopCamera() {
    stopLive();
    if (stream) for (const track of stream.getTracks()) track.stop();
    stream = null;
    el.video.srcObject = null;
    el.video.hidden = true;
    el.cameraStart.textContent = "Start camera";
    el.cameraFrame.disabled = true;
    el.live.disabled = true;
  }

  el.cameraStart.addEventListener("click", () => (stream ? stopCamera() : startCamera()));

  // One frame as a JPEG blob (the longer side at most 640 px: the model resizes anyway).
  function grabFrame() {
    const w = el.video.videoWidth;
    const h = el.video.videoHeight;
    if (!w || !h) return Promise.resolve(null);
    const scale = Math.min(1, 640 / Math.max(w, h));
    el.canvas.width = Math.round(w * scale);
    el.canvas.height = Math.round(h * scale);
    el.canvas.getContext("2d").drawImage(el.video, 0, 0, el.canvas.width, el.canvas.height);
    return new Promise((resolve) => el.canvas.toBlob(resolve, "image/jpeg", 0.85));
  }

  el.cameraFrame.addEventListener("click", async () => {
    const blob = await grabFrame();
    if (blob) classify(blob);
    else showError("camera: no frame yet");
  });

  // Live: one request in flight at a time; the next starts at the chosen rate, or as soon as the
  // previous answer came if that took longer (frames are skipped, never queued).
  function liveInterval() {
    const rate = parseFloat(el.liveRate.value);
    return 1000 / (Number.isFinite(rate) && rate > 0 ? Math.min(rate, 30) : 2);
  }

  function stopLive() {
    live.on = false;
    if (live.timer) clearTimeout(live.timer);
    live.timer = null;
    live.done = [];
    el.live.checked = false;
    el.liveAchieved.textContent = "";
  }

  function achievedRate() {
    const now = performance.now();
    live.done = live.done.filter((t) => now - t < 5000);
    if (live.done.length < 2) return null;
    return (live.done.length - 1) / ((live.done[live.done.length - 1] - live.done[0]) / 1000);
  }

  async function liveTick() {
    live.timer = null;
    if (!live.on || live.inFlight) return;
    const started = performance.now();
    live.inFlight = true;
    let out = null;
    try {
      const blob = await grabFrame();
      if (blob && live.on) out = await classify(blob);
    } finally {
      live.inFlight = false;
    }
    if (!live.on) return;
    let wait = Math.max(0, liveInterval() - (performance.now() - started));
    if (out && !out.ok) {
      if (out.status === 503) {
        wait = Math.max(wait, 1000 * (out.retryAfter || 1)); // server busy: back off, keep going
        el.liveAchieved.textContent = "server busy, retrying in " + (wait / 1000).toFixed(1) + " s";
      } else {
        stopLive(); // any other error stops live mode (its message is shown)
        return;
      }
    } else if (out) {
      live.done.push(performance.now());
      const rate = achievedRate();
      el.liveAchieved.textContent = rate === null ? "" : "achieved " + rate.toFixed(1) + " frames/s";
    }
    live.timer = setTimeout(liveTick, wait);
  }

  el.live.addEventListener("change", () => {
    if (el.live.checked && stream) {
      live.on = true;
      live.done = [];
      liveTick();
    } else {
      stopLive();
    }
  });

  // ---- start ----
  try {
    el.token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  } catch (e) {
    // storage disabled: the token lives in the field only
  }
  let tokenTimer = null;
  el.token.addEventListener("input", () => {
    try {
      sessionStorage.setItem(TOKEN_KEY, token());
    } catch (e) {
      // storage disabled
    }
    if (tokenTimer) clearTimeout(tokenTimer);
    tokenTimer = setTimeout(loadModel, 400); // reload the summary once typing pauses
  });
  loadModel();
})();
