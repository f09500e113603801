// Workflows saved before the loader's transformer output became a standard MODEL carry the type name
// KREA_MODEL on that output, its link and the sampler's input. The backend runs them unchanged (the types
// come from the node definitions); this renames the type in the graph so the link stays valid in the editor.
// Pure: no ComfyUI imports, so it can be tested outside the browser.

export const OLD_TYPE = "KREA_MODEL";
export const NEW_TYPE = "MODEL";

// Renames OLD_TYPE to NEW_TYPE in place in a workflow's graph data; returns how many places changed.
export function migrateModelType(graphData) {
  let changed = 0;
  for (const link of graphData?.links ?? []) {
    if (Array.isArray(link) && link[5] === OLD_TYPE) {
      link[5] = NEW_TYPE;
      changed++;
    } else if (link && !Array.isArray(link) && link.type === OLD_TYPE) {
      link.type = NEW_TYPE;
      changed++;
    }
  }
  for (const node of graphData?.nodes ?? []) {
    for (const slot of [...(node.inputs ?? []), ...(node.outputs ?? [])]) {
      if (slot?.type === OLD_TYPE) {
        slot.type = NEW_TYPE;
        changed++;
      }
    }
  }
  return changed;
}
