"""How a prompt and a response join into the one token sequence every stage trains on.

A pretrained model saw documents, not (prompt, response) pairs. Encoding the two apart and
concatenating the ids gives sequences it never saw: with GPT-2's BPE, `encode("Assistant:") +
encode("I can")` reads `Assistant:I can` (ids ... 25, 40 ...) where the document `Assistant: I
can` is ... 25, 314 ... (the space belongs to the next word's token). So the stages join the
TEXT — `prompt + separator + response` — encode it once, and cut the ids where the prompt's own
ids end. The prompt's ids are then exactly what PPO samples from and the response's exactly
what the policy must emit, both as the tokenizer writes the whole document.

The cut is on a token boundary whenever `encode(prompt)` is a prefix of `encode(joined)`. When
a merge crosses the boundary (a prompt ending mid-word, say), the two cannot agree: the pair
then falls back to `encode(prompt) + encode(separator + response)` and is counted as a
boundary case (`Pair.exact` is False), never dropped. The byte tokenizer, the synthetic task's,
encodes text piece by piece, so its pairs are always exact and its ids are those of the
separate encodings (the synthetic default's separator is "").
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

from instructjax.errors import InputError


class Encoder(Protocol):
  def encode(self, text: str) -> list[int]:
    ...


@dataclasses.dataclass(frozen=True)
class Format:
  """How this run's prompts and responses join.

  Attributes:
    separator: the text between a prompt and its response in the joined document: "" for the
      synthetic task and chat templates (the prompt carries its own ending), " " for HH-RLHF's
      `...\\n\\nAssistant:` and TL;DR's `...TL;DR:` prompts (`experiments.prepare_data` writes
      the one its dataset needs into `format.json`).
  """
  separator: str = ""

  def __post_init__(self):
    if not isinstance(self.separator, str):
      raise InputError("config.format.separator",
                       f"must be a string, got {type(self.separator).__name__}")

  def join(self, prompt: str, response: str) -> str:
    return prompt + self.separator + response

  def response_text(self, generated: str) -> str:
    """A generated response as a record stores it: without the separator the policy emitted
    first (the join puts it back), so the stored pair re-encodes to the sampled ids."""
    if self.separator and generated.startswith(self.separator):
      return generated[len(self.separator):]
    return generated


class Pair(NamedTuple):
  prompt_ids: list[int]
  response_ids: list[int]
  exact: bool  # the ids are those of the joined text, cut on a token boundary


def encode_pair(tokenizer: Encoder, fmt: Format, prompt: str, response: str, *,
                prompt_ids: list[int] | None = None) -> Pair:
  """The ids of `prompt` and `response` joined by `fmt` (see the module docstring);
  `prompt_ids`, when given, are `tokenizer.encode(prompt)` (K responses share one prompt)."""
  prompt_ids = tokenizer.encode(prompt) if prompt_ids is None else prompt_ids
  joined = tokenizer.encode(fmt.join(prompt, response))
  n = len(prompt_ids)
  if joined[:n] == prompt_ids:
    return Pair(prompt_ids, joined[n:], True)
  return Pair(prompt_ids, tokenizer.encode(fmt.separator + response), False)


def from_config(config) -> Format:
  """The `format` section of a stage's config; a config without one (a workdir written before
  the section existed) joins with no separator, as those runs did."""
  section = config.get("format")
  return Format() if section is None else Format(**section.to_dict())
