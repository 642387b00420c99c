// The server's Replicate-style API, as the page calls it: the token, URLs, errors and a "server down" hook.

export const MODEL = "kwaivgi/kling-v2.1";
const TOKEN_KEY = "i2v.token";

export class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.title)) || `HTTP ${status}`);
    this.status = status; // 0: the server did not answer
    this.body = body || {};
  }
}

export const token = () => localStorage.getItem(TOKEN_KEY) || "";
export function saveToken(value) {
  if (value) localStorage.setItem(TOKEN_KEY, value);
  else localStorage.removeItem(TOKEN_KEY);
}
export const authHeaders = (value = token()) => (value ? { Authorization: `Bearer ${value}` } : {});

// Relative to the page, so the page also works under a reverse proxy's path prefix.
export const apiUrl = (path) => (/^https?:/.test(path) ? path : new URL(path, document.baseURI).href);

// The server builds absolute URLs from its public URL; when the page was opened at another origin (say on
// the machine itself), reach the same API path through the page's own origin.
export function localUrl(url) {
  const target = new URL(url, document.baseURI);
  const at = target.pathname.indexOf("/v1/");
  if (target.origin === location.origin || at < 0) return target.href;
  return new URL(target.pathname.slice(at + 1) + target.search, document.baseURI).href;
}

// Listeners told whether the server answered (true) or not (false), for the banner above the form.
const reachability = new Set();
export const onReachability = (fn) => reachability.add(fn);
const reached = (ok, err) => reachability.forEach((fn) => fn(ok, err));

export const onUnauthorized = { handler: null };

// Large integers (the seed's maximum, 2**63 - 1) keep their exact digits as strings: a double cannot.
function parseJson(text) {
  return JSON.parse(text, (_key, value, context) =>
    typeof value === "number" && !Number.isSafeInteger(value) && Number.isInteger(value) && context?.source
      ? context.source
      : value,
  );
}

/** fetch() an API path; resolves to the parsed JSON, rejects with an ApiError. `raw`: the Response. */
export async function api(path, { method = "GET", json, form: body, token: given, raw = false } = {}) {
  const headers = authHeaders(given ?? token());
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = typeof json === "string" ? json : JSON.stringify(json);
  }
  let res;
  try {
    res = await fetch(apiUrl(path), { method, headers, body });
  } catch (err) {
    const error = new ApiError(0, { title: "Network error", detail: `The server did not answer (${err.message}).` });
    reached(false, error);
    throw error;
  }
  reached(true);
  if (raw && res.ok) return res;
  const text = await res.text();
  let data = null;
  try {
    data = text ? parseJson(text) : null;
  } catch {
    data = { detail: text.slice(0, 300) };
  }
  if (!res.ok) {
    const error = new ApiError(res.status, data);
    if (res.status === 401 && given === undefined) onUnauthorized.handler?.(error);
    throw error;
  }
  return data;
}

/** One of this server's URLs (it starts with the API's base, as the prediction's own URL shows it), reached
 * through the page's origin like localUrl; another's (a bucket's presigned URL) as it is. */
export function sameServerUrl(url, apiBase) {
  return url.startsWith(`${apiBase}/`) ? new URL(url.slice(apiBase.length + 1), document.baseURI).href : url;
}

/** An output URL behind the API token (I2V_OUTPUT_URLS=token) rather than a signed link that needs none. */
export const behindToken = (url) => /\/v1\/predictions\/[^/]+\/output\.mp4$/.test(new URL(url, document.baseURI).pathname);

/** A file behind the token as an object URL (a <video> or <img> cannot send the header itself). */
export async function fetchBlobUrl(url) {
  if (!token()) return localUrl(url);
  const res = await api(localUrl(url), { raw: true });
  return URL.createObjectURL(await res.blob());
}
