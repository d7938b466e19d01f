"""The cost model: hardware presets, roofline op times, collective times, calibration.

It turns an op's :class:`~overlap.ops_graph.cost.CostFigures` into seconds on a named device,
so plans can be compared on a laptop before any accelerator is touched. Plain Python and attrs
only: importing it never imports torch or numpy.
"""

from overlap.cost.calibrate import (
    Calibration,
    CalibrationRow,
    Measurement,
    fit,
    fit_roles,
    load_measurements,
)
from overlap.cost.collectives import COLLECTIVES, collective_name, collective_time
from overlap.cost.hardware import HARDWARE, Hardware, get_hardware
from overlap.cost.roofline import OpTime, op_time

__all__ = [
    "COLLECTIVES",
    "HARDWARE",
    "Calibration",
    "CalibrationRow",
    "Hardware",
    "Measurement",
    "OpTime",
    "collective_name",
    "collective_time",
    "fit",
    "fit_roles",
    "get_hardware",
    "load_measurements",
    "op_time",
]
