"""Reading ComfyUI's API-format prompt (the hidden ``PROMPT`` input): which node outputs a value was made from.

A prompt is ``{node_id: {"class_type": str, "inputs": {name: value}, "_meta": {"title": str}}}``; an input linked to
another node's output is ``[source_id, output_index]``. Nothing here imports ComfyUI, so the normal suite tests it.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["is_link", "upstream_outputs", "node_label", "other_crop_problem"]

CROP_TO_MASK = "MaX4ZeroCropToMask"
#: Crop To Mask's outputs that carry the crop's pixels (its image and mask), not its crop_info.
CROP_PIXEL_OUTPUTS = (0, 1)


def is_link(value: Any) -> bool:
    """An input value that is a link ``[source_id, output_index]``."""
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def upstream_outputs(prompt: dict, link: Any) -> set[tuple[str, int]]:
    """Every ``(node_id, output_index)`` the value at ``link`` was computed from, the link's own source included.

    >>> p = {"1": {"class_type": "A", "inputs": {}}, "2": {"class_type": "B", "inputs": {"x": ["1", 0]}}}
    >>> sorted(upstream_outputs(p, ["2", 0]))
    [('1', 0), ('2', 0)]
    """
    seen: set[tuple[str, int]] = set()
    expanded: set[str] = set()
    stack = [link]
    while stack:
        current = stack.pop()
        if not is_link(current):
            continue
        key = (str(current[0]), int(current[1]))
        if key in seen:
            continue
        seen.add(key)
        node = prompt.get(key[0])
        if key[0] in expanded or not isinstance(node, dict):
            continue
        expanded.add(key[0])
        stack.extend(v for v in (node.get("inputs") or {}).values() if is_link(v))
    return seen


def node_label(prompt: dict, node_id: str, display_name: str) -> str:
    """How a message names a node of the prompt: its title when the user gave one, and its id."""
    node = prompt.get(str(node_id)) or {}
    title = ((node.get("_meta") or {}).get("title") or "").strip()
    return f"{title} (node {node_id})" if title and title != display_name else f"{display_name} (node {node_id})"


def other_crop_problem(prompt: Any, node_id: Any, crop_display_name: str = "MaX4Zero Crop To Mask"
                       ) -> Optional[tuple[str, str]]:
    """``(problem, fix)`` when Paste Back ``node_id`` pastes an image generated from one crop of a photo with the
    ``crop_info`` of ANOTHER crop of the same photo (two Crop To Mask nodes on one image), else None.

    Read from the prompt's links, not from pixels: ``generated_image`` descends from the image or mask of some Crop To
    Mask nodes; when the one that made ``crop_info`` is not among them but another crop of the same ``image`` is, the
    crop would land in the wrong box. When both crops are among them (or no crop is), nothing is said.
    """
    if not isinstance(prompt, dict) or node_id is None or str(node_id) not in prompt:
        return None
    inputs = prompt[str(node_id)].get("inputs") or {}
    crop_info, generated = inputs.get("crop_info"), inputs.get("generated_image")
    if not is_link(crop_info) or not is_link(generated):
        return None
    source = str(crop_info[0])
    if (prompt.get(source) or {}).get("class_type") != CROP_TO_MASK:
        return None
    crops = {nid for nid, out in upstream_outputs(prompt, generated)
             if out in CROP_PIXEL_OUTPUTS and (prompt.get(nid) or {}).get("class_type") == CROP_TO_MASK}
    if not crops or source in crops:
        return None
    photo = (prompt[source].get("inputs") or {}).get("image")
    same = sorted(nid for nid in crops if (prompt[nid].get("inputs") or {}).get("image") == photo)
    if not same:
        return None
    made, given = node_label(prompt, same[0], crop_display_name), node_label(prompt, source, crop_display_name)
    return (f"generated_image was made from the crop of {made}, but crop_info comes from {given}, another crop of the "
            "same photo: the result would be pasted into the wrong box",
            f"connect the crop_info output of {made} to crop_info")
