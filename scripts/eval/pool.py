"""eval's scoring pool: several artifacts scored at once, each in a process of its own.

On a CPU one artifact's scoring leaves cores idle: generation decodes a token at a time, and MLX runs
everything but the matmuls on one thread. Measured here, two MLX artifacts side by side, each with half
the threads, answer 1.75x and score loss 1.2x as fast as one after the other; the whole default eval
gains less (105 -> 99 s), since each process loads its model and llama.cpp is slower on one thread
than on two. Scoring each GGUF alone on both threads after the MLX artifacts was tried: on Alpaca it
left a worker idle for 84 s of the MLX part and took 318 s against 279 s side by side. Each worker is
a Python process of its own (pipeline.isolate.Worker) that scores one job after another, importing MLX
once; a crash in native code (llama.cpp, MLX) fails that artifact alone, with its cause, and a new
process takes that worker's next job.

`eval.workers: auto` is 2 on a CPU with at least 2 threads to give (PIPELINE_THREADS, or every core)
and memory for two models at once; 1 on a GPU, where one model already keeps the device busy. With one
worker the artifacts are scored in the stage's own process, one after the other.
"""

from __future__ import annotations

import concurrent.futures
import queue
from collections.abc import Callable, Iterator

from pipeline import isolate, paths, runtime

# Memory one artifact takes while it is scored, as a multiple of its file size: a quantized MLX model is
# dequantized to float32 on CPU (8-bit: 4x), plus activations and KV caches.
MEMORY_PER_BYTE = {"mlx-quantized": 5.0}
DEFAULT_MEMORY_PER_BYTE = 2.0


def length_rank(artifact: dict, answers: bool) -> int:
    """The rank of a job's expected length, longest first (0): the pool hands each worker the next job
    as it frees, so starting with the longest keeps both busy to the end. A GGUF that answers on one
    thread takes longest (Q4_K_M on Alpaca 163 s, against 94-104 s for an MLX model), then the MLX
    models that answer, then the artifacts scored on loss only."""
    if not answers:
        return 2
    return 0 if artifact["kind"] in ("gguf", "gguf-adapter") else 1


def plan(setting: int | str, artifacts: list[dict]) -> tuple[int, int]:
    """(workers, threads each) for scoring `artifacts` under eval.workers. The threads follow the setting
    and the machine, not how many artifacts are left to score: a BLAS thread count sums some products in
    another order, so an artifact re-scored alone (the others cached) gets the threads it had before."""
    budget = runtime.cpu_threads()
    if not artifacts:
        return 1, budget
    if setting != "auto":
        most = int(setting)
    elif runtime.device_name() != "cpu" or budget < 2:
        most = 1
    else:
        most = 2 if fits_in_memory(artifacts, 2) else 1
    return max(1, min(most, len(artifacts))), max(1, budget // most)


def fits_in_memory(artifacts: list[dict], workers: int) -> bool:
    """Whether the `workers` largest artifacts, scored at once, take at most half the available memory."""
    available = runtime.available_memory_bytes()
    if available is None:
        return False
    needs = sorted(
        (a["bytes"] * MEMORY_PER_BYTE.get(a["kind"], DEFAULT_MEMORY_PER_BYTE) for a in artifacts), reverse=True
    )
    return sum(needs[:workers]) <= available / 2


def run(jobs: list[tuple], score: Callable, workers: int, threads: int) -> Iterator[tuple[int, dict | BaseException]]:
    """(job index, score(*job) or the exception it raised) for every job, as each finishes. With more
    than one worker, or fewer threads than this process has, each worker is a child process
    (isolate.Worker) with `threads` BLAS and llama.cpp threads, scoring one job after another."""
    if workers == 1 and threads == runtime.cpu_threads():
        for index, job in enumerate(jobs):
            try:
                yield index, score(*job)
            except Exception as exc:  # the caller decides what is a scoring failure
                yield index, exc
        return
    env = {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "PIPELINE_THREADS": str(threads)}
    idle = queue.SimpleQueue()
    for _ in range(workers):
        idle.put(isolate.Worker(env))

    def scored_by_a_worker(job: tuple):
        worker = idle.get()
        try:
            return worker.call(
                _in_child,
                str(paths.ROOT),
                score,
                job,
                name=f"scoring {job[0]['id']}",
                where=job[0]["path"],
                fix="run `make eval` again (it scores only what failed); SET=eval.workers=1 scores in one process",
            )
        finally:
            idle.put(worker)

    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as executor:
            futures = {executor.submit(scored_by_a_worker, job): index for index, job in enumerate(jobs)}
            for future in concurrent.futures.as_completed(futures):
                try:
                    yield futures[future], future.result()
                except Exception as exc:
                    yield futures[future], exc
    finally:
        while not idle.empty():
            idle.get().close()


def _in_child(root: str, score: Callable, job: tuple):
    paths.use_root(root)
    return score(*job)
