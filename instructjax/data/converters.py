"""Converters from public human-comparison datasets to K-way ranking records.

Each converter takes the source file (JSONL or JSONL.gz) and returns an iterator of
ranking records (see `rankings.py`), counting in a `Stats` what it read, wrote and
left out, and why:

  stats = rankings.Stats()
  for record in converters.open_assistant("en_100_tree.jsonl.gz", stats): ...
  print(stats)  # read 100, written 212, skipped 42 (too_few_responses), dropped ...

or, file to file: `convert("hh_rlhf", in_path, out_path) -> Stats`, also from the shell:
`python -m instructjax.data.converters hh_rlhf IN OUT [--on_bad skip] [--max_records N]`.

`extract(source, path, stats)` reads a file once and yields every record kind it gives,
as (kind, record): "rankings" (the converters above), "demonstrations" ({"prompt",
"completion"}: HH-RLHF's chosen final reply, OpenAssistant's rank-0 reply, the preferred
TL;DR summary, GSM8K's train answers, the best response of a generic comparison) and
"prompts" (generic {"prompt"} records). `experiments.prepare_data` builds the stages'
SFT / RM / PPO / evaluation files from it.

Two kinds of problem are told apart:
  * known properties of the data (an HH pair whose transcripts are identical, an
    OpenAssistant reply nobody ranked, a GSM8K question all models got right) are
    always left out and counted, in `stats.skipped` (whole rankings) or
    `stats.dropped` (replies removed from a ranking);
  * a record that is not in the source's format (missing keys, wrong types, roles that
    do not alternate) raises InputError naming file:line, or with `on_bad="skip"` is
    left out and counted under its reason. The `generic` converter treats every
    invalid record this way, since its input is meant to be in our schema already.

Dialogue prompts use Anthropic's HH-RLHF layout, "\\n\\nHuman: ...\\n\\nAssistant: ...",
and end with "\\n\\nAssistant:" (no trailing space); responses from the public sources
are stripped of surrounding whitespace, so whatever joins prompt and response supplies
the separating space.
"""
import argparse
import os
import sys
from typing import Any, Callable, Iterator, Sequence

from instructjax.data import rankings
from instructjax.data.rankings import RankingProblem, Stats
from instructjax.data.records import iter_jsonl, validate_demonstration, validate_prompt
from instructjax.errors import InputError

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"

# The solution slots of OpenAI's GSM8K example_model_solutions, in the order they
# become responses.
GSM8K_SOLUTION_KEYS = ("6b_finetuning", "6b_verification", "175b_finetuning",
                       "175b_verification")

# Validation failures that are properties of the public data, not format errors.
_DATA_PROPERTIES = frozenset({"too_few_responses", "empty_response", "all_tied"})

PathLike = str | os.PathLike
Converter = Callable[..., Iterator[dict]]
# One source record (its parsed JSON value and "path:line") -> the records of one kind it gives.
ConvertOne = Callable[[Any, str, Stats], Iterator[dict]]


def format_dialogue(turns: list[tuple[str, str]]) -> str:
  """Formats (role, text) turns, role "human" or "assistant", as an HH-RLHF prompt.

  The result ends with "\\n\\nAssistant:", ready for the next assistant reply.
  """
  tags = {"human": HUMAN, "assistant": ASSISTANT}
  return "".join(f"{tags[role]} {text.strip()}" for role, text in turns) + ASSISTANT


def _skip_as_data_property(candidate: dict, where: str, stats: Stats) -> dict | None:
  """Validates a built record; known data properties are counted, not raised."""
  try:
    return rankings.validate_ranking(candidate, where)
  except RankingProblem as e:
    if e.reason not in _DATA_PROPERTIES:
      raise
    stats.skipped[e.reason] += 1
    return None


def _require(value: Any, key: str, kind: type, where: str) -> Any:
  """value[key], which must exist and be a `kind`; otherwise a format error."""
  if not isinstance(value, dict):
    raise InputError(where, f"expected a JSON object, got {type(value).__name__}")
  if key not in value:
    raise InputError(where, f"missing field {key!r} (have {sorted(value)})")
  field = value[key]
  # bool is an int subclass, but `true` where a number belongs is a format error.
  if not isinstance(field, kind) or (isinstance(field, bool) and kind is not bool):
    raise InputError(where, f"field {key!r} must be {kind.__name__}, got {type(field).__name__}")
  return field


def _drive_kinds(path: PathLike, on_bad: rankings.OnBad,
                 parts: Sequence[tuple[str, ConvertOne, Stats]],
                 max_records: int | None = None) -> Iterator[tuple[str, dict]]:
  """Runs each part's converter over every line (the first `max_records` source records,
  if given), yielding (kind, record); each part counts into its own Stats, and format
  errors follow the `on_bad` policy in each part."""
  rankings.check_on_bad(on_bad)
  if max_records is not None and max_records < 1:
    raise InputError("max_records", f"must be at least 1, got {max_records}")

  def generate():
    for n, (where, value) in enumerate(iter_jsonl(path)):
      if max_records is not None and n >= max_records:
        break
      for kind, convert_one, stats in parts:
        stats.read += 1
        try:
          # A whole source record converts, or none of it does.
          records = list(convert_one(value, where, stats))
        except InputError as e:
          if on_bad == "error":
            raise
          stats.skipped[e.reason if isinstance(e, RankingProblem) else "malformed"] += 1
          continue
        for record in records:
          stats.written += 1
          yield kind, record

  return generate()


def _drive(path: PathLike, stats: Stats | None, on_bad: rankings.OnBad,
           convert_one: ConvertOne, max_records: int | None = None) -> Iterator[dict]:
  """Runs `convert_one` over every line, applying the `on_bad` policy to format errors."""
  stats = Stats() if stats is None else stats
  kinds = _drive_kinds(path, on_bad, [("rankings", convert_one, stats)], max_records)
  return (record for _, record in kinds)


def _demonstration(prompt: str, completion: str, stats: Stats) -> Iterator[dict]:
  """A {"prompt", "completion"} record, the completion stripped; an empty one is counted."""
  completion = completion.strip()
  if not completion:
    stats.skipped["empty_completion"] += 1
    return
  yield {"prompt": prompt, "completion": completion}


# ------------------------------------------------------------------ Anthropic HH-RLHF


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str] | str:
  """Splits two HH transcripts into (prompt, chosen reply, rejected reply).

  The prompt is the shared prefix up to and including the last "\\n\\nAssistant:" the
  two share, so the cut is at a turn boundary even when both replies start with the
  same words. Returns a skip reason instead when the pair is not a comparison of two
  final assistant replies.
  """
  if chosen == rejected:
    return "identical"
  shared = os.path.commonprefix([chosen, rejected])
  cut = shared.rfind(ASSISTANT)
  if cut < 0:
    return "no_shared_assistant_turn"
  prompt = chosen[:cut + len(ASSISTANT)]
  tails = chosen[len(prompt):], rejected[len(prompt):]
  if any(HUMAN in tail or ASSISTANT in tail for tail in tails):
    return "differ_before_final_turn"
  return prompt, tails[0].strip(), tails[1].strip()


def _hh_one(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  chosen = _require(value, "chosen", str, where)
  rejected = _require(value, "rejected", str, where)
  split = split_hh_pair(chosen, rejected)
  if isinstance(split, str):
    stats.skipped[split] += 1
    return
  prompt, chosen_reply, rejected_reply = split
  record = _skip_as_data_property(
      {"prompt": prompt, "responses": [chosen_reply, rejected_reply], "ranks": [0, 1]},
      where, stats)
  if record is not None:
    yield record


def split_hh_transcript(transcript: str) -> tuple[str, str] | str:
  """Splits one HH transcript into (prompt, final assistant reply): the prompt is the
  conversation up to and including its last "\\n\\nAssistant:", the reply what follows,
  stripped. Returns a skip reason instead when there is no final assistant reply."""
  cut = transcript.rfind(ASSISTANT)
  if cut < 0:
    return "no_assistant_turn"
  prompt = transcript[:cut + len(ASSISTANT)]
  if HUMAN in transcript[len(prompt):]:
    return "ends_with_human_turn"
  return prompt, transcript[len(prompt):].strip()


def _hh_demonstration_one(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  """The chosen transcript's final assistant reply, given the conversation before it."""
  chosen = _require(value, "chosen", str, where)
  _require(value, "rejected", str, where)  # The same records as the rankings read.
  split = split_hh_transcript(chosen)
  if isinstance(split, str):
    stats.skipped[split] += 1
    return
  yield from _demonstration(*split, stats)


def hh_rlhf(path: PathLike, stats: Stats | None = None, *,
            on_bad: rankings.OnBad = "error", max_records: int | None = None) -> Iterator[dict]:
  """Anthropic HH-RLHF `{chosen, rejected}` transcripts -> K = 2 rankings.

  Skipped and counted: identical transcripts ("identical"), pairs that differ before
  their final assistant turn ("differ_before_final_turn"), pairs sharing no assistant
  turn ("no_shared_assistant_turn"), an empty reply ("empty_response").
  """
  return _drive(path, stats, on_bad, _hh_one, max_records)


# ------------------------------------------------------------------ OpenAssistant

OA_ROLES = {"prompter": "human", "assistant": "assistant"}


def oa_message(message: Any, where: str) -> tuple[str, str, list]:
  """(text, role, replies) of one OpenAssistant message; a malformed one is an InputError
  naming `where`."""
  text = _require(message, "text", str, where)
  role = _require(message, "role", str, where)
  if role not in OA_ROLES:
    raise InputError(where, f"role must be 'prompter' or 'assistant', got {role!r}")
  replies = message.get("replies") or []
  if not isinstance(replies, list):
    raise InputError(where, f"'replies' must be a list, got {type(replies).__name__}")
  return text, role, replies


def _oa_walk(message: Any, history: list[tuple[str, str]], where: str, stats: Stats,
             emit: Callable[[str, list[dict], str, Stats], Iterator[dict]] | None = None
             ) -> Iterator[dict]:
  """Yields `emit`'s records for this message's live replies if it is a prompter (by
  default its ranking), then recurses."""
  emit = _oa_ranking if emit is None else emit
  message_id = message.get("message_id", "?") if isinstance(message, dict) else "?"
  here = f"{where} message {message_id}"
  text, role, replies = oa_message(message, here)
  history = history + [(OA_ROLES[role], text)]
  live = []
  for reply in replies:
    _, reply_role, _ = oa_message(reply, here)
    if OA_ROLES[reply_role] == OA_ROLES[role]:
      raise InputError(here, f"a {role} message has a {reply_role} reply: roles must alternate")
    if reply.get("deleted"):
      # A moderator removed it; its subtree continues a conversation that is gone.
      stats.dropped["deleted_replies"] += 1
    else:
      live.append(reply)
  if role == "prompter" and live:
    yield from emit(format_dialogue(history), live, here, stats)
  for reply in live:
    yield from _oa_walk(reply, history, where, stats, emit)


def _oa_ranking(prompt: str, live: list[dict], here: str, stats: Stats) -> Iterator[dict]:
  ranked = [reply for reply in live if reply.get("rank") is not None]
  stats.dropped["unranked_replies"] += len(live) - len(ranked)
  record = _skip_as_data_property(
      {"prompt": prompt, "responses": [reply["text"].strip() for reply in ranked],
       "ranks": [reply["rank"] for reply in ranked]}, here, stats)
  if record is not None:
    yield record


def _oa_demonstration(prompt: str, live: list[dict], here: str, stats: Stats) -> Iterator[dict]:
  """The rank-0 reply, also where it is the only ranked one (no ranking, but a demonstration)."""
  ranked = [reply for reply in live if reply.get("rank") is not None]
  stats.dropped["unranked_replies"] += len(live) - len(ranked)
  for i, reply in enumerate(ranked):
    rank = reply["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
      raise RankingProblem(here, f"ranks[{i}] must be a non-negative integer, got {rank!r}",
                           "bad_rank")
  best = [reply for reply in ranked if reply["rank"] == 0]
  if len(best) != 1:
    stats.skipped["no_rank_0_reply" if not best else "tied_best"] += 1
    return
  yield from _demonstration(prompt, best[0]["text"], stats)


def _oa_one(value: Any, where: str, stats: Stats, emit=None) -> Iterator[dict]:
  root = _require(value, "prompt", dict, where)
  if root.get("role") != "prompter":
    raise InputError(where, f"a tree must start with a prompter message, got {root.get('role')!r}")
  tree_id = value.get("message_tree_id")
  yield from _oa_walk(root, [], f"{where} tree {tree_id}" if tree_id else where, stats, emit)


def _oa_demonstration_one(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  return _oa_one(value, where, stats, _oa_demonstration)


def open_assistant(path: PathLike, stats: Stats | None = None, *,
                   on_bad: rankings.OnBad = "error",
                   max_records: int | None = None) -> Iterator[dict]:
  """OpenAssistant message trees -> one ranking per prompter message with ranked replies.

  The whole tree is walked, so later turns give rankings too; the prompt is the
  conversation down to that prompter message. Replies with a null rank are dropped
  ("unranked_replies"), as are deleted replies and their subtrees ("deleted_replies");
  a prompter message left with fewer than 2 ranked replies is skipped
  ("too_few_responses").
  """
  return _drive(path, stats, on_bad, _oa_one, max_records)


# ------------------------------------------------------------------ summarize-from-feedback


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
  """The Reddit TL;DR prompt of Stiennon et al. (2020)."""
  return f"SUBREDDIT: r/{subreddit}\nTITLE: {title.strip()}\nPOST: {post.strip()}\nTL;DR:"


def _tldr_parse(value: Any, where: str) -> tuple[str, list[str], int]:
  """(prompt, stripped summaries, index of the preferred one) of one comparison."""
  info = _require(value, "info", dict, where)
  if info.get("post") is None:
    raise InputError(where, "info has no 'post': only Reddit TL;DR comparisons are "
                     "supported (not CNN/DM articles)")
  prompt = tldr_prompt(_require(info, "subreddit", str, where),
                       _require(info, "title", str, where),
                       _require(info, "post", str, where))
  summaries = _require(value, "summaries", list, where)
  texts = [_require(summary, "text", str, where).strip() for summary in summaries]
  choice = _require(value, "choice", int, where)
  if not 0 <= choice < len(texts):
    raise InputError(where, f"choice {choice} is not an index into {len(texts)} summaries")
  return prompt, texts, choice


def _tldr_one(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  prompt, texts, choice = _tldr_parse(value, where)
  if len(set(texts)) < len(texts):
    stats.skipped["identical"] += 1
    return
  ranks = [0 if i == choice else 1 for i in range(len(texts))]
  record = _skip_as_data_property({"prompt": prompt, "responses": texts, "ranks": ranks},
                                  where, stats)
  if record is not None:
    yield record


def _tldr_demonstration_one(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  """The preferred summary (`choice`), also of a comparison between identical summaries."""
  prompt, texts, choice = _tldr_parse(value, where)
  yield from _demonstration(prompt, texts[choice], stats)


def summarize_from_feedback(path: PathLike, stats: Stats | None = None, *,
                            on_bad: rankings.OnBad = "error",
                            max_records: int | None = None) -> Iterator[dict]:
  """OpenAI summarize-from-feedback comparisons -> rankings (chosen summary rank 0).

  Skipped and counted: comparisons of identical summaries ("identical").
  """
  return _drive(path, stats, on_bad, _tldr_one, max_records)


# ------------------------------------------------------------------ GSM8K model solutions


def _gsm8k_one(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  question = _require(value, "question", str, where)
  responses, correct = [], []
  for key in GSM8K_SOLUTION_KEYS:
    if value.get(key) is None:
      continue
    here = f"{where} {key}"
    responses.append(_require(value[key], "solution", str, here).strip())
    correct.append(_require(value[key], "is_correct", bool, here))
  if len(responses) >= 2 and len(set(correct)) == 1:
    stats.skipped["all_correct" if correct[0] else "all_incorrect"] += 1
    return
  record = _skip_as_data_property(
      {"prompt": question, "responses": responses,
       "ranks": [0 if ok else 1 for ok in correct]}, where, stats)
  if record is not None:
    yield record


def _gsm8k_answer_one(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  """A GSM8K train (or test) {question, answer}: the answer, its final "#### N" line kept."""
  question = _require(value, "question", str, where)
  yield from _demonstration(question, _require(value, "answer", str, where), stats)


def gsm8k_solutions(path: PathLike, stats: Stats | None = None, *,
                    on_bad: rankings.OnBad = "error",
                    max_records: int | None = None) -> Iterator[dict]:
  """GSM8K model solutions with correctness flags -> rankings (correct rank 0).

  Responses are the present, non-null solutions in GSM8K_SOLUTION_KEYS order; correct
  ones tie at rank 0 and incorrect ones at rank 1, so every pair is correct > incorrect.
  Questions whose solutions are all correct or all incorrect give no pair and are
  skipped ("all_correct", "all_incorrect"); fewer than 2 solutions,
  "too_few_responses".
  """
  return _drive(path, stats, on_bad, _gsm8k_one, max_records)


# ------------------------------------------------------------------ generic


def _generic_one(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  del stats  # Every problem in the user's own data follows the on_bad policy.
  if isinstance(value, dict) and "responses" in value:
    yield rankings.validate_ranking(value, where)
    return
  if isinstance(value, dict) and "chosen" in value:
    prompt = _require(value, "prompt", str, where)
    chosen = _require(value, "chosen", str, where)
    rejected = _require(value, "rejected", str, where)
    if chosen == rejected:
      raise RankingProblem(where, "chosen and rejected are identical", "identical")
    extra = {k: v for k, v in value.items() if k not in ("prompt", "chosen", "rejected")}
    yield rankings.validate_ranking(
        {"prompt": prompt, "responses": [chosen, rejected], "ranks": [0, 1], **extra}, where)
    return
  rankings.validate_ranking(value, where)  # Raises, naming what is missing.


def generic_kind(value: Any, where: str) -> str:
  """Which of our record kinds a generic record is: "ranking" ({prompt, responses, ranks}),
  "pair" ({prompt, chosen, rejected}), "demonstration" ({prompt, completion}) or "prompt"
  (only {prompt}); anything else is a format error ("unknown_record")."""
  if isinstance(value, dict):
    for key, kind in (("responses", "ranking"), ("chosen", "pair"),
                      ("completion", "demonstration")):
      if key in value:
        return kind
    if "prompt" in value:
      return "prompt"
  keys = sorted(value) if isinstance(value, dict) else type(value).__name__
  raise RankingProblem(where, "expected a ranking {prompt, responses, ranks}, a pair {prompt, "
                       "chosen, rejected}, a demonstration {prompt, completion} or a prompt "
                       f"{{prompt}}; got {keys}", "unknown_record")


def _generic_ranking_part(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  if generic_kind(value, where) in ("ranking", "pair"):
    yield from _generic_one(value, where, stats)


def _generic_demonstration_part(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  """A demonstration as it is; a comparison's unique best response (a pair's chosen one)."""
  kind = generic_kind(value, where)
  if kind == "demonstration":
    record = validate_demonstration(value, where)
    yield {"prompt": record["prompt"], "completion": record["completion"]}
  elif kind in ("ranking", "pair"):
    ranking, = _generic_one(value, where, stats)
    best = min(ranking["ranks"])
    winners = [i for i, rank in enumerate(ranking["ranks"]) if rank == best]
    if len(winners) > 1:
      stats.skipped["tied_best"] += 1
      return
    yield from _demonstration(ranking["prompt"], ranking["responses"][winners[0]], stats)


def _generic_prompt_part(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  del stats
  if generic_kind(value, where) == "prompt":
    yield {"prompt": validate_prompt(value, where)["prompt"]}


def generic(path: PathLike, stats: Stats | None = None, *,
            on_bad: rankings.OnBad = "error", max_records: int | None = None) -> Iterator[dict]:
  """Records already in our schema, or pairwise `{prompt, chosen, rejected}` (K = 2).

  Validation is strict: any invalid record raises (or, with on_bad="skip", is counted
  under its reason).
  """
  return _drive(path, stats, on_bad, _generic_one, max_records)


CONVERTERS: dict[str, Converter] = {
    "hh_rlhf": hh_rlhf,
    "open_assistant": open_assistant,
    "summarize_from_feedback": summarize_from_feedback,
    "gsm8k_solutions": gsm8k_solutions,
    "generic": generic,
}


def convert(name: str, in_path: PathLike, out_path: PathLike, *,
            on_bad: rankings.OnBad = "error", max_records: int | None = None) -> Stats:
  """Converts `in_path` with CONVERTERS[name] and writes the rankings to `out_path`.

  `out_path` is gzip-compressed if it ends in .gz, and is only created if the whole
  conversion succeeds.
  """
  if name not in CONVERTERS:
    raise InputError("converter", f"unknown converter {name!r}; known: {sorted(CONVERTERS)}")
  stats = Stats()
  rankings.write_rankings(out_path, CONVERTERS[name](in_path, stats, on_bad=on_bad,
                                                     max_records=max_records))
  return stats


# ------------------------------------------------------------------ every record kind at once

# What each source gives, by record kind, from one reading of its file. GSM8K's two files
# give one kind each: model solutions rankings, train answers demonstrations.
SOURCES: dict[str, dict[str, ConvertOne]] = {
    "hh_rlhf": {"rankings": _hh_one, "demonstrations": _hh_demonstration_one},
    "open_assistant": {"rankings": _oa_one, "demonstrations": _oa_demonstration_one},
    "summarize_from_feedback": {"rankings": _tldr_one,
                                "demonstrations": _tldr_demonstration_one},
    "gsm8k_solutions": {"rankings": _gsm8k_one},
    "gsm8k_answers": {"demonstrations": _gsm8k_answer_one},
    "generic": {"rankings": _generic_ranking_part,
                "demonstrations": _generic_demonstration_part,
                "prompts": _generic_prompt_part},
}


def extract(source: str, path: PathLike, stats: dict[str, Stats] | None = None, *,
            on_bad: rankings.OnBad = "error",
            max_records: int | None = None) -> Iterator[tuple[str, dict]]:
  """Reads `path` once and yields (kind, record) for every kind SOURCES[source] gives.

  `stats` (filled in if given) gets one Stats per kind: for "rankings" exactly what the
  ranking converter counts; for "demonstrations" the source records read, demonstrations
  written, and the reasons some gave none (e.g. "empty_completion", "no_rank_0_reply").
  """
  if source not in SOURCES:
    raise InputError("source", f"unknown source {source!r}; known: {sorted(SOURCES)}")
  stats = {} if stats is None else stats
  parts = []
  for kind, convert_one in SOURCES[source].items():
    stats.setdefault(kind, Stats())
    parts.append((kind, convert_one, stats[kind]))
  return _drive_kinds(path, on_bad, parts, max_records)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m instructjax.data.converters NAME IN OUT`: one file's rankings, nothing else."""
  parser = argparse.ArgumentParser(
      prog="python -m instructjax.data.converters",
      description="Converts one public comparison file to a rankings file (JSONL, gzipped if OUT "
      "ends in .gz) and prints what was read, written and skipped. For demonstrations, prompts "
      "and the disjoint SFT / RM / PPO / evaluation splits the stages read, use "
      "`python -m experiments.prepare_data`.")
  parser.add_argument("name", choices=sorted(CONVERTERS))
  parser.add_argument("in_path", metavar="IN")
  parser.add_argument("out_path", metavar="OUT")
  parser.add_argument("--on_bad", choices=("error", "skip"), default="error",
                      help="a record not in the source's format: stop, naming file:line "
                      "(default), or leave it out and count it")
  parser.add_argument("--max_records", type=int, default=None,
                      help="read only the first N source records")
  args = parser.parse_args(argv)
  try:
    stats = convert(args.name, args.in_path, args.out_path, on_bad=args.on_bad,
                    max_records=args.max_records)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.out_path}: {stats}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
