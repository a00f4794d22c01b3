"""The shipped example workflows (``workflows/*.json``, UI format) load cleanly in every supported ComfyUI.

No ComfyUI needed: node schemas come from committed snapshots —
``tests/comfyui/node_schema_snapshot.json`` (this pack, checked against the live pack in tests/comfyui),
``tests/data/object_info_pack-<version>.json`` and ``tests/data/object_info_core-<version>.json`` (ComfyUI's own
``/object_info`` for the node types the workflows use, one pair per supported version: 0.3.64 and 0.33.0;
regenerate with ``tests/data/make_object_info.py``). Every workflow is checked against every pair.

Widget rules mirror comfyui-frontend-package 1.27 (the version ComfyUI 0.3.64 pins): widgets follow
``input_order`` (required, then optional); an INT input with ``control_after_generate`` — or, when that key is
absent, one named ``seed``/``noise_seed`` — stores one extra value (fixed/increment/decrement/randomize);
a combo with ``image_upload`` adds an ``upload`` widget whose stored value is ``"image"``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
SCHEMA_SNAPSHOT = ROOT / "tests" / "comfyui" / "node_schema_snapshot.json"
DATA = ROOT / "tests" / "data"
SUPPORTED_COMFYUI = ("0.3.64", "0.33.0")

import make_workflows  # noqa: E402  (tools/ is on sys.path: tests/conftest.py)

#: key -> file name without .json (tools/make_workflows.py workflow_name: the one place that names them)
NAME = {key: make_workflows.workflow_name(key) for key in make_workflows.WORKFLOW_TITLES}
EXPECTED = set(NAME.values())
NOTES = ("Note", "MarkdownNote")
#: The size/steps controls: core Int primitives with these titles (the only nodes with a title of their own).
CONTROL_TITLES = {"Working size", "Total steps", "Stage 1 ends at step"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# The file names the workflows load; the browser check creates random-weight files / images with them.
# The model files are the real public ones (README "Models"); the images ship in example_inputs/.
FILE_NAMES = {
    "ckpt_name": {"sd-v1-5-inpainting.ckpt", "sd_xl_base_1.0_inpainting_0.1.safetensors",
                  "sam3.1_multiplex_fp16.safetensors"},
    "lora_name": {"garment_detail_lora.safetensors"},
    "control_net_name": {"control_v11p_sd15_openpose_fp16.safetensors"},
    "bg_removal_name": {"birefnet.safetensors"},
    "unet_name": {"flux1-fill-dev.safetensors", "flux-2-klein-4b-fp8.safetensors",
                  "qwen_image_edit_2511_fp8mixed.safetensors"},
    "clip_name1": {"clip_l.safetensors"},
    "clip_name2": {"t5xxl_fp16.safetensors"},
    "clip_name": {"qwen_3_4b.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors"},
    "vae_name": {"ae.safetensors", "flux2-vae.safetensors", "qwen_image_vae.safetensors"},
    "image": {"max4zero_person.png", "max4zero_person_mask.png", "max4zero_garment.png",
              "max4zero_garment_mask.png", "max4zero_pose.png"},
}
EXAMPLE_INPUTS = ROOT / "example_inputs"
#: Workflows that need node types only newer ComfyUI versions have (tools/make_workflows.py MIN_COMFYUI).
MIN_COMFYUI = {NAME["masks"]: "0.33.0", NAME["flux_fill"]: "0.33.0", NAME["flux2_klein"]: "0.33.0",
               NAME["qwen_edit"]: "0.33.0"}
WHY_NEWER = {NAME["masks"]: "its core segmentation nodes",
             NAME["flux_fill"]: "Masked Extended Attention on Flux needs the Flux blocks' attention hook",
             NAME["flux2_klein"]: "FLUX.2 and Masked Extended Attention on it exist from ComfyUI 0.33",
             NAME["qwen_edit"]: "Masked Extended Attention on Qwen-Image needs its attention hook"}


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))



def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


SCHEMAS = _load(SCHEMA_SNAPSHOT)


def _snapshot(version: str, part: str) -> dict:
    return {k: v for k, v in _load(DATA / f"object_info_{part}-{version}.json").items() if not k.startswith("_")}


SNAPSHOT_VERSIONS = sorted(p.stem.split("-", 1)[1] for p in DATA.glob("object_info_core-*.json"))
#: version -> every node type's /object_info entry (ComfyUI's and this pack's)
INFOS = {v: {**_snapshot(v, "core"), **_snapshot(v, "pack")} for v in SNAPSHOT_VERSIONS}
CORE_TYPES = {v: set(_snapshot(v, "core")) for v in SNAPSHOT_VERSIONS}
OLDEST = SUPPORTED_COMFYUI[0]


def _opts(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _options(spec: list) -> list | None:
    if isinstance(spec[0], list):
        return spec[0]
    return _opts(spec).get("options") if spec[0] == "COMBO" else None


def frontend_inputs(node_type: str, version: str = OLDEST) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in the order the frontend creates them."""
    info = INFOS[version][node_type]
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            out.append((name, specs[name], section == "optional"))
    if any(_opts(s).get("image_upload") for _, s, _ in out):
        out.append(("upload", ["IMAGEUPLOAD", {}], False))
    return out


def _is_widget(spec: list) -> bool:
    return (_type(spec) in WIDGET_TYPES or spec[0] == "IMAGEUPLOAD") and not _opts(spec).get("forceInput")


def _has_control(name: str, spec: list) -> bool:
    c = _opts(spec).get("control_after_generate")
    if spec[0] == "INT" and c is None:
        return name in ("seed", "noise_seed")
    return bool(c)


def widget_problems(node: dict, version: str = OLDEST) -> list[str]:
    """Count and validity of ``widgets_values`` against the node's schema."""
    where = f"node {node['id']} ({node['type']})"
    values = node.get("widgets_values", [])
    if not isinstance(values, list):
        return [f"{where}: widgets_values is not a list"]
    expected: list[tuple[str, list | None]] = []  # (name, spec); spec None = control_after_generate value
    for name, spec, _ in frontend_inputs(node["type"], version):
        if _is_widget(spec):
            expected.append((name, spec))
            if _has_control(name, spec):
                expected.append((name + ".control_after_generate", None))
    if len(values) != len(expected):
        return [f"{where}: {len(values)} widget values, the frontend expects {len(expected)} "
                f"({', '.join(n for n, _ in expected)})"]
    problems = []
    for (name, spec), v in zip(expected, values):
        bad = f"{where}: {name}={v!r}"
        if spec is None:
            if v not in CONTROL_VALUES:
                problems.append(f"{bad} is not one of {sorted(CONTROL_VALUES)}")
            continue
        t, o = _type(spec), _opts(spec)
        if spec[0] == "IMAGEUPLOAD":
            if v != "image":
                problems.append(f"{bad}: the upload widget stores 'image'")
        elif t == "COMBO":
            options = _options(spec) or []
            if name in FILE_NAMES and v not in FILE_NAMES[name]:
                problems.append(f"{bad} is not one of the shipped file names {sorted(FILE_NAMES[name])}")
            elif v not in options:
                problems.append(f"{bad} is not an option ({options[:8]}{' ...' if len(options) > 8 else ''})")
        elif t in ("INT", "FLOAT"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (t == "INT" and not isinstance(v, int)):
                problems.append(f"{bad} is not a{'n integer' if t == 'INT' else ' number'}")
            elif not (o.get("min", float("-inf")) <= v <= o.get("max", float("inf"))):
                problems.append(f"{bad} is outside [{o.get('min')}, {o.get('max')}]")
        elif t == "BOOLEAN" and not isinstance(v, bool):
            problems.append(f"{bad} is not a boolean")
        elif t == "STRING" and not isinstance(v, str):
            problems.append(f"{bad} is not a string")
    return problems


def workflow_problems(wf: dict, version: str = OLDEST) -> list[str]:
    """Everything that would make the frontend or ComfyUI refuse (or silently mis-load) this workflow."""
    problems: list[str] = []
    for key in ("nodes", "links", "groups", "config", "extra", "version", "last_node_id", "last_link_id"):
        if key not in wf:
            problems.append(f"missing top-level key {key!r}")
    if problems:
        return problems
    nodes = {}
    for n in wf["nodes"]:
        if n["id"] in nodes:
            problems.append(f"duplicate node id {n['id']}")
        nodes[n["id"]] = n
        for key in ("type", "pos", "size", "flags", "order", "mode", "properties"):
            if key not in n:
                problems.append(f"node {n['id']}: missing {key!r}")
    if max(nodes, default=0) > wf["last_node_id"]:
        problems.append("last_node_id is smaller than a node id")

    for n in wf["nodes"]:
        t = n["type"]
        where = f"node {n['id']} ({t})"
        if t in FRONTEND_ONLY:
            continue
        if t not in SCHEMAS and t not in CORE_TYPES[version]:
            problems.append(f"{where}: unknown node type (neither this pack's nor a core node in the snapshot)")
            continue
        if n["properties"].get("Node name for S&R") != t:
            problems.append(f"{where}: properties['Node name for S&R'] should be {t!r}")
        if "title" in n and not (t == "PrimitiveInt" and n["title"] in CONTROL_TITLES):
            problems.append(f"{where}: keep the default title")
        problems += widget_problems(n, version)
        inputs = frontend_inputs(t, version)
        names = [nm for nm, _, _ in inputs]
        for slot in n.get("inputs", []):
            if slot["name"] not in names:
                problems.append(f"{where}: input {slot['name']!r} does not exist")
        sockets = {s["name"]: s for s in n.get("inputs", [])}
        for nm, spec, optional in inputs:
            if not _is_widget(spec) and not optional and sockets.get(nm, {}).get("link") is None:
                problems.append(f"{where}: required input {nm!r} is not connected")
        info = INFOS[version][t]
        outs = list(zip(info["output_name"], info["output"]))
        got = [(o["name"], o["type"]) for o in n.get("outputs", [])]
        # A newer ComfyUI may append outputs (0.33's SaveImage passes its images on); the frontend adds the
        # missing slots on load (the browser check loads every workflow on each version). So the saved outputs
        # must be the schema's first ones, in order.
        if got != outs[: len(got)] or (len(got) < len(outs) and version == OLDEST):
            problems.append(f"{where}: outputs {got} != schema {outs}")

    link_ids = set()
    for link in wf["links"]:
        if len(link) != 6:
            problems.append(f"link {link!r}: expected [id, from, from_slot, to, to_slot, type]")
            continue
        lid, a, a_slot, b, b_slot, ltype = link
        where = f"link {lid}"
        if lid in link_ids:
            problems.append(f"{where}: duplicate id")
        link_ids.add(lid)
        if lid > wf["last_link_id"]:
            problems.append(f"{where}: id above last_link_id")
        if a not in nodes or b not in nodes:
            problems.append(f"{where}: connects a missing node")
            continue
        src, dst = nodes[a], nodes[b]
        outs, ins = src.get("outputs", []), dst.get("inputs", [])
        if not 0 <= a_slot < len(outs) or not 0 <= b_slot < len(ins):
            problems.append(f"{where}: slot out of range")
            continue
        out, inp = outs[a_slot], ins[b_slot]
        if out["type"] != ltype:
            problems.append(f"{where}: type {ltype} but {src['type']} output {out['name']!r} is {out['type']}")
        if "*" not in (inp["type"], out["type"]) and inp["type"] != out["type"]:
            problems.append(f"{where}: {src['type']}.{out['name']} ({out['type']}) -> {dst['type']}.{inp['name']} "
                            f"({inp['type']}): types differ")
        if dst["type"] in INFOS[version] and not inp.get("widget"):
            spec = dict((nm, s) for nm, s, _ in frontend_inputs(dst["type"], version)).get(inp["name"])
            if spec is not None and _type(spec) not in ("*", out["type"]):
                problems.append(f"{where}: {dst['type']}.{inp['name']} is {_type(spec)} in the schema, gets "
                                f"{out['type']}")
        if inp.get("link") != lid:
            problems.append(f"{where}: {dst['type']} input {inp['name']!r} records link {inp.get('link')}")
        if lid not in (out.get("links") or []):
            problems.append(f"{where}: {src['type']} output {out['name']!r} does not list it")
    for n in wf["nodes"]:
        for i, inp in enumerate(n.get("inputs", [])):
            lid = inp.get("link")
            if lid is not None and not any(lk[0] == lid and lk[3] == n["id"] and lk[4] == i for lk in wf["links"]):
                problems.append(f"node {n['id']} input {inp['name']!r}: link {lid} has no matching link record")
        for s, out in enumerate(n.get("outputs", [])):
            for lid in out.get("links") or []:
                if not any(lk[0] == lid and lk[1] == n["id"] and lk[2] == s for lk in wf["links"]):
                    problems.append(f"node {n['id']} output {out['name']!r}: link {lid} has no matching record")
    return problems


def overlaps(wf: dict) -> list[tuple[int, int]]:
    """Pairs of nodes whose boxes (title bar of 30 px included) overlap."""
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in wf["nodes"]]
    return [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]


def _by_type(wf: dict, t: str) -> list[dict]:
    return [n for n in wf["nodes"] if n["type"] == t]


def _source(wf: dict, node: dict, input_name: str) -> dict:
    lid = next(i["link"] for i in node["inputs"] if i["name"] == input_name)
    link = next(lk for lk in wf["links"] if lk[0] == lid)
    return next(n for n in wf["nodes"] if n["id"] == link[1])


# ------------------------------------------------------------------------------------------------


def test_the_seven_workflows_are_shipped():
    assert {p.stem for p in WORKFLOWS} == EXPECTED


def test_both_supported_comfyui_versions_have_snapshots():
    assert set(SUPPORTED_COMFYUI) <= set(SNAPSHOT_VERSIONS), SNAPSHOT_VERSIONS
    for v in SNAPSHOT_VERSIONS:
        assert _load(DATA / f"object_info_core-{v}.json")["_comfyui_version"] == v


@pytest.mark.parametrize("version", SNAPSHOT_VERSIONS)
def test_pack_object_info_agrees_with_the_schema_snapshot(version):
    """object_info_pack-<version>.json (ranges for the widget checks) must describe the same nodes as the snapshot."""
    assert set(SCHEMAS) == set(_snapshot(version, "pack"))
    for nid, schema in SCHEMAS.items():
        info = INFOS[version][nid]
        flat = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for section, optional in (("required", False), ("optional", True)):
            declared = [i["id"] for i in schema["inputs"] if i["optional"] == optional]
            assert info["input_order"].get(section, []) == declared, (nid, section)
        for i in schema["inputs"]:
            spec = flat[i["id"]]
            assert _type(spec) == i["type"], (nid, i["id"])
            assert (i["id"] in info["input"].get("optional", {})) == i["optional"], (nid, i["id"])
            if "options" in i:
                assert _options(spec) == i["options"], (nid, i["id"])
        assert info["output"] == [o["type"] for o in schema["outputs"]], nid
        assert info["output_name"] == [o["name"] for o in schema["outputs"]], nid


@pytest.mark.parametrize("version", SNAPSHOT_VERSIONS)
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid(path, version):
    wf = _load(path)
    assert wf["version"] == 0.4
    problems = workflow_problems(wf, version)
    if _version(version) < _version(MIN_COMFYUI.get(path.stem, OLDEST)):
        # Checked from its minimum version on; before it, only nodes it lacks (or a combo option a node it has lacks
        # there: CLIPLoader's type 'flux2') may be what is wrong.
        assert all("unknown node type" in p or "is not an option" in p for p in problems), problems
        pytest.skip(f"{path.stem} needs ComfyUI {MIN_COMFYUI[path.stem]}+ ({WHY_NEWER[path.stem]})")
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_minimum_versions_agree_with_the_generator():
    import make_workflows  # tools/ is on sys.path (tests/conftest.py)

    assert make_workflows.MIN_COMFYUI == MIN_COMFYUI
    assert set(MIN_COMFYUI) <= EXPECTED and all(v in SUPPORTED_COMFYUI for v in MIN_COMFYUI.values())


def test_the_sample_inputs_ship_under_the_names_the_workflows_load():
    """example_inputs/ holds exactly the images the workflows load, so one copy command makes them all run."""
    shipped = {p.name for p in EXAMPLE_INPUTS.glob("*.png")}
    assert shipped == FILE_NAMES["image"]
    loaded = {n["widgets_values"][0] for path in WORKFLOWS for n in _load(path)["nodes"]
              if n["type"] in ("LoadImage", "LoadImageMask")}
    assert loaded == shipped
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "cp custom_nodes/max4zero-tryon/example_inputs/max4zero_*.png input/" in readme
    for path in WORKFLOWS:
        notes = "\n".join(n["widgets_values"][0] for n in _load(path)["nodes"] if n["type"] in NOTES)
        assert "example_inputs/" in notes, path.stem



MODEL_WIDGETS = {"ckpt_name", "lora_name", "control_net_name", "bg_removal_name", "unet_name", "clip_name1", "clip_name2", "vae_name"}


def _newest_with(node_type: str) -> str:
    return next(v for v in reversed(SNAPSHOT_VERSIONS) if node_type in INFOS[v])


def _model_files(wf: dict) -> list[tuple[dict, str]]:
    """(node, file name) for every model loader widget."""
    out = []
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        names = [nm for nm, spec, _ in frontend_inputs(n["type"], _newest_with(n["type"])) if _is_widget(spec)]
        for name, value in zip(names, n.get("widgets_values", [])):
            if name in MODEL_WIDGETS:
                out.append((n, value))
    return out


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_a_note_naming_models_and_inputs(path):
    """The Note names every model file with where it goes and where to get it, and every image loaded."""
    wf = _load(path)
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, f"{path.name} has no Note"
    text = "\n".join(notes)
    files = _model_files(wf)
    assert files
    for node, name in files:
        assert name in text, f"the Note of {path.name} does not name the model file {name}"
        models = node["properties"].get("models", [])
        if name == "garment_detail_lora.safetensors":  # a stand-in: any SD1.5 LoRA (the Note says so)
            # Bypassed (mode 4) as shipped, so the stand-in name cannot block Run; the Note says how to turn it on.
            assert "stand-in" in text and "BYPASSED" in text and "Ctrl+B" in text and not models
            assert node["mode"] == 4
            continue
        # The frontend offers the download of a missing file from properties.models.
        assert name in [m["name"] for m in models], (path.stem, name)  # a loader of two files lists both
        entry = next(m for m in models if m["name"] == name)
        url, folder = entry["url"], entry["directory"]
        assert url.startswith("https://huggingface.co/") and url.endswith("/" + name)
        assert url in text and f"models/{folder}/" in text, (path.stem, name)
    if any(n["type"] in ("MaX4ZeroCorrespondence", "MaX4ZeroMaskedExtendedAttention") for n in wf["nodes"]):
        assert "INPAINTING" in text.upper()
    for n in _by_type(wf, "LoadImage") + _by_type(wf, "LoadImageMask"):
        assert n["widgets_values"][0] in text, f"the Note of {path.name} does not mention {n['widgets_values'][0]}"


def test_the_masks_workflow_uses_core_nodes_only_and_says_what_it_needs():
    wf = _load(WORKFLOW_DIR / f"{NAME['masks']}.json")
    types = {n["type"] for n in wf["nodes"]} - FRONTEND_ONLY
    assert not types & set(SCHEMAS), "the masks workflow must not need this pack's nodes"
    assert types <= CORE_TYPES["0.33.0"] and {"SAM3_Detect", "RemoveBackground"} <= types
    saved = sorted(_widget(wf, n, "filename_prefix", "0.33.0") for n in _by_type(wf, "SaveImage"))
    assert saved == ["max4zero_garment_mask", "max4zero_person_mask", "max4zero_protect_mask"]
    note = next(n["widgets_values"][0] for n in wf["nodes"] if n["type"] in NOTES)
    assert "cannot run without" in note and "0.33" in note


# --- layout: as an artist reads it --------------------------------------------------------------------------

TITLE_H = 30


def _box(n: dict) -> tuple[float, float, float, float]:
    """A node's box, its title bar included: (x0, y0, x1, y1)."""
    return n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]


def _inside(box, bounding) -> bool:
    x, y, w, h = bounding
    return x <= box[0] and y <= box[1] and box[2] <= x + w and box[3] <= y + h


def layout_problems(wf: dict) -> list[str]:
    """What keeps a workflow from reading left to right in labelled groups, Note first."""
    problems = []
    nodes, groups = wf["nodes"], wf.get("groups", [])
    note = nodes[0] if nodes else None
    if not note or note["type"] not in ("Note", "MarkdownNote"):
        problems.append("the first node is not the Note")
    elif note["pos"][0] > min(n["pos"][0] for n in nodes) or note["id"] != min(n["id"] for n in nodes):
        problems.append("the Note is not the leftmost node with the lowest id")
    if len(groups) < 2:
        problems.append(f"{len(groups)} group(s): the stages must be labelled groups")
    for g in groups:
        if not str(g.get("title", "")).strip() or len(g.get("bounding", [])) != 4:
            problems.append(f"group {g.get('id')}: no title or no bounding box")
    if problems:
        return problems
    if [g["bounding"][0] for g in groups] != sorted(g["bounding"][0] for g in groups):
        problems.append("the groups are not listed left to right")
    for a, b in zip(groups, groups[1:]):
        if a["bounding"][0] + a["bounding"][2] > b["bounding"][0] or b["bounding"][0] + b["bounding"][2] < a["bounding"][0]:
            problems.append(f"groups {a['title']!r} and {b['title']!r} overlap")
    group_of = {}
    for n in nodes[1:]:
        inside = [g["title"] for g in groups if _inside(_box(n), g["bounding"])]
        if len(inside) != 1:
            problems.append(f"node {n['id']} ({n['type']}) is inside {len(inside)} groups")
        else:
            group_of[n["id"]] = inside[0]
    if any(_inside(_box(note), g["bounding"]) for g in groups):
        problems.append("the Note sits inside a group")
    by_id = {n["id"]: n for n in nodes}
    order = [g["title"] for g in groups]
    for lid, a, _, b, _, _ in wf["links"]:
        src, dst = by_id[a], by_id[b]
        if src["pos"][0] + src["size"][0] > dst["pos"][0]:
            problems.append(f"link {lid} runs right to left ({src['type']} -> {dst['type']})")
        if a in group_of and b in group_of and order.index(group_of[a]) > order.index(group_of[b]):
            problems.append(f"link {lid} goes back to an earlier group ({src['type']} -> {dst['type']})")
    return problems


def link_crossings(wf: dict) -> int:
    import make_workflows  # tools/ is on sys.path (tests/conftest.py)

    by_id = {n["id"]: n for n in wf["nodes"]}
    rerouted = {e["id"] for e in wf["extra"].get("linkExtensions", [])}
    segs = []
    for lid, a, a_slot, b, b_slot, _ in wf["links"]:
        if lid in rerouted:  # runs under the groups (test_no_wire_crosses_a_group_it_does_not_serve)
            continue
        pa, pb = by_id[a], by_id[b]
        segs.append(((a, a_slot), b, (pa["pos"][0] + pa["size"][0], pa["pos"][1] + 20.0 * (a_slot + 0.5)),
                     (pb["pos"][0], pb["pos"][1] + 20.0 * (b_slot + 0.5))))
    return make_workflows.count_crossings(segs)


#: Group titles, left to right, of the workflows that run the method's two stages.
TWO_STAGE_TITLES = ["1 · Inputs", "2 · Registration", "3 · Stage 1", "4 · Stage 2", "5 · Output"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_reads_left_to_right_in_labelled_groups(path):
    wf = _load(path)
    assert overlaps(wf) == []
    assert layout_problems(wf) == []
    titles = [g["title"] for g in wf["groups"]]
    assert titles[0].startswith("1 · Inputs")
    if path.stem in TWO_STAGE:
        assert [t.split(":")[0] for t in titles] == TWO_STAGE_TITLES
    first = wf["groups"][0]["bounding"]
    for n in wf["nodes"]:
        if n["type"] in ("CheckpointLoaderSimple", "LoadImage", "LoadImageMask"):
            assert _inside(_box(n), first), f"{n['type']} is not in the inputs group"
    saves = [n for n in wf["nodes"] if n["type"] == "SaveImage"]
    assert saves and all(not _inside(_box(s), first) for s in saves)
    # Few crossing links (straight lines from slot to slot; the former layout had about 3 per link).
    assert link_crossings(wf) <= 1.4 * len(wf["links"]), link_crossings(wf)


@pytest.mark.parametrize("mutate, expect", [
    (lambda wf: wf["nodes"].append(wf["nodes"].pop(0)), "first node is not the Note"),
    (lambda wf: wf.__setitem__("groups", []), "group(s)"),
    (lambda wf: wf["groups"].reverse(), "not listed left to right"),
    (lambda wf: wf["nodes"][3]["pos"].__setitem__(1, 50000), "inside 0 groups"),
    (lambda wf: wf["groups"][0]["bounding"].__setitem__(2, 99999), "overlap"),
    (lambda wf: _by_type(wf, "SaveImage")[0]["pos"].__setitem__(0, 700.0), "right to left"),
])
def test_layout_checks_catch_a_bad_layout(mutate, expect):
    wf = copy.deepcopy(_load(WORKFLOW_DIR / f"{NAME['full']}.json"))
    mutate(wf)
    assert any(expect in p for p in layout_problems(wf)), layout_problems(wf)


def test_full_tryon_is_wired_as_the_paper_pipeline():
    wf = _load(WORKFLOW_DIR / f"{NAME['full']}.json")
    samplers = sorted(_by_type(wf, "KSamplerAdvanced"), key=lambda n: n["widgets_values"][7])
    s1, s2 = samplers
    # add_noise, seed, control, steps, cfg, sampler, scheduler, start, end, leftover
    assert s1["widgets_values"][0] == "enable" and s1["widgets_values"][3] == 50
    assert s1["widgets_values"][7:10] == [0, 35, "enable"]
    assert s2["widgets_values"][0] == "disable" and s2["widgets_values"][7:10] == [35, 50, "disable"]
    assert _source(wf, s1, "latent_image")["type"] == "MaX4ZeroDoubleMaskInpaint"
    assert _source(wf, s1, "model")["type"] == "CheckpointLoaderSimple"
    assert _source(wf, s2, "model")["type"] == "MaX4ZeroMaskedExtendedAttention"
    assert _source(wf, s2, "positive")["type"] == "InpaintModelConditioning"
    assert _source(wf, s2, "latent_image")["type"] == "SetLatentNoiseMask"
    assert _source(wf, _source(wf, s2, "latent_image"), "samples") is s1
    flow = _by_type(wf, "MaX4ZeroFlowView")[0]
    assert _source(wf, flow, "trace")["type"] == "MaX4ZeroMaskedExtendedAttention"
    paste = _by_type(wf, "MaX4ZeroPasteBack")[0]
    assert _source(wf, _by_type(wf, "SaveImage")[0], "images") is paste


TWO_STAGE = (NAME["full"], NAME["lora_controlnet"], NAME["sdxl"])


def _link_source(wf: dict, node: dict, input_name: str) -> tuple[int, int] | None:
    """(source node id, output slot) of a connected input, None when unconnected."""
    lid = next((i["link"] for i in node.get("inputs", []) if i["name"] == input_name), None)
    if lid is None:
        return None
    link = next(lk for lk in wf["links"] if lk[0] == lid)
    return link[1], link[2]


def _widget(wf: dict, node: dict, name: str, version: str = OLDEST):
    names = []
    for nm, spec, _ in frontend_inputs(node["type"], version):
        if _is_widget(spec):
            names.append(nm)
            if _has_control(nm, spec):
                names.append(nm + ".control")
    return node["widgets_values"][names.index(name)]


@pytest.mark.parametrize("name", TWO_STAGE)
def test_stage_two_denoises_the_whole_latent(name):
    """The MEA phase: no blending for a 9-channel model. The stage-2 latent's noise mask is all ones (a target-region
    mask would reset the outside to the stage-1 latent, still noisy at step 35, at every step)."""
    wf = _load(WORKFLOW_DIR / f"{name}.json")
    s1, s2 = sorted(_by_type(wf, "KSamplerAdvanced"), key=lambda n: _widget(wf, n, "start_at_step"))
    lat2 = _source(wf, s2, "latent_image")
    assert lat2["type"] == "SetLatentNoiseMask" and _source(wf, lat2, "samples") is s1
    whole = _source(wf, lat2, "mask")
    assert whole["type"] == "SolidMask" and _widget(wf, whole, "value") == 1.0


@pytest.mark.parametrize("name", TWO_STAGE)
def test_matching_and_repainting_use_one_target_region_and_the_methods_prompts(name):
    wf = _load(WORKFLOW_DIR / f"{name}.json")
    corr = _by_type(wf, "MaX4ZeroCorrespondence")[0]
    dm = _by_type(wf, "MaX4ZeroDoubleMaskInpaint")[0]
    for input_name in ("target_mask", "protect_mask"):
        assert _link_source(wf, corr, input_name) == _link_source(wf, dm, input_name), input_name
    assert _widget(wf, corr, "target_dilation") == _widget(wf, dm, "target_dilation")
    assert _link_source(wf, dm, "matches") == (corr["id"], 0)  # Double-Mask Inpaint checks the region agrees
    # empty negative (the base of the MEA term in paper guidance), a positive that describes the garment
    s1 = _by_type(wf, "KSamplerAdvanced")[0]
    texts = {n["id"]: n["widgets_values"][0] for n in _by_type(wf, "CLIPTextEncode")}
    neg_src = _source(wf, dm, "negative")
    while neg_src["type"] != "CLIPTextEncode":
        neg_src = _source(wf, neg_src, "negative")
    assert texts[neg_src["id"]] == ""
    assert any("wearing" in t for t in texts.values())
    assert s1 is not None


def test_sdxl_workflow_uses_1024_crops_and_grid_layers():
    wf = _load(WORKFLOW_DIR / f"{NAME['sdxl']}.json")
    assert {n["widgets_values"][0] for n in _by_type(wf, "MaX4ZeroCropToMask")} == {1024}
    assert _by_type(wf, "CheckpointLoaderSimple")[0]["widgets_values"] == ["sd_xl_base_1.0_inpainting_0.1.safetensors"]
    assert "1/32" in _by_type(wf, "MaX4ZeroMaskedExtendedAttention")[0]["widgets_values"][5]


def test_lora_and_controlnet_act_on_the_same_model():
    wf = _load(WORKFLOW_DIR / f"{NAME['lora_controlnet']}.json")
    lora = _by_type(wf, "LoraLoader")[0]
    for n in _by_type(wf, "KSamplerAdvanced"):
        src = _source(wf, n, "model")
        if src["type"] == "MaX4ZeroMaskedExtendedAttention":
            src = _source(wf, src, "model")
        assert src is lora
    cna = _by_type(wf, "ControlNetApplyAdvanced")[0]
    assert _source(wf, _by_type(wf, "MaX4ZeroDoubleMaskInpaint")[0], "positive") is cna


# --- the checks above can fail: each broken copy must be reported ---------------------------------


def _broken(mutate) -> list[str]:
    wf = copy.deepcopy(_load(WORKFLOW_DIR / f"{NAME['full']}.json"))
    mutate(wf)
    return workflow_problems(wf)


def _node(wf, t):
    return _by_type(wf, t)[0]


@pytest.mark.parametrize("mutate, expect", [
    (lambda wf: _node(wf, "MaX4ZeroMLSWarp")["widgets_values"].__setitem__(0, "bendy"), "kind='bendy'"),
    (lambda wf: _node(wf, "MaX4ZeroCropToMask")["widgets_values"].__setitem__(0, 8), "outside"),
    (lambda wf: _node(wf, "KSamplerAdvanced")["widgets_values"].pop(2), "widget values"),
    (lambda wf: _node(wf, "MaX4ZeroCorrespondence")["widgets_values"].pop(), "widget values"),
    (lambda wf: _node(wf, "CheckpointLoaderSimple")["widgets_values"].__setitem__(0, "other.ckpt"), "file names"),
    (lambda wf: _node(wf, "KSamplerAdvanced")["widgets_values"].__setitem__(2, "sometimes"), "control"),
    (lambda wf: _node(wf, "MaX4ZeroPasteBack").__setitem__("type", "MaX4ZeroPasteBackV2"), "unknown node type"),
    (lambda wf: wf["links"][0].__setitem__(5, "MODEL"), "type MODEL"),
    (lambda wf: wf["links"][0].__setitem__(4, wf["links"][0][4] + 1), "records link"),
    (lambda wf: next(i for i in _node(wf, "VAEDecode")["inputs"] if i["name"] == "vae").__setitem__("link", None),
     "not connected"),
    (lambda wf: _node(wf, "MaX4ZeroFlowView")["inputs"][1].__setitem__("type", "MASK"), "types differ"),
])
def test_broken_copies_are_caught(mutate, expect):
    problems = _broken(mutate)
    assert any(expect in p for p in problems), problems


def test_overlap_is_caught():
    wf = copy.deepcopy(_load(WORKFLOW_DIR / f"{NAME['quick']}.json"))
    wf["nodes"][1]["pos"] = list(wf["nodes"][0]["pos"])
    assert overlaps(wf)


# --- the README's pictures -----------------------------------------------------------------------------------

README_WIDTH = 830  # the width the repository page shows the README at


def _slug(name: str) -> str:
    return name.lower().replace(" - ", "-").replace(" ", "-")


def _png_size(path: Path) -> tuple[int, int]:
    import struct

    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def _pictures(text: str) -> list[tuple[str, str]]:
    import re

    return re.findall(r"!\[([^\]]*)\]\(([^)\s]+)\)", text)


#: Pictures made with random test weights (a run's images): each must say so, in its alt text and its caption.
RANDOM_WEIGHT_PICTURES = {"docs/screenshots/result-random-weights.png", "docs/point-editor/node.png",
                          "docs/point-editor/readme-editor-drag.png", "docs/point-editor/readme-editor-warnings.png"}


def test_readme_is_short():
    assert len(_readme().splitlines()) < 200


def test_readme_shows_each_workflow_under_its_own_heading_readable_at_830_px():
    """One picture per workflow under the workflow's own heading (the picture of another workflow there is a
    defect the old README had), with its groups in words; each picture at most the page's width, so it is shown
    at its own size and its text reads."""
    readme = _readme()
    gallery = readme[readme.index("## The workflows"):].split("\n## ", 1)[0]
    sections = {}
    for part in gallery.split("\n### ")[1:]:
        head, _, body = part.partition("\n")
        sections[head.strip()] = body
    assert list(sections) == [NAME[k] for k in make_workflows.WORKFLOW_TITLES]
    for name, body in sections.items():
        own = f"docs/screenshots/{_slug(name)}.png"
        pics = [src for _, src in _pictures(body)]
        assert own in pics, (name, pics)
        others = {f"docs/screenshots/{_slug(n)}.png" for n in EXPECTED} - {own}
        assert not set(pics) & others, (name, pics)
        titles = " → ".join(g["title"] for g in _load(WORKFLOW_DIR / f"{name}.json")["groups"])
        assert f"*Groups, left to right:* {titles}" in body, name
    for _, src in _pictures(readme):
        if src.endswith(".png"):
            w, h = _png_size(ROOT / src)
            assert w <= README_WIDTH, (src, w)  # not shrunk on the page (the browser check renders them at 830)


def test_every_picture_made_with_random_weights_says_so():
    readme = _readme()
    lines = readme.splitlines()
    opened = {f"docs/screenshots/{_slug(n)}.png" for n in EXPECTED}  # taken before any run: no random output
    weight_free = opened | {"docs/registration_overview.jpg"}
    for alt, src in _pictures(readme):
        assert src in weight_free | RANDOM_WEIGHT_PICTURES, f"{src}: say whether it shows random-weight output"
        if src in RANDOM_WEIGHT_PICTURES:
            at = next(i for i, ln in enumerate(lines) if f"]({src})" in ln)
            caption = " ".join(lines[at + 1:at + 4])
            assert alt.startswith("RANDOM TEST WEIGHTS") and "Random test weights" in caption, (alt, caption)
    assert "No result picture here is a try-on result" in readme


def test_readme_says_where_the_templates_are_in_both_frontends_and_what_the_demo_does():
    readme = _readme()
    assert "Workflow → Browse Templates → Custom Nodes → max4zero-tryon" in readme  # frontend 1.27
    assert "C logo menu → Browse Templates → EXTENSIONS → max4zero-tryon" in readme  # frontend 1.49
    assert '"MaX4Zero" or "try-on"' in readme
    assert "Open in MaskEditor" in readme and "Invert Mask" in readme
    assert "not a point picker" in readme and "Pick control points with the demo" not in readme


def test_docs_workflows_counts_the_shipped_workflows():
    words = {5: "Five", 6: "Six", 7: "Seven", 8: "Eight", 9: "Nine", 10: "Ten"}
    text = (ROOT / "docs" / "workflows.md").read_text(encoding="utf-8")
    assert f"{words[len(WORKFLOWS)]} workflows ship" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| `MaX4Zero ")]
    assert sorted(r.split("`")[1] for r in rows) == sorted(p.stem for p in WORKFLOWS)
    assert f"lists the {words[len(WORKFLOWS)].lower()} workflows" in text


def test_docs_models_names_every_model_file_the_workflows_load_with_its_folder_and_address():
    """docs/models.md lists every file (the README's first run names the SD1.5 one and links the list)."""
    table = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_run = readme[readme.index("## First workflow run"):readme.index("## Masks")]
    assert "`sd-v1-5-inpainting.ckpt`" in first_run and "(docs/models.md)" in first_run
    for path in WORKFLOWS:
        for node, name in _model_files(_load(path)):
            assert f"`{name}`" in table, name
            for m in node["properties"].get("models", []):
                assert m["url"] in table and f"`models/{m['directory']}/`" in table, m


def test_the_generator_refuses_a_cycle():
    """A cycle used to make the generator's topological order loop forever."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_workflows", ROOT / "tools" / "make_workflows.py")
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    wf = mw.Workflow("cycle", [("g", "G", "blue")])
    node = wf.add("SetLatentNoiseMask", "g")
    wf.connect(node.out(0), node, "samples")  # LATENT -> LATENT: a one-node cycle
    with pytest.raises(ValueError, match="cycle"):
        wf.to_json()

def test_names_read_as_titles_and_sort_quickest_first():
    """The template browser shows the file names as card titles, sorted by name: the order to try them in, quickest
    first, and every name holds both words a newcomer searches for (the search looks in the name)."""
    order = [NAME[k] for k in make_workflows.WORKFLOW_TITLES]
    assert sorted(EXPECTED) == order
    assert order[0] == "MaX4Zero 1 - Quick try-on" and order[1] == "MaX4Zero 2 - Full try-on"
    assert order.index(NAME["masks"]) > order.index(NAME["sdxl"])  # needs the SAM3 weights: late
    for name in order:
        assert name.startswith("MaX4Zero ") and "try-on" in name.lower(), name
        assert "_" not in name and "+" not in name, name


def _controls(wf: dict) -> dict[str, dict]:
    return {n["title"]: n for n in wf["nodes"] if n["type"] == "PrimitiveInt" and n.get("title") in CONTROL_TITLES}


def dependent_widgets(wf: dict) -> dict[str, list[tuple[dict, str]]]:
    """Control title -> the (node, widget) pairs that must follow it: the crops' size and the stage-2 mask's width
    and height follow the working size; every sampler's steps and the last sampler's end follow the total; the
    split follows 'Stage 1 ends at step'."""
    out: dict[str, list[tuple[dict, str]]] = {"Working size": [], "Total steps": [], "Stage 1 ends at step": []}
    for n in _by_type(wf, "MaX4ZeroCropToMask"):
        out["Working size"].append((n, "size"))
    for n in _by_type(wf, "SolidMask"):
        out["Working size"] += [(n, "width"), (n, "height")]
    for n in _by_type(wf, "KSampler"):
        out["Total steps"].append((n, "steps"))
    advanced = sorted(_by_type(wf, "KSamplerAdvanced"), key=lambda n: _widget(wf, n, "start_at_step"))
    if advanced:
        s1, s2 = advanced
        out["Total steps"] += [(s1, "steps"), (s2, "steps"), (s2, "end_at_step")]
        out["Stage 1 ends at step"] += [(s1, "end_at_step"), (s2, "start_at_step")]
    return {k: v for k, v in out.items() if v}


def control_problems(wf: dict) -> list[str]:
    """What keeps a workflow's size and steps from being set in one place."""
    problems = []
    controls = _controls(wf)
    for title, targets in dependent_widgets(wf).items():
        ctl = controls.get(title)
        if ctl is None:
            problems.append(f"no {title!r} control")
            continue
        value = ctl["widgets_values"][0]
        for node, widget in targets:
            where = f"node {node['id']} ({node['type']}).{widget}"
            if _link_source(wf, node, widget) != (ctl["id"], 0):
                problems.append(f"{where} is not wired to {title!r}")
            if _widget(wf, node, widget, SNAPSHOT_VERSIONS[-1]) != value:
                problems.append(f"{where} = {_widget(wf, node, widget, SNAPSHOT_VERSIONS[-1])}, {title!r} = {value}")
    for title, ctl in controls.items():
        used = [lk for lk in wf["links"] if lk[1] == ctl["id"]]
        if len(used) != len(dependent_widgets(wf).get(title, [])):
            problems.append(f"{title!r} feeds {len(used)} widgets")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_size_and_steps_are_set_in_one_place(path):
    wf = _load(path)
    assert control_problems(wf) == []
    controls = _controls(wf)
    if path.stem == NAME["masks"]:
        assert not controls  # no size, no steps: nothing to set
        return
    assert {"Working size", "Total steps"} <= set(controls)
    assert ("Stage 1 ends at step" in controls) == bool(_by_type(wf, "KSamplerAdvanced"))
    first = wf["groups"][0]["bounding"]
    assert all(_inside(_box(c), first) for c in controls.values())  # at the top of the first group, by the Note
    assert min(c["pos"][1] for c in controls.values()) <= min(
        n["pos"][1] for n in wf["nodes"] if n["type"] not in NOTES and n not in controls.values())
    if path.stem in TWO_STAGE:  # the paper's values as the defaults
        size = 1024 if path.stem == NAME["sdxl"] else 512
        assert [controls[t]["widgets_values"][0] for t in ("Working size", "Total steps", "Stage 1 ends at step")] \
            == [size, 50, 35]
        # MEA acts on every step of the stage-2 sampler, so it follows the split wherever it is set
        mea = _by_type(wf, "MaX4ZeroMaskedExtendedAttention")[0]
        assert (_widget(wf, mea, "start"), _widget(wf, mea, "end")) == (0.0, 1.0)


@pytest.mark.parametrize("mutate, expect", [
    (lambda wf: next(i for i in _by_type(wf, "SolidMask")[0]["inputs"] if i["name"] == "width").__setitem__(
        "link", None), "not wired"),
    (lambda wf: _by_type(wf, "MaX4ZeroCropToMask")[0]["widgets_values"].__setitem__(0, 384), "= 384"),
    (lambda wf: wf["nodes"].remove(_controls(wf)["Stage 1 ends at step"]), "no 'Stage 1 ends at step'"),
])
def test_control_check_can_fail(mutate, expect):
    wf = copy.deepcopy(_load(WORKFLOW_DIR / f"{NAME['full']}.json"))
    mutate(wf)
    assert any(expect in p for p in control_problems(wf)), control_problems(wf)


def _slot_y(node: dict, slot: int) -> float:
    return node["pos"][1] + 20.0 * (slot + 0.5)


def wire_paths(wf: dict) -> dict[int, list[tuple[float, float]]]:
    """Link id -> the points its wire passes: the output slot, its reroutes (extra.reroutes), the input slot."""
    by_id = {n["id"]: n for n in wf["nodes"]}
    reroutes = {r["id"]: r for r in wf["extra"].get("reroutes", [])}
    parent = {e["id"]: e["parentId"] for e in wf["extra"].get("linkExtensions", [])}
    paths = {}
    for lid, a, a_slot, b, b_slot, _ in wf["links"]:
        src, dst = by_id[a], by_id[b]
        via, rid = [], parent.get(lid)
        while rid is not None:
            via.append(tuple(reroutes[rid]["pos"]))
            assert lid in reroutes[rid]["linkIds"], (lid, rid)
            rid = reroutes[rid].get("parentId")
        paths[lid] = ([(src["pos"][0] + src["size"][0], _slot_y(src, a_slot))] + via[::-1]
                      + [(dst["pos"][0], _slot_y(dst, b_slot))])
    return paths


def groups_crossed(wf: dict) -> dict[int, list[str]]:
    """Link id -> titles of the groups its wire crosses that hold neither of its ends (straight segments)."""
    groups = wf["groups"]
    by_id = {n["id"]: n for n in wf["nodes"]}
    holder = {}
    for n in wf["nodes"]:
        holder[n["id"]] = next((g["title"] for g in groups if _inside(_box(n), g["bounding"])), None)
    out = {}
    for (lid, a, _, b, _, _), path in zip(wf["links"], wire_paths(wf).values()):
        served = {holder[a], holder[b]}
        hit = set()
        for (x0, y0), (x1, y1) in zip(path, path[1:]):
            for k in range(101):
                x, y = x0 + (x1 - x0) * k / 100, y0 + (y1 - y0) * k / 100
                for g in groups:
                    gx, gy, gw, gh = g["bounding"]
                    if g["title"] not in served and gx < x < gx + gw and gy < y < gy + gh:
                        hit.add(g["title"])
        if hit:
            out[lid] = sorted(hit)
        assert by_id[a] and by_id[b]
    return out


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_wire_crosses_a_group_it_does_not_serve(path):
    """Long wires (inputs → stage 2, say) run under the groups through native reroutes instead of across them."""
    wf = _load(path)
    crossed = groups_crossed(wf)
    assert all(len(v) <= 1 for v in crossed.values()), crossed
    assert not crossed, crossed  # in fact none at all


def test_wire_check_can_fail():
    wf = copy.deepcopy(_load(WORKFLOW_DIR / f"{NAME['full']}.json"))
    wf["extra"]["linkExtensions"] = []  # every wire drawn straight again
    assert any(len(v) >= 2 for v in groups_crossed(wf).values())


#: The smallest screen the saved view must serve (CSS px of the canvas) and the smallest readable zoom there.
SCREEN = (1280, 720)
READABLE_SCALE = 0.75


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_opens_where_the_note_and_the_first_group_read(path):
    """The saved view (extra.ds): a zoom where node text reads, the Note's top-left corner on screen and the first
    group's title bar on screen too, the rest a scroll away."""
    wf = _load(path)
    ds = wf["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    assert READABLE_SCALE <= scale <= 1.25

    def screen(x, y):
        return (x + ox) * scale, (y + oy) * scale

    note = wf["nodes"][0]
    nx, ny = screen(note["pos"][0], note["pos"][1] - TITLE_H)
    assert 0 <= nx <= 60 and 0 <= ny <= 120, (nx, ny)
    gx, gy, gw, _ = wf["groups"][0]["bounding"]
    left, top = screen(gx, gy)
    assert left < SCREEN[0] - 300 and 0 <= top < SCREEN[1] / 3, (left, top)
    assert note["size"][0] * scale < SCREEN[0] / 2


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_marked_to_open_at_the_saved_view_from_the_template_browser(path):
    """Frontend 1.49 fits a template to the window; web/saved_view.js sets the saved view instead, for the workflows
    that carry its marker (and the marker's name is the one the script reads). The browser check opens each one
    from the template browser in both frontends."""
    assert _load(path)["extra"].get("max4zero") == {"opens_at_saved_view": True}
    script = (ROOT / "web" / "saved_view.js").read_text(encoding="utf-8")
    assert 'const MARKER = "max4zero";' in script and "extra?.[MARKER]?.opens_at_saved_view" in script


def test_group_titles_name_what_the_group_does_without_numbers():
    """Numbers (steps, sizes) live in the widgets: a title that repeats one goes stale after an edit."""
    import re

    for path in WORKFLOWS:
        for g in _load(path)["groups"]:
            rest = g["title"].split("·", 1)[1]
            assert not re.search(r"\d+\s*(→|->|px|steps?\b)|steps? \d", rest), g["title"]
