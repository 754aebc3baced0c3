"""Language-model metrics as pure functions over a `Llama`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dsla_jax.models.llama import Llama


def token_nll(model: Llama, tokens: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    tokens, valid: [B, T] (valid False = right padding). Position t predicts token t+1 when both are valid.
    """
    hidden, _ = model(tokens, valid=valid)
    logits = model.logits(hidden[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    mask = valid[:, 1:] & valid[:, :-1]
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(graphdef, state, tokens, valid):
    return token_nll(nnx.merge(graphdef, state), tokens, valid)


def perplexity(
    model: Llama, ids: list[int] | np.ndarray, *, window: int = 512, batch_size: int = 4, progress: bool = True
) -> dict:
    """Perplexity over non-overlapping windows of `window` tokens (each window starts with no context).

    Returns {"ppl", "nll", "tokens" (predicted tokens), "windows"}. A shorter last window is right-padded and masked.
    """
    ids = np.asarray(ids, np.int32)
    if window < 2:
        raise ValueError(f"window={window} must be >= 2")
    if ids.size < 2:
        raise ValueError(f"need at least 2 tokens for perplexity, got {ids.size}")
    n_windows = -(-ids.size // window)
    tokens = np.zeros((n_windows, window), np.int32)
    valid = np.zeros((n_windows, window), bool)
    for w in range(n_windows):
        chunk = ids[w * window : (w + 1) * window]
        tokens[w, : chunk.size] = chunk
        valid[w, : chunk.size] = True
    pad_rows = (-n_windows) % batch_size
    tokens = np.concatenate([tokens, np.zeros((pad_rows, window), np.int32)])
    valid = np.concatenate([valid, np.zeros((pad_rows, window), bool)])
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc="perplexity", unit="batch", disable=not progress):
        s, c = _window_nll(graphdef, state, tokens[start : start + batch_size], valid[start : start + batch_size])
        total += float(s)
        count += int(c)
    return {"ppl": float(np.exp(total / count)), "nll": total / count, "tokens": count, "windows": n_windows}
