"""Fault injection for running ftmem jobs: the `ftmem-chaos` CLI (`ftmem.chaos.cli`) and the pieces it uses."""

from ftmem.chaos.nodes import kill_node, kill_nodes, node_processes

__all__ = ["kill_node", "kill_nodes", "node_processes"]
