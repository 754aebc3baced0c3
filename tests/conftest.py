"""Shared fixtures: paths to the read-only corpus beside the repo, and the real SmolLM2-135M checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CORPUS = SHARED / "data" / "corpus"
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def corpus_valid() -> Path:
    if not (CORPUS / "valid").is_dir():
        pytest.skip(f"the corpus {CORPUS} is not beside this checkout")
    return CORPUS / "valid"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from dsla_jax.checkpoints import CheckpointError, resolve_model_path

    try:
        return resolve_model_path("smollm2-135m")
    except CheckpointError as e:  # pragma: no cover - the dev requirements install it
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(our Flax model, our tokenizer) for SmolLM2-135M in float32."""
    from dsla_jax.loading import load_model

    return load_model(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """transformers' own GGUF loading of the same file (float32, eval): the independent oracle."""
    from eval.hf_reference import load_hf_model

    return load_hf_model(str(smollm2_path))
