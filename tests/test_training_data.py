"""Training text: sources, packing with document boundaries, held-out split, resumable batches, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsla_jax.training.data import (
    BatchIterator,
    DataError,
    build_rows,
    iter_documents,
    split_heldout,
    tokenize_documents,
)
from dsla_jax.training.tiny import char_tokenizer, tiny_corpus

EOS = 2


def _docs(*lengths: int) -> list[np.ndarray]:
    """Documents of the given lengths (EOS last), token values = 10 * doc + position so rows are readable."""
    return [np.asarray([*(10 * (i + 1) + np.arange(n - 1)), EOS], np.int32) for i, n in enumerate(lengths)]


def test_pack_masks_the_loss_across_document_boundaries():
    rows = build_rows(_docs(5, 4, 6), seq_len=5, packing="pack")
    assert rows.tokens.shape == (3, 5)  # 15 tokens -> 3 rows, nothing dropped
    np.testing.assert_array_equal(rows.tokens.ravel(), np.concatenate(_docs(5, 4, 6)))
    assert rows.valid.all()
    # row 0 is doc 0 exactly: t predicts t+1 for t < 4; the last position never predicts (no next token in the row)
    np.testing.assert_array_equal(rows.loss_mask[0], [True, True, True, True, False])
    # row 1 = doc 1 (4 tokens) + doc 2's first token: EOS at position 3 must not predict the next document
    np.testing.assert_array_equal(rows.loss_mask[1], [True, True, True, False, False])


def test_pack_drops_the_short_tail():
    rows = build_rows(_docs(7, 4), seq_len=5, packing="pack")
    assert len(rows) == 2 and rows.num_tokens() == 10


def test_split_never_spans_two_documents():
    rows = build_rows(_docs(7, 3), seq_len=5, packing="split")
    assert rows.tokens.shape == (3, 5)
    np.testing.assert_array_equal(rows.valid.sum(1), [5, 2, 3])  # doc 0 -> 5 + 2 (padded), doc 1 -> 3 (padded)
    assert not rows.loss_mask[~rows.valid].any()
    np.testing.assert_array_equal(rows.loss_mask[1], [True, False, False, False, False])


def test_heldout_is_the_tail_and_disjoint():
    rows = build_rows(_docs(50), seq_len=5)
    train, heldout = split_heldout(rows, 0.2)
    assert len(train) == 8 and len(heldout) == 2
    np.testing.assert_array_equal(np.concatenate([train.tokens, heldout.tokens]), rows.tokens)
    assert len(split_heldout(rows, 0.0)[1]) == 0


def test_iterator_is_deterministic_and_resumable():
    a = BatchIterator(10, 3, seed=1)
    first = [a.next_indices() for _ in range(7)]  # crosses two epochs (3 batches of 3 per epoch)
    seen = np.concatenate(first[:3])
    assert len(set(seen.tolist())) == 9  # no row twice within an epoch
    b = BatchIterator(10, 3, seed=1)
    for _ in range(4):
        b.next_indices()
    c = BatchIterator(10, 3, seed=1)
    c.load_state_dict(b.state_dict())
    for i in range(4, 7):
        np.testing.assert_array_equal(c.next_indices(), first[i])
    assert not np.array_equal(np.concatenate(first[3:6]), seen)  # another permutation next epoch


def test_too_little_data_for_one_batch():
    with pytest.raises(DataError, match="gives 3 rows, fewer than one batch of 4"):
        BatchIterator(3, 4)


def test_sources_file_folder_jsonl(tmp_path):
    folder = tiny_corpus(tmp_path / "c", docs=3, words=20)
    (folder / "skip.bin").write_bytes(b"\0")
    assert len(list(iter_documents(str(folder)))) == 3
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(4)) + "\n")
    assert list(iter_documents(str(jsonl), text_field="body")) == [f"doc {i}" for i in range(4)]
    with pytest.raises(DataError, match=r"d\.jsonl:1: no text field 'text'"):
        list(iter_documents(str(jsonl)))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .* files in this folder"):
        list(iter_documents(str(tmp_path / "empty")))


def test_tokenize_appends_eos_and_caps_tokens(tmp_path):
    tok = char_tokenizer()
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("world!")
    docs = tokenize_documents(tok, [str(tmp_path)])
    assert [d.tolist() for d in docs] == [[*tok.encode("hello"), 2], [*tok.encode("world!"), 2]]
    capped = tokenize_documents(tok, [str(tmp_path)], max_tokens=8)
    assert sum(d.size for d in capped) == 8
