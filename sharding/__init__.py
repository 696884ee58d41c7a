"""Attention-FFN Disaggregation: layouts, memory layout, executors (see docs/afd.md)."""

from step3_jax.sharding.afd import AfdConfig, AfdExecutor, exchange_rounds, pipeline_schedule
from step3_jax.sharding.baseline import BaselineExecutor
from step3_jax.sharding.layout import AfdLayout, ArenaDtypes, ArenaLayout
from step3_jax.sharding.reference import ReferenceExecutor

__all__ = [
    "AfdConfig",
    "AfdExecutor",
    "AfdLayout",
    "ArenaDtypes",
    "ArenaLayout",
    "BaselineExecutor",
    "ReferenceExecutor",
    "exchange_rounds",
    "pipeline_schedule",
]
