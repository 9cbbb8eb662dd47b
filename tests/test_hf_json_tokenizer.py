"""The "hf_json" tokenizer kind: a byte-level BPE tokenizer.json, read by the same BPE code as
GPT-2's vocab.json + merges.txt, reachable from a config."""
import gzip
import json
import pathlib

import pytest

import tiny

from instructjax.data import tokenizers as tk
from instructjax.errors import InputError

# Hand-worked merges over GPT-2's byte alphabet (as in test_tokenizers): "hello world" ->
# "hell" "o" "Ġwor" "l" "d".
TINY_MERGES = ["h e", "l l", "he ll", "ll o", "Ġ w", "o r", "Ġw or", "Ġ t", "h e", "Ġt he"]
TEXTS = ["hello world", "the theme of the world", "", "  x\r\n y  \n\n", "héllo wörld's 1234!",
         "<|endoftext|>", "a<|endoftext|>b <|endoftext|>", "日本語 🙂\t\x00\x7f"]


def _write_gpt2_files(directory: pathlib.Path) -> pathlib.Path:
  """"h e" twice in TINY_MERGES is for tokenizer.json; merges.txt keeps it once."""
  return tiny.write_gpt2_files(directory, TINY_MERGES)


def tokenizer_json_from_gpt2_files(gpt2_dir: pathlib.Path, out_dir: pathlib.Path,
                                   **model_fields) -> pathlib.Path:
  """What Hugging Face ships as GPT-2's tokenizer.json, built from its vocab.json + merges.txt:
  ByteLevel pre-tokenizer and decoder, <|endoftext|> an added special token."""
  out_dir.mkdir(parents=True, exist_ok=True)
  vocab = json.loads((gpt2_dir / "vocab.json").read_text(encoding="utf-8"))
  lines = (gpt2_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
  merges = [line for line in lines[1:] if line]
  byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                "use_regex": True}
  spec = {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [{"id": vocab["<|endoftext|>"], "content": "<|endoftext|>",
                        "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": True, "special": True}],
      "normalizer": None, "pre_tokenizer": byte_level, "post_processor": byte_level,
      "decoder": byte_level,
      "model": {"type": "BPE", "dropout": None, "unk_token": None,
                "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                "byte_fallback": False, "vocab": vocab, "merges": merges, **model_fields}}
  (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
  return out_dir


def _assert_same_tokenizer(gpt2: tk.Tokenizer, hf_json: tk.Tokenizer, texts):
  assert (hf_json.vocab_size, hf_json.eos_id, hf_json.pad_id, hf_json.bos_id) == (
      gpt2.vocab_size, gpt2.eos_id, gpt2.pad_id, gpt2.bos_id)
  for text in texts:
    ids = gpt2.encode(text)
    assert hf_json.encode(text) == ids, text
    assert hf_json.decode(ids) == gpt2.decode(ids) == text
  # Special ids: never produced from text, dropped by decode, in both.
  assert gpt2.eos_id not in hf_json.encode("<|endoftext|>")
  every_id = list(range(gpt2.vocab_size))
  assert hf_json.decode(every_id) == gpt2.decode(every_id)
  assert hf_json.decode([gpt2.eos_id, *gpt2.encode("hi"), gpt2.eos_id]) == "hi"
  assert hf_json.fingerprint == gpt2.fingerprint


def test_tiny_tokenizer_json_encodes_and_decodes_as_the_gpt2_kind(tmp_path):
  gpt2_dir = _write_gpt2_files(tmp_path / "gpt2")
  json_dir = tokenizer_json_from_gpt2_files(gpt2_dir, tmp_path / "json")
  # tokenizer.json lists "h e" twice (rank 0 and 8): the later rank counts, as in `tokenizers`.
  spec = json.loads((json_dir / "tokenizer.json").read_text(encoding="utf-8"))
  spec["model"]["merges"] = TINY_MERGES
  (json_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
  gpt2 = tk.make_tokenizer("gpt2", gpt2_dir)
  hf_json = tk.make_tokenizer("hf_json", json_dir)
  assert isinstance(hf_json, tk.HFJsonTokenizer)
  assert hf_json._bpe("hello") == ("he", "llo")  # "l l", "ll o", then "h e" at rank 8
  spec["model"]["merges"] = list(dict.fromkeys(TINY_MERGES))
  (json_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
  hf_json = tk.make_tokenizer("hf_json", json_dir / "tokenizer.json")  # the file itself works
  assert hf_json._bpe("hello") == gpt2._bpe("hello") == ("hell", "o")
  assert gpt2.encode("hello world") == [258, ord("o"), 262, ord("l"), ord("d")]
  _assert_same_tokenizer(gpt2, hf_json, TEXTS)


def test_tiny_tokenizer_json_matches_the_tokenizers_library(tmp_path):
  tokenizers_lib = pytest.importorskip("tokenizers")
  json_dir = tokenizer_json_from_gpt2_files(_write_gpt2_files(tmp_path / "gpt2"), tmp_path / "j")
  reference = tokenizers_lib.Tokenizer.from_file(str(json_dir / "tokenizer.json"))
  ours = tk.make_tokenizer("hf_json", json_dir)
  for text in TEXTS[:5]:  # no <|endoftext|> text: `tokenizers` would turn it into the special id
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
  # A merge listed twice ranks where it is listed last, in `tokenizers` as here.
  spec = json.loads((json_dir / "tokenizer.json").read_text(encoding="utf-8"))
  spec["model"]["merges"] = TINY_MERGES
  (json_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
  reference = tokenizers_lib.Tokenizer.from_file(str(json_dir / "tokenizer.json"))
  ours = tk.make_tokenizer("hf_json", json_dir)
  assert ours.encode("hello") == reference.encode("hello").ids == [256, 259]


@pytest.fixture
def shared_gpt2(shared_data):
  return shared_data / "gpt2_tokenizer"


def _shared_texts(shared_data: pathlib.Path) -> list[str]:
  with gzip.open(shared_data / "tinyshakespeare" / "input.txt.gz", "rt", encoding="utf-8") as f:
    shakespeare = f.read(20_000)
  with gzip.open(shared_data / "hh_rlhf_harmless_base" / "test.jsonl.gz", "rt",
                 encoding="utf-8") as f:
    dialogues = [json.loads(next(f))["chosen"] for _ in range(20)]
  return [shakespeare, *dialogues, "I'm sure it's 42, isn't it?\n\n  Tabs\there; café ☕ 🤖 ok"]


def test_gpt2_tokenizer_json_encodes_and_decodes_as_the_gpt2_kind(tmp_path, shared_data,
                                                                  shared_gpt2):
  json_dir = tokenizer_json_from_gpt2_files(shared_gpt2, tmp_path / "gpt2_json")
  gpt2 = tk.make_tokenizer("gpt2", shared_gpt2)
  hf_json = tk.make_tokenizer("hf_json", json_dir)
  assert hf_json.encode("Hello world") == [15496, 995]
  assert hf_json.eos_id == hf_json.pad_id == 50256 and hf_json.bos_id is None
  _assert_same_tokenizer(gpt2, hf_json, TEXTS + _shared_texts(shared_data))


def test_gpt2_tokenizer_json_matches_the_tokenizers_library(tmp_path, shared_data, shared_gpt2):
  tokenizers_lib = pytest.importorskip("tokenizers")
  json_dir = tokenizer_json_from_gpt2_files(shared_gpt2, tmp_path / "gpt2_json")
  reference = tokenizers_lib.Tokenizer.from_file(str(json_dir / "tokenizer.json"))
  ours = tk.make_tokenizer("hf_json", json_dir)
  for text in _shared_texts(shared_data):
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------- special and added tokens, normalizer


def _with_added_tokens(json_dir: pathlib.Path, normalizer=None) -> dict:
  """Adds a special <|pad|> and a non-special <tool> (both outside model.vocab), and a
  tokenizer_config.json naming pad / bos; returns their ids."""
  spec = json.loads((json_dir / "tokenizer.json").read_text(encoding="utf-8"))
  n = len(spec["model"]["vocab"])
  extra = {"<|pad|>": (n, True), "<tool>": (n + 1, False), "<|start|>": (n + 2, True)}
  spec["added_tokens"] += [
      dict(id=i, content=content, special=special, single_word=False, lstrip=False,
           rstrip=False, normalized=False) for content, (i, special) in extra.items()]
  spec["normalizer"] = normalizer
  (json_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
  (json_dir / "tokenizer_config.json").write_text(json.dumps(
      {"pad_token": "<|pad|>", "bos_token": {"content": "<|start|>"}}))
  (json_dir / "config.json").write_text(json.dumps({"eos_token_id": [n - 1, 3]}))
  return {content: i for content, (i, _) in extra.items()}


def test_special_ids_and_added_tokens_come_from_the_checkpoint(tmp_path):
  json_dir = tokenizer_json_from_gpt2_files(_write_gpt2_files(tmp_path / "gpt2"), tmp_path / "j")
  ids = _with_added_tokens(json_dir)
  tok = tk.make_tokenizer("hf_json", json_dir)
  eos = ids["<|pad|>"] - 1  # <|endoftext|>, from config.json's eos_token_id list
  assert (tok.eos_id, tok.pad_id, tok.bos_id) == (eos, ids["<|pad|>"], ids["<|start|>"])
  assert tok.vocab_size == ids["<|start|>"] + 1
  # The non-special added token is recognised in text (as `tokenizers` does); special-token
  # text stays ordinary characters, so data cannot inject a special id.
  text = "run<tool>now <|pad|><|start|>"
  encoded = tok.encode(text)
  assert ids["<tool>"] in encoded and not {eos, ids["<|pad|>"], ids["<|start|>"]} & set(encoded)
  assert tok.decode(encoded) == text
  assert tok.decode([ids["<|start|>"], ids["<tool>"], ids["<|pad|>"]]) == "<tool>"
  tokenizers_lib = pytest.importorskip("tokenizers")
  reference = tokenizers_lib.Tokenizer.from_file(str(json_dir / "tokenizer.json"))
  for plain in ("run<tool>now", "<tool><tool> x<tool>", "<tool"):
    assert tok.encode(plain) == reference.encode(plain, add_special_tokens=False).ids


def test_an_nfc_normalizer_is_applied_before_the_split(tmp_path):
  json_dir = tokenizer_json_from_gpt2_files(_write_gpt2_files(tmp_path / "gpt2"), tmp_path / "j")
  _with_added_tokens(json_dir, normalizer={"type": "NFC"})
  tok = tk.make_tokenizer("hf_json", json_dir)
  decomposed = "cafe\u0301 <tool> e\u0301"
  assert tok.decode(tok.encode(decomposed)) == "caf\u00e9 <tool> \u00e9"
  tokenizers_lib = pytest.importorskip("tokenizers")
  reference = tokenizers_lib.Tokenizer.from_file(str(json_dir / "tokenizer.json"))
  assert tok.encode(decomposed) == reference.encode(decomposed, add_special_tokens=False).ids


# ------------------------------------------------------------------------------ from a config


def test_a_config_with_kind_hf_json_gets_a_tokenizer_and_a_model_size(tmp_path):
  from experiments.configs import sft
  from instructjax.trainers import common
  json_dir = tokenizer_json_from_gpt2_files(_write_gpt2_files(tmp_path / "gpt2"), tmp_path / "j")
  config = sft.get_config("tiny")
  config.tokenizer.kind, config.tokenizer.path = "hf_json", str(json_dir)
  tok = common.tokenizer_from_config(config)
  assert isinstance(tok, tk.HFJsonTokenizer) and tok.encode("hello") == [258, ord("o")]
  assert common.model_config(config, tok).vocab_size == 384  # 266 padded to a multiple of 128


def test_a_checkpoint_with_only_tokenizer_json_converts_and_its_section_loads(tmp_path):
  """`experiments.convert --from_hf` on a Llama-3 / Qwen-style directory writes kind hf_json;
  the config section it writes builds the tokenizer."""
  import jax
  import numpy as np
  from flax import nnx

  from experiments import convert
  from instructjax.models import hf
  from instructjax.models.config import ModelConfig
  tokenizer_json_from_gpt2_files(_write_gpt2_files(tmp_path / "gpt2"), tmp_path / "hf")
  cfg = ModelConfig(flavour="gpt2", vocab_size=266, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                    max_len=64)
  _, abstract = hf.abstract_params(cfg)
  params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), nnx.to_pure_dict(abstract))
  hf.export_hf(params, cfg, tmp_path / "hf")
  assert not (tmp_path / "hf" / "vocab.json").exists()
  assert convert.main(["--from_hf", str(tmp_path / "hf"), "--to", str(tmp_path / "init")]) == 0
  section = json.loads((tmp_path / "init" / "config.json").read_text())["tokenizer"]
  assert section == {"kind": "hf_json", "path": str(tmp_path / "hf")}
  tok = tk.make_tokenizer(section["kind"], section["path"])
  assert tok.decode(tok.encode("hello world")) == "hello world" and tok.vocab_size == 266


# ------------------------------------------------------------------------------ refusals


def _broken(tmp_path: pathlib.Path, edit) -> pathlib.Path:
  json_dir = tokenizer_json_from_gpt2_files(_write_gpt2_files(tmp_path / "gpt2"), tmp_path / "j")
  spec = json.loads((json_dir / "tokenizer.json").read_text(encoding="utf-8"))
  edit(spec)
  (json_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
  return json_dir


def _set(path: str, value):
  def edit(spec):
    *parents, last = path.split(".")
    for key in parents:
      spec = spec[key]
    if value is KeyError:
      del spec[last]
    else:
      spec[last] = value
  return edit


@pytest.mark.parametrize("edit, message", [
    (_set("model.vocab", KeyError), r"model\.vocab: is missing"),
    (_set("model.type", "Unigram"), r"model\.type: 'Unigram' is not supported \(only byte-level BPE"),
    (_set("model", KeyError), r"has no 'model' object"),
    (_set("model.vocab", {"a": 0}), r"model\.vocab: lacks 255 of the 256 byte tokens"),
    (_set("model.merges", ["h e", "wor ld"]),
     r"model\.merges\[1\]: merge 'wor ld' uses token 'wor', which is not in model\.vocab"),
    (_set("model.merges", ["h e f"]), r"model\.merges\[0\]: expected a pair of tokens"),
    (_set("model.byte_fallback", True), r"model\.byte_fallback: True is not supported"),
    (_set("normalizer", {"type": "Lowercase"}), r"normalizer: 'Lowercase' is not supported"),
    (_set("pre_tokenizer", {"type": "Metaspace"}), r"pre_tokenizer: only ByteLevel"),
    (_set("pre_tokenizer", None), r"pre_tokenizer: only ByteLevel"),
    (_set("added_tokens", [{"id": 3, "content": "<|endoftext|>", "special": True}]),
     r"added_tokens\[0\]: '<\|endoftext\|>' has id 3 but model\.vocab gives it"),
    (_set("added_tokens", [{"id": 999, "content": "<x>", "special": False, "lstrip": True}]),
     r"added_tokens\[0\]: non-special added token '<x>' sets lstrip"),
])
def test_a_bad_tokenizer_json_names_the_file_and_what_is_wrong(tmp_path, edit, message):
  json_dir = _broken(tmp_path, edit)
  with pytest.raises(InputError, match=message) as raised:
    tk.make_tokenizer("hf_json", json_dir)
  assert str(json_dir / "tokenizer.json") in str(raised.value)


def test_missing_or_unreadable_tokenizer_json(tmp_path):
  with pytest.raises(InputError, match="has no tokenizer.json"):
    tk.make_tokenizer("hf_json", tmp_path)
  with pytest.raises(InputError, match="needs a path"):
    tk.make_tokenizer("hf_json", "")
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(InputError, match=r"tokenizer\.json: is not valid JSON"):
    tk.make_tokenizer("hf_json", tmp_path)
  (tmp_path / "tokenizer.json").write_text("[]")
  with pytest.raises(InputError, match=r"tokenizer\.json: must be a JSON object"):
    tk.make_tokenizer("hf_json", tmp_path)


def test_a_tokenizer_json_without_any_eos_is_refused(tmp_path):
  def no_end_of_text(spec):
    vocab = spec["model"]["vocab"]
    vocab["<|end|>"] = vocab.pop("<|endoftext|>")
    spec["added_tokens"] = []
  json_dir = _broken(tmp_path, no_end_of_text)
  with pytest.raises(InputError, match="names no eos token"):
    tk.make_tokenizer("hf_json", json_dir)
  (json_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
  with pytest.raises(InputError, match=r"tokenizer_config\.json: eos_token '<\|nope\|>' is not"):
    tk.make_tokenizer("hf_json", json_dir)
  (json_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
  assert tk.make_tokenizer("hf_json", json_dir).eos_id == 265


def test_special_tokens_in_text_read_a_chat_templates_markers_as_their_ids(tmp_path):
  """Off by default (dataset text cannot inject them); with special_tokens_in_text, as for
  records a chat template rendered, the markers are the checkpoint's own ids, and the
  fingerprint tells the two readings apart."""
  from instructjax.data.formatting import Format, encode_pair
  json_dir = tokenizer_json_from_gpt2_files(_write_gpt2_files(tmp_path / "gpt2"), tmp_path / "j")
  ids = _with_added_tokens(json_dir)
  plain = tk.make_tokenizer("hf_json", json_dir)
  chat = tk.make_tokenizer("hf_json", json_dir, special_tokens_in_text=True)
  prompt, response = "<|start|>user\nhello<|pad|>\n<|start|>assistant\n", "the world<|pad|>"
  assert ids["<|start|>"] not in plain.encode(prompt)
  encoded = chat.encode(prompt + response)
  assert encoded.count(ids["<|start|>"]) == 2 and encoded.count(ids["<|pad|>"]) == 2
  assert chat.fingerprint != plain.fingerprint
  pair = encode_pair(chat, Format(), prompt, response)
  assert pair.exact and pair.prompt_ids + pair.response_ids == encoded
  with pytest.raises(InputError, match="special_tokens_in_text"):
    tk.make_tokenizer("byte", special_tokens_in_text=True)
