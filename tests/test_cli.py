"""Command-line entry points: bad input stops with a message that names the problem."""

from __future__ import annotations

import json

import pytest

from dsla_jax import export as export_cli
from dsla_jax import generate as generate_cli
from eval import perplexity as perplexity_cli


def _fails(main, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    assert match in str(exc.value.code), str(exc.value.code)


def test_missing_model_path(tmp_path):
    _fails(generate_cli.main, ["--model", str(tmp_path / "nope"), "--prompt", "hi"], "does not exist")
    _fails(export_cli.main, ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "does not exist")


def test_missing_text_and_batch_file(tmp_path):
    _fails(perplexity_cli.main, ["--text", str(tmp_path / "missing.txt")], "missing.txt does not exist")
    _fails(perplexity_cli.main, ["--text", "builtin:no_such_play"], "no built-in text 'no_such_play'")
    _fails(generate_cli.main, ["--batch-file", str(tmp_path / "p.txt")], "p.txt does not exist")
    (tmp_path / "empty.txt").write_text("\n\n")
    _fails(generate_cli.main, ["--batch-file", str(tmp_path / "empty.txt")], "holds no prompt")


@pytest.mark.slow
def test_prompt_past_the_context_and_a_real_run(smollm2_path, tmp_path, corpus_valid):
    _fails(generate_cli.main, ["--prompt", "hi", "--max-new-tokens", "9000"], "exceeds the model's context of 8192")
    out = tmp_path / "p.json"
    argv = [
        "--text",
        str(corpus_valid / "hamlet_gut.txt"),
        "--max-tokens",
        "600",
        "--window",
        "256",
        "--json",
        str(out),
    ]
    assert perplexity_cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["windows"] == 3 and result["tokens"] == 255 + 255 + 87 and 1 < result["ppl"] < 1000
