"""Command-line entry points for training: `python -m train.distill`, `python -m train.ordering`."""
