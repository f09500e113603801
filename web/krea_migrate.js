// Workflows saved before the loader's outputs became ComfyUI's standard types carry the pack's old type names on
// those outputs, their links and the inputs they feed: KREA_MODEL (now MODEL), KREA_TEXT_ENCODER (now CLIP) and
// KREA_VAE (now VAE). The backend runs them unchanged (the types come from the node definitions); this renames the
// types in the graph, subgraphs included, so the links stay valid in the editor.
// Pure: no ComfyUI imports, so it can be tested outside the browser.

export const RENAMED_TYPES = Object.freeze({ KREA_MODEL: "MODEL", KREA_TEXT_ENCODER: "CLIP", KREA_VAE: "VAE" });

function renamed(type) {
  return Object.hasOwn(RENAMED_TYPES, type) ? RENAMED_TYPES[type] : null;
}

// One graph (the workflow, or a subgraph definition): its links, its nodes' slots, a subgraph's own inputs/outputs.
function migrateGraph(graph) {
  let changed = 0;
  for (const link of graph?.links ?? []) {
    const index = Array.isArray(link) ? 5 : "type"; // links are arrays, or objects in newer files
    const type = link && renamed(link[index]);
    if (type) {
      link[index] = type;
      changed++;
    }
  }
  const slots = [...(graph?.inputs ?? []), ...(graph?.outputs ?? [])];
  for (const node of graph?.nodes ?? []) slots.push(...(node.inputs ?? []), ...(node.outputs ?? []));
  for (const slot of slots) {
    const type = slot && renamed(slot.type);
    if (type) {
      slot.type = type;
      changed++;
    }
  }
  return changed;
}

// Renames the old types in place in a workflow's graph data; returns how many places changed.
export function migrateOldTypes(graphData) {
  let changed = migrateGraph(graphData);
  for (const subgraph of graphData?.definitions?.subgraphs ?? []) changed += migrateGraph(subgraph);
  return changed;
}
