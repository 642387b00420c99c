// What the server accepts, read from the model's schema (GET /v1/models/kwaivgi/kling-v2.1), so the page
// checks inputs before uploading with the server's own limits; and server errors in plain words.

export const LABELS = {
  start_image: "start image",
  end_image: "end image",
  prompt: "prompt",
  negative_prompt: "negative prompt",
  mode: "mode",
  duration: "duration",
  seed: "seed",
  audio: "sound",
  preset: "speed",
};

// Until the schema has arrived (or if it cannot be read) nothing is checked that the server would not check.
export const rules = {
  known: false,
  maxLength: {},
  seed: { min: "0", max: null },
  image: null, // {formats, max_bytes, min_side, max_aspect}
  output: null, // {short_side: {standard, pro}, fps}
};

export function applySchema(model) {
  const props = model?.latest_version?.openapi_schema?.components?.schemas?.Input?.properties || {};
  for (const name of ["prompt", "negative_prompt"]) {
    if (props[name]?.maxLength) rules.maxLength[name] = Number(props[name].maxLength);
  }
  if (props.seed) {
    rules.seed = { min: String(props.seed.minimum ?? 0), max: props.seed.maximum != null ? String(props.seed.maximum) : null };
  }
  rules.image = props.start_image?.["x-i2v-image"] || null;
  rules.output = props.mode?.["x-i2v-output"] || null;
  rules.known = true;
}

// ---------- the output size, as src/i2v/geometry.py output_size computes it ----------

// Python's round(): halves go to the even neighbour.
function roundHalfEven(x) {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff > 0.5) return floor + 1;
  if (diff < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}
const even = (x) => Math.max(2, 2 * roundHalfEven(x / 2));

/** [width, height] of the clip: the short side fixed, the long side from the image's aspect, both even. */
export function outputSize(imageWidth, imageHeight, shortSide) {
  const aspect = imageWidth / imageHeight;
  if (aspect >= 1) return [even(shortSide * aspect), shortSide];
  return [shortSide, even(shortSide / aspect)];
}

// ---------- checks before upload ----------

export const codePoints = (text) => [...String(text)].length; // Python's len(), which the server counts

export function checkPrompt(name, value, { required }) {
  const max = rules.maxLength[name];
  if (required && !value.trim()) return "Write a prompt: what should happen in the clip?";
  const length = codePoints(value);
  if (max && length > max) {
    const what = name === "prompt" ? "The prompt" : "The negative prompt";
    return `${what} is ${length} characters long; at most ${max} are allowed. Shorten it by ${length - max}.`;
  }
  return null;
}

export function seedRange() {
  return rules.seed.max ? `a whole number from ${rules.seed.min} to ${rules.seed.max}` : "a whole number, 0 or more";
}

export function checkSeed(text) {
  const value = text.trim();
  if (value === "") return null;
  const problem = `The seed must be ${seedRange()}, or left blank for a random one.`;
  if (!/^\d+$/.test(value)) return problem;
  const n = BigInt(value);
  if (n < BigInt(rules.seed.min) || (rules.seed.max && n > BigInt(rules.seed.max))) return problem;
  return null;
}

const SIGNATURES = {
  "image/jpeg": (b) => b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff,
  "image/png": (b) => [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a].every((v, i) => b[i] === v),
  "image/webp": (b) => String.fromCharCode(...b.slice(0, 4)) === "RIFF" && String.fromCharCode(...b.slice(8, 12)) === "WEBP",
};

function formatNames(formats) {
  const pretty = { jpeg: "JPEG", png: "PNG", webp: "WebP" };
  const names = formats.map((f) => pretty[f.replace("image/", "")] || f.replace("image/", "").toUpperCase());
  return names.length > 1 ? `${names.slice(0, -1).join(", ")} or ${names.at(-1)}` : names.join("");
}

/** What is wrong with a chosen file before it is even decoded (type by its first bytes, size), or null. */
export async function checkFileBytes(file) {
  const image = rules.image;
  if (!image) return null;
  const head = new Uint8Array(await file.slice(0, 16).arrayBuffer());
  const kind = Object.keys(SIGNATURES).find((type) => SIGNATURES[type](head));
  if (!kind || !image.formats.includes(kind)) {
    return `“${file.name}” is not a ${formatNames(image.formats)} image. Choose a photo or picture in one of those formats.`;
  }
  if (file.size > image.max_bytes) {
    return `“${file.name}” is ${(file.size / 2 ** 20).toFixed(1)} MB; images may be at most ${image.max_bytes / 2 ** 20} MB.`;
  }
  return null;
}

/** What is wrong with a decoded image's size, or null. */
export function checkImageSize(width, height) {
  const image = rules.image;
  if (!image) return null;
  if (Math.min(width, height) < image.min_side) {
    return `This image is ${width} × ${height} px; each side must be at least ${image.min_side} px. Choose a larger image.`;
  }
  const aspect = width / height;
  if (aspect > image.max_aspect || aspect < 1 / image.max_aspect) {
    return `This image is ${width} × ${height} px, too ${aspect > 1 ? "wide" : "tall"}: the long side may be at most ${image.max_aspect} times the short side.`;
  }
  return null;
}

// ---------- the server's errors in plain words ----------

// The server's rules come from pydantic ("Input should be less than 9223372036854775808"); say them plainly.
export function plainError(field, type, description) {
  const label = LABELS[field] || field;
  const Label = label[0].toUpperCase() + label.slice(1);
  const text = String(description || "");
  if (field === "seed" && type !== "required") return `The seed must be ${seedRange()}, or left blank for a random one.`;
  switch (type) {
    case "required":
    case "missing":
      return field === "prompt" ? "Write a prompt: what should happen in the clip?" : `${Label} is required.`;
    case "string_too_long": {
      const max = text.match(/at most (\d+)/)?.[1] || rules.maxLength[field];
      return `${Label} is too long: at most ${max} characters are allowed.`;
    }
    case "enum":
    case "literal_error": {
      const choices = [...text.matchAll(/'([^']*)'|\b(\d+)\b/g)].map((m) => m[1] ?? m[2]);
      return choices.length ? `Choose one of: ${choices.join(", ")}.` : `Choose a ${label} from the list.`;
    }
    case "image":
      return `The ${label}: ${text.replace(/^(image is)/, "it is")}`.replace(/\.?$/, ".");
    default:
      // The service's own messages are already sentences; pydantic's ("Input should ...") are not for people.
      if (!text || /^(Input should|Value error|Field required|Extra inputs)/.test(text)) {
        return `This ${label} is not accepted; check it and try again.`;
      }
      return `The ${label}: ${text}`.replace(/\.?$/, ".");
  }
}
