"""One way to run the demo builder's many small jobs: in order, in this process or a pool, with a bar."""
from __future__ import annotations

import multiprocessing as mp
from typing import Callable, Iterator, Sequence, TypeVar

from tqdm import tqdm

Job, Result = TypeVar("Job"), TypeVar("Result")


def run_jobs(fn: Callable[[Job], Result], jobs: Sequence[Job], workers: int, desc: str, unit: str,
             chunksize: int, initializer: Callable[[], None] | None = None,
             progress: bool = True) -> Iterator[Result]:
    """fn(job) for each job, results in job order; `workers` == 1 runs them here (no pool, no pickling),
    otherwise a pool of `workers` processes, forked where the platform can (they start in milliseconds and
    re-import nothing), spawned elsewhere; `initializer` runs once in each worker process."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=None if progress else True) as bar:
        if workers == 1:
            for result in map(fn, jobs):
                bar.update()
                yield result
            return
        context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with context.Pool(workers, initializer=initializer) as pool:
            for result in pool.imap(fn, jobs, chunksize=chunksize):
                bar.update()
                yield result
