// The Krea nodes in ComfyUI's editor: the sampler shows the size it will make, the sampler and the safety check
// show their last reports as compact badges under the node, the sampler's context menu copies its settings as
// a fal request or pastes one onto the widgets, and a refused prompt lists each problem of a Krea node once.
// Built on the documented extension API (app.registerExtension with its hooks beforeConfigureGraph,
// beforeRegisterNodeDef, getNodeMenuItems and setup; the node hooks onExecuted, onDrawForeground and
// getExtraMenuOptions, the menu hook of frontends older than getNodeMenuItems), with one exception: the frontend
// has no hook for a refused prompt, so setup wraps api.queuePrompt to rewrite the Krea nodes' node_errors before
// the frontend shows them (anything else passes through untouched). The mapping itself is in krea_fal.js and the
// error rule in krea_errors.js (pure, tested under Node).
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { distinctNodeErrors } from "./krea_errors.js";
import { migrateOldTypes } from "./krea_migrate.js";
import {
  SAFETY_CHECK,
  SAMPLER,
  SAVE_IMAGE,
  TEXT_ENCODE,
  falNodes,
  fromFalRequest,
  inputSpecs,
  isLinked,
  reportBadges,
  resolvedSize,
  toFalRequest,
  widgetValue,
} from "./krea_fal.js";

const PACK = "Krea node pack";
const COPY_ITEM = "Copy as fal request";
const PASTE_ITEM = "Paste fal request";
const SPECS = {}; // node type -> inputSpecs of its definition, for checking pasted values
const REPORTING_NODES = new Set([SAMPLER, SAFETY_CHECK]);
const TONES = {
  size: ["#2d3b55", "#cfe0ff"],
  info: ["#353535", "#dddddd"],
  good: ["#1e4a2c", "#c8f0d2"],
  warn: ["#5a4714", "#ffe9a8"],
  bad: ["#6a1f1f", "#ffd0d0"],
};

// One message, where the user and the tests see it: the console always, and a toast where the frontend has them.
function notify(severity, summary, detail) {
  console.info(`${PACK}: ${summary}: ${detail}`);
  app.extensionManager?.toast?.add?.({ severity, summary, detail, life: 10000 });
}

app.registerExtension({
  name: "krea.model_type_migration",
  async beforeConfigureGraph(graphData) {
    const changed = migrateOldTypes(graphData);
    if (changed > 0) {
      const detail = "This workflow was saved with the Krea loader's old output types; they are now ComfyUI's " +
        "standard MODEL, CLIP and VAE (LoRA loaders, samplers, text and VAE nodes accept them). The links were " +
        "updated: save the workflow to keep it.";
      console.info(`${PACK}: ${detail}`);
      app.extensionManager?.toast?.add({ severity: "info", summary: PACK, detail, life: 8000 });
    }
  },
});

// ---- badges ----

// Rounded labels in rows under the node (its title bar has the frontend's own badges), cut to the node's width.
function drawBadges(ctx, node, badges) {
  if (!badges.length || node.flags?.collapsed) return;
  const height = 18, pad = 6, gap = 4, maxWidth = Math.max(60, node.size[0]);
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "middle";
  let x = 0, y = node.size[1] + 6;
  for (const { text, tone } of badges) {
    let label = text;
    while (label.length > 4 && ctx.measureText(label).width + 2 * pad > maxWidth) label = label.slice(0, -2) + "…";
    const width = ctx.measureText(label).width + 2 * pad;
    if (x > 0 && x + width > maxWidth) {
      x = 0;
      y += height + gap;
    }
    const [fill, color] = TONES[tone] ?? TONES.info;
    ctx.fillStyle = fill;
    ctx.beginPath();
    if (ctx.roundRect) ctx.roundRect(x, y, width, height, height / 2);
    else ctx.rect(x, y, width, height);
    ctx.fill();
    ctx.fillStyle = color;
    ctx.fillText(label, x + pad, y + height / 2 + 1);
    x += width + gap;
  }
  ctx.restore();
}

// What the node shows: for the sampler the size its next run makes, then the last run's report.
function nodeBadges(node) {
  const badges = [];
  if (node.type === SAMPLER) {
    const size = resolvedSize({
      image_size: widgetValue(node, "image_size"), width: widgetValue(node, "width"),
      height: widgetValue(node, "height"),
    }, isLinked(node, "latent"));
    badges.push({ text: size.text, tone: size.width == null && !isLinked(node, "latent") ? "warn" : "size" });
  }
  return badges.concat(node.krea_badges ?? []);
}

app.registerExtension({
  name: "krea.node_reports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if ([SAMPLER, TEXT_ENCODE, SAFETY_CHECK, SAVE_IMAGE].includes(nodeData.name)) {
      SPECS[nodeData.name] = inputSpecs(nodeData);
    }
    if (!REPORTING_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const report = Array.isArray(message?.krea_report) ? message.krea_report[0] : undefined;
      const summary = Array.isArray(message?.text) ? message.text[0] : "";
      this.krea_badges = reportBadges(nodeData.name, report, summary); // not serialized: the last run only
      this.setDirtyCanvas?.(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      drawBadges(ctx, this, nodeBadges(this));
      return result;
    };
  },
});

// ---- fal request: copy and paste ----

// A small dialog with a text box: the fallback where the clipboard cannot be used (no permission, plain http on a
// LAN address). Resolves to the text, or null when cancelled.
function textDialog(title, text, editable) {
  return new Promise((resolve) => {
    const dialog = document.createElement("dialog");
    dialog.className = "krea-fal-dialog";
    dialog.style.cssText = "padding:16px;border-radius:8px;border:1px solid #555;background:#222;color:#ddd;" +
      "width:min(640px,90vw)";
    const heading = document.createElement("div");
    heading.textContent = title;
    heading.style.cssText = "margin-bottom:8px;font-weight:bold";
    const area = document.createElement("textarea");
    area.value = text;
    area.readOnly = !editable;
    area.rows = 16;
    area.style.cssText = "width:100%;box-sizing:border-box;font-family:monospace;background:#111;color:#ddd";
    const buttons = document.createElement("div");
    buttons.style.cssText = "display:flex;gap:8px;justify-content:flex-end;margin-top:8px";
    const close = (value) => {
      dialog.close();
      dialog.remove();
      resolve(value);
    };
    for (const [label, value] of editable ? [["Cancel", null], ["Paste", true]] : [["Close", null]]) {
      const button = document.createElement("button");
      button.textContent = label;
      button.addEventListener("click", () => close(value === true ? area.value : null));
      buttons.append(button);
    }
    dialog.addEventListener("cancel", () => close(null));
    dialog.append(heading, area, buttons);
    document.body.append(dialog);
    dialog.showModal();
    area.focus();
    area.select();
  });
}

async function copyFalRequest(sampler) {
  const { endpoint, body, notes } = toFalRequest(falNodes(sampler));
  const text = JSON.stringify(body, null, 2);
  const detail = [`For ${endpoint}.`, ...notes].join(" ");
  try {
    await navigator.clipboard.writeText(text);
    notify("success", "Copied as fal request", detail);
  } catch (err) {
    notify("info", "fal request (the clipboard is not available here: copy it from the dialog)", detail);
    await textDialog(`fal request for ${endpoint}`, text, false);
  }
}

async function pasteFalRequest(sampler) {
  let text = null;
  try {
    text = await navigator.clipboard.readText();
  } catch (err) {
    text = null; // no clipboard permission: ask for the text instead
  }
  if (!text?.trim()) text = await textDialog("Paste a fal request (JSON)", "", true);
  if (text == null) return;
  const nodes = falNodes(sampler);
  const result = fromFalRequest(text, nodes, SPECS);
  for (const { role, widget: name, value } of result.changes) {
    const widget = nodes[role].widgets?.find((w) => w.name === name);
    if (widget) widget.value = value;
    nodes[role].setDirtyCanvas?.(true, true);
  }
  const severity = result.invalid.length ? "error" : result.skipped.length || !result.applied ? "warn" : "success";
  notify(severity, result.applied ? "Pasted fal request" : "fal request not pasted", result.message);
}

function falMenuItems(node) {
  return [
    { content: COPY_ITEM, callback: () => copyFalRequest(node) },
    { content: PASTE_ITEM, callback: () => pasteFalRequest(node) },
  ];
}

let menuHookCalled = false; // the frontend has the context menu API: the node hook below stays out of the menu

app.registerExtension({
  name: "krea.fal_request",
  // Frontends with the context menu API (after 1.27) call this and deprecate patching getExtraMenuOptions.
  getNodeMenuItems(node) {
    menuHookCalled = true;
    return node?.comfyClass === SAMPLER || node?.type === SAMPLER ? [null, ...falMenuItems(node)] : [];
  },
  // Older frontends (1.27 among them) have only the node hook; it is installed only where the API is missing.
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== SAMPLER || typeof app.collectNodeMenuItems === "function") return;
    const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
    nodeType.prototype.getExtraMenuOptions = function (canvas, options) {
      const result = getExtraMenuOptions?.apply(this, arguments);
      if (!menuHookCalled) options.push(null, ...falMenuItems(this));
      return result;
    };
  },
});

// ---- refused prompts ----

const isPackNode = (type) => String(type ?? "").startsWith("Krea");

app.registerExtension({
  name: "krea.validation_messages",
  // ComfyUI lists a node's check text under every input the check takes: each Krea problem once, under its input.
  async setup() {
    const queuePrompt = api.queuePrompt;
    if (typeof queuePrompt !== "function") return;
    api.queuePrompt = async function (...args) {
      try {
        const response = await queuePrompt.apply(this, args);
        if (response?.node_errors) distinctNodeErrors(response.node_errors, isPackNode);
        return response;
      } catch (error) {
        if (error?.response?.node_errors) distinctNodeErrors(error.response.node_errors, isPackNode);
        throw error;
      }
    };
  },
});
