"""doctor and the runtime: an optimized BLAS is loaded automatically and is fast."""

from __future__ import annotations

import platform
import subprocess
import sys

from pipeline import runtime

import mlx.core as mx
import pytest

import doctor
from helpers import REPO

linux_x86 = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"), reason="OpenBLAS preloading is for Linux x86-64"
)


@linux_x86
def test_openblas_is_loaded_in_process():
    assert runtime.blas_summary()["name"] == "openblas"
    assert any("openblas" in lib for lib in runtime.loaded_blas_libraries())


@linux_x86
@pytest.mark.serial  # timed
def test_matmul_is_ten_times_the_reference_blas():
    # Reference BLAS gives ~5 GFLOP/s here and OpenBLAS ~300; 50 tells them apart even when a neighbour
    # process on these shared 2-core machines takes half the CPU. Best of three medians.
    assert max(doctor.matmul_gflops(1024, 10) for _ in range(3)) >= 50


def test_cpu_default_dtype_is_float32():

    if mx.default_device() == mx.cpu:
        assert runtime.default_dtype() == "float32"
    else:
        assert runtime.default_dtype() == "bfloat16"


@linux_x86
def test_doctor_reports_openblas_and_reference_blas_is_flagged():
    fast = subprocess.run(
        [sys.executable, "scripts/doctor.py", "doctor.min_gflops=20"], cwd=REPO, capture_output=True, text=True
    )
    assert fast.returncode == 0, fast.stderr
    assert "openblas" in fast.stdout and "GFLOP/s" in fast.stdout
    slow = subprocess.run(
        [sys.executable, "scripts/doctor.py", "doctor.matmul_size=256", "doctor.matmul_repeats=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PIPELINE_BLAS": "reference", "PATH": "/usr/bin:/bin"},
    )
    assert slow.returncode == 1
    assert "WARNING" in slow.stderr and "reference BLAS" in slow.stderr
