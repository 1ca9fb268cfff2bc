"""Ahead-of-time plans for TPU and GPU programs: per-chip memory, cost and memory traffic.

`python -m vidtok_jax.planning` is the command (`__main__`); `configs` builds the configs a plan
compiles, `aot` compiles them for a device slice, `traffic` reads where the bytes go.
"""
