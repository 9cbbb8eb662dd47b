"""Record formats for the pretraining and SFT stages, read with validation.

Two formats, both UTF-8 (a leading byte-order mark is accepted and dropped) and optionally
gzip-compressed (detected from the content, not the file name):

  demonstrations: JSON Lines, one object per line, {"prompt": str, "completion": str};
    extra keys are ignored. The prompt may be empty; the completion may not be empty or
    whitespace-only (there would be nothing to learn).
  text: JSON Lines with {"text": str} per line (one document per line), or any other
    file (e.g. `.txt`, `.txt.gz`), which is read whole as one document. A document may
    not be empty or whitespace-only.

Whitespace-only lines in a JSONL file are not records and are passed over. Everything
else that is wrong raises `InputError("path:LINE", "what is wrong")`; nothing is dropped
silently. Every record read carries `source`, the "path:line" it came from, so that
later stages (tokenisation, truncation) can name the record they complain about.
"""
import codecs
import filecmp
import gzip
import io
import json
import os
import pathlib
from typing import Any, Iterable, Iterator

from instructjax.errors import InputError

_GZIP_MAGIC = b"\x1f\x8b"
DEMONSTRATION_FIELDS = ("prompt", "completion")
TEXT_FIELD = "text"


def _without_bom(data: bytes, path: pathlib.Path) -> bytes:
  """The file's first bytes without a UTF-8 byte-order mark, which Windows editors (Notepad,
  Excel's "CSV UTF-8") write and which is no part of the text. What decoding with "utf-8-sig"
  does, done on the bytes so that a later decoding error's byte offset still gives its line."""
  if data.startswith(codecs.BOM_UTF8):
    return data[len(codecs.BOM_UTF8):]
  if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
    raise InputError(f"{path}:1", "the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                     "save it as UTF-8")
  return data


def _is_gzip(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    return f.read(2) == _GZIP_MAGIC


def _open_binary(path: pathlib.Path):
  return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def _require_file(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(str(path), "no such file")
  return path


def is_jsonl(path: str | os.PathLike) -> bool:
  """Whether a text corpus file is JSON Lines (by name: `.jsonl` or `.jsonl.gz`)."""
  name = pathlib.Path(path).name
  return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
  """Yields (where, value) for each non-blank line of a JSONL file, gzipped or not.

  `where` is "path:line" with 1-based lines. Malformed JSON, bytes that are not UTF-8
  and a corrupt gzip stream raise InputError naming the file and line. A byte-order mark
  before the first line is dropped.
  """
  path = _require_file(path)
  line_no = 0
  try:
    with _open_binary(path) as f:
      for line_no, raw in enumerate(f, start=1):
        where = f"{path}:{line_no}"
        if line_no == 1:
          raw = _without_bom(raw, path)
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise InputError(where, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
          continue
        try:
          value = json.loads(line)
        except json.JSONDecodeError as e:
          raise InputError(where, f"malformed JSON: {e.msg} (column {e.colno})") from None
        yield where, value
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
    raise InputError(f"{path}:{line_no + 1}", f"cannot read the file: {e}") from None


def _require_object(value: Any, where: str) -> dict:
  if not isinstance(value, dict):
    raise InputError(where, f"expected a JSON object, got {type(value).__name__}")
  return value


def _require_string(record: dict, field: str, where: str) -> str:
  if field not in record:
    raise InputError(where, f"missing field {field!r}")
  value = record[field]
  if not isinstance(value, str):
    raise InputError(where, f"field {field!r} must be a string, got {type(value).__name__}")
  return value


def validate_demonstration(record: Any, where: str) -> dict[str, str]:
  """Checks one demonstration and returns {"prompt", "completion", "source"}."""
  record = _require_object(record, where)
  prompt = _require_string(record, "prompt", where)
  completion = _require_string(record, "completion", where)
  if not completion.strip():
    raise InputError(where, "empty completion")
  return {"prompt": prompt, "completion": completion, "source": where}


def validate_text(record: Any, where: str) -> dict[str, str]:
  """Checks one text document record and returns {"text", "source"}."""
  record = _require_object(record, where)
  text = _require_string(record, TEXT_FIELD, where)
  if not text.strip():
    raise InputError(where, "empty text document")
  return {"text": text, "source": where}


def validate_prompt(record: Any, where: str) -> dict[str, str]:
  """Checks one prompt record and returns {"prompt", "source"}."""
  record = _require_object(record, where)
  prompt = _require_string(record, "prompt", where)
  if not prompt.strip():
    raise InputError(where, "'prompt' is empty")
  return {"prompt": prompt, "source": where}


def read_prompts(path: str | os.PathLike) -> list[dict[str, str]]:
  """Validated {"prompt", "source"} records: one per JSONL line ({"prompt": ...}), or one per
  non-blank line of a text file (a literal \\n in it stands for a newline). PPO's prompt files
  and the sampler's read prompts through here."""
  if is_jsonl(path):
    return [validate_prompt(value, where) for where, value in iter_jsonl(path)]
  text = _read_whole_text(_require_file(path))
  return [{"prompt": line.replace("\\n", "\n"), "source": f"{path}:{number}"}
          for number, line in enumerate(text.split("\n"), 1) if line.strip()]


def read_demonstrations(path: str | os.PathLike) -> Iterator[dict[str, str]]:
  """Yields validated {"prompt", "completion", "source"} records of a JSONL file."""
  for where, value in iter_jsonl(path):
    yield validate_demonstration(value, where)


def _read_whole_text(path: pathlib.Path) -> str:
  try:
    with _open_binary(path) as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise InputError(str(path), f"cannot read the file: {e}") from None
  data = _without_bom(data, path)
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise InputError(f"{path}:{line}", f"not valid UTF-8 ({e.reason})") from None


def read_text(path: str | os.PathLike) -> Iterator[dict[str, str]]:
  """Yields validated {"text", "source"} documents: one per JSONL line, or the whole file."""
  if is_jsonl(path):
    for where, value in iter_jsonl(path):
      yield validate_text(value, where)
    return
  path = _require_file(path)
  yield validate_text({TEXT_FIELD: _read_whole_text(path)}, f"{path}:1")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
  """Writes records as JSON Lines (UTF-8, gzipped if the name ends in .gz); returns the count.

  Lets a trainer materialise a synthetic task as files, so that it goes through the same
  validation and builders as real data. Writes to a temporary name and renames, so a
  crash never leaves a half-written file that a later build would trust; an existing file
  with identical bytes is left untouched, so its mtime (and the builders' cache key) stays.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  count = 0
  with open(tmp, "wb") as raw:
    # An empty name and mtime=0 keep gzip output byte-identical across runs.
    sink = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) if path.name.endswith(
        ".gz") else raw
    with io.TextIOWrapper(sink, encoding="utf-8", newline="\n") as f:
      for count, record in enumerate(records, start=1):
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
  if path.is_file() and filecmp.cmp(tmp, path, shallow=False):
    tmp.unlink()
  else:
    os.replace(tmp, path)
  return count
