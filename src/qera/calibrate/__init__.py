"""Calibration: recording layer-input statistics (hooks, one-shot forward, captured block inputs), statistics files, loss sensitivities."""
