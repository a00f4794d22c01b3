"""Import the repository as the package ``max4zero`` whatever its folder is called.

The repository root is a ComfyUI custom-node folder, so it cannot be put on ``sys.path``
itself (ComfyUI owns the top-level module ``nodes``). Tests, benchmarks and the demo load
it under one stable name instead.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACK_NAME = "max4zero"
ROOT = Path(__file__).resolve().parents[1]


def import_pack(name: str = PACK_NAME) -> ModuleType:
    """Register the repository root as package ``name`` and return it."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
