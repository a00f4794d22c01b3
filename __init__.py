"""MaX4Zero: zero-shot virtual try-on for ComfyUI.

The repository root is the custom-node folder. Importing it must stay cheap and must not
need ComfyUI: `attention/` and `warping/` are plain PyTorch and are imported by tests and
scripts without a host. ComfyUI finds the nodes through :func:`comfy_entrypoint`, which
imports the ComfyUI-facing code lazily.
"""

__version__ = "0.1.0"

#: The point editor of MLS Warp (plain JavaScript modules, no build step, no network): docs/point-editor.md.
WEB_DIRECTORY = "./web"

async def comfy_entrypoint():
    """Entry point ComfyUI (V3 node schema) calls to get the pack's extension."""
    from .nodes.extension import MaX4ZeroExtension

    return MaX4ZeroExtension()
