"""Errors raised while reading checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message says which file or tensor and what to fix."""
