"""Getting a run ready: the teacher, the training rows, the conversion order, the student's placed parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from dsla_jax.checkpoints import load_checkpoint
from dsla_jax.loading import parse_dtype
from dsla_jax.models.llama import Llama
from dsla_jax.models.weights import load_llama
from dsla_jax.tokenizer import Tokenizer, load_tokenizer
from dsla_jax.training.calibrate import calibrate
from dsla_jax.training.chain import ChainPlan, build_student
from dsla_jax.training.checkpoint import model_fingerprint
from dsla_jax.training.config import DistillConfig, DistillConfigError
from dsla_jax.training.data import DataError, TokenRows, build_rows, split_heldout, tokenize_documents
from dsla_jax.training.ordering import layer_order
from dsla_jax.training.params import Flat, partition, split_model, trainable_filter
from dsla_jax.training.sharding import param_shardings


def say(*args: Any) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


# ---- loading -----------------------------------------------------------------------------------------------------


def load_teacher(cfg: DistillConfig) -> tuple[Llama, Tokenizer, dict[str, Any]]:
    """(frozen teacher, tokenizer, model fingerprint) for `model.spec`."""
    config, state_dict = load_checkpoint(cfg.model.spec)
    if config.dsla_layers:
        raise DistillConfigError(
            f"model.spec: {cfg.model.spec} already has DSLA layers {list(config.dsla_layers)}; "
            "distill from the original model"
        )
    config = config.replace(dsla_grouped=cfg.model.dsla_grouped)
    fingerprint = model_fingerprint(config, state_dict)
    teacher = load_llama(
        config, state_dict, dtype=parse_dtype(cfg.model.dtype), param_dtype=parse_dtype(cfg.model.frozen_dtype)
    )
    return teacher, load_tokenizer(cfg.model.spec), fingerprint


def load_rows(cfg: DistillConfig, tokenizer: Tokenizer) -> tuple[TokenRows, TokenRows]:
    """(training rows, held-out rows) from `data.sources`."""
    d = cfg.data
    docs = tokenize_documents(
        tokenizer, d.sources, text_field=d.text_field, hf_split=d.hf_split, max_tokens=d.max_tokens
    )
    rows = build_rows(docs, d.seq_len, d.packing, pad_id=tokenizer.pad_id or 0)
    n_tokens = int(sum(x.size for x in docs))
    if len(rows) == 0:
        raise DataError(f"data.sources give {n_tokens} tokens, not enough for one row of data.seq_len={d.seq_len}")
    return split_heldout(rows, d.heldout_fraction)


def resolve_order(
    cfg: DistillConfig, teacher: Llama, train: TokenRows, heldout: TokenRows, fingerprint: dict[str, Any]
) -> list[int]:
    if cfg.chain.ordering == "explicit":
        return list(cfg.chain.layers)
    if cfg.chain.ordering == "sensitivity" and len(heldout) == 0:
        raise DistillConfigError("chain.ordering=sensitivity needs held-out text: set data.heldout_fraction > 0")
    result = layer_order(
        cfg.chain.ordering,
        teacher,
        prompt_rows=train,
        heldout_rows=heldout,
        cfg=cfg.ordering,
        model_cfg=cfg.model,
        fingerprint=fingerprint["weights"],
        cache_dir=cfg.ordering.cache_dir or cfg.out_dir,
        calibration_rows=cfg.chain.calibration_rows if cfg.chain.calibrate else 0,
        progress=cfg.log.progress,
    )
    return result["order"]


def place(flats: list[Flat], mesh) -> list[Flat]:
    """Put flat dictionaries on the mesh; an array shared by several entries (same object, same sharding) is placed
    once, so the teacher and the student's frozen weights occupy device memory once."""
    placed: dict[tuple[int, Any], jax.Array] = {}
    out = []
    for flat in flats:
        shardings = param_shardings(flat, mesh)
        res = {}
        for k, v in flat.items():
            key = (id(v), shardings[k].spec)
            if key not in placed:
                placed[key] = jax.device_put(v, shardings[k])
            res[k] = placed[key]
        out.append(res)
    return out


@dataclass
class StudentState:
    """The student's graph and placed parameters: trained (float32 masters), frozen, and the teacher's."""

    graph: Any
    teacher_graph: Any
    trainable: Flat
    frozen: Flat
    teacher_flat: Flat


def build_student_state(
    cfg: DistillConfig, teacher: Llama, plan: ChainPlan, train_rows: TokenRows, mesh
) -> StudentState:
    """Convert the chain's layers (calibrated when `chain.calibrate`), split trainable from frozen, place on `mesh`."""
    student = build_student(teacher, plan.chain_layers, cfg.model)
    if cfg.chain.calibrate:
        mixers = {i: student.layers[i].self_attn for i in plan.chain_layers}
        rows = cfg.chain.calibration_rows
        scales = calibrate(teacher, mixers, train_rows, num_rows=rows, batch_size=cfg.ordering.batch_size)
        say("output scales of the fresh DSLA layers: " + ", ".join(f"{i}: {s:.3g}" for i, s in scales.items()))
    teacher_graph, teacher_flat = split_model(teacher)
    graph, flat = split_model(student)
    keep = trainable_filter(
        plan.chain_layers, mlp=cfg.chain.train_mlp, norms=cfg.chain.train_norms, single_state=cfg.model.mixer == "gla"
    )
    trainable, frozen = partition(flat, keep)
    trainable = {k: jnp.array(v, dtype=jnp.float32, copy=True) for k, v in trainable.items()}  # float32 masters
    teacher_flat, frozen, trainable = place([teacher_flat, frozen, trainable], mesh)
    return StudentState(graph, teacher_graph, trainable, frozen, teacher_flat)
