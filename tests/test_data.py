"""Tests of record files, the TFDS builders and the grain pipelines (SFT and pretraining)."""
import gzip
import json
import logging
import os

import numpy as np
import pytest

from instructjax.data import builders, pipeline, records
from instructjax.data.builders import text_corpus
from instructjax.data.tokenizers import ByteTokenizer
from instructjax.errors import InputError

PAD, EOS = ByteTokenizer.pad_id, ByteTokenizer.eos_id


@pytest.fixture
def tok():
  return ByteTokenizer()


def _write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def _ids(text):
  return list(text.encode("utf-8"))


# ----------------------------------------------------------------------------- records


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "a", "completion": ', "malformed JSON"),
    ('["prompt", "completion"]', "expected a JSON object, got list"),
    ('{"prompt": "a"}', "missing field 'completion'"),
    ('{"prompt": 3, "completion": "b"}', "field 'prompt' must be a string, got int"),
    ('{"prompt": "a", "completion": " \\n\\t"}', "empty completion"),
])
def test_bad_demonstration_names_file_and_line(tmp_path, line, problem):
  path = _write_lines(tmp_path / "demos.jsonl",
                      ['{"prompt": "ok", "completion": "fine"}', "", line])
  with pytest.raises(InputError) as info:
    list(records.read_demonstrations(path))
  assert info.value.where == f"{path}:3"  # The blank line 2 is passed over but counted.
  assert problem in info.value.problem


def test_bad_text_records_name_file_and_line(tmp_path):
  jsonl = _write_lines(tmp_path / "docs.jsonl", ['{"text": "a document"}', '{"text": "   "}'])
  with pytest.raises(InputError, match=r"docs\.jsonl:2: empty text document"):
    list(records.read_text(jsonl))
  empty_txt = tmp_path / "empty.txt"
  empty_txt.write_text("\n\n")
  with pytest.raises(InputError, match=r"empty\.txt:1: empty text document"):
    list(records.read_text(empty_txt))
  not_utf8 = tmp_path / "latin1.jsonl"
  not_utf8.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(InputError, match=r"latin1\.jsonl:2: not valid UTF-8"):
    list(records.read_text(not_utf8))
  with pytest.raises(InputError, match="no such file"):
    list(records.read_text(tmp_path / "missing.jsonl"))


def test_records_read_back_with_source_extra_keys_ignored(tmp_path):
  path = _write_lines(tmp_path / "d.jsonl", [
      '{"prompt": "", "completion": "hi", "id": 7}', '{"prompt": "é?", "completion": "ü"}'])
  assert list(records.read_demonstrations(path)) == [
      {"prompt": "", "completion": "hi", "source": f"{path}:1"},
      {"prompt": "é?", "completion": "ü", "source": f"{path}:2"}]


def test_write_jsonl_gzip_round_trip_and_keeps_identical_files(tmp_path):
  rows = [{"text": "ünïcode"}, {"text": "two\nlines"}]
  path = tmp_path / "sub" / "docs.jsonl.gz"
  assert records.write_jsonl(path, rows) == 2
  assert gzip.decompress(path.read_bytes()).decode().count("\n") == 2
  assert [r["text"] for r in records.read_text(path)] == ["ünïcode", "two\nlines"]
  os.utime(path, ns=(1, 1))
  records.write_jsonl(path, rows)  # Same bytes: the file (and its mtime) is kept.
  assert os.stat(path).st_mtime_ns == 1
  records.write_jsonl(path, rows[:1])
  assert os.stat(path).st_mtime_ns != 1
  assert not list(tmp_path.glob("sub/*.tmp"))


def test_whole_text_file_is_one_document(tmp_path):
  path = tmp_path / "book.txt.gz"
  path.write_bytes(gzip.compress("line one\nline two\n".encode()))
  assert list(records.read_text(path)) == [{"text": "line one\nline two\n", "source": f"{path}:1"}]


# ----------------------------------------------------------------------------- builders


def _demos(n):
  return [{"prompt": f"prompt {i}", "completion": f"answer {i}"} for i in range(n)]


def test_builder_round_trip_and_rebuild_is_skipped(tmp_path, monkeypatch):
  train = tmp_path / "train.jsonl"
  valid = tmp_path / "valid.jsonl"
  records.write_jsonl(train, _demos(5))
  records.write_jsonl(valid, _demos(2))
  data_dir = tmp_path / "tfds"
  sources = builders.build("demonstrations", {"train": str(train), "validation": [valid]}, data_dir)
  assert {split: len(s) for split, s in sources.items()} == {"train": 5, "validation": 2}
  assert sources["train"][3] == {"prompt": b"prompt 3", "completion": b"answer 3",
                                 "source": f"{train}:4".encode()}
  assert sources["validation"][1]["source"] == f"{valid}:2".encode()

  def no_rebuild(*args, **kwargs):
    raise AssertionError("rebuilt although the inputs did not change")

  monkeypatch.setattr(builders.Demonstrations, "_generate_examples", no_rebuild)
  again = builders.build("demonstrations", {"train": [train], "validation": valid}, data_dir)
  assert [again["train"][i] for i in range(5)] == [sources["train"][i] for i in range(5)]
  records.write_jsonl(train, _demos(6))  # A changed input is a new config: built afresh.
  with pytest.raises(AssertionError, match="rebuilt"):
    builders.build("demonstrations", {"train": train, "validation": valid}, data_dir)


def test_builder_derives_disjoint_validation_split(tmp_path):
  path = tmp_path / "d.jsonl"
  records.write_jsonl(path, _demos(45))
  sources = builders.build("demonstrations", {"train": path}, tmp_path / "tfds")
  train = [sources["train"][i]["prompt"] for i in range(len(sources["train"]))]
  valid = [sources["validation"][i]["prompt"] for i in range(len(sources["validation"]))]
  assert len(valid) == 2 and not set(train) & set(valid)
  assert sorted(train + valid) == sorted(d["prompt"].encode() for d in _demos(45))
  for n in (1, 2, 19, 20, 45, 1000):
    assert sum(builders.is_held_out(i, n) for i in range(n)) == builders.num_held_out(n)


def test_builder_reports_bad_record_by_file_and_line(tmp_path):
  path = _write_lines(tmp_path / "d.jsonl", ['{"prompt": "a", "completion": "b"}',
                                             '{"prompt": "a", "completion": ""}'])
  with pytest.raises(InputError, match=r"d\.jsonl:2: empty completion"):
    builders.build("demonstrations", {"train": path}, tmp_path / "tfds")
  with pytest.raises(InputError, match="no such file"):
    builders.build("text", {"train": tmp_path / "nope.txt"}, tmp_path / "tfds")
  with pytest.raises(InputError, match="unknown record kind"):
    builders.build("pairs", {"train": path}, tmp_path / "tfds")


def test_single_document_is_cut_into_train_and_validation(tmp_path):
  text = "".join(f"line {i}\n" for i in range(100))
  path = tmp_path / "book.txt"
  path.write_text(text)
  sources = builders.build("text", {"train": path}, tmp_path / "tfds")
  head, tail = sources["train"][0], sources["validation"][0]
  assert (head["text"] + tail["text"]).decode() == text
  assert tail["text"].startswith(b"line 95\n")
  assert tail["source"] == f"{path}:96".encode()
  assert text_corpus.split_document("x" * 10) is not None
  assert text_corpus.split_document("just one line") is not None
  assert text_corpus.split_document("text\n" + " " * 3) is None


def test_builds_real_tinyshakespeare(shared_data, tmp_path, tok):
  path = shared_data / "tinyshakespeare" / "input.txt.gz"
  if not path.is_file():
    pytest.skip("tinyshakespeare is absent")
  sources = builders.build("text", {"train": path}, tmp_path / "tfds")
  head, tail = sources["train"][0]["text"], sources["validation"][0]["text"]
  assert head.startswith(b"First Citizen:") and len(tail) > 0.04 * (len(head) + len(tail))
  batch = next(iter(pipeline.pretrain_dataset(sources["train"], tok, seq_len=64, batch_size=2,
                                              seed=0, shuffle=False)))
  assert bytes(batch["tokens"][0].astype(np.uint8)) == head[:64]


# ----------------------------------------------------------------------------- SFT rows


def _row(example):
  assert example.problem is None, example.problem
  return [example.row[k].tolist() for k in ("tokens", "mask", "loss_mask")]


def test_sft_row_layout_exact():
  make = lambda p, c, **kw: pipeline.sft_example(p, c, source="s", eos_id=EOS, pad_id=PAD, **kw)
  # Fits: prompt, completion, EOS, then padding; the loss covers completion + EOS.
  assert _row(make([1, 2], [3, 4], seq_len=8, max_prompt_len=4)) == [
      [1, 2, 3, 4, EOS, PAD, PAD, PAD], [1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]
  # Exactly fills the row.
  assert _row(make([1, 2], [3, 4, 5], seq_len=6, max_prompt_len=4)) == [
      [1, 2, 3, 4, 5, EOS], [1] * 6, [0, 0, 1, 1, 1, 1]]
  # Long prompt keeps its last max_prompt_len tokens.
  example = make([1, 2, 3, 4, 5, 6], [7], seq_len=6, max_prompt_len=3)
  assert example.truncated and _row(example) == [
      [4, 5, 6, 7, EOS, PAD], [1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]]
  # Long completion is cut to the row and loses its EOS.
  example = make([1, 2], [3, 4, 5, 6, 7, 8], seq_len=6, max_prompt_len=4)
  assert example.truncated and _row(example) == [[1, 2, 3, 4, 5, 6], [1] * 6, [0, 0, 1, 1, 1, 1]]
  # Both at once; the EOS alone is cut.
  assert _row(make([9, 1, 2], [3, 4, 5], seq_len=5, max_prompt_len=2)) == [
      [1, 2, 3, 4, 5], [1] * 5, [0, 0, 1, 1, 1]]
  # Empty prompt: the completion starts the row.
  assert _row(make([], [3], seq_len=3, max_prompt_len=2)) == [[3, EOS, PAD], [1, 1, 0], [1, 1, 0]]


def test_sft_too_long_error_and_skip_say_why():
  make = lambda p, c, mode: pipeline.sft_example(p, c, source="f.jsonl:4", eos_id=EOS, pad_id=PAD,
                                                 seq_len=6, max_prompt_len=3, too_long=mode)
  for mode in ("error", "skip"):
    assert make([1, 2, 3, 4], [5], mode).problem == "prompt has 4 tokens > max_prompt_len=3"
    assert (make([1, 2], [3, 4, 5, 6], mode).problem
            == "prompt+completion needs 7 tokens > seq_len=6")
    assert make([1, 2], [3, 4, 5], mode).row is not None
  with pytest.raises(InputError, match="f.jsonl:4: completion has no tokens"):
    make([1], [], "truncate")


def _reference_sft_row(prompt, completion, seq_len, max_prompt_len):
  """Slow, obvious version of the truncate policy, position by position."""
  prompt = prompt[-max_prompt_len:] if max_prompt_len else []
  kinds = ["prompt"] * len(prompt) + ["target"] * (len(completion) + 1)
  ids = prompt + completion + [EOS]
  tokens, mask, loss = [], [], []
  for t in range(seq_len):
    if t < len(ids):
      tokens.append(ids[t]); mask.append(1); loss.append(1.0 if kinds[t] == "target" else 0.0)
    else:
      tokens.append(PAD); mask.append(0); loss.append(0.0)
  return [tokens, mask, loss]


def test_sft_rows_match_reference_on_random_lengths():
  rng = np.random.default_rng(0)
  for _ in range(300):
    seq_len = int(rng.integers(2, 12))
    max_prompt_len = int(rng.integers(0, seq_len))
    prompt = rng.integers(0, 256, rng.integers(0, 15)).tolist()
    completion = rng.integers(0, 256, rng.integers(1, 15)).tolist()
    example = pipeline.sft_example(prompt, completion, source="s", seq_len=seq_len,
                                   max_prompt_len=max_prompt_len, eos_id=EOS, pad_id=PAD)
    assert _row(example) == _reference_sft_row(prompt, completion, seq_len, max_prompt_len)


# ----------------------------------------------------------------------------- pipelines


def _sft(source, tok, **kwargs):
  defaults = dict(seq_len=16, max_prompt_len=8, batch_size=2, seed=0)
  return pipeline.sft_dataset(source, tok, **{**defaults, **kwargs})


def _prompts(batches, width=3):
  """The numbered prompts ("007") at the start of each real row."""
  return [bytes(row[:width].astype(np.uint8)).decode()
          for b in batches for row, m in zip(b["tokens"], b["mask"]) if m.any()]


def _numbered(n):
  return [{"prompt": f"{i:03d}", "completion": "x" * (1 + i % 4)} for i in range(n)]


def test_sft_batches_have_fixed_shapes_and_dtypes(tok):
  batch = next(iter(_sft(_numbered(10), tok, batch_size=4)))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "tokens": ((4, 16), np.int32), "mask": ((4, 16), np.int32),
      "loss_mask": ((4, 16), np.float32)}


def test_sft_error_mode_names_the_record(tmp_path, tok):
  path = tmp_path / "d.jsonl"
  records.write_jsonl(path, [{"prompt": "short", "completion": "ok"},
                             {"prompt": "a much too long prompt", "completion": "ok"}])
  source = builders.build("demonstrations", {"train": path, "validation": path}, tmp_path / "t")
  with pytest.raises(InputError, match=rf"d\.jsonl:2: prompt has 22 tokens > max_prompt_len=8"):
    list(_sft(source["train"], tok, batch_size=1, repeat=False, shuffle=False, too_long="error"))


def test_sft_skip_mode_counts_and_logs(tok, caplog):
  source = _numbered(6) + [{"prompt": "p" * 12, "completion": "c", "source": "x.jsonl:7"}]
  stats = pipeline.PipelineStats()
  with caplog.at_level(logging.WARNING, logger="instructjax.data.pipeline"):
    batches = list(_sft(source, tok, batch_size=1, repeat=False, too_long="skip", stats=stats))
  assert sorted(_prompts(batches)) == [f"{i:03d}" for i in range(6)]
  assert (stats.skipped, stats.examples, stats.last_skipped) == (1, 6, "x.jsonl:7")
  assert "x.jsonl:7" in caplog.text and "max_prompt_len=8" in caplog.text
  all_long = [{"prompt": "p" * 12, "completion": "c"}] * 3
  with pytest.raises(InputError, match="all 3 records of this process are too long"):
    next(iter(_sft(all_long, tok, too_long="skip")))


def test_bad_arguments_raise_input_error(tok):
  with pytest.raises(InputError, match="max_prompt_len"):
    _sft(_numbered(4), tok, seq_len=8, max_prompt_len=8)
  with pytest.raises(InputError, match="too_long"):
    _sft(_numbered(4), tok, too_long="drop")
  with pytest.raises(InputError, match="process 2.*gets no records"):
    _sft(_numbered(2), tok, process_index=2, process_count=3)
  with pytest.raises(InputError, match="record 1: missing field 'completion'"):
    list(_sft([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], tok, batch_size=1,
              shuffle=False, repeat=False))


def test_process_slices_are_disjoint_and_cover(tok):
  n, count = 23, 3
  per_process = [_prompts(_sft(_numbered(n), tok, batch_size=1, repeat=False, seed=5,
                               process_index=p, process_count=count)) for p in range(count)]
  flat = [p for ps in per_process for p in ps]
  assert sorted(flat) == [f"{i:03d}" for i in range(n)]  # Disjoint (no duplicate) and whole.
  assert [len(ps) for ps in per_process] == [8, 8, 7]


def test_determinism_and_reshuffle_per_epoch(tok):
  take = lambda ds, k: _prompts(b for _, b in zip(range(k), iter(ds)))
  first = take(_sft(_numbered(10), tok, seed=1), 10)
  assert first == take(_sft(_numbered(10), tok, seed=1), 10)
  assert first != take(_sft(_numbered(10), tok, seed=2), 10)
  epoch0, epoch1 = first[:10], first[10:]
  assert sorted(epoch0) == sorted(epoch1) == [f"{i:03d}" for i in range(10)]
  assert epoch0 != epoch1
  unshuffled = take(_sft(_numbered(10), tok, shuffle=False, repeat=False), 5)
  assert unshuffled == [f"{i:03d}" for i in range(10)]


def _assert_resumes(ds):
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(3)]):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_sft_iterator_state_resumes_exactly(tok):
  _assert_resumes(_sft(_numbered(7), tok, batch_size=2, seed=3, process_index=1, process_count=2))


def test_pretrain_iterator_state_resumes_exactly(tok):
  docs = [{"text": f"document {i} " * (i % 3 + 1)} for i in range(6)]
  _assert_resumes(pipeline.pretrain_dataset(docs, tok, seq_len=7, batch_size=2, seed=3))


def _real_tokens(batches):
  return [int(t) for b in batches for row, m in zip(b["tokens"], b["mask"]) for t in row[m == 1]]


def test_packing_conserves_every_token_in_order(tok):
  docs = [{"text": "a" * n} for n in (1, 9, 3, 14, 2)]
  stream = [t for d in docs for t in [*_ids(d["text"]), EOS]]  # 34 tokens.
  stats = pipeline.PipelineStats()
  batches = list(pipeline.pretrain_dataset(docs, tok, seq_len=5, batch_size=1, seed=0,
                                           shuffle=False, repeat=False, stats=stats))
  assert _real_tokens(batches) == stream and stats.examples == 5
  assert [int(b["mask"].sum()) for b in batches] == [5] * 6 + [4]
  assert batches[-1]["tokens"][0, -1] == PAD
  for b in batches:
    np.testing.assert_array_equal(b["loss_mask"], b["mask"].astype(np.float32))
  eval_batches = list(pipeline.eval_dataset(docs, tok, kind="pretrain", seq_len=5, batch_size=3))
  assert _real_tokens(eval_batches) == stream and len(eval_batches) == 3


def test_eval_sft_covers_everything_with_equal_batch_counts(tok):
  source = _numbered(11) + [{"prompt": "p" * 12, "completion": "c"}]
  per_process, stats = [], pipeline.PipelineStats()
  for p in range(3):
    batches = list(pipeline.eval_dataset(source, tok, kind="sft", seq_len=16, max_prompt_len=8,
                                         batch_size=3, process_index=p, process_count=3,
                                         too_long="skip", stats=stats))
    assert len(batches) == 2 and all(b["tokens"].shape == (3, 16) for b in batches)
    per_process.append(_prompts(batches))
  assert sorted(p for ps in per_process for p in ps) == [f"{i:03d}" for i in range(11)]
  assert per_process[0] == ["000", "003", "006", "009"]  # In order, no shuffle.
  assert stats.skipped == 1


def test_eval_pretrain_rows_dealt_to_processes(tok):
  docs = [{"text": "b" * n} for n in (6, 2, 11)]
  stream = [t for d in docs for t in [*_ids(d["text"]), EOS]]  # 22 tokens: 5 rows of 5.
  per_process = [list(pipeline.eval_dataset(docs, tok, kind="pretrain", seq_len=5, batch_size=2,
                                            process_index=p, process_count=2)) for p in range(2)]
  assert [len(b) for b in per_process] == [2, 2]
  rows = [[r for b in bs for r, m in zip(b["tokens"], b["mask"]) if m.any()] for bs in per_process]
  interleaved = [rows[i % 2][i // 2] for i in range(5)]
  real = [int(t) for r in interleaved for t in r if t != PAD]
  assert real == stream
  assert not per_process[1][-1]["mask"].any()  # Process 1's padding batch.
