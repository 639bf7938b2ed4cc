"""The snapshot-management process (SMP): owns a node's shared-memory snapshot buffers."""
