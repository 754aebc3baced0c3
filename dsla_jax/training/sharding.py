"""Device mesh ("data", "model") from the config, partition rules on parameter paths, and placement helpers.

The same code runs on 1 CPU, on 8 simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`), on
one or several GPUs and on a TPU slice; `maybe_initialize_distributed` calls `jax.distributed.initialize()` when the
process was launched as one of several hosts. Parameters follow `PARTITION_RULES` (first regex that matches a dotted
path wins): projections into a wider space are split over their output features on "model", projections back over
their input features, embeddings over the vocabulary. A dimension the axis size does not divide stays whole.
Batches are split over "data".
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"

# (regex on the dotted parameter path, spec); kernels are [in, out], the embedding [V, D].
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens\.embedding$", P(MODEL, None)),
    (r"(q_proj|k_proj|v_proj|g1_proj|g2_proj|gate_proj|up_proj)\.kernel$", P(None, MODEL)),
    (r"(g1_proj|g2_proj)\.bias$", P(MODEL)),
    (r"(o_proj|down_proj)\.kernel$", P(MODEL, None)),
    (r"lm_head\.kernel$", P(None, MODEL)),
    (r".*", P()),
)


class MeshError(ValueError):
    """A mesh shape that does not fit the devices or the batch."""


def launched_multi_host() -> bool:
    """True when a multi-process launcher (JAX coordinator, SLURM, MPI, a TPU pod) set its variables."""
    env = os.environ
    sizes = (env.get("SLURM_NTASKS", "1"), env.get("OMPI_COMM_WORLD_SIZE", "1"))
    return (
        "JAX_COORDINATOR_ADDRESS" in env
        or any(s.isdigit() and int(s) > 1 for s in sizes)
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise ValueError(f"{name}={value!r} must be a non-negative integer")
    return int(value)


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Call `jax.distributed.initialize()` for "on", or for "auto" when launched as one of several processes.

    Cluster launchers (SLURM, MPI, TPU pods, ...) are detected by JAX itself. By hand, start one process per host with
    JAX_COORDINATOR_ADDRESS=host:port (process 0's), JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i. CPU processes exchange
    collectives through gloo (what a multi-process CPU run and its test use)."""
    if not (mode == "on" or (mode == "auto" and launched_multi_host())):
        return False
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # an older / newer JAX without this option: its default then
        pass
    jax.distributed.initialize(num_processes=_env_int("JAX_NUM_PROCESSES"), process_id=_env_int("JAX_PROCESS_ID"))
    return True


def make_mesh(data: int = -1, model: int = 1, devices: list | None = None) -> Mesh:
    """A 2-D mesh over all `devices` (default: jax.devices()); data=-1 takes what model leaves."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n % model:
        raise MeshError(f"mesh.model={model} does not divide the {n} available devices")
    if data == -1:
        data = n // model
    if data * model != n:
        raise MeshError(
            f"mesh data={data} x model={model} = {data * model} does not match the {n} available devices; "
            f"set mesh.data=-1 or make data x model = {n}"
        )
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def spec_for(key: str, shape: tuple[int, ...], mesh: Mesh, rules=PARTITION_RULES) -> P:
    """The PartitionSpec of a parameter: the first matching rule, with axes that do not divide dropped."""
    spec = next((s for pattern, s in rules if re.search(pattern, key)), P())
    axes = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for dim, axis in zip(shape, axes[: len(shape)]):
        out.append(axis if axis is not None and dim % mesh.shape[axis] == 0 else None)
    return P(*out)


def param_shardings(flat: dict, mesh: Mesh) -> dict[str, NamedSharding]:
    """{path: NamedSharding} for a flat parameter dictionary (arrays or ShapeDtypeStructs)."""
    return {k: NamedSharding(mesh, spec_for(k, tuple(v.shape), mesh)) for k, v in flat.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Micro-batched arrays [A, b, T]: rows over "data"."""
    return NamedSharding(mesh, P(None, DATA, None))


def check_batch(micro_batch: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA]
    if micro_batch % n:
        raise MeshError(
            f"the micro-batch of {micro_batch} rows (train.batch_size / train.grad_accum) does not split over "
            f"mesh.data={n} devices; make it a multiple of {n}"
        )


def put(flat: dict, shardings: dict[str, NamedSharding]) -> dict:
    """Place a flat dictionary of (host or device) arrays with the given shardings."""
    return {k: jax.device_put(v, shardings[k]) for k, v in flat.items()}


def local_micro_batches(rows, idx: np.ndarray, accum: int, keys=None) -> dict[str, np.ndarray]:
    """This process's share of the global batch `idx` (row indices of a `TokenRows`; split evenly over the
    processes, each taking its part in index order) as [A, b, T] micro-batches (micro-batch a holds its rows
    a*b .. ), for the entries `keys` (default: all)."""
    n_proc, proc = jax.process_count(), jax.process_index()
    part = rows.take(np.sort(idx.reshape(n_proc, -1)[proc]) if n_proc > 1 else idx)
    return {
        k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in part.items() if keys is None or k in keys
    }


def put_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays (one host: the whole batch)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
