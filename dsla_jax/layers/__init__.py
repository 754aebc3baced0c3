"""Flax NNX building blocks: norms, rotary embeddings, attention, MLP, DSLA."""
