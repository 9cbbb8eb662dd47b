"""Text in, text out: tokenise prompts, sample in fixed-shape batches, decode the responses.

Used by every stage that needs completions of text prompts (SFT evaluation, comparison
collection, the sampling entry, evaluation). Shapes are fixed — prompts are left-padded (or cut,
keeping their end) to `prompt_len` and the last batch is filled with dummy rows — so the sampler
compiles once.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from instructjax import parallel
from instructjax.data.pipeline import left_padded_prompt
from instructjax.data.tokenizers import Tokenizer
from instructjax.sampling import Sampler


@dataclasses.dataclass(frozen=True)
class Completion:
  prompt: str
  text: str                 # the decoded response, EOS and padding dropped
  tokens: tuple[int, ...]   # response token ids up to and including EOS
  ended: bool               # emitted EOS within max_new_tokens
  log_prob: float           # sum of the sampled tokens' log-probabilities


def left_pad(prompts_ids: Sequence[Sequence[int]], prompt_len: int, pad_id: int):
  """[B, prompt_len] tokens and mask: PPO's prompt rows (`pipeline.left_padded_prompt`) stacked."""
  rows = [left_padded_prompt(ids, prompt_len, pad_id) for ids in prompts_ids]
  if not rows:
    return np.zeros((0, prompt_len), np.int32), np.zeros((0, prompt_len), np.int32)
  return np.stack([r["tokens"] for r in rows]), np.stack([r["mask"] for r in rows])


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], prompt_len: int):
  """Left-padded prompt tokens; an empty prompt becomes a lone EOS (the sampler needs one token)."""
  ids = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
  return left_pad(ids, prompt_len, tokenizer.pad_id)


def complete(sampler: Sampler, params, tokenizer: Tokenizer, prompts: Sequence[str], rng, *,
             prompt_len: int, batch_size: int, mesh=None) -> list[Completion]:
  """Samples one response per prompt. Batch b uses fold_in(rng, b), so results are reproducible."""
  results: list[Completion] = []
  for b, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = list(prompts[start:start + batch_size])
    filled = chunk + [""] * (batch_size - len(chunk))
    tokens, mask = encode_prompts(tokenizer, filled, prompt_len)
    if mesh is not None:
      tokens, mask = _this_process_rows(tokens, mask, mesh)
    out = parallel.to_host(sampler(params, tokens, mask, jax.random.fold_in(rng, b)))
    for row, prompt in enumerate(chunk):
      length = int(out.mask[row].sum())
      ids = tuple(int(t) for t in out.tokens[row, :length])
      results.append(Completion(prompt=prompt, text=tokenizer.decode(ids), tokens=ids,
                                ended=bool(length and ids[-1] == tokenizer.eos_id),
                                log_prob=float(out.log_probs[row].sum())))
  return results


def _this_process_rows(tokens, mask, mesh):
  """Every process holds the whole prompt batch; each contributes its own rows to the global one."""
  n, i = jax.process_count(), jax.process_index()
  per = tokens.shape[0] // n
  local = {"tokens": tokens[i * per:(i + 1) * per], "mask": mask[i * per:(i + 1) * per]}
  batch = parallel.global_batch(local, mesh)
  return batch["tokens"], batch["mask"]
