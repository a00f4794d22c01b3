"""bench/gpu_check in CPU mode, as CI runs it: the table comes out, every check passes, and a
deliberately injected error makes it fail (exit 1, a FAIL row), so the GPU check cannot rot unseen.

Each test runs the script as a subprocess with this Python (``sys.executable``), one torch thread.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check"
HEADER = "check | device | dtype | metric | value | tolerance | result"
INJECT_ENV = "MAX4ZERO_GPU_CHECK_INJECT"


def run(*args: str, inject: str | None = None, comfy: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(INJECT_ENV, None)
    if not comfy:
        env.pop("COMFYUI_PATH", None)  # the ComfyUI rows are checked by the COMFYUI_PATH test below
    if inject is not None:
        env[INJECT_ENV] = inject
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def rows(stdout: str) -> list[list[str]]:
    """The table's rows as lists of cells (the header and separator excluded)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.sub(r"\s+", " ", line).strip() == HEADER)
    out = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        out.append([c.strip() for c in line.split(" | ")])
    return out


def test_script_is_one_executable_entry_point():
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


def test_help_and_usage_errors_need_no_torch():
    p = run("--help", timeout=60)
    assert p.returncode == 0 and "usage: bench/gpu_check" in p.stdout
    for opt in ("--device {auto,cpu,cuda}", "--quick", "--out FILE"):
        assert opt in p.stdout
    assert run("--checks", "nonsense", timeout=60).returncode == 2
    assert run("--device", "tpu", timeout=60).returncode == 2
    assert run("--grids", "16,x", timeout=60).returncode == 2
    assert run("--quick", inject="nonsense", timeout=60).returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_gpu_auto_says_so_and_cuda_is_a_usage_error():
    p = run("--device", "auto", "--quick", "--threads", "1", "--checks", "timing")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "No GPU found" in p.stdout and "only the CPU paths are checked" in p.stdout
    assert {r[1] for r in rows(p.stdout)} == {"cpu"}
    p = run("--device", "cuda", "--quick", timeout=120)
    assert p.returncode == 2 and "no usable GPU" in p.stderr


def test_cpu_quick_passes_and_prints_the_table(tmp_path):
    out = tmp_path / "result.json"
    p = run("--device", "cpu", "--quick", "--threads", "1", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    table = rows(p.stdout)
    results = {r[-1] for r in table}
    assert results <= {"PASS", "info", "info: goal missed", "skipped"}, p.stdout
    checked = {(r[0], r[2]) for r in table if r[-1] == "PASS"}
    for check in (
        "mea fast (contrast 1)",
        "mea fast, portable path",
        "mea fast, cond/uncond batch",
        "mea explicit (contrast 1.25)",
        "mea explicit, small query chunks",
        "flow capture",
        "flow from q·k (no map)",
        "invariant: outside region = plain",
        "invariant: non-garment ref ignored",
    ):
        for dtype in ("fp32", "fp16", "bf16"):
            assert (check, dtype) in checked, (check, dtype, p.stdout)
    assert any(r[0].startswith("attn fast ") and r[-1].startswith("info") for r in table)
    skipped = [r for r in table if r[-1] == "skipped"]
    assert skipped and all(r[4] == "COMFYUI_PATH not set" for r in skipped)
    assert p.stdout.rstrip().splitlines()[-1].startswith("PASS:")
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["device"] == "cpu" and len(data["rows"]) == len(table)


@pytest.mark.parametrize("inject, failing", [("contrast", "mea explicit (contrast 1.25)"),
                                              ("garment", "invariant: non-garment ref ignored")])
def test_injected_error_fails_the_check(inject, failing):
    p = run("--device", "cpu", "--threads", "1", "--checks", "core", "--grids", "16", inject=inject)
    assert p.returncode == 1, p.stdout + p.stderr
    fails = {r[0] for r in rows(p.stdout) if r[-1] == "FAIL"}
    assert failing in fails, p.stdout
    assert p.stdout.rstrip().splitlines()[-1].startswith("FAIL:")


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH", "").strip(), reason="COMFYUI_PATH is not set")
def test_comfyui_rows_run_on_cpu():
    """With ComfyUI: sampling and feature rows, and the device-vs-CPU-child comparison CUDA runs make."""
    p = run("--device", "cpu", "--quick", "--threads", "1", "--checks", "comfy", "--compare-cpu-child", comfy=True)
    assert p.returncode == 0, p.stdout + p.stderr
    table = rows(p.stdout)
    names = {r[0] for r in table}
    assert not [r for r in table if r[-1] in ("FAIL", "ERROR")], p.stdout
    multigpu = [r for r in table if r[0].startswith("multigpu")]
    skipped = [r for r in table if r[-1] == "skipped" and not r[0].startswith("multigpu")]
    # MultiGPU CFG Split (0.33+): ComfyUI's own split on two CPU devices, checked against one device
    if any(r[-1] == "skipped" for r in multigpu):
        assert "0.33+" in multigpu[0][4], p.stdout
    else:
        assert any(r[0].endswith("fused = one device") and r[-1] == "PASS" for r in multigpu), p.stdout
    for name in ("sampling fused", "sampling paper", "sampling inline ref = separate pass", "features shape",
                 "sampling paper, cpu vs cpu", "features, cpu vs cpu"):
        assert name in names, (name, p.stdout)
    # Flux rows: only on a ComfyUI whose Flux blocks call attn1_patch (0.33.0+); otherwise one row says why
    if skipped:
        assert [r[0] for r in skipped] == ["flux sampling (tiny Flux)"] and "attn1_patch" in skipped[0][4], p.stdout
        assert not [n for n in names if n.startswith("flux") and n != "flux sampling (tiny Flux)"]
    else:
        for name in ("flux sampling fused", "flux sampling paper", "flux MEA changes the result",
                     "flux invariant: text + outside region = block's own", "flux sampling paper, cpu vs cpu"):
            assert name in names, (name, p.stdout)
