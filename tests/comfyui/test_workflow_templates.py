"""ComfyUI lists our example workflows under Workflow → Browse Templates.

Uses ComfyUI's own ``app.custom_node_manager.CustomNodeManager.add_routes``: the pack is installed as
``<tmp>/custom_nodes/comfyui-max4zero`` (a symlink to this repository), ``custom_nodes`` points there, and
the real ``GET /workflow_templates`` handler and the static ``/api/workflow_templates/<pack>`` route are
called / inspected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest

import comfy_models as cm

PACK_DIR_NAME = "comfyui-max4zero"
EXPECTED = {"maxzero_full_tryon", "maxzero_reference_only", "maxzero_attention_flow", "maxzero_lora_controlnet",
            "maxzero_sdxl"}


@pytest.fixture
def installed_pack(comfy_env, tmp_path, monkeypatch):
    import folder_paths

    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    link = custom_nodes / PACK_DIR_NAME
    link.symlink_to(cm.PACK_ROOT, target_is_directory=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "custom_nodes", ([str(custom_nodes)], set()))
    return link


def _custom_node_manager():
    """ComfyUI's CustomNodeManager class.

    Its module imports ComfyUI's ``utils`` package; in-process, ``nodes.py`` put ``comfy/`` on sys.path first,
    so ``utils`` may already be ``comfy/utils.py``. Import it with the package in place (as main.py does by
    importing ``utils.extra_config`` first), then restore whatever was there.
    """
    import importlib
    import importlib.util
    import sys

    if "app.custom_node_manager" in sys.modules:
        return sys.modules["app.custom_node_manager"].CustomNodeManager
    root = Path(cm.boot(os.environ["COMFYUI_PATH"])["comfyui_path"])
    saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if k == "utils" or k.startswith("utils.")]}
    try:
        spec = importlib.util.spec_from_file_location("utils", root / "utils" / "__init__.py",
                                                      submodule_search_locations=[str(root / "utils")])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["utils"] = pkg
        spec.loader.exec_module(pkg)
        return importlib.import_module("app.custom_node_manager").CustomNodeManager
    finally:
        for k in [k for k in sys.modules if k == "utils" or k.startswith("utils.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _routes(pack_dir: Path):
    from aiohttp import web

    CustomNodeManager = _custom_node_manager()

    routes, app = web.RouteTableDef(), web.Application()
    CustomNodeManager().add_routes(routes, app, [(PACK_DIR_NAME, str(pack_dir))])
    return routes, app


def test_workflow_templates_route_lists_our_workflows(installed_pack):
    routes, _ = _routes(installed_pack)
    handler = next(r.handler for r in routes if r.method == "GET" and r.path == "/workflow_templates")
    body = json.loads(asyncio.run(handler(None)).body)
    assert set(body.get(PACK_DIR_NAME, [])) == EXPECTED, body


def test_workflow_files_are_served_from_the_static_template_route(installed_pack, caplog):
    with caplog.at_level(logging.DEBUG):
        _, app = _routes(installed_pack)
    prefix = f"/api/workflow_templates/{PACK_DIR_NAME}"
    static = [r for r in app.router.resources() if r.canonical == prefix]
    assert len(static) == 1, [r.canonical for r in app.router.resources()]
    served = Path(static[0].get_info()["directory"])
    assert served.resolve() == (cm.PACK_ROOT / "workflows").resolve()
    for name in EXPECTED:
        assert json.loads((served / f"{name}.json").read_text(encoding="utf-8"))["nodes"]
    # 0.3.64 accepts workflows/ but prefers example_workflows/ (debug hint; see docs/workflows.md)
    assert any("consider renaming it to 'example_workflows'" in r.getMessage() for r in caplog.records)
