"""Trainer side: the hook, the layout plan, the copy engine and state capture."""
