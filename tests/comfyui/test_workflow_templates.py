"""ComfyUI lists our example workflows in its template browser (docs/workflows.md: where each frontend shows it).

Uses ComfyUI's own ``app.custom_node_manager.CustomNodeManager.add_routes``: the pack is installed as
``<tmp>/custom_nodes/max4zero-tryon`` (a symlink to this repository), ``custom_nodes`` points there, and
the real ``GET /workflow_templates`` handler is called and each workflow is fetched over HTTP the way the
frontend's Browse Templates fetches it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest

import comfy_models as cm
import make_workflows  # tools/ is on sys.path (tests/conftest.py)

PACK_DIR_NAME = "max4zero-tryon"
EXPECTED = {make_workflows.workflow_name(k) for k in make_workflows.WORKFLOW_TITLES}


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


def _serve(app, routes, paths: list[str]) -> dict[str, tuple[int, bytes]]:
    """GET each path from a real aiohttp server whose routes are mounted as ComfyUI's server mounts them
    (every route also under ``/api``), with whatever the template code added to the app itself."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    api = web.RouteTableDef()
    for route in routes:
        if isinstance(route, web.RouteDef):
            api.route(route.method, "/api" + route.path)(route.handler, **route.kwargs)
    app.add_routes(api)
    app.add_routes(routes)

    async def fetch_all():
        async with TestClient(TestServer(app)) as client:
            out = {}
            for path in paths:
                resp = await client.get(path)
                out[path] = (resp.status, await resp.read())
            return out

    return asyncio.run(fetch_all())


def test_every_listed_workflow_opens_from_the_template_route(installed_pack):
    """What Browse Templates fetches (``/api/workflow_templates/<pack>/<name>.json``) is our file, byte for byte.

    0.3.64 and 0.33 serve the folder statically; newer ComfyUI serves each listed file from a route of its own
    and calls ``workflows/`` a legacy alias. Fetching over HTTP checks the behaviour, not how it is served.
    """
    routes, app = _routes(installed_pack)
    from urllib.parse import quote

    paths = [f"/api/workflow_templates/{PACK_DIR_NAME}/{quote(name)}.json" for name in sorted(EXPECTED)]
    served = _serve(app, routes, paths + [f"/api/workflow_templates/{PACK_DIR_NAME}/no_such_workflow.json"])
    for name, path in zip(sorted(EXPECTED), paths):
        status, body = served[path]
        assert status == 200, (path, status)
        assert body == (cm.PACK_ROOT / "workflows" / f"{name}.json").read_bytes()
        assert json.loads(body)["nodes"]
    assert served[f"/api/workflow_templates/{PACK_DIR_NAME}/no_such_workflow.json"][0] == 404


def test_every_listed_workflow_has_its_thumbnail_served(installed_pack):
    """The template browser asks for ``<name>.jpg`` next to each workflow (a 404 and a blank card otherwise)."""
    from urllib.parse import quote

    routes, app = _routes(installed_pack)
    paths = [f"/api/workflow_templates/{PACK_DIR_NAME}/{quote(name)}.jpg" for name in sorted(EXPECTED)]
    served = _serve(app, routes, paths)
    for name, path in zip(sorted(EXPECTED), paths):
        status, body = served[path]
        assert status == 200, (path, status)
        assert body[:3] == b"\xff\xd8\xff" and body == (cm.PACK_ROOT / "workflows" / f"{name}.jpg").read_bytes()
