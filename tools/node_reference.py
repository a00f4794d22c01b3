"""The node reference (``docs/nodes.md``), generated from the pack's ``/object_info`` (``python tools/node_reference.py``).

Reads ``tests/data/object_info_pack-<oldest supported version>.json`` (what ComfyUI shows for each node: the
description, every input's tooltip and default, every output's tooltip) and writes ``docs/nodes.md``. ``--check``
exits 1 when the file differs (``tests/test_node_reference.py`` runs it), so the reference never drifts from the
tooltips.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "data" / "object_info_pack-0.3.64.json"
REFERENCE = ROOT / "docs" / "nodes.md"
# The order the pipeline uses them in.
ORDER = ("MaX4ZeroCorrespondence", "MaX4ZeroMLSWarp", "MaX4ZeroDoubleMaskInpaint", "MaX4ZeroCropToMask",
         "MaX4ZeroPasteBack", "MaX4ZeroMaskedExtendedAttention", "MaX4ZeroFlowView")
START = "# Node reference\n"
INTRO = (
    "Node ids, input names and output names never change once released: saved workflows depend on them\n"
    "(`tests/comfyui/test_node_schemas.py` compares every node with a committed snapshot). All nodes are under the\n"
    "**MaX4Zero** category. This page is generated from the nodes' own descriptions and tooltips\n"
    "(`python tools/node_reference.py`); ComfyUI shows the same text when you hover an input.\n"
)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def node_section(node_id: str, info: dict) -> str:
    lines = [f"## {info['display_name']} — `{node_id}`", "", _cell(info.get("description", "")), "",
             "| input | default | what it does |", "|---|---|---|"]
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in opts:
                default = opts["default"]
            elif isinstance(spec[0], list) and spec[0]:
                default = spec[0][0]
            else:
                default = "optional" if section == "optional" else "—"
            shown = '""' if default == "" else _cell(default)
            lines.append(f"| `{name}` | {shown} | {_cell(opts.get('tooltip', ''))} |")
    lines += ["", "| output | what it is |", "|---|---|"]
    tips = info.get("output_tooltips") or [""] * len(info["output_name"])
    for name, tip in zip(info["output_name"], tips):
        lines.append(f"| `{name}` | {_cell(tip or '')} |")
    return "\n".join(lines) + "\n"


def reference() -> str:
    info = {k: v for k, v in json.loads(SNAPSHOT.read_text(encoding="utf-8")).items() if not k.startswith("_")}
    missing = sorted(set(info) - set(ORDER))
    if missing:
        raise SystemExit(f"add {missing} to ORDER in {Path(__file__).name}")
    return START + "\n" + INTRO + "\n" + "\n".join(node_section(n, info[n]) for n in ORDER if n in info) + "\n"


def main(argv: list[str]) -> int:
    new = reference()
    if "--check" in argv:
        if not REFERENCE.is_file() or REFERENCE.read_text(encoding="utf-8") != new:
            print(f"{REFERENCE} is out of date: run python tools/node_reference.py")
            return 1
        return 0
    REFERENCE.write_text(new, encoding="utf-8")
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
