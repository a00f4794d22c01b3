// The pack's cards in the template browser come in the order to try them: MaX4Zero 1, 2, ... 9 (quickest first).
//
// ComfyUI lists a custom node pack's templates in the order its server reads the folder (an unsorted glob), and
// both frontends (1.27, 1.49) show them in that order. This wraps api.getWorkflowTemplates, the one call both
// template browsers make, and sorts this pack's list by the numbers in the names (1, 2, ... 10 in that order);
// the other packs' lists are left as the server gave them.
// Tested in both frontends: tests/comfyui/test_browser_workflows.py::test_template_browser_shows_the_cards.

import { api } from "../../scripts/api.js";

/** The folder this pack is installed under: the server keys its templates by it (/extensions/<folder>/...). */
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/").slice(-2)[0]);

/** ``names`` in numeric-aware order ("MaX4Zero 2 - …" before "MaX4Zero 10 - …"); a new array. */
export function numberedOrder(names) {
  return [...names].sort((a, b) => a.localeCompare(b, "en", { numeric: true, sensitivity: "base" }));
}

const list = api.getWorkflowTemplates;
if (typeof list === "function" && !list.max4zeroOrder) {
  const wrapped = async function (...args) {
    const templates = await list.apply(this, args);
    if (templates && Array.isArray(templates[PACK])) {
      return { ...templates, [PACK]: numberedOrder(templates[PACK]) };
    }
    return templates;
  };
  wrapped.max4zeroOrder = true;
  api.getWorkflowTemplates = wrapped;
}
