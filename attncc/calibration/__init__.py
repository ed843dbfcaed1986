"""Calibration: choosing a variant per attention head within an error budget.

``attncc.auto(max_error=...)`` is the policy, ``attncc.calibrate(model, auto, data) -> Plan`` measures and
allocates (``auto``), ``Plan`` (``plan``) is what it returns and what ``attncc.compile(model, plan)`` runs;
``timing`` is the measured time model, ``errors``/``projection``/``interpreter`` measure per-head errors where
they enter the residual stream, ``allocate`` spends the budget.
"""

from attncc.calibration.auto import AutoPolicy, Calibrator, auto, calibrate, default_menu
from attncc.calibration.plan import HeadChoice, Plan

__all__ = ["AutoPolicy", "Calibrator", "HeadChoice", "Plan", "auto", "calibrate", "default_menu"]
