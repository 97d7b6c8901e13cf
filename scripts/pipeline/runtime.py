"""The machine the pipeline runs on: which BLAS MLX uses, which device, which dtype by default.

On Linux the mlx-cpu wheel links the reference (netlib) BLAS, about 5 GFLOP/s for a float32
matmul. OpenBLAS loaded with RTLD_GLOBAL before MLX provides the same symbols (cblas_sgemm, sgemm_
...) and wins symbol lookup: about 200-300 GFLOP/s on 2 cores. The OpenBLAS wheels on PyPI need
libgfortran.so.5, which a bare Linux lacks; mlx-cpu bundles one under a hashed name. So a folder of
symlinks (libopenblas.so.0, libgfortran.so.5 and its libquadmath) is made inside the venv, and the
ngsolve-openblas library, whose RPATH is $ORIGIN, finds its libgfortran there. No root, no
LD_PRELOAD. Set PIPELINE_BLAS=reference to keep the bundled BLAS (for comparison).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

log = logging.getLogger("runtime")

_preloaded: Path | None = None
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(signal_number: int) -> None:
    """Linux: this process gets `signal_number` when the thread that started it ends, however it ends
    (other systems: nothing). A parent already gone (this process adopted by init) ends it at once."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal_number)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal_number)


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def openblas_library() -> Path | None:
    """The OpenBLAS shared library of the ngsolve-openblas wheel, if installed."""
    found = sorted((_site_packages() / "ngsolve_openblas").glob("libopenblas*.so*"))
    return found[0] if found else None


def blas_link_dir() -> Path | None:
    """A folder where OpenBLAS finds a libgfortran.so.5: symlinks into the installed wheels."""
    openblas = openblas_library()
    mlx_libs = _site_packages() / "mlx_cpu.libs"
    gfortran = sorted(mlx_libs.glob("libgfortran-*.so*"))
    if openblas is None or not gfortran:
        return None
    links = {"libopenblas.so.0": openblas, "libgfortran.so.5": gfortran[0]}
    links.update({lib.name: lib for lib in mlx_libs.glob("libquadmath-*.so*")})
    for folder in (Path(sys.prefix) / "lib" / "pipeline-blas", Path.home() / ".cache" / "pipeline-blas"):
        try:
            _ensure_symlinks(folder, links)
            return folder
        except OSError:
            continue
    return None


def _ensure_symlinks(folder: Path, links: dict[str, Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        link = folder / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        tmp = folder / f".{name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)


def preload_fast_blas() -> Path | None:
    """Load OpenBLAS globally before MLX is imported (Linux only). Returns the library loaded."""
    global _preloaded
    if _preloaded or sys.platform != "linux" or os.environ.get("PIPELINE_BLAS") == "reference":
        return _preloaded
    if "mlx.core" in sys.modules:
        log.warning("mlx was imported before the pipeline package: it keeps the reference BLAS")
        return None
    folder = blas_link_dir()
    if folder is None:
        return None
    try:
        ctypes.CDLL(str(folder / "libopenblas.so.0"), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError as exc:
        log.warning("could not load OpenBLAS (%s): MLX keeps the slow reference BLAS", exc)
        return None
    _preloaded = folder / "libopenblas.so.0"
    return _preloaded


def loaded_blas_libraries() -> list[str]:
    """BLAS libraries mapped into this process (Linux: read from /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    found = []
    for line in maps.read_text().splitlines():
        name = line.rsplit(" ", 1)[-1]
        base = os.path.basename(name)
        if ("blas" in base or "accelerate" in base.lower()) and name not in found:
            found.append(name)
    return found


def cpu_threads() -> int:
    """Threads for llama.cpp and quantizing: PIPELINE_THREADS if set (several processes sharing the cores,
    as `make test`'s workers do, would otherwise oversubscribe them and slow each other down many times
    over), else every core."""
    given = os.environ.get("PIPELINE_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else (os.cpu_count() or 1)


def blas_summary() -> dict:
    """Which BLAS serves MLX here: openblas (preloaded), accelerate (macOS) or reference."""
    if sys.platform == "darwin":
        return {"name": "accelerate", "library": "Accelerate.framework", "optimized": True}
    libs = loaded_blas_libraries()
    openblas = next((lib for lib in libs if "openblas" in os.path.basename(lib)), None)
    if openblas and _preloaded:
        return {"name": "openblas", "library": openblas, "optimized": True}
    reference = next((lib for lib in libs if os.path.basename(lib).startswith("libblas")), None)
    return {"name": "reference", "library": reference or "bundled with mlx", "optimized": False}


# MLX is imported inside the functions below: this package must load OpenBLAS before anything imports
# MLX, and the Make-time config commands must not pay for importing it.


def device_name() -> str:
    import mlx.core as mx

    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def accelerator() -> str:
    """metal, cuda or none."""
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "none"


def default_dtype() -> str:
    # On x86 CPUs MLX sends only float32 matmuls to BLAS; float16/bfloat16 take a slow generic loop.
    return "float32" if device_name() == "cpu" else "bfloat16"


def resolve_dtype(name: str) -> str:
    return default_dtype() if name == "auto" else name


def available_memory_bytes() -> int | None:
    """Memory a run can use: MemAvailable on Linux, the GPU's working set on Metal, else physical memory."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            return int(mx.metal.device_info()["max_recommended_working_set_size"])
    except (AttributeError, KeyError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def versions(packages=("mlx", "mlx-lm", "mlx-cpu", "mlx-metal", "transformers", "tokenizers", "gguf")) -> dict:
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def environment() -> dict:
    """What a manifest records about where a stage ran."""
    return {
        "platform": f"{platform.system()}-{platform.machine()}",
        "device": device_name(),
        "accelerator": accelerator(),
        "blas": blas_summary()["name"],
        "versions": versions(),
    }
