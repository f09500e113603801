// The Krea nodes' widget values <-> a fal request body (fal-ai/flux/krea and fal-ai/flux/krea/image-to-image,
// the same fields fal_api/schema.py accepts), the size the sampler will make, and the text of the badges that show
// the nodes' reports. Pure: no ComfyUI imports, so it runs under plain Node (tests/test_web_fal_mapping.py).
//
// Graph access goes through the LiteGraph node interface only (type, widgets, inputs, outputs, getInputNode,
// getOutputNodes), which the browser's nodes have and the tests imitate with plain objects.

// fal's image_size presets (width, height): the same table as sampling/parameters.py IMAGE_SIZES (a test pins them).
export const IMAGE_SIZES = Object.freeze({
  square_hd: [1024, 1024],
  square: [512, 512],
  portrait_4_3: [768, 1024],
  portrait_16_9: [576, 1024],
  landscape_4_3: [1024, 768],
  landscape_16_9: [1024, 576],
});
export const CUSTOM_SIZE = "custom";
export const SIZE_MULTIPLE = 16; // custom sides are rounded down to it, as the fal server does (round_down_side)
export const MAX_SIDE = 14142; // the longest custom side (sampling/parameters.py MAX_SIDE)
export const MAX_PROMPT_CHARS = 20000; // sampling/parameters.py MAX_PROMPT_CHARS
export const TEXT_TO_IMAGE = "fal-ai/flux/krea";
export const IMAGE_TO_IMAGE = "fal-ai/flux/krea/image-to-image";

export const SAMPLER = "KreaSampler";
export const TEXT_ENCODE = "KreaTextEncode";
export const SAFETY_CHECK = "KreaSafetyCheck";
export const SAVE_IMAGE = "KreaSaveImage";
const PASS_THROUGH = new Set(["Reroute"]); // the frontend's own routing node: followed, not a value holder

// Where each fal field lives: the node (a role found from the sampler) and its widget; the same places as the
// Python table fal_api/fields.py FIELD_INPUTS (a test pins them).
export const FIELDS = Object.freeze({
  prompt: { role: "encoder", widget: "prompt" },
  image_size: { role: "sampler", widget: "image_size" },
  num_inference_steps: { role: "sampler", widget: "num_inference_steps" },
  guidance_scale: { role: "sampler", widget: "guidance_scale" },
  seed: { role: "sampler", widget: "seed" },
  num_images: { role: "sampler", widget: "num_images" },
  acceleration: { role: "sampler", widget: "acceleration" },
  strength: { role: "sampler", widget: "strength" },
  enable_safety_checker: { role: "safety", widget: "enable_safety_checker" },
  output_format: { role: "save", widget: "output_format" },
});
export const ROLE_NODES = Object.freeze({
  encoder: TEXT_ENCODE, sampler: SAMPLER, safety: SAFETY_CHECK, save: SAVE_IMAGE,
});
// fal fields that have no widget, and why (a paste lists them, changing nothing for them).
export const UNMAPPED = Object.freeze({
  image_url: "the input image comes from the Load Image node: load the file there",
  mask_url: "the inpainting mask comes from the Load Image (as Mask) node: load the file there",
  sync_mode: "how fal hands back the result; a graph has no such setting",
  loras: "LoRAs are LoraLoaderModelOnly nodes in front of the sampler, not a widget",
});

// ---- node definitions (GET /object_info entries, what beforeRegisterNodeDef receives) ----

// The widget inputs of a node definition: {input name: {kind: "combo", values} | {kind: "int" | "float", min, max,
// step} | {kind: "boolean"} | {kind: "string"}}; both combo spellings ([[...values], opts] and ["COMBO", {options}]).
export function inputSpecs(nodeDef) {
  const specs = {};
  for (const group of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeDef?.input?.[group] ?? {})) {
      const [type, options = {}] = Array.isArray(spec) ? spec : [spec];
      if (Array.isArray(type)) specs[name] = { kind: "combo", values: type };
      else if (type === "COMBO") specs[name] = { kind: "combo", values: options.options ?? [] };
      else if (type === "INT" || type === "FLOAT") {
        specs[name] = { kind: type.toLowerCase(), min: options.min, max: options.max, step: options.step };
      } else if (type === "BOOLEAN") specs[name] = { kind: "boolean" };
      else if (type === "STRING") specs[name] = { kind: "string" };
    }
  }
  return specs;
}

// ---- the graph around a sampler ----

export function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

function inputIndex(node, name) {
  return (node?.inputs ?? []).findIndex((input) => input.name === name);
}

export function isLinked(node, name) {
  const input = node?.inputs?.[inputIndex(node, name)];
  return input != null && input.link != null;
}

// The node feeding input `name`, through Reroute nodes; null when it is not linked.
export function upstream(node, name) {
  let index = inputIndex(node, name);
  let source = index < 0 ? null : node.getInputNode(index);
  for (let hops = 0; source && PASS_THROUGH.has(source.type) && hops < 64; hops++) {
    source = source.getInputNode(0);
  }
  return source ?? null;
}

// The first node of `type` downstream of `node` (breadth first over every output), or null.
export function downstream(node, type) {
  const seen = new Set([node]);
  let frontier = [node];
  while (frontier.length) {
    const next = [];
    for (const current of frontier) {
      for (let slot = 0; slot < (current.outputs?.length ?? 0); slot++) {
        for (const target of current.getOutputNodes(slot) ?? []) {
          if (seen.has(target)) continue;
          if (target.type === type) return target;
          seen.add(target);
          next.push(target);
        }
      }
    }
    frontier = next;
  }
  return null;
}

// The nodes that hold the fal fields of `sampler`'s run: {sampler, encoder, safety, save} (null where absent), and
// whether it runs image-to-image (its latent input is linked).
export function falNodes(sampler) {
  const encoder = upstream(sampler, "conditioning");
  return {
    sampler,
    encoder: encoder?.type === TEXT_ENCODE ? encoder : null,
    safety: downstream(sampler, SAFETY_CHECK),
    save: downstream(sampler, SAVE_IMAGE),
    imageToImage: isLinked(sampler, "latent"),
  };
}

// ---- the size the sampler makes ----

// {width, height, text} of the sampler's next run from its widget values; width and height are null when the size
// is not known here (image-to-image: the input image's size) or not valid.
export function resolvedSize({ image_size, width, height }, imageToImage = false) {
  if (imageToImage) return { width: null, height: null, text: "size of the input image" };
  if (image_size === CUSTOM_SIZE) {
    if (!validSide(width) || !validSide(height)) {
      return { width: null, height: null, text: `${width}×${height}: sides must be multiples of ${SIZE_MULTIPLE}` };
    }
    return { width, height, text: `${width}×${height}` };
  }
  const preset = IMAGE_SIZES[image_size];
  if (!preset) return { width: null, height: null, text: `unknown size ${image_size}` };
  return { width: preset[0], height: preset[1], text: `${preset[0]}×${preset[1]}` };
}

function validSide(value) {
  return Number.isInteger(value) && value >= SIZE_MULTIPLE && value <= MAX_SIDE && value % SIZE_MULTIPLE === 0;
}

// ---- widgets -> fal request ----

// The fal request that `nodes` (falNodes) would make: {endpoint, body, notes}. notes (sentences) say what the body
// cannot carry (the input image) or what was left out, so that the request does what the graph does.
export function toFalRequest(nodes) {
  const { sampler, encoder, safety, save, imageToImage } = nodes;
  const value = (name) => widgetValue(sampler, name);
  const body = {};
  const notes = [];
  if (encoder) body.prompt = widgetValue(encoder, "prompt");
  else notes.push("prompt is left out: the sampler's conditioning does not come from a Krea Text Encode node.");
  if (!imageToImage) {
    const preset = value("image_size");
    body.image_size = preset === CUSTOM_SIZE ? { width: value("width"), height: value("height") } : preset;
  }
  for (const name of ["num_inference_steps", "guidance_scale", "seed", "num_images", "acceleration"]) {
    body[name] = value(name);
  }
  if (imageToImage) {
    body.strength = value("strength");
    notes.push("Add image_url: the graph's input image is the file its Load Image node reads.");
  }
  if (safety) body.enable_safety_checker = widgetValue(safety, "enable_safety_checker");
  else {
    body.enable_safety_checker = false; // fal checks by default; this graph does not
    notes.push("enable_safety_checker is false: no Krea Safety Check follows the sampler.");
  }
  if (save) body.output_format = widgetValue(save, "output_format");
  else notes.push("output_format is left out: no Krea Save Image follows the sampler.");
  return { endpoint: imageToImage ? IMAGE_TO_IMAGE : TEXT_TO_IMAGE, body, notes };
}

// ---- fal request -> widgets ----

// What pasting `request` (JSON text or an object) onto the graph of `nodes` does. `specs` maps node type to
// inputSpecs of its definition. Returns {applied, changes: [{role, widget, value}], set, skipped, invalid, notes,
// message}. The rule: a field that has no widget here (image_url, sync_mode, unknown keys, a node the graph lacks)
// is skipped and listed while the other fields are set; a value that is wrong (bad type, out of range, not a
// choice) changes nothing at all, and every problem is listed.
export function fromFalRequest(request, nodes, specs) {
  const result = { applied: false, changes: [], set: [], skipped: [], invalid: [], notes: [] };
  let body = request;
  if (typeof request === "string") {
    try {
      body = JSON.parse(request);
    } catch (err) {
      result.invalid.push(`the text is not JSON (${err.message})`);
      return finish(result);
    }
  }
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    result.invalid.push("a fal request is a JSON object of fields, such as {\"prompt\": \"...\"}");
    return finish(result);
  }
  for (const [key, raw] of Object.entries(body)) {
    if (key in UNMAPPED) {
      result.skipped.push(`${key} (${UNMAPPED[key]})`);
      continue;
    }
    const field = FIELDS[key];
    if (!field) {
      result.skipped.push(`${key} (not a field of ${TEXT_TO_IMAGE})`);
      continue;
    }
    const node = nodes[field.role];
    if (!node) {
      result.skipped.push(`${key} (the graph has no ${ROLE_NODES[field.role]} node connected to the sampler)`);
      continue;
    }
    if (key === "strength" && !nodes.imageToImage) {
      result.skipped.push("strength (image-to-image only: the sampler's latent input is not linked)");
      continue;
    }
    if (key === "image_size" && nodes.imageToImage) {
      result.skipped.push("image_size (image-to-image makes the size of the input image)");
      continue;
    }
    if (key === "seed" && raw === null) {
      result.notes.push("seed is null (fal picks one at random): the seed widget is left as it is");
      continue;
    }
    const spec = specs?.[ROLE_NODES[field.role]]?.[field.widget];
    const checked = key === "image_size" ? checkImageSize(raw, spec) : checkValue(key, raw, spec);
    if (checked.error) {
      result.invalid.push(checked.error);
      continue;
    }
    if (checked.note) result.notes.push(checked.note);
    for (const [widget, value] of Object.entries(checked.values)) {
      result.changes.push({ role: field.role, widget, value });
    }
    result.set.push(key);
  }
  if (result.invalid.length) {
    result.changes = [];
    result.set = [];
  } else {
    result.applied = result.changes.length > 0;
  }
  return finish(result);
}

function describe(value) {
  return JSON.stringify(value) ?? String(value);
}

function checkValue(key, raw, spec) {
  const kind = spec?.kind ?? (key === "prompt" ? "string" : undefined);
  const values = (value) => ({ values: { [FIELDS[key].widget]: value } });
  if (kind === "string") {
    if (typeof raw !== "string") return { error: `${key} must be text, got ${describe(raw)}` };
    if (raw.length > MAX_PROMPT_CHARS) return { error: `${key} is longer than ${MAX_PROMPT_CHARS} characters` };
    return values(raw);
  }
  if (kind === "boolean") {
    if (typeof raw !== "boolean") return { error: `${key} must be true or false, got ${describe(raw)}` };
    return values(raw);
  }
  if (kind === "combo") {
    if (!spec.values.includes(raw)) return { error: `${key} ${describe(raw)} is not one of ${spec.values.join(", ")}` };
    return values(raw);
  }
  if (kind === "int" || kind === "float") {
    const whole = kind === "int";
    if (typeof raw !== "number" || !Number.isFinite(raw) || (whole && !Number.isInteger(raw))) {
      return { error: `${key} must be ${whole ? "a whole number" : "a number"}, got ${describe(raw)}` };
    }
    const min = spec.min ?? -Infinity, max = spec.max ?? Infinity;
    if (raw < min || raw > max) return { error: `${key} ${raw} is outside ${min} to ${max}` };
    // A browser number holds whole numbers exactly only up to 2^53 - 1: a larger seed would change silently.
    if (whole && !Number.isSafeInteger(raw)) {
      return { error: `${key} is larger than ${Number.MAX_SAFE_INTEGER}, the largest whole number the browser's ` +
        "widgets hold exactly" };
    }
    return values(raw);
  }
  return { error: `${key}: the node has no widget for it` };
}

function checkImageSize(raw, spec) {
  const presets = (spec?.values ?? Object.keys(IMAGE_SIZES)).filter((v) => v !== CUSTOM_SIZE && v in IMAGE_SIZES);
  if (typeof raw === "string") {
    if (!presets.includes(raw)) {
      return { error: `image_size ${describe(raw)} is not one of ${presets.join(", ")} (or {"width", "height"})` };
    }
    return { values: { image_size: raw } };
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    return { error: `image_size must be a preset name or {"width": ..., "height": ...}, got ${describe(raw)}` };
  }
  const width = raw.width ?? 512; // fal's ImageSize defaults
  const height = raw.height ?? 512;
  for (const [name, side] of [["width", width], ["height", height]]) {
    if (!Number.isInteger(side) || side <= 0 || side > MAX_SIDE) {
      return { error: `image_size.${name} must be a whole number from 1 to ${MAX_SIDE}, got ${describe(side)}` };
    }
  }
  const round = (side) => Math.max(SIZE_MULTIPLE, Math.floor(side / SIZE_MULTIPLE) * SIZE_MULTIPLE);
  const result = { values: { image_size: CUSTOM_SIZE, width: round(width), height: round(height) } };
  if (round(width) !== width || round(height) !== height) {
    result.note = `image_size ${width}×${height} was rounded down to ${round(width)}×${round(height)} ` +
      `(multiples of ${SIZE_MULTIPLE}, as fal does)`;
  }
  return result;
}

function finish(result) {
  const parts = [];
  if (result.invalid.length) parts.push(`Nothing was changed. Wrong values: ${result.invalid.join("; ")}.`);
  else if (result.applied) parts.push(`Set from the fal request: ${result.set.join(", ")}.`);
  else parts.push("Nothing was changed: the request has no field this graph can take.");
  if (result.skipped.length) parts.push(`Not mapped: ${result.skipped.join("; ")}.`);
  if (result.notes.length) parts.push(`Note: ${result.notes.join("; ")}.`);
  result.message = parts.join(" ");
  return result;
}

// ---- report badges ----

function seconds(value) {
  return typeof value === "number" && Number.isFinite(value) ? `${value.toFixed(value < 10 ? 2 : 1)} s` : null;
}

// Compact badges ({text, tone}: tone is "info", "good", "warn" or "bad") for a node's krea_report ui entry;
// `summary` is its text report, whose notes (after the first "; ") become a warning badge.
export function reportBadges(type, report, summary = "") {
  if (!report || typeof report !== "object") return [];
  const badges = [];
  if (type === SAMPLER) {
    badges.push({ text: `${report.steps} steps`, tone: "info" });
    badges.push({ text: `${report.computed} computed`, tone: "info" });
    badges.push({ text: `${report.reused} reused`, tone: report.reused > 0 ? "good" : "info" });
    if (report.acceleration && report.acceleration !== "none") {
      badges.push({ text: `acceleration ${report.acceleration}`, tone: "info" });
    }
    if (report.width && report.height) badges.push({ text: `made ${report.width}×${report.height}`, tone: "info" });
    const notes = typeof summary === "string" ? summary.split("; ").slice(1).join("; ") : "";
    if (notes) badges.push({ text: `⚠ ${notes}`, tone: "warn" });
  } else if (type === SAFETY_CHECK) {
    const flags = Array.isArray(report.has_nsfw_concepts) ? report.has_nsfw_concepts : [];
    const flagged = flags.filter(Boolean).length;
    if (report.enabled === false) badges.push({ text: "safety check off", tone: "warn" });
    else if (flagged) badges.push({ text: `has_nsfw_concepts: ${flagged} of ${flags.length}`, tone: "bad" });
    else badges.push({ text: `has_nsfw_concepts: none of ${flags.length}`, tone: "good" });
  }
  const time = seconds(report.seconds);
  if (time) badges.push({ text: time, tone: "info" });
  return badges;
}
