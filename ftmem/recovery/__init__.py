"""Restoring state: agreeing on a step, choosing its source, loading and verifying it."""
