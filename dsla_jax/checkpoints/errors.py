"""The one exception type that checkpoint and tokenizer loading raise."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (or tokenizer) that cannot be read, written or trusted.

    The message names the file and the problem. Configuration errors met while loading (a non-Llama `config.json`, for
    instance) are re-raised as CheckpointError, chained to the original `ConfigError`.
    """
