"""Measurement of a bundle as it will be used: quality, size, parameters, latency, throughput, peak memory.

``run.py`` measures one bundle in this process or a fresh one (``python -m tansuo.measure BUNDLE``) and
compares the speed of several in rounds of fresh processes.
"""

from tansuo.measure.run import (
    compare_in_rounds,
    measure_bundle,
    measure_in_subprocess,
    measure_speed,
    speed_in_rounds,
)

__all__ = ["compare_in_rounds", "measure_bundle", "measure_in_subprocess", "measure_speed", "speed_in_rounds"]
