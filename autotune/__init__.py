"""Search spaces (`<kernel>.json`) and the shape grid (`grid.json`) of the autotuner, with their JSON
Schemas; shipped as package data (`dustin_kernels.autotune.spaces`). Read by `dustin_kernels.autotune`."""
