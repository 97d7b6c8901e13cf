"""doctor: what this machine gives the pipeline (platform, device, versions, BLAS) and how fast it is.

Reads config section `doctor`. Writes nothing: it prints a report and warns loudly when MLX's CPU
matmuls go to the slow reference BLAS. Exit 1 when the BLAS is slow on a CPU-only machine.
"""

from __future__ import annotations

import logging
import platform
import statistics
import sys
import time

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import cli, distributed, runtime
from pipeline.errors import PipelineError

import mlx.core as mx
from rich.console import Console
from rich.table import Table

log = logging.getLogger("doctor")


def build_parser():
    return cli.stage_parser("doctor", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    outcome = {}
    code = cli.run_stage("doctor", args, lambda cfg: outcome.update(run(cfg)))
    return code or (0 if outcome.get("ok") else 1)


def run(cfg) -> dict:
    blas = runtime.blas_summary()
    gflops = matmul_gflops(cfg.doctor.matmul_size, cfg.doctor.matmul_repeats)
    rows = [
        ("platform", f"{platform.system()} {platform.machine()} ({platform.platform()})"),
        ("python", platform.python_version()),
        ("mlx default device", str(mx.default_device())),
        ("accelerator", runtime.accelerator()),
        ("default dtype", runtime.default_dtype()),
        *[(name, ver) for name, ver in runtime.versions().items() if name != "python"],
        ("BLAS in use", f"{blas['name']} ({blas['library']})"),
        ("BLAS libraries loaded", ", ".join(runtime.loaded_blas_libraries()) or "none found in /proc/self/maps"),
        (f"float32 matmul {cfg.doctor.matmul_size}^3", f"{gflops:.1f} GFLOP/s on {runtime.device_name()}"),
    ]
    hosts_ok = True
    if distributed.configured(cfg):
        try:
            found = distributed.probe(cfg.distributed)
            rows += distributed_rows(found)
            hosts_ok = found["all_sum_correct"]
        except PipelineError as exc:
            rows.append(("distributed", f"FAILED: {exc.line()}"))
            hosts_ok = False
    print_table(rows)
    slow = runtime.device_name() == "cpu" and gflops < cfg.doctor.min_gflops
    if slow or not blas["optimized"]:
        print(
            "\n"
            + "!" * 78
            + f"\n!! WARNING: MLX's CPU matmuls run at {gflops:.1f} GFLOP/s with the {blas['name']} BLAS.\n"
            "!! Training will be 10-60x slower than it should. Fix: `make setup` (installs ngsolve-openblas,\n"
            "!! which the pipeline loads automatically) and do not set PIPELINE_BLAS=reference.\n" + "!" * 78,
            file=sys.stderr,
        )
    else:
        print(f"\nOK: {blas['name']} BLAS, {gflops:.0f} GFLOP/s.")
    if not hosts_ok:
        print("\nThe hosts of `distributed` cannot train together: see the distributed row above.", file=sys.stderr)
    return {"ok": not slow and hosts_ok, "gflops": gflops, "blas": blas["name"]}


def distributed_rows(found: dict) -> list[tuple[str, str]]:
    """The hosts check's rows: who joined, and how fast an all_sum went."""
    speed = found["all_sum_mib"] / 1024 / found["all_sum_seconds"]
    return [
        (
            "distributed ranks",
            f"{found['world_size']} joined over {found['backend']} in {found['seconds_to_run']:.1f} s: "
            + ", ".join(found["hostnames"]),
        ),
        (
            "distributed all_sum",
            f"{found['all_sum_mib']} MiB in {found['all_sum_seconds']:.3f} s ({speed:.2f} GiB/s), "
            + ("correct" if found["all_sum_correct"] else "WRONG SUM"),
        ),
    ]


def matmul_gflops(n: int, repeats: int) -> float:
    """Median GFLOP/s of an n x n x n float32 matmul on MLX's default device."""
    a = mx.random.normal((n, n), dtype=mx.float32)
    b = mx.random.normal((n, n), dtype=mx.float32)
    mx.eval(a @ b)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds) / 1e9


def print_table(rows: list[tuple[str, str]]) -> None:
    table = Table(title="doctor", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, value)
    Console(width=120).print(table)


if __name__ == "__main__":
    sys.exit(main())
