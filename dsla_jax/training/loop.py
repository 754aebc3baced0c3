"""The distillation run: load, order, build the student, train the chain, checkpoint, evaluate, export.

    summary = run_distillation(load_config("configs/smollm2_demo.yaml"), resume=False)

Chain step k converts layer order[k] and trains for `chain.steps_per_layer` optimizer steps (optimizer state and
learning-rate schedule restart per layer). A checkpoint is written at the end of every layer and every
`checkpoint.every_steps` steps; `resume=True` continues from the newest one exactly (parameters, optimizer state,
data position, chain position). At each stage (`chain.stages`) the hybrid with that many converted layers is
evaluated and written to `<out_dir>/stages/<n>_layers/`; the last one also to `<out_dir>/final/`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from dsla_jax.models.hybrid import dsla_state_dict
from dsla_jax.models.llama import Llama
from dsla_jax.models.weights import llama_state_dict
from dsla_jax.training.chain import check_layers, make_hybrid, make_plan, trained_shared_keys
from dsla_jax.training.checkpoint import (
    CheckpointMismatch,
    RunCheckpoints,
    check_fingerprint,
    write_distilled,
)
from dsla_jax.training.config import DistillConfig
from dsla_jax.training.data import BatchIterator
from dsla_jax.training.evaluate import eval_sets, evaluate, summary_table
from dsla_jax.training.metrics_log import MetricsLog
from dsla_jax.training.optim import lr_schedule, make_optimizer
from dsla_jax.training.setup import build_student_state, load_rows, load_teacher, resolve_order, say
from dsla_jax.training.sharding import (
    batch_sharding,
    check_batch,
    local_micro_batches,
    make_mesh,
    maybe_initialize_distributed,
    put_batch,
    replicated,
)
from dsla_jax.training.step import NonFiniteLoss, StepSpec, compile_step
from dsla_jax.training.transfer import format_mse, run_transfer


class RunError(RuntimeError):
    """A run that cannot start or continue as asked (e.g. an existing run without --resume)."""


# ---- the run -------------------------------------------------------------------------------------------------------


@dataclass
class Position:
    chain_index: int = 0  # the chain step in progress (== plan length when done)
    step_in_layer: int = 0  # optimizer steps done in that chain step
    global_step: int = 0
    tokens: int = 0  # training tokens (valid positions) consumed
    skipped: int = 0
    transfer_tokens: int = 0  # of `tokens`, those the attention-transfer stage used
    evals: list[dict[str, Any]] = field(default_factory=list)


def _check_config_changes(saved: dict[str, Any], current: dict[str, Any]) -> None:
    changed = []
    for section, values in current.items():
        old = saved.get(section)
        if isinstance(values, dict) and isinstance(old, dict):
            changed += [f"{section}.{k}" for k in values if old.get(k) != values[k]]
        elif old != values:
            changed.append(section)
    if changed:
        say(f"note: resuming with config keys changed since the checkpoint: {', '.join(changed)}")


def run_distillation(
    cfg: DistillConfig, *, resume: bool = False, after_step: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Run (or, with `resume`, continue) the distillation `cfg` describes; returns the summary (also in
    `<out_dir>/summary.json`), or {"complete": False, ...} when `train.time_limit_s` stopped it early (after a
    checkpoint). `after_step(global_step)` is called after every step and its checkpoint (tests use it to interrupt
    a run). However the run ends, a checkpoint being written completes first."""
    started = time.perf_counter()
    out = Path(cfg.out_dir)
    if cfg.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(cfg.compile_cache).absolute()))
    maybe_initialize_distributed(cfg.mesh.distributed)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    check_batch(cfg.train.batch_size // cfg.train.grad_accum, mesh)
    ckpts = RunCheckpoints(out / "checkpoints", keep=cfg.checkpoint.keep)
    log = MetricsLog(out / "metrics.jsonl", tensorboard=cfg.log.tensorboard, enabled=jax.process_index() == 0)
    try:
        return _run(cfg, mesh, ckpts, log, resume=resume, after_step=after_step, started=started)
    finally:
        ckpts.wait()
        ckpts.close()
        log.close()


def _run(
    cfg: DistillConfig,
    mesh,
    ckpts: RunCheckpoints,
    log: MetricsLog,
    *,
    resume: bool,
    after_step: Callable[[int], None] | None,
    started: float,
) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    latest = ckpts.latest_step()
    if latest is not None and not resume:
        raise RunError(
            f"{out} already holds checkpoints (newest: step {latest}); pass --resume to continue that run, "
            "or choose another out_dir"
        )
    meta = ckpts.read_meta(latest) if resume and latest is not None else None
    if resume and meta is None:
        say(f"--resume: no checkpoint under {out / 'checkpoints'}; starting from the beginning")

    say(f"loading {cfg.model.spec}")
    teacher, tokenizer, fingerprint = load_teacher(cfg)
    num_layers = teacher.config.num_hidden_layers
    if meta is not None:
        check_fingerprint(meta["fingerprint"], fingerprint, f"checkpoint {ckpts.directory / str(latest)}")
        _check_config_changes(meta["config"], cfg.to_dict())
    if cfg.chain.ordering == "explicit":
        check_layers(cfg.chain.layers, num_layers)
        make_plan(cfg.chain, num_layers, cfg.chain.layers)

    say("tokenizing " + ", ".join(cfg.data.sources))
    train_rows, heldout_rows = load_rows(cfg, tokenizer)
    iterator = BatchIterator(len(train_rows), cfg.train.batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    data_fp = train_rows.fingerprint()
    say(f"{len(train_rows)} training rows of {train_rows.seq_len} tokens, {len(heldout_rows)} held out")

    if meta is not None:
        if meta["data"]["fingerprint"] != data_fp:
            raise CheckpointMismatch(
                f"checkpoint {ckpts.directory / str(latest)} was trained on other data (rows "
                f"{meta['data']['fingerprint']}, now {data_fp}); resuming would not continue exactly"
            )
        order = list(meta["plan"]["order"])
        if cfg.chain.ordering == "explicit" and list(cfg.chain.layers) != order:
            raise CheckpointMismatch(
                f"checkpoint's chain order {order} differs from chain.layers {list(cfg.chain.layers)}"
            )
    else:
        order = resolve_order(cfg, teacher, train_rows, heldout_rows, fingerprint)
    plan = make_plan(cfg.chain, num_layers, order)
    say(f"conversion order ({cfg.chain.ordering}): {list(plan.order)}; stages {list(plan.stages)} of {num_layers}")

    student = build_student_state(cfg, teacher, plan, train_rows, mesh)
    student_graph, teacher_graph = student.graph, student.teacher_graph
    trainable, frozen, teacher_flat = student.trainable, student.frozen, student.teacher_flat

    steps = cfg.chain.steps_per_layer
    opt = make_optimizer(cfg.optim, steps)
    schedule = lr_schedule(cfg.optim, steps)
    spec = StepSpec(student_graph, teacher_graph, cfg.loss, plan.chain_layers, steps, cfg.train.remat)
    step_fn, opt_init = compile_step(spec, opt, mesh, trainable, frozen, teacher_flat)
    opt_state = opt_init(trainable)

    pos = Position()
    if meta is not None:
        state = ckpts.restore_state(latest, {"params": trainable, "opt_state": opt_state})
        trainable, opt_state = state["params"], state["opt_state"]
        iterator.load_state_dict(meta["data"]["iterator"])
        pos = Position(
            **{k: meta[k] for k in ("chain_index", "step_in_layer", "global_step", "tokens", "skipped")},
            transfer_tokens=int(meta.get("transfer_tokens", 0)),
            evals=list(meta["evals"]),
        )
        where = (
            "the chain is complete"
            if pos.chain_index >= plan.length
            else f"chain step {pos.chain_index + 1}/{plan.length}, step {pos.step_in_layer}"
        )
        say(f"resumed from step {latest}: {where}")

    is_main = jax.process_index() == 0
    sets = eval_sets(cfg, tokenizer, heldout_rows)
    if meta is None and sets:
        say("evaluating the teacher" + (" and the freshly converted hybrid" if cfg.eval.before else ""))
        pos.evals.append({"name": "teacher", "layers": [], "results": evaluate(teacher, sets, cfg)})
        if cfg.eval.before:
            fresh = make_hybrid(student_graph, trainable, frozen, plan.chain_layers)
            name = f"fresh {plan.length}/{num_layers}"
            pos.evals.append({"name": name, "layers": list(plan.chain_layers), "results": evaluate(fresh, sets, cfg)})
        for r in pos.evals:
            log.write("eval", name=r["name"], layers=r["layers"], results=r["results"])

    def meta_now() -> dict[str, Any]:
        return {
            "format": 1,
            "fingerprint": fingerprint,
            "plan": {"order": list(plan.order), "stages": list(plan.stages)},
            "chain_index": pos.chain_index,
            "step_in_layer": pos.step_in_layer,
            "global_step": pos.global_step,
            "tokens": pos.tokens,
            "skipped": pos.skipped,
            "transfer_tokens": pos.transfer_tokens,
            "data": {"iterator": iterator.state_dict(), "fingerprint": data_fp},
            "evals": pos.evals,
            "config": cfg.to_dict(),
        }

    def distilled_info(results: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "fingerprint": fingerprint,
            "order": list(plan.order),
            "mixer": cfg.model.mixer,
            "training_tokens": pos.tokens,
            "transfer_tokens": pos.transfer_tokens,
            "eval": results,
            "config": cfg.to_dict(),
        }

    def evaluate_hybrid(name: str, layers: list[int], hybrid: Llama) -> dict[str, Any]:
        """Evaluate `hybrid` on the eval sets and record the result (run position and metrics log)."""
        record = {"name": name, "layers": layers, "results": evaluate(hybrid, sets, cfg), "tokens": pos.tokens}
        pos.evals.append(record)
        log.write("eval", **record)
        return record["results"]

    def export_stage(n: int, directory: Path) -> Llama:
        """Evaluate (once per stage) and write the hybrid with the first n layers of the order converted."""
        layers = list(plan.order[:n])
        hybrid = make_hybrid(student_graph, trainable, frozen, layers)
        name = f"trained {n}/{num_layers}"
        done = next((r for r in pos.evals if r["name"] == name), None)
        results = done["results"] if done else None
        if sets and done is None:
            results = evaluate_hybrid(name, layers, hybrid)
        if is_main:
            full = llama_state_dict(hybrid) if cfg.chain.train_mlp or cfg.chain.train_norms else {}
            shared = {k: full[k] for k in trained_shared_keys(full, tuple(layers), cfg.chain)}
            write_distilled(
                directory,
                hybrid.config,
                dsla_state_dict(hybrid),
                base_model=cfg.model.spec,
                shared_tensors=shared,
                info=distilled_info(results),
            )
        return hybrid

    limit = cfg.train.time_limit_s
    if meta is None and cfg.transfer.steps:
        # Attention transfer, then a checkpoint at step 0: --resume never redoes it (a kill during it restarts it).
        say(f"attention transfer: {cfg.transfer.steps} steps of {cfg.transfer_batch_size} rows, {plan.length} layers")
        res = run_transfer(
            cfg, plan.chain_layers, student_graph, teacher_graph, trainable, frozen, teacher_flat, train_rows, mesh, log
        )
        trainable = res.trainable
        pos.tokens += res.tokens
        pos.transfer_tokens = res.tokens
        pos.skipped += res.skipped
        say(f"attention transfer, relative MSE per layer: first batch {format_mse(res.first_mse)}")
        say(f"                                            last batch  {format_mse(res.last_mse)}")
        log.write("transfer_done", steps=res.steps, tokens=res.tokens, first_mse=res.first_mse, last_mse=res.last_mse)
        if sets and cfg.eval.before:
            # Every stage's hybrid right after the transfer (no chain step yet): what the chain then adds.
            for n in plan.stages:
                layers = list(plan.order[:n])
                hybrid = make_hybrid(student_graph, trainable, frozen, layers)
                evaluate_hybrid(f"transferred {n}/{num_layers}", layers, hybrid)
                say(f"evaluated the transferred hybrid with {n} layers")
        ckpts.save(0, {"params": trainable, "opt_state": opt_state}, meta_now())
        if limit and time.perf_counter() - started > limit:
            say("time limit reached after the attention transfer; continue with --resume")
            return {"complete": False, "out_dir": str(out), "steps": pos.global_step, "tokens": pos.tokens}
    active_sh = replicated(mesh)
    b_sh = batch_sharding(mesh)
    for k in range(pos.chain_index, plan.length):
        layer = plan.order[k]
        active = jax.device_put(jnp.asarray(plan.active_mask(k)), active_sh)
        train_on = jax.device_put(jnp.asarray(plan.train_mask(k, cfg.chain.train_previous)), active_sh)
        if pos.step_in_layer == 0:
            opt_state = opt_init(trainable)
        bar = tqdm(
            total=steps,
            initial=pos.step_in_layer,
            desc=f"layer {layer} ({k + 1}/{plan.length})",
            disable=not (cfg.log.progress and is_main),
            unit="step",
        )
        for s in range(pos.step_in_layer, steps):
            idx = iterator.next_indices()
            n_tokens = int(train_rows.valid[idx].sum())
            batch = put_batch(local_micro_batches(train_rows, idx, cfg.train.grad_accum), b_sh)
            t0 = time.perf_counter()
            trainable, opt_state, m = step_fn(
                trainable, opt_state, frozen, teacher_flat, batch, active, train_on, jnp.int32(s)
            )
            m = {key: float(v) for key, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            finite = bool(m.pop("finite"))
            pos.global_step += 1
            pos.step_in_layer = s + 1
            pos.tokens += n_tokens
            record = {
                "global_step": pos.global_step,
                "chain_step": k + 1,
                "layer": layer,
                "step": s + 1,
                **m,
                "lr": float(schedule(s)),
                "tokens": pos.tokens,
                "tokens_per_s": n_tokens / dt,
                "step_s": dt,
                "skipped": not finite,
            }
            if not finite:
                log.write("nan", **record)
                if cfg.train.on_nan == "stop":
                    ckpts.wait()
                    last = ckpts.latest_step()
                    raise NonFiniteLoss(
                        f"loss is {m['loss']} (grad norm {m['grad_norm']}) at step {pos.global_step} (layer {layer}, "
                        f"chain step {k + 1}/{plan.length}); the step was not applied and no checkpoint was written "
                        f"(last checkpoint: {'none' if last is None else f'step {last}'}). Lower optim.lr, or set "
                        "train.on_nan=skip to skip such steps"
                    )
                pos.skipped += 1
            if pos.global_step % cfg.log.every_steps == 0 or not finite:
                log.write("step", **record)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", kl=f"{m['kl']:.4f}", refresh=False)
            layer_done = s + 1 == steps
            if layer_done:
                pos.chain_index, pos.step_in_layer = k + 1, 0
                if k + 1 in plan.stages:
                    bar.set_description(f"layer {layer}: evaluating stage {k + 1}")
                    export_stage(k + 1, out / "stages" / f"{k + 1}_layers")
            every = cfg.checkpoint.every_steps
            out_of_time = bool(limit) and time.perf_counter() - started > limit
            if layer_done or out_of_time or (every and pos.global_step % every == 0):
                ckpts.save(pos.global_step, {"params": trainable, "opt_state": opt_state}, meta_now())
            if after_step is not None:
                after_step(pos.global_step)
            if out_of_time and not (layer_done and k + 1 == plan.length):
                bar.close()
                say(f"time limit of {limit:.0f} s reached after step {pos.global_step}; continue with --resume")
                return {"complete": False, "out_dir": str(out), "steps": pos.global_step, "tokens": pos.tokens}
        bar.close()
        log.write("layer_done", chain_step=k + 1, layer=layer, global_step=pos.global_step, tokens=pos.tokens)

    final = out / "final"
    hybrid = export_stage(plan.length, final)
    if cfg.checkpoint.export_hf and is_main:
        from dsla_jax.export import export_hf

        export_hf(hybrid, tokenizer, final / "hf", overwrite=True)
    summary = {
        "complete": True,
        "out_dir": str(out),
        "model": cfg.model.spec,
        "order": list(plan.order),
        "stages": list(plan.stages),
        "dsla_layers": sorted(plan.chain_layers),
        "training_tokens": pos.tokens,
        "transfer_tokens": pos.transfer_tokens,
        "steps": pos.global_step,
        "skipped_steps": pos.skipped,
        "wall_s": time.perf_counter() - started,
        "evals": pos.evals,
        "table": summary_table(pos.evals),
    }
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.write("summary", **{k: v for k, v in summary.items() if k != "table"})
    say(
        f"\n{len(plan.chain_layers)} of {num_layers} layers converted, {pos.tokens:,} training tokens, "
        f"{pos.global_step} steps, {summary['wall_s']:.0f} s; output in {final}"
    )
    say(summary["table"])
    return summary
