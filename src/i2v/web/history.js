// "Your recent clips": the token's own predictions from the server's list (GET /v1/predictions), with poster
// thumbnails; the list kept in this browser is the fallback when the server's cannot be read.

import { api, fetchBlobUrl } from "./api.js";
import { STATE_LABEL, TERMINAL, seedOf } from "./progress.js";

const HISTORY_KEY = "i2v.history";
const HISTORY_MAX = 30;
const $ = (id) => document.getElementById(id);

// ---------- the browser's own list ----------

export function loadLocal() {
  try {
    const list = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

function saveLocal(list) {
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

/** Keep what only the browser knows about a new prediction (the input thumbnails). */
export function remember(pred, extra) {
  const entry = { ...summary(pred), ...extra };
  saveLocal([entry, ...loadLocal().filter((e) => e.id !== entry.id)]);
}

/** Bring the browser's copy of a prediction up to date; true when something changed. */
export function updateLocal(pred) {
  const list = loadLocal();
  const entry = list.find((e) => e.id === pred.id);
  if (!entry) return false;
  const next = summary(pred);
  const keys = ["status", "output", "error", "seed", "completed_at"];
  if (keys.every((k) => entry[k] === next[k] || next[k] == null)) return false;
  for (const k of keys) if (next[k] != null || k === "error") entry[k] = next[k] ?? entry[k] ?? null;
  saveLocal(list);
  return true;
}

function summary(pred) {
  return {
    id: pred.id,
    created_at: pred.created_at,
    input: pred.input || {},
    status: pred.status,
    output: pred.output ?? null,
    error: pred.error ?? null,
    seed: seedOf(pred),
    completed_at: pred.completed_at ?? null,
    urls: pred.urls || null,
  };
}

// ---------- the list on the page ----------

const posters = new Map(); // prediction id -> Promise of an image URL (an object URL when behind the token)

function posterUrl(item) {
  if (item.status !== "succeeded" || !item.output || !item.urls?.get) return null;
  if (!posters.has(item.id)) {
    const url = fetchBlobUrl(`${item.urls.get}/poster.jpg`);
    url.catch(() => posters.delete(item.id));
    posters.set(item.id, url);
  }
  return posters.get(item.id);
}

export const poster = posterUrl;

const truncate = (text, n) => {
  const chars = [...String(text || "")];
  return chars.length > n ? `${chars.slice(0, n - 1).join("")}…` : chars.join("");
};

export class History {
  /** `actions`: {open(item), rerun(item), edit(item), cancel(item)}: what the buttons do. */
  constructor(actions) {
    this.actions = actions;
    this.items = [];
    this.source = "local";
    $("history").addEventListener("click", (ev) => this.onClick(ev));
    $("history-clear").addEventListener("click", () => {
      if (!confirm("Forget the clips listed here? (The server keeps them until they expire.)")) return;
      saveLocal([]);
      this.render();
    });
  }

  get unfinished() {
    return this.items.some((item) => !TERMINAL.has(item.status));
  }

  /** Read the server's list; fall back to the browser's when it cannot be had. */
  async refresh() {
    const local = new Map(loadLocal().map((e) => [e.id, e]));
    try {
      const page = await api("v1/predictions");
      this.source = "server";
      this.items = (page.results || []).map((pred) => {
        const mine = local.get(pred.id);
        if (mine) updateLocal(pred);
        return { ...summary(pred), thumb: mine?.thumb || null, end_thumb: mine?.end_thumb || null };
      });
      this.reason = "";
    } catch (err) {
      this.source = "local";
      this.items = [...local.values()];
      this.reason = err.status === 401 ? "the server needs your API token" : err.message;
    }
    this.render();
  }

  /** A prediction seen elsewhere on the page (the clip panel's poll): update its row now. */
  update(pred) {
    const changed = updateLocal(pred);
    const item = this.items.find((i) => i.id === pred.id);
    if (item && (item.status !== pred.status || changed)) {
      Object.assign(item, summary(pred));
      this.render();
    }
  }

  render() {
    const ol = $("history");
    const focused = document.activeElement?.closest?.("#history li");
    const keep = focused && [focused.dataset.id, document.activeElement.dataset.action];
    ol.replaceChildren();
    const server = this.source === "server";
    $("history-source").textContent = server
      ? "This token's clips on the server, newest first."
      : `Kept in this browser${this.reason ? ` (the server's list could not be read: ${this.reason})` : ""}.`;
    $("history-empty").hidden = this.items.length > 0;
    $("history-clear").hidden = server || this.items.length === 0;
    const template = $("history-item");
    for (const item of this.items) {
      const li = template.content.firstElementChild.cloneNode(true);
      li.dataset.id = item.id;
      li.dataset.status = item.status;
      const input = item.input || {};
      const img = li.querySelector(".thumb");
      img.hidden = true;
      const shown = (src) => {
        img.src = src;
        img.hidden = false;
      };
      if (item.thumb) shown(item.thumb);
      posterUrl(item)?.then((src) => {
        if (img.isConnected) {
          shown(src);
          img.classList.add("poster");
        }
      }, () => {});
      li.querySelector(".history-prompt").textContent = input.prompt || "(no prompt)";
      const meta = [input.mode || "standard", `${input.duration || 5} s`];
      const seed = item.seed ?? input.seed;
      if (seed !== undefined && seed !== null) meta.push(`seed ${seed}`);
      if (input.end_image) meta.push("end image");
      const when = new Date(item.created_at);
      if (!Number.isNaN(when.getTime())) meta.push(when.toLocaleString());
      li.querySelector(".history-meta").textContent = meta.join(" · ");
      const status = li.querySelector(".history-status");
      status.textContent = STATE_LABEL[item.status] || item.status;
      if (item.error) status.textContent += `: ${item.error}`;
      const name = `“${truncate(input.prompt, 40)}”`;
      const label = (action, text) => li.querySelector(`[data-action=${action}]`).setAttribute("aria-label", `${text} ${name}`);
      label("open", "Open");
      label("rerun", "Re-run");
      label("edit", "Edit inputs of");
      label("cancel", "Cancel");
      label("remove", "Remove from this list:");
      li.querySelector("[data-action=cancel]").hidden = TERMINAL.has(item.status);
      li.querySelector("[data-action=remove]").hidden = server;
      ol.append(li);
    }
    if (keep) ol.querySelector(`li[data-id="${keep[0]}"] [data-action="${keep[1]}"]`)?.focus();
  }

  onClick(ev) {
    const button = ev.target.closest("button[data-action]");
    if (!button) return;
    const item = this.items.find((i) => i.id === button.closest("li").dataset.id);
    if (!item) return;
    const action = button.dataset.action;
    if (action === "remove") {
      saveLocal(loadLocal().filter((e) => e.id !== item.id));
      this.items = this.items.filter((i) => i.id !== item.id);
      this.render();
      $("history-title").focus?.();
    } else {
      this.actions[action]?.(item, button);
    }
  }
}
