"""Warnings the user sees on the node (ComfyUI's progress text) and in the log.

Used for inputs that are legal but probably not what the user meant (a mask that looks inverted): the node
still runs, and says so on itself. Without a ComfyUI server (the normal test suite) only the log gets it.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

__all__ = ["warn_on_node"]

log = logging.getLogger("MaX4Zero")


def _executing_node_id() -> Optional[str]:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    node_id = getattr(ctx, "node_id", None) if ctx is not None else None
    return str(node_id) if node_id is not None else None


def warn_on_node(node: str, text: str, node_id: Optional[str] = None) -> str:
    """Log ``"<node>: <text>"`` as a warning and show it on the executing node; returns the line.

    ``node_id``: the node's id in the prompt; by default the node ComfyUI is executing now.
    """
    line = f"{node}: {text}"
    log.warning(line)
    node_id = node_id if node_id is not None else _executing_node_id()
    if node_id is None:
        return line
    # The running server's module, never imported from here: without a server (tests, scripts) there is no UI.
    instance = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if hasattr(instance, "send_progress_text"):
        try:
            instance.send_progress_text(line, str(node_id))
        except Exception:  # the warning is in the log already; a UI hiccup must not fail the node
            log.debug("could not send the warning to the UI", exc_info=True)
    return line
