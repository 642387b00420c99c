// The API view: the inputs of a prediction as curl, Python and JavaScript, ready to paste. Each makes the same
// clip (the seed used is filled in) on this server, with Replicate's own clients and one changed base URL.

import { MODEL, behindToken } from "./api.js";

// Replicate's inputs in the order its schema gives them; the rest after.
const ORDER = ["mode", "duration", "prompt", "end_image", "start_image", "negative_prompt", "seed", "audio", "preset"];

/** The input to show: the prediction's own, with the seed it used, keys in the schema's order. */
export function snippetInput(pred, seed) {
  const input = { ...(pred.input || {}) };
  if ((input.seed === undefined || input.seed === null) && seed) input.seed = seed;
  const keys = [...ORDER.filter((k) => k in input), ...Object.keys(input).filter((k) => !ORDER.includes(k))];
  return keys.filter((k) => input[k] !== undefined && input[k] !== null).map((k) => [k, input[k]]);
}

// A seed may exceed 2**53: it is kept as its digits and written as a bare integer.
const isBigDigits = (key, value) => key === "seed" && typeof value === "string" && /^\d+$/.test(value);

function jsonValue(key, value) {
  return isBigDigits(key, value) ? value : JSON.stringify(value);
}

function pythonValue(key, value) {
  if (isBigDigits(key, value)) return value;
  if (value === true) return "True";
  if (value === false) return "False";
  if (value === null) return "None";
  return JSON.stringify(value); // a JSON string is a valid Python string literal
}

function jsValue(key, value) {
  if (isBigDigits(key, value)) {
    // A JavaScript number is exact only up to 2**53; the server also takes the seed's digits as a string.
    return Number.isSafeInteger(Number(value)) ? value : `${JSON.stringify(value)} /* a string: above 2**53 */`;
  }
  return JSON.stringify(value);
}

/** The server's base URL (no trailing slash), from the prediction's own URL. */
export function baseOf(pred) {
  const url = pred.urls?.get || "";
  const at = url.indexOf("/v1/predictions/");
  return at >= 0 ? url.slice(0, at) : location.origin;
}

export function curlSnippet(pred, seed) {
  const fields = snippetInput(pred, seed).map(([k, v]) => `    ${JSON.stringify(k)}: ${jsonValue(k, v)}`);
  return [
    `curl --silent --show-error ${baseOf(pred)}/v1/models/${MODEL}/predictions \\`,
    "  --request POST \\",
    '  --header "Authorization: Bearer $REPLICATE_API_TOKEN" \\',
    '  --header "Content-Type: application/json" \\',
    '  --header "Prefer: wait" \\',
    "  --data @- <<'EOM'",
    "{",
    '  "input": {',
    fields.join(",\n"),
    "  }",
    "}",
    "EOM",
  ].join("\n");
}

// Outputs are signed links that need no token (and a bucket's presigned URL refuses one); a server set to
// I2V_OUTPUT_URLS=token keeps them behind it. Until the output is there, assume it may be.
const outputNeedsToken = (pred) => !pred.output || behindToken(pred.output);

export function pythonSnippet(pred, seed) {
  const fields = snippetInput(pred, seed).map(([k, v]) => `        ${JSON.stringify(k)}: ${pythonValue(k, v)},`);
  return [
    "# pip install replicate",
    ...(outputNeedsToken(pred) ? ["import os", ""] : []),
    "import httpx",
    "import replicate",
    "",
    `client = replicate.Client(base_url=${JSON.stringify(baseOf(pred))})  # token from REPLICATE_API_TOKEN`,
    "url = client.run(",
    `    ${JSON.stringify(MODEL)},`,
    "    input={",
    ...fields,
    "    },",
    "    use_file_output=False,",
    ")",
    ...(outputNeedsToken(pred)
      ? [
          "# With the token: this server may keep outputs behind it (I2V_OUTPUT_URLS=token).",
          'token = os.environ["REPLICATE_API_TOKEN"]',
          'clip = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=300)',
        ]
      : ["# A signed link, like Replicate's outputs: no token needed.", "clip = httpx.get(url, timeout=300)"]),
    'with open("output.mp4", "wb") as file:',
    "    file.write(clip.raise_for_status().content)",
  ].join("\n");
}

export function jsSnippet(pred, seed) {
  const fields = snippetInput(pred, seed).map(([k, v]) => `    ${k}: ${jsValue(k, v)},`);
  return [
    "// npm install replicate",
    'import Replicate from "replicate";',
    'import { writeFile } from "node:fs/promises";',
    "",
    `const replicate = new Replicate({ baseUrl: ${JSON.stringify(`${baseOf(pred)}/v1`)}, useFileOutput: false });`,
    `const url = await replicate.run(${JSON.stringify(MODEL)}, {`,
    "  input: {",
    ...fields,
    "  },",
    "});",
    ...(outputNeedsToken(pred)
      ? [
          "// With the token: this server may keep outputs behind it (I2V_OUTPUT_URLS=token).",
          "const clip = await fetch(url, { headers: { Authorization: `Bearer ${process.env.REPLICATE_API_TOKEN}` } });",
        ]
      : ["// A signed link, like Replicate's outputs: no token needed.", "const clip = await fetch(url);"]),
    'if (!clip.ok) throw new Error(`HTTP ${clip.status}`);',
    'await writeFile("output.mp4", Buffer.from(await clip.arrayBuffer()));',
  ].join("\n");
}
