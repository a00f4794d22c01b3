"""The pack's ComfyExtension: the list of every node class ComfyUI registers.

Imported lazily by the pack's ``comfy_entrypoint`` (so importing the pack never needs ComfyUI).
Node ids are final: a rename breaks saved workflows (tests/comfyui/test_node_schemas.py guards them).
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .mea_nodes import NODE_CLASSES as MEA_NODES
from .point_editor import register_route
from .registration_nodes import NODES as REGISTRATION_NODES

# One entry per node module; add a module's list here (one line) to ship its nodes.
NODE_CLASSES: list[type[io.ComfyNode]] = [
    *REGISTRATION_NODES,
    *MEA_NODES,
]


class MaX4ZeroExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI loads the nodes before it starts serving: the point editor's route joins the server's now.
        register_route()
        return list(NODE_CLASSES)
