"""tools/demo.sh picks a Python that already has PyTorch, and installs (outside the repository) only when none has.

Every case runs the script for real with ``MAX4ZERO_DEMO_DRY_RUN=1`` (it prints its choice and stops), with a
PATH that holds only stubs, so nothing is installed and the machine's own Pythons do not interfere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_SH = ROOT / "tools" / "demo.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _stub(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def _with_torch(path: Path) -> Path:
    """A Python that has torch: a wrapper around the interpreter running these tests."""
    return _stub(path, f'exec "{sys.executable}" "$@"')


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """PATH: a torch-less python3 stub and the few commands the script uses, nothing else (no real Python)."""
    bin_dir = tmp_path / "bin"
    _stub(bin_dir / "python3", "exit 1")  # a python3 without torch (fails every import)
    for tool in ("dirname", "basename", "cat", "mkdir", "rm", "sleep", "tr", "readlink"):
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHON", "COMFYUI_PYTHON", "MAX4ZERO_TORCH_INDEX", "VIRTUAL_ENV", "CONDA_PREFIX")}
    env.update(PATH=str(bin_dir), MAX4ZERO_DEMO_DRY_RUN="1", HOME=str(tmp_path / "home"),
               MAX4ZERO_VENV=str(tmp_path / "no-ci-venv"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.update(extra)
    return env


def _run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), str(script), *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_python_from_the_environment_is_used(tmp_path):
    py = _with_torch(tmp_path / "mine" / "python")
    out = _run(DEMO_SH, _env(tmp_path, PYTHON=str(py)), "--size", "64")
    assert out.returncode == 0, out.stderr
    assert f"would run: {py} {ROOT / 'tools' / 'registration_demo.py'} --size 64" in out.stdout


def test_python_from_the_environment_without_torch_is_refused(tmp_path):
    py = _stub(tmp_path / "bare" / "python", "exit 1")
    out = _run(DEMO_SH, _env(tmp_path, PYTHON=str(py)))
    assert out.returncode == 1 and "cannot import torch" in out.stderr and "unset PYTHON" in out.stderr


@pytest.mark.parametrize("venv_name", ["venv", ".venv"])
def test_comfyuis_own_python_is_used_when_the_pack_is_a_custom_node(tmp_path, venv_name):
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    pack = comfy / "custom_nodes" / "max4zero-tryon"
    pack.symlink_to(ROOT, target_is_directory=True)
    py = _with_torch(comfy / venv_name / "bin" / "python")
    out = _run(pack / "tools" / "demo.sh", _env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert f"Using {py} (ComfyUI's {venv_name}" in out.stderr and f"would run: {py} " in out.stdout


def test_comfyui_python_from_the_environment_is_used_and_named(tmp_path):
    py = _with_torch(tmp_path / "comfy" / "python")
    out = _run(DEMO_SH, _env(tmp_path, COMFYUI_PYTHON=str(py)))
    assert out.returncode == 0, out.stderr
    assert f"Using COMFYUI_PYTHON={py}" in out.stderr and f"would run: {py} " in out.stdout
    bare = _stub(tmp_path / "bare" / "python", "exit 1")
    out = _run(DEMO_SH, _env(tmp_path, COMFYUI_PYTHON=str(bare)))
    assert out.returncode == 1 and "unset COMFYUI_PYTHON" in out.stderr


def test_the_portable_builds_python_embeded_is_used(tmp_path):
    """ComfyUI_windows_portable/: python_embeded/ beside ComfyUI/ (the pack in ComfyUI/custom_nodes/)."""
    portable = tmp_path / "ComfyUI_windows_portable"
    (portable / "ComfyUI" / "custom_nodes").mkdir(parents=True)
    pack = portable / "ComfyUI" / "custom_nodes" / "max4zero-tryon"
    pack.symlink_to(ROOT, target_is_directory=True)
    py = _with_torch(portable / "python_embeded" / "python.exe")
    out = _run(pack / "tools" / "demo.sh", _env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert f"Using {py} (the portable build's python_embeded" in out.stderr and f"would run: {py} " in out.stdout


@pytest.mark.parametrize("var", ["VIRTUAL_ENV", "CONDA_PREFIX"])
def test_the_active_environment_is_used(tmp_path, var):
    """A conda / mamba or uv / venv environment that is active (ComfyUI's, typically) comes before the PATH."""
    env_dir = tmp_path / "envs" / "comfy"
    py = _with_torch(env_dir / "bin" / "python")
    out = _run(DEMO_SH, _env(tmp_path, **{var: str(env_dir)}))
    assert out.returncode == 0, out.stderr
    assert f"Using {py} (the active" in out.stderr and f"would run: {py} " in out.stdout


def test_a_python3_with_torch_on_the_path_is_used(tmp_path):
    env = _env(tmp_path)
    py = _with_torch(tmp_path / "bin" / "python3")  # replaces the torch-less stub
    out = _run(DEMO_SH, env)
    assert out.returncode == 0 and f"would run: {py} " in out.stdout, out.stderr
    assert f"Using {py} (python3 on the PATH" in out.stderr


def test_without_torch_anywhere_it_says_the_size_and_the_cpu_index_once_and_installs_outside(tmp_path):
    out = _run(DEMO_SH, _env(tmp_path))
    assert out.returncode == 0, out.stderr
    err = out.stderr
    venv = tmp_path / "cache" / "max4zero-tryon" / "demo-venv"
    assert str(venv) in err and "outside the repository" in err
    assert err.count("https://download.pytorch.org/whl/cpu") == 2  # the index, as PyTorch's page gives it, and the command
    assert "MAX4ZERO_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash tools/demo.sh" in err
    assert "CUDA build" in err and "3 GB" in err and "200 MB" in err
    assert "would create" in err and not venv.exists()
    assert not (ROOT / ".venv-demo").exists()
    # With the CPU index chosen it only says where torch comes from.
    out = _run(DEMO_SH, _env(tmp_path, MAX4ZERO_TORCH_INDEX="https://download.pytorch.org/whl/cpu"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in out.stderr and "CUDA build" not in out.stderr


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs a system python3")
def test_help_needs_no_torch_and_installs_nothing(tmp_path):
    env = _env(tmp_path)
    env.pop("MAX4ZERO_DEMO_DRY_RUN")
    (tmp_path / "bin" / "python3").unlink()
    (tmp_path / "bin" / "python3").symlink_to("/usr/bin/python3")  # the system python3: no torch needed for --help
    out = _run(DEMO_SH, env, "--help")
    assert out.returncode == 0, out.stderr
    assert "max4zero-matches/1" in out.stdout
    assert not (tmp_path / "cache").exists()


def test_ci_and_demo_say_which_torch_build_pip_picks():
    """.ci/run no longer calls PyPI's default torch "the CPU build"; both scripts name PyTorch's CPU index."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "The CPU build of torch;" not in ci and "CUDA build" in ci
    assert "MAX4ZERO_TORCH_INDEX=https://download.pytorch.org/whl/cpu" in ci
    assert 'pip install --progress-bar on "torch==2.13.0"' in ci  # CI installs torch from its usual sources
    demo = DEMO_SH.read_text()
    assert 'cpu_index="https://download.pytorch.org/whl/cpu"' in demo


def test_the_readme_install_section_has_real_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = readme[readme.index("## Install"):readme.index("## Masks")]
    for needle in ("comfy node install max4zero-tryon", "Custom Nodes Manager", "MaX4Zero Try-On",
                   "git clone https://github.com/max4zero/max4zero-tryon", "sudo apt install python3-venv",
                   "~/.cache/max4zero-tryon/demo-venv", "MAX4ZERO_TORCH_INDEX=https://download.pytorch.org/whl/cpu",
                   "cp custom_nodes/max4zero-tryon/example_inputs/max4zero_*.png input/"):
        assert needle in install, needle
    # The venv the README names is the one demo.sh makes.
    assert "${XDG_CACHE_HOME:-$HOME/.cache}/max4zero-tryon/demo-venv" in DEMO_SH.read_text()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_the_python_running_comfyui_is_used(tmp_path):
    """ComfyUI is running from the folder the pack sits in: its interpreter is the surest answer (a venv's
    python is named by its path, not by the base interpreter /proc/<pid>/exe points to)."""
    import time

    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    pack = comfy / "custom_nodes" / "max4zero-tryon"
    pack.symlink_to(ROOT, target_is_directory=True)
    (comfy / "main.py").write_text("import time\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "main.py"], cwd=comfy)
    try:
        time.sleep(0.5)
        out = _run(pack / "tools" / "demo.sh", _env(tmp_path))
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode == 0, out.stderr
    assert f"Using {sys.executable} (the Python running ComfyUI (process {proc.pid})" in out.stderr, out.stderr


def test_long_installs_show_progress():
    """pip's progress stays visible during the multi-GB torch install (no -q), and each step is announced."""
    for script in (DEMO_SH, ROOT / ".ci" / "run"):
        text = script.read_text()
        assert "pip install -q" not in text and "--progress-bar on" in text, script
    assert "[1/4]" in (ROOT / ".ci" / "run").read_text() and "[1/2]" in DEMO_SH.read_text()
