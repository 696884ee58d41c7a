"""Attention-FFN Disaggregation: layouts, memory layout, executors (see docs/afd.md)."""

from sharding.afd import AfdConfig, AfdExecutor, exchange_rounds, pipeline_schedule
from sharding.baseline import BaselineExecutor
from sharding.layout import AfdLayout, ArenaDtypes, ArenaLayout
from sharding.reference import ReferenceExecutor

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
