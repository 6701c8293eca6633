"""Monitoring of a training run: console line, TensorBoard, CSV metrics, summary.json, PNG curves.

The trainer uses one class, `TrainingMonitor` (monitor.py). Each other file owns one output:
console.py (console lines), tensorboard.py (event files, Megatron tag names), csv_log.py
(training/validation CSVs), summary.py (summary.json), plots.py (training_curves.png);
records.py holds the per-interval records and atomic.py the temp-file-and-rename helper.
See docs/monitoring.md.
"""

from megazero.monitor.monitor import TrainingMonitor

__all__ = ["TrainingMonitor"]
