"""Ahead-of-time plans for TPU and GPU programs: per-chip memory, cost and memory traffic."""
