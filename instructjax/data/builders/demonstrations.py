"""TFDS builder for SFT demonstrations: {"prompt", "completion", "source"} records."""
from typing import Iterator

from instructjax.data import records
from instructjax.data.builders import base


class Demonstrations(base.RecordsBuilder, skip_registration=True):
  """Prompt/completion demonstrations for supervised fine-tuning, read from JSONL."""
  FIELDS = records.DEMONSTRATION_FIELDS

  def read_records(self, path: str) -> Iterator[dict[str, str]]:
    return records.read_demonstrations(path)
