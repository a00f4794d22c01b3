"""Regenerate the ``/object_info`` snapshots used by ``tests/test_workflows.py``.

Run with the Python of a ComfyUI install (it imports ComfyUI)::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python tests/data/make_object_info.py

What it does, in-process and through ComfyUI's own code:

1. boots ComfyUI on the CPU, loads every built-in node (``nodes.init_extra_nodes``: ``nodes.py`` and
   ``comfy_extras/``, no other custom nodes) and then this pack through ``nodes.load_custom_node``;
2. builds a real ``server.PromptServer`` and calls its own ``GET /object_info`` handler, so the
   JSON is exactly what the frontend receives;
3. keeps only the node types that ``workflows/*.json`` use and writes
   ``object_info_core-<version>.json`` (ComfyUI's nodes) and ``object_info_pack-<version>.json`` (this
   pack's nodes: the widget ranges and defaults, which ``node_schema_snapshot.json`` does not record),
   one pair per supported ComfyUI version (``tests/test_workflows.py`` checks against every pair).

Model and input folders point at a temporary directory holding empty files with the names the
shipped workflows use, so file-name combos (``ckpt_name``, ``image`` ...) list exactly those names
and the snapshot does not depend on the machine that made it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACK_ROOT = HERE.parents[1]
WORKFLOWS = PACK_ROOT / "workflows"
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}

# The file names the shipped workflows load (the browser check creates random-weight files with them).
MODEL_FILES = {
    "checkpoints": ["sd-v1-5-inpainting.ckpt", "sd_xl_base_1.0_inpainting_0.1.safetensors",
                    "sam3.1_multiplex_fp16.safetensors"],
    "loras": ["garment_detail_lora.safetensors"],
    "controlnet": ["control_v11p_sd15_openpose_fp16.safetensors"],
    "background_removal": ["birefnet.safetensors"],
    "diffusion_models": ["flux1-fill-dev.safetensors", "flux-2-klein-4b-fp8.safetensors",
                         "qwen_image_edit_2511_fp8mixed.safetensors"],
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors", "qwen_3_4b.safetensors",
                      "qwen_2.5_vl_7b_fp8_scaled.safetensors"],
    "vae": ["ae.safetensors", "flux2-vae.safetensors", "qwen_image_vae.safetensors"],
}
INPUT_FILES = ["max4zero_person.png", "max4zero_person_mask.png", "max4zero_garment.png",
               "max4zero_garment_mask.png", "max4zero_pose.png"]


# Core nodes tools/make_workflows.py may place that no shipped workflow uses yet (the generator reads the
# snapshot, so a new node type must be in it before the workflows can be regenerated).
GENERATOR_TYPES = {"SolidMask", "SetLatentNoiseMask", "MaskComposite", "GrowMask", "PrimitiveInt"}
# The masks workflow's core segmentation nodes exist from ComfyUI 0.33 on (an older ComfyUI simply lacks them:
# they are left out of its snapshot, and tests/test_workflows.py checks that workflow from 0.33 on).
GENERATOR_TYPES_0_33 = {"SAM3_Detect", "LoadBackgroundRemovalModel", "RemoveBackground",
                        # the Flux Fill try-on (MEA on Flux needs 0.33's attention hook)
                        "UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance", "ConditioningZeroOut",
                        # the FLUX.2 klein and Qwen-Image-Edit try-ons (MEA on them needs 0.33's hooks)
                        "CLIPLoader", "ModelSamplingAuraFlow"}


def used_node_types() -> set[str]:
    types: set[str] = set(GENERATOR_TYPES) | GENERATOR_TYPES_0_33
    for f in sorted(WORKFLOWS.glob("*.json")):
        types.update(n["type"] for n in json.loads(f.read_text(encoding="utf-8"))["nodes"])
    return types - FRONTEND_ONLY


def boot(comfyui_path: str, scratch: Path):
    root = str(Path(comfyui_path).resolve())
    pack = str(PACK_ROOT)
    # The pack has a nodes/ folder: ComfyUI's nodes.py must be the 'nodes' module.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) not in (pack, str(HERE))]
    sys.path.insert(0, root)
    os.chdir(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import utils.install_util  # noqa: F401  (as main.py does: 'utils' is ComfyUI's package, not comfy/utils.py)
    import folder_paths

    for folder, names in MODEL_FILES.items():
        d = scratch / folder
        d.mkdir(parents=True)
        for name in names:
            (d / name).write_bytes(b"")
        if folder in folder_paths.folder_names_and_paths:  # background_removal / detection: 0.33 on
            folder_paths.folder_names_and_paths[folder] = ([str(d)], folder_paths.folder_names_and_paths[folder][1])
    (scratch / "input").mkdir()
    for name in INPUT_FILES:
        (scratch / "input" / name).write_bytes(b"")
    folder_paths.set_input_directory(str(scratch / "input"))
    folder_paths.set_output_directory(str(scratch / "output"))
    folder_paths.set_temp_directory(str(scratch / "temp"))
    folder_paths.set_user_directory(str(scratch / "user"))

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    core = set(nodes.NODE_CLASS_MAPPINGS)
    if not asyncio.run(nodes.load_custom_node(pack, ignore=core, module_parent="custom_nodes")):
        raise SystemExit(f"ComfyUI failed to load the pack at {pack}: see the log above")
    return core, set(nodes.NODE_CLASS_MAPPINGS) - core


def object_info() -> dict:
    """The body of ``GET /object_info`` from ComfyUI's own route handler."""
    import server

    async def call():
        srv = server.PromptServer(asyncio.get_running_loop())
        for route in srv.routes:
            if getattr(route, "method", None) == "GET" and getattr(route, "path", None) == "/object_info":
                resp = await route.handler(None)
                return json.loads(resp.body)
        raise SystemExit("server.PromptServer has no GET /object_info route: update this script")

    return asyncio.run(call())


def main() -> None:
    comfyui_path = os.environ.get("COMFYUI_PATH", "").strip()
    if not comfyui_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (and run with its Python)")
    used = used_node_types()
    with tempfile.TemporaryDirectory(prefix="max4zero-objinfo-") as tmp:
        core, pack = boot(comfyui_path, Path(tmp))
        info = object_info()
    unknown = sorted(used - core - pack - GENERATOR_TYPES_0_33)
    if unknown:
        raise SystemExit(f"workflows use node types this ComfyUI does not have: {unknown}")
    import comfyui_version

    version = comfyui_version.__version__
    missing_new = sorted(GENERATOR_TYPES_0_33 - core)
    if missing_new:
        print(f"ComfyUI {version} lacks {missing_new}: workflows using them need a newer ComfyUI (MIN_COMFYUI)")
    for name, ids in ((f"object_info_core-{version}.json", used & core), (f"object_info_pack-{version}.json", pack)):
        out = {"_comfyui_version": comfyui_version.__version__}
        out.update({k: info[k] for k in sorted(ids)})
        for entry in out.values():
            if isinstance(entry, dict) and str(entry.get("python_module", "")).startswith("custom_nodes."):
                # The folder the pack was loaded from (a clone's name): not part of the schema.
                entry["python_module"] = "custom_nodes.max4zero-tryon"
        (HERE / name).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {HERE / name}: {len(ids)} node types (ComfyUI {comfyui_version.__version__})")


if __name__ == "__main__":
    main()
