"""Attention transfer (`dsla_jax.training.transfer`) on a tiny random model: it lowers every chain layer's relative
MSE to its attention, and it moves only the DSLA mixer parameters of the chain's layers."""

from __future__ import annotations

import numpy as np
import pytest

from dsla_jax.models.llama import Llama
from dsla_jax.training.chain import make_plan
from dsla_jax.training.config import config_from_dict
from dsla_jax.training.data import build_rows
from dsla_jax.training.metrics_log import MetricsLog
from dsla_jax.training.params import merge
from dsla_jax.training.setup import build_student_state
from dsla_jax.training.sharding import make_mesh
from dsla_jax.training.tiny import tiny_config
from dsla_jax.training.transfer import is_mixer_key, layer_mse, run_transfer

CHAIN = (2, 0)


@pytest.fixture(scope="module")
def transferred(tmp_path_factory):
    from flax import nnx

    teacher = Llama(tiny_config(layers=3), rngs=nnx.Rngs(0))
    rs = np.random.RandomState(0)
    rows = build_rows([rs.randint(3, 128, 2000).astype(np.int32)], seq_len=32)
    cfg = config_from_dict(
        {},
        [
            "model.dsla_impl=xla",
            "model.dsla_chunk_size=16",
            "chain.ordering=explicit",
            "chain.layers=[2, 0]",
            "chain.stages=[2]",
            "chain.calibration_rows=4",
            "chain.train_mlp=true",  # in the trainable set, but the transfer must not move it
            "transfer.steps=25",
            "transfer.lr=0.01",
            "transfer.warmup_steps=2",
            "transfer.batch_size=4",
            "transfer.grad_accum=2",
            "log.progress=false",
        ],
    )
    mesh = make_mesh()
    plan = make_plan(cfg.chain, 3, CHAIN)
    st = build_student_state(cfg, teacher, plan, rows, mesh)
    before = {k: np.asarray(v) for k, v in st.trainable.items()}

    def mse(trainable):
        model = merge(st.graph, trainable, st.frozen)
        return layer_mse(teacher, {i: model.layers[i].self_attn for i in CHAIN}, rows, num_rows=8, batch_size=4)

    mse_before = mse(st.trainable)
    log = MetricsLog(tmp_path_factory.mktemp("transfer") / "metrics.jsonl")
    res = run_transfer(
        cfg, CHAIN, st.graph, st.teacher_graph, st.trainable, st.frozen, st.teacher_flat, rows, mesh, log
    )
    return {"before": before, "res": res, "mse_before": mse_before, "mse_after": mse(res.trainable), "log": log}


def test_transfer_lowers_every_layers_mse(transferred):
    before, after = transferred["mse_before"], transferred["mse_after"]
    for i in CHAIN:
        assert after[i] < 0.8 * before[i], (i, before[i], after[i])
    res = transferred["res"]
    assert res.tokens == 25 * 4 * 32 and res.steps == 25 and res.skipped == 0
    assert set(res.first_mse) == set(CHAIN) and set(res.last_mse) == set(CHAIN)
    lines = transferred["log"].path.read_text().splitlines()
    assert len(lines) == 25 and '"layer_mse"' in lines[0]


def test_transfer_moves_only_the_chain_layers_mixer_parameters(transferred):
    before, after = transferred["before"], transferred["res"].trainable
    assert before.keys() == after.keys()
    assert any(k.split(".")[2] == "mlp" for k in before)
    for k in before:
        if is_mixer_key(k):
            assert not np.array_equal(before[k], np.asarray(after[k])), f"{k} did not move"
        else:
            np.testing.assert_array_equal(before[k], np.asarray(after[k]), err_msg=k)
    assert {int(k.split(".")[1]) for k in before if is_mixer_key(k)} == set(CHAIN)
