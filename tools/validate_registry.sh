#!/usr/bin/env bash
# The Comfy Registry's own pre-publish check, as CI runs it (.ci/run). Offline apart from PyPI.
#
#   bash tools/validate_registry.sh
#
# 1. `comfy node validate` (comfy-cli from PyPI): parses pyproject.toml the way `comfy node publish` does and
#    runs its security scan (ruff rules S102 exec, S307 eval, E702 `a; b` on one line) over every Python
#    file in the repository, tests/ tools/ bench/ included: .comfyignore only shapes the archive, not the scan.
#    comfy-cli reports both metadata problems ("Warning: ...") and the scan ("Security warnings found") with
#    exit status 0, so this script fails on that output as well as on the exit status.
# 2. The same ruff rules with --isolated, so a future [tool.ruff] exclude in pyproject.toml cannot hide code
#    from the scan that comfy-cli runs with the project's ruff configuration.
# 3. [tool.comfy] is complete and the Icon URL names docs/icon.png in this repository (a square PNG <= 400 px).
# 4. `comfy node pack` on a scratch copy of the tree (tracked and not-ignored files, as if committed):
#    the archive keeps the pack, workflows/, example_inputs/ (the sample inputs the workflows load), LICENSE,
#    README, CHANGELOG, docs/icon.png and leaves out tests/, bench/, tools/, .ci/. Set MAX4ZERO_PACK_LIST=1 to
#    print the archive's file list.
#
# comfy-cli is installed once into $MAX4ZERO_REGISTRY_VENV (default .venv-registry, git-ignored).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${MAX4ZERO_REGISTRY_VENV:-$root/.venv-registry}"
comfy_cli_version="1.23.0"

# No tracking prompt, no telemetry: CI has no stdin, and the check must not phone home.
export DO_NOT_TRACK=1 COMFY_NO_TELEMETRY=1

if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('comfy-cli') != '$comfy_cli_version')" \
        >/dev/null 2>&1; then
    echo "Installing comfy-cli $comfy_cli_version into $venv ..." >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q "comfy-cli==$comfy_cli_version"
fi
comfy=("$venv/bin/comfy" --skip-prompt --no-json)
rules="S102,S307,E702"
fail=0

echo "== comfy node validate (comfy-cli $comfy_cli_version)"
set +e
out="$("${comfy[@]}" node validate </dev/null 2>&1)"
rc=$?
set -e
printf '%s\n' "$out"
if [ "$rc" -ne 0 ]; then
    echo "FAIL: comfy node validate exited with $rc" >&2
    fail=1
fi
if grep -qiE "security warning|warning:|error:" <<<"$out"; then
    echo "FAIL: comfy node validate reported a warning or an error (see above)." >&2
    fail=1
fi
if ! grep -q "All validation checks passed" <<<"$out"; then
    echo "FAIL: comfy node validate did not report success." >&2
    fail=1
fi

echo "== ruff --isolated --select $rules (the same scan, ignoring any project ruff config)"
if ! "$venv/bin/python" -m ruff check --isolated --select "$rules" --no-cache -q .; then
    echo "FAIL: the registry's security rules flag the code above." >&2
    fail=1
fi

echo "== [tool.comfy] metadata and icon"
if ! "$venv/bin/python" - <<'EOF'
import struct
import sys
import tomllib
from pathlib import Path

data = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))
project, comfy = data["project"], data["tool"]["comfy"]
problems = []
for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
    if not str(comfy.get(key, "")).strip():
        problems.append(f"[tool.comfy] {key} is empty: set it in pyproject.toml")
repo = project.get("urls", {}).get("Repository", "").rstrip("/")
prefix = repo.replace("https://github.com/", "https://raw.githubusercontent.com/", 1) + "/main/"
icon = str(comfy.get("Icon", ""))
if not (repo.startswith("https://github.com/") and icon.startswith(prefix)):
    problems.append(f"[tool.comfy] Icon {icon!r} is not a raw URL under {prefix!r}: point it at docs/icon.png")
else:
    path = Path(icon[len(prefix):])
    head = path.read_bytes()[:24] if path.is_file() else b""
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        problems.append(f"Icon file {path} is missing or not a PNG: add it (see CHANGELOG/README)")
    else:
        w, h = struct.unpack(">II", head[16:24])
        if w != h or w > 400:
            problems.append(f"Icon {path} is {w}x{h}: the registry wants a square icon of at most 400x400")
lic = project.get("license", {})
if not (isinstance(lic, dict) and Path(lic.get("file", "")).is_file()):
    problems.append('[project] license must be {file = "LICENSE"} naming an existing file')
for p in problems:
    print("FAIL:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
then
    fail=1
fi

echo "== comfy node pack (scratch copy of the working tree)"
if command -v git >/dev/null 2>&1 && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    # What a commit of this tree would hold: tracked files plus untracked ones .gitignore does not exclude.
    git ls-files -z --cached --others --exclude-standard | "$venv/bin/python" -c '
import shutil, sys
from pathlib import Path
for name in sys.stdin.buffer.read().decode().split("\0"):
    if name and Path(name).is_file():
        dst = Path(sys.argv[1], name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(name, dst)
' "$scratch"
    (cd "$scratch" && git init -q && git add -A && "${comfy[@]}" node pack </dev/null >/dev/null)
    if ! "$venv/bin/python" - "$scratch/node.zip" <<'EOF'
import os
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
if os.environ.get("MAX4ZERO_PACK_LIST"):
    print("\n".join(sorted(names)))
required = ["__init__.py", "pyproject.toml", "LICENSE", "README.md", "CHANGELOG.md", "docs/icon.png",
            "nodes/extension.py", "attention/masked_extended.py", "warping/mls.py", "tensors/masks.py",
            "registration/recipe.py"]
problems = [f"{r} is missing from the archive: check .comfyignore" for r in required if r not in names]
problems += [f"{n} is in the archive: add its folder to .comfyignore" for n in names
             if n.split("/")[0] in ("tests", "bench", "tools", ".ci") or n.startswith("docs/screenshots/raw/")]
for folder in ("workflows", "example_workflows", "example_inputs"):
    shipped = [f"{folder}/{f}" for f in sorted(os.listdir(folder))] if os.path.isdir(folder) else []
    problems += [f"{n} is missing from the archive: check .comfyignore" for n in shipped
                 if n.endswith((".json", ".png")) and n not in names]
if not any(n.startswith("example_inputs/") for n in names):
    problems.append("example_inputs/ is missing from the archive: the workflows' sample inputs must ship")
print(f"archive: {len(names)} files")
for p in problems:
    print("FAIL:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
    then
        fail=1
    fi
else
    echo "(not a git work tree: skipped; comfy node pack packs git-tracked files)"
fi

if [ "$fail" -ne 0 ]; then
    echo "Registry validation FAILED." >&2
    exit 1
fi
echo "Registry validation passed."
