// A refused prompt's node_errors, each problem of a Krea node once, under the input it is about. ComfyUI 0.3.64
// attaches the text a node's VALIDATE_INPUTS returns to every input that check takes (execution.py
// validate_inputs), so the sampler's "width must be a multiple of 16" is listed under width, height,
// guidance_scale and strength alike. The Krea nodes give one problem a line, starting with the input it is about;
// this keeps each line once, as one error under that input: the same rule as nodes/host/comfyui_errors.py, which
// the pack's own Python readers use (a test pins the two against each other). Pure: runs under plain Node.

export const CUSTOM = "custom_validation_failed";

// The input among `inputs` that `line` starts with ("width must be ...", "checker_name: ..."), else null.
export function about(line, inputs) {
  return inputs.find((name) => line.startsWith(name) && [":", " "].includes(line[name.length])) ?? null;
}

// The errors of one node with its custom validation texts rewritten: one error a distinct line, under the input the
// line names (a line that names none of them stays on the first input that carried it, as the frontend needs an
// input to show it at). Other errors are kept as they are.
export function distinctErrors(errors) {
  const kept = [];
  const texts = new Map(); // text -> inputs it was attached to, in order
  for (const error of errors) {
    const name = error?.extra_info?.input_name ?? "";
    const prefix = `${name} - `;
    if (error?.type !== CUSTOM || !String(error.details ?? "").startsWith(prefix)) {
      kept.push(error);
      continue;
    }
    const text = error.details.slice(prefix.length);
    if (!texts.has(text)) texts.set(text, { inputs: [], template: error });
    texts.get(text).inputs.push(name);
  }
  const seen = new Set();
  for (const [text, { inputs, template }] of texts) {
    for (const line of text.split("\n").filter((l) => l.trim())) {
      const name = about(line, inputs) ?? inputs[0];
      if (seen.has(`${name}\n${line}`)) continue;
      seen.add(`${name}\n${line}`);
      kept.push({ ...template, details: `${name} - ${line}`, extra_info: { ...template.extra_info, input_name: name } });
    }
  }
  return kept;
}

// node_errors rewritten in place for the nodes `isPackNode(class_type)` says are the pack's; returns how many
// errors were dropped as repeats.
export function distinctNodeErrors(nodeErrors, isPackNode) {
  let dropped = 0;
  for (const entry of Object.values(nodeErrors ?? {})) {
    if (!entry || !Array.isArray(entry.errors) || !isPackNode(entry.class_type)) continue;
    const errors = distinctErrors(entry.errors);
    dropped += entry.errors.length - errors.length;
    entry.errors = errors;
  }
  return dropped;
}
