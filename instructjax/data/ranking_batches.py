"""Tokenised batches of K-way rankings for the reward model, and the pairwise ablation.

One ranking record (`instructjax.data.rankings`) becomes ONE batch element holding all its
responses, so the reward model scores the K responses of a prompt in one forward pass and
the loss sees all C(K, 2) comparisons of that prompt together:

  tokens  int32 [max_k, T]  row i = prompt ids + response i ids + [eos], right-padded
  mask    int32 [max_k, T]  1 = real token
  ranks   int32 [max_k]     the record's ranks (padding responses: 0)
  valid   bool  [max_k]     the first K rows are real responses, the rest padding

No BOS is added, as in the SFT rows (`instructjax.data.pipeline`). Truncation follows SFT:
the prompt keeps its LAST `max_prompt_len` tokens, then each response + EOS is cut to what
remains of `seq_len` (the EOS is lost when a response is cut, and the reward is then read
at its last kept token).

`pairwise_records` is InstructGPT's ablation: every ranking exploded into its C(K, 2)
(winner, loser) pairs, each a K = 2 record, shuffled across prompts. It keeps exactly the
multiset of (prompt, winner, loser) comparisons of the K-way mode (checked on the fly).
"""
from __future__ import annotations

import collections
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from instructjax.data.rankings import pairs, validate_ranking
from instructjax.errors import InputError

FIELDS = ("tokens", "mask", "ranks", "valid")


class TokenizerLike(Protocol):
  pad_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    ...


def _check_shapes(seq_len: int, max_prompt_len: int, max_k: int) -> None:
  if seq_len < 2:
    raise InputError("seq_len", f"must be at least 2 (a prompt token and a response token), "
                     f"got {seq_len}")
  if max_prompt_len < 0:
    raise InputError("max_prompt_len", f"must be >= 0, got {max_prompt_len}")
  if max_k < 2:
    raise InputError("max_k", f"a ranking has at least 2 responses, so max_k >= 2; got {max_k}")


def empty_ranking(*, seq_len: int, max_k: int, pad_id: int) -> dict[str, np.ndarray]:
  """A batch element with no valid response: it adds nothing to any loss or metric."""
  return {"tokens": np.full([max_k, seq_len], pad_id, np.int32),
          "mask": np.zeros([max_k, seq_len], np.int32),
          "ranks": np.zeros([max_k], np.int32),
          "valid": np.zeros([max_k], bool)}


def tokenize_ranking(record: Any, tokenizer: TokenizerLike, *, seq_len: int, max_prompt_len: int,
                     max_k: int, where: str = "record") -> dict[str, np.ndarray]:
  """One ranking record as fixed-shape arrays (see the module docstring).

  Args:
    record: {"prompt", "responses": [K], "ranks": [K]}; validated here.
    tokenizer: anything with `encode`, `pad_id` and `eos_id`.
    seq_len: T, the length of every row.
    max_prompt_len: the prompt keeps at most its last this many tokens.
    max_k: rows per element; rankings of more responses are refused.
    where: names the record in errors, e.g. "rankings.jsonl:12".

  Raises:
    InputError naming `where`: an invalid record, K > max_k, or a prompt that even
    truncated leaves no room in `seq_len` for one response token.
  """
  _check_shapes(seq_len, max_prompt_len, max_k)
  record = validate_ranking(record, where, max_k=max_k)
  prompt_ids = tokenizer.encode(record["prompt"])
  if len(prompt_ids) > max_prompt_len:
    prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_len:]
  room = seq_len - len(prompt_ids)
  if room < 1:
    raise InputError(where, f"the prompt keeps {len(prompt_ids)} tokens (max_prompt_len="
                     f"{max_prompt_len}), leaving no room for a response in seq_len={seq_len}; "
                     "use max_prompt_len < seq_len")
  out = empty_ranking(seq_len=seq_len, max_k=max_k, pad_id=tokenizer.pad_id)
  for i, response in enumerate(record["responses"]):
    row = prompt_ids + (tokenizer.encode(response) + [tokenizer.eos_id])[:room]
    out["tokens"][i, :len(row)] = row
    out["mask"][i, :len(row)] = 1
  k = len(record["responses"])
  out["ranks"][:k] = record["ranks"]
  out["valid"][:k] = True
  return out


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks tokenised rankings into a batch: tokens/mask [B, K, T], ranks/valid [B, K]."""
  if not examples:
    raise InputError("collate", "no examples to batch")
  first = examples[0]
  for i, example in enumerate(examples):
    for field in FIELDS:
      if field not in example:
        raise InputError(f"example {i}", f"missing field {field!r}")
      if example[field].shape != first[field].shape:
        raise InputError(f"example {i}", f"{field} has shape {example[field].shape}, example 0 "
                         f"has {first[field].shape}; tokenise all with the same seq_len, max_k")
  return {field: np.stack([example[field] for example in examples]) for field in FIELDS}


# ----------------------------------------------------------------------------- pairwise ablation


def explode_pairs(record: dict) -> list[dict]:
  """The K = 2 records of one ranking's (winner, loser) pairs, in `rankings.pairs` order.

  Extra keys of the record are kept; `pair` records the (winner, loser) indices into the
  original `responses`.
  """
  return [{**record, "responses": [record["responses"][w], record["responses"][l]],
           "ranks": [0, 1], "pair": [w, l]}
          for w, l in pairs(record["ranks"])]


def pair_multiset(records: Iterable[dict]) -> collections.Counter:
  """Counter of (prompt, winner text, loser text) over every pair of every ranking."""
  return collections.Counter(
      (record["prompt"], record["responses"][w], record["responses"][l])
      for record in records for w, l in pairs(record["ranks"]))


def check_same_pairs(kway: Iterable[dict], pairwise: Iterable[dict]) -> None:
  """Raises InputError unless both sets of records imply the same multiset of comparisons."""
  expected, got = pair_multiset(kway), pair_multiset(pairwise)
  if expected != got:
    missing, extra = expected - got, got - expected
    raise InputError("pairwise records", f"{sum(missing.values())} comparisons missing and "
                     f"{sum(extra.values())} extra compared with the K-way records, e.g. "
                     f"{next(iter(missing or extra))!r}")


def pairwise_records(records: Sequence[dict], seed: int) -> list[dict]:
  """InstructGPT's pairwise ablation: every comparison its own K = 2 record, shuffled.

  Each ranking's C(K, 2) pairs are split apart and shuffled across prompts (numpy
  `default_rng(seed)`), so correlated comparisons of one prompt land in different batch
  elements and, mostly, different batches. The result is checked to hold exactly the
  comparisons of `records`.
  """
  records = [validate_ranking(record, f"record {i}") for i, record in enumerate(records)]
  exploded = [pair for record in records for pair in explode_pairs(record)]
  order = np.random.default_rng(seed).permutation(len(exploded))
  shuffled = [exploded[i] for i in order]
  check_same_pairs(records, shuffled)
  return shuffled


def tokenized_pair_multiset(batch: dict[str, np.ndarray]) -> collections.Counter:
  """Counter of (winner row, loser row) token tuples over every pair of a collated batch.

  Rows hold the prompt too, so this is what the model actually compares (after truncation):
  equal for the K-way and the pairwise mode of the same records.
  """
  counter = collections.Counter()
  for tokens, mask, ranks, valid in zip(batch["tokens"], batch["mask"], batch["ranks"],
                                        batch["valid"]):
    real = np.flatnonzero(valid)
    rows = [tuple(int(t) for t in tokens[i][mask[i] > 0]) for i in real]
    counter.update((rows[w], rows[l]) for w, l in pairs(ranks[real].tolist()))
  return counter
