"""Tokenised batches of K-way rankings for the reward model, the pairwise ablation, and the grain
datasets that serve them.

One ranking record (`instructjax.data.rankings`) becomes ONE batch element holding all its
responses, so the reward model scores the K responses of a prompt in one forward pass and
the loss sees all C(K, 2) comparisons of that prompt together:

  tokens  int32 [max_k, T]  row i = prompt ids + response i ids (+ eos if it ended), right-padded
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
import json
from typing import Any, Callable, Iterable, Protocol, Sequence

import grain
import numpy as np

from instructjax.data import pipeline
from instructjax.data.formatting import Format, encode_pair
from instructjax.data.rankings import pairs, validate_ranking
from instructjax.errors import InputError

FIELDS = ("tokens", "mask", "ranks", "valid")
# Record fields holding one value per response, besides `responses` and `ranks`.
PER_RESPONSE_FIELDS = ("ended", "gold_scores")


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


def scored_rows(tokenizer: TokenizerLike, fmt: Format, prompt: str, responses: Sequence[str], *,
                seq_len: int, max_prompt_len: int, ended: Sequence[bool] | None = None,
                where: str = "record") -> list[list[int]]:
  """The ids the reward model reads for each response — the one scoring rule of every stage:
  `prompt + separator + response` encoded as one text (`formatting.encode_pair`), the prompt
  keeping its last `max_prompt_len` tokens, then the response and an EOS only where it ended
  (`ended[i]`; all when None: written responses are complete), cut to what remains of
  `seq_len`. PPO reads the same sequence from its rollouts: the sampled tokens, EOS included
  exactly when sampled."""
  ended = [True] * len(responses) if ended is None else ended
  prompt_ids = tokenizer.encode(prompt)
  kept = prompt_ids[max(len(prompt_ids) - max_prompt_len, 0):]
  room = seq_len - len(kept)
  if room < 1:
    raise InputError(where, f"the prompt keeps {len(kept)} tokens (max_prompt_len="
                     f"{max_prompt_len}), leaving no room for a response in seq_len={seq_len}; "
                     "use max_prompt_len < seq_len")
  rows = []
  for response, done in zip(responses, ended, strict=True):
    ids = encode_pair(tokenizer, fmt, prompt, response, prompt_ids=prompt_ids).response_ids
    rows.append(kept + (ids + [tokenizer.eos_id] * bool(done))[:room])
  return rows


def tokenize_ranking(record: Any, tokenizer: TokenizerLike, *, seq_len: int, max_prompt_len: int,
                     max_k: int, where: str = "record", fmt: Format = Format()
                     ) -> dict[str, np.ndarray]:
  """One ranking record as fixed-shape arrays (see the module docstring).

  Args:
    record: {"prompt", "responses": [K], "ranks": [K]}; validated here.
    tokenizer: anything with `encode`, `pad_id` and `eos_id`.
    seq_len: T, the length of every row.
    max_prompt_len: the prompt keeps at most its last this many tokens.
    max_k: rows per element; rankings of more responses are refused.
    where: names the record in errors, e.g. "rankings.jsonl:12".
    fmt: how the prompt and each response join (`scored_rows`).

  Raises:
    InputError naming `where`: an invalid record, K > max_k, or a prompt that even
    truncated leaves no room in `seq_len` for one response token.
  """
  _check_shapes(seq_len, max_prompt_len, max_k)
  record = validate_ranking(record, where, max_k=max_k)
  rows = scored_rows(tokenizer, fmt, record["prompt"], record["responses"], seq_len=seq_len,
                     max_prompt_len=max_prompt_len, ended=record.get("ended"), where=where)
  out = empty_ranking(seq_len=seq_len, max_k=max_k, pad_id=tokenizer.pad_id)
  for i, row in enumerate(rows):
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

  Extra keys of the record are kept (per-response ones, `ended` and `gold_scores`, for the
  pair's two); `pair` records the (winner, loser) indices into the original `responses`.
  """
  def of_pair(w: int, l: int) -> dict:
    out = {**record, "responses": [record["responses"][w], record["responses"][l]],
           "ranks": [0, 1], "pair": [w, l]}
    for field in PER_RESPONSE_FIELDS:
      if record.get(field) is not None:
        out[field] = [record[field][w], record[field][l]]
    return out
  return [of_pair(w, l) for w, l in pairs(record["ranks"])]


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


# ----------------------------------------------------------------------------- datasets
#
# The reward model's grain datasets (layout above): one ranking
# per element, tokens/mask [B, K, T], ranks/valid [B, K]. "kway" keeps a prompt's K
# responses (all its pairs) in one element; "pairwise" (InstructGPT's ablation) makes every
# comparison its own K = 2 element, shuffled across prompts, with the same multiset of pairs.

RANKING_MODES = ("kway", "pairwise")
GOLD_FIELDS = ("gold_ranks", "gold_valid")


def _json_field(record: dict, field: str, where: str):
  """A list field that a TFDS build stores as JSON text (or a plain list)."""
  value = record.get(field)
  if isinstance(value, (bytes, str)):
    try:
      return json.loads(value.decode("utf-8") if isinstance(value, bytes) else value)
    except (UnicodeDecodeError, ValueError) as e:
      raise InputError(where, f"field {field!r} is not valid JSON ({e})") from None
  return value


def ranking_record(element: dict) -> dict:
  """A ranking record from a source element: a built one (JSON text fields, `extra`) or a
  plain dict. Not validated here; `tokenize_ranking` validates."""
  where = pipeline.record_where(element) if "source" in element else "record"
  record = dict(_json_field(element, "extra", where) or {}) if "extra" in element else {}
  record.update({k: v for k, v in element.items() if k not in ("extra", "source")})
  if isinstance(record.get("prompt"), bytes):
    record["prompt"] = pipeline.text_field(element, "prompt")
  for field in ("responses", "ranks"):
    record[field] = _json_field(element, field, where)
  record["source"] = where
  return record


def gold_ranks(record: dict, max_k: int) -> dict[str, np.ndarray]:
  """Dense ranks of the record's `gold_scores` (higher score = rank 0), padded to max_k.

  `gold_valid` is all False when the record carries no gold scores (real labeler data).
  """
  out = {"gold_ranks": np.zeros([max_k], np.int32), "gold_valid": np.zeros([max_k], bool)}
  scores = record.get("gold_scores")
  if scores is None:
    return out
  k = len(record["responses"])
  if not isinstance(scores, list) or len(scores) != k or not all(
      isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
    raise InputError(record.get("source", "record"), f"'gold_scores' must be {k} numbers, one "
                     f"per response, got {scores!r}")
  distinct = np.unique(-np.asarray(scores, np.float64))
  out["gold_ranks"][:k] = np.searchsorted(distinct, -np.asarray(scores, np.float64))
  out["gold_valid"][:k] = True
  return out


def _check_ranking_mode(mode: str) -> None:
  if mode not in RANKING_MODES:
    raise InputError("mode", f"must be one of {RANKING_MODES}, got {mode!r}")


def _ranking_to_example(tokenizer: TokenizerLike, *, seq_len: int, max_prompt_len: int,
                        max_k: int, fmt: Format, with_gold: bool = False
                        ) -> Callable[[dict], dict]:

  def to_example(element: dict) -> dict[str, np.ndarray]:
    record = ranking_record(element)
    example = tokenize_ranking(record, tokenizer, seq_len=seq_len,
                               max_prompt_len=max_prompt_len, max_k=max_k,
                               where=record["source"], fmt=fmt)
    if with_gold:
      example.update(gold_ranks(record, max_k))
    return example
  return to_example


def pairwise_source(source: Sequence[dict], *, max_k: int, seed: int) -> list[dict]:
  """Every comparison of every ranking as its own K = 2 record, shuffled across prompts.

  Reads the whole source (comparison data is small next to its tokens). A ranking of more
  than `max_k` responses is refused here too, so both modes accept the same files.
  """
  records = []
  for i in range(len(source)):
    record = ranking_record(pipeline.WithSource(source)[i])
    records.append(validate_ranking(record, record["source"], max_k=max_k))
  return pairwise_records(records, seed)


def ranking_dataset(source: Sequence[dict], tokenizer: TokenizerLike, *, seq_len: int,
                    max_prompt_len: int, max_k: int, batch_size: int, seed: int,
                    mode: str = "kway", shuffle: bool = True, repeat: bool = True,
                    process_index: int = 0, process_count: int = 1,
                    read_options: grain.ReadOptions | None = None,
                    fmt: Format = Format()) -> grain.IterDataset:
  """Training batches of rankings for this process: tokens/mask [B, K, T], ranks/valid [B, K].

  Args:
    source: random-access ranking records, e.g. `builders.rankings.build(...)["train"]`
      (JSON text fields) or a list of {"prompt", "responses", "ranks"} dicts.
    max_k: K of every element in "kway" mode; a ranking of more responses is an InputError
      naming its source. "pairwise" elements have K = 2.
    mode: "kway" (one element per ranking) or "pairwise" (one per comparison; the pairs
      are exploded and shuffled with `seed` once, then reshuffled every epoch like any
      source).
    fmt: how a prompt and each response join (`scored_rows`).
  Multi-host slicing, epochs and checkpointable iterators are those of `sft_dataset`.
  """
  pipeline.check_batch_shapes(seq_len=seq_len, batch_size=batch_size,
                              process_index=process_index, process_count=process_count)
  _check_ranking_mode(mode)
  if mode == "pairwise":
    source, max_k = pairwise_source(source, max_k=max_k, seed=seed), 2
  records = pipeline.process_records(source, seed=seed, shuffle=shuffle, repeat=repeat,
                                     process_index=process_index, process_count=process_count)
  to_example = _ranking_to_example(tokenizer, seq_len=seq_len, max_prompt_len=max_prompt_len,
                                   max_k=max_k, fmt=fmt)
  return (records.map(to_example).to_iter_dataset(read_options)
          .batch(batch_size, drop_remainder=True))


def ranking_eval_dataset(source: Sequence[dict], tokenizer: TokenizerLike, *, seq_len: int,
                         max_prompt_len: int, max_k: int, batch_size: int,
                         process_index: int = 0, process_count: int = 1,
                         fmt: Format = Format()) -> grain.IterDataset:
  """One ordered K-way pass over `source`, padded with empty rankings (no pair, no metric).

  Every process yields the same number of batches and every record is used exactly once
  (records `[process_index::process_count]`). Besides the training fields, batches carry
  `gold_ranks` [B, K] and `gold_valid` [B, K] from the records' `gold_scores` (all False
  when absent), for the accuracy against the gold ordering.
  """
  pipeline.check_batch_shapes(seq_len=seq_len, batch_size=batch_size,
                              process_index=process_index, process_count=process_count)
  records = grain.MapDataset.source(pipeline.WithSource(source))[process_index::process_count]
  padded_len = pipeline.num_eval_batches(len(source), process_count, batch_size) * batch_size
  to_example = _ranking_to_example(tokenizer, seq_len=seq_len, max_prompt_len=max_prompt_len,
                                   max_k=max_k, fmt=fmt, with_gold=True)
  padding = {**empty_ranking(seq_len=seq_len, max_k=max_k, pad_id=tokenizer.pad_id),
             "gold_ranks": np.zeros([max_k], np.int32), "gold_valid": np.zeros([max_k], bool)}

  def example_at(i: int) -> dict[str, np.ndarray]:
    return to_example(records[i]) if i < len(records) else padding

  return grain.MapDataset.range(padded_len).map(example_at).batch(batch_size).to_iter_dataset()
