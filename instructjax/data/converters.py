"""Converters from public human-comparison datasets to K-way ranking records.

Each converter takes the source file (JSONL or JSONL.gz) and returns an iterator of
ranking records (see `rankings.py`), counting in a `Stats` what it read, wrote and
left out, and why:

  stats = rankings.Stats()
  for record in converters.open_assistant("en_100_tree.jsonl.gz", stats): ...
  print(stats)  # read 100, written 212, skipped 42 (too_few_responses), dropped ...

or, file to file: `convert("hh_rlhf", in_path, out_path) -> Stats`.

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
import os
from typing import Any, Callable, Iterator

from instructjax.data import rankings
from instructjax.data.rankings import RankingProblem, Stats
from instructjax.data.records import iter_jsonl
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


def _drive(path: PathLike, stats: Stats | None, on_bad: rankings.OnBad,
           convert_one: Callable[[Any, str, Stats], Iterator[dict]]) -> Iterator[dict]:
  """Runs `convert_one` over every line, applying the `on_bad` policy to format errors."""
  rankings.check_on_bad(on_bad)
  stats = Stats() if stats is None else stats

  def generate():
    for where, value in iter_jsonl(path):
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
        yield record

  return generate()


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


def hh_rlhf(path: PathLike, stats: Stats | None = None, *,
            on_bad: rankings.OnBad = "error") -> Iterator[dict]:
  """Anthropic HH-RLHF `{chosen, rejected}` transcripts -> K = 2 rankings.

  Skipped and counted: identical transcripts ("identical"), pairs that differ before
  their final assistant turn ("differ_before_final_turn"), pairs sharing no assistant
  turn ("no_shared_assistant_turn"), an empty reply ("empty_response").
  """
  return _drive(path, stats, on_bad, _hh_one)


# ------------------------------------------------------------------ OpenAssistant

_OA_ROLES = {"prompter": "human", "assistant": "assistant"}


def _oa_message(message: Any, where: str) -> tuple[str, str, list]:
  text = _require(message, "text", str, where)
  role = _require(message, "role", str, where)
  if role not in _OA_ROLES:
    raise InputError(where, f"role must be 'prompter' or 'assistant', got {role!r}")
  replies = message.get("replies") or []
  if not isinstance(replies, list):
    raise InputError(where, f"'replies' must be a list, got {type(replies).__name__}")
  return text, role, replies


def _oa_walk(message: Any, history: list[tuple[str, str]], where: str,
             stats: Stats) -> Iterator[dict]:
  """Yields a ranking for this message's replies if it is a prompter, then recurses."""
  message_id = message.get("message_id", "?") if isinstance(message, dict) else "?"
  here = f"{where} message {message_id}"
  text, role, replies = _oa_message(message, here)
  history = history + [(_OA_ROLES[role], text)]
  live = []
  for reply in replies:
    _, reply_role, _ = _oa_message(reply, here)
    if _OA_ROLES[reply_role] == _OA_ROLES[role]:
      raise InputError(here, f"a {role} message has a {reply_role} reply: roles must alternate")
    if reply.get("deleted"):
      # A moderator removed it; its subtree continues a conversation that is gone.
      stats.dropped["deleted_replies"] += 1
    else:
      live.append(reply)
  if role == "prompter" and live:
    ranked = [reply for reply in live if reply.get("rank") is not None]
    stats.dropped["unranked_replies"] += len(live) - len(ranked)
    record = _skip_as_data_property(
        {"prompt": format_dialogue(history),
         "responses": [reply["text"].strip() for reply in ranked],
         "ranks": [reply["rank"] for reply in ranked]}, here, stats)
    if record is not None:
      yield record
  for reply in live:
    yield from _oa_walk(reply, history, where, stats)


def _oa_one(value: Any, where: str, stats: Stats) -> Iterator[dict]:
  root = _require(value, "prompt", dict, where)
  if root.get("role") != "prompter":
    raise InputError(where, f"a tree must start with a prompter message, got {root.get('role')!r}")
  tree_id = value.get("message_tree_id")
  yield from _oa_walk(root, [], f"{where} tree {tree_id}" if tree_id else where, stats)


def open_assistant(path: PathLike, stats: Stats | None = None, *,
                   on_bad: rankings.OnBad = "error") -> Iterator[dict]:
  """OpenAssistant message trees -> one ranking per prompter message with ranked replies.

  The whole tree is walked, so later turns give rankings too; the prompt is the
  conversation down to that prompter message. Replies with a null rank are dropped
  ("unranked_replies"), as are deleted replies and their subtrees ("deleted_replies");
  a prompter message left with fewer than 2 ranked replies is skipped
  ("too_few_responses").
  """
  return _drive(path, stats, on_bad, _oa_one)


# ------------------------------------------------------------------ summarize-from-feedback


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
  """The Reddit TL;DR prompt of Stiennon et al. (2020)."""
  return f"SUBREDDIT: r/{subreddit}\nTITLE: {title.strip()}\nPOST: {post.strip()}\nTL;DR:"


def _tldr_one(value: Any, where: str, stats: Stats) -> Iterator[dict]:
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
  if len(set(texts)) < len(texts):
    stats.skipped["identical"] += 1
    return
  ranks = [0 if i == choice else 1 for i in range(len(texts))]
  record = _skip_as_data_property({"prompt": prompt, "responses": texts, "ranks": ranks},
                                  where, stats)
  if record is not None:
    yield record


def summarize_from_feedback(path: PathLike, stats: Stats | None = None, *,
                            on_bad: rankings.OnBad = "error") -> Iterator[dict]:
  """OpenAI summarize-from-feedback comparisons -> rankings (chosen summary rank 0).

  Skipped and counted: comparisons of identical summaries ("identical").
  """
  return _drive(path, stats, on_bad, _tldr_one)


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


def gsm8k_solutions(path: PathLike, stats: Stats | None = None, *,
                    on_bad: rankings.OnBad = "error") -> Iterator[dict]:
  """GSM8K model solutions with correctness flags -> rankings (correct rank 0).

  Responses are the present, non-null solutions in GSM8K_SOLUTION_KEYS order; correct
  ones tie at rank 0 and incorrect ones at rank 1, so every pair is correct > incorrect.
  Questions whose solutions are all correct or all incorrect give no pair and are
  skipped ("all_correct", "all_incorrect"); fewer than 2 solutions,
  "too_few_responses".
  """
  return _drive(path, stats, on_bad, _gsm8k_one)


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


def generic(path: PathLike, stats: Stats | None = None, *,
            on_bad: rankings.OnBad = "error") -> Iterator[dict]:
  """Records already in our schema, or pairwise `{prompt, chosen, rejected}` (K = 2).

  Validation is strict: any invalid record raises (or, with on_bad="skip", is counted
  under its reason).
  """
  return _drive(path, stats, on_bad, _generic_one)


CONVERTERS: dict[str, Converter] = {
    "hh_rlhf": hh_rlhf,
    "open_assistant": open_assistant,
    "summarize_from_feedback": summarize_from_feedback,
    "gsm8k_solutions": gsm8k_solutions,
    "generic": generic,
}


def convert(name: str, in_path: PathLike, out_path: PathLike, *,
            on_bad: rankings.OnBad = "error") -> Stats:
  """Converts `in_path` with CONVERTERS[name] and writes the rankings to `out_path`.

  `out_path` is gzip-compressed if it ends in .gz, and is only created if the whole
  conversion succeeds.
  """
  if name not in CONVERTERS:
    raise InputError("converter", f"unknown converter {name!r}; known: {sorted(CONVERTERS)}")
  stats = Stats()
  rankings.write_rankings(out_path, CONVERTERS[name](in_path, stats, on_bad=on_bad))
  return stats
