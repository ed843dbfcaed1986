"""Calibrated per-head plans: ``attncc.auto(max_error=...)``, ``attncc.calibrate(model, auto, data) -> Plan``."""

from attncc.calibrate.auto import AutoPolicy, auto, calibrate, default_menu

__all__ = ["AutoPolicy", "auto", "calibrate", "default_menu"]
