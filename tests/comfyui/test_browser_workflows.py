"""Every shipped workflow, in the real ComfyUI frontend, headless, against a real ComfyUI server.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout whose Python has its requirements, incl.
``comfyui-frontend-package``), the system Chromium (``apt-get install chromium``) and the Python
``playwright`` package (its driver only: ``playwright install`` is never run; the system Chromium is
used). Each missing piece skips the module with the reason.

For each workflow in ``workflows/``:

1. ``test_loads_and_converts``: load it the way drag-and-drop does (``app.loadGraphData``), then
   assert: no node type the frontend does not know (its own missing-node list via an
   ``afterConfigureGraph`` extension hook, and ``LiteGraph.registered_node_types``), no node flagged
   ``has_errors``, no dialog or error toast, every link between slots of matching types (and none
   dropped by the frontend's workflow validation), every combo value among the widget's options,
   every number inside its min/max, and the widget values unchanged by loading. Screenshot the
   graph to ``docs/screenshots/<name>.png`` (``MAX4ZERO_SCREENSHOT_DIR`` overrides; see "Screenshots"). Convert with
   the frontend's own ``app.graphToPrompt()`` and check the API prompt against the server's
   ``/object_info`` (known class, required inputs present, links to existing nodes, combo values
   listed, numbers in range).
2. ``test_queues_and_finishes``: clear ComfyUI's output cache (``POST /free``), load the workflow in the page
   again and POST its prompt to ``/prompt`` as the page's own client (the server validates it again), poll
   ``/history/<id>`` and assert it finished without an execution error, with no node served from the cache,
   and with a saved image on disk; then wait until the page shows the run's images in its preview nodes and
   screenshot the graph again, so the README's pictures show the previews filled.

3. The artist's first hour, as a new user meets it (pictures in ``docs/screenshots/check/comfyui-<version>/``;
   on ComfyUI :data:`README_VERSION` also the README's pictures and each workflow's thumbnail):

   * ``test_template_browser_shows_the_cards``: Browse Templates → the pack's category: a card per workflow, each
     with its thumbnail served (no 404), its title, in the numbered order whatever the server's; the template
     search finds every one by "MaX4Zero" and by "try-on".
   * ``test_opens_readable_from_the_template_browser``: a click on each card, as a user opens it, at a laptop's
     window: the saved view is the one the frontend shows (zoom and offset), no error on any node, no dialog or
     error toast (the LoRA + ControlNet workflow included: its LoRA loader ships bypassed and is not in the
     prompt); the picture of it just after opening.
   * ``test_size_and_steps_follow_the_one_place``: the size/steps controls are changed in the page and every
     widget that depends on them follows in the API prompt of ``app.graphToPrompt``.
   * ``test_readme_pictures_read_at_830_px``: the README's pictures rendered at the repository page's width.

Screenshots: focus mode (no menus, side bar or workflow tabs over the canvas), no canvas info overlay (the
``T: … FPS`` corner), no canvas menu, no minimap, no selection toolbox; the view is fitted to the graph (its
groups included) at a zoom where the node titles are legible, and the picture is cropped to the graph.

The masks workflow uses ComfyUI's own segmentation nodes (SAM3 Detect, Remove Background), which 0.33 has
and 0.3.64 does not: on 0.3.64 it is skipped, on 0.33 it is loaded, converted, checked against
``/object_info`` and screenshotted, but never queued: it needs the real SAM 3.1 and BiRefNet weights (its
model files here are placeholders, present only so that its loaders' combos list them).

Reductions before queueing (CPU only, 2 cores; see :data:`REDUCE`), applied to the API prompt the
frontend produced, never to the workflow files:

* the workflows' one place for size and steps (the ``PrimitiveInt`` controls, :data:`REDUCED_CONTROLS`):
  Working size → 128 (the workflows use 512, SDXL and Flux 1024), Total steps → 4, Stage 1 ends at step → 3, so
  the 70 % / 30 % split of the two-stage try-on keeps its shape (50: 0→35, 35→50 becomes 4: 0→3, 3→4); a sampler
  whose ``steps`` is a plain number is reduced the same way;
* ``MaX4ZeroCorrespondence.ensemble`` → 1 (feature-extraction passes per image);
* ``DualCLIPLoader.clip_name2`` → ``t5xxl_fp8_e4m3fn.safetensors`` (Flux Fill: the public fp8 T5-XXL, half the
  RAM of the fp16 file; still the full-size encoder).

The Flux Fill workflow is queued with real-layout random files (``browser_support.ensure_flux``: a reduced
FLUX.1 Fill that ComfyUI detects as ``FluxInpaint``, full-size CLIP-L, T5-XXL and Flux VAE) on ComfyUI 0.33+,
when the machine has the RAM for the T5-XXL (:data:`browser_support.FLUX_MIN_AVAILABLE_GB`); otherwise it is
loaded, converted and checked, and the skip says why.

The FLUX.2 klein workflow is queued the same way on ComfyUI 0.33+ (``browser_support.ensure_klein``: a reduced FLUX.2
that ComfyUI detects as ``Flux2``, a full-size random Qwen3-4B text encoder in fp8 and a full-size random FLUX.2
VAE), when the machine has the RAM for the text encoder; the Qwen-Image-Edit workflow too
(``browser_support.ensure_qwen``: Qwen-Image's widths at 2 blocks, detected as ``QwenImage``, a full-size random
Qwen2.5-VL 7B in fp8 and a narrow random Wan 2.1 VAE).

The sample inputs (``example_inputs/``, 512×512, the pose image included) are used as they are.

The models are random-weight files built by ``browser_support`` (a reduced-depth SD1.5 inpainting
UNet that ComfyUI still detects as SD15; see there). By default the SDXL workflow is loaded,
screenshotted, converted and checked against ``/object_info`` but NOT queued (its checkpoint is a
placeholder): ComfyUI only detects SDXL from the full 2.6 B-parameter UNet layout (~7 GB file,
~14 GB RAM in fp32). ``MAX4ZERO_BROWSER_SDXL=1`` builds a real random SDXL checkpoint (~40 s, cached)
and queues it too (~3 min on 2 CPU cores).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from urllib.parse import quote

import pytest

import browser_support as bs

_REASON = bs.skip_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

import make_workflows  # tools/ is on sys.path (tests/conftest.py)

#: key -> workflow file name without .json (make_workflows.workflow_name names them)
NAME = {k: make_workflows.workflow_name(k) for k in make_workflows.WORKFLOW_TITLES}
WORKFLOWS = tuple(NAME.values())
#: Workflows that need node types only newer ComfyUI versions have: name -> oldest version that has them.
MIN_COMFYUI = {NAME["masks"]: "0.33.0", NAME["flux_fill"]: "0.33.0", NAME["flux2_klein"]: "0.33.0",
               NAME["qwen_edit"]: "0.33.0"}
WHY_NEWER = {NAME["masks"]: "core segmentation nodes",
             NAME["flux_fill"]: "Masked Extended Attention on Flux needs the Flux blocks' attention hook",
             NAME["flux2_klein"]: "FLUX.2 and Masked Extended Attention on it exist from ComfyUI 0.33 (0.3.64 has no "
                                  "FLUX.2 and no Flux attention hook)",
             NAME["qwen_edit"]: "Masked Extended Attention on Qwen-Image needs its attention hook (ComfyUI 0.33)"}
# MAX4ZERO_BROWSER_SDXL=1 builds a real (full-size, random) SDXL checkpoint and queues that workflow too.
RUN_SDXL = os.environ.get("MAX4ZERO_BROWSER_SDXL", "").strip() not in ("", "0")
NOT_QUEUED = {
    NAME["masks"]: "needs the real SAM 3.1 and BiRefNet weights (sam3.1_multiplex_fp16.safetensors, "
                          "birefnet.safetensors; about 1.7 GB, see its Note): its files here are placeholders. "
                          "Loaded, converted and checked against /object_info only.",
}
FLUX_WORKFLOW = NAME["flux_fill"]
# Queued with the real-layout files of bs.ensure_flux when the machine has the RAM for a full-size T5-XXL.
FLUX_NOT_QUEUED = bs.flux_skip_reason()
if os.environ.get("MAX4ZERO_BROWSER_FLUX", "").strip() == "0":  # a quick run of the other checks
    FLUX_NOT_QUEUED = "MAX4ZERO_BROWSER_FLUX=0 (not built, not queued)"
if FLUX_NOT_QUEUED:
    NOT_QUEUED[FLUX_WORKFLOW] = (FLUX_NOT_QUEUED + ". Loaded, converted and checked against /object_info only; "
                                 "Masked Extended Attention on Flux is sampled by tests/comfyui/test_flux_mea.py.")
KLEIN_WORKFLOW = NAME["flux2_klein"]
# Queued with the real-layout files of bs.ensure_klein (a reduced FLUX.2 klein, a full-size random Qwen3-4B in fp8,
# a full-size random FLUX.2 VAE) when the machine has the RAM for the text encoder.
KLEIN_NOT_QUEUED = bs.klein_skip_reason()
if KLEIN_NOT_QUEUED:
    NOT_QUEUED[KLEIN_WORKFLOW] = (KLEIN_NOT_QUEUED + ". Loaded, converted and checked against /object_info only; "
                                  "Masked Extended Attention on FLUX.2 is sampled by tests/comfyui/test_flux2_mea.py.")
QWEN_WORKFLOW = NAME["qwen_edit"]
# Queued with the real-layout files of bs.ensure_qwen (Qwen-Image's widths at 2 blocks, a full-size random
# Qwen2.5-VL 7B in fp8, a narrow random Wan 2.1 VAE) when the machine has the RAM for the text encoder.
QWEN_NOT_QUEUED = bs.qwen_skip_reason()
if QWEN_NOT_QUEUED:
    NOT_QUEUED[QWEN_WORKFLOW] = (QWEN_NOT_QUEUED + ". Loaded, converted and checked against /object_info only; "
                                 "Masked Extended Attention on Qwen-Image is sampled by tests/comfyui/test_qwen_mea.py.")
if not RUN_SDXL:
    NOT_QUEUED[NAME["sdxl"]] = (
        "SDXL is detected only from the full 2.6 B-parameter UNet (supported_models.SDXL matches "
        "transformer_depth [0,0,2,2,10,10]): a ~7 GB file and ~14 GB of RAM in fp32 on CPU, too heavy "
        "by default. Loaded, converted and checked against /object_info only; set "
        "MAX4ZERO_BROWSER_SDXL=1 to build it and queue this workflow too.")
PACK_DIR = "max4zero-tryon"
MAX_STEPS = 4
REDUCE = {"MaX4ZeroCropToMask": {"size": 128}, "MaX4ZeroCorrespondence": {"ensemble": 1},
          # the public fp8 T5-XXL instead of the fp16 one: half the RAM (see browser_support.ensure_flux)
          "DualCLIPLoader": {"clip_name2": bs.FLUX_T5_FP8}}
#: The size/steps controls of a reduced run (70 % / 30 % kept: 35 of 50 becomes 3 of 4).
REDUCED_CONTROLS = bs.REDUCED_CONTROLS
assert REDUCED_CONTROLS["Total steps"] == MAX_STEPS
RUN_TIMEOUT_S = 300
#: The klein run encodes its prompt with a full-size Qwen3-4B on the CPU (about 2 min on 2 cores).
RUN_TIMEOUT_BY_NAME = {NAME["flux2_klein"]: 900, NAME["qwen_edit"]: 900}
VIEWPORT = {"width": 2560, "height": 1440}

SETTINGS = {
    "Comfy.TutorialCompleted": True,  # no template browser on first start
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # draw titles and widgets at any zoom (no low-quality mode)
    "Comfy.Validation.Workflows": True,
    # Clean screenshots: no minimap, no canvas info (the "T: … FPS" corner), no zoom menu, no selection toolbox.
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Canvas.SelectionToolbox": False,
}
#: Zoom of the screenshots: node titles and widget values legible when the picture is opened at full size.
SHOT_SCALE = 0.6
SHOT_MAX = (4800, 2600)  # viewport cap (CSS px)


# ---------------------------------------------------------------------------------------------
# Fixtures: models → base dir → server → browser page
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    root = os.environ["COMFYUI_PATH"]
    cache = bs.ensure_models(root)
    flux = None if (FLUX_WORKFLOW in NOT_QUEUED or _needs_newer(FLUX_WORKFLOW)) else bs.ensure_flux(root)
    klein = None if (KLEIN_WORKFLOW in NOT_QUEUED or _needs_newer(KLEIN_WORKFLOW)) else bs.ensure_klein(root)
    qwen = None if (QWEN_WORKFLOW in NOT_QUEUED or _needs_newer(QWEN_WORKFLOW)) else bs.ensure_qwen(root)
    base = bs.make_base_dir(cache, sdxl=bs.ensure_sdxl(root) if RUN_SDXL else None, flux=flux, klein=klein,
                            qwen=qwen)
    (base / "user" / "default").mkdir(parents=True, exist_ok=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    srv = bs.ComfyServer(root, base).start()
    yield srv
    srv.stop()
    if "IMPORT FAILED" in srv.log_text() and "max4zero-tryon" in srv.log_text().split("IMPORT FAILED")[-1]:
        print(srv.log_tail())
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get_json("/object_info", timeout=60)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = bs.launch_browser(p)
        pg = browser.new_page(viewport=VIEWPORT)
        pg.m4z_page_errors = []  # type: ignore[attr-defined]
        pg.on("pageerror", lambda e: pg.m4z_page_errors.append(str(e)))
        pg.goto(server.url)
        pg.wait_for_function(
            "() => window.app && window.app.graph && window.LiteGraph && "
            "'MaX4ZeroCropToMask' in window.LiteGraph.registered_node_types",
            timeout=120_000,
        )
        # Focus mode: the canvas alone (menus, side bar and workflow tabs hidden) for clean screenshots.
        pg.evaluate("""async () => {
            try { await window.app.extensionManager.command.execute('Workspace.ToggleFocusMode'); }
            catch (e) { console.warn('focus mode', e); }
        }""")
        pg.evaluate(
            """() => {
                window.__m4zMissing = null;
                window.app.registerExtension({
                    name: 'max4zero.browsertest',
                    afterConfigureGraph(missing) {
                        window.__m4zMissing = (missing || []).map(m => typeof m === 'string' ? m : m.type);
                    },
                });
            }"""
        )
        yield pg
        browser.close()


_CONVERTED: dict[str, dict] = {}

_LOAD_JS = """async ([wf, name]) => {
    const app = window.app;
    window.__m4zMissing = null;
    const before = JSON.parse(JSON.stringify(wf));
    await app.loadGraphData(wf, true, true, name);
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    const problems = [];
    const byId = new Map(before.nodes.map(n => [String(n.id), n]));
    for (const node of app.graph.nodes) {
        const tag = `node ${node.id} ${node.type}`;
        if (!(node.type in LiteGraph.registered_node_types)) problems.push(`${tag}: type not registered`);
        if (node.has_errors) problems.push(`${tag}: has_errors`);
        for (const w of node.widgets || []) {
            const o = w.options || {};
            if (w.type === 'combo') {
                let vals = o.values;
                if (typeof vals === 'function') vals = vals(w, node);
                if (Array.isArray(vals) && !vals.includes(w.value))
                    problems.push(`${tag}: combo '${w.name}' = ${JSON.stringify(w.value)} not in ${JSON.stringify(vals).slice(0, 200)}`);
            } else if (typeof w.value === 'number') {
                if (!Number.isFinite(w.value)) problems.push(`${tag}: '${w.name}' = ${w.value}`);
                if (o.min !== undefined && w.value < o.min) problems.push(`${tag}: '${w.name}' = ${w.value} < min ${o.min}`);
                if (o.max !== undefined && w.value > o.max) problems.push(`${tag}: '${w.name}' = ${w.value} > max ${o.max}`);
            }
        }
        const orig = byId.get(String(node.id));
        if (orig && Array.isArray(orig.widgets_values)) {
            const now = node.serialize().widgets_values || [];
            if (JSON.stringify(now) !== JSON.stringify(orig.widgets_values))
                problems.push(`${tag}: widget values changed on load ${JSON.stringify(orig.widgets_values)} -> ${JSON.stringify(now)}`);
        }
    }
    const links = app.graph.links instanceof Map ? [...app.graph.links.values()] : Object.values(app.graph.links || {});
    for (const l of links) {
        if (!l) continue;
        const a = app.graph.getNodeById(l.origin_id), b = app.graph.getNodeById(l.target_id);
        if (!a || !b) { problems.push(`link ${l.id}: dangling (${l.origin_id} -> ${l.target_id})`); continue; }
        const out = a.outputs?.[l.origin_slot], inp = b.inputs?.[l.target_slot];
        if (!out || !inp) { problems.push(`link ${l.id}: slot missing on ${a.type} -> ${b.type}`); continue; }
        if (!LiteGraph.isValidConnection(out.type, inp.type))
            problems.push(`link ${l.id}: ${a.type}.${out.name} (${out.type}) -> ${b.type}.${inp.name} (${inp.type}) types do not match`);
    }
    if (links.filter(Boolean).length !== (before.links || []).length)
        problems.push(`link count changed on load: ${(before.links || []).length} -> ${links.filter(Boolean).length}`);
    const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
    const dialogs = [...document.querySelectorAll('.p-dialog')].filter(visible).map(d => d.innerText.slice(0, 300));
    const toasts = [...document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')]
        .filter(visible).map(d => d.innerText.slice(0, 300));
    return {
        problems, dialogs, toasts,
        missing: window.__m4zMissing,
        loadedTypes: app.graph.nodes.map(n => n.type),
    };
}"""

_BOUNDS_JS = """() => {
    const app = window.app, th = LiteGraph.NODE_TITLE_HEIGHT || 30;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    const boxes = app.graph.nodes.map(n => [n.pos[0], n.pos[1] - th, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
    for (const g of (app.graph.groups || app.graph._groups || [])) {
        const b = g._bounding || g.bounding; if (b) boxes.push([b[0], b[1], b[0] + b[2], b[1] + b[3]]);
    }
    for (const [a, b, c, d] of boxes) { x0 = Math.min(x0, a); y0 = Math.min(y0, b); x1 = Math.max(x1, c); y1 = Math.max(y1, d); }
    return [x0, y0, x1, y1];
}"""

_FIT_JS = """([scale, pad]) => {
    const app = window.app, canvas = app.canvas, ds = canvas.ds;
    const [x0, y0, x1, y1] = (""" + _BOUNDS_JS + """)();
    const el = canvas.canvas, W = el.clientWidth, H = el.clientHeight;
    const s = Math.min((W - 2 * pad) / (x1 - x0), (H - 2 * pad) / (y1 - y0), scale);
    ds.scale = s;
    ds.offset = [(W / s - (x1 - x0)) / 2 - x0, (H / s - (y1 - y0)) / 2 - y0];
    canvas.setDirty(true, true);
    const r = el.getBoundingClientRect();
    const left = r.left + (ds.offset[0] + x0) * s, top = r.top + (ds.offset[1] + y0) * s;
    return {scale: s, clip: {x: Math.max(0, left - 16), y: Math.max(0, top - 16),
                             width: (x1 - x0) * s + 32, height: (y1 - y0) * s + 32}};
}"""


#: Workflows whose groups also get a close-up each (``<slug>-group-<k>.png`` in the check folder).
CLOSEUPS = (NAME["full"],)
CLOSEUP_SCALE = 1.0
#: The ComfyUI whose frontend (1.49) makes the README's pictures and the workflows' thumbnails: what a new user gets.
README_VERSION = "0.33.0"
#: A laptop's window (CSS px): the workflows must open readable there.
OPEN_VIEWPORT = {"width": 1280, "height": 800}
#: The README's pictures: the repository page shows images at most 830 px wide, so they are taken at that width.
README_WIDTH = 830


def slug(name: str) -> str:
    """A workflow's name as a file name for pictures (``max4zero-1-quick-try-on``)."""
    return name.lower().replace(" - ", "-").replace(" ", "-")


def check_dir() -> Path:
    """Where the browser check leaves its pictures for this ComfyUI version (look at them)."""
    d = bs.SCREENSHOT_DIR / "check" / f"comfyui-{_comfyui_version()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def for_readme() -> bool:
    return _comfyui_version() == README_VERSION

_GROUP_JS = """([x, y, w, h, s, pad]) => {
    const app = window.app, canvas = app.canvas, ds = canvas.ds;
    ds.scale = s;
    ds.offset = [pad / s - x, pad / s - y];
    canvas.setDirty(true, true);
    const r = canvas.canvas.getBoundingClientRect();
    return {x: r.left, y: r.top, width: w * s + 2 * pad, height: h * s + 2 * pad};
}"""


def group_closeups(page, name: str) -> list[Path]:
    """One picture per group of the loaded workflow, at :data:`CLOSEUP_SCALE` (node text readable when the README
    shows it at its own width): ``SCREENSHOT_DIR/<name>-<k>.png``, k = 1, 2, … in the groups' order."""
    groups = page.evaluate("""() => (window.app.graph.groups || window.app.graph._groups || []).map(g => {
        const b = g._bounding || g.bounding || [g.pos[0], g.pos[1], g.size[0], g.size[1]];
        return [b[0], b[1], b[2], b[3]]; })""")
    shots = []
    for k, (x, y, w, h) in enumerate(sorted(groups, key=lambda b: b[0]), start=1):
        page.set_viewport_size({"width": int(min(SHOT_MAX[0], w * CLOSEUP_SCALE + 80)),
                                "height": int(min(SHOT_MAX[1], h * CLOSEUP_SCALE + 80))})
        page.wait_for_timeout(300)
        clip = page.evaluate(_GROUP_JS, [x, y, w, h, CLOSEUP_SCALE, 12])
        page.wait_for_timeout(500)
        shot = check_dir() / f"{slug(name)}-group-{k}.png"
        page.screenshot(path=str(shot), clip=clip)
        shots.append(shot)
    page.set_viewport_size(VIEWPORT)
    return shots


def screenshot(page, name: str, wait_for_images: list[str] | None = None) -> Path:
    """The graph alone (see the module doc), fitted at :data:`SHOT_SCALE`, to ``<check dir>/<slug>-overview.png``.

    ``wait_for_images``: node ids whose images must be shown first (the frontend loads a node's images when it
    draws the node, so the whole graph is brought into view before waiting).
    """
    # The settings that keep overlays out of the picture took effect (the frontend's own setting store).
    applied = page.evaluate("""(ids) => { const app = window.app;
        const get = id => app.extensionManager?.setting?.get?.(id) ?? app.ui?.settings?.getSettingValue?.(id);
        return Object.fromEntries(ids.map(id => [id, get(id)])); }""",
                            ["Comfy.Graph.CanvasInfo", "Comfy.Graph.CanvasMenu", "Comfy.Minimap.Visible"])
    assert all(v is False for v in applied.values()), f"overlay settings not applied: {applied}"
    x0, y0, x1, y1 = page.evaluate(_BOUNDS_JS)
    width = int(min(SHOT_MAX[0], max(VIEWPORT["width"], (x1 - x0) * SHOT_SCALE + 120)))
    height = int(min(SHOT_MAX[1], max(VIEWPORT["height"], (y1 - y0) * SHOT_SCALE + 120)))
    page.set_viewport_size({"width": width, "height": height})
    page.wait_for_timeout(300)
    fit = page.evaluate(_FIT_JS, [SHOT_SCALE, 40])
    page.wait_for_timeout(600)
    if wait_for_images:
        page.wait_for_function(
            """(ids) => { window.app.canvas.setDirty(true, true);
                          return ids.every(id => { const n = window.app.graph.getNodeById(Number(id));
                              return n && n.imgs && n.imgs.length && n.imgs.every(i => i.complete); }); }""",
            arg=wait_for_images, timeout=60_000, polling=500)
        page.wait_for_timeout(500)
    shot = check_dir() / f"{slug(name)}-overview.png"
    clip = {k: float(v) for k, v in fit["clip"].items()}
    clip["width"] = min(clip["width"], width - clip["x"])
    clip["height"] = min(clip["height"], height - clip["y"])
    page.screenshot(path=str(shot), clip=clip)
    page.set_viewport_size(VIEWPORT)
    return shot


def _comfyui_version() -> str:
    return bs.comfyui_version(os.environ["COMFYUI_PATH"])


def _needs_newer(name: str) -> str | None:
    """Why ``name`` cannot load on this ComfyUI (it needs newer core nodes), or None."""
    need = MIN_COMFYUI.get(name)
    have = _comfyui_version()
    if need and tuple(int(x) for x in have.split(".")[:3]) < tuple(int(x) for x in need.split(".")):
        return f"{name} needs ComfyUI {need}+ ({WHY_NEWER[name]}); this is {have}"
    return None


def _workflow_path(name: str) -> Path:
    path = bs.WORKFLOWS_DIR / f"{name}.json"
    if not path.is_file():
        pytest.fail(f"shipped workflow {path} is missing")
    return path


def _is_link(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def check_against_object_info(prompt: dict, object_info: dict) -> list[str]:
    """What the server's validation would reject in an API prompt (the subset we can check offline)."""
    problems = []
    for nid, node in prompt.items():
        ct = node.get("class_type")
        if ct not in object_info:
            problems.append(f"{nid}: unknown class_type {ct!r}")
            continue
        spec = object_info[ct]["input"]
        required = spec.get("required", {})
        allspec = {**required, **spec.get("optional", {})}
        inputs = node.get("inputs", {})
        for name in required:
            if name not in inputs:
                problems.append(f"{nid} {ct}: required input {name!r} missing")
        for name, value in inputs.items():
            if name not in allspec:
                continue  # hidden / extra widgets (e.g. control_after_generate is never sent) are ignored
            if _is_link(value):
                if value[0] not in prompt:
                    problems.append(f"{nid} {ct}: input {name!r} linked to missing node {value[0]}")
                continue
            typ = allspec[name][0]
            opts = allspec[name][1] if len(allspec[name]) > 1 and isinstance(allspec[name][1], dict) else {}
            options = typ if isinstance(typ, list) else (opts.get("options") if typ == "COMBO" else None)
            if options is not None and value not in options:
                problems.append(f"{nid} {ct}: {name}={value!r} not among {options[:8]}")
            if typ in ("INT", "FLOAT"):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    problems.append(f"{nid} {ct}: {name}={value!r} is not a number")
                else:
                    if "min" in opts and value < opts["min"]:
                        problems.append(f"{nid} {ct}: {name}={value} < min {opts['min']}")
                    if "max" in opts and value > opts["max"]:
                        problems.append(f"{nid} {ct}: {name}={value} > max {opts['max']}")
    return problems


def reduce_prompt(prompt: dict, object_info: dict) -> tuple[dict, list[str]]:
    """A cheaper copy of an API prompt (see the module doc) and a list of what was changed."""
    out = copy.deepcopy(prompt)
    changes = []
    for nid, node in out.items():
        inputs = node.get("inputs", {})
        title = node.get("_meta", {}).get("title")
        if node.get("class_type") == "PrimitiveInt" and title in REDUCED_CONTROLS:
            # the one place for size and steps: every dependent widget is linked to it
            if isinstance(inputs.get("value"), int) and inputs["value"] > REDUCED_CONTROLS[title]:
                changes.append(f"{nid} {title}: {inputs['value']}->{REDUCED_CONTROLS[title]}")
                inputs["value"] = REDUCED_CONTROLS[title]
            continue
        steps = inputs.get("steps")
        if isinstance(steps, int) and steps > MAX_STEPS:
            f = MAX_STEPS / steps
            inputs["steps"] = MAX_STEPS
            changes.append(f"{nid} {node['class_type']}: steps {steps}->{MAX_STEPS}")
            for k in ("start_at_step", "end_at_step"):
                v = inputs.get(k)
                if isinstance(v, int) and v <= steps:
                    inputs[k] = min(MAX_STEPS, int(round(v * f)))
                    changes.append(f"{nid}: {k} {v}->{inputs[k]}")
        for k, v in REDUCE.get(node.get("class_type"), {}).items():
            if k in inputs and not _is_link(inputs[k]) and inputs[k] != v:
                spec = object_info[node["class_type"]]["input"]["required"].get(k, [None, {}])
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                v2 = max(v, opts.get("min", v)) if isinstance(v, (int, float)) else v
                changes.append(f"{nid} {node['class_type']}: {k} {inputs[k]}->{v2}")
                inputs[k] = v2
    return out, changes


def inspect_load(page, wf: dict, filename: str) -> dict:
    """Load a UI-format workflow in the page; what the frontend made of it (see ``_LOAD_JS``)."""
    page.m4z_page_errors.clear()
    return page.evaluate(_LOAD_JS, [wf, filename])


def load_and_convert(page, server, object_info, name: str) -> dict:
    """Load ``name`` in the page, check it, screenshot it, convert it; cached per workflow."""
    if name in _CONVERTED:
        return _CONVERTED[name]
    # Opened the way Browse Templates opens it: fetched from the server's template route, not from disk.
    wf = server.get_json(f"/api/workflow_templates/{PACK_DIR}/{quote(name)}.json")
    assert wf == json.loads(_workflow_path(name).read_text()), f"{name}: the server serves another file"
    res = inspect_load(page, wf, f"{name}.json")
    json_types = {n["type"] for n in wf["nodes"]}
    unknown_to_server = sorted(t for t in json_types if t not in object_info and t not in ("Note", "MarkdownNote",
                                                                                          "Reroute", "PrimitiveNode"))
    assert not unknown_to_server, f"{name}: node types the server does not have: {unknown_to_server}"
    assert res["missing"] == [], f"{name}: frontend reports missing node types {res['missing']}"
    assert not res["problems"], f"{name}: problems after load:\n" + "\n".join(res["problems"])
    assert not res["dialogs"], f"{name}: dialog(s) open after load: {res['dialogs']}"
    assert not res["toasts"], f"{name}: error/warning toast(s) after load: {res['toasts']}"
    assert not page.m4z_page_errors, f"{name}: page errors during load: {page.m4z_page_errors}"
    assert sorted(res["loadedTypes"]) == sorted(n["type"] for n in wf["nodes"]), f"{name}: node list changed on load"

    shot = screenshot(page, name)
    if name in CLOSEUPS and name in NOT_QUEUED:  # never queued here: its close-ups are taken as loaded
        closeups = group_closeups(page, name)
        assert len(closeups) >= 3 and all(c.stat().st_size > 10_000 for c in closeups), closeups

    conv = page.evaluate("async () => { const p = await window.app.graphToPrompt(); return {output: p.output, workflow: p.workflow}; }")
    prompt = conv["output"]
    assert prompt, f"{name}: graphToPrompt produced an empty prompt"
    real_nodes = [n for n in wf["nodes"] if n["type"] not in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
                  and n.get("mode", 0) == 0]
    assert sorted(map(str, (n["id"] for n in real_nodes))) == sorted(prompt), (
        f"{name}: graphToPrompt dropped or added nodes: {sorted(prompt)}")
    problems = check_against_object_info(prompt, object_info)
    assert not problems, f"{name}: the converted prompt would not validate:\n" + "\n".join(problems)
    _CONVERTED[name] = {"prompt": prompt, "workflow": conv["workflow"], "screenshot": shot}
    return _CONVERTED[name]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_pack_loaded_and_templates_listed(server, object_info):
    """The pack imported cleanly and ComfyUI lists its workflows under Browse Templates."""
    log = server.log_text()
    assert PACK_DIR in log, "the pack does not appear in the server's import list"
    for line in log.splitlines():
        assert not ("IMPORT FAILED" in line and "max4zero" in line), line
    assert "MaX4ZeroCropToMask" in object_info
    templates = server.get_json("/workflow_templates")
    listed = set(templates.get(PACK_DIR, []))
    assert set(WORKFLOWS) <= listed, f"/workflow_templates lists {sorted(listed)}, expected {WORKFLOWS}"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_loads_and_converts(page, server, object_info, name):
    if _needs_newer(name):
        assert any(t not in object_info for t in ("SAM3_Detect", "RemoveBackground")), "the minimum is wrong"
        pytest.skip(_needs_newer(name))
    conv = load_and_convert(page, server, object_info, name)
    assert conv["screenshot"].stat().st_size > 10_000


@pytest.mark.parametrize("name", WORKFLOWS)
def test_queues_and_finishes(page, server, object_info, name):
    if _needs_newer(name):
        pytest.skip(_needs_newer(name))
    if name in NOT_QUEUED:
        load_and_convert(page, server, object_info, name)  # the checks that do apply must still pass
        pytest.skip(NOT_QUEUED[name])
    conv = load_and_convert(page, server, object_info, name)
    # The page shows this workflow again, and the run is queued as the page's own client, so that the page
    # receives the run's images and fills its preview nodes (for the screenshot).
    wf = json.loads(_workflow_path(name).read_text())
    res = inspect_load(page, wf, f"{name}.json")
    assert not res["problems"], res["problems"]
    client_id = page.evaluate("() => window.app.api.clientId || window.app.api.initialClientId || null")
    assert client_id, "the page has no client id"
    prompt, changes = reduce_prompt(conv["prompt"], object_info)
    print(f"{name}: reduced for CPU: {changes}")
    # Each workflow is checked as if queued first: without this, ComfyUI's output cache keeps the
    # sampler result of an earlier workflow with identical upstream nodes, and nodes that depend on
    # the sampling having run (the Leffa flow view reads what MEA recorded) would see a cached result.
    code, _ = server.post_json("/free", {"free_memory": True})
    assert code == 200
    time.sleep(2.0)  # the worker applies the flag when it next wakes; give it that moment
    log_start = len(server.log_text())
    t0 = time.time()
    code, body = server.post_json("/prompt", {"prompt": prompt, "client_id": client_id,
                                              "extra_data": {"extra_pnginfo": {"workflow": conv["workflow"]}}})
    assert code == 200, f"{name}: /prompt refused it ({code}): {json.dumps(body)[:3000]}"
    assert not body.get("node_errors"), f"{name}: node_errors {body['node_errors']}"
    entry = bs.wait_history(server, body["prompt_id"], RUN_TIMEOUT_BY_NAME.get(name, RUN_TIMEOUT_S))
    err = bs.execution_error(entry)
    assert err is None, f"{name}: execution failed: {err}\n--- server log ---\n{server.log_tail(4000)}"
    cached = [n for kind, data in entry["status"].get("messages", []) if kind == "execution_cached"
              for n in data.get("nodes", [])]
    assert not cached, f"{name}: nodes were served from ComfyUI's cache, not run: {cached}"
    images = [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]
    assert images, f"{name}: finished but produced no images: {list(entry.get('outputs', {}))}"
    saved = [i for i in images if i.get("type") == "output"]
    assert saved, f"{name}: no SaveImage output"
    for img in saved:
        assert (server.base / "output" / img.get("subfolder", "") / img["filename"]).is_file()
    print(f"{name}: ran in {time.time() - t0:.1f} s, {len(images)} images")
    # Every shipped MEA node has masks that are not empty: MEA must have acted (the patch says so otherwise).
    run_log = server.log_text()[log_start:]
    assert "did nothing in this sampling run" not in run_log, f"{name}: MEA was a no-op:\n{run_log[-3000:]}"
    # The page got the run's images: every node that produced images shows them in the screenshot.
    shown = [nid for nid, out in entry.get("outputs", {}).items() if out.get("images")]
    screenshot(page, name, wait_for_images=shown)
    if name == NAME["full"] and for_readme():
        result_panel(page, wf)
    if name in CLOSEUPS:
        shots = group_closeups(page, name)
        assert len(shots) >= 3 and all(s.stat().st_size > 10_000 for s in shots), shots


# ---------------------------------------------------------------------------------------------
# The artist's first hour: the template browser, the opening view, the one place for size and steps
# ---------------------------------------------------------------------------------------------

_CARDS_JS = """(names) => {
    // A card per workflow: the element that shows its title (a leaf whose text is the name), in page order, and
    // its thumbnail: an <img alt=name> that loaded (a 404 leaves a broken image in 1.27, a gradient in 1.49).
    const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
    // inside the template dialog only (a Markdown Note on the canvas may name a workflow too)
    const root = [...document.querySelectorAll('[role=dialog], .p-dialog')].filter(visible).pop();
    if (!root) return [];
    const titles = [...root.querySelectorAll('*')].filter(el => visible(el) && el.children.length === 0
        && names.includes(el.textContent.trim()));
    const seen = new Set(), out = [];
    for (const el of titles) {
        const title = el.textContent.trim();
        if (seen.has(title)) continue;
        seen.add(title);
        const img = [...root.querySelectorAll('img')].find(i => i.alt === title);
        out.push({title, src: img ? img.src : null, ok: !!img && img.complete && img.naturalWidth > 0,
                  width: img ? img.naturalWidth : 0});
    }
    return out;
}"""


def _cards(page) -> list[dict]:
    return page.evaluate(_CARDS_JS, list(WORKFLOWS))


def _shown_workflows(page) -> list[str]:
    return [c["title"] for c in _cards(page)]


def open_template_browser(page) -> list[dict]:
    """Browse Templates (the command behind the Workflow menu in 1.27 and the logo menu in 1.49), then the pack's
    category (under Custom Nodes in 1.27, EXTENSIONS in 1.49); the pack's cards once their thumbnails loaded."""
    page.evaluate("async () => await window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(PACK_DIR, exact=True).first.click(timeout=30_000)
    page.wait_for_function(f"(names) => ({_CARDS_JS})(names).length >= {len(WORKFLOWS)}", arg=list(WORKFLOWS),
                           timeout=30_000)
    page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=30_000)
    page.wait_for_timeout(1500)
    return _cards(page)


def _close_dialogs(page) -> None:
    for _ in range(3):
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)


def _search_templates(page, words: str) -> list[str]:
    box = page.locator('input[placeholder^="Search"]:visible').last
    box.fill(words)
    page.wait_for_timeout(1200)  # the search is debounced
    found = _shown_workflows(page)
    box.fill("")
    page.wait_for_timeout(800)
    return found


def numbered(names: list[str]) -> list[str]:
    """Names by the numbers in them (``MaX4Zero 2 - …`` before ``MaX4Zero 10 - …``)."""
    import re

    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", n)])


def test_template_browser_shows_the_cards(page, server):
    page.set_viewport_size(OPEN_VIEWPORT)
    try:
        cards = open_template_browser(page)
        page.screenshot(path=str(check_dir() / "template-browser.png"))
        titles = [c["title"] for c in cards]
        listed = list(WORKFLOWS)  # the server lists every file, whatever its ComfyUI can load
        assert sorted(titles) == sorted(listed), titles
        # every thumbnail, each card brought into view first (1.49 renders only the rows in view)
        missing = []
        for title in titles:
            page.evaluate("""(name) => { const root = [...document.querySelectorAll('[role=dialog], .p-dialog')].pop();
                [...root.querySelectorAll('*')].find(el => el.children.length === 0 && el.textContent.trim() === name)
                    ?.scrollIntoView({block: 'center'}); }""", title)
            page.wait_for_timeout(700)
            page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=30_000)
            card = next(c for c in _cards(page) if c["title"] == title)
            if not card["ok"]:
                missing.append((title, card["src"]))
        assert not missing, f"thumbnails not served (404: a blank card): {missing}"
        # The cards come in the order to try them, by the numbers in their titles (web/template_order.js), whatever
        # order the server lists the files in (ComfyUI globs the folder, unsorted).
        served = server.get_json("/workflow_templates")[PACK_DIR]
        (check_dir() / "template-browser-order.txt").write_text(
            "cards:\n" + "\n".join(titles) + "\n\nthe server's list:\n" + "\n".join(served) + "\n")
        assert titles == numbered(listed), f"cards in the order {titles}; the server lists {served}"
        for words in ("MaX4Zero", "try-on"):
            found = _search_templates(page, words)
            assert sorted(found) == sorted(listed), (words, found)
        if _version_tuple(_frontend_version()) >= FITS_TEMPLATES:
            # 1.49's Sort by → A → Z (the setting its Filters panel writes) puts the cards in their numbered order
            _close_dialogs(page)
            page.evaluate("async () => await window.app.extensionManager.setting.set("
                          "'Comfy.Templates.SortBy', 'alphabetical')")
            try:
                sorted_titles = [c["title"] for c in open_template_browser(page)]
                page.screenshot(path=str(check_dir() / "template-browser-a-to-z.png"))
            finally:
                page.evaluate("async () => await window.app.extensionManager.setting.set("
                              "'Comfy.Templates.SortBy', 'default')")
            assert sorted_titles == sorted(listed), sorted_titles
    finally:
        _close_dialogs(page)
        page.set_viewport_size(VIEWPORT)


_OPENED_JS = """() => {
    const app = window.app, ds = app.canvas.ds;
    const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
    return {
        scale: ds.scale, offset: [ds.offset[0], ds.offset[1]],
        nodes: app.graph.nodes.length,
        errors: app.graph.nodes.filter(n => n.has_errors).map(n => `${n.id} ${n.type}`),
        modes: Object.fromEntries(app.graph.nodes.map(n => [String(n.id), n.mode])),
        dialogs: [...document.querySelectorAll('.p-dialog, [role=dialog]')].filter(visible)
            .map(d => d.innerText.slice(0, 300)),
        toasts: [...document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')].filter(visible)
            .map(d => d.innerText.slice(0, 300)),
    };
}"""


def _save_readme_picture_and_thumbnail(page, name: str) -> None:
    """The README's picture of a workflow (its opening view at the README's width) and its template thumbnail
    (the same view, small, next to the workflow: ``workflows/<name>.jpg``). Nothing in them comes from a run."""
    from PIL import Image

    pic = bs.SCREENSHOT_DIR / f"{slug(name)}.png"
    page.screenshot(path=str(pic), clip={"x": 0, "y": 40, "width": README_WIDTH, "height": 520})
    with Image.open(pic) as im:  # the cards are square: the Note and the size/steps controls beside it
        im.convert("RGB").crop((0, 0, 520, 520)).resize((300, 300), Image.Resampling.LANCZOS).save(
            bs.WORKFLOWS_DIR / f"{name}.jpg", quality=82, optimize=True)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_opens_readable_from_the_template_browser(page, server, object_info, name):
    if _needs_newer(name):
        pytest.skip(_needs_newer(name))
    wf = json.loads(_workflow_path(name).read_text())
    page.set_viewport_size(OPEN_VIEWPORT)
    try:
        open_template_browser(page)
        for attempt in range(3):  # a click while the dialog still settles can go nowhere: click again
            page.evaluate("""(name) => { const visible = el => !!(el.offsetWidth || el.offsetHeight);
                const root = [...document.querySelectorAll('[role=dialog], .p-dialog')].filter(visible).pop();
                [...(root || document).querySelectorAll('*')].find(el => el.children.length === 0
                    && el.textContent.trim() === name)?.click(); }""", name)
            try:
                page.wait_for_function("(n) => window.app.graph.nodes.length === n", arg=len(wf["nodes"]),
                                       timeout=10_000)
                break
            except Exception:
                if attempt == 2:
                    page.screenshot(path=str(check_dir() / f"{slug(name)}-did-not-open.png"))
                    raise
        page.wait_for_timeout(1500)
        state = page.evaluate(_OPENED_JS)
        assert not state["errors"], f"{name}: nodes with errors just after opening: {state['errors']}"
        assert not state["dialogs"], f"{name}: dialog(s) just after opening: {state['dialogs']}"
        assert not state["toasts"], f"{name}: error/warning toast(s) just after opening: {state['toasts']}"
        page.screenshot(path=str(check_dir() / f"{slug(name)}-from-templates.png"))
        saved = wf["extra"]["ds"]
        # Opened from the template browser, the saved view is the one shown, in both frontends (1.49 fits the
        # whole graph for a template; web/saved_view.js sets the pack's saved view after such a load).
        assert abs(state["scale"] - saved["scale"]) < 1e-6, f"{name}: opens at zoom {state['scale']}, saved {saved}"
        assert all(abs(a - b) < 1e-3 for a, b in zip(state["offset"], saved["offset"])), (state["offset"], saved)
        page.screenshot(path=str(check_dir() / f"{slug(name)}-opened.png"))
        if for_readme():
            _save_readme_picture_and_thumbnail(page, name)
        lora = [n for n in wf["nodes"] if n["type"] == "LoraLoader"]
        if lora:  # ships bypassed: the stand-in file name never reaches the server, Run is not blocked
            assert state["modes"][str(lora[0]["id"])] == 4
            prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
            assert "LoraLoader" not in {v["class_type"] for v in prompt.values()}
            assert "MaX4ZeroMaskedExtendedAttention" in {v["class_type"] for v in prompt.values()}
        if _version_tuple(_frontend_version()) >= FITS_TEMPLATES:
            _check_template_view_rules(page, wf, name)
    finally:
        page.set_viewport_size(VIEWPORT)


#: The first frontend version known to fit the whole graph when a template opens (1.49.6 does; 1.27.10 restores
#: the saved view). Between the two, the check has not been run.
FITS_TEMPLATES = (1, 49)

_LOAD_AS_JS = """async ([wf, name, restoreView]) => {
    await window.app.loadGraphData(wf, true, restoreView, name, {openSource: 'template'});
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    const ds = window.app.canvas.ds;
    return {scale: ds.scale, offset: [ds.offset[0], ds.offset[1]]};
}"""


def _check_template_view_rules(page, wf: dict, name: str) -> None:
    """What web/saved_view.js leaves to the core, in a frontend that fits templates: a template without the pack's
    marker is fitted (so the check above fails without the extension), and a load that asks not to restore a view
    (undo, redo) or made with view restore turned off in the settings keeps the view the user has."""
    saved = wf["extra"]["ds"]
    other = json.loads(json.dumps(wf))
    del other["extra"]["max4zero"]
    fitted = page.evaluate(_LOAD_AS_JS, [other, f"{slug(name)}-not-ours.json", True])
    assert fitted["scale"] < saved["scale"], f"{name}: a template without the marker is not fitted: {fitted}"
    kept = page.evaluate(_LOAD_AS_JS, [wf, f"{slug(name)}-kept-view.json", False])
    assert kept == fitted, f"{name}: restore_view=false moved the view: {fitted} -> {kept}"
    # "Save and restore canvas position and zoom level" off: no view is restored, the pack's neither
    setting = "async (v) => await window.app.extensionManager.setting.set('Comfy.EnableWorkflowViewRestore', v)"
    page.evaluate(setting, False)
    try:
        off = page.evaluate(_LOAD_AS_JS, [wf, f"{slug(name)}-restore-off.json", True])
    finally:
        page.evaluate(setting, True)
    assert off == kept, f"{name}: the view moved with view restore turned off: {kept} -> {off}"


def _frontend_version() -> str:
    """The comfyui-frontend-package this ComfyUI serves (installed in its Python, which runs this check)."""
    from importlib.metadata import version

    return version("comfyui-frontend-package")


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2] if x.isdigit()) if v else (0,)


#: New values for the controls in the check (all different from the shipped ones).
CHANGED = {"Working size": 384, "Total steps": 20, "Stage 1 ends at step": 14}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_size_and_steps_follow_the_one_place(page, server, object_info, name):
    """Change the controls in the page as a user does; every widget wired to them (the workflow's links from the
    controls) takes the new value in the API prompt the frontend produces, and nothing else holds the old one."""
    if _needs_newer(name):
        pytest.skip(_needs_newer(name))
    wf = json.loads(_workflow_path(name).read_text())
    controls = {n["id"]: n for n in wf["nodes"] if n["type"] == "PrimitiveInt" and n.get("title") in CHANGED}
    if not controls:
        assert name == NAME["masks"], f"{name} has no size/steps controls"
        pytest.skip(f"{name} has no size or steps to set")
    res = inspect_load(page, wf, f"{name}.json")
    assert not res["problems"], res["problems"]
    by_id = {n["id"]: n for n in wf["nodes"]}
    dependents = []  # (control title, node id, input name)
    for _, a, _, b, b_slot, _ in wf["links"]:
        if a in controls:
            dependents.append((controls[a]["title"], b, by_id[b]["inputs"][b_slot]["name"]))
    assert len(dependents) >= 3, dependents
    page.evaluate("""(changed) => { for (const n of window.app.graph.nodes)
        if (n.type === 'PrimitiveInt' && n.title in changed) { n.widgets[0].value = changed[n.title];
            n.widgets[0].callback?.(changed[n.title]); }
        window.app.canvas.setDirty(true, true); }""", CHANGED)
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def value(v):  # a widget's value in the API prompt: a literal, or the value of the control it is linked to
        if _is_link(v) and prompt[v[0]]["class_type"] == "PrimitiveInt":
            return prompt[v[0]]["inputs"]["value"]
        return v

    wrong = [(t, nid, inp, prompt[str(nid)]["inputs"].get(inp)) for t, nid, inp in dependents
             if value(prompt[str(nid)]["inputs"].get(inp)) != CHANGED[t]]
    assert not wrong, f"{name}: widgets that did not follow their control: {wrong}"
    for cid, ctl in controls.items():
        assert prompt[str(cid)]["inputs"]["value"] == CHANGED[ctl["title"]]
    # No widget of a dependent kind kept a literal old value (a widget the generator forgot to wire).
    old = {ctl["widgets_values"][0] for ctl in controls.values()}
    kinds = {"size", "width", "height", "steps", "start_at_step", "end_at_step"}
    stale = [(nid, k, v) for nid, node in prompt.items() for k, v in node["inputs"].items()
             if k in kinds and not _is_link(v) and v in old and node["class_type"] != "MaX4ZeroMLSWarp"]
    assert not stale, f"{name}: widgets still holding a shipped size/step value: {stale}"
    if name == NAME["full"]:
        page.set_viewport_size(OPEN_VIEWPORT)
        page.evaluate("""(ds) => { const c = window.app.canvas; c.ds.scale = ds.scale;
            c.ds.offset = [ds.offset[0], ds.offset[1]]; c.setDirty(true, true); }""", wf["extra"]["ds"])
        page.wait_for_timeout(800)
        page.screenshot(path=str(check_dir() / "size-and-steps-changed.png"))
        page.set_viewport_size(VIEWPORT)


def test_readme_pictures_read_at_830_px(page):
    """The README's pictures as the repository page shows them (at most 830 px wide): each one is shown at 80 % of
    its own width or more, so its text reads as it does in the picture; the rendering is kept for a look."""
    import base64
    import re

    readme = (bs.PACK_ROOT / "README.md").read_text(encoding="utf-8")
    pics = re.findall(r"!\[([^\]]*)\]\(([^)\s]+)\)", readme)
    assert pics
    html = ["<html><body style='background:#fff;font-family:sans-serif;margin:0'>",
            f"<article style='width:{README_WIDTH}px;padding:0'>"]
    for alt, src in pics:
        data = base64.b64encode((bs.PACK_ROOT / src).read_bytes()).decode()
        kind = "png" if src.endswith(".png") else "jpeg"
        html.append(f"<p>{alt}</p><img alt='{src}' style='max-width:100%' src='data:image/{kind};base64,{data}'>")
    html.append("</article></body></html>")
    pg = page.context.browser.new_page(viewport={"width": README_WIDTH, "height": 800})
    try:
        pg.set_content("".join(html))
        pg.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=30_000)
        sizes = pg.evaluate("() => [...document.images].map(i => [i.alt, i.naturalWidth, i.width])")
        pg.screenshot(path=str(check_dir() / "readme-at-830px.png"), full_page=True)
    finally:
        pg.close()
    shrunk = [(src, natural, shown) for src, natural, shown in sizes if shown < 0.8 * natural]
    assert not shrunk, f"pictures shrunk below 80 % at {README_WIDTH} px (text unreadable): {shrunk}"


_LABEL = "RANDOM TEST WEIGHTS - colour noise, not a try-on result"


def result_panel(page, wf: dict) -> Path:
    """The README's picture of where a run's results appear: the output group at full size, cropped to the
    README's width, with a label over it saying the images come from random test weights (never a result)."""
    gx, gy, gw, gh = wf["groups"][-1]["bounding"]
    inside = [n for n in wf["nodes"] if gx <= n["pos"][0] < gx + gw and gy <= n["pos"][1] < gy + gh]
    x = min(n["pos"][0] for n in inside) - 12
    y = min(n["pos"][1] for n in inside) - 30 - 50  # title bar, room for the label
    w = max(n["pos"][0] + n["size"][0] for n in inside) - x + 12
    h = max(n["pos"][1] + n["size"][1] for n in inside) - y + 12
    scale = min(1.0, (README_WIDTH - 24) / w)
    page.set_viewport_size({"width": README_WIDTH, "height": int(min(900, h * scale + 24))})
    page.wait_for_timeout(300)
    page.evaluate(_GROUP_JS, [x, y, w, h, scale, 12])
    page.evaluate("""(text) => { const d = document.createElement('div'); d.id = 'm4z-random-label';
        d.textContent = text;
        d.style.cssText = 'position:fixed;left:0;right:0;top:0;z-index:99999;padding:8px;font:bold 18px sans-serif;' +
            'text-align:center;color:#fff;background:rgba(200,0,0,0.85)';
        document.body.appendChild(d); }""", _LABEL)
    page.wait_for_timeout(800)
    shot = bs.SCREENSHOT_DIR / "result-random-weights.png"
    page.screenshot(path=str(shot))
    page.evaluate("() => document.getElementById('m4z-random-label')?.remove()")
    page.set_viewport_size(VIEWPORT)
    return shot


def test_object_info_check_rejects_bad_prompts(object_info):
    """The offline prompt check is not a tautology: it flags what the server would refuse."""
    good = {"1": {"class_type": "MaX4ZeroCropToMask", "inputs": {"image": ["2", 0], "mask": ["2", 1],
                                                                "size": 512, "padding": 0.1}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "max4zero_person.png"}}}
    assert check_against_object_info(good, object_info) == []
    bad = copy.deepcopy(good)
    bad["1"]["inputs"]["size"] = 10**9
    bad["1"]["inputs"]["mask"] = ["7", 1]
    bad["2"]["inputs"]["image"] = "no_such_file.png"
    del bad["1"]["inputs"]["padding"]
    bad["3"] = {"class_type": "NoSuchNode", "inputs": {}}
    text = "\n".join(check_against_object_info(bad, object_info))
    for needle in ("size=1000000000 > max", "missing node 7", "no_such_file.png", "'padding' missing", "NoSuchNode"):
        assert needle in text, (needle, text)


def test_browser_checks_catch_broken_workflow(page, server):
    """The in-browser load checks fire on a broken copy of a shipped workflow (runs last: leaves a dialog)."""
    wf = json.loads(_workflow_path(NAME["quick"]).read_text())
    by_type = {n["type"]: n for n in wf["nodes"]}
    by_type["CheckpointLoaderSimple"]["widgets_values"][0] = "not_there.safetensors"
    by_type["MaX4ZeroCropToMask"]["widgets_values"][0] = 10**7
    # a MASK output into an IMAGE input
    crop = by_type["MaX4ZeroCropToMask"]
    mask_link = next(lnk for lnk in wf["links"] if lnk[3] == crop["id"] and lnk[5] == "MASK")
    mask_link[5] = "IMAGE"
    crop_inputs = {i["name"]: i for i in crop["inputs"]}
    wf["links"].append([9999, mask_link[1], mask_link[2], crop["id"], 0, "IMAGE"])
    crop_inputs["image"]["link"] = 9999
    wf["links"] = [lnk for lnk in wf["links"] if not (lnk[3] == crop["id"] and lnk[4] == 0 and lnk[0] != 9999)]
    wf["nodes"].append({"id": 999, "type": "MaX4ZeroNoSuchNode", "pos": [0, 0], "size": [200, 60], "flags": {},
                        "order": 99, "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": []})
    res = inspect_load(page, wf, "broken.json")
    text = "\n".join(res["problems"])
    assert "MaX4ZeroNoSuchNode" in (res["missing"] or []), res
    assert "not_there.safetensors" in text, text
    assert "> max" in text, text
    assert "types do not match" in text, text
    page.keyboard.press("Escape")
