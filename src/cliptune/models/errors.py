"""Errors a user can cause when naming or loading a model."""


class ModelError(ValueError):
    """A model name, tag or file that cannot be used; the message says what to change."""
