// Shows what a Krea node reported after it ran (the sampler's acceleration summary, the safety
// checker's has_nsfw_concepts) in a read-only text box on the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";
import { migrateModelType } from "./krea_migrate.js";

const REPORTING_NODES = new Set(["KreaSampler", "KreaSafetyCheck"]);
const WIDGET_NAME = "krea_report";

function showReport(node, lines) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // never written into workflows or API prompts
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.7;
    }
  }
  widget.value = lines.join("\n");
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "krea.model_type_migration",
  async beforeConfigureGraph(graphData) {
    const changed = migrateModelType(graphData);
    if (changed > 0) {
      const detail = "This workflow was saved with the Krea loader's old KREA_MODEL output; it is now a standard " +
        "MODEL (LoRA loaders and ComfyUI's samplers accept it). The links were updated: save the workflow to keep it.";
      console.info(`Krea node pack: ${detail}`);
      app.extensionManager?.toast?.add({ severity: "info", summary: "Krea node pack", detail, life: 8000 });
    }
  },
});

app.registerExtension({
  name: "krea.node_reports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORTING_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (Array.isArray(message?.text)) showReport(this, message.text);
    };
  },
});
