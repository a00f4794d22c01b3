"""Every docstring example of the pack's pure modules runs (doctest), through the ``max4zero`` import the tests use."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Modules that import ComfyUI at import time are covered by tests/comfyui instead.
NEEDS_COMFY = {"nodes.features", "nodes.registration_nodes", "nodes.correspondence_node", "nodes.warp_nodes",
               "nodes.crop_nodes", "nodes.mea_nodes", "nodes.extension", "nodes.sockets"}
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for folder in ("attention", "warping", "tensors", "registration", "nodes", "adapters")
    for p in (ROOT / folder).glob("*.py")
    if p.name != "__init__.py"
)
MODULES = [m for m in MODULES if m not in NEEDS_COMFY]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"max4zero.{name}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module.__name__):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see the output above)"


def test_the_pure_core_has_examples():
    counted = 0
    for name in ("attention.policy", "tensors.shapes", "tensors.images", "nodes.trace"):
        module = importlib.import_module(f"max4zero.{name}")
        counted += sum(len(t.examples) for t in doctest.DocTestFinder().find(module, module.__name__))
    assert counted >= 15
