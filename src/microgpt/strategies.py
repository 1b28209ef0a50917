"""Distributed strategies. (Filled in by the scale-out work; the hook below is called by LitGPT.)"""

from __future__ import annotations


def shard_for_strategy(module) -> None:
    """Apply per-strategy model sharding in LitGPT.configure_model (no-op for single process/DDP)."""
    return None
