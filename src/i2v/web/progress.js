// A prediction's progress from its logs, one bar over all its stages, and the time left, from the server's
// own history of similar clips (GET /v1/i2v/estimate: median predict time and each stage's share of it).

export const STATE_LABEL = {
  starting: "Queued",
  processing: "Rendering",
  succeeded: "Done",
  failed: "Failed",
  canceled: "Canceled",
};
export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

// The engine's stages in the order it reports them: i2v.progress.STAGES (test_web.py keeps the two equal).
export const STAGES = [
  "loading inputs",
  "downloading weights",
  "loading model",
  "denoising",
  "decoding",
  "retiming",
  "encoding video",
];

// Until this server has finished a clip like this one: rough weights for the bar only (no time is promised
// from these). Downloading weights has none: its length is the network's, and the bar waits through it.
const PRIOR_SHARES = {
  "loading inputs": 0.02,
  "loading model": 0.08,
  denoising: 0.7,
  decoding: 0.08,
  retiming: 0.02,
  "encoding video": 0.1,
};
const PRIOR = STAGES.filter((name) => name in PRIOR_SHARES).map((name) => ({ name, share: PRIOR_SHARES[name] }));

/** One log line as progress: a stage name alone, or tqdm-like " 40%|████      | 2/5 denoising"; else null
 * (the lines the engine and the server write around a run: the model, the prompt used, the file written). */
function progressLine(line) {
  const bar = line.match(/^\d+%\|[^|]*\|\s*(\d+)\s*\/\s*(\d+)\s*(.*)$/);
  if (bar) return { stage: bar[3].trim(), step: Number(bar[1]), total: Number(bar[2]) };
  const stage = line.toLowerCase();
  return STAGES.includes(stage) ? { stage, step: null, total: null } : null;
}

/** The current stage (the last progress line's, "" before the first) and the seed the server logged. */
export function parseLogs(logs) {
  const lines = String(logs || "")
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter(Boolean);
  const last = lines.map(progressLine).filter(Boolean).at(-1) || { stage: "", step: null, total: null };
  const seed = String(logs || "").match(/^seed[\s=:]+(\d+)/im);
  return { ...last, seed: seed ? seed[1] : null };
}

/** The seed the server used: the input's when given, else the "seed: N" line the server logs at the end. */
export function seedOf(pred) {
  const given = pred?.input?.seed;
  if (given !== undefined && given !== null && given !== "") return String(given);
  return parseLogs(pred?.logs).seed;
}

export const capitalize = (text) => (text ? text[0].toUpperCase() + text.slice(1) : "");

export function formatDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

export function usually(estimate) {
  if (!estimate?.predict_time) return "";
  const s = estimate.predict_time;
  const text = s < 90 ? `${Math.max(1, Math.round(s))} s` : `${Math.round(s / 60)} min`;
  return `usually about ${text} here`;
}

/**
 * Where a run is, 0..1 over all stages, and the seconds left (null when there is nothing to go on).
 * `stage`, `step`, `total`: from the logs; `runSeconds`: since the run started; `stageSeconds`: since this
 * stage began (as the page saw it); `estimate`: the server's answer, or null.
 */
export function overall({ stage, step, total, runSeconds, stageSeconds, estimate }) {
  const known = estimate?.stages?.length ? estimate.stages : PRIOR;
  const expected = estimate?.predict_time || null;
  const at = known.findIndex((s) => s.name === stage);
  if (at < 0) return { fraction: null, remaining: null };
  const whole = known.reduce((sum, s) => sum + s.share, 0) || 1;
  const before = known.slice(0, at).reduce((sum, s) => sum + s.share, 0) / whole;
  const share = known[at].share / whole;
  const after = Math.max(0, 1 - before - share);
  let within;
  if (total) within = step / total;
  else if (expected && share > 0) within = Math.min(0.9, stageSeconds / (share * expected));
  else within = 0;
  const fraction = Math.min(0.99, before + share * within);
  if (!expected) return { fraction, remaining: null };
  // A run slower or faster than usual in the stages behind it is taken to go on at that pace.
  const past = runSeconds - stageSeconds;
  const pace = before > 0.05 && past > 0 ? Math.min(3, Math.max(0.5, past / (before * expected))) : 1;
  let current;
  if (total && step > 0 && stageSeconds > 0) current = (stageSeconds * (total - step)) / step; // its own rate
  else current = Math.max(0, share * expected * pace - stageSeconds);
  return { fraction, remaining: current + after * expected * pace };
}
