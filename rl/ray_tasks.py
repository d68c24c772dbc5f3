"""Plain functions run as Ray tasks by the driver (the step's dataflow, the guard's image statistics)."""

from __future__ import annotations

import functools


@functools.cache
def ray_task(function, **options):
    """`function` as a Ray task with these options, registered once per driver process."""
    import ray

    return ray.remote(**options)(function)
