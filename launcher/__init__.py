"""`ftmem-run`: a drop-in torchrun that also runs the node's SMP."""
