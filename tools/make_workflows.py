"""Write the example workflows in ``workflows/`` (UI format, version 0.4), as the ComfyUI frontend saves them.

Run from the repository root (plain Python, no ComfyUI needed)::

    python tools/make_workflows.py

Node inputs, outputs and widgets come from the ``/object_info`` snapshots in ``tests/data/`` and follow
the frontend's rules (comfyui-frontend-package 1.27): sockets first, then one socket per widget; widgets in
``input_order`` (required, then optional); an extra ``control_after_generate`` value after INT inputs that
ask for it or are called ``seed``/``noise_seed``; LoadImage-style combos get a trailing ``upload`` widget.
Layout, as an artist reads a graph: the Note first (node 1, leftmost), then labelled groups left → right in the
order the data flows (inputs → registration → stage 1 → stage 2 → output). Each node names its group; inside a
group a node's column is one past the column of the group's nodes it reads from, so every link runs left → right,
and each node sits level with the nodes it reads from (nodes move down only to avoid overlaps), which keeps links
short and few of them crossing. ``tests/test_workflows.py`` checks all of this.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
OUT = ROOT / "workflows"
FRONTEND_VERSION = "1.27.10"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# The method's prompts: the positive describes the garment, the negative is empty. The negative is the base of the
# MEA term in paper guidance, so anything written there is pushed against at cfg + s_mea (27x) inside the mask.
POSITIVE = "a person wearing a striped t-shirt"
NEGATIVE = ""
# The real public files each loader names (README "Models": where each goes). The frontend offers the download
# of a missing file from node.properties.models.
SD15 = "sd-v1-5-inpainting.ckpt"
SDXL = "sd_xl_base_1.0_inpainting_0.1.safetensors"
LORA = "garment_detail_lora.safetensors"  # a stand-in: any SD1.5 LoRA (there is no canonical one)
CONTROLNET = "control_v11p_sd15_openpose_fp16.safetensors"
MODEL_URLS = {
    SD15: ("checkpoints",
           "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-inpainting/resolve/main/sd-v1-5-inpainting.ckpt"),
    SDXL: ("checkpoints", "https://huggingface.co/benjamin-paine/sd-xl-alternative-bases/resolve/main/"
                          "sd_xl_base_1.0_inpainting_0.1.safetensors"),
    CONTROLNET: ("controlnet", "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
                               "control_v11p_sd15_openpose_fp16.safetensors"),
}
PERSON, PERSON_MASK = "max4zero_person.png", "max4zero_person_mask.png"
GARMENT, GARMENT_MASK = "max4zero_garment.png", "max4zero_garment_mask.png"
POSE = "max4zero_pose.png"
SEED = 42

INFO: dict = {}
# The oldest supported ComfyUI's schemas: the workflows must load there (tests/test_workflows.py checks every
# supported version's snapshot). Node types only newer versions have (the core segmentation nodes of the masks
# workflow, ComfyUI 0.33) come from the newer snapshot; such a workflow declares its minimum version
# (MIN_COMFYUI) and is checked against the snapshots from that version on.
for _name in ("object_info_core-0.3.64.json", "object_info_pack-0.3.64.json", "object_info_core-0.33.0.json"):
    for _k, _v in json.loads((DATA / _name).read_text(encoding="utf-8")).items():
        if not _k.startswith("_"):
            INFO.setdefault(_k, _v)
INFO_0364 = set(json.loads((DATA / "object_info_core-0.3.64.json").read_text(encoding="utf-8"))) | set(
    json.loads((DATA / "object_info_pack-0.3.64.json").read_text(encoding="utf-8")))

COL_GAP = 50    # horizontal space between columns of a group
GROUP_GAP = 80  # horizontal space between groups
ROW_GAP = 40    # vertical space between nodes (the title bar, 30 px, sits above pos)
TITLE_H = 30
GROUP_PAD = 24      # inside a group, around its nodes
GROUP_TITLE_H = 50  # the group's title bar (font GROUP_FONT)
GROUP_FONT = 24  # LiteGraph's default (the frontend draws every group title at its own default size)
NOTE_GAP = 80       # between the Note and the first group
# LiteGraph's group colours (the frontend's colour menu), one per kind of stage.
GROUP_COLOURS = {"inputs": "#3f789e", "registration": "#8AA", "stage1": "#b58b2a", "stage2": "#a1309b",
                 "output": "#8A8", "masks": "#b06634"}


def count_crossings(segments: list) -> int:
    """Pairs of segments ``(source key, destination key, start, end)`` that cross properly; links that share
    their source slot or their destination node are not counted (they meet by design)."""
    def side(a, b, c) -> float:
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    total = 0
    for i, (sa, da, p1, p2) in enumerate(segments):
        for sb, db, p3, p4 in segments[i + 1:]:
            if sa == sb or da == db:
                continue
            if side(p3, p4, p1) * side(p3, p4, p2) < 0 and side(p1, p2, p3) * side(p1, p2, p4) < 0:
                total += 1
    return total


def _spec_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def ordered_inputs(node_type: str) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in the frontend's order, with the upload widget of LoadImage-style nodes."""
    info = INFO[node_type]
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            out.append((name, specs[name], section == "optional"))
    if any(len(s) > 1 and isinstance(s[1], dict) and s[1].get("image_upload") for _, s, _ in out):
        out.append(("upload", ["IMAGEUPLOAD", {}], False))
    return out


def is_widget(spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (_spec_type(spec) in WIDGET_TYPES or spec[0] == "IMAGEUPLOAD") and not opts.get("forceInput")


def has_control(name: str, spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] != "INT":
        return bool(opts.get("control_after_generate"))
    c = opts.get("control_after_generate")
    return bool(c) if c is not None else name in ("seed", "noise_seed")


class Node:
    def __init__(self, wf: "Workflow", node_type: str, group: str, widgets: dict, box=None):
        self.wf, self.type, self.group = wf, node_type, group
        self.id = wf.next_id()
        self.links_in: dict[str, int] = {}
        self.links_out: dict[int, list[int]] = {}
        self.box = box
        self.widgets = dict(widgets)
        if node_type in ("Note", "MarkdownNote"):
            self.inputs, self.outputs = [], []
            return
        self.inputs = ordered_inputs(node_type)
        info = INFO[node_type]
        self.outputs = list(zip(info["output_name"], info["output"]))
        known = {n for n, s, _ in self.inputs if is_widget(s)}
        unknown = set(widgets) - known
        if unknown:
            raise ValueError(f"{node_type}: no widget(s) {sorted(unknown)}")

    def out(self, name_or_index) -> tuple["Node", int]:
        if isinstance(name_or_index, int):
            return self, name_or_index
        names = [n for n, _ in self.outputs]
        return self, names.index(name_or_index)

    def widget_values(self) -> list:
        if self.type in ("Note", "MarkdownNote"):
            return [self.widgets["text"]]
        vals = []
        for name, spec, _ in self.inputs:
            if not is_widget(spec):
                continue
            if name == "upload":
                vals.append("image")
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if name in self.widgets:
                v = self.widgets[name]
            elif "default" in opts:
                v = opts["default"]
            elif isinstance(spec[0], list):
                v = spec[0][0]
            else:
                raise ValueError(f"{self.type}.{name}: no value and no default")
            vals.append(v)
            if has_control(name, spec):
                vals.append(self.widgets.get(name + ":control", "fixed"))
        return vals

    def socket_names(self) -> list[str]:
        return [n for n, s, _ in self.inputs if not is_widget(s)]

    def compute_size(self) -> list[float]:
        if self.box:
            return list(self.box)
        n_widgets = sum(1 for _, s, _ in self.inputs if is_widget(s) and s[0] != "IMAGEUPLOAD")
        rows = max(len(self.socket_names()), len(self.outputs))
        h = rows * 20 + n_widgets * 24 + 10
        return [320, max(46, h)]


class Workflow:
    def __init__(self, name: str, groups: list[tuple[str, str, str]]):
        """``groups``: (key, title, colour key) left → right, in the order the data flows."""
        self.name = name
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.group_defs = groups
        self._id = 0

    def next_id(self) -> int:
        self._id += 1
        return self._id

    def add(self, node_type: str, group: str, box=None, **widgets) -> Node:
        if node_type not in ("Note", "MarkdownNote") and group not in {k for k, _, _ in self.group_defs}:
            raise ValueError(f"{self.name}: no group {group!r}")
        n = Node(self, node_type, group, widgets, box)
        self.nodes.append(n)
        return n

    def note(self, text: str, box=(400, 260)) -> Node:
        """The Note: created first (node 1), placed left of every group."""
        if self.nodes:
            raise ValueError(f"{self.name}: create the Note first")
        return self.add("Note", "", box=box, text=text)

    def connect(self, src: tuple[Node, int], dst: Node, input_name: str) -> None:
        node, slot = src
        if input_name not in dst.socket_names():
            raise ValueError(f"{dst.type} has no socket input {input_name!r}")
        if input_name in dst.links_in:
            raise ValueError(f"{dst.type}.{input_name} is already connected")
        link_id = len(self.links) + 1
        out_type = node.outputs[slot][1]
        spec = dict((n, s) for n, s, _ in dst.inputs)[input_name]
        if _spec_type(spec) != out_type and "*" not in (out_type, _spec_type(spec)):
            raise ValueError(f"{node.type}[{slot}] is {out_type}, {dst.type}.{input_name} wants {spec[0]}")
        to_slot = dst.socket_names().index(input_name)
        self.links.append([link_id, node.id, slot, dst.id, to_slot, out_type])
        dst.links_in[input_name] = link_id
        node.links_out.setdefault(slot, []).append(link_id)

    def wire(self, dst: Node, **sources) -> Node:
        for name, src in sources.items():
            self.connect(src if isinstance(src, tuple) else src.out(0), dst, name)
        return dst

    def _order(self) -> dict[int, int]:
        deps = {n.id: set() for n in self.nodes}
        for _, a, _, b, _, _ in self.links:
            deps[b].add(a)
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = sorted(i for i in deps if i not in done and deps[i] <= done)
            if not ready:
                cycle = sorted(i for i in deps if i not in done)
                raise ValueError(f"{self.name}: the links form a cycle through nodes {cycle}")
            for i in ready:
                order[i] = len(order)
            done |= set(ready)
        return order

    def _columns(self) -> list[tuple[int, str, list[Node]]]:
        """(group index, group key, nodes) per column, left → right; a node's column inside its group is one past
        the columns of the group's nodes it reads from, so every link runs left → right."""
        by_id = {n.id: n for n in self.nodes}
        rank = {k: i for i, (k, _, _) in enumerate(self.group_defs)}
        col: dict[int, int] = {}
        for n in self.nodes:  # creation order is a topological order (a node is wired after its sources)
            same = []
            for _, a, _, b, _, _ in self.links:
                if b == n.id:
                    if rank[by_id[a].group] > rank[n.group]:
                        raise ValueError(f"{self.name}: {by_id[a].type} ({by_id[a].group}) feeds {n.type} in the "
                                         f"earlier group {n.group}: reorder the groups")
                    if by_id[a].group == n.group:
                        same.append(col[a])
            col[n.id] = 1 + max(same) if same else 0
        out = []
        for gi, (key, _, _) in enumerate(self.group_defs):
            members = [n for n in self.nodes if n.group == key]
            if not members:
                raise ValueError(f"{self.name}: group {key!r} is empty")
            for c in range(max(col[n.id] for n in members) + 1):
                out.append((gi, key, [n for n in members if col[n.id] == c]))
        return out

    def _place(self, columns: list[tuple[int, str, list[Node]]]) -> tuple[dict[int, list[float]], list[dict]]:
        """Positions for the given top → bottom order in each column, and the group boxes."""
        sources: dict[int, list[tuple[int, int]]] = {n.id: [] for n in self.nodes}
        for _, a, a_slot, b, _, _ in self.links:
            sources[b].append((a, a_slot))
        pos: dict[int, list[float]] = {}
        note = [n for n in self.nodes if n.type in ("Note", "MarkdownNote")]
        x = 0.0
        for n in note:
            pos[n.id] = [x, 0.0]
        if note:
            x += max(n.compute_size()[0] for n in note) + NOTE_GAP
        top = GROUP_TITLE_H + GROUP_PAD + TITLE_H  # first node's pos y inside a group whose box starts at 0
        boxes: list[dict] = []
        group_x0, bottom, x_col = x, 0.0, x + GROUP_PAD
        for i, (gi, key, column) in enumerate(columns):
            y = top
            for n in column:
                ys = [pos[a][1] + 20.0 * slot for a, slot in sources[n.id] if a in pos]
                # Level with the nodes it reads from; pushed down only to stay clear of the node above.
                y = max(y, sum(ys) / len(ys)) if ys else y
                pos[n.id] = [x_col, y]
                bottom = max(bottom, y + n.compute_size()[1])
                y += n.compute_size()[1] + ROW_GAP + TITLE_H
            x_col += max(n.compute_size()[0] for n in column) + COL_GAP
            if i + 1 == len(columns) or columns[i + 1][0] != gi:
                _, title, colour = self.group_defs[gi]
                right = x_col - COL_GAP + GROUP_PAD
                boxes.append({"id": gi + 1, "title": title, "bounding": [group_x0, 0.0, right - group_x0,
                                                                          bottom + GROUP_PAD],
                              "color": GROUP_COLOURS[colour], "font_size": GROUP_FONT, "flags": {}})
                group_x0, bottom = right + GROUP_GAP, 0.0
                x_col = group_x0 + GROUP_PAD
        return pos, boxes

    def crossings(self, pos: dict[int, list[float]]) -> int:
        """Pairs of links that cross, each drawn straight from its output slot to its input slot."""
        by_id = {n.id: n for n in self.nodes}
        segs = []
        for _, a, a_slot, b, b_slot, _ in self.links:
            pa, pb = pos[a], pos[b]
            segs.append(((a, a_slot), b, (pa[0] + by_id[a].compute_size()[0], pa[1] + 20.0 * (a_slot + 0.5)),
                         (pb[0], pb[1] + 20.0 * (b_slot + 0.5))))
        return count_crossings(segs)

    def _layout(self) -> tuple[dict[int, list[float]], list[dict]]:
        """Columns from the data flow; in each column, the order with the fewest crossing links found by
        barycentre ordering followed by swaps of neighbours (kept only when they remove crossings)."""
        columns = self._columns()
        pos, _ = self._place(columns)
        for i, (gi, key, column) in enumerate(columns):  # barycentre order, left → right
            if i == 0:  # the loaders: no sources to be level with
                continue
            columns[i] = (gi, key, sorted(column, key=lambda n: (self._wanted(n, pos), n.id)))
            pos, _ = self._place(columns)
        best = self.crossings(pos)
        for _ in range(8):
            improved = False
            for i, (gi, key, column) in enumerate(columns):
                for j in range(len(column)):
                    for k in range(j + 1, len(column)):
                        trial = list(column)
                        trial.insert(k, trial.pop(j))  # move node j to place k
                        for cand in (trial, [*column[:j], column[k], *column[j + 1:k], column[j], *column[k + 1:]]):
                            columns[i] = (gi, key, cand)
                            c = self.crossings(self._place(columns)[0])
                            if c < best:
                                best, column, improved = c, cand, True
                        columns[i] = (gi, key, column)
            if not improved:
                break
        return self._place(columns)

    def _wanted(self, n: Node, pos: dict[int, list[float]]) -> float:
        ys = [pos[a][1] + 20.0 * slot for _, a, slot, b, _, _ in self.links if b == n.id]
        return sum(ys) / len(ys) if ys else -1.0

    def to_json(self) -> dict:
        order, (pos, groups) = self._order(), self._layout()
        nodes = []
        for n in self.nodes:
            d = {"id": n.id, "type": n.type, "pos": pos[n.id], "size": n.compute_size(), "flags": {},
                 "order": order[n.id], "mode": 0}
            inputs = []
            sockets = [(nm, s, o) for nm, s, o in n.inputs if not is_widget(s)]
            widgets = [(nm, s, o) for nm, s, o in n.inputs if is_widget(s)]
            for nm, s, opt in sockets + widgets:
                e = {"localized_name": nm, "name": nm, "type": _spec_type(s)}
                if opt:
                    e["shape"] = 7
                if is_widget(s):
                    e["widget"] = {"name": nm}
                e["link"] = n.links_in.get(nm)
                inputs.append(e)
            d["inputs"] = inputs
            d["outputs"] = [{"localized_name": nm, "name": nm, "type": t, "slot_index": i,
                             "links": n.links_out.get(i) or None} for i, (nm, t) in enumerate(n.outputs)]
            if n.type in ("Note", "MarkdownNote"):
                d["properties"] = {}
                d["color"], d["bgcolor"] = "#432", "#653"
            else:
                d["properties"] = {"Node name for S&R": n.type}
                models = [{"name": v, "url": MODEL_URLS[v][1], "directory": MODEL_URLS[v][0]}
                          for v in n.widgets.values() if isinstance(v, str) and v in MODEL_URLS]
                if models:
                    d["properties"]["models"] = models
            d["widgets_values"] = n.widget_values()
            nodes.append(d)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "max4zero/" + self.name)),
            "revision": 0,
            "last_node_id": self._id,
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": groups,
            "config": {},
            "extra": {"ds": {"scale": 0.5, "offset": [60, 60]}, "frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }

    def write(self) -> Path:
        path = OUT / f"{self.name}.json"
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


# ------------------------------------------------------------------------------------------------
# building blocks shared by the workflows
# ------------------------------------------------------------------------------------------------

IMG = (320, 330)  # LoadImage / preview nodes: room for the picture
PREVIEW = (300, 300)

# The groups of the try-on workflows, left → right in the order the data flows.
TWO_STAGE_GROUPS = [
    ("inputs", "1 · Inputs: model, prompts, photos, masks, crops", "inputs"),
    ("registration", "2 · Registration: match, MLS warp", "registration"),
    ("stage1", "3 · Stage 1: fringe inpainting (steps 0→35)", "stage1"),
    ("stage2", "4 · Stage 2: Masked Extended Attention (steps 35→50)", "stage2"),
    ("output", "5 · Output", "output"),
]


def loaders(wf: Workflow, ckpt: str, group: str = "inputs"):
    """Checkpoint + the four photos/masks (LoadImageMask, channel red)."""
    ckpt_node = wf.add("CheckpointLoaderSimple", group, ckpt_name=ckpt)
    person = wf.add("LoadImage", group, box=IMG, image=PERSON)
    person_mask = wf.add("LoadImageMask", group, box=IMG, image=PERSON_MASK, channel="red")
    garment = wf.add("LoadImage", group, box=IMG, image=GARMENT)
    garment_mask = wf.add("LoadImageMask", group, box=IMG, image=GARMENT_MASK, channel="red")
    return ckpt_node, person, person_mask, garment, garment_mask


def prompts(wf: Workflow, clip_src, group: str = "inputs"):
    pos = wf.wire(wf.add("CLIPTextEncode", group, box=(400, 130), text=POSITIVE), clip=clip_src)
    neg = wf.wire(wf.add("CLIPTextEncode", group, box=(400, 130), text=NEGATIVE), clip=clip_src)
    return pos, neg


def crops(wf: Workflow, person, person_mask, garment, garment_mask, size: int, group: str = "inputs"):
    tgt = wf.wire(wf.add("MaX4ZeroCropToMask", group, size=size, padding=0.1), image=person, mask=person_mask)
    ref = wf.wire(wf.add("MaX4ZeroCropToMask", group, size=size, padding=0.1), image=garment, mask=garment_mask)
    return tgt, ref


def preview(wf: Workflow, src, group: str, mask: bool = False):
    if mask:
        src = wf.wire(wf.add("MaskToImage", group), mask=src).out(0)
    return wf.wire(wf.add("PreviewImage", group, box=PREVIEW), images=src)


#: The paper's schedule (SD, eps): DDIM 50 steps at cfg 12, stage 1 = steps 0→35, MEA for 35→50 (window 0.7→1).
SD_PLAN = {"steps": 50, "split": 35, "cfg": 12.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
           "mea": {"guidance": "paper", "start": 0.7, "end": 1.0}}


def two_stage_tryon(wf: Workflow, *, model_src, vae_src, pos, neg, mea_pos, tgt, ref, size: int,
                    previews: bool = True, layers: str | None = None, plan: dict = SD_PLAN,
                    corr_src: tuple | None = None):
    """Correspondence → MLS warp → double mask → KSamplerAdvanced 0→split → MEA → KSamplerAdvanced split→steps →
    decode, in the groups registration / stage1 / stage2 / output. Returns the nodes the callers still need.

    ``plan``: the samplers' schedule and the MEA node's widgets (:data:`SD_PLAN`). ``corr_src``: (MODEL, VAE,
    positive) Correspondence reads features with, when that is another model than the one that samples (a Flux
    workflow's SD UNet); by default the sampling model's."""
    c_model, c_vae, c_pos = corr_src or (model_src, vae_src, pos)
    corr = wf.wire(wf.add("MaX4ZeroCorrespondence", "registration", mode="paper", seed=SEED),
                   model=c_model, vae=c_vae, positive=c_pos, reference_image=ref.out("image"),
                   garment_mask=ref.out("mask"), target_image=tgt.out("image"), target_mask=tgt.out("mask"))
    warp = wf.wire(wf.add("MaX4ZeroMLSWarp", "registration"), reference_image=ref.out("image"),
                   garment_mask=ref.out("mask"), target_image=tgt.out("image"), matches=corr.out("matches"))
    if previews:
        preview(wf, corr.out("preview"), "registration")
        preview(wf, warp.out("preview"), "registration")
    dm = wf.wire(wf.add("MaX4ZeroDoubleMaskInpaint", "stage1"), positive=pos, negative=neg, vae=vae_src,
                 target_image=tgt.out("image"), target_mask=tgt.out("mask"),
                 warped_image=warp.out("warped_image"), warped_mask=warp.out("warped_mask"),
                 matches=corr.out("matches"))
    sampling = {k: plan[k] for k in ("steps", "cfg", "sampler_name", "scheduler")}
    s1 = wf.wire(wf.add("KSamplerAdvanced", "stage1", add_noise="enable", noise_seed=SEED, **sampling,
                        start_at_step=0, end_at_step=plan["split"], return_with_leftover_noise="enable"),
                 model=model_src, positive=dm.out("positive"), negative=dm.out("negative"),
                 latent_image=dm.out("latent"))
    if previews:
        preview(wf, dm.out("preview"), "stage1")
    # stage 2 (docs/method.md §3b): the inpaint mask becomes the whole (processed) target mask, over the composite
    ic = wf.wire(wf.add("InpaintModelConditioning", "stage2", noise_mask=True), positive=pos, negative=neg,
                 vae=vae_src, pixels=dm.out("composite"), mask=dm.out("target_mask"))
    mea_widgets = dict(plan["mea"])
    if layers:
        mea_widgets["layers"] = layers
    mea = wf.wire(wf.add("MaX4ZeroMaskedExtendedAttention", "stage2", **mea_widgets), model=model_src, vae=vae_src,
                  reference=ref.out("image"), garment_mask=ref.out("mask"), target_mask=dm.out("target_mask"),
                  positive=mea_pos)
    # The MEA phase denoises the WHOLE target latent (no blending for a 9-channel model): an all-ones noise mask
    # replaces the stage-1 mask. A target-region mask here would reset the outside to the stage-1 latent, which
    # still carries the noise of step 35, at every step; Paste Back restores the outside in pixels instead.
    whole = wf.add("SolidMask", "stage2", value=1.0, width=size, height=size)
    lat2 = wf.wire(wf.add("SetLatentNoiseMask", "stage2"), samples=s1, mask=whole)
    s2 = wf.wire(wf.add("KSamplerAdvanced", "stage2", add_noise="disable", noise_seed=SEED, **sampling,
                        start_at_step=plan["split"], end_at_step=plan["steps"], return_with_leftover_noise="disable"),
                 model=mea.out("model"), positive=ic.out("positive"), negative=ic.out("negative"),
                 latent_image=lat2)
    dec = wf.wire(wf.add("VAEDecode", "output"), samples=s2, vae=vae_src)
    return {"corr": corr, "warp": warp, "dm": dm, "s1": s1, "mea": mea, "s2": s2, "dec": dec}


def finish(wf: Workflow, person, tgt, dec_src, mask_src, prefix: str, group: str = "output"):
    paste = wf.wire(wf.add("MaX4ZeroPasteBack", group, feather=3), original_image=person, generated_image=dec_src,
                    crop_info=tgt.out("crop_info"), mask=mask_src)
    wf.wire(wf.add("SaveImage", group, box=(400, 450), filename_prefix=prefix), images=paste)
    return paste


COPY_INPUTS = "cp custom_nodes/max4zero-tryon/example_inputs/max4zero_*.png input/"
INPUTS_TEXT = (
    "Inputs: the sample pictures ship with the pack in example_inputs/ under the names loaded here. Copy them into "
    f"ComfyUI's input folder once (from the ComfyUI folder: {COPY_INPUTS}), or use each Load node's upload button.\n"
    f"- {PERSON}: the person photo; {PERSON_MASK}: white where the garment goes (LoadImageMask, channel red)\n"
    f"- {GARMENT}: the garment photo; {GARMENT_MASK}: white on the garment\n"
    "Your own masks: the workflow maxzero_masks_core makes all three (garment, try-on region, protect) with "
    "ComfyUI's own segmentation nodes (ComfyUI 0.33+); LoadImage's alpha (its MASK output) works too."
)
PROMPT_TEXT = (
    "Prompts: describe the GARMENT in the positive prompt (e.g. 'a person wearing a red knitted sweater'). Leave the "
    "negative prompt EMPTY, as the method does: in paper guidance the negative is the base of the MEA term, so "
    "anything written there (e.g. 'blurry') is pushed against about 27x (cfg 12 + s_mea 15) inside the mask."
)
STAGE2_TEXT = (
    "Stage 2 denoises the whole latent (SolidMask 1.0 -> Set Latent Noise Mask): the outside of the try-on region "
    "comes back from the original photo in Paste Back. Guidance 'paper' = three branches (eps_u + cfg*(eps_c - eps_u) "
    "+ s_mea*M*(eps_MEA - eps_u)); 'fused' is a different, cheaper guidance (see the MEA node's tooltip)."
)
SD15_TEXT = (
    f"Checkpoint: SD1.5 INPAINTING (9-channel UNet), {SD15} (4.3 GB) from "
    f"{MODEL_URLS[SD15][1]}, in ComfyUI/models/checkpoints/. Any SD1.5 inpainting fine-tune works: pick it "
    "in Load Checkpoint. Crop size 512."
)


# ------------------------------------------------------------------------------------------------
# the workflows
# ------------------------------------------------------------------------------------------------


def full_tryon() -> Workflow:
    wf = Workflow("maxzero_full_tryon", TWO_STAGE_GROUPS)
    wf.note("MaX4Zero full try-on (registration + Masked Extended Attention). Read left to right: the groups are "
            "the method's steps.\n\n" + SD15_TEXT + "\n\n" + INPUTS_TEXT + "\n\nSteps: 1 crop both photos around "
            "their masks -> 2 deep-feature correspondence -> MLS warp -> 3 double-mask inpaint -> KSampler "
            "(Advanced) steps 0-35 of 50 -> 4 Masked Extended Attention model -> KSampler (Advanced) steps 35-50 "
            "-> 5 decode -> paste back into the full photo. Previews show the matches, the warp, the fringes and "
            "the Leffa flow view.\n\n" + PROMPT_TEXT + "\n\n" + STAGE2_TEXT, box=(400, 760))
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SD15)
    pos, neg = prompts(wf, ckpt.out("CLIP"))
    tgt, ref = crops(wf, person, person_mask, garment, garment_mask, size=512)
    r = two_stage_tryon(wf, model_src=ckpt.out("MODEL"), vae_src=ckpt.out("VAE"), pos=pos, neg=neg, mea_pos=pos,
                        tgt=tgt, ref=ref, size=512)
    preview(wf, r["dm"].out("fringe"), "stage1", mask=True)
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), prefix="MaX4Zero_tryon")
    flow = wf.wire(wf.add("MaX4ZeroFlowView", "output"), trace=r["mea"].out("trace"), reference=ref.out("image"),
                   samples=r["s2"], matches=r["corr"].out("matches"))
    preview(wf, flow.out("flow"), "output")
    preview(wf, flow.out("warped_reference"), "output")
    preview(wf, flow.out("disagreement"), "output", mask=True)
    return wf


def reference_only(wf_name: str = "maxzero_reference_only", flow_view: bool = False) -> Workflow:
    if flow_view:
        groups = [("inputs", "1 · Inputs: model, prompts, photos, masks, crops", "inputs"),
                  ("registration", "2 · Registration (for the comparison only)", "registration"),
                  ("mea", "3 · Masked Extended Attention (one sampler)", "stage2"),
                  ("output", "4 · Output and Leffa flow view", "output")]
        intro = ("MaX4Zero attention flow: where does each generated pixel read the garment from? (Leffa "
                 "attention flow). The Masked Extended Attention node records attention only because its 'trace' "
                 "goes to the Leffa Flow View; each map is previewed: flow colour wheel, attention-warped "
                 "garment, reliance (how much each pixel reads the garment), sharpness, and the disagreement "
                 "with the MLS warp of the correspondence matches.")
    else:
        groups = [("inputs", "1 · Inputs: model, prompts, photos, masks, crops", "inputs"),
                  ("mea", "2 · Masked Extended Attention (one sampler, whole schedule)", "stage2"),
                  ("output", "3 · Output", "output")]
        intro = ("MaX4Zero reference try-on, quickest start: no correspondence and no warp. The target region "
                 "is inpainted in one sampler run while Masked Extended Attention (fused guidance, whole "
                 "schedule) lets it read the garment photo.")
    wf = Workflow(wf_name, groups)
    wf.note(intro + "\n\n" + SD15_TEXT + "\n\n" + INPUTS_TEXT, box=(400, 520))
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SD15)
    pos, neg = prompts(wf, ckpt.out("CLIP"))
    tgt, ref = crops(wf, person, person_mask, garment, garment_mask, size=512)
    corr = None
    if flow_view:
        corr = wf.wire(wf.add("MaX4ZeroCorrespondence", "registration", mode="paper", seed=SEED),
                       model=ckpt.out("MODEL"), vae=ckpt.out("VAE"), positive=pos, reference_image=ref.out("image"),
                       garment_mask=ref.out("mask"), target_image=tgt.out("image"), target_mask=tgt.out("mask"))
    ic = wf.wire(wf.add("InpaintModelConditioning", "mea", noise_mask=True), positive=pos, negative=neg,
                 vae=ckpt.out("VAE"), pixels=tgt.out("image"), mask=tgt.out("mask"))
    mea = wf.wire(wf.add("MaX4ZeroMaskedExtendedAttention", "mea", guidance="fused", start=0.0, end=1.0),
                  model=ckpt.out("MODEL"), vae=ckpt.out("VAE"), reference=ref.out("image"),
                  garment_mask=ref.out("mask"), target_mask=tgt.out("mask"), positive=pos)
    samp = wf.wire(wf.add("KSampler", "mea", seed=SEED, steps=30, cfg=7.0, sampler_name="ddim",
                          scheduler="ddim_uniform", denoise=1.0),
                   model=mea.out("model"), positive=ic.out("positive"), negative=ic.out("negative"),
                   latent_image=ic.out("latent"))
    dec = wf.wire(wf.add("VAEDecode", "output"), samples=samp, vae=ckpt.out("VAE"))
    if flow_view:
        finish(wf, person, tgt, dec, tgt.out("mask"), prefix="MaX4Zero_flow")
        flow = wf.wire(wf.add("MaX4ZeroFlowView", "output"), trace=mea.out("trace"), reference=ref.out("image"),
                       samples=samp, matches=corr.out("matches"))
        preview(wf, flow.out("flow"), "output")
        preview(wf, flow.out("warped_reference"), "output")
        preview(wf, flow.out("reliance"), "output", mask=True)
        preview(wf, flow.out("sharpness"), "output", mask=True)
        preview(wf, flow.out("disagreement"), "output", mask=True)
    else:
        finish(wf, person, tgt, dec, tgt.out("mask"), prefix="MaX4Zero_reference")
    return wf


def lora_controlnet() -> Workflow:
    wf = Workflow("maxzero_lora_controlnet", TWO_STAGE_GROUPS)
    wf.note("MaX4Zero try-on composed with a LoRA and a ControlNet on the same MODEL.\n\n" + SD15_TEXT
            + f"\nControlNet: SD1.5 OpenPose, {CONTROLNET} (723 MB) from {MODEL_URLS[CONTROLNET][1]}, in "
            "ComfyUI/models/controlnet/.\nLoRA: any SD1.5 LoRA of yours, in ComfyUI/models/loras/ (pick it in "
            f"Load LoRA; {LORA} is a stand-in name). The method needs no LoRA: to run without one, bypass the "
            "Load LoRA node (select it, Ctrl+B).\n\n" + INPUTS_TEXT
            + f"\n- {POSE}: the PREPROCESSED control image of the person photo (ships for the sample person: an "
            "OpenPose skeleton). For your own photo make it with a preprocessor pack (e.g. comfyui_controlnet_aux), "
            "same size as the photo. It is cropped with the person mask, exactly like the person photo.\n\n"
            + PROMPT_TEXT + "\n\n" + STAGE2_TEXT, box=(400, 900))
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SD15)
    pose = wf.add("LoadImage", "inputs", box=IMG, image=POSE)
    lora = wf.wire(wf.add("LoraLoader", "inputs", lora_name=LORA, strength_model=0.8, strength_clip=0.8),
                   model=ckpt.out("MODEL"), clip=ckpt.out("CLIP"))
    text_pos, text_neg = prompts(wf, lora.out("CLIP"))
    tgt, ref = crops(wf, person, person_mask, garment, garment_mask, size=512)
    pose_crop = wf.wire(wf.add("MaX4ZeroCropToMask", "inputs", size=512, padding=0.1), image=pose, mask=person_mask)
    cn = wf.add("ControlNetLoader", "inputs", control_net_name=CONTROLNET)
    cna = wf.wire(wf.add("ControlNetApplyAdvanced", "inputs", strength=0.8, start_percent=0.0, end_percent=1.0),
                  positive=text_pos, negative=text_neg, control_net=cn, image=pose_crop.out("image"),
                  vae=ckpt.out("VAE"))
    r = two_stage_tryon(wf, model_src=lora.out("MODEL"), vae_src=ckpt.out("VAE"), pos=cna.out("positive"),
                        neg=cna.out("negative"), mea_pos=text_pos, tgt=tgt, ref=ref, size=512)
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), prefix="MaX4Zero_lora_controlnet")
    return wf


def sdxl() -> Workflow:
    wf = Workflow("maxzero_sdxl", TWO_STAGE_GROUPS)
    wf.note("MaX4Zero full try-on on an SDXL INPAINTING checkpoint.\n\nCheckpoint: SDXL inpainting (9-channel "
            f"UNet), {SDXL} (6.9 GB; the diffusers team's stable-diffusion-xl-1.0-inpainting-0.1 as one file) from "
            f"{MODEL_URLS[SDXL][1]}, in ComfyUI/models/checkpoints/. Crop size 1024 (SDXL's native size).\n\n"
            "Layers are chosen by token grid, not by block number: SDXL has no attention at 1/8 of the image, so "
            "Masked Extended Attention uses 'decoder 1/32 + 1/16 + 1/8', i.e. SDXL's 32x32 and 64x64 token grids "
            "at 1024 px - the same grids the paper uses on SD1.5 at 512 px. The correspondence reads the first "
            "decoder stage at 1/16 by grid too.\n\n" + INPUTS_TEXT + "\n\n" + PROMPT_TEXT + "\n\n" + STAGE2_TEXT,
            box=(400, 860))
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SDXL)
    pos, neg = prompts(wf, ckpt.out("CLIP"))
    tgt, ref = crops(wf, person, person_mask, garment, garment_mask, size=1024)
    r = two_stage_tryon(wf, model_src=ckpt.out("MODEL"), vae_src=ckpt.out("VAE"), pos=pos, neg=neg, mea_pos=pos,
                        tgt=tgt, ref=ref, size=1024, layers="decoder 1/32 + 1/16 + 1/8")
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), prefix="MaX4Zero_sdxl")
    return wf


# The masks workflow's model files (ComfyUI's own blueprints name the same files and addresses).
SAM3 = "sam3.1_multiplex_fp16.safetensors"
BIREFNET = "birefnet.safetensors"
MODEL_URLS.update({
    SAM3: ("checkpoints", "https://huggingface.co/Comfy-Org/sam3.1/resolve/main/checkpoints/" + SAM3),
    BIREFNET: ("background_removal", "https://huggingface.co/Comfy-Org/BiRefNet/resolve/main/background_removal/"
                                     + BIREFNET),
})
#: Workflows that need node types only newer ComfyUI versions have: name -> oldest version that has them.
MIN_COMFYUI = {"maxzero_masks_core": "0.33.0"}


def masks_core() -> Workflow:
    """The three masks the try-on needs, with ComfyUI's own segmentation nodes only (ComfyUI 0.33+)."""
    wf = Workflow("maxzero_masks_core", [
        ("inputs", "1 · Inputs: photos, segmentation models, what to find", "inputs"),
        ("garment", "2 · Garment mask (garment photo): background removal", "masks"),
        ("tryon", "3 · Try-on mask (person photo): SAM3, the garment she wears", "masks"),
        ("protect", "4 · Protect mask (person photo): SAM3, face + hands", "masks"),
    ])
    wf.note(
        "The three masks of a try-on, made with ComfyUI's own segmentation nodes (no other pack; ComfyUI 0.33 or "
        "newer): the GARMENT mask (white on the garment in the garment photo), the TRY-ON mask (white where the "
        "new garment goes on the person: the clothes she wears now) and the PROTECT mask (face and hands, which "
        "must not be repainted; connect it to Double-Mask Inpaint's protect_mask).\n\n"
        "Model files (the same ComfyUI's own templates use):\n"
        f"- {SAM3} (SAM 3.1, text-prompted segmentation) from {MODEL_URLS[SAM3][1]}, in "
        "ComfyUI/models/checkpoints/ (load it with Load Checkpoint: its CLIP encodes the text prompts).\n"
        f"- {BIREFNET} (BiRefNet background removal) from {MODEL_URLS[BIREFNET][1]}, in "
        "ComfyUI/models/background_removal/.\n"
        "This workflow cannot run without those two files (about 1.7 GB together).\n\n"
        "What to find: the garment photo is a product shot, so its mask is its foreground (Remove Background). On "
        "the person, SAM3 finds what the text prompt names: type the garment she wears now ('space suit' for the "
        "sample; e.g. 'shirt', 'jacket', 'dress'), and 'face' and 'hand' for the protect mask. Raise SAM3's "
        "threshold if it finds too much, lower it if it finds nothing.\n\n"
        f"Inputs: {PERSON} and {GARMENT} (copy example_inputs/ into ComfyUI/input/ once: {COPY_INPUTS}).\n\n"
        "Results: Save Image writes ComfyUI/output/max4zero_person_mask_00001_.png and so on. Copy each into "
        "ComfyUI/input/ under the name the try-on workflows load (max4zero_person_mask.png, "
        "max4zero_garment_mask.png), or upload it in their Load Image (as Mask) nodes.", box=(400, 900))
    person = wf.add("LoadImage", "inputs", box=IMG, image=PERSON)
    garment = wf.add("LoadImage", "inputs", box=IMG, image=GARMENT)
    sam = wf.add("CheckpointLoaderSimple", "inputs", ckpt_name=SAM3)
    bg = wf.add("LoadBackgroundRemovalModel", "inputs", bg_removal_name=BIREFNET)
    worn = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(300, 100), text="space suit"), clip=sam.out("CLIP"))
    face = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(300, 100), text="face"), clip=sam.out("CLIP"))
    hand = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(300, 100), text="hand"), clip=sam.out("CLIP"))

    garment_mask = wf.wire(wf.add("RemoveBackground", "garment"), bg_removal_model=bg, image=garment)
    garment_img = wf.wire(wf.add("MaskToImage", "garment"), mask=garment_mask)
    wf.wire(wf.add("SaveImage", "garment", box=(320, 360), filename_prefix="max4zero_garment_mask"),
            images=garment_img)

    def detect(group: str, cond: Node) -> Node:
        return wf.wire(wf.add("SAM3_Detect", group, threshold=0.5, refine_iterations=2, individual_masks=False),
                       model=sam.out("MODEL"), image=person, conditioning=cond)

    tryon = detect("tryon", worn)
    tryon_img = wf.wire(wf.add("MaskToImage", "tryon"), mask=tryon.out("masks"))
    wf.wire(wf.add("SaveImage", "tryon", box=(320, 360), filename_prefix="max4zero_person_mask"), images=tryon_img)

    faces, hands = detect("protect", face), detect("protect", hand)
    both = wf.wire(wf.add("MaskComposite", "protect", x=0, y=0, operation="add"),
                   destination=faces.out("masks"), source=hands.out("masks"))
    protect_img = wf.wire(wf.add("MaskToImage", "protect"), mask=both)
    wf.wire(wf.add("SaveImage", "protect", box=(320, 360), filename_prefix="max4zero_protect_mask"),
            images=protect_img)
    return wf


# The Flux Fill try-on's model files (Black Forest Labs' FLUX.1 Fill [dev], gated: accept its licence first).
FLUX_FILL, FLUX_AE = "flux1-fill-dev.safetensors", "ae.safetensors"
CLIP_L, T5XXL = "clip_l.safetensors", "t5xxl_fp16.safetensors"
MODEL_URLS.update({
    FLUX_FILL: ("diffusion_models",
                "https://huggingface.co/black-forest-labs/FLUX.1-Fill-dev/resolve/main/" + FLUX_FILL),
    FLUX_AE: ("vae", "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/" + FLUX_AE),
    CLIP_L: ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/" + CLIP_L),
    T5XXL: ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/" + T5XXL),
})
# Paper guidance at cfg 1 (guidance-distilled): no text-CFG term for s_mea to weigh against; untuned, mid-range.
FLUX_S_MEA = 3.0
# Masked Extended Attention on Flux needs the attention hook of Flux blocks, which ComfyUI has from 0.33 on.
MIN_COMFYUI["maxzero_flux_fill_tryon"] = "0.33.0"


#: FLUX.1 Fill's schedule: euler 28 steps at cfg 1 (guidance-distilled), the paper's 70 % / 30 % split; the MEA
#: model only drives the stage-2 sampler, so its window is that sampler's whole run.
FLUX_PLAN = {"steps": 28, "split": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
             "mea": {"guidance": "paper", "s_mea": FLUX_S_MEA, "start": 0.0, "end": 1.0}}


def flux_fill_tryon() -> Workflow:
    """The whole method on FLUX.1 Fill: Correspondence on an SD1.5 inpainting UNet, the fringe phase and Masked
    Extended Attention on Flux, guidance-distilled paper mode."""
    wf = Workflow("maxzero_flux_fill_tryon", [
        ("inputs", "1 · Inputs: FLUX.1 Fill, text encoders, SD1.5 for matching, photos, masks, crops", "inputs"),
        ("registration", "2 · Registration on SD1.5: match, MLS warp", "registration"),
        ("stage1", f"3 · Stage 1 on Flux Fill: fringe inpainting (steps 0→{FLUX_PLAN['split']})", "stage1"),
        ("stage2", f"4 · Stage 2: Masked Extended Attention on Flux (steps {FLUX_PLAN['split']}→"
                   f"{FLUX_PLAN['steps']}, cfg 1)", "stage2"),
        ("output", "5 · Output", "output"),
    ])
    wf.note(
        "MaX4Zero try-on on FLUX.1 Fill [dev], Black Forest Labs' inpainting model (ComfyUI 0.33.0 or newer: Masked "
        "Extended Attention uses the attention hook of Flux blocks). Training-free, on your own Flux Fill "
        "checkpoint. Quality on Flux is untuned.\n\n"
        f"Model files:\n- {FLUX_FILL} (23.8 GB; gated: accept Black Forest Labs' licence on the page first) from "
        f"{MODEL_URLS[FLUX_FILL][1]}, in ComfyUI/models/diffusion_models/.\n"
        f"- {CLIP_L} from {MODEL_URLS[CLIP_L][1]} and {T5XXL} from {MODEL_URLS[T5XXL][1]}, in "
        "ComfyUI/models/text_encoders/. Less RAM: t5xxl_fp8_e4m3fn.safetensors (4.9 GB, same place, from "
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn.safetensors) "
        "works in its place: pick it in Load CLIP (Dual)'s clip_name2.\n"
        f"- {FLUX_AE} from {MODEL_URLS[FLUX_AE][1]}, in ComfyUI/models/vae/.\n"
        f"- For the matching only: {SD15} (4.3 GB) from {MODEL_URLS[SD15][1]}, in ComfyUI/models/checkpoints/. "
        "Correspondence reads the deep features of an SD UNet (any SD1.5 inpainting fine-tune, or mode 'dift' with "
        "any SD UNet); the nodes are separate, so the matches drive the Flux stages as they are.\n\n"
        + INPUTS_TEXT + "\n\n"
        f"Steps: 1 crop both photos around their masks (1024) -> 2 correspondence on SD1.5 -> MLS warp -> 3 double-"
        f"mask inpaint with the Flux VAE and prompt -> KSampler (Advanced) on Flux Fill, steps 0-{FLUX_PLAN['split']} "
        f"of {FLUX_PLAN['steps']} -> 4 Masked Extended Attention on the Flux model -> KSampler (Advanced) steps "
        f"{FLUX_PLAN['split']}-{FLUX_PLAN['steps']} (its window 0-1 = every step that sampler runs) -> 5 decode -> "
        "paste back.\n\n"
        "Guidance: FLUX.1 is guidance-distilled: the samplers run at cfg 1 and Flux Guidance (30 for Fill) sets "
        "the distilled guidance. 'paper' guidance then becomes eps_c + s_mea * M * (eps_MEA - eps_c). The node's "
        "default s_mea 15 was tuned for SD at cfg 12, where it weighs against 12 x the text direction; at cfg 1 "
        f"that would amplify the MEA difference 15 times, so this workflow uses s_mea {FLUX_S_MEA:g} (try 2-5; "
        "untuned). Blocks: 'flux_blocks' = vital (Stable Flow's vital layers of FLUX.1-dev), untuned on Fill. "
        "Slow? 'reference_every' 2 or 3 runs the reference pass every 2nd / 3rd step (about 2x -> 1.5x a plain "
        "step; an approximation of the paper). Describe the garment in both prompts.\n\n" + STAGE2_TEXT,
        box=(400, 980))
    unet = wf.add("UNETLoader", "inputs", unet_name=FLUX_FILL, weight_dtype="default")
    clip = wf.add("DualCLIPLoader", "inputs", clip_name1=CLIP_L, clip_name2=T5XXL, type="flux")
    vae = wf.add("VAELoader", "inputs", vae_name=FLUX_AE)
    sd, person, person_mask, garment, garment_mask = loaders(wf, SD15)
    text = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(400, 130), text=POSITIVE), clip=clip)
    pos = wf.wire(wf.add("FluxGuidance", "inputs", guidance=30.0), conditioning=text)
    neg = wf.wire(wf.add("ConditioningZeroOut", "inputs"), conditioning=text)
    sd_pos = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(400, 130), text=POSITIVE), clip=sd.out("CLIP"))
    tgt, ref = crops(wf, person, person_mask, garment, garment_mask, size=1024)
    r = two_stage_tryon(wf, model_src=unet, vae_src=vae, pos=pos, neg=neg, mea_pos=pos, tgt=tgt, ref=ref,
                        size=1024, plan=FLUX_PLAN, corr_src=(sd.out("MODEL"), sd.out("VAE"), sd_pos))
    preview(wf, r["dm"].out("fringe"), "stage1", mask=True)
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), prefix="MaX4Zero_flux_fill")
    return wf


# The FLUX.2 klein try-on's files (Black Forest Labs' FLUX.2 [klein] 4B, distilled, fp8; Apache 2.0) and its
# text encoder and VAE as ComfyUI's own klein templates load them.
KLEIN, QWEN3_4B, FLUX2_VAE = "flux-2-klein-4b-fp8.safetensors", "qwen_3_4b.safetensors", "flux2-vae.safetensors"
MODEL_URLS.update({
    KLEIN: ("diffusion_models", "https://huggingface.co/black-forest-labs/FLUX.2-klein-4b-fp8/resolve/main/" + KLEIN),
    QWEN3_4B: ("text_encoders",
               "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/" + QWEN3_4B),
    FLUX2_VAE: ("vae", "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/vae/" + FLUX2_VAE),
})
MIN_COMFYUI["maxzero_flux2_klein_tryon"] = "0.33.0"
#: klein 4B is step-distilled (4 steps at cfg 1 in ComfyUI's template); 10 euler steps keep the paper's 70 % / 30 %
#: split on whole steps. Untuned.
KLEIN_PLAN = {"steps": 10, "split": 7, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
              "mea": {"guidance": "paper", "s_mea": FLUX_S_MEA, "start": 0.0, "end": 1.0}}
STAGE1_NOISE_MASK_TEXT = (
    "Stage 1 without a Fill model: the warped garment is pasted into the person photo (Double-Mask Inpaint's "
    "composite) and only the fringe F is repainted through the LATENT's noise mask: the sampler keeps the latent "
    "outside F at every step, so the model sees the composite around the fringe and fills the seam. The model's "
    "mask and masked-image inputs that a Fill model reads are ignored by this model."
)


def flux2_klein_tryon() -> Workflow:
    """The whole method on FLUX.2 [klein] 4B: Correspondence on an SD1.5 inpainting UNet, stage 1 by noise mask on
    klein (no Fill model), Masked Extended Attention on klein, distilled paper mode."""
    wf = Workflow("maxzero_flux2_klein_tryon", [
        ("inputs", "1 · Inputs: FLUX.2 klein, Qwen3 text encoder, SD1.5 for matching, photos, masks, crops", "inputs"),
        ("registration", "2 · Registration on SD1.5: match, MLS warp", "registration"),
        ("stage1", f"3 · Stage 1 on klein: fringe inpainting by noise mask (steps 0→{KLEIN_PLAN['split']})",
         "stage1"),
        ("stage2", f"4 · Stage 2: Masked Extended Attention on klein (steps {KLEIN_PLAN['split']}→"
                   f"{KLEIN_PLAN['steps']}, cfg 1)", "stage2"),
        ("output", "5 · Output", "output"),
    ])
    wf.note(
        "MaX4Zero try-on on FLUX.2 [klein] 4B (ComfyUI 0.33.0 or newer: Masked Extended Attention uses the attention "
        "hook of Flux blocks). Training-free, on your own klein checkpoint; fits consumer GPUs. Quality on FLUX.2 "
        "is unknown: tested on random weights only.\n\n"
        f"Model files (the ones ComfyUI's own klein templates load):\n- {KLEIN} (Apache 2.0) from "
        f"{MODEL_URLS[KLEIN][1]}, in ComfyUI/models/diffusion_models/. klein 9B (flux-2-klein-9b-fp8) works too: "
        "pick it in Load Diffusion Model, with its qwen_3_8b text encoder.\n"
        f"- {QWEN3_4B} from {MODEL_URLS[QWEN3_4B][1]}, in ComfyUI/models/text_encoders/.\n"
        f"- {FLUX2_VAE} from {MODEL_URLS[FLUX2_VAE][1]}, in ComfyUI/models/vae/.\n"
        f"- For the matching only: {SD15} (4.3 GB) from {MODEL_URLS[SD15][1]}, in ComfyUI/models/checkpoints/. "
        "Correspondence reads the deep features of an SD UNet; the nodes are separate, so the matches drive the "
        "FLUX.2 stages as they are.\n\n"
        + INPUTS_TEXT + "\n\n"
        f"Steps: 1 crop both photos around their masks (1024) -> 2 correspondence on SD1.5 -> MLS warp -> 3 double-"
        f"mask inpaint with the FLUX.2 VAE and prompt -> KSampler (Advanced) on klein, steps 0-{KLEIN_PLAN['split']} "
        f"of {KLEIN_PLAN['steps']} -> 4 Masked Extended Attention on klein -> KSampler (Advanced) steps "
        f"{KLEIN_PLAN['split']}-{KLEIN_PLAN['steps']} (its window 0-1 = every step that sampler runs) -> 5 decode -> "
        "paste back.\n\n" + STAGE1_NOISE_MASK_TEXT + "\n\n"
        "Guidance: klein 4B is step-distilled: cfg 1, no negative pass. 'paper' guidance then becomes eps_c + s_mea * "
        f"M * (eps_MEA - eps_c), here with s_mea {FLUX_S_MEA:g} (try 2-5; untuned). Blocks: 'flux_blocks' = vital "
        "(on FLUX.2: FLUX.1's vital layers at the same relative depths, an untuned analogy; try 'all'). Describe the "
        "garment in the prompt.\n\n" + STAGE2_TEXT,
        box=(400, 980))
    unet = wf.add("UNETLoader", "inputs", unet_name=KLEIN, weight_dtype="default")
    clip = wf.add("CLIPLoader", "inputs", clip_name=QWEN3_4B, type="flux2", device="default")
    vae = wf.add("VAELoader", "inputs", vae_name=FLUX2_VAE)
    sd, person, person_mask, garment, garment_mask = loaders(wf, SD15)
    pos = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(400, 130), text=POSITIVE), clip=clip)
    neg = wf.wire(wf.add("ConditioningZeroOut", "inputs"), conditioning=pos)
    sd_pos = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(400, 130), text=POSITIVE), clip=sd.out("CLIP"))
    tgt, ref = crops(wf, person, person_mask, garment, garment_mask, size=1024)
    r = two_stage_tryon(wf, model_src=unet, vae_src=vae, pos=pos, neg=neg, mea_pos=pos, tgt=tgt, ref=ref,
                        size=1024, plan=KLEIN_PLAN, corr_src=(sd.out("MODEL"), sd.out("VAE"), sd_pos))
    preview(wf, r["dm"].out("fringe"), "stage1", mask=True)
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), prefix="MaX4Zero_flux2_klein")
    return wf


# The Qwen-Image-Edit try-on's files, as ComfyUI's own Qwen-Image-Edit 2511 template loads them.
QWEN_EDIT, QWEN_VL, QWEN_VAE = ("qwen_image_edit_2511_fp8mixed.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                "qwen_image_vae.safetensors")
MODEL_URLS.update({
    QWEN_EDIT: ("diffusion_models", "https://huggingface.co/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/"
                                    "split_files/diffusion_models/" + QWEN_EDIT),
    QWEN_VL: ("text_encoders", "https://huggingface.co/Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/"
                               "split_files/text_encoders/" + QWEN_VL),
    QWEN_VAE: ("vae", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/" + QWEN_VAE),
})
MIN_COMFYUI["maxzero_qwen_image_edit_tryon"] = "0.33.0"
#: Qwen-Image-Edit is not distilled: real CFG (ComfyUI's template: 40 steps at cfg 3, shift 3.1). s_mea scaled from
#: the paper's 15 at cfg 12 to cfg 3 (the same ratio): 4. Untuned.
QWEN_PLAN = {"steps": 40, "split": 28, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
             "mea": {"guidance": "paper", "s_mea": 4.0, "start": 0.0, "end": 1.0}}


def qwen_image_edit_tryon() -> Workflow:
    """The whole method on Qwen-Image-Edit: Correspondence on an SD1.5 inpainting UNet, stage 1 by noise mask, Masked
    Extended Attention on Qwen-Image-Edit with real CFG."""
    wf = Workflow("maxzero_qwen_image_edit_tryon", [
        ("inputs", "1 · Inputs: Qwen-Image-Edit, text encoder, SD1.5, photos, masks, crops", "inputs"),
        ("registration", "2 · Registration on SD1.5: match, MLS warp", "registration"),
        ("stage1", f"3 · Stage 1: fringe inpainting by noise mask (steps 0→{QWEN_PLAN['split']})", "stage1"),
        ("stage2", f"4 · Stage 2: Masked Extended Attention on Qwen-Image-Edit (steps {QWEN_PLAN['split']}→"
                   f"{QWEN_PLAN['steps']})", "stage2"),
        ("output", "5 · Output", "output"),
    ])
    wf.note(
        "MaX4Zero try-on on Qwen-Image-Edit 2511 (ComfyUI 0.33.0 or newer: Masked Extended Attention uses the "
        "attention hook of Qwen-Image's blocks). Training-free. Quality on Qwen-Image is unknown: tested on random "
        "weights only.\n\n"
        f"Model files (the ones ComfyUI's own Qwen-Image-Edit 2511 template loads):\n- {QWEN_EDIT} from "
        f"{MODEL_URLS[QWEN_EDIT][1]}, in ComfyUI/models/diffusion_models/ (Qwen-Image works the same way).\n"
        f"- {QWEN_VL} from {MODEL_URLS[QWEN_VL][1]}, in ComfyUI/models/text_encoders/.\n"
        f"- {QWEN_VAE} from {MODEL_URLS[QWEN_VAE][1]}, in ComfyUI/models/vae/.\n"
        f"- For the matching only: {SD15} (4.3 GB) from {MODEL_URLS[SD15][1]}, in ComfyUI/models/checkpoints/.\n\n"
        + INPUTS_TEXT + "\n\n"
        f"Steps: 1 crop both photos (1024) -> 2 correspondence on SD1.5 -> MLS warp -> 3 double-mask inpaint with the "
        f"Qwen VAE -> KSampler (Advanced) steps 0-{QWEN_PLAN['split']} of {QWEN_PLAN['steps']} -> 4 Masked Extended "
        f"Attention -> KSampler (Advanced) steps {QWEN_PLAN['split']}-{QWEN_PLAN['steps']} -> 5 decode -> paste "
        "back.\n\n" + STAGE1_NOISE_MASK_TEXT + "\n\n"
        "The prompt is text only (CLIP Text Encode with the Qwen text encoder): the person is in the latent, the "
        "garment comes from Masked Extended Attention's reference pass, which takes this text-only prompt. Do not "
        "connect edit conditioning that carries the person as vision tokens to the MEA node: its reference pass "
        "would read the person. Guidance: real CFG (cfg 3, shift 3.1 as ComfyUI's template); 'paper' adds s_mea * M * "
        "(eps_MEA - eps_u) with s_mea 4 (scaled from the paper's 15 at cfg 12; untuned).\n\n" + STAGE2_TEXT,
        box=(400, 980))
    unet = wf.add("UNETLoader", "inputs", unet_name=QWEN_EDIT, weight_dtype="default")
    model = wf.wire(wf.add("ModelSamplingAuraFlow", "inputs", shift=3.1), model=unet)
    clip = wf.add("CLIPLoader", "inputs", clip_name=QWEN_VL, type="qwen_image", device="default")
    vae = wf.add("VAELoader", "inputs", vae_name=QWEN_VAE)
    sd, person, person_mask, garment, garment_mask = loaders(wf, SD15)
    pos = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(400, 130), text=POSITIVE), clip=clip)
    neg = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(400, 130), text=NEGATIVE), clip=clip)
    sd_pos = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(400, 130), text=POSITIVE), clip=sd.out("CLIP"))
    tgt, ref = crops(wf, person, person_mask, garment, garment_mask, size=1024)
    r = two_stage_tryon(wf, model_src=model, vae_src=vae, pos=pos, neg=neg, mea_pos=pos, tgt=tgt, ref=ref,
                        size=1024, plan=QWEN_PLAN, corr_src=(sd.out("MODEL"), sd.out("VAE"), sd_pos))
    preview(wf, r["dm"].out("fringe"), "stage1", mask=True)
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), prefix="MaX4Zero_qwen_image_edit")
    return wf


def all_workflows() -> list[Workflow]:
    return [full_tryon(), reference_only(), reference_only("maxzero_attention_flow", flow_view=True),
            lora_controlnet(), sdxl(), masks_core(), flux_fill_tryon(), flux2_klein_tryon(), qwen_image_edit_tryon()]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for wf in all_workflows():
        missing = sorted({n.type for n in wf.nodes} - INFO_0364 - {"Note"})
        if missing and wf.name not in MIN_COMFYUI:
            raise SystemExit(f"{wf.name} uses {missing}, which ComfyUI 0.3.64 lacks: add it to MIN_COMFYUI")
        print("wrote", wf.write().relative_to(ROOT), f"({len(wf.nodes)} nodes, {len(wf.links)} links)")


if __name__ == "__main__":
    main()
