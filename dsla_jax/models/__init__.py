"""Model definitions (Llama-family decoder, hybrid softmax/DSLA)."""
