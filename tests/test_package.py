import ast
import subprocess
import sys
from pathlib import Path

import max4zero

ROOT = Path(__file__).resolve().parents[1]


def test_pack_imports_without_comfyui():
    import max4zero.attention  # noqa: F401
    import max4zero.warping  # noqa: F401

    import re

    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert max4zero.__version__ == version.group(1)  # the registry publishes pyproject's version
    assert callable(max4zero.comfy_entrypoint)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_comfy_or_diffusers_at_top_level():
    for folder in ("attention", "warping", "tensors", "registration", "adapters"):
        for path in (ROOT / folder).rglob("*.py"):
            mods = _imported_modules(path)
            assert "comfy" not in mods and "comfy_api" not in mods, path
            if path.name != "diffusers_processor.py":
                assert "diffusers" not in mods, path
    # the only module that imports diffusers is the diffusers adapter
    assert "diffusers" in _imported_modules(ROOT / "adapters" / "diffusers_processor.py")


def test_importing_the_pack_does_not_import_diffusers():
    code = (
        "import sys; sys.path.insert(0, %r); from pack_import import import_pack; "
        "import_pack(); import max4zero.attention, max4zero.warping; "
        "import pkgutil, importlib\n"
        "for m in ('attention', 'warping', 'tensors', 'registration', 'adapters'):\n"
        "    pkg = importlib.import_module('max4zero.' + m)\n"
        "    for info in pkgutil.iter_modules(pkg.__path__):\n"
        "        if info.name != 'diffusers_processor':\n"
        "            importlib.import_module('max4zero.%%s.%%s' %% (m, info.name))\n"
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
    ) % str(ROOT / "tools")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pack_id_follows_the_registry_rules_and_the_urls_agree():
    """The pack id is permanent once published: max4zero-tryon, no "comfyui" in it (the registry asks), and the
    repository and icon URLs name the same repository (CHANGELOG.md, "Pack id")."""
    import re
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    name = data["project"]["name"]
    assert name == "max4zero-tryon"
    assert "comfyui" not in name.lower()
    # docs.comfy.org/registry/specifications: < 100 chars, alphanumerics, - _ ., no consecutive specials,
    # starts with a letter.
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", name)
    repo = data["project"]["urls"]["Repository"]
    assert repo == f"https://github.com/max4zero/{name}"
    assert data["tool"]["comfy"]["Icon"] == f"https://raw.githubusercontent.com/max4zero/{name}/main/docs/icon.png"
    assert "Pack id: `max4zero-tryon`" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
