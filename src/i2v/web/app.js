// The i2v page: a client of the server's own Replicate-style API (no build step, no dependencies).
"use strict";

(() => {
  const MODEL = "kwaivgi/kling-v2.1";
  const FIELDS = ["start_image", "end_image", "prompt", "negative_prompt", "mode", "duration", "seed", "audio", "preset"];
  const IMAGE_FIELDS = ["start_image", "end_image"];
  const TOKEN_KEY = "i2v.token";
  const HISTORY_KEY = "i2v.history";
  const HISTORY_MAX = 30;
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  const POLL_MS = 1000;
  const QUEUE_POLL_MS = 3000;
  const BACKGROUND_POLL_MS = 4000;
  const STATE_LABEL = {
    starting: "Queued",
    processing: "Rendering",
    succeeded: "Done",
    failed: "Failed",
    canceled: "Canceled",
  };

  const $ = (id) => document.getElementById(id);
  const form = $("clip-form");
  const images = { start_image: null, end_image: null }; // {file?, url?, preview, thumb, label}
  let current = null; // the prediction shown in the job panel: {id, skew, pred, queueCheckedAt}
  let resultUrl = null; // object URL of the video on show, revoked when replaced

  // ---------- API ----------

  class ApiError extends Error {
    constructor(status, body) {
      super((body && (body.detail || body.title)) || `HTTP ${status}`);
      this.status = status;
      this.body = body || {};
    }
  }

  const token = () => localStorage.getItem(TOKEN_KEY) || "";
  const authHeaders = () => (token() ? { Authorization: `Bearer ${token()}` } : {});
  // Relative to the page, so the page also works under a reverse proxy's path prefix.
  const apiUrl = (path) => (/^https?:/.test(path) ? path : new URL(path, document.baseURI).href);
  // The server builds absolute URLs from its public URL; when the page was opened at another origin
  // (say on the machine itself), reach the same API path through the page's own origin.
  function localUrl(url) {
    const target = new URL(url, document.baseURI);
    const at = target.pathname.indexOf("/v1/");
    if (target.origin === location.origin || at < 0) return target.href;
    return new URL(target.pathname.slice(at + 1) + target.search, document.baseURI).href;
  }

  async function api(path, { method = "GET", json, form: body } = {}) {
    const headers = authHeaders();
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    let res;
    try {
      res = await fetch(apiUrl(path), { method, headers, body });
    } catch (err) {
      throw new ApiError(0, { title: "Network error", detail: `The server did not answer (${err.message}).` });
    }
    const text = await res.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = { detail: text.slice(0, 300) };
    }
    if (!res.ok) {
      const error = new ApiError(res.status, data);
      if (res.status === 401) needToken(error.message);
      throw error;
    }
    return data;
  }

  // ---------- token ----------

  function needToken(message) {
    $("auth").open = true;
    $("auth-summary").textContent = "API token needed";
    $("auth-status").textContent = "This server needs an API token. Paste it once; it stays in this browser.";
    $("token-error").textContent = token() ? `The server did not accept the saved token: ${message}` : "";
  }

  async function checkAccess() {
    try {
      const model = await api(`v1/models/${MODEL}`);
      $("auth-summary").textContent = token() ? "API token saved" : "API token";
      $("auth-status").textContent = token()
        ? "The server accepts your token."
        : "This server needs no token.";
      $("token-error").textContent = "";
      applySchema(model);
      return true;
    } catch (err) {
      if (err.status !== 401) $("auth-status").textContent = `Could not reach the server: ${err.message}`;
      return false;
    }
  }

  function applySchema(model) {
    // Limits come from the server's schema, so the counters follow it.
    const props = model?.latest_version?.openapi_schema?.components?.schemas?.Input?.properties || {};
    for (const name of ["prompt", "negative_prompt"]) {
      const max = props[name]?.maxLength;
      if (max) $(`${name}-count`).dataset.max = String(max);
      updateCount(name);
    }
  }

  $("token-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const value = $("token").value.trim();
    if (value) localStorage.setItem(TOKEN_KEY, value);
    else localStorage.removeItem(TOKEN_KEY);
    if (await checkAccess()) {
      $("auth").open = false;
      resumePending();
    }
  });

  $("token-forget").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    checkAccess();
  });

  // ---------- errors beside fields ----------

  const FIELD_IN_TEXT = new RegExp(`^\\s*(?:-\\s*)?(?:input\\.)?(${FIELDS.join("|")})\\b\\s*(:)?\\s*`);

  function clearErrors() {
    for (const el of document.querySelectorAll("#clip-form .field-error")) el.textContent = "";
    for (const el of document.querySelectorAll("#clip-form [aria-invalid]")) el.removeAttribute("aria-invalid");
  }

  function showFieldError(field, message) {
    const el = $(`${field}-error`) || $("form-error");
    el.textContent = el.textContent ? `${el.textContent} ${message}` : message;
    const control = field === "mode" || field === "duration" ? form.querySelector(`[name=${field}]:checked`) : $(field);
    if (control) control.setAttribute("aria-invalid", "true");
    return el;
  }

  // A message that starts with a field name ("start_image: too small") goes beside that field.
  function placeMessage(text, fallbackField) {
    const parts = String(text).split(new RegExp(`;\\s+(?=(?:input\\.)?(?:${FIELDS.join("|")})\\b)`));
    if (parts.length > 1) return parts.map((part) => placeMessage(part, fallbackField))[0];
    const match = String(text).match(FIELD_IN_TEXT);
    if (match) return showFieldError(match[1], match[2] ? text.slice(match[0].length) : text);
    return showFieldError(fallbackField, text);
  }

  function showApiError(err, fallbackField = "form") {
    const invalid = err.body?.invalid_fields || [];
    if (invalid.length) {
      for (const item of invalid) {
        const field = String(item.field || "").replace(/^input\./, "");
        const message = item.description || item.type || "invalid";
        if (FIELDS.includes(field)) showFieldError(field, message);
        else placeMessage(`${field}: ${message}`, fallbackField);
      }
    } else if (err.status === 401) {
      showFieldError("form", "The server needs a valid API token (top right).");
    } else if (err.status === 413) {
      showFieldError(fallbackField, "This file is too large for the server.");
    } else {
      const detail = err.body?.detail || err.message;
      // Replicate's 422 detail lists "- input.field: message" lines when invalid_fields is absent.
      for (const line of String(detail).split("\n").filter((l) => l.trim())) placeMessage(line.trim(), fallbackField);
    }
    const first = document.querySelector("#clip-form .field-error:not(:empty)");
    if (first) first.closest(".field, form")?.scrollIntoView({ block: "nearest" });
  }

  // ---------- form ----------

  function modeValue() {
    return form.querySelector("[name=mode]:checked")?.value || "standard";
  }

  function onModeChange() {
    const pro = modeValue() === "pro";
    $("end_image-set").disabled = !pro;
    $("end_image-hint").textContent = pro
      ? "The last frame (optional)."
      : "The last frame. Choose Pro mode to use it.";
  }
  for (const radio of form.querySelectorAll("[name=mode]")) radio.addEventListener("change", onModeChange);

  function updateCount(name) {
    const el = $(`${name}-count`);
    const max = Number(el.dataset.max);
    const length = $(name).value.length;
    el.textContent = `${length} / ${max} characters`;
    el.classList.toggle("over", length > max);
  }
  for (const name of ["prompt", "negative_prompt"]) {
    $(name).addEventListener("input", () => updateCount(name));
    updateCount(name);
  }

  function collectInput() {
    const input = {
      mode: modeValue(),
      duration: Number(form.querySelector("[name=duration]:checked")?.value || 5),
      prompt: $("prompt").value,
      negative_prompt: $("negative_prompt").value,
    };
    const seed = $("seed").value.trim();
    if (seed !== "") input.seed = /^\d+$/.test(seed) ? Number(seed) : seed; // the server names a bad one
    if ($("audio").checked) input.audio = true;
    if ($("preset").value) input.preset = $("preset").value;
    return input;
  }

  function fillForm(input) {
    $("prompt").value = input.prompt || "";
    $("negative_prompt").value = input.negative_prompt || "";
    for (const radio of form.querySelectorAll("[name=mode]")) radio.checked = radio.value === (input.mode || "standard");
    for (const radio of form.querySelectorAll("[name=duration]")) radio.checked = Number(radio.value) === Number(input.duration || 5);
    $("seed").value = input.seed ?? "";
    $("audio").checked = Boolean(input.audio);
    $("preset").value = input.preset || "";
    onModeChange();
    updateCount("prompt");
    updateCount("negative_prompt");
  }

  // ---------- images ----------

  function thumbnail(img, size = 160) {
    const scale = Math.min(1, size / Math.max(img.naturalWidth, img.naturalHeight));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
    canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/jpeg", 0.8);
  }

  function showImage(field, entry) {
    const preview = $(`${field}-preview`);
    const old = images[field];
    if (old?.file && old.preview !== entry?.preview) URL.revokeObjectURL(old.preview);
    images[field] = entry;
    $(`${field}-error`).textContent = "";
    $(`${field}-info`).textContent = entry ? entry.label : "";
    preview.hidden = !entry;
    preview.alt = entry ? `Preview of the ${field === "start_image" ? "start" : "end"} image` : "";
    if (entry) preview.src = entry.preview;
    else preview.removeAttribute("src");
    if (field === "end_image") $("end_image-clear").hidden = !entry;
  }

  function setImageFile(field, file) {
    if (!file) return;
    if (!file.type.startsWith("image/")) {
      showImage(field, null);
      showFieldError(field, `“${file.name}” is not an image: choose a PNG, JPEG or WebP file.`);
      return;
    }
    const entry = { file, url: null, preview: URL.createObjectURL(file), thumb: null, label: file.name };
    showImage(field, entry);
    const img = $(`${field}-preview`);
    img.addEventListener(
      "load",
      () => {
        if (images[field] !== entry) return;
        entry.thumb = thumbnail(img);
        entry.label = `${file.name} · ${img.naturalWidth} × ${img.naturalHeight} px · ${formatBytes(file.size)}`;
        $(`${field}-info`).textContent = entry.label;
      },
      { once: true },
    );
  }

  function setImageUrl(field, url, thumb) {
    if (!url) return showImage(field, null);
    showImage(field, { file: null, url, preview: thumb || url, thumb, label: "From your history (uploaded earlier)" });
  }

  async function ensureUploaded(field) {
    const entry = images[field];
    if (entry.url) return entry.url;
    const body = new FormData();
    body.append("content", entry.file, entry.file.name);
    const file = await api("v1/files", { method: "POST", form: body });
    entry.url = file.urls.get;
    return entry.url;
  }

  for (const field of IMAGE_FIELDS) {
    const input = $(field);
    input.addEventListener("change", () => {
      setImageFile(field, input.files[0]);
      input.value = ""; // choosing the same file again still fires change
    });
    const drop = $(`${field}-drop`);
    drop.addEventListener("dragover", (ev) => {
      ev.preventDefault();
      if (!isDisabled(field)) drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      drop.classList.remove("over");
      if (!isDisabled(field)) setImageFile(field, ev.dataTransfer.files[0]);
    });
  }
  const isDisabled = (field) => field === "end_image" && $("end_image-set").disabled;
  $("end_image-clear").addEventListener("click", () => showImage("end_image", null));

  // ---------- submit ----------

  async function submit(ev) {
    ev.preventDefault();
    clearErrors();
    if (!images.start_image) {
      showFieldError("start_image", "Choose a start image: it becomes the first frame of the clip.");
      $("start_image-drop").scrollIntoView({ block: "nearest" });
      return;
    }
    const button = $("submit");
    button.disabled = true;
    try {
      const input = collectInput();
      const useEnd = input.mode === "pro" && images.end_image;
      button.textContent = "Uploading…";
      for (const field of useEnd ? IMAGE_FIELDS : ["start_image"]) {
        try {
          input[field] = await ensureUploaded(field);
        } catch (err) {
          showApiError(err, field);
          return;
        }
      }
      button.textContent = "Submitting…";
      let pred;
      try {
        pred = await api(`v1/models/${MODEL}/predictions`, { method: "POST", json: { input } });
      } catch (err) {
        showApiError(err, "form");
        return;
      }
      const entry = {
        id: pred.id,
        created_at: pred.created_at,
        input,
        thumb: images.start_image.thumb,
        end_thumb: useEnd ? images.end_image.thumb : null,
        status: pred.status,
      };
      saveHistory([entry, ...loadHistory().filter((e) => e.id !== entry.id)]);
      renderHistory();
      track(pred, Date.now() - Date.parse(pred.created_at));
    } finally {
      button.disabled = false;
      button.textContent = "Generate";
    }
  }
  form.addEventListener("submit", submit);

  // ---------- following a prediction ----------

  // The last log line is the progress: "denoising", or tqdm-like " 40%|████      | 2/5 denoising".
  function parseLogs(logs) {
    const lines = String(logs || "").split(/\r?\n/).map((l) => l.trim()).filter(Boolean);
    const last = lines.filter((l) => !/^seed\b/i.test(l)).at(-1) || ""; // "seed: N" closes a finished run
    const bar = last.match(/^\d+%\|[^|]*\|\s*(\d+)\s*\/\s*(\d+)\s*(.*)$/);
    const plain = bar ? null : last.match(/^(.*?)\s*(\d+)\s*\/\s*(\d+)\s*$/);
    const seed = String(logs || "").match(/\bseed[\s=:]+(\d+)/i);
    let stage = last;
    let step = null;
    let total = null;
    if (bar) [stage, step, total] = [bar[3], Number(bar[1]), Number(bar[2])];
    else if (plain) [stage, step, total] = [plain[1], Number(plain[2]), Number(plain[3])];
    return { stage: stage.trim(), step, total, seed: seed ? seed[1] : null };
  }

  // The seed the server used: a field of the prediction when it reports one, else a log line.
  function seedOf(pred) {
    return pred.metrics?.seed ?? pred.seed ?? parseLogs(pred.logs).seed ?? null;
  }

  function track(pred, skew = 0) {
    current = { id: pred.id, skew, pred, queueCheckedAt: 0, queueText: "" };
    $("job").hidden = false;
    $("job-cancel").disabled = false;
    updateJob(pred);
  }

  function formatElapsed(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }

  function formatBytes(n) {
    return n < 1024 * 1024 ? `${Math.round(n / 1024)} KB` : `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function elapsedMs(pred, skew) {
    const start = Date.parse(pred.created_at);
    const end = pred.completed_at ? Date.parse(pred.completed_at) : Date.now() - skew;
    return end - start;
  }

  function updateJob(pred) {
    const { stage, step, total } = parseLogs(pred.logs);
    $("job").dataset.status = pred.status;
    $("job-state").textContent = STATE_LABEL[pred.status] || pred.status;
    $("job-queue").textContent = pred.status === "starting" ? current.queueText : "";
    const showStage = stage && pred.status !== "succeeded";
    $("job-stage").textContent = showStage ? `${stage[0].toUpperCase()}${stage.slice(1)}` : "";
    $("job-steps").textContent = total && !TERMINAL.has(pred.status) ? `step ${step} of ${total}` : "";
    const bar = $("job-progress");
    bar.hidden = pred.status === "failed" || pred.status === "canceled";
    if (pred.status === "succeeded") {
      bar.max = 1;
      bar.value = 1;
    } else if (total) {
      bar.max = total;
      bar.value = step;
    } else {
      bar.removeAttribute("value"); // indeterminate while queued or loading
    }
    $("job-elapsed").textContent = formatElapsed(elapsedMs(pred, current.skew));
    $("job-cancel").hidden = TERMINAL.has(pred.status);
  }

  // Position in the queue: the server's own figure when it gives one, else the predictions created
  // before this one that still wait, plus the one rendering (one worker, first in first out).
  async function queuePosition(pred) {
    for (const key of ["queue_position", "position"]) {
      if (Number.isInteger(pred[key])) return pred[key];
    }
    const created = Date.parse(pred.created_at);
    let ahead = 0;
    let url = "v1/predictions";
    for (let page = 0; url && page < 5; page++) {
      const list = await api(url);
      for (const p of list.results || []) {
        if (p.id === pred.id) continue;
        if (p.status === "processing") ahead += 1;
        else if (p.status === "starting" && Date.parse(p.created_at) < created) ahead += 1;
      }
      url = list.next && localUrl(list.next);
    }
    return ahead;
  }

  async function refreshQueue() {
    const job = current;
    job.queueCheckedAt = Date.now();
    try {
      const ahead = await queuePosition(job.pred);
      if (current !== job) return;
      job.queueText = ahead === 0 ? "· next in line" : `· ${ahead} ${ahead === 1 ? "clip" : "clips"} ahead of yours`;
      $("job-queue").textContent = job.pred.status === "starting" ? job.queueText : "";
    } catch {
      // the position is a nicety; the status poll reports real trouble
    }
  }

  async function pollCurrent() {
    const job = current;
    if (!job || TERMINAL.has(job.pred.status)) return;
    try {
      const pred = await api(`v1/predictions/${job.id}`);
      if (current !== job) return;
      job.pred = pred;
      updateJob(pred);
      updateHistoryEntry(pred);
      if (pred.status === "starting" && Date.now() - job.queueCheckedAt > QUEUE_POLL_MS) refreshQueue();
      if (TERMINAL.has(pred.status)) finish(pred);
    } catch (err) {
      if (err.status === 404) {
        $("job-state").textContent = "Not found on the server";
        job.pred = { ...job.pred, status: "failed" };
        updateHistoryEntry({ id: job.id, status: "failed", error: "not found on the server" });
      }
    }
  }

  function finish(pred) {
    if (pred.status === "succeeded") {
      showResult(pred);
    } else if (pred.status === "failed") {
      const text = pred.error || "The prediction failed.";
      $("job-state").textContent = "Failed";
      $("job-stage").textContent = text;
      clearErrors();
      placeMessage(text, "form");
    }
  }

  $("job-cancel").addEventListener("click", async () => {
    if (!current) return;
    $("job-cancel").disabled = true;
    try {
      const pred = await api(`v1/predictions/${current.id}/cancel`, { method: "POST" });
      current.pred = pred;
      updateJob(pred);
      updateHistoryEntry(pred);
    } catch (err) {
      $("job-stage").textContent = `Could not cancel: ${err.message}`;
      $("job-cancel").disabled = false;
    }
  });

  // ---------- result ----------

  async function showResult(pred) {
    const section = $("result");
    const video = $("result-video");
    const meta = $("result-meta");
    const link = $("result-download");
    section.hidden = false;
    section.dataset.id = pred.id;
    if (!pred.output) {
      video.removeAttribute("src");
      link.hidden = true;
      meta.textContent = pred.data_removed ? "The server has removed this clip (expired)." : "No output.";
      return;
    }
    let src = localUrl(pred.output);
    if (token()) {
      // The output sits behind the same auth; a <video> cannot send the header, so fetch it first.
      meta.textContent = "Loading the clip…";
      try {
        const res = await fetch(src, { headers: authHeaders() });
        if (!res.ok) throw new Error(`HTTP ${res.status}`);
        src = URL.createObjectURL(await res.blob());
      } catch (err) {
        meta.textContent = `Could not load the clip: ${err.message}`;
        return;
      }
    }
    if (section.dataset.id !== pred.id) return; // another clip was chosen meanwhile
    if (resultUrl) URL.revokeObjectURL(resultUrl);
    resultUrl = src.startsWith("blob:") ? src : null;
    link.hidden = false;
    link.href = src;
    link.download = `i2v-${pred.id}.mp4`;
    const seed = seedOf(pred);
    const time = pred.metrics?.predict_time;
    video.onloadedmetadata = () => {
      const parts = [`${video.videoWidth} × ${video.videoHeight}`, `${video.duration.toFixed(1)} s`];
      if (seed) parts.push(`seed ${seed}`);
      if (time) parts.push(`rendered in ${Number(time).toFixed(1)} s`);
      meta.textContent = parts.join(" · ");
    };
    video.muted = true;
    video.src = src;
    video.play().catch(() => {}); // autoplay may be refused; the controls remain
    section.scrollIntoView({ block: "nearest" });
  }

  // ---------- history ----------

  function loadHistory() {
    try {
      const list = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
      return Array.isArray(list) ? list : [];
    } catch {
      return [];
    }
  }

  function saveHistory(list) {
    list = list.slice(0, HISTORY_MAX);
    for (;;) {
      try {
        localStorage.setItem(HISTORY_KEY, JSON.stringify(list));
        return;
      } catch {
        if (!list.length) return;
        list = list.slice(0, -1); // storage full: drop the oldest
      }
    }
  }

  function updateHistoryEntry(pred) {
    const list = loadHistory();
    const entry = list.find((e) => e.id === pred.id);
    if (!entry) return;
    const next = {
      status: pred.status,
      output: pred.output ?? entry.output ?? null,
      error: pred.error ?? null,
      seed: seedOf(pred) ?? entry.seed ?? null,
      completed_at: pred.completed_at ?? null,
    };
    if (Object.keys(next).every((k) => entry[k] === next[k])) return;
    Object.assign(entry, next);
    saveHistory(list);
    renderHistory();
  }

  function renderHistory() {
    const list = loadHistory();
    const ol = $("history");
    ol.replaceChildren();
    $("history-empty").hidden = list.length > 0;
    $("history-clear").hidden = list.length === 0;
    const template = $("history-item");
    for (const entry of list) {
      const li = template.content.firstElementChild.cloneNode(true);
      li.dataset.id = entry.id;
      li.dataset.status = entry.status;
      const img = li.querySelector(".thumb");
      if (entry.thumb) img.src = entry.thumb;
      else img.hidden = true;
      const input = entry.input || {};
      li.querySelector(".history-prompt").textContent = input.prompt || "(no prompt)";
      const when = new Date(entry.created_at);
      const meta = [input.mode, `${input.duration} s`];
      const seed = input.seed ?? entry.seed;
      if (seed !== undefined && seed !== null) meta.push(`seed ${seed}`);
      if (input.end_image) meta.push("end image");
      if (!Number.isNaN(when.getTime())) meta.push(when.toLocaleString());
      li.querySelector(".history-meta").textContent = meta.join(" · ");
      const status = li.querySelector(".history-status");
      status.textContent = STATE_LABEL[entry.status] || entry.status;
      if (entry.error) status.textContent += `: ${entry.error}`;
      const play = li.querySelector("[data-action=play]");
      play.hidden = entry.status !== "succeeded" || !entry.output;
      play.setAttribute("aria-label", `Play the clip “${truncate(input.prompt, 40)}”`);
      li.querySelector("[data-action=rerun]").setAttribute("aria-label", `Re-run “${truncate(input.prompt, 40)}”`);
      ol.append(li);
    }
  }

  const truncate = (text, n) => (String(text || "").length > n ? `${String(text).slice(0, n - 1)}…` : String(text || ""));

  $("history").addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-action]");
    if (!button) return;
    const id = button.closest("li").dataset.id;
    const entry = loadHistory().find((e) => e.id === id);
    if (!entry) return;
    const action = button.dataset.action;
    if (action === "play") {
      try {
        showResult(await api(`v1/predictions/${id}`));
      } catch {
        showResult({ id, output: entry.output, logs: entry.seed ? `seed ${entry.seed}` : "" });
      }
    } else if (action === "rerun" || action === "edit") {
      clearErrors();
      fillForm(entry.input);
      setImageUrl("start_image", entry.input.start_image, entry.thumb);
      setImageUrl("end_image", entry.input.end_image, entry.end_thumb);
      if (action === "rerun") form.requestSubmit();
      else {
        form.scrollIntoView({ block: "start" });
        $("prompt").focus();
      }
    } else if (action === "remove") {
      saveHistory(loadHistory().filter((e) => e.id !== id));
      renderHistory();
    }
  });

  $("history-clear").addEventListener("click", () => {
    if (!confirm("Forget the clips listed here? (The server keeps them until they expire.)")) return;
    saveHistory([]);
    renderHistory();
  });

  // Clips still queued or rendering when the page was (re)loaded: follow the newest, refresh the rest.
  function resumePending() {
    const pending = loadHistory().filter((e) => !TERMINAL.has(e.status));
    if (pending.length && !current) {
      track({ id: pending[0].id, created_at: pending[0].created_at, status: pending[0].status, logs: "" });
    }
  }

  async function pollBackground() {
    for (const entry of loadHistory()) {
      if (TERMINAL.has(entry.status) || entry.id === current?.id) continue;
      try {
        updateHistoryEntry(await api(`v1/predictions/${entry.id}`));
      } catch (err) {
        if (err.status === 404) updateHistoryEntry({ id: entry.id, status: "failed", error: "not found on the server" });
      }
    }
  }

  // ---------- start ----------

  function tick() {
    if (current && !TERMINAL.has(current.pred.status)) {
      $("job-elapsed").textContent = formatElapsed(elapsedMs(current.pred, current.skew));
    }
  }

  async function loop(fn, ms) {
    for (;;) {
      try {
        await fn();
      } catch (err) {
        console.error(err);
      }
      await new Promise((resolve) => setTimeout(resolve, ms));
    }
  }

  $("token").value = token();
  onModeChange();
  renderHistory();
  checkAccess().then((ok) => {
    if (ok) resumePending();
  });
  setInterval(tick, 1000);
  loop(pollCurrent, POLL_MS);
  loop(pollBackground, BACKGROUND_POLL_MS);
})();
