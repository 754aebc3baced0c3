"""dsla-jax: dual-state linear attention (DSLA) for Llama-family models in JAX/Flax."""

__version__ = "0.1.0"
