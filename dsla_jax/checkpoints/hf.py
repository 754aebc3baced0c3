"""Hugging Face checkpoint directories: the Llama state-dict layout, reading and writing `config.json` + safetensors.

A state dict is `dict[str, np.ndarray]` (float32) with Hugging Face `LlamaForCausalLM` names and layouts, where
D = hidden_size, V = vocab_size, F = intermediate_size, H / KV = query / key-value heads, hd = head_dim:

    model.embed_tokens.weight                      [V, D]
    model.layers.{i}.self_attn.q_proj.weight       [H * hd, D]
    model.layers.{i}.self_attn.{k,v}_proj.weight   [KV * hd, D]
    model.layers.{i}.self_attn.o_proj.weight       [D, H * hd]
    model.layers.{i}.mlp.{gate,up}_proj.weight     [F, D]
    model.layers.{i}.mlp.down_proj.weight          [D, F]
    model.layers.{i}.{input,post_attention}_layernorm.weight   [D]
    model.norm.weight                              [D]
    lm_head.weight                                 [V, D]   (only when tie_word_embeddings is False)

Keys under `model.layers.{i}.self_attn.dsla.` (DSLA parameters) pass through loading and saving untouched.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import numpy as st_numpy

from dsla_jax.checkpoints.errors import CheckpointError
from dsla_jax.config import ConfigError, LlamaConfig

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_DSLA_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.dsla\.")
# Buffers some older checkpoints store; they are recomputed, never loaded.
_IGNORED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def llama_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a Llama state dict for `config`, mapped to its shape (see the module docstring)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _is_dsla_key(name: str, config: LlamaConfig) -> bool:
    m = _DSLA_KEY.match(name)
    return m is not None and int(m.group(1)) < config.num_hidden_layers


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_state_dict(config: LlamaConfig, state_dict: Mapping[str, np.ndarray], source: object) -> None:
    """Raise CheckpointError (naming `source`) for missing, unexpected or wrongly shaped tensors."""
    shapes = llama_shapes(config)
    missing = [k for k in shapes if k not in state_dict]
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {_listing(missing)}")
    unknown = [k for k in state_dict if k not in shapes and not _is_dsla_key(k, config)]
    if unknown:
        raise CheckpointError(f"{source}: unexpected tensors (not part of a Llama model): {_listing(unknown)}")
    for name, shape in shapes.items():
        found = tuple(np.shape(state_dict[name]))
        if found != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {found}, expected {shape} from the config")


def normalize_state_dict(
    config: LlamaConfig, state_dict: Mapping[str, np.ndarray], *, copy: bool = True
) -> dict[str, np.ndarray]:
    """Float tensors as float32 (copies unless `copy=False`); drops rotary buffers, and `lm_head.weight` when tied."""
    out: dict[str, np.ndarray] = {}
    for name, value in state_dict.items():
        if _IGNORED_KEY.fullmatch(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        arr = np.asarray(value)
        is_float = np.issubdtype(arr.dtype, np.floating) or arr.dtype == _ST_DTYPES["BF16"]
        out[name] = arr.astype(np.float32, copy=copy) if is_float else np.array(arr, copy=copy)
    return out


# ---------------------------------------------------------------------------------------------------- reading


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as read-only memory-mapped numpy arrays (BF16 as `ml_dtypes.bfloat16`).

    Checks the header against the file size, so a truncated or corrupt file raises CheckpointError.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({size} bytes, no header)")
        n = int.from_bytes(prefix, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file: header of {n} bytes, file {size}")
        try:
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            entries = {
                k: (v["dtype"], tuple(int(s) for s in v["shape"]), tuple(v["data_offsets"])) for k, v in header.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file: bad header ({e})") from e
    start = 8 + n
    end = max((off[1] for _, _, off in entries.values()), default=0)
    if start + end > size:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file: its header needs {start + end} bytes, the file has {size}"
        )
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    out: dict[str, np.ndarray] = {}
    for name, (dtype_name, shape, (a, b)) in entries.items():
        dtype = _ST_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
        if b - a != math.prod(shape) * dtype.itemsize or a < 0:
            raise CheckpointError(f"{path}: corrupt safetensors file: tensor {name} offsets {a}..{b} for {shape}")
        out[name] = data[start + a : start + b].view(dtype).reshape(shape)
    return out


def read_hf_config(path: Path) -> LlamaConfig:
    """LlamaConfig from a `config.json` file; CheckpointError for unreadable or non-Llama configs."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read config: {e}") from e
    try:
        return LlamaConfig.from_hf_dict(d)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: incomplete Llama config ({type(e).__name__}: {e})") from e


def _weight_files(directory: Path) -> list[Path]:
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: cannot read the shard index: {e}") from e
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index}: shard files listed but missing: {_listing(absent)}")
        return files
    single = directory / SAFETENSORS_FILE
    if single.exists():
        return [single]
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = f" (found {', '.join(others)}: only safetensors are read)" if others else ""
    raise CheckpointError(f"{directory}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}{hint}")


def load_hf_dir(directory: str | os.PathLike) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Read a Hugging Face Llama checkpoint directory (config.json + single or sharded safetensors).

    Returns the config and a float32 state dict (see the module docstring), validated against the config.
    """
    directory = Path(directory)
    config = read_hf_config(directory / "config.json")
    raw: dict[str, np.ndarray] = {}
    for file in _weight_files(directory):
        for name, arr in read_safetensors(file).items():
            if name in raw:
                raise CheckpointError(f"{file}: tensor {name} also appears in another shard")
            raw[name] = arr
    state_dict = normalize_state_dict(config, raw)
    del raw
    check_state_dict(config, state_dict, directory)
    return config, state_dict


# ---------------------------------------------------------------------------------------------------- writing


def _shards(state_dict: Mapping[str, np.ndarray], max_bytes: int | None) -> list[list[str]]:
    if max_bytes is None:
        return [list(state_dict)]
    shards: list[list[str]] = [[]]
    used = 0
    for name, arr in state_dict.items():
        if shards[-1] and used + arr.nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += arr.nbytes
    return shards


def _write_safetensors(tensors: dict[str, np.ndarray], file: Path) -> None:
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    st_numpy.save_file(tensors, str(file), metadata={"format": "pt"})


def _write_weights(directory: Path, state_dict: dict[str, np.ndarray], max_shard_bytes: int | None) -> None:
    shards = _shards(state_dict, max_shard_bytes)
    if len(shards) == 1:
        _write_safetensors({k: state_dict[k] for k in shards[0]}, directory / SAFETENSORS_FILE)
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors({k: state_dict[k] for k in names}, directory / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(a.nbytes for a in state_dict.values())}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


def _check_file_names(files: Mapping[str, bytes | str]) -> None:
    for name in files:
        if not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"tokenizer file name {name!r} must be a plain file name")
        if name == "config.json" or name.endswith(".safetensors") or name == SAFETENSORS_INDEX:
            raise CheckpointError(f"tokenizer file name {name!r} would overwrite the checkpoint itself")


def _move_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        tmp.rename(path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    old.rmdir()
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_hf(
    path: str | os.PathLike,
    config: LlamaConfig,
    state_dict: Mapping[str, np.ndarray],
    *,
    tokenizer_dir_files: Mapping[str, bytes | str] | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a directory that `transformers.LlamaForCausalLM.from_pretrained(path)` loads.

    Writes `config.json`, `model.safetensors` (float32; or `model-0000i-of-0000n.safetensors` shards of at most
    `max_shard_bytes` each plus `model.safetensors.index.json`), and each `tokenizer_dir_files` entry (file name ->
    content). Everything goes to a temporary directory beside `path`, renamed into place at the end: a failure leaves
    nothing behind. `lm_head.weight` is dropped when the config ties embeddings. Refuses to replace a non-empty
    directory unless `overwrite=True`. Returns `path`.
    """
    path = Path(path)
    state_dict = normalize_state_dict(config, state_dict, copy=False)
    check_state_dict(config, state_dict, f"state dict to save at {path}")
    files = dict(tokenizer_dir_files or {})
    _check_file_names(files)
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise CheckpointError(f"{path}: max_shard_bytes must be positive, got {max_shard_bytes}")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{path}: directory is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); the result should be an ordinary directory
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        _write_weights(tmp, state_dict, max_shard_bytes)
        for name, content in files.items():
            target = tmp / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
