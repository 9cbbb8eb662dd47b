"""A user's own files: byte-order marks, files without records, and what a build prints."""
import codecs
import gzip
import json
import logging
import re

import pytest

from instructjax.data import builders, converters, records, rankings
from instructjax.data.builders import rankings as rankings_builder
from instructjax.errors import InputError

DEMO = {"prompt": "Say hi.", "completion": "hi"}
RANKING = {"prompt": "Pick one.", "responses": ["good", "bad"], "ranks": [0, 1]}


def _write(path, text: str, *, bom: bytes = b"", gzipped: bool = False):
  data = bom + text.encode("utf-8")
  path.write_bytes(gzip.compress(data) if gzipped else data)
  return path


def _jsonl(*values) -> str:
  return "".join(json.dumps(v) + "\n" for v in values)


# ----------------------------------------------------------------------------- byte-order mark


@pytest.mark.parametrize("gzipped", [False, True])
def test_jsonl_with_a_bom_reads_like_without(tmp_path, gzipped):
  path = _write(tmp_path / "demos.jsonl", _jsonl(DEMO, DEMO), bom=codecs.BOM_UTF8, gzipped=gzipped)
  got = list(records.read_demonstrations(path))
  assert [(r["prompt"], r["completion"]) for r in got] == [("Say hi.", "hi")] * 2
  assert got[0]["source"] == f"{path}:1"


def test_every_reader_of_user_files_accepts_a_bom(tmp_path):
  bom = codecs.BOM_UTF8
  text = _write(tmp_path / "book.txt", "line one\nline two\n", bom=bom)
  assert [d["text"] for d in records.read_text(text)] == ["line one\nline two\n"]
  prompts = _write(tmp_path / "prompts.txt", "first\nsecond\n", bom=bom)
  assert [p["prompt"] for p in records.read_prompts(prompts)] == ["first", "second"]
  ranked = _write(tmp_path / "rankings.jsonl", _jsonl(RANKING), bom=bom)
  assert rankings.read_rankings(ranked)[0][0]["prompt"] == "Pick one."
  pairs = _write(tmp_path / "pairs.jsonl", _jsonl({"prompt": "p", "chosen": "a", "rejected": "b"}),
                 bom=bom)
  assert [r["responses"] for r in converters.generic(pairs)] == [["a", "b"]]


def test_only_a_leading_bom_is_dropped_and_errors_keep_their_line(tmp_path):
  bad_second_line = codecs.BOM_UTF8 + b"first line\n\xff\n"
  path = tmp_path / "book.txt"
  path.write_bytes(bad_second_line)
  with pytest.raises(InputError, match=r"book\.txt:2: not valid UTF-8"):
    list(records.read_text(path))
  inner = _write(tmp_path / "d.jsonl", _jsonl(DEMO) + "\ufeff" + _jsonl(DEMO))
  with pytest.raises(InputError, match=r"d\.jsonl:2: malformed JSON"):
    list(records.read_demonstrations(inner))


def test_utf16_file_is_refused_with_what_to_do(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_bytes(_jsonl(DEMO).encode("utf-16"))  # Python writes the BOM first
  with pytest.raises(InputError, match=r"d\.jsonl:1: the file is UTF-16.*save it as UTF-8"):
    list(records.read_demonstrations(path))


def test_build_from_a_bom_file(tmp_path):
  path = _write(tmp_path / "demos.jsonl", _jsonl(DEMO, DEMO), bom=codecs.BOM_UTF8)
  sources = builders.build("demonstrations", {"train": path}, tmp_path / "tfds")
  assert sources["train"][0]["prompt"] == b"Say hi."


# ----------------------------------------------------------------------------- no records


def _assert_nothing_built(data_dir):
  # The check runs before TFDS writes anything: no dataset directory, finished or not.
  assert not list(data_dir.glob("*/inputs_*")), list(data_dir.rglob("*"))


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "blank_lines"])
@pytest.mark.parametrize("kind", ["demonstrations", "text"])
def test_jsonl_without_records_is_an_input_error_naming_the_file(tmp_path, kind, content):
  path = _write(tmp_path / "train.jsonl", content)
  with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: has no records"):
    builders.build(kind, {"train": path}, tmp_path / "tfds")
  _assert_nothing_built(tmp_path / "tfds")


def test_empty_validation_file_is_named_too(tmp_path):
  train = _write(tmp_path / "train.jsonl", _jsonl(DEMO, DEMO))
  valid = _write(tmp_path / "valid.jsonl.gz", "", gzipped=True)
  with pytest.raises(InputError, match=rf"^{re.escape(str(valid))}: has no records"):
    builders.build("demonstrations", {"train": train, "validation": valid}, tmp_path / "tfds")
  _assert_nothing_built(tmp_path / "tfds")


def test_empty_whole_text_file_is_an_input_error(tmp_path):
  path = _write(tmp_path / "book.txt", "\n\n")
  with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:1: empty text document"):
    builders.build("text", {"train": path}, tmp_path / "tfds")
  _assert_nothing_built(tmp_path / "tfds")


def test_rankings_file_without_a_valid_ranking(tmp_path):
  empty = _write(tmp_path / "empty.jsonl", "")
  with pytest.raises(InputError, match=rf"^{re.escape(str(empty))}: has no records"):
    rankings_builder.build({"train": empty}, tmp_path / "tfds")
  tied = _write(tmp_path / "tied.jsonl", _jsonl({**RANKING, "ranks": [0, 0]}))
  with pytest.raises(InputError, match=rf"^{re.escape(str(tied))}: has no valid rankings.*on_bad=skip"):
    rankings_builder.build({"train": tied}, tmp_path / "tfds", on_bad="skip")
  _assert_nothing_built(tmp_path / "tfds")


# ----------------------------------------------------------------------------- what a build prints


def test_build_prints_one_line_of_its_own_and_no_download_message(tmp_path, capsys, caplog):
  path = _write(tmp_path / "demos.jsonl", _jsonl(DEMO, DEMO))
  with caplog.at_level(logging.INFO):
    builders.build("demonstrations", {"train": path}, tmp_path / "tfds")
    first = capsys.readouterr()
    builders.build("demonstrations", {"train": path}, tmp_path / "tfds")  # reused, not rebuilt
    again = capsys.readouterr()
  printed = first.out + first.err + again.out + again.err
  assert "Downloading" not in printed and "downloaded" not in printed, printed
  assert f"[data] building demonstrations from {path} (offline)" in first.out
  assert "[data]" not in again.out
  assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()]


def test_rankings_build_prints_no_download_message(tmp_path, capsys):
  path = _write(tmp_path / "r.jsonl", _jsonl(RANKING, RANKING))
  rankings_builder.build({"train": [path, path]}, tmp_path / "tfds")
  out = capsys.readouterr().out
  assert "Downloading" not in out
  assert f"[data] building rankings from {path} and 1 more file (offline)" in out
