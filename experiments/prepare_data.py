"""Public or own data -> the files every stage reads, split by prompt: one command.

  python -m experiments.prepare_data NAME --in FILE[,FILE...] --out DIR [--seed S]
      [--fractions sft=0.4,rm=0.3,ppo=0.2,eval=0.1] [--holdout 0.05] [--max_records N]
      [--separator TEXT] [--on_bad error|skip] [--tokenizer_kind KIND --tokenizer_path PATH]
      [--chat_template CHECKPOINT_DIR]

NAME is hh_rlhf, open_assistant, summarize_from_feedback, gsm8k (train answers and/or model
solutions in one call: each file's kind is told by its fields) or generic (our own formats, or
{prompt, chosen, rejected}). Every input file is read once (`converters.extract`) into the three
record kinds the stages read (docs/data.md, "Record formats"):

  demonstrations {"prompt", "completion"}: HH-RLHF's chosen final reply, OpenAssistant's rank-0
    reply, the preferred TL;DR summary, GSM8K's train answers (final "#### N" line kept);
  rankings {"prompt", "responses", "ranks"}: what `converters.convert` writes;
  prompts {"prompt"}: every distinct prompt text.

Each distinct prompt text goes to exactly one of InstructGPT's disjoint sets, SFT / RM / PPO /
evaluation, by where sha256(seed, prompt) falls in [0, 1) cut at the cumulative fractions of the
sets that can use it (SFT needs a demonstration of the prompt, the RM a ranking; PPO and
evaluation take any prompt; the fractions are renormalised over those): deterministic for a seed
and independent of file and line order. A GSM8K train question (a demonstration only) thus goes
to SFT, PPO or evaluation, a model-solutions question (a ranking only) to the RM, PPO or
evaluation. The first `holdout` of the SFT and RM sets' share become their eval files. DIR then
holds

  sft/train.jsonl, sft/eval.jsonl      demonstrations of SFT-set prompts
  rm/train.jsonl, rm/eval.jsonl        rankings of RM-set prompts
  ppo/prompts.jsonl                    PPO-set prompts
  eval/prompts.jsonl, eval/rankings.jsonl   evaluation-set prompts and their comparisons
  format.json                          {"separator": ...}: the stages' --config.format.separator
  summary.json                         what was read, written per file, left out and why

With `--chat_template DIR` (a checkpoint directory whose chat template `chat_templates.
load_chat_template` finds), every record is rendered with that template before the split
(`render_with_template`): HH-RLHF and OpenAssistant prompts are read back into their turns
(`chat_templates.hh_messages`), summarize-from-feedback and GSM8K prompts are one user turn,
generic prompts a dialogue when they are in the HH layout and one user turn otherwise; each
response is the assistant's reply to them (`chat_templates.split_for_training`: the prompt is
the conversation rendered with the generation prompt, the response what the reply adds,
end-of-turn text included). The separator is then "" (the template carries the join), and a
conversation the template refuses is left out and counted by reason.

Records in a file are sorted by their prompt's hash, so identical inputs give identical bytes
(and an unchanged file keeps its mtime, so the stages' builds are reused). A record whose
prompt's set does not use its kind (a demonstration of an RM-set prompt) is counted as unused;
an exact duplicate record is written once and counted. The command prints a table and the
flags each stage takes to read DIR. Bad input ends in one line naming file:line, exit 2.
"""
import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shlex
import sys
import time
from typing import Any, Sequence

from instructjax.data import chat_templates, converters
from instructjax.data.records import iter_jsonl, write_jsonl
from instructjax.errors import InputError

DATASETS = ("hh_rlhf", "open_assistant", "summarize_from_feedback", "gsm8k", "generic")
SPLITS = ("sft", "rm", "ppo", "eval")
DEFAULT_FRACTIONS = {"sft": 0.4, "rm": 0.3, "ppo": 0.2, "eval": 0.1}
DEFAULT_HOLDOUT = 0.05

# The text that joins a prompt and its response in each dataset's original documents, which
# the stages' formatting layer (`--config.format.separator`) puts back between them:
SEPARATORS = {
    # Transcripts read "...\n\nAssistant: reply": the converters end the prompt at the colon
    # and strip the reply, so the space between them is the separator.
    "hh_rlhf": " ",
    # Rendered in the same HH layout (`converters.format_dialogue`).
    "open_assistant": " ",
    # The prompt ends "TL;DR:"; the dataset's summaries start with the space (" Started ...").
    "summarize_from_feedback": " ",
    # OpenAI's grade-school-math trains on question + "\n" + answer (its dataset.py appends
    # "\n" to every question); the questions end in "?" or "." with no trailing whitespace.
    "gsm8k": "\n",
    # The user's own records: joined as written, as the stages read their files before the
    # formatting layer (`--separator` overrides any of these).
    "generic": "",
}

# Output files: name -> (record kind, split).
FILES = {
    "sft/train.jsonl": ("demonstrations", "sft"),
    "sft/eval.jsonl": ("demonstrations", "sft"),
    "rm/train.jsonl": ("rankings", "rm"),
    "rm/eval.jsonl": ("rankings", "rm"),
    "ppo/prompts.jsonl": ("prompts", "ppo"),
    "eval/prompts.jsonl": ("prompts", "eval"),
    "eval/rankings.jsonl": ("rankings", "eval"),
}
KINDS = ("demonstrations", "rankings", "prompts")


# ------------------------------------------------------------------------------------ options


def parse_fractions(text: str) -> dict[str, float]:
  """"sft=0.4,rm=0.3,ppo=0.2,eval=0.1" -> fractions of the prompts per split (unnamed: 0)."""
  fractions = dict.fromkeys(SPLITS, 0.0)
  for item in (part.strip() for part in text.split(",")):
    if not item:
      continue
    split, sep, value = item.partition("=")
    split = split.strip()
    if not sep or split not in SPLITS:
      raise InputError("--fractions", f"expected SPLIT=FRACTION with SPLIT in {list(SPLITS)}, "
                       f"got {item!r}")
    try:
      fractions[split] = float(value)
    except ValueError:
      raise InputError("--fractions", f"{split}: {value!r} is not a number") from None
    if not 0 <= fractions[split] <= 1 or math.isnan(fractions[split]):
      raise InputError("--fractions", f"{split}: {value} is not in [0, 1]")
  total = sum(fractions.values())
  if abs(total - 1) > 1e-6:
    raise InputError("--fractions", f"the fractions sum to {total:g}, not 1: {text}")
  return fractions


def position(seed: int, prompt: str) -> float:
  """Where a prompt falls in [0, 1): the same for the same seed and text, whatever the order."""
  digest = hashlib.sha256(f"{seed}\x00{prompt}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64


def eligible_splits(fractions: dict[str, float], has_demonstration: bool,
                    has_ranking: bool) -> dict[str, float]:
  """The sets a prompt can serve, with their fractions: SFT needs a demonstration of it, the RM
  a ranking; PPO and evaluation take any prompt. A prompt no set with a share can use keeps
  every set (it is then counted as unused wherever it lands)."""
  usable = {split: width for split, width in fractions.items() if width > 0 and
            (split != "sft" or has_demonstration) and (split != "rm" or has_ranking)}
  return usable or {split: width for split, width in fractions.items() if width > 0}


def place(u: float, fractions: dict[str, float], holdout: float) -> tuple[str, bool]:
  """(split, held out) of a prompt at position u: the split whose share of the cumulative
  fractions (renormalised to sum to 1) holds u, and whether u is in the first `holdout` of
  that share."""
  total = sum(fractions.values())
  low = 0.0
  splits = [split for split in SPLITS if fractions.get(split, 0) > 0]
  for split in splits:
    width = fractions[split] / total
    if u < low + width or split == splits[-1]:
      return split, (u - low) / width < holdout
    low += width
  raise AssertionError("unreachable: some fraction is positive")


def _source_of(name: str, path: str) -> str:
  """The converters' source for one file: GSM8K files are told apart by their first record."""
  if name != "gsm8k":
    return name
  for where, value in iter_jsonl(path):
    if isinstance(value, dict) and any(key in value for key in converters.GSM8K_SOLUTION_KEYS):
      return "gsm8k_solutions"
    if isinstance(value, dict) and "answer" in value:
      return "gsm8k_answers"
    keys = sorted(value) if isinstance(value, dict) else type(value).__name__
    raise InputError(where, "not a GSM8K file: expected {question, answer} (train.jsonl) or "
                     "{question, 6b_finetuning, ...} (example_model_solutions.jsonl), got "
                     f"{keys}")
  raise InputError(path, "no records: the file is empty or has only blank lines")


def _reasons(counter: dict[str, int]) -> str:
  return ", ".join(f"{why} {n:,}" for why, n in sorted(counter.items()))


# ------------------------------------------------------------------------------------ chat templates

# How each dataset's prompts become chat messages under --chat_template: "dialogue" reads an
# HH-layout prompt ("\n\nHuman: ...\n\nAssistant:", which the converters also write for
# OpenAssistant threads) back into its turns; "single_turn" makes the whole prompt one user
# message (a TL;DR prompt, "TL;DR:" included; a GSM8K question); "auto" (generic files) reads a
# prompt in the HH layout as a dialogue and any other as one user turn.
CHAT_LAYOUTS = {"hh_rlhf": "dialogue", "open_assistant": "dialogue",
                "summarize_from_feedback": "single_turn", "gsm8k": "single_turn",
                "generic": "auto"}
TEMPLATE_REFUSED = "template_refused"  # the template's own raise_exception, or its failure


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A checkpoint's chat template and what it renders with."""
  directory: str
  file: str                       # where the template was found, relative to `directory`
  template: str
  special_tokens: dict[str, str]  # bos_token, eos_token, ... as the template sees them
  special_texts: tuple[str, ...]  # every special token's text (to spot them in rendered text)

  def source(self) -> dict:
    return {"directory": self.directory, "file": self.file,
            "sha256": hashlib.sha256(self.template.encode("utf-8")).hexdigest()}


def load_template(directory: str) -> ChatTemplate:
  """The chat template of a checkpoint directory, looked for where `chat_templates.
  load_chat_template` (transformers' `from_pretrained`) looks; InputError without one, or when
  it cannot render a one-turn conversation."""
  where = f"--chat_template {directory}"
  template = chat_templates.load_chat_template(directory)
  if template is None:
    raise InputError(where, f"has no chat template: no {chat_templates.CHAT_TEMPLATE_FILE} and no "
                     f"'chat_template' in {chat_templates.TOKENIZER_CONFIG_FILE}")
  root = pathlib.Path(directory)
  if (root / chat_templates.CHAT_TEMPLATE_FILE).is_file():
    file = chat_templates.CHAT_TEMPLATE_FILE
  elif (root / chat_templates.CHAT_TEMPLATE_DIR).is_dir():
    file = f"{chat_templates.CHAT_TEMPLATE_DIR}/{chat_templates.DEFAULT_TEMPLATE_NAME}.jinja"
  else:
    file = chat_templates.TOKENIZER_CONFIG_FILE
  special = chat_templates.load_special_tokens(directory)
  texts = set(special.values())
  config_path = root / chat_templates.TOKENIZER_CONFIG_FILE
  if config_path.is_file():  # transformers' added_tokens_decoder: {id: {"content", "special"}}
    try:
      added = json.loads(config_path.read_text(encoding="utf-8-sig")).get("added_tokens_decoder")
    except (OSError, ValueError):
      added = None  # load_special_tokens has read this file: it is valid JSON
    for token in (added.values() if isinstance(added, dict) else ()):
      if isinstance(token, dict) and token.get("special") and isinstance(token.get("content"), str):
        texts.add(token["content"])
  loaded = ChatTemplate(str(directory), file, template, special,
                        tuple(sorted(t for t in texts if t)))
  try:  # A template that cannot render this renders none of the datasets' conversations.
    chat_templates.render(template, [{"role": "user", "content": "Hello."}],
                          add_generation_prompt=True, special_tokens=special, where=where)
  except InputError as e:
    raise InputError(where, f"cannot render a one-turn conversation: {e.problem}") from None
  return loaded


def _is_hh_dialogue(prompt: str) -> bool:
  return (prompt.startswith((converters.HUMAN, converters.HUMAN.lstrip()))
          and prompt.endswith(converters.ASSISTANT))


def conversation(layout: str, prompt: str, where: str) -> list[dict]:
  """The chat messages of a prompt (CHAT_LAYOUTS), ending with the user's turn."""
  if layout == "dialogue" or (layout == "auto" and _is_hh_dialogue(prompt)):
    messages = chat_templates.hh_messages(prompt, where=where)
  else:
    messages = [{"role": "user", "content": prompt.strip()}]
  if messages[-1]["role"] != "user":
    raise chat_templates.ConversationProblem(
        where, "the prompt ends with the assistant's turn, so a reply would follow a reply",
        "roles_do_not_alternate")
  return messages


def _render_record(kind: str, record: dict, chat: ChatTemplate, layout: str) -> dict:
  what = "prompt" if kind == "prompts" else f"{kind[:-1]} of prompt"
  where = f"chat template ({what} {record['prompt'][:40]!r})"
  messages = conversation(layout, record["prompt"], where)
  if kind == "prompts":
    return {**record, "prompt": chat_templates.render(
        chat.template, messages, add_generation_prompt=True,
        special_tokens=chat.special_tokens, where=where)}
  responses = record["responses"] if kind == "rankings" else [record["completion"]]
  prompts, rendered = set(), []
  for response in responses:
    prompt, text = chat_templates.split_for_training(
        chat.template, messages + [{"role": "assistant", "content": response.strip()}],
        chat.special_tokens, where=where)
    prompts.add(prompt)
    rendered.append(text)
  if len(prompts) > 1:  # e.g. a template that prints the time
    raise chat_templates.ConversationProblem(
        where, "the template renders the prompt differently for each response", "not_incremental")
  if kind == "rankings":
    return {**record, "prompt": prompts.pop(), "responses": rendered}
  return {**record, "prompt": prompts.pop(), "completion": rendered[0]}


def render_with_template(found: dict[str, dict[str, dict]], chat: ChatTemplate,
                         layout: str) -> tuple[dict[str, dict[str, dict]], dict]:
  """Every record of `found` ({kind: {key: record}}) rendered with the chat template: (the
  rendered records, keyed again, and what happened). A conversation the template cannot be used
  on (`ConversationProblem`: roles that do not alternate, text before the first turn, ...) or
  that the template refuses (its `raise_exception`) is left out and counted by reason, with the
  first message of each reason kept as an example; records that render alike are kept once and
  counted as duplicates."""
  rendered = {kind: {} for kind in KINDS}
  skipped = {kind: collections.Counter() for kind in KINDS}
  duplicates = collections.Counter()
  examples: dict[str, str] = {}
  for kind in KINDS:
    for record in found[kind].values():
      try:
        out = _render_record(kind, record, chat, layout)
      except chat_templates.ConversationProblem as e:
        skipped[kind][e.reason] += 1
        examples.setdefault(e.reason, str(e))
        continue
      except InputError as e:
        skipped[kind][TEMPLATE_REFUSED] += 1
        examples.setdefault(TEMPLATE_REFUSED, str(e))
        continue
      key = json.dumps(out, sort_keys=True, ensure_ascii=False)
      if key in rendered[kind]:
        duplicates[kind] += 1
      else:
        rendered[kind][key] = out
  texts = [text for kind in KINDS for record in rendered[kind].values()
           for text in [record["prompt"], record.get("completion", ""),
                        *record.get("responses", ())]]
  in_text = {token: sum(token in text for text in texts) for token in chat.special_texts}
  report_ = {
      **chat.source(), "layout": layout,
      "rendered": {kind: len(rendered[kind]) for kind in KINDS},
      "skipped": {kind: dict(sorted(skipped[kind].items())) for kind in KINDS},
      "examples": dict(sorted(examples.items())),
      "duplicates": {kind: duplicates[kind] for kind in KINDS},
      "special_tokens_in_text": {t: n for t, n in in_text.items() if n},
  }
  if not any(rendered.values()):
    reasons = collections.Counter()
    for counter in skipped.values():
      reasons.update(counter)
    raise InputError(f"--chat_template {chat.directory}", "the chat template was used on no "
                     f"conversation ({_reasons(reasons)}), e.g. {next(iter(examples.values()), '')}")
  return rendered, report_


# ------------------------------------------------------------------------------------ preparing


def prepare(name: str, inputs: Sequence[str], out: str | os.PathLike, *, seed: int = 0,
            fractions: dict[str, float] | None = None, holdout: float = DEFAULT_HOLDOUT,
            max_records: int | None = None, separator: str | None = None,
            on_bad: str = "error", tokenizer_kind: str = "", tokenizer_path: str = "",
            chat_template: str = "") -> dict:
  """Reads `inputs`, writes DIR's files (module docstring) and returns the summary.
  `chat_template`: a checkpoint directory whose chat template renders every record."""
  if name not in DATASETS:
    raise InputError("NAME", f"unknown dataset {name!r}; known: {list(DATASETS)}")
  fractions = dict(DEFAULT_FRACTIONS) if fractions is None else fractions
  if not 0 <= holdout < 1:
    raise InputError("--holdout", f"must be in [0, 1), got {holdout}")
  if not inputs:
    raise InputError("--in", "no input files")
  chat = None
  if chat_template:
    if separator:
      raise InputError("--separator", f"{separator!r} with --chat_template: the template's "
                       "rendering carries the join (the separator is \"\"); leave --separator out")
    chat = load_template(chat_template)
    separator = ""
  separator = SEPARATORS[name] if separator is None else separator
  out = pathlib.Path(out)
  found, duplicates, read_summary = read_inputs(name, inputs, on_bad, max_records)

  template_summary = None
  if chat is not None:  # Split what the model will read: the rendered records.
    found, template_summary = render_with_template(found, chat, CHAT_LAYOUTS[name])
    duplicates.update(template_summary["duplicates"])

  files, where, unused, prompts = split_by_prompt(found, seed, fractions, holdout)
  for name_, records_ in files.items():
    write_jsonl(out / name_, records_)
  write_json(out / "format.json", {"separator": separator})

  prompts_per_split = collections.Counter(split for _, split, _ in where.values())
  rm_records = files["rm/train.jsonl"] + files["rm/eval.jsonl"]
  summary: dict[str, Any] = {
      "dataset": name, "seed": seed, "fractions": fractions, "holdout": holdout,
      "max_records": max_records, "separator": separator,
      "inputs": read_summary,
      "records": {"demonstrations": len(found["demonstrations"]),
                  "rankings": len(found["rankings"]), "prompts": len(prompts)},
      "duplicates": {kind: duplicates[kind] for kind in KINDS},
      "prompts_per_split": {split: prompts_per_split[split] for split in SPLITS},
      "files": {name_: len(records_) for name_, records_ in files.items()},
      "unused": unused,
      "rm_max_k": max((len(r["responses"]) for r in rm_records), default=0),
  }
  if template_summary is not None:
    summary["chat_template"] = template_summary
  if tokenizer_kind:
    check_tokenizer(summary, files, separator, tokenizer_kind, tokenizer_path)
  write_json(out / "summary.json", summary)
  return summary


def read_inputs(name: str, inputs: Sequence[str], on_bad: str, max_records: int | None):
  """Every record of every input once — exact duplicates (across files too) kept once and
  counted — by kind: (found {kind: {key: record}}, duplicates, per-file read summary)."""
  found = {kind: {} for kind in KINDS}
  duplicates = collections.Counter()
  read_summary = []
  for path in inputs:
    source = _source_of(name, path)
    stats: dict = {}
    for kind, record in converters.extract(source, path, stats, on_bad=on_bad,
                                           max_records=max_records):
      key = json.dumps(record, sort_keys=True, ensure_ascii=False)
      if key in found[kind]:
        duplicates[kind] += 1
      else:
        found[kind][key] = record
    read = max(s.read for s in stats.values())
    if read == 0:
      raise InputError(str(path), "no records: the file is empty or has only blank lines")
    if not any(s.written for s in stats.values()):
      why = "; ".join(f"{kind}: {s}" for kind, s in stats.items())
      raise InputError(str(path), f"every record was left out ({why})")
    read_summary.append({"path": str(path), "source": source, "read": read,
                         **{kind: s.as_dict() for kind, s in stats.items()}})
  return found, duplicates, read_summary


def split_by_prompt(found: dict, seed: int, fractions: dict[str, float], holdout: float):
  """The records of each output file, every prompt in exactly one set (`position` of seed and
  prompt), each file in a fixed order; (files, where each prompt went, what no set could use,
  the prompts)."""
  prompts = sorted({r["prompt"] for kind in KINDS for r in found[kind].values()})
  with_demonstration = {r["prompt"] for r in found["demonstrations"].values()}
  with_ranking = {r["prompt"] for r in found["rankings"].values()}
  where = {}
  for prompt in prompts:
    u = position(seed, prompt)
    usable = eligible_splits(fractions, prompt in with_demonstration, prompt in with_ranking)
    where[prompt] = (u, *place(u, usable, holdout))
  files = {name_: [] for name_ in FILES}
  unused = {"demonstrations": collections.Counter(), "rankings": collections.Counter()}
  for record in found["demonstrations"].values():
    _, split, held = where[record["prompt"]]
    if split == "sft":
      files["sft/eval.jsonl" if held else "sft/train.jsonl"].append(record)
    else:
      unused["demonstrations"][split] += 1
  for record in found["rankings"].values():
    _, split, held = where[record["prompt"]]
    if split == "rm":
      files["rm/eval.jsonl" if held else "rm/train.jsonl"].append(record)
    elif split == "eval":
      files["eval/rankings.jsonl"].append(record)
    else:
      unused["rankings"][split] += 1
  empty_prompts = 0
  unused["prompts"] = collections.Counter()
  for prompt in prompts:
    _, split, _ = where[prompt]
    if split in ("ppo", "eval"):
      if prompt.strip():
        files[f"{split}/prompts.jsonl"].append({"prompt": prompt})
      else:
        empty_prompts += 1  # A PPO or evaluation prompt must say something.
    elif (split == "sft" and prompt not in with_demonstration or
          split == "rm" and prompt not in with_ranking):
      unused["prompts"][split] += 1  # Only where no set with a share could use it.

  def order(record):
    return (where[record["prompt"]][0], record["prompt"],
            json.dumps(record, sort_keys=True, ensure_ascii=False))

  for records_ in files.values():
    records_.sort(key=order)
  unused = {**{kind: dict(sorted(unused[kind].items())) for kind in KINDS},
            "empty_prompts": empty_prompts}
  return files, where, unused, prompts


def check_tokenizer(summary: dict, files: dict, separator: str, tokenizer_kind: str,
                    tokenizer_path: str) -> None:
  """Adds to `summary` the boundary cases of the written pairs under the tokenizer, and with a
  chat template the special tokens it would split into several ids."""
  from instructjax.data import tokenizers
  # Rendered chat text spells the template's tokens; the stages read them as tokens
  # (--config.tokenizer.special_tokens_in_text, printed with the flags), and so does the check.
  tokenizer = tokenizers.make_tokenizer(tokenizer_kind, tokenizer_path or None)
  if _reads_special_tokens(summary):
    try:
      tokenizer = tokenizer.reading_special_tokens()
    except InputError:
      pass  # a tokenizer without such tokens: the warning below names what it splits
  summary["boundary"] = count_boundary_cases(files, separator, tokenizer_kind, tokenizer_path,
                                             tokenizer=tokenizer)
  template_summary = summary.get("chat_template")
  if template_summary is not None:
    # The template's special tokens the tokenizer reads as text, not as their one id.
    template_summary["special_tokens_as_text"] = {
        token: len(tokenizer.encode(token))
        for token in template_summary["special_tokens_in_text"]
        if len(tokenizer.encode(token)) != 1}


def write_json(path: pathlib.Path, value: dict) -> None:
  """A small JSON file, indented; rewritten only when its content changes."""
  text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
  if not path.is_file() or path.read_text(encoding="utf-8") != text:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def count_boundary_cases(files: dict[str, list[dict]], separator: str, kind: str,
                         path: str, tokenizer=None) -> dict:
  """Per file, the (prompt, response) pairs whose joined text's ids do not start with the
  prompt's own ids (a BPE merge across the boundary; `formatting.encode_pair`)."""
  from instructjax.data import formatting, tokenizers
  if tokenizer is None:
    tokenizer = tokenizers.make_tokenizer(kind, path or None)
  fmt = formatting.Format(separator=separator)
  counts = {}
  for name_, records_ in files.items():
    record_kind = FILES[name_][0]
    if record_kind == "prompts":
      continue
    pairs = inexact = 0
    for record in records_:
      prompt_ids = tokenizer.encode(record["prompt"])
      responses = (record["responses"] if record_kind == "rankings" else
                   [record["completion"]])
      for response in responses:
        pairs += 1
        inexact += not formatting.encode_pair(tokenizer, fmt, record["prompt"], response,
                                              prompt_ids=prompt_ids).exact
    counts[name_] = {"pairs": pairs, "boundary_cases": inexact}
  return {"tokenizer": {"kind": kind, "path": path}, "files": counts}


# ------------------------------------------------------------------------------------ reporting


def _quote(text: str) -> str:
  """`text` as one bash word: '...' quoting, or $'...' where it holds a newline or tab."""
  if any(c in text for c in "\n\t\r"):
    escaped = (text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
               .replace("\t", "\\t").replace("\r", "\\r"))
    return f"$'{escaped}'"
  return shlex.quote(text)


def _reads_special_tokens(summary: dict) -> bool:
  """Whether the records hold a chat template's special tokens as text."""
  return bool(summary.get("chat_template", {}).get("special_tokens_in_text"))


def stage_flags(out: str, summary: dict) -> list[tuple[str, str]]:
  """(stage, flags) reading DIR, for experiments/configs/{sft,reward,ppo,evaluate}.py."""
  def path(name_):
    return _quote(str(pathlib.Path(out) / name_))
  n = summary["files"]
  fmt = f"--config.format.separator={_quote(summary['separator'])}"
  if _reads_special_tokens(summary):
    fmt += " --config.tokenizer.special_tokens_in_text=True"
  lines = []

  def files_flags(prefix):
    if not n[f"{prefix}/train.jsonl"]:
      return None
    flags = f"--config.data.source=files --config.data.train_files={path(prefix + '/train.jsonl')}"
    if n[f"{prefix}/eval.jsonl"]:
      flags += f" --config.data.eval_files={path(prefix + '/eval.jsonl')}"
    return flags

  sft = files_flags("sft")
  lines.append(("sft", f"{sft} {fmt}" if sft else "no demonstrations: nothing to fine-tune on"))
  rm = files_flags("rm")
  if rm:
    k = summary["rm_max_k"]
    # data.max_k is also the model input's K; min_k (synthetic only) must not exceed it.
    rm += f" --config.data.min_k=2 --config.data.max_k={k}"
  lines.append(("reward", f"{rm} {fmt}" if rm else "no rankings: nothing to train a reward "
                "model on"))
  if n["ppo/prompts.jsonl"]:
    lines.append(("ppo", f"--config.data.source=files --config.data.files="
                  f"{path('ppo/prompts.jsonl')} {fmt}"))
  else:
    lines.append(("ppo", "no prompts in the PPO set"))
  evaluate = ""
  if n["eval/prompts.jsonl"]:
    evaluate = f"--config.prompts_file={path('eval/prompts.jsonl')} "
    if n["eval/rankings.jsonl"]:
      evaluate += f"--config.rankings_file={path('eval/rankings.jsonl')} "
  lines.append(("evaluate", evaluate + fmt))
  return lines


def report(out: str, summary: dict, seconds: float) -> str:
  lines = []
  fractions = " ".join(f"{s}={f:g}" for s, f in summary["fractions"].items())
  lines.append(f"{summary['dataset']} -> {out}  (seed {summary['seed']}, {fractions}, "
               f"holdout {summary['holdout']:g}"
               + (f", max_records {summary['max_records']}" if summary["max_records"] else "")
               + ")")
  for item in summary["inputs"]:
    parts = []
    for kind in KINDS:
      if kind in item:
        s = item[kind]
        notes = [f"left out: {_reasons(s['skipped'])}"] if s["skipped"] else []
        notes += [f"replies dropped: {_reasons(s['dropped'])}"] if s["dropped"] else []
        parts.append(f"{s['written']:,} {kind}" + (f" ({'; '.join(notes)})" if notes else ""))
    lines.append(f"  read {item['path']} [{item['source']}]: {item['read']:,} records -> "
                 + "; ".join(parts))
  dup = {k: v for k, v in summary["duplicates"].items() if v}
  if dup:
    lines.append(f"  duplicates written once: {_reasons(dup)}")
  lines.append("")
  lines.append(f"  {'set':<5} {'prompts':>8}  {'file':<22} {'records':>8}")
  per_split = summary["prompts_per_split"]
  for split in SPLITS:
    first = True
    for name_, (kind, file_split) in FILES.items():
      if file_split != split:
        continue
      count = summary["files"][name_]
      lines.append(f"  {split if first else '':<5} "
                   f"{(f'{per_split[split]:,}' if first else ''):>8}  {name_:<22} {count:>8,} "
                   f"{kind}{'' if count else ' (empty)'}")
      first = False
  unused = summary["unused"]
  for kind in KINDS:
    if unused[kind]:
      why = ("nothing of theirs that their set takes" if kind == "prompts" else
             f"their prompt is in a set that takes no {kind}")
      lines.append(f"  unused {kind} ({why}): {_reasons(unused[kind])}")
  if unused["empty_prompts"]:
    lines.append(f"  empty prompts left out of the PPO / eval prompt files: "
                 f"{unused['empty_prompts']:,}")
  if "chat_template" in summary:
    c = summary["chat_template"]
    rendered = ", ".join(f"{n:,} {kind}" for kind, n in c["rendered"].items() if n)
    lines.append(f"  chat template {pathlib.Path(c['directory']) / c['file']} "
                 f"(sha256 {c['sha256'][:12]}, {c['layout']}): rendered {rendered}")
    for kind in KINDS:
      if c["skipped"][kind]:
        lines.append(f"  {kind} whose conversation the template cannot render, left out: "
                     f"{_reasons(c['skipped'][kind])}")
    for reason, example in c["examples"].items():
      lines.append(f"    e.g. {reason}: {example[:300]}")
    if c.get("special_tokens_as_text"):
      tokens = ", ".join(f"{t} ({n} ids)" for t, n in c["special_tokens_as_text"].items())
      lines.append(f"  WARNING: the rendered text holds special tokens the tokenizer encodes as "
                   f"ordinary text, not as their one id: {tokens}")
    elif c["special_tokens_in_text"] and "boundary" not in summary:
      lines.append(f"  the rendered text holds the special tokens "
                   f"{', '.join(c['special_tokens_in_text'])}: --tokenizer_kind / "
                   "--tokenizer_path check that the tokenizer reads each as one id")
  if "boundary" in summary:
    b = summary["boundary"]
    cases = ", ".join(f"{f} {c['boundary_cases']:,}/{c['pairs']:,}"
                      for f, c in b["files"].items() if c["pairs"])
    lines.append(f"  boundary cases ({b['tokenizer']['kind']}: pairs whose joined ids do not "
                 f"start with the prompt's): {cases}")
  lines.append(f"  wrote {pathlib.Path(out) / 'summary.json'} and format.json "
               f"(separator {summary['separator']!r}) in {seconds:.1f} s")
  lines.append("")
  lines.append("Stage flags (after `python -m experiments.run --config experiments/configs/"
               "STAGE.py --workdir ...`):")
  for stage, flags in stage_flags(out, summary):
    lines.append(f"  {stage + ':':<9} {flags}")
  lines.append("  PPO-ptx also needs pretraining text: --config.ptx.source=files "
               "--config.ptx.files=... (or --config.ppo.ptx_coef=0 --config.ptx.source=none).")
  lines.append("")
  lines.append("Or every stage in one command (SFT -> reward model + held-out judge -> PPO, "
               "PPO-ptx -> evaluation -> report):")
  lines.append("  python -m experiments.run --config experiments/configs/instructgpt.py:hf "
               f"--workdir RUN --config.init_from_hf=CHECKPOINT --config.data_dir={_quote(out)} "
               "--config.ptx_files=CORPUS")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.prepare_data",
      description="Writes demonstrations, rankings and prompts split by prompt into disjoint "
      "SFT / RM / PPO / evaluation sets (see the module docstring).")
  parser.add_argument("name", choices=DATASETS, metavar="NAME",
                      help=f"one of {', '.join(DATASETS)}")
  parser.add_argument("--in", dest="inputs", required=True, metavar="FILE[,FILE...]",
                      help="input JSONL(.gz) files, comma-separated")
  parser.add_argument("--out", required=True, metavar="DIR")
  parser.add_argument("--seed", type=int, default=0, help="decides which set each prompt joins")
  parser.add_argument("--fractions", default="sft=0.4,rm=0.3,ppo=0.2,eval=0.1",
                      help="share of the distinct prompts per set (unnamed sets get 0)")
  parser.add_argument("--holdout", type=float, default=DEFAULT_HOLDOUT,
                      help="share of the SFT and RM sets' prompts in sft/eval.jsonl and "
                      "rm/eval.jsonl")
  parser.add_argument("--max_records", type=int, default=None,
                      help="read only the first N records of each file (for a quick look)")
  parser.add_argument("--separator", default=None,
                      help="override the dataset's prompt/response separator in format.json")
  parser.add_argument("--on_bad", choices=("error", "skip"), default="error",
                      help="a record not in its source's format: stop, naming file:line "
                      "(default), or leave it out and count it")
  parser.add_argument("--tokenizer_kind", default="",
                      help="count boundary cases with this tokenizer (as --config.tokenizer.kind)")
  parser.add_argument("--tokenizer_path", default="")
  parser.add_argument("--chat_template", default="", metavar="CHECKPOINT_DIR",
                      help="render every record with this checkpoint's chat template (its "
                      "chat_template.jinja or tokenizer_config.json); the separator is then ''")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    inputs = [p.strip() for p in args.inputs.split(",") if p.strip()]
    summary = prepare(args.name, inputs, args.out, seed=args.seed,
                      fractions=parse_fractions(args.fractions), holdout=args.holdout,
                      max_records=args.max_records, separator=args.separator,
                      on_bad=args.on_bad, tokenizer_kind=args.tokenizer_kind,
                      tokenizer_path=args.tokenizer_path, chat_template=args.chat_template)
  except InputError as e:  # bad input: one line naming the file and what is wrong
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report(args.out, summary, time.perf_counter() - start))
  return 0


if __name__ == "__main__":
  sys.exit(main())
