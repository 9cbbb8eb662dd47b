"""TFDS builder for pretraining text: {"text", "source"} documents."""
from typing import Iterator

from instructjax.data import records
from instructjax.data.builders import base

# A corpus of one document (e.g. tinyshakespeare's input.txt) with no validation split
# given keeps its head for training and its tail, from the first line break after
# this fraction of the characters, for validation (like nanoGPT's 90/10 cut).
TRAIN_FRACTION_OF_SINGLE_DOCUMENT = 0.95


def split_document(text: str, fraction: float = TRAIN_FRACTION_OF_SINGLE_DOCUMENT) -> int | None:
  """Where to cut one document into train head and validation tail; None if it cannot be.

  The cut is at the first line start at or past `fraction` of the characters, or at
  `fraction` exactly when no line starts there; both parts must have non-space text.
  """
  start = int(len(text) * fraction)
  newline = text.find("\n", max(start - 1, 0))
  cut = newline + 1 if newline >= 0 else start
  if not text[:cut].strip() or not text[cut:].strip():
    return None
  return cut


class TextCorpus(base.RecordsBuilder, skip_registration=True):
  """Text documents for language-model pretraining: JSONL {"text"} lines or whole files."""
  FIELDS = (records.TEXT_FIELD,)

  def read_records(self, path: str) -> Iterator[dict[str, str]]:
    return records.read_text(path)

  def split_single_record(self, record):
    text, source = record[records.TEXT_FIELD], record["source"]
    cut = split_document(text)
    if cut is None:
      return None
    path, line = source.rsplit(":", 1)
    if records.is_jsonl(path):  # The text is one JSON line; name the character instead.
      tail_source = f"{source} from character {cut}"
    else:
      tail_source = f"{path}:{int(line) + text.count(chr(10), 0, cut)}"
    return ({records.TEXT_FIELD: text[:cut], "source": source},
            {records.TEXT_FIELD: text[cut:], "source": tail_source})
