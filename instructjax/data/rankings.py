"""K-way ranking records: the reward model's training data format.

InstructGPT's reward model learns from labelers ranking K = 4..9 responses to one
prompt. One record holds one such ranking:

  {"prompt": str, "responses": [str] * K, "ranks": [int] * K}

`ranks[i]` is the rank of `responses[i]`; rank 0 is best, larger is worse, and equal
ranks are a tie that yields no training pair. Ranks need not be dense ([0, 2, 2, 5] is
fine). K varies from record to record. Extra keys (e.g. provenance) are kept as they are.

Sampled responses (comparison collection) also carry `"ended": [bool] * K`: whether each
sample emitted EOS. The reward model reads a response exactly as the policy emitted it — with
an EOS only where one was sampled (`ranking_batches.scored_rows`) — so a response cut at
max_new_tokens is scored here as PPO scores it. Without `ended`, every response is complete.

`pairs` is the single definition of which (winner, loser) comparisons a ranking
implies; every later stage (batching, the pairwise loss, evaluation) uses it.

Files are JSON Lines, optionally gzip-compressed (detected from the content, not the
name). Whitespace-only lines are not records and are passed over.
"""
import collections
import dataclasses
import gzip
import json
import os
import pathlib
from typing import Any, Iterable, Literal

# One JSONL reader for the whole project: (where="path:line", value) per non-blank
# line, gzip detected from the content, every read problem an InputError.
from instructjax.data.records import iter_jsonl
from instructjax.errors import InputError

OnBad = Literal["error", "skip"]
_ON_BAD_CHOICES = ("error", "skip")


@dataclasses.dataclass
class Stats:
  """What a reader or converter consumed, produced and left out, with reasons.

  Attributes:
    read: source records (non-blank lines) read.
    written: ranking records produced.
    skipped: reason -> number of source records (or, for tree sources, candidate
      rankings) that produced no ranking record.
    dropped: reason -> number of parts (e.g. unranked replies) removed from a source
      record; the rest of that record may still have produced a ranking.
  """
  read: int = 0
  written: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def as_dict(self) -> dict[str, Any]:
    return {"read": self.read, "written": self.written,
            "skipped": dict(sorted(self.skipped.items())),
            "dropped": dict(sorted(self.dropped.items()))}

  def __str__(self) -> str:
    parts = [f"read {self.read}", f"written {self.written}"]
    parts += [f"skipped {n} ({why})" for why, n in sorted(self.skipped.items())]
    parts += [f"dropped {n} ({why})" for why, n in sorted(self.dropped.items())]
    return ", ".join(parts)


class RankingProblem(InputError):
  """An invalid ranking record; `reason` is a short key used to count skips."""

  def __init__(self, where: str, problem: str, reason: str):
    super().__init__(where, problem)
    self.reason = reason


def check_on_bad(on_bad: str) -> None:
  if on_bad not in _ON_BAD_CHOICES:
    raise InputError("on_bad", f"must be one of {_ON_BAD_CHOICES}, got {on_bad!r}")


def _is_int(value: Any) -> bool:
  # bool is an int subclass, but `true` as a rank is a data error, not rank 1.
  return isinstance(value, int) and not isinstance(value, bool)


def validate_ranking(record: Any, where: str, *, max_k: int | None = None) -> dict:
  """Checks one ranking record and returns it as a new dict (lists, not tuples).

  Args:
    record: the parsed JSON value.
    where: names the record in errors, e.g. "data.jsonl:12" or "record 7".
    max_k: if given, rankings of more than `max_k` responses are refused.

  Returns:
    A shallow copy of `record` with `responses` and `ranks` as lists.

  Raises:
    RankingProblem (an InputError) naming `where` and what is wrong.
  """
  def fail(reason: str, problem: str):
    raise RankingProblem(where, problem, reason)

  if not isinstance(record, dict):
    fail("not_an_object", f"a ranking must be a JSON object, got {type(record).__name__}")
  for key in ("prompt", "responses", "ranks"):
    if key not in record:
      fail("missing_field", f"missing field {key!r} (have {sorted(record)})")
  prompt, responses, ranks = record["prompt"], record["responses"], record["ranks"]
  if not isinstance(prompt, str):
    fail("wrong_type", f"'prompt' must be a string, got {type(prompt).__name__}")
  if not isinstance(responses, (list, tuple)):
    fail("wrong_type", f"'responses' must be a list, got {type(responses).__name__}")
  if not isinstance(ranks, (list, tuple)):
    fail("wrong_type", f"'ranks' must be a list, got {type(ranks).__name__}")
  for i, response in enumerate(responses):
    if not isinstance(response, str):
      fail("wrong_type", f"responses[{i}] must be a string, got {type(response).__name__}")
  k = len(responses)
  if k < 2:
    fail("too_few_responses", f"a ranking needs at least 2 responses, got {k}")
  if len(ranks) != k:
    fail("length_mismatch", f"{k} responses but {len(ranks)} ranks")
  for i, rank in enumerate(ranks):
    if not _is_int(rank) or rank < 0:
      fail("bad_rank", f"ranks[{i}] must be a non-negative integer, got {rank!r}")
  ended = record.get("ended")
  if ended is not None and (not isinstance(ended, (list, tuple)) or len(ended) != k
                            or not all(isinstance(e, bool) for e in ended)):
    fail("bad_ended", f"'ended' must be {k} booleans, one per response, got {ended!r}")
  for i, response in enumerate(responses):
    # Sampled responses (with `ended`) are kept whatever the policy emitted, an empty answer
    # too: the reward model must see it ranked, or PPO finds it unscored. In written data an
    # empty response is an error.
    if ended is None and not response.strip():
      fail("empty_response", f"responses[{i}] is empty or whitespace only")
  if len(set(ranks)) == 1:
    fail("all_tied", f"all {k} responses have rank {ranks[0]}: no preference pair")
  if max_k is not None and k > max_k:
    fail("too_many_responses", f"K = {k} responses exceeds max_k = {max_k}")
  out = {**record, "responses": list(responses), "ranks": list(ranks)}
  if ended is not None:
    out["ended"] = list(ended)
  return out


def pairs(ranks: Iterable[int]) -> list[tuple[int, int]]:
  """All (winner, loser) index pairs with rank[winner] < rank[loser].

  Ties give no pair. Order is by winner index, then loser index, so it is
  deterministic. A full ranking of K responses gives K * (K - 1) / 2 pairs.
  """
  ranks = list(ranks)
  return [(w, l) for w in range(len(ranks)) for l in range(len(ranks))
          if ranks[w] < ranks[l]]


def read_rankings(path: str | os.PathLike, *, max_k: int | None = None,
                  on_bad: OnBad = "error") -> tuple[list[dict], Stats]:
  """Reads and validates a rankings file (JSONL or JSONL.gz).

  Args:
    path: the file.
    max_k: refuse rankings of more than `max_k` responses.
    on_bad: "error" raises InputError at the first bad record (naming file:line);
      "skip" leaves bad records out and counts them by reason in `stats.skipped`.
      Lines that are not JSON at all always raise: the file is not a rankings file.

  Returns:
    (records, stats).
  """
  check_on_bad(on_bad)
  records, stats = [], Stats()
  for where, value in iter_jsonl(path):
    stats.read += 1
    try:
      records.append(validate_ranking(value, where, max_k=max_k))
    except RankingProblem as e:
      if on_bad == "error":
        raise
      stats.skipped[e.reason] += 1
  stats.written = len(records)
  return records, stats


def write_rankings(path: str | os.PathLike, records: Iterable[dict]) -> int:
  """Validates and writes records as JSONL (gzip-compressed if `path` ends in .gz).

  The file is written to a temporary name and moved into place at the end, so an
  invalid record (InputError naming "record i", 0-based) leaves no partial file.

  Returns:
    The number of records written.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  opener = gzip.open if path.name.endswith(".gz") else open
  count = 0
  try:
    with opener(tmp, "wt", encoding="utf-8") as f:
      for i, record in enumerate(records):
        record = validate_ranking(record, f"record {i}")
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return count
