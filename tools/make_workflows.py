"""Write the example workflows in ``workflows/`` (UI format, version 0.4), as the ComfyUI frontend saves them.

Run from the repository root (plain Python, no ComfyUI needed)::

    python tools/make_workflows.py

Node inputs, outputs and widgets come from the ``/object_info`` snapshots in ``tests/data/`` and follow
the frontend's rules (comfyui-frontend-package 1.27): sockets first, then one socket per widget; widgets in
``input_order`` (required, then optional); an extra ``control_after_generate`` value after INT inputs that
ask for it or are called ``seed``/``noise_seed``; LoadImage-style combos get a trailing ``upload`` widget.
Layout: each node names its column; columns go left → right, nodes stack top → bottom without overlaps.
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
SD15 = "sd15_inpainting.safetensors"
SDXL = "sdxl_inpainting.safetensors"
LORA = "garment_detail_lora.safetensors"
CONTROLNET = "control_v11p_sd15_openpose.safetensors"
PERSON, PERSON_MASK = "max4zero_person.png", "max4zero_person_mask.png"
GARMENT, GARMENT_MASK = "max4zero_garment.png", "max4zero_garment_mask.png"
POSE = "max4zero_pose.png"
SEED = 42

INFO: dict = {}
# The oldest supported ComfyUI's schemas: the workflows must load there (tests/test_workflows.py checks every
# supported version's snapshot).
for _name in ("object_info_core-0.3.64.json", "object_info_pack-0.3.64.json"):
    INFO.update({k: v for k, v in json.loads((DATA / _name).read_text(encoding="utf-8")).items()
                 if not k.startswith("_")})

COL_GAP = 60   # horizontal space between columns
ROW_GAP = 60   # vertical space between nodes (the title bar, 30 px, sits above pos)
TITLE_H = 30


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
    def __init__(self, wf: "Workflow", node_type: str, col: int, widgets: dict, box=None):
        self.wf, self.type, self.col = wf, node_type, col
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
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self._id = 0

    def next_id(self) -> int:
        self._id += 1
        return self._id

    def add(self, node_type: str, col: int, box=None, **widgets) -> Node:
        n = Node(self, node_type, col, widgets, box)
        self.nodes.append(n)
        return n

    def note(self, col: int, text: str, box=(400, 260)) -> Node:
        return self.add("Note", col, box=box, text=text)

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
            for i in ready:
                order[i] = len(order)
            done |= set(ready)
        return order

    def _layout(self) -> dict[int, list[float]]:
        cols: dict[int, list[Node]] = {}
        for n in self.nodes:
            cols.setdefault(n.col, []).append(n)
        pos, x = {}, 0.0
        for c in sorted(cols):
            width = max(n.compute_size()[0] for n in cols[c])
            y = 0.0
            for n in cols[c]:
                pos[n.id] = [x, y]
                y += n.compute_size()[1] + ROW_GAP + TITLE_H
            x += width + COL_GAP
        return pos

    def to_json(self) -> dict:
        order, pos = self._order(), self._layout()
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
            d["widgets_values"] = n.widget_values()
            nodes.append(d)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "max4zero/" + self.name)),
            "revision": 0,
            "last_node_id": self._id,
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [80, 80]}, "frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }

    def write(self) -> Path:
        path = OUT / f"{self.name}.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path


# ------------------------------------------------------------------------------------------------
# building blocks shared by the workflows
# ------------------------------------------------------------------------------------------------

IMG = (320, 330)  # LoadImage / preview nodes: room for the picture
PREVIEW = (300, 300)


def loaders(wf: Workflow, ckpt: str, col: int = 0):
    """Checkpoint + prompts + the four photos/masks (LoadImageMask, channel red)."""
    ckpt_node = wf.add("CheckpointLoaderSimple", col, ckpt_name=ckpt)
    person = wf.add("LoadImage", col, box=IMG, image=PERSON)
    person_mask = wf.add("LoadImageMask", col, box=IMG, image=PERSON_MASK, channel="red")
    garment = wf.add("LoadImage", col, box=IMG, image=GARMENT)
    garment_mask = wf.add("LoadImageMask", col, box=IMG, image=GARMENT_MASK, channel="red")
    return ckpt_node, person, person_mask, garment, garment_mask


def prompts(wf: Workflow, clip_src, col: int):
    pos = wf.wire(wf.add("CLIPTextEncode", col, box=(400, 130), text=POSITIVE), clip=clip_src)
    neg = wf.wire(wf.add("CLIPTextEncode", col, box=(400, 130), text=NEGATIVE), clip=clip_src)
    return pos, neg


def crops(wf: Workflow, person, person_mask, garment, garment_mask, col: int, size: int):
    tgt = wf.wire(wf.add("MaX4ZeroCropToMask", col, size=size, padding=0.1), image=person, mask=person_mask)
    ref = wf.wire(wf.add("MaX4ZeroCropToMask", col, size=size, padding=0.1), image=garment, mask=garment_mask)
    return tgt, ref


def preview(wf: Workflow, src, col: int, mask: bool = False):
    if mask:
        src = wf.wire(wf.add("MaskToImage", col), mask=src).out(0)
    return wf.wire(wf.add("PreviewImage", col, box=PREVIEW), images=src)


def two_stage_tryon(wf: Workflow, *, model_src, vae_src, pos, neg, mea_pos, tgt, ref, cols: tuple[int, ...],
                    size: int, previews: bool = True, layers: str | None = None, save_prefix: str = "MaX4Zero"):
    """Correspondence → MLS warp → double mask → KSamplerAdvanced 0→35 → MEA → KSamplerAdvanced 35→50 →
    decode → paste back. Returns the nodes the callers still need."""
    c_reg, c_s1, c_s2, c_out = cols
    corr = wf.wire(wf.add("MaX4ZeroCorrespondence", c_reg, mode="paper", seed=SEED),
                   model=model_src, vae=vae_src, positive=pos, reference_image=ref.out("image"),
                   garment_mask=ref.out("mask"), target_image=tgt.out("image"), target_mask=tgt.out("mask"))
    warp = wf.wire(wf.add("MaX4ZeroMLSWarp", c_reg), reference_image=ref.out("image"),
                   garment_mask=ref.out("mask"), target_image=tgt.out("image"), matches=corr.out("matches"))
    dm = wf.wire(wf.add("MaX4ZeroDoubleMaskInpaint", c_s1), positive=pos, negative=neg, vae=vae_src,
                 target_image=tgt.out("image"), target_mask=tgt.out("mask"),
                 warped_image=warp.out("warped_image"), warped_mask=warp.out("warped_mask"),
                 matches=corr.out("matches"))
    s1 = wf.wire(wf.add("KSamplerAdvanced", c_s1, add_noise="enable", noise_seed=SEED, steps=50, cfg=12.0,
                        sampler_name="ddim", scheduler="ddim_uniform", start_at_step=0, end_at_step=35,
                        return_with_leftover_noise="enable"),
                 model=model_src, positive=dm.out("positive"), negative=dm.out("negative"),
                 latent_image=dm.out("latent"))
    # stage 2 (docs/method.md §3b): the inpaint mask becomes the whole (processed) target mask, over the composite
    ic = wf.wire(wf.add("InpaintModelConditioning", c_s2, noise_mask=True), positive=pos, negative=neg,
                 vae=vae_src, pixels=dm.out("composite"), mask=dm.out("target_mask"))
    # The MEA phase denoises the WHOLE target latent (no blending for a 9-channel model): an all-ones noise mask
    # replaces the stage-1 mask. A target-region mask here would reset the outside to the stage-1 latent, which
    # still carries the noise of step 35, at every step; Paste Back restores the outside in pixels instead.
    whole = wf.add("SolidMask", c_s2, value=1.0, width=size, height=size)
    lat2 = wf.wire(wf.add("SetLatentNoiseMask", c_s2), samples=s1, mask=whole)
    mea_widgets = {"guidance": "paper", "start": 0.7, "end": 1.0}
    if layers:
        mea_widgets["layers"] = layers
    mea = wf.wire(wf.add("MaX4ZeroMaskedExtendedAttention", c_s2, **mea_widgets), model=model_src, vae=vae_src,
                  reference=ref.out("image"), garment_mask=ref.out("mask"), target_mask=dm.out("target_mask"),
                  positive=mea_pos)
    s2 = wf.wire(wf.add("KSamplerAdvanced", c_s2, add_noise="disable", noise_seed=SEED, steps=50, cfg=12.0,
                        sampler_name="ddim", scheduler="ddim_uniform", start_at_step=35, end_at_step=50,
                        return_with_leftover_noise="disable"),
                 model=mea.out("model"), positive=ic.out("positive"), negative=ic.out("negative"),
                 latent_image=lat2)
    dec = wf.wire(wf.add("VAEDecode", c_out), samples=s2, vae=vae_src)
    return {"corr": corr, "warp": warp, "dm": dm, "s1": s1, "mea": mea, "s2": s2, "dec": dec}


def finish(wf: Workflow, person, tgt, dec_src, mask_src, col: int, prefix: str):
    paste = wf.wire(wf.add("MaX4ZeroPasteBack", col, feather=3), original_image=person, generated_image=dec_src,
                    crop_info=tgt.out("crop_info"), mask=mask_src)
    wf.wire(wf.add("SaveImage", col, box=(400, 450), filename_prefix=prefix), images=paste)
    return paste


INPUTS_TEXT = (
    "Inputs (put them in ComfyUI/input/ or use each Load node's upload button):\n"
    f"- {PERSON}: the person photo; {PERSON_MASK}: white where the garment goes (LoadImageMask, channel red)\n"
    f"- {GARMENT}: the garment photo; {GARMENT_MASK}: white on the garment\n"
    "Masks may also come from LoadImage's alpha (its MASK output) or any segmentation pack "
    "(e.g. SAM / clothes segmentation nodes)."
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
    f"Checkpoint: an SD1.5 INPAINTING model (9-channel UNet, e.g. sd-v1-5-inpainting), in ComfyUI/models/"
    f"checkpoints/ (the file here is named {SD15}; pick yours in Load Checkpoint). Crop size 512."
)


# ------------------------------------------------------------------------------------------------
# the five workflows
# ------------------------------------------------------------------------------------------------


def full_tryon() -> Workflow:
    wf = Workflow("maxzero_full_tryon")
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SD15, col=0)
    wf.note(1, "MaX4Zero full try-on (registration + Masked Extended Attention).\n\n" + SD15_TEXT + "\n\n"
            + INPUTS_TEXT + "\n\nStages: crop both photos around their masks -> deep-feature correspondence -> "
            "MLS warp -> double-mask inpaint -> KSampler (Advanced) steps 0-35 of 50 -> Masked Extended Attention "
            "model -> KSampler (Advanced) steps 35-50 -> decode -> paste back into the full photo. Previews show "
            "the matches, the warp, the fringes and the Leffa flow view.\n\n" + PROMPT_TEXT + "\n\n" + STAGE2_TEXT,
            box=(400, 640))
    pos, neg = prompts(wf, ckpt.out("CLIP"), col=1)
    tgt, ref = crops(wf, person, person_mask, garment, garment_mask, col=1, size=512)
    r = two_stage_tryon(wf, model_src=ckpt.out("MODEL"), vae_src=ckpt.out("VAE"), pos=pos, neg=neg, mea_pos=pos,
                        tgt=tgt, ref=ref, cols=(2, 4, 5, 6), size=512)
    preview(wf, r["corr"].out("preview"), col=3)
    preview(wf, r["warp"].out("preview"), col=3)
    preview(wf, r["dm"].out("preview"), col=3)
    preview(wf, r["dm"].out("fringe"), col=3, mask=True)
    flow = wf.wire(wf.add("MaX4ZeroFlowView", 6), trace=r["mea"].out("trace"), reference=ref.out("image"),
                   samples=r["s2"], matches=r["corr"].out("matches"))
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), col=6, prefix="MaX4Zero_tryon")
    preview(wf, flow.out("flow"), col=7)
    preview(wf, flow.out("warped_reference"), col=7)
    preview(wf, flow.out("disagreement"), col=7, mask=True)
    return wf


def reference_only(wf_name: str = "maxzero_reference_only", flow_view: bool = False) -> Workflow:
    wf = Workflow(wf_name)
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SD15, col=0)
    if flow_view:
        intro = ("MaX4Zero attention flow: where does each generated pixel read the garment from? (Leffa "
                 "attention flow). The Masked Extended Attention node records attention only because its 'trace' "
                 "goes to the Leffa Flow View; each map is previewed: flow colour wheel, attention-warped "
                 "garment, reliance (how much each pixel reads the garment), sharpness, and the disagreement "
                 "with the MLS warp of the correspondence matches.")
    else:
        intro = ("MaX4Zero reference try-on, quickest start: no correspondence and no warp. The target region "
                 "is inpainted in one sampler run while Masked Extended Attention (fused guidance, whole "
                 "schedule) lets it read the garment photo.")
    wf.note(1, intro + "\n\n" + SD15_TEXT + "\n\n" + INPUTS_TEXT, box=(400, 380))
    pos, neg = prompts(wf, ckpt.out("CLIP"), col=1)
    tgt, ref = crops(wf, person, person_mask, garment, garment_mask, col=1, size=512)
    ic = wf.wire(wf.add("InpaintModelConditioning", 2, noise_mask=True), positive=pos, negative=neg,
                 vae=ckpt.out("VAE"), pixels=tgt.out("image"), mask=tgt.out("mask"))
    mea = wf.wire(wf.add("MaX4ZeroMaskedExtendedAttention", 2, guidance="fused", start=0.0, end=1.0),
                  model=ckpt.out("MODEL"), vae=ckpt.out("VAE"), reference=ref.out("image"),
                  garment_mask=ref.out("mask"), target_mask=tgt.out("mask"), positive=pos)
    samp = wf.wire(wf.add("KSampler", 3, seed=SEED, steps=30, cfg=7.0, sampler_name="ddim",
                          scheduler="ddim_uniform", denoise=1.0),
                   model=mea.out("model"), positive=ic.out("positive"), negative=ic.out("negative"),
                   latent_image=ic.out("latent"))
    dec = wf.wire(wf.add("VAEDecode", 3), samples=samp, vae=ckpt.out("VAE"))
    if flow_view:
        corr = wf.wire(wf.add("MaX4ZeroCorrespondence", 3, mode="paper", seed=SEED),
                       model=ckpt.out("MODEL"), vae=ckpt.out("VAE"), positive=pos, reference_image=ref.out("image"),
                       garment_mask=ref.out("mask"), target_image=tgt.out("image"), target_mask=tgt.out("mask"))
        flow = wf.wire(wf.add("MaX4ZeroFlowView", 4), trace=mea.out("trace"), reference=ref.out("image"),
                       samples=samp, matches=corr.out("matches"))
        finish(wf, person, tgt, dec, tgt.out("mask"), col=4, prefix="MaX4Zero_flow")
        preview(wf, flow.out("flow"), col=5)
        preview(wf, flow.out("warped_reference"), col=5)
        preview(wf, flow.out("reliance"), col=6, mask=True)
        preview(wf, flow.out("sharpness"), col=6, mask=True)
        preview(wf, flow.out("disagreement"), col=6, mask=True)
    else:
        finish(wf, person, tgt, dec, tgt.out("mask"), col=4, prefix="MaX4Zero_reference")
    return wf


def lora_controlnet() -> Workflow:
    wf = Workflow("maxzero_lora_controlnet")
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SD15, col=0)
    pose = wf.add("LoadImage", 0, box=IMG, image=POSE)
    wf.note(1, "MaX4Zero try-on composed with a LoRA and a ControlNet on the same MODEL.\n\n" + SD15_TEXT
            + f"\nLoRA: an SD1.5 LoRA in ComfyUI/models/loras/ (here {LORA}).\nControlNet: an SD1.5 ControlNet "
            f"in ComfyUI/models/controlnet/ (here {CONTROLNET}).\n\n" + INPUTS_TEXT
            + f"\n- {POSE}: the PREPROCESSED control image of the person photo (an OpenPose skeleton or an edge "
            "map, same size as the person photo; make it with a preprocessor pack, e.g. "
            "comfyui_controlnet_aux). It is cropped with the person mask, exactly like the person photo.\n\n"
            + PROMPT_TEXT + "\n\n" + STAGE2_TEXT, box=(400, 700))
    lora = wf.wire(wf.add("LoraLoader", 1, lora_name=LORA, strength_model=0.8, strength_clip=0.8),
                   model=ckpt.out("MODEL"), clip=ckpt.out("CLIP"))
    text_pos, text_neg = prompts(wf, lora.out("CLIP"), col=1)
    tgt, ref = crops(wf, person, person_mask, garment, garment_mask, col=1, size=512)
    pose_crop = wf.wire(wf.add("MaX4ZeroCropToMask", 1, size=512, padding=0.1), image=pose, mask=person_mask)
    cn = wf.add("ControlNetLoader", 2, control_net_name=CONTROLNET)
    cna = wf.wire(wf.add("ControlNetApplyAdvanced", 2, strength=0.8, start_percent=0.0, end_percent=1.0),
                  positive=text_pos, negative=text_neg, control_net=cn, image=pose_crop.out("image"),
                  vae=ckpt.out("VAE"))
    r = two_stage_tryon(wf, model_src=lora.out("MODEL"), vae_src=ckpt.out("VAE"), pos=cna.out("positive"),
                        neg=cna.out("negative"), mea_pos=text_pos, tgt=tgt, ref=ref, cols=(3, 5, 6, 7), size=512)
    preview(wf, r["corr"].out("preview"), col=4)
    preview(wf, r["warp"].out("preview"), col=4)
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), col=7, prefix="MaX4Zero_lora_controlnet")
    return wf


def sdxl() -> Workflow:
    wf = Workflow("maxzero_sdxl")
    ckpt, person, person_mask, garment, garment_mask = loaders(wf, SDXL, col=0)
    wf.note(1, "MaX4Zero full try-on on an SDXL INPAINTING checkpoint.\n\nCheckpoint: an SDXL inpainting model "
            "(9-channel UNet, e.g. stable-diffusion-xl-1.0-inpainting-0.1) in ComfyUI/models/checkpoints/ (the "
            f"file here is named {SDXL}). Crop size 1024 (SDXL's native size).\n\nLayers are chosen by token "
            "grid, not by block number: SDXL has no attention at 1/8 of the image, so Masked Extended Attention "
            "uses 'decoder 1/32 + 1/16 + 1/8', i.e. SDXL's 32x32 and 64x64 token grids at 1024 px - the same "
            "grids the paper uses on SD1.5 at 512 px. The correspondence reads the first decoder stage at 1/16 "
            "by grid too.\n\n" + INPUTS_TEXT + "\n\n" + PROMPT_TEXT + "\n\n" + STAGE2_TEXT, box=(400, 700))
    pos, neg = prompts(wf, ckpt.out("CLIP"), col=1)
    tgt, ref = crops(wf, person, person_mask, garment, garment_mask, col=1, size=1024)
    r = two_stage_tryon(wf, model_src=ckpt.out("MODEL"), vae_src=ckpt.out("VAE"), pos=pos, neg=neg, mea_pos=pos,
                        tgt=tgt, ref=ref, cols=(2, 4, 5, 6), size=1024, layers="decoder 1/32 + 1/16 + 1/8")
    preview(wf, r["corr"].out("preview"), col=3)
    preview(wf, r["warp"].out("preview"), col=3)
    preview(wf, r["dm"].out("preview"), col=3)
    finish(wf, person, tgt, r["dec"], r["dm"].out("target_mask"), col=6, prefix="MaX4Zero_sdxl")
    return wf


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for wf in (full_tryon(), reference_only(), reference_only("maxzero_attention_flow", flow_view=True),
               lora_controlnet(), sdxl()):
        print("wrote", wf.write().relative_to(ROOT), f"({len(wf.nodes)} nodes, {len(wf.links)} links)")


if __name__ == "__main__":
    main()
