"""How long each shipped workflow takes on this machine: its API prompt queued on a real ComfyUI server.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/its/python bench/bench_workflows.py [--only 1,2] [--out times.json]

Each workflow in ``workflows/`` is turned into the API prompt ComfyUI runs (the widgets by name, links followed
through a bypassed node as the frontend does) and queued twice on a ComfyUI server started with ``--cpu``: at the
workflow's own size and steps (its "Working size", "Total steps" and "Stage 1 ends at step" controls) and at a
quick setting (:data:`QUICK`). The time is the prompt's wall time from queueing to the end of execution, model
loading included, with ComfyUI's cache emptied first (``POST /free``).

The models are the browser check's random-weight files (``tests/comfyui/browser_support.py``): SD1.5's layout with
a REDUCED-depth UNet (one res block per level, all levels 320 channels) and the full-size CLIP-L and VAE. The
numbers therefore show how the time is spread and how it scales with size and steps on this machine; a real SD1.5
UNet does more work per step. Workflows that need weights the check does not build (SDXL: a 2.6 B UNet, built
only with ``--sdxl``; the masks: SAM 3.1 and BiRefNet; Flux: a full-size T5-XXL, 13 GiB of RAM) are reported as
not measured, with the reason.
Prints a Markdown table; ``--out`` also writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests" / "comfyui"))

import make_workflows as mw  # noqa: E402

#: The quick setting a newcomer tries first on a slow machine: half the size, fewer steps, the 70 % split kept.
QUICK = {"Working size": 256, "Total steps": 20, "Stage 1 ends at step": 14}
NOT_MEASURED = {
    "sdxl": "needs a full-size SDXL UNet (2.6 B parameters, ~14 GB of RAM in fp32): run with --sdxl",
    "masks": "needs the real SAM 3.1 and BiRefNet weights",
    "flux_fill": "needs a full-size T5-XXL (13 GiB of free RAM) and FLUX.1 Fill (12 B parameters)",
    "flux2_klein": "needs the full-size FLUX.2 klein 4B (the check's reduced model says nothing about the time)",
    "qwen_edit": "needs the full-size Qwen-Image-Edit (20 B parameters) and Qwen2.5-VL 7B",
}
NOTES = ("Note", "MarkdownNote")


def api_prompt(wf: dict, controls: dict[str, int] | None = None) -> dict:
    """The API prompt of a UI-format workflow; ``controls`` sets the size/steps controls by title."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf["links"]}

    def source(link_id: int) -> list:
        _, a, slot, *_ = links[link_id]
        while nodes[a]["mode"] == 4:  # bypassed: its input of the same type goes through
            kind = nodes[a]["outputs"][slot]["type"]
            inp = next(i for i in nodes[a]["inputs"] if i["type"] == kind and i.get("link") is not None)
            _, a, slot, *_ = links[inp["link"]]
        return [str(a), slot]

    prompt = {}
    for n in wf["nodes"]:
        if n["type"] in NOTES or n["mode"] != 0:
            continue
        inputs = {i["name"]: source(i["link"]) for i in n.get("inputs", []) if i.get("link") is not None}
        values = iter(n.get("widgets_values", []))
        for name, spec, _ in mw.ordered_inputs(n["type"]):
            if not mw.is_widget(spec):
                continue
            value = next(values)
            if mw.has_control(name, spec):
                next(values)
            if name != "upload" and name not in inputs:
                inputs[name] = value
        if n["type"] == "PrimitiveInt" and controls and n.get("title") in controls:
            inputs["value"] = controls[n["title"]]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def shipped_setting(wf: dict) -> dict[str, int]:
    return {n["title"]: n["widgets_values"][0] for n in wf["nodes"]
            if n["type"] == "PrimitiveInt" and n.get("title") in QUICK}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="workflow numbers, e.g. 1,2 (default: every measurable one)")
    ap.add_argument("--out", type=Path, help="also write the numbers here as JSON")
    ap.add_argument("--sdxl", action="store_true",
                    help="build and use a full-size random SDXL checkpoint (~7 GB on disk, ~14 GB of RAM) for "
                         "the SDXL workflow instead of reporting it as not measured")
    ap.add_argument("--settings", default="quick,default", help="which settings to time (quick, default)")
    args = ap.parse_args(argv)
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        print("set COMFYUI_PATH to a ComfyUI checkout and run with its Python", file=sys.stderr)
        return 2
    import browser_support as bs

    only = {int(x) for x in args.only.split(",") if x.strip()}
    keys = [k for k in mw.WORKFLOW_TITLES if not only or mw.WORKFLOW_TITLES[k][0] in only]
    cache = bs.ensure_models(root)
    sdxl = bs.ensure_sdxl(root) if args.sdxl else None
    base = bs.make_base_dir(cache, sdxl=sdxl)
    server = bs.ComfyServer(root, base).start()
    rows = []
    try:
        for key in keys:
            name = mw.workflow_name(key)
            wf = json.loads((ROOT / "workflows" / f"{name}.json").read_text(encoding="utf-8"))
            default = shipped_setting(wf)
            row = {"workflow": name, "default": default, "quick": {k: QUICK[k] for k in default}}
            if key in NOT_MEASURED and not (key == "sdxl" and sdxl is not None):
                row["not_measured"] = NOT_MEASURED[key]
                rows.append(row)
                continue
            settings = args.settings.split(",")
            for setting in [x for x in ("quick", "default") if x in settings]:
                row[f"{setting}_s"] = run_once(server, wf, row[setting], name, setting)
            rows.append(row)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    cpus = os.cpu_count()
    print(f"\n| workflow | default (size, steps) | CPU, {cpus} cores | quick | CPU, {cpus} cores |\n|---|---|---|---|---|")
    for r in rows:
        d, q = r["default"], r["quick"]

        def cell(s: dict) -> str:
            return f"{s.get('Working size', '—')} px, {s.get('Total steps', '—')} steps" if s else "—"

        if "not_measured" in r:
            print(f"| {r['workflow']} | {cell(d)} | not measured | {cell(q)} | not measured |")
        else:
            def secs(key: str) -> str:
                return f"{r[key]} s" if key in r else "not measured"

            print(f"| {r['workflow']} | {cell(d)} | {secs('default_s')} | {cell(q)} | {secs('quick_s')} |")
    if args.out:
        args.out.write_text(json.dumps({"cpus": cpus, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


def run_once(server, wf: dict, setting: dict[str, int], name: str, label: str) -> float:
    """Seconds from queueing ``wf`` at ``setting`` to the end of its execution, ComfyUI's cache emptied first."""
    import browser_support as bs

    server.post_json("/free", {"free_memory": True, "unload_models": True})
    time.sleep(2.0)
    t0 = time.perf_counter()
    code, body = server.post_json("/prompt", {"prompt": api_prompt(wf, setting)})
    if code != 200 or body.get("node_errors"):
        raise RuntimeError(f"{name}: /prompt refused it ({code}): {json.dumps(body)[:2000]}")
    entry = bs.wait_history(server, body["prompt_id"], timeout=7200)
    err = bs.execution_error(entry)
    if err:
        raise RuntimeError(f"{name}: {err}")
    took = round(time.perf_counter() - t0, 1)
    print(f"{name} {label} {setting}: {took} s", file=sys.stderr, flush=True)
    return took


if __name__ == "__main__":
    sys.exit(main())
