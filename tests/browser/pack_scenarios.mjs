// The pack's way in and its outputs in ComfyUI's own frontend, for frontend_scenarios.mjs: the missing-models
// dialog of the shipped workflows on a ComfyUI without the model files, the templates dialog (thumbnails and
// titles), the queue panel's output count after a run, and a saved image dropped back onto the canvas.
import { readdirSync, readFileSync, renameSync } from "node:fs";
import { join } from "node:path";

const HIDDEN = ".hidden-by-test"; // a suffix ComfyUI does not list as a model file

// Every model file under `models` renamed away while `action` runs, then back: ComfyUI without the files.
async function withoutModelFiles(models, action) {
  const moved = [];
  try {
    for (const folder of readdirSync(models)) {
      for (const name of readdirSync(join(models, folder))) {
        renameSync(join(models, folder, name), join(models, folder, name + HIDDEN));
        moved.push(join(models, folder, name));
      }
    }
    return await action();
  } finally {
    for (const path of moved) renameSync(path + HIDDEN, path);
  }
}

// Each shipped workflow opened as a user opens it: {name: {models: [{label, url, error}]}} as the dialog lists
// them. The frontend caches the model lists it read: the page must be reloaded before files come back into use.
export async function missingModels(page, config, screenshot) {
  return withoutModelFiles(config.models, async () => {
    const found = {};
    for (const [name, path] of Object.entries(config.templates)) {
      const workflow = JSON.parse(readFileSync(path, "utf8"));
      await page.evaluate((data) => window.comfyAPI.app.app.loadGraphData(data), workflow);
      const list = page.locator(".comfy-missing-models");
      await list.waitFor({ state: "visible", timeout: 20000 });
      found[name] = await list.locator("li[role=option]").evaluateAll((items) => items.map((item) => {
        const label = item.querySelector("span[title]");
        return { label: label?.textContent.trim(), url: label?.getAttribute("title"),
          error: item.querySelector(".p-message")?.textContent.trim() ?? null };
      }));
      await screenshot(`missing-models-${name}`);
      await page.keyboard.press("Escape");
      await list.waitFor({ state: "detached", timeout: 10000 });
    }
    return found;
  });
}

// The templates dialog's cards of the pack (its folder in custom_nodes is `module`): title, description, and
// the thumbnail as the browser loaded it.
export async function templates(page, module, screenshot) {
  await page.locator(".templates-tab-button").click();
  const dialog = page.locator(".p-dialog", { hasText: "Custom Nodes" }).last();
  await dialog.getByText(module, { exact: true }).click();
  const cards = dialog.locator('[data-testid^="template-workflow-"]');
  await cards.first().waitFor({ state: "visible", timeout: 20000 });
  await page.waitForFunction(() => [...document.querySelectorAll('[data-testid^="template-workflow-"] img')]
    .every((img) => img.complete), null, { timeout: 20000 });
  const found = {};
  for (const card of await cards.all()) {
    const id = (await card.getAttribute("data-testid")).replace("template-workflow-", "");
    found[id] = {
      text: (await card.innerText()).split("\n").map((line) => line.trim()).filter(Boolean),
      images: await card.locator("img").evaluateAll((imgs) => imgs.map((img) => ({
        width: img.naturalWidth, height: img.naturalHeight, alt: img.alt }))),
    };
  }
  await screenshot("templates");
  await page.keyboard.press("Escape");
  await dialog.waitFor({ state: "detached", timeout: 10000 }).catch(() => {});
  return found;
}

// The number of outputs the queue panel shows for the latest run ("" when it shows none: one output).
export async function queuePanelCount(page, screenshot, name) {
  const tab = page.locator(".queue-tab-button");
  await tab.click();
  const item = page.locator(".task-item").first();
  await item.waitFor({ state: "visible", timeout: 20000 });
  await page.waitForTimeout(300);
  const count = (await item.locator(".task-item-details .tag-wrapper").last().innerText()).trim();
  await screenshot(`${name}-queue-panel`);
  await tab.click();
  return count;
}

// A saved image dropped onto the canvas, as a user drags it from a file manager, after the canvas was cleared:
// the graph the frontend restores from it (node types and widget values).
export async function dropImage(page, path, type) {
  const data = readFileSync(path).toString("base64");
  return page.evaluate(async ({ data, name, type }) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(undefined); // the default graph: no Krea node
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type }));
    app.canvasEl.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
    const deadline = Date.now() + 20000;
    while (!app.graph.nodes.some((n) => n.type === "KreaSampler") && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    return app.graph.nodes.map((n) => ({ id: n.id, type: n.type,
      widgets: Object.fromEntries((n.widgets ?? []).map((w) => [w.name, w.value])) }));
  }, { data, name: path.split("/").pop(), type });
}
