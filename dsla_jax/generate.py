"""Batched generation with a preallocated cache: one jitted prefill, one jitted `lax.while_loop` decode.

Prompts are left-padded to a length bucket (powers of two from 16) so that a new prompt length does not recompile;
each row's RoPE positions count from its first real token, and padded slots are masked out of attention (and, for
DSLA layers, contribute nothing to the state).

CLI:
    python -m dsla_jax.generate --model smollm2-135m --chat --prompt "What is the capital of France?" --greedy
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsla_jax.models.llama import Llama, positions_from_valid

MIN_BUCKET = 16


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (or use greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, stop token excluded
    prompt_tokens: int
    bucket: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    finished: list[bool] = field(default_factory=list)  # True where a stop token ended the row

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        rows = len(self.tokens)
        return rows * self.decode_steps / self.decode_s if self.decode_s else float("nan")


def bucket_length(n: int) -> int:
    """Smallest power of two >= n (at least MIN_BUCKET)."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return b


def sample_tokens(logits: jax.Array, rng: jax.Array, *, greedy: bool, temperature, top_p) -> jax.Array:
    """logits [B, V] float32 -> tokens [B] int32 (argmax, or nucleus sampling at `temperature`)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
    kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Generator:
    """Jitted prefill + decode over a `Llama` (any mix of attention and DSLA layers).

    The module's parameters are split once; call `refresh()` after swapping layers (e.g. `convert_to_dsla`).
    """

    def __init__(self, model: Llama, *, eos_ids: tuple[int, ...] = (), pad_id: int | None = None):
        self.model = model
        self.eos_ids = tuple(int(i) for i in eos_ids)
        # padding is masked out, so any id works: the tokenizer's pad token, else the first stop token, else 0
        self.pad_id = int(pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self.max_context = model.config.max_position_embeddings
        self.refresh()

    def refresh(self) -> None:
        self.graphdef, self.state = nnx.split(self.model)
        self._prefill = jax.jit(functools.partial(_prefill, self.graphdef), static_argnames=("max_len",))
        self._decode = jax.jit(
            functools.partial(_decode, self.graphdef),
            static_argnames=("max_new", "greedy"),
        )

    def pad_batch(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, int]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        bucket = bucket_length(longest)
        tokens = np.full((len(prompts), bucket), self.pad_id, np.int32)
        valid = np.zeros((len(prompts), bucket), bool)
        for i, p in enumerate(prompts):
            tokens[i, bucket - len(p) :] = p
            valid[i, bucket - len(p) :] = True
        return tokens, valid, bucket

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        """Generate up to `params.max_new_tokens` for each prompt (token ids). Rows stop at any of `eos_ids`."""
        longest = max((len(p) for p in prompts), default=0)
        if longest + params.max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt of {longest} tokens + {params.max_new_tokens} new tokens exceeds the model's context "
                f"of {self.max_context} tokens; shorten the prompt or lower --max-new-tokens"
            )
        tokens, valid, bucket = self.pad_batch(prompts)
        max_len = bucket + params.max_new_tokens
        t0 = time.perf_counter()
        logits, cache, next_pos = self._prefill(self.state, jnp.asarray(tokens), jnp.asarray(valid), max_len=max_len)
        logits.block_until_ready()
        t1 = time.perf_counter()
        out, steps = self._decode(
            self.state,
            logits,
            cache,
            next_pos,
            jax.random.key(params.seed),
            jnp.float32(params.temperature),
            jnp.float32(params.top_p),
            jnp.asarray(self.eos_ids or (-1,), jnp.int32),
            max_new=params.max_new_tokens,
            greedy=params.greedy,
        )
        out = np.asarray(out)
        steps = int(steps)
        t2 = time.perf_counter()
        rows, finished = [], []
        for row in out[:, :steps].tolist():
            stop = next((j for j, tok in enumerate(row) if tok in self.eos_ids), None)
            finished.append(stop is not None)
            rows.append(row if stop is None else row[:stop])
        return GenerationResult(rows, int(valid.sum()), bucket, t1 - t0, t2 - t1, steps, finished)


def _prefill(graphdef, state, tokens, valid, *, max_len: int):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], max_len)
    hidden, cache = model(tokens, positions=positions_from_valid(valid), valid=valid, cache=cache)
    return model.logits(hidden[:, -1]), cache, valid.sum(axis=1).astype(jnp.int32)


def _decode(graphdef, state, logits, cache, next_pos, rng, temperature, top_p, eos_ids, *, max_new: int, greedy: bool):
    """The decode loop: returns (tokens [B, max_new] padded with eos_ids[0] after a stop, steps taken)."""
    model = nnx.merge(graphdef, state)
    batch = logits.shape[0]
    rng, sub = jax.random.split(rng)
    tok = sample_tokens(logits, sub, greedy=greedy, temperature=temperature, top_p=top_p)
    out = jnp.zeros((batch, max_new), jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos_ids)

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, tok, cache, pos, out, done, rng = carry
        hidden, cache = model(tok[:, None], positions=pos[:, None], valid=jnp.ones((batch, 1), bool), cache=cache)
        rng, sub = jax.random.split(rng)
        new = sample_tokens(model.logits(hidden[:, 0]), sub, greedy=greedy, temperature=temperature, top_p=top_p)
        new = jnp.where(done, eos_ids[0], new)
        out = out.at[:, step].set(new)
        return step + 1, new, cache, pos + 1, out, done | jnp.isin(new, eos_ids), rng

    carry = (jnp.int32(1), tok, cache, next_pos, out, done, rng)
    step, _, _, _, out, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, step


# ---- CLI ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsla_jax.generate", description=__doc__.split("\n\n")[0])
    from dsla_jax.loading import add_model_args

    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--batch-file", type=Path, help="a text file with one prompt per line, generated as one batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature and top-p)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write prompts, completions and timings here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dsla_jax.loading import load_from_args

    if args.batch_file is not None:
        if not args.batch_file.is_file():
            raise SystemExit(f"error: --batch-file {args.batch_file} does not exist")
        texts = [line.rstrip("\n") for line in args.batch_file.read_text().splitlines() if line.strip()]
        if not texts:
            raise SystemExit(f"error: --batch-file {args.batch_file} holds no prompt")
    else:
        texts = [args.prompt]
    try:
        params = SamplingParams(args.max_new_tokens, args.greedy, args.temperature, args.top_p, args.seed)
        model, tok = load_from_args(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.chat:
        texts_in = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    else:
        texts_in = texts
    prompts = [tok.encode(t) for t in texts_in]
    gen = Generator(model, eos_ids=tok.eos_ids, pad_id=tok.pad_id)
    try:
        res = gen.generate(prompts, params)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    completions = [tok.decode(r) for r in res.tokens]
    for text, completion in zip(texts, completions):
        if len(texts) > 1:
            print(f"### {text}")
        print(completion)
    print(
        f"[{len(prompts)} prompt(s), {res.prompt_tokens} prompt tokens (bucket {res.bucket}), "
        f"{res.decode_steps} decode steps] prefill {res.prefill_s:.2f} s, decode {res.decode_s:.2f} s "
        f"= {res.decode_tokens_per_s:.1f} tokens/s (first call includes compilation)",
        file=sys.stderr,
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "prompts": texts,
                    "completions": completions,
                    "prefill_s": res.prefill_s,
                    "decode_s": res.decode_s,
                    "decode_steps": res.decode_steps,
                    "decode_tokens_per_s": res.decode_tokens_per_s,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
