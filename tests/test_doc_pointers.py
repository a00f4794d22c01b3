"""Every ``path.py: name`` pointer in ``docs/`` and in the code's docstrings resolves, and every name in every
``__all__`` exists (issue 17: docs that went stale within a week).

A pointer is a repository path to a Python file (paths into ComfyUI, ``comfy/…``, ``main.py``, are not checked), a
colon and a name defined there: a function, class or assignment
at module level, ``Class.member``, a call form (``name(args)``, the arguments are not checked) or a glob
(``test_chains_with_*``). Imported names do not count: a pointer shows where a thing is defined. A bare path
(``nodes/features.py``) must exist.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: ``path.py: name`` with the name optionally in (double) backticks; stops before ``(``, ``,``, spaces.
POINTER = re.compile(r"(?<![\w/.-])((?:[A-Za-z0-9_-]+/)*[A-Za-z0-9_-]+\.py)(?::[ \t\n]+`{0,2}([A-Za-z_][A-Za-z0-9_.*]*))?")

#: Pointers into code the MEA redesign (issue 17, the lead's half) is moving: expected to fail until it lands.
#: Empty this list as they are fixed (each entry is strict: a fixed pointer makes its test fail until removed).
MOVING: set = set()


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but caches
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]


@lru_cache(maxsize=None)
def _defined(path: str) -> frozenset[str]:
    """Names defined in a Python file: module level (def, class, assignment) and ``Class.member``."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    names: set[str] = set()

    def targets(node) -> list[str]:
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            ts = node.targets if isinstance(node, ast.Assign) else [node.target]
            return [t.id for t in ts if isinstance(t, ast.Name)] + [
                e.id for t in ts if isinstance(t, ast.Tuple) for e in t.elts if isinstance(e, ast.Name)]
        return []

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for member in node.body:
                    if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        names.add(f"{node.name}.{member.name}")
                    for t in targets(member):
                        names.add(f"{node.name}.{t}")
        names.update(targets(node))
        if isinstance(node, ast.If):  # definitions guarded by a version or import check
            for sub in node.body + node.orelse:
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
                names.update(targets(sub))
    return frozenset(names)


def _resolve(path: str, where: str) -> str | None:
    """A pointer's path as a repository path: from the root, else next to the file that holds the pointer."""
    if (ROOT / path).is_file():
        return path
    local = (Path(where).parent / path).as_posix()
    return local if (ROOT / local).is_file() else None


#: Top-level folders of the repository: a path starting elsewhere (``comfy/…``, ``main.py``) is ComfyUI's or torch's.
REPO_FOLDERS = {p.split("/")[0] for p in _tracked_files() if "/" in p}


def _ours(path: str, where: str) -> bool:
    return path.split("/")[0] in REPO_FOLDERS or _resolve(path, where) is not None


def _problem(path: str, name: str | None, where: str) -> str | None:
    if not _ours(path, where):
        return None  # another project's file (ComfyUI's nodes.py, comfy/...): not ours to check
    real = _resolve(path, where)
    if real is None:
        return f"{path} does not exist"
    if not name:
        return None
    name = name.rstrip(".")
    defined = _defined(real)
    if "*" in name:
        return None if any(fnmatch.fnmatchcase(n, name) for n in defined) else f"nothing in {real} matches {name}"
    return None if name in defined else f"{real} defines no {name}"


def _docstrings(path: str) -> list[tuple[int, str]]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno if node.body else 1, doc))
    return out


def _pointers() -> list[tuple[str, int, str, str | None]]:
    """(file, line, path, name) of every pointer in docs/*.md and in the docstrings of tracked Python files."""
    found = []
    for f in _tracked_files():
        if f.startswith("docs/") and f.endswith(".md"):
            texts = [(1, (ROOT / f).read_text(encoding="utf-8"))]
        elif f.endswith(".py"):
            texts = _docstrings(f)
        else:
            continue
        for line0, text in texts:
            for m in POINTER.finditer(text):
                found.append((f, line0 + text.count("\n", 0, m.start()), m.group(1), m.group(2)))
    return found


POINTERS = _pointers()


def _label(p) -> str:
    f, line, path, name = p
    return f"{f}:{line} {path}: {name}" if name else f"{f}:{line} {path}"


def _param(p):
    f, _, path, name = p
    moving = (f, f"{path}: {name}") in MOVING
    marks = [pytest.mark.xfail(strict=True, reason="the lead's MEA redesign moves it (issue 17)")] if moving else []
    return pytest.param(p, id=_label(p), marks=marks)


def test_the_scan_finds_the_pointers():
    assert len(POINTERS) > 100
    labels = {f"{p[2]}: {p[3]}" for p in POINTERS}
    assert "registration/recipe.py: feature_noise" in labels and "tensors/masks.py: EMPTY_BELOW" in labels


def test_the_check_would_notice_a_stale_pointer():
    assert _problem("registration/recipe.py", "feature_noise", "docs/method.md") is None
    assert _problem("registration/recipe.py", "grey_out", "docs/method.md")  # imported there, defined elsewhere
    assert _problem("nodes/registration.py", "feature_noise", "docs/method.md")  # the file moved
    assert _problem("nodes/mea_calls.py", "trace_*", "docs/method.md") is None
    assert _problem("masks.py", "erode", "tensors/images.py") is None  # next to the file that points


@pytest.mark.parametrize("pointer", [_param(p) for p in POINTERS])
def test_pointer_resolves(pointer):
    f, line, path, name = pointer
    problem = _problem(path, name, f)
    assert problem is None, f"{f}:{line}: {problem}"


def test_every_moving_pointer_is_still_in_the_docs():
    """An entry of MOVING whose pointer is gone from the docs is stale itself: remove it."""
    present = {(f, f"{path}: {name}") for f, _, path, name in POINTERS}
    assert MOVING <= present, MOVING - present


PACK_FILES = [f for f in _tracked_files() if f.endswith(".py") and f.split("/")[0] in
              ("attention", "warping", "tensors", "registration", "nodes", "adapters", "__init__.py")]


@pytest.mark.parametrize("path", PACK_FILES)
def test_every_name_in_all_exists(path):
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    exported: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            exported = list(ast.literal_eval(node.value))
    if not exported:
        return
    names = set(_defined(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    missing = [n for n in exported if n not in names]
    assert not missing, f"{path}: __all__ names {missing}, which it neither defines nor imports"
