"""Tuned launch configs, `<kernel>/<arch>/<device>.json`, and their JSON Schema; shipped as package data
(`dustin_kernels.perf_db_data`). Read and written by `dustin_kernels.perf_db`."""
