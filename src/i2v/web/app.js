// The i2v page: a client of the server's own Replicate-style API (no build step, no dependencies).
// This module is the form and the token; clip.js shows one prediction, history.js lists them.

import { MODEL, api, fetchBlobUrl, onReachability, onUnauthorized, saveToken, token } from "./api.js";
import { ClipView, estimateFor, forgetEstimates } from "./clip.js";
import { History, remember } from "./history.js";
import { TERMINAL, capitalize, seedOf, usually } from "./progress.js";
import {
  LABELS,
  applySchema,
  checkFileBytes,
  checkImageSize,
  checkPrompt,
  checkSeed,
  codePoints,
  outputSize,
  plainError,
  rules,
} from "./rules.js";

const FIELDS = Object.keys(LABELS);
const IMAGE_FIELDS = ["start_image", "end_image"];
const POLL_MS = 1000;
const LIST_POLL_MS = 3000; // while something listed is unfinished
const IDLE_LIST_POLL_MS = 30000;

const $ = (id) => document.getElementById(id);
const form = $("clip-form");
const images = { start_image: null, end_image: null }; // {file?, url?, preview, thumb, label, width, height, error}

// ---------- the server's answers: reachable, token ----------

onReachability((ok) => {
  const banner = $("server-status");
  if (ok) {
    banner.hidden = true;
    banner.textContent = "";
  } else {
    banner.textContent = `The server did not answer. Check that i2v is running at ${location.host}, then try again.`;
    banner.hidden = false;
  }
});

function needToken() {
  $("auth").open = true;
  $("auth-summary").textContent = "API token needed";
  $("auth-status").textContent = "This server needs an API token. Paste it once; it stays in this browser.";
  $("token-error").textContent = token() ? "The server did not accept the saved token. Paste a valid one." : "";
}
onUnauthorized.handler = needToken;

function tokenAccepted() {
  $("auth-summary").textContent = token() ? "API token saved" : "API token";
  $("auth-status").textContent = token() ? "The server accepts your token." : "This server needs no token.";
  $("token-error").textContent = "";
  if (/API token/.test($("form-error").textContent)) $("form-error").textContent = "";
}

/** Read the model (its schema: the limits) with the saved token; false when the token is refused. */
async function checkAccess() {
  try {
    const model = await api(`v1/models/${MODEL}`);
    tokenAccepted();
    applySchema(model);
    onRulesChanged();
    return true;
  } catch (err) {
    if (err.status !== 401 && err.status !== 0) $("auth-status").textContent = `Could not read the model: ${err.message}`;
    return false;
  }
}

$("token-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const value = $("token").value.trim();
  // Try the token before keeping it: a rejected one is never saved.
  try {
    const model = await api(`v1/models/${MODEL}`, { token: value });
    saveToken(value);
    tokenAccepted();
    applySchema(model);
    onRulesChanged();
  } catch (err) {
    if (err.status === 401) {
      $("token-error").textContent = value
        ? "The server did not accept this token, so it was not saved. Check it and try again."
        : "This server needs an API token.";
      $("token").focus();
      $("token").select();
    } else {
      $("token-error").textContent = `The token could not be checked: ${err.message}`;
    }
    return;
  }
  $("auth").open = false;
  $("auth-summary").focus(); // the form it was in is now closed: stay on its summary ("API token saved")
  started();
});

$("token-forget").addEventListener("click", () => {
  saveToken("");
  $("token").value = "";
  $("token").focus();
  checkAccess();
  historyList.refresh();
});

// ---------- errors beside fields ----------

const FIELD_IN_TEXT = new RegExp(`^\\s*(?:-\\s*)?(?:input\\.)?(${FIELDS.join("|")})\\b\\s*:?\\s*`);

function clearErrors() {
  for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function controlOf(field) {
  if (field === "mode" || field === "duration") return form.querySelector(`[name=${field}]:checked`);
  return $(field);
}

function showFieldError(field, message) {
  const el = $(`${field}-error`) || $("form-error");
  if (!el.textContent.includes(message)) el.textContent = el.textContent ? `${el.textContent} ${message}` : message;
  controlOf(field)?.setAttribute("aria-invalid", "true");
  return el;
}

function clearFieldError(field) {
  $(`${field}-error`).textContent = "";
  controlOf(field)?.removeAttribute("aria-invalid");
}

function focusFirstError() {
  const first = form.querySelector(".field-error:not(:empty)");
  if (!first) return;
  const field = first.closest("[data-field]")?.dataset.field;
  const control = field ? controlOf(field) : null;
  const target = control && !control.disabled ? (control.type === "file" ? $(`${field}-drop`).querySelector("label") : control) : first;
  if (target === first) first.tabIndex = -1;
  target.scrollIntoView({ block: "center" });
  target.focus();
}

function showApiError(err, fallback = "form") {
  if (err.status === 0) return; // the banner above the form says it
  const invalid = err.body?.invalid_fields || [];
  if (invalid.length) {
    for (const item of invalid) {
      const field = String(item.field || "").replace(/^input\./, "");
      showFieldError(FIELDS.includes(field) ? field : "form", plainError(field, item.type, item.description));
    }
  } else if (err.status === 401) {
    showFieldError("form", "The server needs a valid API token: paste it under “API token” at the top.");
    needToken();
  } else if (err.status === 413) {
    showFieldError("form", "This file is too large for the server.");
  } else if (err.status === 429) {
    showFieldError("form", err.body?.detail || "Too many requests: wait a little and try again.");
  } else {
    // A "- input.field: message" line goes beside its field; anything else above the form.
    for (const line of String(err.body?.detail || err.message).split("\n").filter((l) => l.trim())) {
      const match = line.match(FIELD_IN_TEXT);
      if (match) showFieldError(match[1], plainError(match[1], "", line.slice(match[0].length)));
      else showFieldError(fallback, fallback === "form" ? line.trim() : plainError(fallback, "", line.trim()));
    }
  }
  focusFirstError();
}

// ---------- the form ----------

const modeValue = () => form.querySelector("[name=mode]:checked")?.value || "standard";
const durationValue = () => Number(form.querySelector("[name=duration]:checked")?.value || 5);

function onModeOrDuration() {
  const pro = modeValue() === "pro";
  $("end_image-set").disabled = !pro;
  $("end_image-hint").textContent = pro ? "The last frame (optional)." : "The last frame. Choose Pro mode to use it.";
  if (!pro && images.end_image) {
    showImage("end_image", null);
    $("end_image-note").textContent = "Standard mode takes no end image, so the one you chose was removed.";
  } else if (pro) {
    $("end_image-note").textContent = "";
  }
  if (!pro) clearFieldError("end_image");
  onRulesChanged();
}
for (const radio of form.querySelectorAll("[name=mode], [name=duration]")) radio.addEventListener("change", onModeOrDuration);
$("preset").addEventListener("change", () => showEstimate());

function updateCount(name) {
  const el = $(`${name}-count`);
  const max = rules.maxLength[name] || Number(el.dataset.max);
  const length = codePoints($(name).value);
  el.textContent = `${length} / ${max} characters`;
  el.classList.toggle("over", length > max);
}

// Errors the page can know show as soon as they are true, not after a submit.
function checkPromptLive(name) {
  updateCount(name);
  const problem = checkPrompt(name, $(name).value, { required: false });
  // "Write a prompt" (from a submit) stays until there is some text; any other message is redone.
  if (problem || name !== "prompt" || $(name).value.trim()) clearFieldError(name);
  if (problem) showFieldError(name, problem);
}
for (const name of ["prompt", "negative_prompt"]) {
  $(name).addEventListener("input", () => checkPromptLive(name));
  updateCount(name);
}
$("seed").addEventListener("input", () => {
  const problem = checkSeed($("seed").value);
  clearFieldError("seed");
  if (problem) showFieldError("seed", problem);
});

function onRulesChanged() {
  for (const name of ["prompt", "negative_prompt"]) updateCount(name);
  for (const field of IMAGE_FIELDS) {
    const entry = images[field];
    if (entry?.width) checkDecoded(field, entry);
  }
  showOutputSize();
  showEstimate();
}

function showOutputSize() {
  const el = $("output-size");
  const fps = rules.output?.fps;
  const short = rules.output?.short_side?.[modeValue()];
  const start = images.start_image;
  if (!fps || !short) {
    el.textContent = "";
  } else if (start?.width && !start.error) {
    const [w, h] = outputSize(start.width, start.height, short);
    el.textContent = `Output: ${w} × ${h} · ${durationValue()} s · ${fps} fps`;
  } else {
    el.textContent = `Output: ${short}p · ${durationValue()} s · ${fps} fps (the clip keeps the start image's aspect ratio)`;
  }
}

let estimateAsked = 0;
async function showEstimate() {
  const asked = ++estimateAsked;
  const input = { mode: modeValue(), duration: durationValue(), preset: $("preset").value || undefined };
  const estimate = await estimateFor(input);
  if (asked !== estimateAsked) return;
  const text = usually(estimate);
  $("estimate-hint").textContent = text ? `${capitalize(text)} for a clip like this.` : "";
}

function collectInput() {
  const input = {
    mode: modeValue(),
    duration: durationValue(),
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
  };
  const seed = $("seed").value.trim();
  if (seed !== "") input.seed = seed; // digits, kept exact: see requestBody
  if ($("audio").checked) input.audio = true;
  if ($("preset").value) input.preset = $("preset").value;
  return input;
}

// JSON with the seed as a bare integer of any size (a JavaScript number is exact only up to 2**53).
function requestBody(input) {
  const { seed, ...rest } = input;
  const text = JSON.stringify({ input: rest });
  return seed === undefined ? text : `${text.slice(0, -2)},"seed":${seed}}}`;
}

function fillForm(input, seed) {
  $("prompt").value = input.prompt || "";
  $("negative_prompt").value = input.negative_prompt || "";
  for (const radio of form.querySelectorAll("[name=mode]")) radio.checked = radio.value === (input.mode || "standard");
  for (const radio of form.querySelectorAll("[name=duration]")) radio.checked = Number(radio.value) === Number(input.duration || 5);
  $("seed").value = seed ?? "";
  $("audio").checked = Boolean(input.audio);
  $("preset").value = input.preset || "";
  $("end_image-note").textContent = "";
  onModeOrDuration();
}

// ---------- images ----------

function thumbnail(img, size = 160) {
  try {
    const scale = Math.min(1, size / Math.max(img.naturalWidth, img.naturalHeight));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
    canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/jpeg", 0.8);
  } catch {
    return null; // an image from another origin cannot be read back
  }
}

const formatBytes = (n) => (n < 1024 * 1024 ? `${Math.round(n / 1024)} KB` : `${(n / 1024 / 1024).toFixed(1)} MB`);

function showImage(field, entry) {
  const preview = $(`${field}-preview`);
  const old = images[field];
  if (old?.revoke && old.preview !== entry?.preview) URL.revokeObjectURL(old.preview);
  images[field] = entry;
  clearFieldError(field);
  $(`${field}-info`).textContent = entry ? entry.label : "";
  preview.hidden = !entry;
  preview.alt = entry ? `Preview of the ${LABELS[field]}` : "";
  if (entry) preview.src = entry.preview;
  else preview.removeAttribute("src");
  $(`${field}-clear`).hidden = !entry;
  if (field === "start_image") showOutputSize();
}

function checkDecoded(field, entry) {
  entry.error = checkImageSize(entry.width, entry.height);
  clearFieldError(field);
  if (entry.error) showFieldError(field, entry.error);
  if (field === "start_image") showOutputSize();
}

/** Show an image and check it once the browser has decoded it (as the server will). */
function loadPreview(field, entry) {
  showImage(field, entry);
  const img = $(`${field}-preview`);
  img.addEventListener(
    "load",
    () => {
      if (images[field] !== entry) return;
      entry.width = img.naturalWidth;
      entry.height = img.naturalHeight;
      entry.thumb = entry.thumb || thumbnail(img);
      entry.label = [entry.name, `${entry.width} × ${entry.height} px`, entry.size ? formatBytes(entry.size) : ""].filter(Boolean).join(" · ");
      $(`${field}-info`).textContent = entry.label;
      checkDecoded(field, entry);
    },
    { once: true },
  );
  img.addEventListener(
    "error",
    () => {
      if (images[field] !== entry) return;
      entry.error = entry.file
        ? `“${entry.name}” could not be read as an image: it may be damaged, or not an image at all.`
        : "No image could be loaded from this URL. Check that it links to a PNG, JPEG or WebP picture.";
      img.hidden = true;
      showFieldError(field, entry.error);
    },
    { once: true },
  );
}

async function setImageFile(field, file) {
  if (!file) return;
  const problem = await checkFileBytes(file);
  if (problem) {
    showImage(field, null);
    showFieldError(field, problem);
    return;
  }
  const preview = URL.createObjectURL(file);
  loadPreview(field, { file, url: null, preview, revoke: true, thumb: null, name: file.name, size: file.size, label: file.name });
}

function setImageUrl(field, url, label = "From the web") {
  loadPreview(field, { file: null, url, preview: url, thumb: null, name: label, label });
}

/** An image used before (from the history): our own uploads are read back with the token. */
async function restoreImage(field, url, thumb) {
  if (!url) return showImage(field, null);
  const entry = { file: null, url, preview: thumb || "", thumb, name: "As used before", label: "As used before" };
  const own = /\/v1\/files\/[a-z0-9]+$/.test(url);
  if (own) {
    try {
      entry.preview = await fetchBlobUrl(`${url}/download`);
      entry.revoke = entry.preview.startsWith("blob:");
    } catch {
      entry.preview = thumb || "";
    }
  } else {
    entry.preview = url;
  }
  if (entry.preview) loadPreview(field, entry);
  else showImage(field, { ...entry, label: "As used before (no longer on the server)" });
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

const isDisabled = (field) => field === "end_image" && $("end_image-set").disabled;

for (const field of IMAGE_FIELDS) {
  const input = $(field);
  input.addEventListener("change", () => {
    setImageFile(field, input.files[0]);
    input.value = ""; // choosing the same file again still fires change
  });
  const drop = $(`${field}-drop`);
  // The whole zone opens the picker (its label and button stay the keyboard's way in).
  drop.addEventListener("click", (ev) => {
    if (isDisabled(field) || ev.target.closest("label, button, input, a")) return;
    input.click();
  });
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
  $(`${field}-clear`).addEventListener("click", () => {
    showImage(field, null);
    $(`${field}-drop`).querySelector("label").focus();
  });
}

// Paste an image, or an image's URL, anywhere but into a text field (there a URL is text).
document.addEventListener("paste", (ev) => {
  const data = ev.clipboardData;
  if (!data) return;
  const inEnd = ev.target.closest?.("#end_image-set") && !isDisabled("end_image");
  const field = inEnd ? "end_image" : "start_image";
  const file = [...data.files].find((f) => f.type.startsWith("image/")) || data.files[0];
  if (file) {
    ev.preventDefault();
    setImageFile(field, file);
    return;
  }
  const editing = ev.target.closest?.("textarea, input:not([type=file]):not([type=radio]):not([type=checkbox]), [contenteditable]");
  const text = data.getData("text/plain").trim();
  if (!editing && /^https?:\/\/\S+$/i.test(text)) {
    ev.preventDefault();
    setImageUrl(field, text, text);
  }
});

// ---------- submit ----------

/** Every problem the page can see, all at once; true when there is none. */
function validate() {
  clearErrors();
  const start = images.start_image;
  if (!start) showFieldError("start_image", "Choose a start image: it becomes the first frame of the clip.");
  else if (start.error) showFieldError("start_image", start.error);
  const end = modeValue() === "pro" ? images.end_image : null;
  if (end?.error) showFieldError("end_image", end.error);
  for (const name of ["prompt", "negative_prompt"]) {
    const problem = checkPrompt(name, $(name).value, { required: name === "prompt" });
    if (problem) showFieldError(name, problem);
  }
  const seed = checkSeed($("seed").value);
  if (seed) showFieldError("seed", seed);
  return !form.querySelector(".field-error:not(:empty)");
}

let submitting = false;

async function submit(ev) {
  ev.preventDefault();
  if (submitting) return;
  if (!validate()) {
    focusFirstError();
    return;
  }
  // The button stays focusable while busy (aria-disabled), so the keyboard user's place is not lost.
  const button = $("submit");
  submitting = true;
  button.setAttribute("aria-disabled", "true");
  try {
    const input = collectInput();
    const fields = input.mode === "pro" && images.end_image ? IMAGE_FIELDS : ["start_image"];
    button.textContent = "Uploading…";
    for (const field of fields) {
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
      pred = await api(`v1/models/${MODEL}/predictions`, { method: "POST", json: requestBody(input) });
    } catch (err) {
      showApiError(err);
      return;
    }
    const thumbs = { thumb: images.start_image.thumb, end_thumb: fields.length > 1 ? images.end_image.thumb : null };
    remember(pred, thumbs);
    clip.show(pred, { thumb: thumbs.thumb, skew: Date.now() - Date.parse(pred.created_at), focus: true });
    historyList.refresh();
  } finally {
    submitting = false;
    button.removeAttribute("aria-disabled");
    button.textContent = "Generate";
  }
}
form.addEventListener("submit", submit);
form.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
    ev.preventDefault();
    form.requestSubmit();
  }
});

// ---------- the clip panel and the history ----------

function reuseSeed(seed) {
  $("seed").value = seed;
  clearFieldError("seed");
  $("seed").focus();
  $("copy-status").textContent = `Seed ${seed} is in the form.`;
}

const clip = new ClipView({
  reuseSeed,
  changed: (pred) => historyList.update(pred),
  finished: (pred) => {
    if (pred.status === "succeeded") forgetEstimates(); // one more clip to estimate from
    showEstimate();
    historyList.refresh();
  },
});

async function openPrediction(id, { thumb = null, focus = false } = {}) {
  try {
    const pred = await api(`v1/predictions/${encodeURIComponent(id)}`);
    clip.show(pred, { thumb, focus });
  } catch (err) {
    if (err.status === 404) {
      $("form-error").textContent = `Prediction ${id} was not found on this server (it may have expired, or be another token's).`;
    }
  }
}

const historyList = new History({
  open: (item) => openPrediction(item.id, { thumb: item.thumb, focus: true }),
  rerun: (item) => reuse(item, true),
  edit: (item) => reuse(item, false),
  cancel: async (item, button) => {
    button.disabled = true;
    try {
      const pred = await api(`v1/predictions/${item.id}/cancel`, { method: "POST" });
      clip.update(pred);
    } catch (err) {
      button.disabled = false;
      $("history-source").textContent = `Could not cancel: ${err.message}`;
    }
    await historyList.refresh();
  },
});

async function reuse(item, run) {
  clearErrors();
  fillForm(item.input || {}, item.seed ?? seedOf(item)); // the seed it used: the same inputs, the same clip
  await restoreImage("start_image", item.input?.start_image, item.thumb);
  await restoreImage("end_image", item.input?.mode === "pro" ? item.input?.end_image : null, item.end_thumb);
  if (run) {
    form.requestSubmit();
  } else {
    form.scrollIntoView({ block: "start" });
    $("prompt").focus();
  }
}

// ---------- copy buttons and the API view's tabs ----------

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Without a secure context there is no clipboard API: copy from a selection instead.
    const area = Object.assign(document.createElement("textarea"), { value: text });
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
}

document.addEventListener("click", async (ev) => {
  const button = ev.target.closest("button[data-copy]");
  if (!button) return;
  const text = $(button.dataset.copy).textContent;
  await copyText(text);
  // The visible text stays part of the accessible name ("Copy the seed" / "Copied the seed").
  const label = button.dataset.label || (button.dataset.label = button.getAttribute("aria-label") || "");
  button.textContent = "Copied";
  button.setAttribute("aria-label", label.replace(/^Copy\b/, "Copied"));
  $("copy-status").textContent = "Copied to the clipboard.";
  setTimeout(() => {
    button.textContent = "Copy";
    button.setAttribute("aria-label", label);
  }, 2000);
});

const tabs = [...document.querySelectorAll("#clip-api [role=tab]")];
function selectTab(tab, focus = false) {
  for (const other of tabs) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
}
for (const tab of tabs) {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (ev) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[ev.key];
    const at = tabs.indexOf(tab);
    let next = null;
    if (step) next = tabs[(at + step + tabs.length) % tabs.length];
    else if (ev.key === "Home") next = tabs[0];
    else if (ev.key === "End") next = tabs.at(-1);
    if (!next) return;
    ev.preventDefault();
    selectTab(next, true);
  });
}

// ---------- start ----------

async function loop(fn, ms) {
  for (;;) {
    try {
      await fn();
    } catch (err) {
      console.error(err);
    }
    await new Promise((resolve) => setTimeout(resolve, typeof ms === "function" ? ms() : ms));
  }
}

let startedOnce = false;
// Once the server has answered: the prediction the URL names (urls.web), or the newest unfinished one.
async function started() {
  await historyList.refresh();
  if (startedOnce && clip.id) return;
  startedOnce = true;
  const wanted = new URLSearchParams(location.search).get("prediction");
  if (wanted) return openPrediction(wanted);
  const pending = historyList.items.find((item) => !TERMINAL.has(item.status));
  if (pending && !clip.id) openPrediction(pending.id, { thumb: pending.thumb });
}

$("token").value = token();
onModeOrDuration();
checkAccess().then((ok) => (ok ? started() : historyList.refresh()));
setInterval(() => clip.tick(), 1000);
loop(() => clip.poll(), POLL_MS);
loop(
  () => historyList.refresh(),
  () => (historyList.unfinished ? LIST_POLL_MS : IDLE_LIST_POLL_MS),
);
