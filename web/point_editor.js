// MaX4Zero point editor: fix a registration by clicking (docs/point-editor.md).
// On MLS Warp, after a first run: the garment and the person crops side by side with the control points as
// numbered pairs; click the view (or "Edit points") for the full editor: drag a point, add a pair (garment,
// then person), delete a pair (right-click, or select and Delete), clear all, undo/redo, a live MLS preview
// (web/mls.js) and the pack's own warnings for the points (asked from the server, which answers with
// warping/point_checks.py's words). The points are written into manual_points, the pack's one points format.
// What the node sends (images, automatic matches, rules) is built by nodes/point_editor.py.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { coarseMap, upsample, warpImage } from "./mls.js";

const NODE_TYPE = "MaX4ZeroMLSWarp";
const UI_KEY = "max4zero_point_editor";
const ROUTE = "/max4zero/point_editor/check";
const FORMAT = "max4zero-matches/1";
const HIT_PX = 8; // screen pixels around a point that grab it
const EMPTY_TEXT = "Run the workflow once (Queue) to see the garment and the person here, then click to edit the points.";

// ------------------------------------------------------------------------------------------------
// points: parsing the pack's format, writing it back
// ------------------------------------------------------------------------------------------------

/** Pairs [{r: [x, y], t: [x, y]}] from manual_points text (the formats Matches.from_json reads), or throws. */
export function parsePoints(text, refSize, tgtSize) {
  if (!text || !text.trim()) return { pairs: [], refSize, tgtSize };
  let doc = JSON.parse(text);
  if (Array.isArray(doc)) doc = { points: doc };
  if (!doc || !Array.isArray(doc.points)) throw new Error("manual_points needs a 'points' list");
  const rs = doc.reference_size || refSize, ts = doc.target_size || tgtSize;
  const pairs = doc.points.map((p, i) => {
    let a, b;
    if (Array.isArray(p) && p.length === 2) [a, b] = p;
    else if (Array.isArray(p) && (p.length === 4 || p.length === 5)) [a, b] = [p.slice(0, 2), p.slice(2, 4)];
    else if (p && typeof p === "object") [a, b] = [p.reference, p.target];
    const nums = [...(a || []), ...(b || [])].map(Number);
    if (nums.length !== 4 || !nums.every(Number.isFinite)) throw new Error(`control point #${i} is malformed`);
    return { r: nums.slice(0, 2), t: nums.slice(2, 4) };
  });
  // Points given for other image sizes are rescaled the way Matches.rescaled does (pixel centres kept).
  const scale = (xy, from, to) => !from || !to || (from[0] === to[0] && from[1] === to[1]) ? xy :
    [(xy[0] + 0.5) * to[1] / from[1] - 0.5, (xy[1] + 0.5) * to[0] / from[0] - 0.5];
  return { pairs: pairs.map(p => ({ r: scale(p.r, rs, refSize), t: scale(p.t, ts, tgtSize) })),
           refSize: refSize || rs, tgtSize: tgtSize || ts };
}

/** manual_points text for pairs at the given sizes ("" for none: the node then uses the matches). */
export function formatPoints(pairs, refSize, tgtSize) {
  if (!pairs.length) return "";
  const r = v => Math.round(v * 100) / 100;
  const lines = pairs.map(p => `  {"reference": [${r(p.r[0])}, ${r(p.r[1])}], "target": [${r(p.t[0])}, ${r(p.t[1])}]}`);
  return `{"format": "${FORMAT}", "reference_size": [${refSize}], "target_size": [${tgtSize}], "points": [\n` +
    lines.join(",\n") + "\n]}";
}

const rowsToPairs = rows => (rows || []).map(q => ({ r: [q[0], q[1]], t: [q[2], q[3]] }));
const clone = pairs => pairs.map(p => ({ r: [...p.r], t: [...p.t] }));

// ------------------------------------------------------------------------------------------------
// per-node state
// ------------------------------------------------------------------------------------------------

function widget(node, name) { return (node.widgets || []).find(w => w.name === name); }

function theme() {
  const L = window.LiteGraph || {};
  return {
    bg: L.WIDGET_BGCOLOR || "#222", outline: L.WIDGET_OUTLINE_COLOR || "#666",
    text: L.WIDGET_TEXT_COLOR || "#ddd", muted: L.WIDGET_SECONDARY_TEXT_COLOR || "#999",
  };
}

function pairColor(i) { return `hsl(${(i * 137.5) % 360}, 85%, 58%)`; }

class EditorState {
  constructor(node) {
    this.node = node;
    this.payload = null;
    this.images = {}; // garment, garment_mask, person: HTMLImageElement
    this.garmentRGBA = null; // ImageData, alpha = garment mask (for the preview)
    this.pairs = null; // editable pairs (null: not opened/parsed yet)
    this.undoStack = [];
    this.redoStack = [];
    this.warnings = [];
    this.problem = null;
    this.note = "";
  }

  // Sizes from the run's payload, else from manual_points (after a reload), else the last ones seen (after Clear all).
  get refSize() { return this.payload?.reference_size || this.parsed()?.refSize || this.seen?.[0] || null; }
  get tgtSize() { return this.payload?.target_size || this.parsed()?.tgtSize || this.seen?.[1] || null; }
  get rules() { return this.payload?.rules || { duplicate_px: 0.5, max_points: 4096, preview_stride: 8 }; }
  get addMode() {
    const v = widget(this.node, "manual_points_mode")?.value;
    return typeof v === "string" && v.startsWith("add");
  }
  get text() { return widget(this.node, "manual_points")?.value || ""; }

  /** The manual points as the widget holds them (sizes from the payload, else from the JSON), or null. */
  parsed() {
    try {
      const p = parsePoints(this.text, this.payload?.reference_size, this.payload?.target_size);
      if (p.refSize && p.tgtSize) this.seen = [p.refSize, p.tgtSize];
      return p;
    } catch (e) {
      return null;
    }
  }

  /** Editable pairs and fixed (automatic, add mode) pairs: what the node will use. */
  sets() {
    const auto = rowsToPairs(this.payload?.automatic);
    const manual = this.pairs ?? this.parsed()?.pairs ?? [];
    if (this.addMode) return { editable: manual, fixed: auto };
    if (this.pairs === null && !manual.length) return { editable: auto, fixed: [] };
    return { editable: manual, fixed: [] };
  }

  /** The pairs MLS uses (replace mode with no manual points: the matches). */
  used() {
    const { editable, fixed } = this.sets();
    if (!this.addMode && !editable.length) return rowsToPairs(this.payload?.automatic);
    return [...fixed, ...editable];
  }

  setPayload(payload) {
    this.payload = payload;
    this.images = {};
    this.garmentRGBA = null;
    for (const key of ["garment", "garment_mask", "person"]) {
      const ref = payload.images?.[key];
      if (!ref) continue;
      const img = new Image();
      img.onload = () => { this.buildGarment(); this.node.setDirtyCanvas?.(true, true); this.dialog?.draw(); };
      const q = new URLSearchParams({ filename: ref.filename, type: ref.type, subfolder: ref.subfolder || "" });
      img.src = api.apiURL(`/view?${q}`);
      this.images[key] = img;
    }
    if (this.dialog) this.dialog.reset();
  }

  buildGarment() {
    const g = this.images.garment, m = this.images.garment_mask;
    if (!g?.complete || !m?.complete || !g.naturalWidth || !m.naturalWidth) return;
    const c = document.createElement("canvas");
    c.width = g.naturalWidth; c.height = g.naturalHeight;
    const ctx = c.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(m, 0, 0, c.width, c.height);
    const mask = ctx.getImageData(0, 0, c.width, c.height);
    ctx.drawImage(g, 0, 0);
    const rgba = ctx.getImageData(0, 0, c.width, c.height);
    for (let i = 0; i < rgba.data.length; i += 4) rgba.data[i + 3] = mask.data[i];
    this.garmentRGBA = rgba;
  }

  imagesReady() {
    return ["garment", "person"].every(k => this.images[k]?.complete && this.images[k].naturalWidth);
  }

  // -- editing ---------------------------------------------------------------------------------

  begin() {
    if (this.pairs === null) {
      const p = this.parsed();
      if (p === null) {
        this.problem = "manual_points does not parse as control points: fix it by hand, or Clear all to start again.";
        this.pairs = null;
        return false;
      }
      this.pairs = clone(this.sets().editable);
    }
    return true;
  }

  /** Apply an edit to a copy of the pairs; refused (with the reason in this.note) when it breaks a rule. */
  commit(next, what) {
    const why = this.refusal(next);
    if (why) { this.note = `Refused: ${why}`; return false; }
    this.undoStack.push(clone(this.pairs));
    if (this.undoStack.length > 200) this.undoStack.shift();
    this.redoStack = [];
    this.pairs = next;
    this.note = what;
    this.write();
    return true;
  }

  refusal(next) {
    const { duplicate_px: dup, max_points: max } = this.rules;
    if (next.length > max) return `MLS Warp takes at most ${max} hand-made pairs.`;
    const [rh, rw] = this.refSize || [Infinity, Infinity], [th, tw] = this.tgtSize || [Infinity, Infinity];
    const fixed = this.sets().fixed;
    for (let i = 0; i < next.length; i++) {
      const p = next[i];
      if (![...p.r, ...p.t].every(Number.isFinite)) return `pair ${i + 1} has a coordinate that is not a number.`;
      if (p.r[0] < 0 || p.r[1] < 0 || p.r[0] > rw - 1 || p.r[1] > rh - 1 ||
          p.t[0] < 0 || p.t[1] < 0 || p.t[0] > tw - 1 || p.t[1] > th - 1) return `pair ${i + 1} is outside its image.`;
      const others = [...fixed, ...next.slice(0, i)];
      for (const [side, name] of [["r", "garment"], ["t", "person"]]) {
        const j = others.findIndex(o => Math.hypot(o[side][0] - p[side][0], o[side][1] - p[side][1]) < dup);
        if (j >= 0) return `that ${name} pixel already holds a point (pairs would be duplicates): place it elsewhere.`;
      }
    }
    return null;
  }

  undo() {
    if (!this.undoStack.length) return;
    this.redoStack.push(clone(this.pairs));
    this.pairs = this.undoStack.pop();
    this.note = "Undone.";
    this.write();
  }

  redo() {
    if (!this.redoStack.length) return;
    this.undoStack.push(clone(this.pairs));
    this.pairs = this.redoStack.pop();
    this.note = "Redone.";
    this.write();
  }

  write() {
    const w = widget(this.node, "manual_points");
    if (!w || !this.refSize || !this.tgtSize) return;
    const text = formatPoints(this.pairs, this.refSize, this.tgtSize);
    w.value = text;
    w.callback?.(text);
    if (w.inputEl) w.inputEl.value = text;
    this.node.setDirtyCanvas?.(true, true);
    app.graph?.setDirtyCanvas?.(true, true);
    // Let the frontend's change tracker see the new value (undo history, autosave of the open workflow).
    const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker ??
      app.workflowManager?.activeWorkflow?.changeTracker;
    tracker?.checkState?.();
    this.requestWarnings();
  }

  requestWarnings() {
    clearTimeout(this.timer);
    this.timer = setTimeout(async () => {
      const used = this.used();
      const body = {
        points: used.map(p => [...p.r, ...p.t]), reference_size: this.refSize, target_size: this.tgtSize,
        kind: widget(this.node, "kind")?.value || "affine", alpha: Number(widget(this.node, "alpha")?.value ?? 0.1),
      };
      try {
        const res = await api.fetchApi(ROUTE, { method: "POST", body: JSON.stringify(body),
                                                headers: { "Content-Type": "application/json" } });
        const said = await res.json();
        this.warnings = said.warnings || [];
        this.problem = said.problem || null;
      } catch (e) {
        this.warnings = [];
        this.problem = `could not ask the server for warnings (${e})`;
      }
      this.checked = (this.checked || 0) + 1;
      this.dialog?.showWarnings();
      this.node.setDirtyCanvas?.(true, true);
    }, 150);
  }
}

function stateOf(node) {
  if (!node.m4zPoints) node.m4zPoints = new EditorState(node);
  return node.m4zPoints;
}

// ------------------------------------------------------------------------------------------------
// drawing the two photos and the pairs (node view and dialog share it)
// ------------------------------------------------------------------------------------------------

/** Layout of the two panels in a w x h box: {ref: {x, y, s}, tgt: {x, y, s}} (s = screen px per image px). */
function layout(st, x0, y0, w, h, gap) {
  const [rh, rw] = st.refSize || [1, 1], [th, tw] = st.tgtSize || [1, 1];
  const half = (w - gap) / 2;
  const sr = Math.min(half / rw, h / rh), stg = Math.min(half / tw, h / th);
  return {
    ref: { x: x0 + (half - rw * sr) / 2, y: y0 + (h - rh * sr) / 2, s: sr, w: rw, h: rh },
    tgt: { x: x0 + half + gap + (half - tw * stg) / 2, y: y0 + (h - th * stg) / 2, s: stg, w: tw, h: th },
  };
}

function drawPanels(ctx, st, lay, opts = {}) {
  const th = theme();
  for (const [key, box] of [["garment", lay.ref], ["person", lay.tgt]]) {
    ctx.fillStyle = th.bg;
    ctx.fillRect(box.x, box.y, box.w * box.s, box.h * box.s);
    const img = st.images[key];
    if (img?.complete && img.naturalWidth) ctx.drawImage(img, box.x, box.y, box.w * box.s, box.h * box.s);
    ctx.strokeStyle = th.outline;
    ctx.lineWidth = 1;
    ctx.strokeRect(box.x, box.y, box.w * box.s, box.h * box.s);
  }
  if (opts.preview) drawPreview(ctx, st, lay.tgt, opts.previewAlpha ?? 0.8);
  if (opts.lowQuality) return;
  const { editable, fixed } = st.sets();
  const at = (box, p) => [box.x + p[0] * box.s, box.y + p[1] * box.s];
  const r = opts.radius ?? 4;
  ctx.save();
  ctx.lineWidth = opts.lineWidth ?? 1;
  ctx.globalAlpha = 0.55;
  ctx.strokeStyle = th.muted;
  for (const p of fixed) {
    const [ax, ay] = at(lay.ref, p.r), [bx, by] = at(lay.tgt, p.t);
    ctx.beginPath(); ctx.arc(ax, ay, r * 0.7, 0, 2 * Math.PI); ctx.stroke();
    ctx.beginPath(); ctx.arc(bx, by, r * 0.7, 0, 2 * Math.PI); ctx.stroke();
  }
  ctx.globalAlpha = opts.lineAlpha ?? 0.6;
  editable.forEach((p, i) => {
    const [ax, ay] = at(lay.ref, p.r), [bx, by] = at(lay.tgt, p.t);
    ctx.strokeStyle = pairColor(i);
    ctx.beginPath(); ctx.moveTo(ax, ay); ctx.lineTo(bx, by); ctx.stroke();
  });
  ctx.globalAlpha = 1;
  ctx.font = `${opts.fontPx ?? 10}px sans-serif`;
  editable.forEach((p, i) => {
    const sel = opts.selected === i;
    for (const [x, y] of [at(lay.ref, p.r), at(lay.tgt, p.t)]) {
      ctx.fillStyle = pairColor(i);
      ctx.strokeStyle = sel ? "#fff" : "#000";
      ctx.lineWidth = sel ? 2.5 : 1;
      ctx.beginPath(); ctx.arc(x, y, sel ? r + 2 : r, 0, 2 * Math.PI); ctx.fill(); ctx.stroke();
      if (opts.numbers) {
        ctx.fillStyle = "#000";
        ctx.fillText(String(i + 1), x + r + 2, y - r - 1);
        ctx.fillStyle = "#fff";
        ctx.fillText(String(i + 1), x + r + 1, y - r - 2);
      }
    }
  });
  if (opts.pending) {
    const [x, y] = at(lay.ref, opts.pending);
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 2; ctx.setLineDash([3, 3]);
    ctx.beginPath(); ctx.arc(x, y, r + 4, 0, 2 * Math.PI); ctx.stroke();
    ctx.setLineDash([]);
  }
  ctx.restore();
}

/** The garment warped by MLS through the pairs in use, over the person panel (coarse grid, as fast as a drag). */
function drawPreview(ctx, st, box, alpha) {
  const used = st.used();
  if (!used.length || !st.garmentRGBA || !st.tgtSize) return;
  const [th, tw] = st.tgtSize;
  const key = JSON.stringify([used, widget(st.node, "kind")?.value, widget(st.node, "alpha")?.value]);
  if (st.previewKey !== key) {
    const kind = widget(st.node, "kind")?.value || "affine", a = Number(widget(st.node, "alpha")?.value ?? 0.1);
    // Backward map: target pixels read the garment (src = target points, as MLS Warp does).
    const coarse = coarseMap(used.map(p => p.t), used.map(p => p.r), th, tw, kind, a, st.rules.preview_stride || 8);
    const warped = warpImage(st.garmentRGBA, upsample(coarse), tw, th);
    const c = st.previewCanvas || (st.previewCanvas = document.createElement("canvas"));
    c.width = tw; c.height = th;
    c.getContext("2d").putImageData(warped, 0, 0);
    st.previewKey = key;
  }
  ctx.save();
  ctx.globalAlpha = alpha;
  ctx.drawImage(st.previewCanvas, box.x, box.y, box.w * box.s, box.h * box.s);
  ctx.restore();
}

// ------------------------------------------------------------------------------------------------
// the in-node view (a canvas widget: drawn in graph space, so it follows the canvas zoom and theme)
// ------------------------------------------------------------------------------------------------

const VIEW_HEADER = 22;

function viewWidget(node) {
  const st = stateOf(node);
  return {
    name: "point_editor", type: "max4zero_point_editor", value: null, serialize: false,
    options: { serialize: false },
    computeSize(width) {
      const w = width ?? node.size[0];
      return [w, Math.max(120, Math.round((w - 20) / 2) + VIEW_HEADER + 8)];
    },
    draw(ctx, node_, width, y) {
      const th = theme();
      const h = this.computeSize(width)[1];
      const low = !!app.canvas?.low_quality;
      this.m4zBox = [10, y, width - 20, h - 4];
      ctx.save();
      ctx.fillStyle = th.bg; ctx.strokeStyle = th.outline;
      ctx.beginPath();
      if (ctx.roundRect) ctx.roundRect(10, y, width - 20, h - 4, 6); else ctx.rect(10, y, width - 20, h - 4);
      ctx.fill(); ctx.stroke();
      const parsed = st.parsed();
      const ready = st.imagesReady();
      if (!low) {
        ctx.fillStyle = th.text; ctx.font = "12px sans-serif"; ctx.textBaseline = "middle";
        const n = st.sets().editable.length;
        const head = parsed === null ? "Edit points: manual_points does not parse" :
          ready || st.refSize ? `Edit points (${n} pair${n === 1 ? "" : "s"}${st.addMode ? " added" : ""}) ⤢` : "Edit points";
        ctx.fillText(head, 18, y + VIEW_HEADER / 2 + 1);
        if (st.warnings.length) {
          ctx.fillStyle = "#f5b342"; ctx.textAlign = "right";
          ctx.fillText(`⚠ ${st.warnings.length}`, width - 18, y + VIEW_HEADER / 2 + 1);
          ctx.textAlign = "left";
        }
      }
      const area = [14, y + VIEW_HEADER, width - 28, h - VIEW_HEADER - 10];
      if (!ready && !st.refSize) {
        if (!low) {
          ctx.fillStyle = th.muted; ctx.font = "12px sans-serif";
          wrapText(ctx, EMPTY_TEXT, area[0] + 6, area[1] + 14, area[2] - 12, 15);
        }
      } else {
        const lay = layout(st, ...area, 6);
        drawPanels(ctx, st, lay, { lowQuality: low, radius: 2.5, lineAlpha: 0.45 });
        if (!ready && !low) {
          ctx.fillStyle = th.muted; ctx.font = "11px sans-serif";
          wrapText(ctx, "Run once to see the photos.", area[0] + 6, area[1] + area[3] - 8, area[2] - 12, 13);
        }
      }
      ctx.restore();
    },
    mouse(event, pos) {
      const t = event.type;
      if (t === "pointerdown" || t === "mousedown") {
        openDialog(node);
        return true;
      }
      return false;
    },
  };
}

function wrapText(ctx, text, x, y, w, lh) {
  let line = "";
  for (const word of text.split(" ")) {
    const test = line ? `${line} ${word}` : word;
    if (ctx.measureText(test).width > w && line) { ctx.fillText(line, x, y); line = word; y += lh; }
    else line = test;
  }
  if (line) ctx.fillText(line, x, y);
}

// ------------------------------------------------------------------------------------------------
// the dialog (enlarged editor)
// ------------------------------------------------------------------------------------------------

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.textContent = label;
  b.title = title;
  b.dataset.m4z = label.toLowerCase().replace(/[^a-z]+/g, "-").replace(/-$/, "");
  Object.assign(b.style, {
    background: "var(--comfy-input-bg, #333)", color: "var(--input-text, #ddd)", cursor: "pointer",
    border: "1px solid var(--border-color, #555)", borderRadius: "6px", padding: "4px 10px", font: "13px sans-serif",
  });
  b.addEventListener("click", onClick);
  return b;
}

class Dialog {
  constructor(node) {
    this.node = node;
    this.st = stateOf(node);
    this.selected = -1;
    this.pending = null;
    this.drag = null;
    this.preview = true;
    const root = this.root = document.createElement("div");
    root.className = "m4z-point-editor";
    Object.assign(root.style, {
      position: "fixed", inset: "0", zIndex: 10000, background: "rgba(0,0,0,0.6)", display: "flex",
      alignItems: "center", justifyContent: "center",
    });
    const panel = document.createElement("div");
    Object.assign(panel.style, {
      background: "var(--comfy-menu-bg, #202020)", color: "var(--fg-color, #ddd)", width: "92vw", height: "90vh",
      border: "1px solid var(--border-color, #555)", borderRadius: "10px", display: "flex", flexDirection: "column",
      padding: "10px", boxSizing: "border-box", gap: "8px", font: "13px sans-serif",
    });
    const bar = document.createElement("div");
    Object.assign(bar.style, { display: "flex", gap: "8px", alignItems: "center", flexWrap: "wrap" });
    const title = document.createElement("b");
    title.textContent = `${node.title || "MLS Warp"}: control points`;
    const previewBox = document.createElement("label");
    previewBox.innerHTML = '<input type="checkbox" checked data-m4z="preview"> live preview';
    previewBox.querySelector("input").addEventListener("change", e => { this.preview = e.target.checked; this.draw(); });
    const spacer = document.createElement("span");
    spacer.style.flex = "1";
    bar.append(title, button("Undo", "Undo (Ctrl+Z)", () => { this.st.undo(); this.after(); }),
               button("Redo", "Redo (Ctrl+Y)", () => { this.st.redo(); this.after(); }),
               button("Delete pair", "Delete the selected pair (Delete key, or right-click a point)", () => this.deleteSelected()),
               button("Clear all", "Remove every hand-made pair", () => this.clearAll()),
               previewBox, spacer, button("Close", "Close (Escape); the points are already in manual_points", () => this.close()));
    this.status = document.createElement("div");
    this.status.dataset.m4z = "status";
    // Fixed heights for the text around the canvas: the photos never move under the mouse when a note or a
    // warning arrives.
    Object.assign(this.status.style, { color: "var(--descrip-text, #aaa)", height: "2.8em", overflowY: "auto" });
    this.canvas = document.createElement("canvas");
    this.canvas.dataset.m4z = "canvas";
    Object.assign(this.canvas.style, { flex: "1", minHeight: "0", width: "100%", cursor: "crosshair" });
    this.warnBox = document.createElement("div");
    this.warnBox.dataset.m4z = "warnings";
    Object.assign(this.warnBox.style, { color: "#f5b342", height: "7.5em", flex: "none", overflowY: "auto" });
    // Keys typed in the editor go to this input: the frontend's own shortcuts (Ctrl+Z undoes the graph, Delete
    // deletes the selected node) leave text inputs alone, so they never act on the graph behind the editor.
    this.keyInput = document.createElement("input");
    this.keyInput.setAttribute("aria-label", "point editor keys");
    Object.assign(this.keyInput.style, { position: "absolute", opacity: "0", width: "1px", height: "1px",
                                         pointerEvents: "none", left: "0", top: "0" });
    panel.style.position = "relative";
    panel.append(this.keyInput, bar, this.status, this.canvas, this.warnBox);
    panel.addEventListener("click", () => this.focusKeys());
    root.append(panel);
    this.canvas.addEventListener("pointerdown", e => this.down(e));
    this.canvas.addEventListener("pointermove", e => this.move(e));
    this.canvas.addEventListener("pointerup", e => this.up(e));
    this.canvas.addEventListener("contextmenu", e => { e.preventDefault(); this.rightClick(e); });
    this.keys = e => this.key(e);
    this.resize = () => this.draw();
  }

  focusKeys() { this.keyInput.focus({ preventScroll: true }); }

  open() {
    document.body.append(this.root);
    this.focusKeys();
    window.addEventListener("keydown", this.keys, true);
    window.addEventListener("resize", this.resize);
    this.reset();
  }

  reset() {
    this.selected = -1;
    this.pending = null;
    this.st.note = "";
    this.st.begin();
    this.st.requestWarnings();
    this.draw();
  }

  close() {
    window.removeEventListener("keydown", this.keys, true);
    window.removeEventListener("resize", this.resize);
    this.root.remove();
    this.st.dialog = null;
    // Back to what the widget holds: the next opening (or a new run's matches) starts from there.
    this.st.pairs = null;
    this.node.setDirtyCanvas?.(true, true);
  }

  layout() {
    const r = this.canvas.getBoundingClientRect();
    return layout(this.st, 8, 8, r.width - 16, r.height - 16, 24);
  }

  /** Client (screen) coordinates of an image point: side "r" (garment) or "t" (person). For tests and tools. */
  toClient(side, x, y) {
    const box = this.layout()[side === "r" ? "ref" : "tgt"], r = this.canvas.getBoundingClientRect();
    return [r.left + box.x + x * box.s, r.top + box.y + y * box.s];
  }

  toImage(e) {
    const r = this.canvas.getBoundingClientRect(), px = e.clientX - r.left, py = e.clientY - r.top;
    const lay = this.layout();
    for (const [side, box] of [["r", lay.ref], ["t", lay.tgt]]) {
      const x = (px - box.x) / box.s, y = (py - box.y) / box.s;
      if (x >= -0.5 && y >= -0.5 && x <= box.w - 0.5 && y <= box.h - 0.5)
        return { side, x: Math.min(Math.max(x, 0), box.w - 1), y: Math.min(Math.max(y, 0), box.h - 1), px, py, box };
    }
    return { side: null, px, py };
  }

  hit(e) {
    const pairs = this.st.pairs || [];
    const lay = this.layout(), r = this.canvas.getBoundingClientRect();
    const px = e.clientX - r.left, py = e.clientY - r.top;
    let best = null, bestD = HIT_PX;
    pairs.forEach((p, i) => {
      for (const [side, box] of [["r", lay.ref], ["t", lay.tgt]]) {
        const d = Math.hypot(box.x + p[side][0] * box.s - px, box.y + p[side][1] * box.s - py);
        if (d <= bestD) { bestD = d; best = { i, side }; }
      }
    });
    return best;
  }

  down(e) {
    e.preventDefault();
    this.focusKeys();
    if (e.button !== 0 || !this.st.pairs) return;
    const h = this.hit(e);
    if (h) {
      this.selected = h.i;
      this.drag = { ...h, start: [...this.st.pairs[h.i][h.side]], before: clone(this.st.pairs), moved: false };
      this.canvas.setPointerCapture?.(e.pointerId);
      this.draw();
      return;
    }
    const at = this.toImage(e);
    if (at.side === "r") {
      if (this.st.pairs.length >= this.st.rules.max_points) {
        this.st.note = `Refused: MLS Warp takes at most ${this.st.rules.max_points} hand-made pairs.`;
      } else {
        this.pending = [at.x, at.y];
        this.st.note = "Now click the same spot of the garment on the person (right). Escape cancels.";
      }
    } else if (at.side === "t") {
      if (this.pending) {
        const next = [...clone(this.st.pairs), { r: this.pending, t: [at.x, at.y] }];
        if (this.st.commit(next, `Pair ${next.length} added.`)) this.selected = next.length - 1;
        this.pending = null;
      } else {
        this.selected = -1;
        this.st.note = "To add a pair, click on the garment (left) first, then on the person.";
      }
    }
    this.draw();
  }

  move(e) {
    if (!this.drag) return;
    const at = this.toImage(e), lay = this.layout(), box = this.drag.side === "r" ? lay.ref : lay.tgt;
    const r = this.canvas.getBoundingClientRect();
    // Kept inside its own photo, whatever the mouse does: the editor never holds a point outside the image.
    const x = Math.min(Math.max((e.clientX - r.left - box.x) / box.s, 0), box.w - 1);
    const y = Math.min(Math.max((e.clientY - r.top - box.y) / box.s, 0), box.h - 1);
    this.st.pairs[this.drag.i][this.drag.side] = [x, y];
    this.drag.moved = true;
    void at;
    this.scheduleDraw();
  }

  up(e) {
    if (!this.drag) return;
    const d = this.drag;
    this.drag = null;
    if (d.moved) {
      const next = clone(this.st.pairs);
      this.st.pairs = d.before;
      if (!this.st.commit(next, `Pair ${d.i + 1} moved.`)) this.st.pairs = d.before;
    }
    this.draw();
  }

  rightClick(e) {
    const h = this.hit(e);
    if (!h) return;
    this.selected = h.i;
    this.deleteSelected();
  }

  deleteSelected() {
    if (!this.st.pairs || this.selected < 0 || this.selected >= this.st.pairs.length) {
      this.st.note = "Select a pair first (click one of its points).";
      this.draw();
      return;
    }
    const next = clone(this.st.pairs);
    next.splice(this.selected, 1);
    this.st.commit(next, `Pair ${this.selected + 1} deleted.`);
    this.selected = -1;
    this.after();
  }

  clearAll() {
    if (!this.st.pairs) { this.st.pairs = []; this.st.problem = null; }
    this.st.commit([], "All hand-made pairs removed.");
    this.selected = -1;
    this.pending = null;
    this.after();
  }

  after() { this.selected = Math.min(this.selected, (this.st.pairs || []).length - 1); this.draw(); }

  key(e) {
    const k = e.key.toLowerCase();
    if (k === "escape") { if (this.pending) { this.pending = null; this.st.note = ""; this.draw(); } else this.close(); }
    else if ((e.ctrlKey || e.metaKey) && k === "z" && !e.shiftKey) { this.st.undo(); this.after(); }
    else if ((e.ctrlKey || e.metaKey) && (k === "y" || (k === "z" && e.shiftKey))) { this.st.redo(); this.after(); }
    else if (k === "delete" || k === "backspace") this.deleteSelected();
    else return;
    e.preventDefault();
    e.stopPropagation();
  }

  scheduleDraw() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => { this.frame = null; this.draw(); });
  }

  draw() {
    const c = this.canvas, r = c.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    if (!r.width) return;
    if (c.width !== Math.round(r.width * dpr) || c.height !== Math.round(r.height * dpr)) {
      c.width = Math.round(r.width * dpr); c.height = Math.round(r.height * dpr);
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, r.width, r.height);
    const st = this.st;
    if (!st.imagesReady() && !st.refSize) {
      ctx.fillStyle = theme().muted; ctx.font = "15px sans-serif";
      wrapText(ctx, EMPTY_TEXT, 20, 40, r.width - 40, 20);
    } else {
      drawPanels(ctx, st, this.layout(), { preview: this.preview, numbers: true, radius: 5, lineWidth: 1.5,
                                           selected: this.selected, pending: this.pending, fontPx: 12 });
    }
    const n = (st.pairs || []).length, auto = (st.payload?.automatic || []).length;
    const how = st.addMode ? `${n} hand-made pair${n === 1 ? "" : "s"} added to ${auto} automatic matches (grey)` :
      n ? `${n} pair${n === 1 ? "" : "s"}: they replace the ${auto} automatic matches` :
        `no hand-made pairs: MLS Warp uses the ${auto} automatic matches`;
    this.status.textContent = `${how}. Drag a point; click the garment then the person to add a pair; ` +
      `right-click a point to delete its pair.${st.note ? "  " + st.note : ""}`;
    this.showWarnings();
  }

  showWarnings() {
    const st = this.st;
    const items = [...(st.problem ? [st.problem] : []), ...st.warnings];
    this.warnBox.replaceChildren(...items.map(t => {
      const d = document.createElement("div");
      d.textContent = `⚠ ${t}`;
      return d;
    }));
  }
}

function openDialog(node) {
  const st = stateOf(node);
  if (st.dialog) return st.dialog;
  st.dialog = new Dialog(node);
  st.dialog.open();
  return st.dialog;
}

// ------------------------------------------------------------------------------------------------
// registration
// ------------------------------------------------------------------------------------------------

app.registerExtension({
  name: "MaX4Zero.PointEditor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      stateOf(this);
      this.addCustomWidget(viewWidget(this));
      const size = this.computeSize();
      this.setSize([Math.max(this.size[0], 360), Math.max(this.size[1], size[1])]);
      return r;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const r = executed?.apply(this, arguments);
      const payload = output?.[UI_KEY];
      if (Array.isArray(payload) && payload.length) {
        const st = stateOf(this);
        st.setPayload(payload[payload.length - 1]);
        st.requestWarnings();
      }
      return r;
    };
    nodeType.prototype.m4zOpenPointEditor = function () { return openDialog(this); };
  },
});
