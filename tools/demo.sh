#!/usr/bin/env bash
# The README's first command: MaX4Zero's registration stage (MLS warp, composite, fringes) on the shipped
# samples, with no model weights and no downloads beyond the pack's own dependencies. Needs only Python 3.10+.
#
#   bash tools/demo.sh                 # samples in tools/samples/ -> demo_out/
#   bash tools/demo.sh --help          # your own pictures: --person ... --points ... --out DIR
#
# Arguments go to tools/registration_demo.py unchanged; relative paths are relative to where you run it.
# Uses the same virtual environment as .ci/run (.venv in the repository, or $MAX4ZERO_VENV) and installs
# into it only when the pack's runtime dependencies are missing there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MAX4ZERO_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "Creating the virtual environment $venv ..." >&2
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch, numpy, PIL, scipy, kornia" >/dev/null 2>&1; then
    echo "Installing the pack's runtime dependencies into $venv (once; torch is large) ..." >&2
    # Same pins as .ci/run; the project installs only its runtime dependencies (torch, numpy, pillow,
    # scipy, kornia), never the optional diffusers extra.
    "$py" -m pip install -q "torch==2.13.0"
    "$py" -m pip install -q "$root"
fi
exec "$py" "$root/tools/registration_demo.py" "$@"
