"""Fault injection for running ftmem jobs (the `ftmem-chaos` CLI builds on these)."""

from ftmem.chaos.nodes import kill_node, node_processes

__all__ = ["kill_node", "node_processes"]
