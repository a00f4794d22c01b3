"""Tests that run the pack inside a real ComfyUI checkout (``COMFYUI_PATH``), on CPU, in-process.

Without ``COMFYUI_PATH`` every module here is skipped (not imported), with the reason shown by
``pytest -ra``. With it, ComfyUI is imported from that checkout, this pack is loaded through
ComfyUI's own ``nodes.load_custom_node`` (the real loading path), and the fixtures below build
small random-weight models from ComfyUI's own classes. See ``comfy_models.py`` for the helpers.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest -q tests/comfyui`` with a Python that has
ComfyUI's requirements installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_models import SKIP_REASON  # noqa: E402  (imports nothing from ComfyUI)

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "").strip()

if not COMFYUI_PATH:

    class _SkippedModule(pytest.Module):
        """Stands in for each test module so it is never imported (it may import ComfyUI at top level)."""

        def collect(self):
            pytest.skip(SKIP_REASON)

    def pytest_pycollect_makemodule(module_path, parent):
        return _SkippedModule.from_parent(parent, path=module_path)

else:
    import comfy_models  # noqa: E402
    import torch  # noqa: E402

    # The models here are tiny: with several threads on a small shared machine torch oversubscribes the
    # cores and the suite takes minutes instead of seconds. MAX4ZERO_TEST_THREADS overrides.
    torch.set_num_threads(int(os.environ.get("MAX4ZERO_TEST_THREADS", "1")))

    comfy_models.boot(COMFYUI_PATH)

    @pytest.fixture(scope="session")
    def comfy_env():
        """``{"pack_module", "node_ids", "scratch", "comfyui_path"}`` of the booted ComfyUI."""
        return comfy_models.boot(COMFYUI_PATH)

    @pytest.fixture(scope="session")
    def small_sd15_model():
        """Factory: ``small_sd15_model(inpaint=False, seed=0)`` → shared random-weight ModelPatcher."""
        return comfy_models.small_sd15_model

    @pytest.fixture(scope="session")
    def small_vae():
        """A random-weight ``comfy.sd.VAE`` (8× downscale, 4 latent channels)."""
        return comfy_models.small_vae()

    @pytest.fixture(scope="session")
    def cond():
        """Factory: ``cond(seed=0, batch=1, zero=False)`` → CONDITIONING ``[[tensor[batch,77,768], {}]]``."""
        return comfy_models.conditioning

    @pytest.fixture(scope="session")
    def images():
        """Factory: ``images(size=128, batch=1)`` → dict reference / garment_mask / target / target_mask."""
        return comfy_models.synthetic_pair

    @pytest.fixture
    def graph():
        """A fresh :class:`comfy_models.Graph` prompt builder."""
        return comfy_models.Graph()

    @pytest.fixture(scope="session")
    def run_prompt():
        """``run_prompt(graph_or_prompt_dict)`` → PromptResult; raises ``comfy_models.PromptFailed``."""
        return comfy_models.run_prompt
