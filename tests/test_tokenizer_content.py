"""Tokenizers are compared by content (`Tokenizer.fingerprint`), not by the path of their files."""
import json
import shutil

import pytest

from instructjax.data import tokenizers as tk
from instructjax.errors import InputError

from test_hf_json_tokenizer import _write_gpt2_files, tokenizer_json_from_gpt2_files


@pytest.fixture
def gpt2_copies(tmp_path):
  """The same GPT-2 files in two directories, and a third copy with one merges line changed."""
  first = _write_gpt2_files(tmp_path / "a")
  second = tmp_path / "b"
  shutil.copytree(first, second)
  changed = tmp_path / "changed"
  shutil.copytree(first, changed)
  merges = (changed / "merges.txt").read_text(encoding="utf-8")
  (changed / "merges.txt").write_text(merges.replace("\nl l\nhe ll\n", "\nhe ll\nl l\n"),
                                      encoding="utf-8")
  assert (changed / "merges.txt").read_text(encoding="utf-8") != merges
  return first, second, changed


def test_fingerprint_is_the_content_not_the_path(gpt2_copies, tmp_path):
  first, second, changed = gpt2_copies
  a, b, c = (tk.make_tokenizer("gpt2", d) for d in gpt2_copies)
  assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
  assert c.fingerprint != a.fingerprint
  # The same vocabulary read from tokenizer.json is the same tokenizer.
  as_json = tk.make_tokenizer("hf_json", tokenizer_json_from_gpt2_files(first, tmp_path / "j"))
  assert as_json.fingerprint == a.fingerprint
  # Re-serialising vocab.json (other key order and spacing) changes no id, nor the fingerprint.
  vocab = json.loads((second / "vocab.json").read_text(encoding="utf-8"))
  (second / "vocab.json").write_text(json.dumps(dict(reversed(vocab.items())), indent=2),
                                     encoding="utf-8")
  assert tk.make_tokenizer("gpt2", second).fingerprint == a.fingerprint
  assert tk.ByteTokenizer().fingerprint == tk.make_tokenizer().fingerprint != a.fingerprint


def test_difference_accepts_copies_and_refuses_a_changed_merge(gpt2_copies):
  first, second, changed = gpt2_copies
  mine = {"kind": "gpt2", "path": str(first)}
  tokenizer = tk.make_tokenizer(**mine)
  assert tk.difference(tokenizer, mine, dict(mine)) is None
  assert tk.difference(tokenizer, mine, {"kind": "gpt2", "path": str(second)}) is None
  why = tk.difference(tokenizer, mine, {"kind": "gpt2", "path": str(changed)})
  assert why.startswith("their contents differ (fingerprint ")
  why = tk.difference(tokenizer, mine, {"kind": "gpt2", "path": str(first.parent / "gone")})
  assert "cannot be read" in why and "gone: does not exist" in why
  assert tk.difference(tokenizer, mine, {"kind": "byte", "path": ""}) is not None
  assert tk.difference(tk.ByteTokenizer(), {"kind": "byte", "path": ""},
                       {"kind": "byte", "path": None}) is None


def test_sentencepiece_fingerprint_is_its_model(tmp_path, shared_data):
  model = shared_data / "sentencepiece" / "test_model.model"
  copy = tmp_path / "copy.model"
  shutil.copyfile(model, copy)
  original = tk.make_tokenizer("sentencepiece", model)
  assert tk.make_tokenizer("sentencepiece", copy).fingerprint == original.fingerprint


def _trained_workdir(tmp_path, tokenizer_dir):
  """A stage's workdir as far as evaluation reads it: config.json with its tokenizer section."""
  from experiments.configs import sft
  config = sft.get_config("tiny")
  config.tokenizer.kind, config.tokenizer.path = "gpt2", str(tokenizer_dir)
  workdir = tmp_path / "sft_run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))
  return str(workdir)


def test_evaluation_accepts_the_same_tokenizer_elsewhere_and_names_both_otherwise(
    gpt2_copies, tmp_path):
  from experiments.configs import evaluate as evaluate_config
  from instructjax.trainers import evaluate
  first, second, changed = gpt2_copies
  workdir = _trained_workdir(tmp_path, first)
  config = evaluate_config.get_config("tiny")
  for directory in (first, second):
    config.tokenizer.kind, config.tokenizer.path = "gpt2", str(directory)
    tokenizer = tk.make_tokenizer("gpt2", directory)
    assert evaluate.model_config_of("sft", workdir, config, tokenizer).vocab_size == 384
  config.tokenizer.path = str(changed)
  with pytest.raises(InputError, match="contents differ") as raised:
    evaluate.model_config_of("sft", workdir, config, tk.make_tokenizer("gpt2", changed))
  message = str(raised.value)
  assert message.startswith("config.models.sft: ")
  assert str(first) in message and str(changed) in message
