"""Benchmarks of step3_jax: one script per kernel/system, all measured through `harness`.

Run a script from the repository root as ``python3 benchmarks/bench_x.py`` (each puts the
root on ``sys.path``) or as ``python3 -m benchmarks.bench_x``.
"""
