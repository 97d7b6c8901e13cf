"""Shared plumbing for the stage scripts: config, contracts (schemas + atomic I/O), hashing,
logging, paths, the runtime (BLAS, device, dtype), staging (a stage's outputs swapped in with its
manifest, or not at all), isolate (native code run in a child process) and the stage registry.

Importing this package loads an optimized BLAS on Linux before anything imports MLX: the mlx-cpu
wheel bundles the reference BLAS (~5 GFLOP/s), and a library loaded globally first takes its place.
"""

from pipeline import runtime as _runtime

_runtime.preload_fast_blas()
