"""Measuring speed: interleaved timing (:mod:`.timing`), the runtimes a model is timed in (:mod:`.runtimes`), and
layer latency tables and end-to-end timings (:mod:`.profile`), which the latency-aware allocation and the CLI read."""

from lowrank_vit.speed.profile import (
    cached_profile,
    model_input_size,
    plot_table,
    profile_model,
    rows_per_layer,
    time_models,
)
from lowrank_vit.speed.runtimes import RUNTIMES, environment, get_runtime
from lowrank_vit.speed.timing import interleaved_timings

__all__ = ["RUNTIMES", "cached_profile", "environment", "get_runtime", "interleaved_timings", "model_input_size",
           "plot_table", "profile_model", "rows_per_layer", "time_models"]
