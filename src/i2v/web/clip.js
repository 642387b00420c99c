// The clip panel: one prediction at a time, from its heading (prompt, id, thumbnail) to its output, seed,
// logs and API view. Everything in it is replaced when another prediction is shown.

import { api, behindToken, fetchBlobUrl, localUrl, sameServerUrl } from "./api.js";
import { poster } from "./history.js";
import { STATE_LABEL, TERMINAL, capitalize, formatDuration, overall, parseLogs, seedOf, usually } from "./progress.js";
import { baseOf, curlSnippet, jsSnippet, pythonSnippet } from "./snippets.js";

const $ = (id) => document.getElementById(id);
const QUEUE_POLL_MS = 3000;

const estimates = new Map(); // "mode/duration/preset" -> Promise of the server's estimate (or null)

export function estimateFor(input) {
  const params = new URLSearchParams({ mode: input.mode || "standard", duration: String(input.duration || 5) });
  if (input.preset) params.set("preset", input.preset);
  const key = params.toString();
  if (!estimates.has(key)) {
    const answer = api(`v1/i2v/estimate?${key}`).catch(() => null); // an older server has none: no estimate
    estimates.set(key, answer);
    answer.then((value) => value || estimates.delete(key));
  }
  return estimates.get(key);
}
export const forgetEstimates = () => estimates.clear();

const truncate = (text, n) => {
  const chars = [...String(text || "")];
  return chars.length > n ? `${chars.slice(0, n - 1).join("")}…` : chars.join("");
};

export class ClipView {
  /** `hooks`: {reuseSeed(seed), changed(pred), finished(pred)}. */
  constructor(hooks) {
    this.hooks = hooks;
    this.current = null; // {id, pred, skew, stage, stageSince, estimate, queueText, queueCheckedAt, video}
    this.videoUrl = null; // an object URL to revoke when replaced
    $("clip-cancel").addEventListener("click", () => this.cancel());
    $("clip-reuse-seed").addEventListener("click", () => this.hooks.reuseSeed($("clip-seed").textContent));
  }

  get id() {
    return this.current?.id ?? null;
  }

  get running() {
    return Boolean(this.current) && !TERMINAL.has(this.current.pred.status);
  }

  /** Show a prediction, replacing whatever was shown. `skew`: the client's clock minus the server's. */
  show(pred, { thumb = null, skew = 0, focus = false } = {}) {
    const job = { id: pred.id, pred, skew, stage: null, stageSince: Date.now(), estimate: null, queueText: "", queueCheckedAt: 0 };
    this.current = job;
    const input = pred.input || {};
    $("clip").hidden = false;
    $("clip").dataset.id = pred.id;
    $("clip-title").textContent = truncate(input.prompt || "(no prompt)", 140);
    $("clip-title").title = input.prompt || "";
    const link = $("clip-link");
    link.textContent = pred.id;
    link.href = `?prediction=${encodeURIComponent(pred.id)}`;
    link.setAttribute("aria-label", `Prediction ${pred.id}: a link to this clip on this page`);
    const facts = [input.mode || "standard", `${input.duration || 5} s`];
    if (input.end_image) facts.push("with an end image");
    $("clip-facts").textContent = `· ${facts.join(" · ")}`;
    const img = $("clip-thumb");
    img.hidden = !thumb;
    img.alt = "";
    if (thumb) img.src = thumb;
    else img.removeAttribute("src");
    // Nothing of the clip shown before stays: no player, seed, logs or error of another prediction.
    this.clearOutput();
    $("clip-error").textContent = "";
    $("clip-logs").open = false;
    $("clip-logs-text").textContent = "";
    $("clip-state").textContent = "";
    $("clip-stage").textContent = "";
    $("clip-steps").textContent = "";
    $("clip-times").textContent = "";
    if (new URLSearchParams(location.search).get("prediction") !== pred.id) {
      history.replaceState(null, "", `?prediction=${encodeURIComponent(pred.id)}`);
    }
    estimateFor(input).then((estimate) => {
      if (this.current !== job) return;
      job.estimate = estimate;
      this.render();
    });
    this.update(pred, { first: true });
    if (focus) $("clip-title").focus();
  }

  clearOutput() {
    const video = $("clip-video");
    video.onerror = null;
    video.pause();
    video.removeAttribute("src");
    video.load();
    if (this.videoUrl) URL.revokeObjectURL(this.videoUrl);
    this.videoUrl = null;
    $("clip-output").hidden = true;
    $("clip-meta").textContent = "";
    $("clip-url").textContent = "";
    $("clip-seed").textContent = "";
  }

  /** A newer copy of the shown prediction (from a poll or an action). */
  update(pred, { first = false } = {}) {
    const job = this.current;
    if (!job || pred.id !== job.id) return;
    const was = job.pred.status;
    job.pred = pred;
    if (TERMINAL.has(pred.status)) job.canceling = false;
    this.render();
    if (pred.status === "succeeded" && !job.video) this.showOutput(pred);
    if (!first && TERMINAL.has(pred.status) && !TERMINAL.has(was)) {
      // Cancel is gone now: a keyboard user who was on it (or on nothing) stays in the panel.
      if ([document.body, $("clip-cancel")].includes(document.activeElement)) $("clip-title").focus();
      this.hooks.finished?.(pred);
    }
  }

  render() {
    const job = this.current;
    if (!job) return;
    const pred = job.pred;
    const status = pred.status;
    const { stage, step, total } = parseLogs(pred.logs);
    if (stage !== job.stage) {
      job.stage = stage;
      job.stageSince = Date.now();
    }
    $("clip").dataset.status = status;
    $("clip-state").textContent = STATE_LABEL[status] || status;
    const running = status === "processing";
    // A run just claimed has no stage line yet: it is starting, not somewhere unknown.
    let stageText = running ? capitalize(stage) || "Starting" : "";
    if (status === "starting") stageText = job.queueText;
    if (job.canceling) stageText = "Canceling…";
    $("clip-stage").textContent = stageText;
    $("clip-steps").textContent = running && total && !job.canceling ? `, step ${step} of ${total}` : "";
    $("clip-cancel").hidden = TERMINAL.has(status);
    $("clip-cancel").disabled = Boolean(job.canceling);

    const bar = $("clip-progress");
    bar.hidden = status === "failed" || status === "canceled";
    const now = Date.now() - job.skew;
    const runSeconds = pred.started_at ? (now - Date.parse(pred.started_at)) / 1000 : 0;
    const waited = ((pred.completed_at ? Date.parse(pred.completed_at) : now) - Date.parse(pred.created_at)) / 1000;
    const hint = usually(job.estimate);
    let times = "";
    if (status === "succeeded") {
      bar.value = 1;
      const took = pred.metrics?.predict_time;
      times = took ? `Rendered in ${formatDuration(took)}` : "Done";
      if (hint) times += ` (${hint})`;
    } else if (running) {
      const at = overall({ stage, step, total, runSeconds, stageSeconds: (Date.now() - job.stageSince) / 1000, estimate: job.estimate });
      // A line the bar does not know (or none yet) keeps it where it was: one bar, never blank mid-run.
      const was = bar.hasAttribute("value") ? bar.value : 0;
      bar.value = Math.max(was, at.fraction ?? 0);
      times = `${formatDuration(waited)} elapsed`;
      if (at.remaining !== null) times += at.remaining < 1 ? " · almost done" : ` · about ${formatDuration(at.remaining)} left`;
      times += hint ? ` · ${hint}` : " · no estimate yet: the first clip of this kind here";
    } else if (status === "starting") {
      bar.removeAttribute("value");
      times = `Waiting ${formatDuration(waited)}${hint ? ` · then ${hint}` : ""}`;
    } else {
      times = `${STATE_LABEL[status]} after ${formatDuration(waited)}`;
    }
    $("clip-times").textContent = times;
    bar.setAttribute("aria-valuetext", bar.hasAttribute("value") ? `${Math.round(bar.value * 100)} percent` : "waiting");

    const logs = $("clip-logs-text");
    if (logs.textContent !== (pred.logs || "")) logs.textContent = pred.logs || "(no logs yet)";
    if (status === "failed") {
      $("clip-error").textContent = `This clip failed: ${pred.error || "the server gave no reason"}. The logs below show how far it got.`;
      $("clip-logs").open = true;
    }
    this.renderApi(pred);
  }

  renderApi(pred) {
    const seed = seedOf(pred);
    // Written only when changed, so a selection in a snippet survives the once-a-second refresh.
    const put = (id, text) => $(id).textContent !== text && ($(id).textContent = text);
    put("snippet-curl", curlSnippet(pred, seed));
    put("snippet-python", pythonSnippet(pred, seed));
    put("snippet-js", jsSnippet(pred, seed));
    put(
      "snippet-note",
      seed
        ? `Seed ${seed} is filled in, so these make this same clip.`
        : "The seed is filled in once the server reports it; without it each run makes a different clip.",
    );
    put("clip-json-url", pred.urls?.get || "");
    const json = JSON.stringify(pred, null, 2);
    if ($("clip-json").textContent !== json) {
      $("clip-json").textContent = json;
      // A link that opens without the token: the JSON as fetched, in a tab of its own.
      if (this.jsonUrl) URL.revokeObjectURL(this.jsonUrl);
      this.jsonUrl = URL.createObjectURL(new Blob([json], { type: "application/json" }));
      $("clip-json-link").href = this.jsonUrl;
    }
  }

  tick() {
    if (this.running) this.render();
  }

  async poll() {
    const job = this.current;
    if (!job || TERMINAL.has(job.pred.status)) return;
    let pred;
    try {
      pred = await api(`v1/predictions/${job.id}`);
    } catch (err) {
      if (err.status === 404 && this.current === job) {
        job.pred = { ...job.pred, status: "failed", error: "the server does not know this prediction (expired or another token's)" };
        this.render();
      }
      return;
    }
    if (this.current !== job) return;
    this.hooks.changed?.(pred);
    this.update(pred);
    if (pred.status === "starting" && Date.now() - job.queueCheckedAt > QUEUE_POLL_MS) this.refreshQueue(job);
  }

  // Place in the queue: the predictions created before this one that still wait, plus those rendering.
  async refreshQueue(job) {
    job.queueCheckedAt = Date.now();
    try {
      const created = Date.parse(job.pred.created_at);
      let ahead = 0;
      let url = "v1/predictions";
      for (let page = 0; url && page < 5; page++) {
        const list = await api(url);
        for (const p of list.results || []) {
          if (p.id === job.id) continue;
          if (p.status === "processing") ahead += 1;
          else if (p.status === "starting" && Date.parse(p.created_at) < created) ahead += 1;
        }
        url = list.next && localUrl(list.next);
      }
      if (this.current !== job) return;
      job.queueText = ahead === 0 ? "next in line" : `${ahead} ${ahead === 1 ? "clip" : "clips"} ahead of yours`;
      this.render();
    } catch {
      // the position is a nicety; the status poll reports real trouble
    }
  }

  async cancel() {
    const job = this.current;
    if (!job) return;
    job.canceling = true;
    this.render();
    try {
      const pred = await api(`v1/predictions/${job.id}/cancel`, { method: "POST" });
      this.hooks.changed?.(pred);
      this.update(pred);
    } catch (err) {
      if (this.current !== job) return;
      job.canceling = false;
      $("clip-error").textContent = `Could not cancel: ${err.message}`;
      this.render();
    }
  }

  async showOutput(pred) {
    const job = this.current;
    if (!job || job.id !== pred.id) return;
    job.video = true;
    $("clip-output").hidden = false;
    const seed = seedOf(pred);
    $("clip-seed-row").hidden = !seed;
    $("clip-seed").textContent = seed || "";
    if (!pred.output) {
      $("clip-url").textContent = "";
      $("clip-meta").textContent = pred.data_removed ? "The server has removed this clip (expired)." : "No output.";
      $("clip-download").hidden = true;
      $("clip-video").hidden = true;
      return;
    }
    $("clip-video").hidden = false;
    $("clip-url").textContent = pred.output; // the real output URL, as the API gave it
    poster({ ...pred, status: "succeeded" })?.then((src) => {
      if (this.current !== job) return;
      $("clip-video").poster = src;
      $("clip-thumb").src = src; // the clip's own first frame, in place of the start image's thumbnail
      $("clip-thumb").hidden = false;
    }, () => {});
    $("clip-meta").textContent = "Loading the clip…";
    let src = sameServerUrl(pred.output, baseOf(pred)); // a signed link: the player streams it (ranges)
    if (behindToken(pred.output)) {
      try {
        // A <video> cannot send the token, so a URL behind it is fetched whole first (I2V_OUTPUT_URLS=token).
        src = await fetchBlobUrl(pred.output);
      } catch (err) {
        if (this.current === job) $("clip-meta").textContent = `Could not load the clip: ${err.message}`;
        return;
      }
    }
    if (this.current !== job) {
      if (src.startsWith("blob:")) URL.revokeObjectURL(src);
      return;
    }
    this.videoUrl = src.startsWith("blob:") ? src : null;
    const link = $("clip-download");
    link.hidden = false;
    link.href = src;
    link.download = `i2v-${pred.id}.mp4`;
    const video = $("clip-video");
    video.onerror = () => {
      if (this.current === job) $("clip-meta").textContent = "Could not load the clip (the link may have expired: reload the page for a fresh one).";
    };
    video.onloadedmetadata = () => {
      const parts = [`${video.videoWidth} × ${video.videoHeight}`, `${video.duration.toFixed(1)} s`];
      if (seed) parts.push(`seed ${seed}`);
      $("clip-meta").textContent = parts.join(" · ");
    };
    video.muted = true;
    video.src = src;
    video.play().catch(() => {}); // autoplay may be refused; the controls remain
  }
}
