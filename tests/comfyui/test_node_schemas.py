"""Node ids, input names/types and output names/types of EVERY pack node vs a committed snapshot.

Saved workflows refer to nodes by id and to sockets/widgets by name (and combo widgets by value), so
a rename silently breaks users' files. This test makes any such change deliberate.

After an intended change (a NEW node or input, never a rename of a shipped one), regenerate with::

    MAX4ZERO_UPDATE_SNAPSHOT=1 COMFYUI_PATH=/path/to/ComfyUI python -m pytest -q tests/comfyui/test_node_schemas.py

and commit ``tests/comfyui/node_schema_snapshot.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import comfy_models as cm

SNAPSHOT = Path(__file__).with_name("node_schema_snapshot.json")
UPDATE_ENV = "MAX4ZERO_UPDATE_SNAPSHOT"


def schema_summary(cls) -> dict:
    """What saved workflows depend on: id, socket/widget names and types, combo options."""
    schema = cls.GET_SCHEMA()
    inputs = []
    for i in schema.inputs or []:
        entry = {"id": i.id, "type": str(i.get_io_type()), "optional": bool(i.optional)}
        options = getattr(i, "options", None)
        if options is not None:
            entry["options"] = list(options)
        inputs.append(entry)
    outputs = [{"id": o.id, "type": str(o.get_io_type()), "name": o.display_name or str(o.get_io_type())}
               for o in schema.outputs or []]
    return {"display_name": schema.display_name, "category": schema.category, "output_node": schema.is_output_node,
            "inputs": inputs, "outputs": outputs}


def current_schemas() -> dict:
    return {cls.GET_SCHEMA().node_id: schema_summary(cls) for cls in cm.pack_node_classes()}


def _diff(old: dict, new: dict) -> list[str]:
    problems = []
    for nid in sorted(set(old) - set(new)):
        problems.append(f"node {nid} disappeared (renamed or removed: saved workflows using it break)")
    for nid in sorted(set(new) - set(old)):
        problems.append(f"node {nid} is new: add it to the snapshot")
    for nid in sorted(set(old) & set(new)):
        o, n = old[nid], new[nid]
        for key in ("display_name", "category", "output_node"):
            if o.get(key) != n.get(key):
                problems.append(f"{nid}.{key}: {o.get(key)!r} -> {n.get(key)!r}")
        oi = {i["id"]: i for i in o["inputs"]}
        ni = {i["id"]: i for i in n["inputs"]}
        for k in oi.keys() - ni.keys():
            problems.append(f"{nid}: input {k!r} disappeared (renamed or removed)")
        for k in ni.keys() - oi.keys():
            problems.append(f"{nid}: input {k!r} is new" + ("" if ni[k]["optional"] else " and REQUIRED (old workflows lack it)"))
        for k in oi.keys() & ni.keys():
            if oi[k] != ni[k]:
                problems.append(f"{nid}: input {k!r} changed: {oi[k]} -> {ni[k]}")
        if [i["id"] for i in o["inputs"]] != [i["id"] for i in n["inputs"]] and not (oi.keys() ^ ni.keys()):
            problems.append(f"{nid}: inputs reordered (widget values of saved workflows are positional)")
        if o["outputs"] != n["outputs"]:
            problems.append(f"{nid}: outputs changed: {o['outputs']} -> {n['outputs']}")
    return problems


def test_node_schemas_match_snapshot(comfy_env):
    cur = current_schemas()
    assert cur, "the pack registered no nodes"
    if os.environ.get(UPDATE_ENV):
        SNAPSHOT.write_text(json.dumps(cur, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        pytest.skip(f"{SNAPSHOT.name} rewritten ({len(cur)} nodes); unset {UPDATE_ENV} and commit it")
    assert SNAPSHOT.is_file(), f"{SNAPSHOT} is missing: run once with {UPDATE_ENV}=1"
    old = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    problems = _diff(old, cur)
    assert not problems, (
        "node schemas differ from the committed snapshot:\n  " + "\n  ".join(problems)
        + f"\nIf intended (never for a shipped id/name), regenerate with {UPDATE_ENV}=1 (see this file's docstring)."
    )


def test_snapshot_diff_catches_a_rename():
    old = {"MaX4ZeroX": {"display_name": "X", "category": "MaX4Zero", "output_node": False,
                         "inputs": [{"id": "a", "type": "IMAGE", "optional": False}], "outputs": []}}
    renamed = json.loads(json.dumps(old))
    renamed["MaX4ZeroX"]["inputs"][0]["id"] = "b"
    assert any("'a' disappeared" in p for p in _diff(old, renamed))
    assert any("disappeared" in p for p in _diff(old, {"MaX4ZeroY": old["MaX4ZeroX"]}))
    assert _diff(old, json.loads(json.dumps(old))) == []


def test_all_registration_ids_are_in_the_snapshot():
    old = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    for nid in cm.REGISTRATION_NODE_IDS:
        assert nid in old
