"""Sharding: the same step on 1 device and on 8 simulated CPU devices (data x model meshes) gives the same loss and
gradients (float32, RMS relative error <= 1e-5 for the loss, the whole gradient, every gradient tensor and the
updated parameters); partition rules; mesh errors.

The one exception is the gradient of the DSLA mixing logits `alpha` (2 numbers per layer), checked at 1e-3: with
w = softmax(alpha) = (1/2, 1/2) it is w1 w2 (<dL/dy, y1> - <dL/dy, y2>), a difference of two nearly equal sums over
every token (both states start from the same q, k, v), so summation order alone moves it by ~1e-4 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsla_jax.training.sharding import MeshError, make_mesh, spec_for

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from flax import nnx
from dsla_jax.models.llama import Llama
from dsla_jax.training import params as P
from dsla_jax.training.chain import build_student
from dsla_jax.training.config import LossSection, ModelSection, OptimSection
from dsla_jax.training.optim import make_optimizer
from dsla_jax.training.sharding import batch_sharding, make_mesh, param_shardings, replicated
from dsla_jax.training.step import StepSpec, compile_step, micro_loss
from dsla_jax.training.tiny import tiny_config
from dsla_jax.training.transfer import TransferSpec, compile_transfer, split_mixer

assert len(jax.devices()) == 8, jax.devices()
teacher = Llama(tiny_config(layers=3), rngs=nnx.Rngs(0))
chain = (2, 0)
student = build_student(teacher, chain, ModelSection(dsla_impl="xla", dsla_chunk_size=16))
tg, teacher_flat = P.split_model(teacher)
sg, flat = P.split_model(student)
trainable, frozen = P.partition(flat, P.trainable_filter(chain, mlp=True))
trainable = {k: jnp.array(v, copy=True) for k, v in trainable.items()}
spec = StepSpec(sg, tg, LossSection(lambda_hidden=0.5, lambda_gate=0.1), chain, 4)
rs = np.random.RandomState(0)
batch = {"tokens": rs.randint(0, 128, (2, 8, 32)).astype(np.int32), "valid": np.ones((2, 8, 32), bool)}
batch["valid"][:, 1, 20:] = False
batch["loss_mask"] = batch["valid"].copy()
active = np.array([True, False, True])
opt = make_optimizer(OptimSection(), 4)

def run(data, model):
    mesh = make_mesh(data, model, jax.devices()[: data * model])
    sh = lambda f: param_shardings(f, mesh)
    tr = {k: jax.device_put(jnp.array(v, copy=True), s) for (k, v), s in zip(trainable.items(), sh(trainable).values())}
    fr = {k: jax.device_put(v, s) for (k, v), s in zip(frozen.items(), sh(frozen).values())}
    te = {k: jax.device_put(v, s) for (k, v), s in zip(teacher_flat.items(), sh(teacher_flat).values())}
    b = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
    act = jax.device_put(active, replicated(mesh))
    micro = lambda b: {k: v[0] for k, v in b.items()}
    grad_fn = jax.jit(
        jax.value_and_grad(lambda p, b, a: micro_loss(spec, p, fr, te, micro(b), a, jnp.float32(1.0))[0]),
        in_shardings=(sh(tr), batch_sharding(mesh), replicated(mesh)),
        out_shardings=(replicated(mesh), sh(tr)),
    )
    loss, grads = grad_fn(tr, b, act)
    step, init = compile_step(spec, opt, mesh, tr, fr, te)
    new, _, metrics = step(tr, init(tr), fr, te, b, act, act, jnp.int32(1))
    n_sharded = sum(not s.is_fully_replicated for s in sh(tr).values())
    to_np = lambda t: {k: np.asarray(v) for k, v in t.items()}
    # the attention-transfer step, placed the same way (its mixer parameters are donated: fresh copies)
    mx, rest = split_mixer({k: jax.device_put(jnp.array(v, copy=True), sh(trainable)[k]) for k, v in trainable.items()})
    t_step, t_init = compile_transfer(TransferSpec(sg, tg, (0, 2), 1.0), opt, mesh, mx, rest, fr, te)
    t_new, _, t_metrics = t_step(mx, t_init(mx), rest, fr, te, {k: b[k] for k in ("tokens", "valid")})
    transfer = (float(t_metrics["loss"]), to_np(t_new))
    return float(loss), to_np(grads), float(metrics["loss"]), to_np(new), n_sharded, transfer

def flat(tree):
    return np.concatenate([tree[k].ravel() for k in sorted(tree)])

def rel(a, b):
    return float(np.sqrt(np.sum((a - b) ** 2) / max(np.sum(b ** 2), 1e-30)))

ref = run(1, 1)
out = {}
for data, model in [(8, 1), (4, 2)]:
    got = run(data, model)
    out[f"{data}x{model}"] = {
        "loss": abs(got[0] - ref[0]) / abs(ref[0]),
        "grads": rel(flat(got[1]), flat(ref[1])),
        "grads_per_tensor": max(rel(got[1][k], ref[1][k]) for k in ref[1] if not k.endswith("alpha")),
        "grads_alpha": max(rel(got[1][k], ref[1][k]) for k in ref[1] if k.endswith("alpha")),
        "step_loss": abs(got[2] - ref[2]) / abs(ref[2]),
        "params": max(rel(got[3][k], ref[3][k]) for k in ref[3]),
        "sharded_params": got[4],
        "transfer_loss": abs(got[5][0] - ref[5][0]) / abs(ref[5][0]),
        "transfer_params": max(rel(got[5][1][k], ref[5][1][k]) for k in ref[5][1]),
    }
out["nonzero_grads"] = sum(bool(np.any(v)) for v in ref[1].values())
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_loss_and_grads_equal_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result.pop("nonzero_grads") > 10
    for mesh, r in result.items():
        for key in ("loss", "grads", "grads_per_tensor", "step_loss", "params", "transfer_loss", "transfer_params"):
            assert r[key] <= 1e-5, f"mesh {mesh}: {key} differs from one device by {r[key]:.2e}"
        assert r["grads_alpha"] <= 1e-3, f"mesh {mesh}: the mixing-logit gradient differs by {r['grads_alpha']:.2e}"
        if mesh != "8x1":
            assert r["sharded_params"] > 0, f"mesh {mesh}: no parameter is split over the model axis"


class _Dev:
    pass


def test_mesh_must_fit_the_devices():
    devices = [_Dev() for _ in range(8)]
    with pytest.raises(MeshError, match="mesh.model=3 does not divide the 8 available devices"):
        make_mesh(-1, 3, devices)
    with pytest.raises(MeshError, match="data=3 x model=2 = 6 does not match the 8 available devices"):
        make_mesh(3, 2, devices)


def test_partition_rules():
    class FakeMesh:
        shape = {"data": 2, "model": 4}

    m = FakeMesh()
    assert tuple(spec_for("layers.3.self_attn.q_proj.kernel", (64, 64), m)) == (None, "model")
    assert tuple(spec_for("layers.3.parked.o_proj.kernel", (64, 64), m)) == ("model", None)
    assert tuple(spec_for("layers.0.mlp.down_proj.kernel", (112, 64), m)) == ("model", None)
    assert tuple(spec_for("embed_tokens.embedding", (128, 64), m)) == ("model", None)
    assert tuple(spec_for("layers.0.self_attn.g1_proj.bias", (32,), m)) == ("model",)
    assert tuple(spec_for("layers.0.self_attn.alpha", (2,), m)) == (None,)
    # a dimension the axis does not divide stays whole
    assert tuple(spec_for("layers.0.self_attn.k_proj.kernel", (64, 6), m)) == (None, None)
