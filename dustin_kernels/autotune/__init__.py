"""The autotuner: `python -m dustin_kernels.autotune` (see `__main__`).

Modules: `space` (search spaces and grids as data, constraints, enumeration), `workloads` (the
problems timed, their DB keys and bytes), `search` (sweep / Optuna TPE, seeding, stopping, resume),
`measure` (AOT and correctness checks, do_bench timing with L2 flush and CUDA graphs, NVML throttle
checks, interleaved re-measure), `tuner` (buckets, trial log, DB writes).
"""
