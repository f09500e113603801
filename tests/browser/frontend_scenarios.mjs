// ComfyUI's own frontend (its comfyui-frontend-package, served by the real ComfyUI with the pack in custom_nodes),
// in Debian's Chromium driven by playwright-core: for each shipped workflow, load it, queue it from the page, copy
// and paste fal requests through the sampler's context menu. Prints ONE JSON line, the report that
// tests/test_browser.py asserts on; screenshots of each state go to ARTIFACTS.
//
//     node frontend_scenarios.mjs CONFIG_JSON
//
// CONFIG_JSON: {url, artifacts, chromium, userDataDir, uploadImage, workflows: {name: path},
//               conversions: {name: path} (UI workflows only loaded and converted with graphToPrompt)}.
import { readFileSync } from "node:fs";
import { basename, join } from "node:path";

import { chromium } from "playwright-core";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const BASE = config.url.replace(/\/+$/, "");
const MESSAGE_PREFIX = "Krea node pack: ";
const SMALL = { image_size: "custom", width: 64, height: 64, num_inference_steps: 2, control_after_generate: "fixed" };
const CHANGED = { image_size: "square", num_inference_steps: 5, seed: 1234, guidance_scale: 7.5, num_images: 2,
  acceleration: "high", strength: 0.5 };
const UNMAPPED_REQUEST = { prompt: "a red fox in the snow", image_url: "https://example.invalid/fox.png",
  sync_mode: true, guidance_scale: 3.5 };

const report = { workflows: {}, conversions: {}, pageErrors: [], extensionErrors: [], extensionWarnings: [],
  consoleErrors: [], menuEntries: {} };
const started = Date.now();

function elapsed() {
  return Math.round((Date.now() - started) / 100) / 10;
}

async function json(path, init) {
  const response = await fetch(`${BASE}${path}`, init);
  if (!response.ok) throw new Error(`${init?.method ?? "GET"} ${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

// The upload the image-to-image run reads, through ComfyUI's own route (as the Load Image node's button does).
async function upload(path) {
  const form = new FormData();
  form.append("image", new Blob([readFileSync(path)], { type: "image/png" }), basename(path));
  form.append("type", "input");
  form.append("overwrite", "true");
  return json("/upload/image", { method: "POST", body: form });
}

async function waitForHistory(known, timeoutMs = 240000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const history = await json("/history");
    for (const [id, entry] of Object.entries(history)) {
      if (!known.has(id) && entry.status?.completed !== undefined &&
          (entry.status.completed || entry.status.status_str === "error")) {
        return { id, ...entry };
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  throw new Error(`no finished prompt in /history after ${timeoutMs} ms`);
}

const context = await chromium.launchPersistentContext(config.userDataDir, {
  executablePath: config.chromium,
  headless: true,
  viewport: { width: 1600, height: 1000 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: BASE });
const page = context.pages()[0] ?? (await context.newPage());
const messages = [];
page.on("console", (message) => {
  const text = message.text();
  if (text.startsWith(MESSAGE_PREFIX)) messages.push(text.slice(MESSAGE_PREFIX.length));
  // e.g. the frontend's "[DEPRECATED] ... (Extension: "krea....")" for an API it plans to drop
  if (message.type() === "warning" && /krea/i.test(text)) report.extensionWarnings.push(text);
  if (message.type() === "error") {
    const where = message.location()?.url ?? "";
    report.consoleErrors.push(`${text.slice(0, 300)} (${where})`);
    if (where.includes("/extensions/krea/")) report.extensionErrors.push(text);
  }
});
page.on("pageerror", (error) => {
  report.pageErrors.push(`${error.message}\n${(error.stack ?? "").split("\n").slice(0, 4).join("\n")}`);
  if ((error.stack ?? "").includes("/extensions/krea/")) report.extensionErrors.push(error.stack);
});

async function screenshot(name, state) {
  const path = join(config.artifacts, `${name}-${state}.png`);
  await page.screenshot({ path, animations: "disabled" }); // toasts shown whole, not mid fade-in
  report.workflows[name].screenshots.push(path);
}

// The next message the extension writes to the console, after `action` ran.
async function messageAfter(action) {
  const count = messages.length;
  await action();
  const deadline = Date.now() + 20000;
  while (messages.length === count && Date.now() < deadline) await page.waitForTimeout(50);
  if (messages.length === count) throw new Error("the extension wrote no message");
  return messages[messages.length - 1];
}

// Right-click the sampler's title and pick `item` from its context menu, as a user does.
async function samplerMenu(item) {
  const point = await page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.nodes.find((n) => n.type === "KreaSampler");
    app.canvas.deselectAll?.();
    const titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT;
    const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + 60, node.pos[1] - titleHeight / 2]);
    const box = app.canvas.canvas.getBoundingClientRect();
    return { x: box.left + x / (window.devicePixelRatio || 1), y: box.top + y / (window.devicePixelRatio || 1) };
  });
  await page.mouse.click(point.x, point.y, { button: "right" });
  const entries = page.locator(".litecontextmenu .litemenu-entry", { hasText: item });
  await entries.first().waitFor({ state: "visible", timeout: 10000 });
  report.menuEntries[item] = Math.max(report.menuEntries[item] ?? 0, await entries.count()); // listed once
  await entries.first().click();
}

// The widget values of the nodes the fal fields live on.
async function widgetValues() {
  return page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    const values = {};
    for (const node of app.graph.nodes) {
      values[node.type] = Object.fromEntries((node.widgets ?? []).map((w) => [w.name, w.value]));
    }
    return values;
  });
}

async function setWidgets(type, values) {
  await page.evaluate(([type, values]) => {
    const node = window.comfyAPI.app.app.graph.nodes.find((n) => n.type === type);
    for (const [name, value] of Object.entries(values)) {
      const widget = node.widgets.find((w) => w.name === name);
      if (!widget) throw new Error(`${type} has no widget ${name}`);
      widget.value = value;
    }
    node.setDirtyCanvas(true, true);
  }, [type, values]);
}

// Toasts stay for seconds: each state's screenshot shows the messages of that state only.
async function clearToasts() {
  await page.evaluate(() => window.comfyAPI.app.app.extensionManager?.toast?.removeAll?.());
}

async function clipboard() {
  return page.evaluate(() => navigator.clipboard.readText());
}

// The frontend's own conversion of a UI workflow (graphToPrompt), and the graph as the page serializes it.
async function convert(path) {
  return page.evaluate(async (workflow) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(structuredClone(workflow));
    return { workflow: app.graph.serialize(), prompt: (await app.graphToPrompt()).output };
  }, JSON.parse(readFileSync(path, "utf8")));
}

async function scenario(name, path) {
  const entry = (report.workflows[name] = { screenshots: [], steps: {} });
  const workflow = JSON.parse(readFileSync(path, "utf8"));
  const step = (label) => (entry.steps[label] = elapsed());

  // Load: every node type registered (the afterConfigureGraph hook lists missing ones), every link as in the file.
  const loaded = await page.evaluate(async (workflow) => {
    const app = window.comfyAPI.app.app;
    window.__kreaMissing = undefined;
    await app.loadGraphData(structuredClone(workflow));
    const serialized = app.graph.serialize();
    return {
      missing: window.__kreaMissing,
      nodes: app.graph.nodes.map((n) => ({ id: n.id, type: n.type, hasErrors: Boolean(n.has_errors),
        registered: n.type in window.LiteGraph.registered_node_types })),
      links: serialized.links,
      prompt: (await app.graphToPrompt()).output,
    };
  }, workflow);
  Object.assign(entry, loaded);
  await page.waitForTimeout(300);
  await page.keyboard.press("Escape");
  await screenshot(name, "1-loaded");
  step("loaded");

  // Copy as fal request, from the shipped values.
  await clearToasts();
  entry.copyMessage = await messageAfter(() => samplerMenu("Copy as fal request"));
  entry.copiedShipped = JSON.parse(await clipboard());

  // Small enough for the CPU: through the sampler's widgets (and an uploaded input image for image-to-image).
  await setWidgets("KreaSampler", SMALL);
  if (workflow.nodes.some((n) => n.type === "LoadImage")) {
    entry.upload = await upload(config.uploadImage);
    await setWidgets("LoadImage", { image: entry.upload.name });
  }
  entry.small = await page.evaluate(async () => {
    const app = window.comfyAPI.app.app;
    return { workflow: app.graph.serialize(), prompt: (await app.graphToPrompt()).output };
  });
  entry.smallValues = await widgetValues();
  await messageAfter(() => samplerMenu("Copy as fal request"));
  entry.copiedSmall = JSON.parse(await clipboard());
  step("copied");

  // Queue from the page with its Run button; the run ends in /history, the badges on the nodes.
  const known = new Set(Object.keys(await json("/history")));
  await page.getByRole("button", { name: "Run", exact: true }).click();
  const history = await waitForHistory(known);
  entry.history = { status: history.status, outputs: history.outputs };
  await page.waitForFunction(() => {
    const nodes = window.comfyAPI.app.app.graph.nodes;
    return ["KreaSampler", "KreaSafetyCheck"].every((t) => nodes.find((n) => n.type === t)?.krea_badges?.length);
  }, null, { timeout: 30000 });
  entry.badges = await page.evaluate(() => Object.fromEntries(window.comfyAPI.app.app.graph.nodes
    .filter((n) => n.krea_badges).map((n) => [n.type, n.krea_badges])));
  await clearToasts();
  await screenshot(name, "2-ran");
  step("ran");

  // Change the widgets, then paste the copied request back (from the clipboard, as the menu reads it).
  await setWidgets("KreaSampler", CHANGED);
  await setWidgets("KreaTextEncode", { prompt: "something else" });
  await setWidgets("KreaSafetyCheck", { enable_safety_checker: false });
  await setWidgets("KreaSaveImage", { output_format: "png" });
  entry.changedValues = await widgetValues();
  await screenshot(name, "3-changed");
  await page.evaluate((text) => navigator.clipboard.writeText(text), JSON.stringify(entry.copiedSmall));
  await clearToasts();
  entry.pasteMessage = await messageAfter(() => samplerMenu("Paste fal request"));
  entry.pastedValues = await widgetValues();
  await screenshot(name, "4-pasted");
  await messageAfter(() => samplerMenu("Copy as fal request"));
  entry.copiedAfterPaste = JSON.parse(await clipboard());
  step("pasted");

  // Where the clipboard is refused, both menu entries fall back to a dialog with a text box.
  await page.evaluate(() => {
    const refuse = () => Promise.reject(new DOMException("refused by the test", "NotAllowedError"));
    navigator.clipboard.readText = refuse;
    navigator.clipboard.writeText = refuse;
  });
  const dialog = page.locator("dialog.krea-fal-dialog");
  entry.copyFallbackMessage = await messageAfter(() => samplerMenu("Copy as fal request"));
  await dialog.waitFor({ state: "visible", timeout: 10000 });
  entry.copiedViaDialog = JSON.parse(await dialog.locator("textarea").inputValue());
  await dialog.getByRole("button", { name: "Close" }).click();
  await dialog.waitFor({ state: "detached", timeout: 10000 });

  // A request with fields that have no widget, pasted into that dialog.
  await clearToasts();
  await samplerMenu("Paste fal request");
  await dialog.waitFor({ state: "visible", timeout: 10000 });
  await dialog.locator("textarea").fill(JSON.stringify(UNMAPPED_REQUEST, null, 2));
  await screenshot(name, "5-paste-dialog");
  entry.unmappedMessage = await messageAfter(() => dialog.getByRole("button", { name: "Paste" }).click());
  entry.unmappedValues = await widgetValues();
  entry.toasts = await page.locator(".p-toast-message").allInnerTexts().catch(() => []);
  await screenshot(name, "6-unmapped-fields");
  await page.evaluate(() => { // the real methods again (they are on the prototype)
    delete navigator.clipboard.readText;
    delete navigator.clipboard.writeText;
  });
  step("unmapped");

  // A width that is no multiple of 16: ComfyUI refuses the prompt, and its dialog names the problem (ComfyUI
  // attaches the sampler's check text to width, height, guidance_scale and strength; the extension keeps one).
  await clearToasts();
  await setWidgets("KreaSampler", { image_size: "custom", width: 1000 });
  await page.getByRole("button", { name: "Run", exact: true }).click();
  const refusal = page.locator(".p-dialog", { hasText: "multiple of 16" }).first();
  await refusal.waitFor({ state: "visible", timeout: 20000 });
  entry.refusal = await refusal.innerText();
  await screenshot(name, "7-refused");
  await page.keyboard.press("Escape");
  await refusal.waitFor({ state: "detached", timeout: 10000 }).catch(() => {});
  await setWidgets("KreaSampler", SMALL);
  step("refused");
}

try {
  await page.goto(`${BASE}/`);
  // Ready when the server's node definitions are registered (the pack's among them).
  await page.waitForFunction(
    () => window.LiteGraph?.registered_node_types?.KreaSampler && window.comfyAPI?.app?.app?.graph,
    null, { timeout: 120000 });
  await page.evaluate(() => {
    window.comfyAPI.app.app.registerExtension({
      name: "krea.browser_test.probe",
      afterConfigureGraph(missingNodeTypes) {
        window.__kreaMissing = missingNodeTypes;
      },
    });
  });
  report.pageReady = elapsed();
  report.frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  for (const [name, path] of Object.entries(config.conversions ?? {})) report.conversions[name] = await convert(path);
  for (const [name, path] of Object.entries(config.workflows)) await scenario(name, path);
  report.ok = true;
} catch (err) {
  report.error = `${err.name}: ${err.message}\n${err.stack ?? ""}`;
  await page.screenshot({ path: join(config.artifacts, "failure.png") }).catch(() => {});
} finally {
  report.seconds = elapsed();
  report.messages = messages;
  await context.close();
}
console.log(JSON.stringify(report));
