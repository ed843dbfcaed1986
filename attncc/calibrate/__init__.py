"""Calibration: choosing a variant per attention head within an error budget (``attncc.calibrate``).

``plan``: the Plan a calibration returns, its JSON file and its policy; ``timing``: the measured time model.
"""
