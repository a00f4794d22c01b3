#!/usr/bin/env bash
# The README's first command: MaX4Zero's registration stage (MLS warp, composite, fringes) on the shipped
# samples, with no model weights. Needs Python 3.10+; reuses a Python that already has PyTorch.
#
#   bash tools/demo.sh                 # samples in example_inputs/ -> demo_out/
#   bash tools/demo.sh --help          # your own pictures: --person ... --points ... --out DIR
#
# Arguments go to tools/registration_demo.py unchanged; relative paths are relative to where you run it.
#
# Which Python runs it (the first that imports torch, numpy and PIL: what ComfyUI's requirements bring), the way
# ComfyUI-Manager and comfy-cli find ComfyUI's interpreter; it prints which one it picked and why:
#   1. $PYTHON, then $COMFYUI_PYTHON, if set (used as they are: they must have them);
#   2. ComfyUI's own Python, when this pack sits in ComfyUI/custom_nodes/: the Python of a running ComfyUI
#      (its main.py in that folder), ComfyUI/venv, ComfyUI/.venv (uv and python -m venv), the Windows portable
#      build's python_embeded next to ComfyUI/;
#   3. the active environment: $VIRTUAL_ENV, then $CONDA_PREFIX (conda, mamba);
#   4. the virtual environment .ci/run made ($MAX4ZERO_VENV, default .venv in the repository), if it exists;
#   5. python3, then python, on the PATH (a system Python with torch).
# Only when none has torch does it create a virtual environment, OUTSIDE the repository (so that nothing
# large lands in ComfyUI/custom_nodes/): $MAX4ZERO_DEMO_VENV, default ~/.cache/max4zero-tryon/demo-venv.
# It says once, before installing, how large the install is and how to get PyTorch's CPU wheels instead:
#   MAX4ZERO_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash tools/demo.sh
# MAX4ZERO_DEMO_DRY_RUN=1 prints the choice (or the install it would do) and stops.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
demo="$root/tools/registration_demo.py"
check="import torch, numpy, PIL"
torch_pin="torch==2.13.0"
cpu_index="https://download.pytorch.org/whl/cpu"
dry="${MAX4ZERO_DEMO_DRY_RUN:-}"

has_deps() { "$1" -c "$check" >/dev/null 2>&1; }

run_with() {
    if [ -n "$dry" ]; then
        echo "would run: $*"
        exit 0
    fi
    exec "$@"
}

# 1. An explicit choice is used as it is.
for var in PYTHON COMFYUI_PYTHON; do
    py="${!var:-}"
    [ -n "$py" ] || continue
    if ! has_deps "$py"; then
        echo "$var=$py cannot import torch, numpy and PIL: install them there" \
             "(pip install torch numpy pillow) or unset $var." >&2
        exit 1
    fi
    echo "Using $var=$py" >&2
    run_with "$py" "$demo" "$@"
done

candidates=()  # "path|why"
# 2. ComfyUI's own Python, when the pack is one of its custom nodes.
parent="$(dirname "$root")"
if [ "$(basename "$parent")" = "custom_nodes" ]; then
    comfy="$(cd "$(dirname "$parent")" && pwd -P)"
    # the Python running that ComfyUI now (Linux /proc): the surest answer
    for proc in /proc/[0-9]*; do
        [ -r "$proc/cmdline" ] || continue
        args="$(tr '\0' ' ' < "$proc/cmdline" 2>/dev/null || true)"
        case "$args" in *main.py*) ;; *) continue ;; esac
        cwd="$(readlink "$proc/cwd" 2>/dev/null || true)"
        case "$args" in *"$comfy/main.py"*) ;; *) [ "$cwd" = "$comfy" ] || continue ;; esac
        # its argv[0] when absolute (a venv's python: /proc/exe would name the base interpreter, without the
        # venv's packages), else the interpreter itself
        argv0="${args%% *}"
        case "$argv0" in /*) candidates+=("$argv0|the Python running ComfyUI (process ${proc#/proc/})") ;; esac
        exe="$(readlink "$proc/exe" 2>/dev/null || true)"
        [ -n "$exe" ] && candidates+=("$exe|the Python running ComfyUI (process ${proc#/proc/})")
    done
    candidates+=("$comfy/venv/bin/python|ComfyUI's venv" "$comfy/.venv/bin/python|ComfyUI's .venv"
                 "$comfy/venv/Scripts/python.exe|ComfyUI's venv" "$comfy/.venv/Scripts/python.exe|ComfyUI's .venv"
                 "$(dirname "$comfy")/python_embeded/python.exe|the portable build's python_embeded"
                 "$(dirname "$comfy")/python_embeded/python|the portable build's python_embeded")
fi
# 3. The active environment (a venv, or conda / mamba).
[ -n "${VIRTUAL_ENV:-}" ] && candidates+=("$VIRTUAL_ENV/bin/python|the active virtual environment (VIRTUAL_ENV)")
[ -n "${CONDA_PREFIX:-}" ] && candidates+=("$CONDA_PREFIX/bin/python|the active conda environment (CONDA_PREFIX)")
# 4. The environment .ci/run made.
candidates+=("${MAX4ZERO_VENV:-$root/.venv}/bin/python|the .venv that .ci/run made")
# 5. The PATH.
for name in python3 python; do
    if command -v "$name" >/dev/null 2>&1; then
        candidates+=("$(command -v "$name")|$name on the PATH")
    fi
done
for entry in "${candidates[@]}"; do
    py="${entry%%|*}"
    if [ -x "$py" ] && has_deps "$py"; then
        echo "Using $py (${entry#*|}; it has PyTorch)" >&2
        run_with "$py" "$demo" "$@"
    fi
done

# --help needs no torch: answer it with any Python rather than installing anything.
for arg in "$@"; do
    if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
        run_with python3 "$demo" "$@"
    fi
done

# 5. No Python here has torch: the demo's own environment, outside the repository.
venv="${MAX4ZERO_DEMO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/max4zero-tryon/demo-venv}"
py="$venv/bin/python"
if [ -x "$py" ] && has_deps "$py"; then
    echo "Using $py (made by an earlier run)" >&2
    run_with "$py" "$demo" "$@"
fi
index="${MAX4ZERO_TORCH_INDEX:-}"
cat >&2 <<EOF
No Python with PyTorch found (\$PYTHON and \$COMFYUI_PYTHON are not set, no ComfyUI Python next to this pack, no
active environment with torch, and python3 has no torch).
The demo will create a virtual environment in
    $venv
(outside the repository; delete that folder to undo) and install $torch_pin, numpy and pillow into it.
EOF
if [ -n "$index" ]; then
    echo "torch comes from $index (MAX4ZERO_TORCH_INDEX)." >&2
else
    cat >&2 <<EOF
Size: on Linux, pip's default torch is the CUDA build: about 3 GB to download and 5 GB on disk (torch plus
the nvidia-* and triton wheels). The demo needs no GPU; PyTorch's CPU build is about 200 MB to download and
under 1 GB on disk. To use it, stop now (Ctrl-C) and run, with PyTorch's own CPU wheel index as its install
page gives it (pip3 install torch --index-url $cpu_index):
    MAX4ZERO_TORCH_INDEX=$cpu_index bash tools/demo.sh
Or run the demo with a Python that already has torch: PYTHON=/path/to/python bash tools/demo.sh
EOF
fi
if [ -n "$dry" ]; then
    echo "would create $venv and install $torch_pin${index:+ --index-url $index}, numpy, pillow" >&2
    exit 0
fi
if [ -t 0 ] && [ -z "$index" ]; then
    echo "Starting in 10 s ..." >&2
    sleep 10
fi
mkdir -p "$(dirname "$venv")"
if ! python3 -m venv "$venv"; then
    echo "python3 -m venv failed. On Debian/Ubuntu install the venv module first:" \
         "sudo apt install python3-venv   (then run this again)" >&2
    rm -rf "$venv"
    exit 1
fi
# pip's own progress bars stay on: the torch download is large and can take minutes.
echo "[1/2] installing $torch_pin ..." >&2
if [ -n "$index" ]; then
    "$py" -m pip install --progress-bar on "$torch_pin" --index-url "$index"
else
    "$py" -m pip install --progress-bar on "$torch_pin"
fi
echo "[2/2] installing numpy and pillow ..." >&2
"$py" -m pip install --progress-bar on numpy pillow
exec "$py" "$demo" "$@"
