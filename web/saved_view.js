// The pack's workflows open at their saved view when they come from the template browser.
//
// Each workflow saves a view (extra.ds) where its Note and first group can be read. Frontend 1.27 restores that
// view however a workflow is opened; 1.49 restores it for a file but fits the whole graph into the window for a
// template (loadGraphData's openSource "template"), which for a try-on graph is 15-28 % zoom: blank node bodies.
// This wraps app.loadGraphData (chaining whatever wrapped it before) and, after a template load of one of the
// pack's workflows (extra.max4zero.opens_at_saved_view), sets the saved view. It does nothing when the user turned
// off "Save and restore canvas position and zoom level", for any other template or way of opening, when the
// caller asked not to restore a view, or when the saved view would show no node at all (the core's own rule).
// Tested in both frontends: tests/comfyui/test_browser_workflows.py::test_opens_readable_from_the_template_browser.

import { app } from "../../scripts/app.js";

const MARKER = "max4zero";

/** The saved view of one of the pack's workflows, or null. ``graph`` is the workflow JSON (UI format). */
export function packSavedView(graph) {
  const extra = graph?.extra;
  const ds = extra?.ds;
  if (!extra?.[MARKER]?.opens_at_saved_view || !ds) return null;
  const scale = Number(ds.scale), offset = ds.offset;
  if (!(scale > 0) || !Array.isArray(offset) || offset.length !== 2 || !offset.every(Number.isFinite)) return null;
  return { scale, offset: [offset[0], offset[1]] };
}

function viewRestoreOn() {
  // the settings store of both frontends (1.27, 1.49); the core's own default is on
  return app.extensionManager?.setting?.get?.("Comfy.EnableWorkflowViewRestore") !== false;
}

function showsANode(canvas) {
  const [x, y, w, h] = canvas.visible_area;
  if (!w || !h) return true; // not laid out yet: nothing to judge by
  const nodes = canvas.graph?._nodes ?? canvas.graph?.nodes ?? [];
  return nodes.some((n) => n.pos[0] < x + w && n.pos[0] + n.size[0] > x && n.pos[1] < y + h && n.pos[1] + n.size[1] > y);
}

/** Set ``view`` on the canvas unless it would show no node; returns whether it was set. */
function applyView(view) {
  const canvas = app.canvas, ds = canvas?.ds;
  if (!ds) return false;
  const before = { scale: ds.scale, offset: [ds.offset[0], ds.offset[1]] };
  ds.scale = view.scale;
  ds.offset[0] = view.offset[0];
  ds.offset[1] = view.offset[1];
  ds.computeVisibleArea?.(canvas.viewport);
  if (!showsANode(canvas)) {
    ds.scale = before.scale;
    ds.offset[0] = before.offset[0];
    ds.offset[1] = before.offset[1];
    ds.computeVisibleArea?.(canvas.viewport);
    return false;
  }
  canvas.setDirty(true, true);
  return true;
}

app.registerExtension({
  name: "MaX4Zero.SavedView",
  init() {
    const load = app.loadGraphData;
    if (typeof load !== "function" || load.max4zeroSavedView) return;
    const wrapped = async function (graphData, clean, restoreView, workflow, options) {
      const view = options?.openSource === "template" && restoreView !== false ? packSavedView(graphData) : null;
      const result = await load.apply(this, arguments);
      if (view && viewRestoreOn()) {
        applyView(view);
        // The core fits the view again on the next frame when the canvas had no size yet: win that one too.
        requestAnimationFrame(() => applyView(view));
      }
      return result;
    };
    wrapped.max4zeroSavedView = true;
    app.loadGraphData = wrapped;
  },
});
