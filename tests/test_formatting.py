"""The formatting layer: a prompt and a response become the ids of their joined text, cut on a
token boundary, for every stage and every tokenizer kind."""
import gzip
import itertools
import json
import pathlib

import ml_collections
import numpy as np
import pytest

import tiny

from instructjax.data import converters, pipeline, ranking_batches
from instructjax.data import tokenizers as tk
from instructjax.data.formatting import Format, encode_pair, from_config
from instructjax.data.synthetic import SyntheticTask, TaskConfig
from test_hf_json_tokenizer import tokenizer_json_from_gpt2_files

# A tiny GPT-2-style BPE whose words carry their leading space ("Ġ"), as GPT-2's do.
MERGES = ["Ġ I", "Ġ c", "Ġc a", "Ġca n", "Ġ h", "Ġh e", "l p", "Ġhe lp", "n t", ": Ġ",
          "A s", "As s", "i s", "t a", "n t", "ta nt", "Ass is", "Assis tant", "Assistant :"]
SPACED = Format(separator=" ")
DIALOGUE = [("\n\nHuman: can you help?\n\nAssistant:", "I can help"),
            ("SUBREDDIT: r/x\nTITLE: t\nPOST: p\nTL;DR:", "a short summary."),
            ("", "I can"), ("Assistant:", "\nI can help")]


def _gpt2_files(directory: pathlib.Path) -> tk.Tokenizer:
  return tk.make_tokenizer("gpt2", tiny.write_gpt2_files(directory, MERGES))


@pytest.fixture
def bpe(tmp_path):
  return _gpt2_files(tmp_path / "gpt2")


def test_the_pair_is_the_joined_text_cut_where_the_prompt_ends(bpe):
  prompt, response = DIALOGUE[0]
  pair = encode_pair(bpe, SPACED, prompt, response)
  assert pair.exact and pair.prompt_ids == bpe.encode(prompt)
  assert pair.prompt_ids + pair.response_ids == bpe.encode(prompt + " " + response)
  assert bpe.decode(pair.response_ids) == " I can help"  # the space leads the first word's token
  # What the stages did before: the response encoded apart reads "Assistant:I can help".
  apart = bpe.encode(prompt) + bpe.encode(response)
  assert apart != bpe.encode(prompt + " " + response)
  assert bpe.decode(apart).endswith("Assistant:I can help")


def test_a_merge_across_the_boundary_falls_back_and_is_flagged(bpe):
  pair = encode_pair(bpe, Format(), "Assis", "tant: hi")  # "Assistant:" is one token joined
  assert not pair.exact
  assert pair.prompt_ids == bpe.encode("Assis") and pair.response_ids == bpe.encode("tant: hi")


def _synthetic_records(n=40):
  return SyntheticTask(TaskConfig(remark_rate=0.5)).demonstrations(n)


def test_the_synthetic_default_keeps_its_ids():
  """Byte tokens with no separator: exactly the separate encodings the stages always used."""
  byte = tk.make_tokenizer("byte")
  for record in _synthetic_records():
    pair = encode_pair(byte, Format(), record["prompt"], record["completion"])
    assert pair.exact
    assert pair.prompt_ids == byte.encode(record["prompt"])
    assert pair.response_ids == byte.encode(record["completion"])


def _kinds(tmp_path, shared):
  kinds = {"byte": tk.make_tokenizer("byte"), "gpt2": _gpt2_files(tmp_path / "gpt2")}
  # The same vocabulary and merges as a tokenizer.json (Llama-3 / Qwen's kind of file).
  kinds["hf_json"] = tk.make_tokenizer(
      "hf_json", tokenizer_json_from_gpt2_files(tmp_path / "gpt2", tmp_path / "hf_json"))
  if shared is not None:
    kinds["gpt2 (shared)"] = tk.make_tokenizer("gpt2", shared / "gpt2_tokenizer")
    kinds["sentencepiece"] = tk.make_tokenizer("sentencepiece",
                                               shared / "sentencepiece" / "test_model.model")
  return kinds


@pytest.mark.parametrize("fmt", [Format(), SPACED], ids=["no separator", "space"])
def test_every_kind_trains_on_ids_that_decode_to_the_formatted_text(tmp_path, fmt):
  """Exact pairs are the joined text's own ids; the lossless kinds decode back to that text
  (SentencePiece's test model maps newlines to its unknown piece, as it does in the joined
  text)."""
  shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
  seen = {}
  for name, tokenizer in _kinds(tmp_path, shared if shared.is_dir() else None).items():
    for prompt, response in DIALOGUE:
      pair = encode_pair(tokenizer, fmt, prompt, response)
      ids, joined = pair.prompt_ids + pair.response_ids, fmt.join(prompt, response)
      seen[name, prompt] = pair
      if name == "hf_json":  # tokenizer.json of the same vocabulary: GPT-2's very pairs
        assert pair == seen["gpt2", prompt], (prompt, response)
      assert pair.exact or name != "byte"
      if pair.exact:
        assert ids == tokenizer.encode(joined), (name, prompt, response)
      if name != "sentencepiece":
        assert tokenizer.decode(ids) == joined, (name, prompt, response)


def test_sft_rows_and_ranking_rows_are_the_joined_text_plus_eos(bpe):
  prompt, response = DIALOGUE[0]
  joined = bpe.encode(prompt + " " + response) + [bpe.eos_id]
  [batch] = itertools.islice(pipeline.sft_dataset(
      [{"prompt": prompt, "completion": response}], bpe, seq_len=32, max_prompt_len=24,
      batch_size=1, seed=0, fmt=SPACED), 1)
  n = int(batch["mask"][0].sum())
  assert batch["tokens"][0, :n].tolist() == joined
  assert batch["loss_mask"][0].nonzero()[0].tolist() == list(range(len(bpe.encode(prompt)), n))
  ranking = ranking_batches.tokenize_ranking(
      {"prompt": prompt, "responses": [response, "no"], "ranks": [0, 1]}, bpe, seq_len=32,
      max_prompt_len=24, max_k=2, fmt=SPACED)
  assert ranking["tokens"][0, :int(ranking["mask"][0].sum())].tolist() == joined


def test_sft_counts_its_boundary_cases(bpe):
  stats = pipeline.PipelineStats()
  records = [{"prompt": "Assis", "completion": "tant: hi"}, {"prompt": "x", "completion": "y"}]
  list(pipeline.eval_dataset(records, bpe, kind="sft", seq_len=16, max_prompt_len=8,
                             batch_size=2, stats=stats))
  assert stats.boundary_cases == 1 and stats.examples == 2


def test_a_sampled_response_is_stored_without_the_separator_it_began_with():
  assert SPACED.response_text(" I can") == "I can"
  assert SPACED.response_text("\nI can") == "\nI can"
  assert Format().response_text(" I can") == " I can"


def test_a_config_without_a_format_section_joins_with_nothing():
  assert from_config(ml_collections.ConfigDict({"stage": "sft"})) == Format()
  assert from_config(ml_collections.ConfigDict({"format": {"separator": " "}})) == SPACED


def _hh_pairs(shared: pathlib.Path, limit: int) -> list[tuple[str, str]]:
  out, path = [], shared / "hh_rlhf_harmless_base" / "test.jsonl.gz"
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in itertools.islice(f, limit):
      record = json.loads(line)
      split = converters.split_hh_pair(record["chosen"], record["rejected"])
      if not isinstance(split, str):
        out.append(split[:2])
  return out


def test_gpt2_on_real_hh_dialogues_trains_on_the_documents_own_ids(shared_data):
  """With the separator " " every HH pair's ids are exactly those of its transcript."""
  gpt2 = tk.make_tokenizer("gpt2", shared_data / "gpt2_tokenizer")
  pairs = _hh_pairs(shared_data, 300)
  inexact = [p for p in pairs if not encode_pair(gpt2, SPACED, *p).exact]
  assert len(pairs) > 250 and not inexact, inexact[:3]
  apart = sum(gpt2.encode(p) + gpt2.encode(r) != gpt2.encode(p + " " + r) for p, r in pairs)
  assert apart == len(pairs)  # the old separate encoding was off on every one
  ids = np.concatenate([encode_pair(gpt2, SPACED, *p).response_ids[:1] for p in pairs])
  assert set(gpt2.decode([int(i)])[0] for i in ids) == {" "}


def test_gpt2_on_real_tldr_summaries_trains_on_the_documents_own_ids(shared_data):
  """TL;DR prompts end with `TL;DR:`; with the separator " " every summary's ids are those of
  the document `... TL;DR: <summary>`."""
  gpt2 = tk.make_tokenizer("gpt2", shared_data / "gpt2_tokenizer")
  path = shared_data / "summarize_from_feedback" / "batch13.jsonl.gz"
  pairs = [(r["prompt"], response)
           for r in itertools.islice(converters.summarize_from_feedback(path), 200)
           for response in r["responses"]]
  assert len(pairs) == 400
  assert not [p for p in pairs if not encode_pair(gpt2, SPACED, *p).exact]
  assert all(p.endswith("TL;DR:") for p, _ in pairs)
