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
short and few of them crossing. A link that would cross a group it does not serve runs under the groups through
native reroutes (``extra.reroutes``). Each workflow opens at a saved view (``extra.ds``) where the Note and the first
group read. The file names (:func:`workflow_name`) read as titles in the template browser and sort quickest first;
size and steps are set in one place (:func:`controls`). ``tests/test_workflows.py`` checks all of this.
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
LANE_TOP, LANE_GAP = 60, 24  # the lanes of rerouted links under the groups: first lane's distance, spacing
# The saved view (extra.ds): the zoom and screen margin (CSS px) the workflow opens at. At 0.8 the Note's text and
# the first group's widgets read on a laptop screen; the rest of the graph is a scroll to the right.
VIEW_SCALE = 0.8
VIEW_MARGIN = (24, 64)  # left of the Note; above its title bar (under the frontend's tab bar)
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
        self.title: str | None = None  # only the size/steps controls carry a title of their own
        self.mode = 0  # 4 = bypassed (the frontend passes the inputs through to the outputs of the same type)
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

    def slot_names(self) -> list[str]:
        """Every input slot in the saved order: the sockets, then one per widget (a widget takes a link there)."""
        return self.socket_names() + [n for n, s, _ in self.inputs if is_widget(s) and s[0] != "IMAGEUPLOAD"]

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
        return self.add("MarkdownNote", "", box=box, text=text)

    def connect(self, src: tuple[Node, int], dst: Node, input_name: str) -> None:
        """A link into a socket, or into a widget's slot (the widget then takes its value from the link)."""
        node, slot = src
        if input_name not in dst.slot_names():
            raise ValueError(f"{dst.type} has no input {input_name!r}")
        if input_name in dst.links_in:
            raise ValueError(f"{dst.type}.{input_name} is already connected")
        link_id = len(self.links) + 1
        out_type = node.outputs[slot][1]
        spec = dict((n, s) for n, s, _ in dst.inputs)[input_name]
        if _spec_type(spec) != out_type and "*" not in (out_type, _spec_type(spec)):
            raise ValueError(f"{node.type}[{slot}] is {out_type}, {dst.type}.{input_name} wants {spec[0]}")
        to_slot = dst.slot_names().index(input_name)
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
        """Pairs of links that cross, each drawn straight from its output slot to its input slot. Links that skip a
        group are left out: they run under the groups (:meth:`_reroutes`), whatever the order in the columns."""
        by_id = {n.id: n for n in self.nodes}
        rank = {k: i for i, (k, _, _) in enumerate(self.group_defs)}
        segs = []
        for _, a, a_slot, b, b_slot, _ in self.links:
            if rank[by_id[b].group] - rank[by_id[a].group] >= 2:
                continue
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
                if i == 0:  # the first column keeps its order: the size/steps controls on top, by the Note
                    continue
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
                 "order": order[n.id], "mode": n.mode}
            if n.title:
                d["title"] = n.title
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
            elif n.title:  # a size/steps control: its own colour, so the one place to edit stands out
                d["properties"] = {"Node name for S&R": n.type}
                d["color"], d["bgcolor"] = "#232", "#353"
            else:
                d["properties"] = {"Node name for S&R": n.type}
                models = [{"name": v, "url": MODEL_URLS[v][1], "directory": MODEL_URLS[v][0]}
                          for v in n.widgets.values() if isinstance(v, str) and v in MODEL_URLS]
                if models:
                    d["properties"]["models"] = models
            d["widgets_values"] = n.widget_values()
            nodes.append(d)
        reroutes, extensions = self._reroutes(pos, groups)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "max4zero/" + self.name)),
            "revision": 0,
            "last_node_id": self._id,
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": groups,
            "config": {},
            "extra": {"ds": {"scale": VIEW_SCALE, "offset": [VIEW_MARGIN[0] / VIEW_SCALE,
                                                             VIEW_MARGIN[1] / VIEW_SCALE + TITLE_H]},
                      "reroutes": reroutes, "linkExtensions": extensions, "frontendVersion": FRONTEND_VERSION,
                      # web/saved_view.js: open at extra.ds from the template browser too (1.49 fits the graph)
                      "max4zero": {"opens_at_saved_view": True}},
            "version": 0.4,
        }

    def _reroutes(self, pos: dict[int, list[float]], groups: list[dict]) -> tuple[list[dict], list[dict]]:
        """Native reroutes (the frontend's link waypoints, no nodes) for every link that would cross a group it does
        not serve: such a link drops into the gap right of its source's group, runs along a lane under all the
        groups and rises in the gap left of its target's group. Links of one output share their lane and
        waypoints, as one wire that branches. Returns (extra.reroutes, extra.linkExtensions)."""
        by_id = {n.id: n for n in self.nodes}
        rank = {k: i for i, (k, _, _) in enumerate(self.group_defs)}
        bottom = max(g["bounding"][1] + g["bounding"][3] for g in groups)
        far: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (node, slot) -> [(link id, target group)]
        for lid, a, a_slot, b, _, _ in self.links:
            ga, gb = rank[by_id[a].group], rank[by_id[b].group]
            if gb - ga >= 2:
                far.setdefault((a, a_slot), []).append((lid, gb))
        reroutes: list[dict] = []
        extensions: list[dict] = []
        for lane, ((a, _), links) in enumerate(sorted(far.items(), key=lambda kv: (rank[by_id[kv[0][0]].group],
                                                                                   pos[kv[0][0]][1], kv[0][1]))):
            y = bottom + LANE_TOP + lane * LANE_GAP
            ga = rank[by_id[a].group]
            box = groups[ga]["bounding"]
            gaps = [(ga, box[0] + box[2] + GROUP_GAP / 2)]  # (group the gap follows, x)
            gaps += [(g - 1, groups[g]["bounding"][0] - GROUP_GAP / 2) for g in sorted({g for _, g in links})]
            ids: dict[int, int] = {}  # gap's group -> reroute id
            parent = None
            for g, x in gaps:
                if g in ids:
                    continue
                rid = len(reroutes) + 1
                through = [lid for lid, gb in links if gb > g]
                entry = {"id": rid, "pos": [x, y], "linkIds": through}
                if parent is not None:
                    entry["parentId"] = parent
                reroutes.append(entry)
                ids[g], parent = rid, rid
            for lid, gb in links:
                extensions.append({"id": lid, "parentId": ids[gb - 1]})
        return reroutes, sorted(extensions, key=lambda e: e["id"])

    def write(self) -> Path:
        path = OUT / f"{self.name}.json"
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


# ------------------------------------------------------------------------------------------------
# building blocks shared by the workflows
# ------------------------------------------------------------------------------------------------

IMG = (320, 330)  # LoadImage / preview nodes: room for the picture
PREVIEW = (300, 300)
NOTE_W = 480

# The shipped workflows: key -> (number, title). The template browser shows each file's name as its title and the
# files sort by name, so the number is the order a newcomer should try them in (quickest first), and every name
# carries the pack's name and "try-on" (the template search looks in the file name). A new workflow is one line here
# and its builder in BUILDERS.
WORKFLOW_TITLES = {
    "quick": (1, "Quick try-on"),
    "full": (2, "Full try-on"),
    "flow": (3, "Try-on attention flow"),
    "lora_controlnet": (4, "LoRA and ControlNet try-on"),
    "sdxl": (5, "SDXL try-on"),
    "masks": (6, "Try-on masks with SAM3"),
    "flux_fill": (7, "Flux Fill try-on"),
    "flux2_klein": (8, "FLUX.2 klein try-on"),
    "qwen_edit": (9, "Qwen-Image-Edit try-on"),
}


def workflow_name(key: str) -> str:
    """The file name (without .json) of a shipped workflow, e.g. ``MaX4Zero 1 - Quick try-on``."""
    number, title = WORKFLOW_TITLES[key]
    return f"MaX4Zero {number} - {title}"


# The one place for size and steps: ComfyUI's own Int primitive (PrimitiveInt, in every supported ComfyUI), titled
# for what it sets and wired into every widget that depends on it.
CONTROL_TITLES = {"size": "Working size", "steps": "Total steps", "split": "Stage 1 ends at step"}

# The groups of the try-on workflows, left → right in the order the data flows. The titles say what each group
# does; the numbers (steps, sizes) live in the widgets, so the titles never go stale.
TWO_STAGE_GROUPS = [
    ("inputs", "1 · Inputs: size and steps, model, prompts, photos, masks, crops", "inputs"),
    ("registration", "2 · Registration: match the garment to the person, warp it", "registration"),
    ("stage1", "3 · Stage 1: paint the seams around the warped garment", "stage1"),
    ("stage2", "4 · Stage 2: finish with Masked Extended Attention on the garment photo", "stage2"),
    ("output", "5 · Output: decode, paste back into the photo", "output"),
]


def controls(wf: Workflow, size: int | None = None, steps: int | None = None, split: int | None = None,
             group: str = "inputs") -> dict[str, Node]:
    """The size/steps controls (created right after the Note: the top of the first group)."""
    out = {}
    for key, value in (("size", size), ("steps", steps), ("split", split)):
        if value is not None:
            node = wf.add("PrimitiveInt", group, box=(260, 82), value=value)
            node.title = CONTROL_TITLES[key]
            out[key] = node
    return out


def follow(wf: Workflow, ctl: dict[str, Node], key: str, *targets: tuple[Node, str]) -> None:
    """Wire the control ``key`` into each (node, widget); the widget keeps the same value for a reader of the file."""
    for node, widget in targets:
        if node.widgets.get(widget, ctl[key].widgets["value"]) != ctl[key].widgets["value"]:
            raise ValueError(f"{node.type}.{widget} = {node.widgets[widget]} but {CONTROL_TITLES[key]} is "
                             f"{ctl[key].widgets['value']}")
        node.widgets[widget] = ctl[key].widgets["value"]
        wf.connect(ctl[key].out(0), node, widget)


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


def crops(wf: Workflow, ctl: dict[str, Node], person, person_mask, garment, garment_mask, group: str = "inputs"):
    size = ctl["size"].widgets["value"]
    tgt = wf.wire(wf.add("MaX4ZeroCropToMask", group, size=size, padding=0.1), image=person, mask=person_mask)
    ref = wf.wire(wf.add("MaX4ZeroCropToMask", group, size=size, padding=0.1), image=garment, mask=garment_mask)
    follow(wf, ctl, "size", (tgt, "size"), (ref, "size"))
    return tgt, ref


def preview(wf: Workflow, src, group: str, mask: bool = False):
    if mask:
        src = wf.wire(wf.add("MaskToImage", group), mask=src).out(0)
    return wf.wire(wf.add("PreviewImage", group, box=PREVIEW), images=src)


#: The paper's schedule (SD, eps): DDIM 50 steps at cfg 12, stage 1 = steps 0→35, MEA on every step of the stage-2
#: sampler (window 0→1 of that sampler's run: it follows "Stage 1 ends at step"; at 35 of 50 with ddim_uniform this
#: is the paper's window 0.7→1).
SD_PLAN = {"steps": 50, "split": 35, "cfg": 12.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
           "mea": {"guidance": "paper", "start": 0.0, "end": 1.0}}


def two_stage_tryon(wf: Workflow, ctl: dict[str, Node], *, model_src, vae_src, pos, neg, mea_pos, tgt, ref,
                    previews: bool = True, layers: str | None = None, plan: dict = SD_PLAN,
                    corr_src: tuple | None = None):
    """Correspondence → MLS warp → double mask → KSamplerAdvanced 0→split → MEA → KSamplerAdvanced split→steps →
    decode, in the groups registration / stage1 / stage2 / output. Returns the nodes the callers still need.

    ``ctl``: the size/steps controls (:func:`controls`), wired into the samplers and the stage-2 mask. ``plan``: the
    samplers' schedule and the MEA node's widgets (:data:`SD_PLAN`). ``corr_src``: (MODEL, VAE, positive)
    Correspondence reads features with, when that is another model than the one that samples (a Flux workflow's SD
    UNet); by default the sampling model's."""
    c_model, c_vae, c_pos = corr_src or (model_src, vae_src, pos)
    size = ctl["size"].widgets["value"]
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
    follow(wf, ctl, "size", (whole, "width"), (whole, "height"))
    follow(wf, ctl, "steps", (s1, "steps"), (s2, "steps"), (s2, "end_at_step"))
    follow(wf, ctl, "split", (s1, "end_at_step"), (s2, "start_at_step"))
    dec = wf.wire(wf.add("VAEDecode", "output"), samples=s2, vae=vae_src)
    return {"corr": corr, "warp": warp, "dm": dm, "s1": s1, "mea": mea, "s2": s2, "dec": dec}


def finish(wf: Workflow, person, tgt, dec_src, mask_src, prefix: str, group: str = "output"):
    paste = wf.wire(wf.add("MaX4ZeroPasteBack", group, feather=3), original_image=person, generated_image=dec_src,
                    crop_info=tgt.out("crop_info"), mask=mask_src)
    wf.wire(wf.add("SaveImage", group, box=(400, 450), filename_prefix=prefix), images=paste)
    return paste


COPY_INPUTS = "cp custom_nodes/max4zero-tryon/example_inputs/max4zero_*.png input/"
#: The one mask convention (README "Masks", the demo and the nodes say the same).
MASK_TEXT = (
    "**Masks: white = on** (the garment in its photo; the region to repaint on the person). This workflow loads "
    "white-on-black mask files with *Load Image (as Mask)*, channel red. Quickest way to paint one: right-click a "
    "*Load Image* node → **Open in MaskEditor**, paint the garment, save; that node's MASK output is the painted "
    "area. A cut-out PNG (garment opaque, background transparent) gives the opposite through Load Image's MASK "
    "(ComfyUI's MASK = 1 − alpha): add an *Invert Mask* node. The nodes warn when a mask looks inverted."
)
INPUTS_TEXT = (
    "### Inputs\n"
    "The sample pictures ship with the pack in `example_inputs/` under the names loaded here. Copy them into "
    f"ComfyUI's input folder once (from the ComfyUI folder: `{COPY_INPUTS}`), or use each Load node's upload button.\n\n"
    f"- `{PERSON}`: the person photo; `{PERSON_MASK}`: white where the garment goes\n"
    f"- `{GARMENT}`: the garment photo; `{GARMENT_MASK}`: white on the garment\n\n"
    + MASK_TEXT + f" The workflow *{{masks}}* makes all three masks (garment, try-on region, protect) with ComfyUI's "
    "own segmentation nodes (ComfyUI 0.33+)."
)
PROMPT_TEXT = (
    "### Prompts\n"
    "Describe the GARMENT in the positive prompt (e.g. 'a person wearing a red knitted sweater'). Leave the "
    "negative prompt EMPTY, as the method does: in paper guidance the negative is the base of the MEA term, so "
    "anything written there (e.g. 'blurry') is pushed against about 27x (cfg 12 + s_mea 15) inside the mask."
)
STAGE2_TEXT = (
    "Stage 2 denoises the whole latent (SolidMask 1.0 → Set Latent Noise Mask): the outside of the try-on region "
    "comes back from the original photo in Paste Back. Guidance 'paper' = three branches (eps_u + cfg·(eps_c − eps_u) "
    "+ s_mea·M·(eps_MEA − eps_u)); 'fused' is a different, cheaper guidance (see the MEA node's tooltip)."
)
SD15_TEXT = (
    "### Model\n"
    f"SD1.5 INPAINTING checkpoint (9-channel UNet), `{SD15}` (4.3 GB) from "
    f"{MODEL_URLS[SD15][1]}, in `ComfyUI/models/checkpoints/`. Any SD1.5 inpainting fine-tune works: pick it "
    "in Load Checkpoint."
)


def size_steps_text(size: int, steps: int, split: int | None, slow: str = "") -> str:
    """The Note's paragraph about the one place for size and steps."""
    text = (f"### Size and steps: the green nodes at the top of group 1\n"
            f"**{CONTROL_TITLES['size']}** ({size} px: the square both photos are cropped to) and "
            f"**{CONTROL_TITLES['steps']}** ({steps})")
    if split is not None:
        text += (f" and **{CONTROL_TITLES['split']}** ({split}: stage 2 runs the rest, with Masked Extended "
                 f"Attention on every one of its steps; keep it near 70 % of the total)")
    text += (" feed every widget that depends on them (crops, samplers, the stage-2 mask): change them there only. "
             "Too slow? Lower the total steps first (halve both numbers), then the size (a multiple of 64)." + slow)
    return text


def text(template: str) -> str:
    """Fill in the names of the other workflows (``{masks}`` ...)."""
    return template.format(**{k: workflow_name(k) for k in WORKFLOW_TITLES})


# ------------------------------------------------------------------------------------------------
# the workflows
# ------------------------------------------------------------------------------------------------


def full_tryon() -> Workflow:
    wf = Workflow(workflow_name("full"), TWO_STAGE_GROUPS)
    wf.note(text(
        "## MaX4Zero full try-on\nRegistration + Masked Extended Attention, the whole method on SD1.5. Read left to "
        "right: the groups are the method's steps. Press **Run** (Queue) once the files below are in place.\n\n"
        + size_steps_text(512, SD_PLAN["steps"], SD_PLAN["split"]) + "\n\n" + SD15_TEXT + "\n\n" + INPUTS_TEXT
        + "\n\n### Steps\n1 crop both photos around their masks → 2 deep-feature correspondence → MLS warp → 3 "
        "double-mask inpaint → KSampler (Advanced) up to *Stage 1 ends at step* → 4 Masked Extended Attention model "
        "→ KSampler (Advanced) to the end → 5 decode → paste back into the full photo. Previews show the matches, "
        "the warp, the seams and the Leffa flow view.\n\n" + PROMPT_TEXT + "\n\n" + STAGE2_TEXT), box=(NOTE_W, 1000))
    ctl = controls(wf, size=512, steps=SD_PLAN["steps"], split=SD_PLAN["split"])
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SD15)
    pos, neg = prompts(wf, ckpt.out("CLIP"))
    tgt, ref = crops(wf, ctl, person, person_mask, garment, garment_mask)
    r = two_stage_tryon(wf, ctl, model_src=ckpt.out("MODEL"), vae_src=ckpt.out("VAE"), pos=pos, neg=neg,
                        mea_pos=pos, tgt=tgt, ref=ref)
    preview(wf, r["dm"].out("fringe"), "stage1", mask=True)
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), prefix="MaX4Zero_tryon")
    flow = wf.wire(wf.add("MaX4ZeroFlowView", "output"), trace=r["mea"].out("trace"), reference=ref.out("image"),
                   samples=r["s2"], matches=r["corr"].out("matches"))
    preview(wf, flow.out("flow"), "output")
    preview(wf, flow.out("warped_reference"), "output")
    preview(wf, flow.out("disagreement"), "output", mask=True)
    return wf


#: The one-sampler schedule of the quick try-on and the attention flow.
QUICK_STEPS = 30


def reference_only(key: str = "quick", flow_view: bool = False) -> Workflow:
    if flow_view:
        groups = [("inputs", "1 · Inputs: size and steps, model, prompts, photos, masks, crops", "inputs"),
                  ("registration", "2 · Registration: the matches to compare the attention with", "registration"),
                  ("mea", "3 · Try-on: one sampler with Masked Extended Attention", "stage2"),
                  ("output", "4 · Output and the Leffa flow view: where each pixel reads the garment", "output")]
        intro = ("## MaX4Zero try-on attention flow\nWhere does each generated pixel read the garment from? (Leffa "
                 "attention flow). The Masked Extended Attention node records attention only because its 'trace' "
                 "goes to the Leffa Flow View; each map is previewed: flow colour wheel, attention-warped "
                 "garment, reliance (how much each pixel reads the garment), sharpness, and the disagreement "
                 "with the MLS warp of the correspondence matches.")
    else:
        groups = [("inputs", "1 · Inputs: size and steps, model, prompts, photos, masks, crops", "inputs"),
                  ("mea", "2 · Try-on: one sampler with Masked Extended Attention", "stage2"),
                  ("output", "3 · Output: decode, paste back into the photo", "output")]
        intro = ("## MaX4Zero quick try-on\nThe quickest start: no correspondence and no warp. The target region "
                 "is inpainted in one sampler run while Masked Extended Attention (fused guidance, every step) lets "
                 "it read the garment photo. Press **Run** (Queue) once the files below are in place.")
    wf = Workflow(workflow_name(key), groups)
    wf.note(text(intro + "\n\n" + size_steps_text(512, QUICK_STEPS, None) + "\n\n" + SD15_TEXT + "\n\n"
                 + INPUTS_TEXT), box=(NOTE_W, 760))
    ctl = controls(wf, size=512, steps=QUICK_STEPS)
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SD15)
    pos, neg = prompts(wf, ckpt.out("CLIP"))
    tgt, ref = crops(wf, ctl, person, person_mask, garment, garment_mask)
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
    samp = wf.wire(wf.add("KSampler", "mea", seed=SEED, steps=QUICK_STEPS, cfg=7.0, sampler_name="ddim",
                          scheduler="ddim_uniform", denoise=1.0),
                   model=mea.out("model"), positive=ic.out("positive"), negative=ic.out("negative"),
                   latent_image=ic.out("latent"))
    follow(wf, ctl, "steps", (samp, "steps"))
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
    wf = Workflow(workflow_name("lora_controlnet"), TWO_STAGE_GROUPS)
    wf.note(text(
        "## MaX4Zero try-on with a LoRA and a ControlNet\nBoth act on the same MODEL as Masked Extended Attention.\n\n"
        + size_steps_text(512, SD_PLAN["steps"], SD_PLAN["split"]) + "\n\n" + SD15_TEXT + "\n\n"
        + f"### ControlNet\nSD1.5 OpenPose, `{CONTROLNET}` (723 MB) from {MODEL_URLS[CONTROLNET][1]}, in "
        "`ComfyUI/models/controlnet/`.\n\n"
        "### LoRA (off until you pick one)\nThe **Load LoRA** node ships BYPASSED (purple): the workflow runs "
        f"without it. To use a LoRA: put any SD1.5 LoRA of yours in `ComfyUI/models/loras/`, pick it in Load LoRA "
        f"(`{LORA}` is a stand-in name), then select the node and press **Ctrl+B** (or right-click → Bypass) to "
        "turn it on. The method needs no LoRA.\n\n" + INPUTS_TEXT
        + f"\n- `{POSE}`: the PREPROCESSED control image of the person photo (ships for the sample person: an "
        "OpenPose skeleton). For your own photo make it with a preprocessor pack (e.g. comfyui_controlnet_aux), "
        "same size as the photo. It is cropped with the person mask, exactly like the person photo.\n\n"
        + PROMPT_TEXT + "\n\n" + STAGE2_TEXT), box=(NOTE_W, 1180))
    ctl = controls(wf, size=512, steps=SD_PLAN["steps"], split=SD_PLAN["split"])
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SD15)
    pose = wf.add("LoadImage", "inputs", box=IMG, image=POSE)
    lora = wf.wire(wf.add("LoraLoader", "inputs", lora_name=LORA, strength_model=0.8, strength_clip=0.8),
                   model=ckpt.out("MODEL"), clip=ckpt.out("CLIP"))
    lora.mode = 4  # bypassed: the stand-in file name would block Run; the Note says how to turn it on
    text_pos, text_neg = prompts(wf, lora.out("CLIP"))
    tgt, ref = crops(wf, ctl, person, person_mask, garment, garment_mask)
    pose_crop = wf.wire(wf.add("MaX4ZeroCropToMask", "inputs", size=512, padding=0.1), image=pose, mask=person_mask)
    follow(wf, ctl, "size", (pose_crop, "size"))
    cn = wf.add("ControlNetLoader", "inputs", control_net_name=CONTROLNET)
    cna = wf.wire(wf.add("ControlNetApplyAdvanced", "inputs", strength=0.8, start_percent=0.0, end_percent=1.0),
                  positive=text_pos, negative=text_neg, control_net=cn, image=pose_crop.out("image"),
                  vae=ckpt.out("VAE"))
    r = two_stage_tryon(wf, ctl, model_src=lora.out("MODEL"), vae_src=ckpt.out("VAE"), pos=cna.out("positive"),
                        neg=cna.out("negative"), mea_pos=text_pos, tgt=tgt, ref=ref)
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), prefix="MaX4Zero_lora_controlnet")
    return wf


def sdxl() -> Workflow:
    wf = Workflow(workflow_name("sdxl"), TWO_STAGE_GROUPS)
    wf.note(text(
        "## MaX4Zero try-on on SDXL\nThe full try-on on an SDXL INPAINTING checkpoint.\n\n"
        + size_steps_text(1024, SD_PLAN["steps"], SD_PLAN["split"], " SDXL's native size is 1024.") + "\n\n"
        f"### Model\nSDXL inpainting (9-channel UNet), `{SDXL}` (6.9 GB; the diffusers team's "
        f"stable-diffusion-xl-1.0-inpainting-0.1 as one file) from {MODEL_URLS[SDXL][1]}, in "
        "`ComfyUI/models/checkpoints/`.\n\n"
        "Layers are chosen by token grid, not by block number: SDXL has no attention at 1/8 of the image, so "
        "Masked Extended Attention uses 'decoder 1/32 + 1/16 + 1/8', i.e. SDXL's 32x32 and 64x64 token grids "
        "at 1024 px - the same grids the paper uses on SD1.5 at 512 px. The correspondence reads the first "
        "decoder stage at 1/16 by grid too.\n\n" + INPUTS_TEXT + "\n\n" + PROMPT_TEXT + "\n\n" + STAGE2_TEXT),
        box=(NOTE_W, 1100))
    ctl = controls(wf, size=1024, steps=SD_PLAN["steps"], split=SD_PLAN["split"])
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SDXL)
    pos, neg = prompts(wf, ckpt.out("CLIP"))
    tgt, ref = crops(wf, ctl, person, person_mask, garment, garment_mask)
    r = two_stage_tryon(wf, ctl, model_src=ckpt.out("MODEL"), vae_src=ckpt.out("VAE"), pos=pos, neg=neg,
                        mea_pos=pos, tgt=tgt, ref=ref, layers="decoder 1/32 + 1/16 + 1/8")
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
MIN_COMFYUI = {workflow_name("masks"): "0.33.0"}


def masks_core() -> Workflow:
    """The three masks the try-on needs, with ComfyUI's own segmentation nodes only (ComfyUI 0.33+)."""
    wf = Workflow(workflow_name("masks"), [
        ("inputs", "1 · Inputs: photos, segmentation models, what to find", "inputs"),
        ("garment", "2 · Garment mask (garment photo): background removal", "masks"),
        ("tryon", "3 · Try-on mask (person photo): SAM3 finds the garment she wears", "masks"),
        ("protect", "4 · Protect mask (person photo): SAM3 finds face and hands", "masks"),
    ])
    wf.note(text(
        "## MaX4Zero try-on masks\nThe three masks of a try-on, made with ComfyUI's own segmentation nodes (no "
        "other pack; ComfyUI 0.33 or newer): the GARMENT mask (white on the garment in the garment photo), the "
        "TRY-ON mask (white where the new garment goes on the person: the clothes she wears now) and the PROTECT "
        "mask (face and hands, which must not be repainted; connect it to Double-Mask Inpaint's protect_mask).\n\n"
        "### Model files (the same ComfyUI's own templates use)\n"
        f"- `{SAM3}` (SAM 3.1, text-prompted segmentation) from {MODEL_URLS[SAM3][1]}, in "
        "`ComfyUI/models/checkpoints/` (load it with Load Checkpoint: its CLIP encodes the text prompts).\n"
        f"- `{BIREFNET}` (BiRefNet background removal) from {MODEL_URLS[BIREFNET][1]}, in "
        "`ComfyUI/models/background_removal/`.\n\n"
        "This workflow cannot run without those two files (about 1.7 GB together).\n\n"
        "### What to find\nThe garment photo is a product shot, so its mask is its foreground (Remove Background). "
        "On the person, SAM3 finds what the text prompt names: type the garment she wears now ('space suit' for the "
        "sample; e.g. 'shirt', 'jacket', 'dress'), and 'face' and 'hand' for the protect mask. Raise SAM3's "
        "threshold if it finds too much, lower it if it finds nothing. Or paint a mask by hand: " + MASK_TEXT
        + f"\n\n### Inputs\n`{PERSON}` and `{GARMENT}` (copy `example_inputs/` into ComfyUI/input/ once: "
        f"`{COPY_INPUTS}`).\n\n"
        "### Results\nSave Image writes ComfyUI/output/max4zero_person_mask_00001_.png and so on (white = on). Copy "
        "each into ComfyUI/input/ under the name the try-on workflows load (max4zero_person_mask.png, "
        "max4zero_garment_mask.png), or upload it in their Load Image (as Mask) nodes."), box=(NOTE_W, 1000))
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
MIN_COMFYUI[workflow_name("flux_fill")] = "0.33.0"


#: FLUX.1 Fill's schedule: euler 28 steps at cfg 1 (guidance-distilled), the paper's 70 % / 30 % split; the MEA
#: model only drives the stage-2 sampler, so its window is that sampler's whole run.
FLUX_PLAN = {"steps": 28, "split": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
             "mea": {"guidance": "paper", "s_mea": FLUX_S_MEA, "start": 0.0, "end": 1.0}}


def flux_fill_tryon() -> Workflow:
    """The whole method on FLUX.1 Fill: Correspondence on an SD1.5 inpainting UNet, the fringe phase and Masked
    Extended Attention on Flux, guidance-distilled paper mode."""
    wf = Workflow(workflow_name("flux_fill"), [
        ("inputs", "1 · Inputs: size and steps, FLUX.1 Fill, text encoders, SD1.5 for matching, photos, masks",
         "inputs"),
        ("registration", "2 · Registration on SD1.5: match the garment to the person, warp it", "registration"),
        ("stage1", "3 · Stage 1 on Flux Fill: paint the seams around the warped garment", "stage1"),
        ("stage2", "4 · Stage 2: finish with Masked Extended Attention on Flux", "stage2"),
        ("output", "5 · Output: decode, paste back into the photo", "output"),
    ])
    wf.note(text(
        "## MaX4Zero try-on on FLUX.1 Fill [dev]\nBlack Forest Labs' inpainting model (ComfyUI 0.33.0 or newer: "
        "Masked Extended Attention uses the attention hook of Flux blocks). Training-free, on your own Flux Fill "
        "checkpoint. Quality on Flux is untuned.\n\n"
        + size_steps_text(1024, FLUX_PLAN["steps"], FLUX_PLAN["split"]) + "\n\n"
        f"### Model files\n- `{FLUX_FILL}` (23.8 GB; gated: accept Black Forest Labs' licence on the page first) "
        f"from {MODEL_URLS[FLUX_FILL][1]}, in `ComfyUI/models/diffusion_models/`.\n"
        f"- `{CLIP_L}` from {MODEL_URLS[CLIP_L][1]} and `{T5XXL}` from {MODEL_URLS[T5XXL][1]}, in "
        "`ComfyUI/models/text_encoders/`. Less RAM: t5xxl_fp8_e4m3fn.safetensors (4.9 GB, same place, from "
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn.safetensors) "
        "works in its place: pick it in Load CLIP (Dual)'s clip_name2.\n"
        f"- `{FLUX_AE}` from {MODEL_URLS[FLUX_AE][1]}, in `ComfyUI/models/vae/`.\n"
        f"- For the matching only: `{SD15}` (4.3 GB) from {MODEL_URLS[SD15][1]}, in `ComfyUI/models/checkpoints/`. "
        "Correspondence reads the deep features of an SD UNet (any SD1.5 inpainting fine-tune, or mode 'dift' with "
        "any SD UNet); the nodes are separate, so the matches drive the Flux stages as they are.\n\n"
        + INPUTS_TEXT + "\n\n"
        "### Steps\n1 crop both photos around their masks → 2 correspondence on SD1.5 → MLS warp → 3 double-"
        "mask inpaint with the Flux VAE and prompt → KSampler (Advanced) on Flux Fill up to *Stage 1 ends at step* "
        "→ 4 Masked Extended Attention on the Flux model → KSampler (Advanced) to the end (its window 0-1 = every "
        "step that sampler runs) → 5 decode → paste back.\n\n"
        "### Guidance\nFLUX.1 is guidance-distilled: the samplers run at cfg 1 and Flux Guidance (30 for Fill) sets "
        "the distilled guidance. 'paper' guidance then becomes eps_c + s_mea·M·(eps_MEA − eps_c). The node's "
        "default s_mea 15 was tuned for SD at cfg 12, where it weighs against 12 x the text direction; at cfg 1 "
        f"that would amplify the MEA difference 15 times, so this workflow uses s_mea {FLUX_S_MEA:g} (try 2-5; "
        "untuned). Blocks: 'flux_blocks' = vital (Stable Flow's vital layers of FLUX.1-dev), untuned on Fill. "
        "Slow? 'reference_every' 2 or 3 runs the reference pass every 2nd / 3rd step (about 2x → 1.5x a plain "
        "step; an approximation of the paper). Describe the garment in both prompts.\n\n" + STAGE2_TEXT),
        box=(NOTE_W, 1300))
    ctl = controls(wf, size=1024, steps=FLUX_PLAN["steps"], split=FLUX_PLAN["split"])
    unet = wf.add("UNETLoader", "inputs", unet_name=FLUX_FILL, weight_dtype="default")
    clip = wf.add("DualCLIPLoader", "inputs", clip_name1=CLIP_L, clip_name2=T5XXL, type="flux")
    vae = wf.add("VAELoader", "inputs", vae_name=FLUX_AE)
    photos = loaders(wf, SD15)
    prompt = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(400, 130), text=POSITIVE), clip=clip)
    pos = wf.wire(wf.add("FluxGuidance", "inputs", guidance=30.0), conditioning=prompt)
    neg = wf.wire(wf.add("ConditioningZeroOut", "inputs"), conditioning=prompt)
    dit_tryon(wf, ctl, photos, model_src=unet, vae_src=vae, pos=pos, neg=neg, plan=FLUX_PLAN,
              prefix="MaX4Zero_flux_fill")
    return wf


def dit_tryon(wf: Workflow, ctl: dict[str, Node], photos: tuple, *, model_src, vae_src, pos, neg, plan: dict,
              prefix: str) -> None:
    """The try-on of a DiT workflow once its model, VAE and prompt are loaded: Correspondence on the SD1.5
    checkpoint of ``photos`` (what :func:`loaders` returns) with its own encoding of the prompt, both stages on
    ``model_src`` with ``plan``, the fringe preview, paste back and Save Image under ``prefix``. The DiT's
    conditioning is made by the caller, between :func:`loaders` and this call (the order the nodes get their ids)."""
    sd, person, person_mask, garment, garment_mask = photos
    sd_pos = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(400, 130), text=POSITIVE), clip=sd.out("CLIP"))
    tgt, ref = crops(wf, ctl, person, person_mask, garment, garment_mask)
    r = two_stage_tryon(wf, ctl, model_src=model_src, vae_src=vae_src, pos=pos, neg=neg, mea_pos=pos, tgt=tgt,
                        ref=ref, plan=plan, corr_src=(sd.out("MODEL"), sd.out("VAE"), sd_pos))
    preview(wf, r["dm"].out("fringe"), "stage1", mask=True)
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), prefix=prefix)


# The FLUX.2 klein try-on's files (Black Forest Labs' FLUX.2 [klein] 4B, distilled, fp8; Apache 2.0) and its
# text encoder and VAE as ComfyUI's own klein templates load them.
KLEIN, QWEN3_4B, FLUX2_VAE = "flux-2-klein-4b-fp8.safetensors", "qwen_3_4b.safetensors", "flux2-vae.safetensors"
MODEL_URLS.update({
    KLEIN: ("diffusion_models", "https://huggingface.co/black-forest-labs/FLUX.2-klein-4b-fp8/resolve/main/" + KLEIN),
    QWEN3_4B: ("text_encoders",
               "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/" + QWEN3_4B),
    FLUX2_VAE: ("vae", "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/vae/" + FLUX2_VAE),
})
MIN_COMFYUI[workflow_name("flux2_klein")] = "0.33.0"
#: klein 4B is step-distilled (4 steps at cfg 1 in ComfyUI's template); 10 euler steps keep the paper's 70 % / 30 %
#: split on whole steps. Untuned.
KLEIN_PLAN = {"steps": 10, "split": 7, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
              "mea": {"guidance": "paper", "s_mea": FLUX_S_MEA, "start": 0.0, "end": 1.0}}
STAGE1_NOISE_MASK_TEXT = (
    "### Stage 1 without a Fill model\nThe warped garment is pasted into the person photo (Double-Mask Inpaint's "
    "composite) and only the fringe F is repainted through the LATENT's noise mask: the sampler keeps the latent "
    "outside F at every step, so the model sees the composite around the fringe and fills the seam. The model's "
    "mask and masked-image inputs that a Fill model reads are ignored by this model."
)


def dit_groups(model: str) -> list:
    """The try-on groups of a workflow whose stages run on ``model`` (a DiT without a Fill model)."""
    return [
        ("inputs", f"1 · Inputs: size and steps, {model}, text encoder, SD1.5 for matching, photos, masks", "inputs"),
        ("registration", "2 · Registration on SD1.5: match the garment to the person, warp it", "registration"),
        ("stage1", f"3 · Stage 1 on {model}: paint the seams by noise mask", "stage1"),
        ("stage2", f"4 · Stage 2: finish with Masked Extended Attention on {model}", "stage2"),
        ("output", "5 · Output: decode, paste back into the photo", "output"),
    ]


def flux2_klein_tryon() -> Workflow:
    """The whole method on FLUX.2 [klein] 4B: Correspondence on an SD1.5 inpainting UNet, stage 1 by noise mask on
    klein (no Fill model), Masked Extended Attention on klein, distilled paper mode."""
    wf = Workflow(workflow_name("flux2_klein"), dit_groups("FLUX.2 klein"))
    wf.note(text(
        "## MaX4Zero try-on on FLUX.2 [klein] 4B\nComfyUI 0.33.0 or newer (Masked Extended Attention uses the "
        "attention hook of Flux blocks). Training-free, on your own klein checkpoint; fits consumer GPUs. Quality on "
        "FLUX.2 is unknown: tested on random weights only.\n\n"
        + size_steps_text(1024, KLEIN_PLAN["steps"], KLEIN_PLAN["split"]) + "\n\n"
        f"### Model files (the ones ComfyUI's own klein templates load)\n- `{KLEIN}` (Apache 2.0) from "
        f"{MODEL_URLS[KLEIN][1]}, in `ComfyUI/models/diffusion_models/`. klein 9B (flux-2-klein-9b-fp8) works too: "
        "pick it in Load Diffusion Model, with its qwen_3_8b text encoder.\n"
        f"- `{QWEN3_4B}` from {MODEL_URLS[QWEN3_4B][1]}, in `ComfyUI/models/text_encoders/`.\n"
        f"- `{FLUX2_VAE}` from {MODEL_URLS[FLUX2_VAE][1]}, in `ComfyUI/models/vae/`.\n"
        f"- For the matching only: `{SD15}` (4.3 GB) from {MODEL_URLS[SD15][1]}, in `ComfyUI/models/checkpoints/`. "
        "Correspondence reads the deep features of an SD UNet; the nodes are separate, so the matches drive the "
        "FLUX.2 stages as they are.\n\n"
        + INPUTS_TEXT + "\n\n"
        "### Steps\n1 crop both photos around their masks → 2 correspondence on SD1.5 → MLS warp → 3 double-mask "
        "inpaint with the FLUX.2 VAE and prompt → KSampler (Advanced) on klein up to *Stage 1 ends at step* → 4 Masked "
        "Extended Attention on klein → KSampler (Advanced) to the end (its window 0-1 = every step that sampler runs) "
        "→ 5 decode → paste back.\n\n" + STAGE1_NOISE_MASK_TEXT + "\n\n"
        "### Guidance\nklein 4B is step-distilled: cfg 1, no negative pass. 'paper' guidance then becomes eps_c + "
        f"s_mea·M·(eps_MEA − eps_c), here with s_mea {FLUX_S_MEA:g} (try 2-5; untuned). Blocks: 'flux_blocks' = vital "
        "(on FLUX.2: FLUX.1's vital layers at the same relative depths, an untuned analogy; try 'all'). Describe the "
        "garment in the prompt.\n\n" + STAGE2_TEXT),
        box=(NOTE_W, 1300))
    ctl = controls(wf, size=1024, steps=KLEIN_PLAN["steps"], split=KLEIN_PLAN["split"])
    unet = wf.add("UNETLoader", "inputs", unet_name=KLEIN, weight_dtype="default")
    clip = wf.add("CLIPLoader", "inputs", clip_name=QWEN3_4B, type="flux2", device="default")
    vae = wf.add("VAELoader", "inputs", vae_name=FLUX2_VAE)
    photos = loaders(wf, SD15)
    pos = wf.wire(wf.add("CLIPTextEncode", "inputs", box=(400, 130), text=POSITIVE), clip=clip)
    neg = wf.wire(wf.add("ConditioningZeroOut", "inputs"), conditioning=pos)
    dit_tryon(wf, ctl, photos, model_src=unet, vae_src=vae, pos=pos, neg=neg, plan=KLEIN_PLAN,
              prefix="MaX4Zero_flux2_klein")
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
MIN_COMFYUI[workflow_name("qwen_edit")] = "0.33.0"
#: Qwen-Image-Edit is not distilled: real CFG (ComfyUI's template: 40 steps at cfg 3, shift 3.1). s_mea scaled from
#: the paper's 15 at cfg 12 to cfg 3 (the same ratio): 4. Untuned.
QWEN_PLAN = {"steps": 40, "split": 28, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
             "mea": {"guidance": "paper", "s_mea": 4.0, "start": 0.0, "end": 1.0}}


def qwen_image_edit_tryon() -> Workflow:
    """The whole method on Qwen-Image-Edit: Correspondence on an SD1.5 inpainting UNet, stage 1 by noise mask, Masked
    Extended Attention on Qwen-Image-Edit with real CFG."""
    wf = Workflow(workflow_name("qwen_edit"), dit_groups("Qwen-Image-Edit"))
    wf.note(text(
        "## MaX4Zero try-on on Qwen-Image-Edit 2511\nComfyUI 0.33.0 or newer (Masked Extended Attention uses the "
        "attention hook of Qwen-Image's blocks). Training-free. Quality on Qwen-Image is unknown: tested on random "
        "weights only.\n\n"
        + size_steps_text(1024, QWEN_PLAN["steps"], QWEN_PLAN["split"]) + "\n\n"
        f"### Model files (the ones ComfyUI's own Qwen-Image-Edit 2511 template loads)\n- `{QWEN_EDIT}` from "
        f"{MODEL_URLS[QWEN_EDIT][1]}, in `ComfyUI/models/diffusion_models/` (Qwen-Image works the same way).\n"
        f"- `{QWEN_VL}` from {MODEL_URLS[QWEN_VL][1]}, in `ComfyUI/models/text_encoders/`.\n"
        f"- `{QWEN_VAE}` from {MODEL_URLS[QWEN_VAE][1]}, in `ComfyUI/models/vae/`.\n"
        f"- For the matching only: `{SD15}` (4.3 GB) from {MODEL_URLS[SD15][1]}, in `ComfyUI/models/checkpoints/`."
        "\n\n" + INPUTS_TEXT + "\n\n"
        "### Steps\n1 crop both photos → 2 correspondence on SD1.5 → MLS warp → 3 double-mask inpaint with the Qwen "
        "VAE → KSampler (Advanced) up to *Stage 1 ends at step* → 4 Masked Extended Attention → KSampler (Advanced) "
        "to the end → 5 decode → paste back.\n\n" + STAGE1_NOISE_MASK_TEXT + "\n\n"
        "### Prompt and guidance\nThe prompt is text only (CLIP Text Encode with the Qwen text encoder): the person is "
        "in the latent, the garment comes from Masked Extended Attention's reference pass, which takes this text-only "
        "prompt. Do not connect edit conditioning that carries the person as vision tokens to the MEA node: its "
        "reference pass would read the person. Guidance: real CFG (cfg 3, shift 3.1 as ComfyUI's template); 'paper' "
        "adds s_mea·M·(eps_MEA − eps_u) with s_mea 4 (scaled from the paper's 15 at cfg 12; untuned).\n\n"
        + STAGE2_TEXT),
        box=(NOTE_W, 1300))
    ctl = controls(wf, size=1024, steps=QWEN_PLAN["steps"], split=QWEN_PLAN["split"])
    unet = wf.add("UNETLoader", "inputs", unet_name=QWEN_EDIT, weight_dtype="default")
    model = wf.wire(wf.add("ModelSamplingAuraFlow", "inputs", shift=3.1), model=unet)
    clip = wf.add("CLIPLoader", "inputs", clip_name=QWEN_VL, type="qwen_image", device="default")
    vae = wf.add("VAELoader", "inputs", vae_name=QWEN_VAE)
    photos = loaders(wf, SD15)
    pos, neg = prompts(wf, clip)
    dit_tryon(wf, ctl, photos, model_src=model, vae_src=vae, pos=pos, neg=neg, plan=QWEN_PLAN,
              prefix="MaX4Zero_qwen_image_edit")
    return wf


#: key -> builder, in the order of WORKFLOW_TITLES.
BUILDERS = {
    "quick": reference_only,
    "full": full_tryon,
    "flow": lambda: reference_only("flow", flow_view=True),
    "lora_controlnet": lora_controlnet,
    "sdxl": sdxl,
    "masks": masks_core,
    "flux_fill": flux_fill_tryon,
    "flux2_klein": flux2_klein_tryon,
    "qwen_edit": qwen_image_edit_tryon,
}


def all_workflows() -> list[Workflow]:
    return [BUILDERS[key]() for key in WORKFLOW_TITLES]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    shipped = {workflow_name(k) for k in WORKFLOW_TITLES}
    for wf in all_workflows():
        missing = sorted({n.type for n in wf.nodes} - INFO_0364 - {"Note", "MarkdownNote"})
        if missing and wf.name not in MIN_COMFYUI:
            raise SystemExit(f"{wf.name} uses {missing}, which ComfyUI 0.3.64 lacks: add it to MIN_COMFYUI")
        print("wrote", wf.write().relative_to(ROOT), f"({len(wf.nodes)} nodes, {len(wf.links)} links)")
    for old in sorted(OUT.glob("*.json")):  # a renamed or dropped workflow leaves no stale file behind
        if old.stem not in shipped:
            old.unlink()
            print("removed", old.relative_to(ROOT))


if __name__ == "__main__":
    main()
