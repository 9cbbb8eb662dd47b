"""Tests for instructjax.data.tokenizers: byte, GPT-2 BPE and SentencePiece tokenizers."""
import io
import json
import pathlib

import numpy as np
import pytest

from instructjax.data import tokenizers as tk
from instructjax.errors import InputError

ROUND_TRIP_TEXTS = [
    "",
    "plain ascii, with punctuation!",
    "unicode: café naïve Ελληνικά 日本語",
    "emoji: 🤖🎉👩‍👩‍👧 and a flag 🇫🇷",
    "  whitespace\truns\n\n\n and trailing   ",
]


# ---------------------------------------------------------------------------- ByteTokenizer


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_byte_round_trip(text):
  tok = tk.ByteTokenizer()
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8"))
  assert all(0 <= i < 256 for i in ids)
  assert tok.decode(ids) == text


def test_byte_specials():
  tok = tk.ByteTokenizer()
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (256, 257, 258, 259)
  assert tok.encode("") == []


def test_byte_decode_drops_specials_and_accepts_numpy_ids():
  tok = tk.ByteTokenizer()
  ids = [tok.bos_id] + tok.encode("hi é") + [tok.eos_id, tok.pad_id, tok.pad_id]
  assert tok.decode(ids) == "hi é"
  assert tok.decode(np.asarray(ids, dtype=np.int32)) == "hi é"


def test_byte_decode_of_invalid_utf8_replaces_instead_of_raising():
  tok = tk.ByteTokenizer()
  assert tok.decode([0xFF, ord("a"), 0xC3]) == "\ufffda\ufffd"
  # Every in-vocab id decodes without error.
  tok.decode(list(range(tok.vocab_size)))


@pytest.mark.parametrize("bad_id", [-1, 259, 10**6])
def test_decode_rejects_out_of_vocab_ids(bad_id):
  with pytest.raises(InputError, match=f"id {bad_id} is outside"):
    tk.ByteTokenizer().decode([65, bad_id])


def test_encode_rejects_non_text():
  with pytest.raises(InputError, match="expected text as str, got bytes"):
    tk.ByteTokenizer().encode(b"bytes")


def test_encode_batch_matches_encode():
  tok = tk.ByteTokenizer()
  assert tok.encode_batch(["ab", "", "ç"]) == [[97, 98], [], [0xC3, 0xA7]]


# ---------------------------------------------------------------------------- GPT-2 fixtures


def _reference_bytes_to_unicode():
  """openai/gpt-2 encoder.py's table, written out again as the slow reference."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(2**8):
    if b not in bs:
      bs.append(b)
      cs.append(2**8 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def test_bytes_to_unicode_table():
  table = tk.bytes_to_unicode()
  assert table == _reference_bytes_to_unicode()
  assert len(set(table.values())) == 256
  assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


# Hand-worked merges, ranked by line: "h e" < "l l" < "he ll" < "ll o" < "Ġ w" < "o r" < "Ġw or".
TINY_MERGES = ["h e", "l l", "he ll", "ll o", "Ġ w", "o r", "Ġw or"]
TINY_MERGED = {"he": 256, "ll": 257, "hell": 258, "llo": 259, "Ġw": 260, "or": 261, "Ġwor": 262}
TINY_EOS = 263


def _write_tiny_gpt2(directory: pathlib.Path, merges=TINY_MERGES) -> pathlib.Path:
  """Writes vocab.json/merges.txt in the real format: byte tokens get ids = byte values."""
  directory.mkdir(parents=True, exist_ok=True)
  vocab = {char: byte for byte, char in _reference_bytes_to_unicode().items()}
  vocab.update(TINY_MERGED)
  vocab["<|endoftext|>"] = TINY_EOS
  (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (directory / "merges.txt").write_text(
      "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
  return directory


@pytest.fixture
def tiny_gpt2(tmp_path):
  return tk.GPT2Tokenizer.from_dir(_write_tiny_gpt2(tmp_path / "gpt2"))


def test_gpt2_pretokenisation():
  assert tk._split_words("I'm  here\n\n") == ["I", "'m", " ", " here", "\n\n"]
  assert tk._split_words("don't 12345 ok!! x") == ["don", "'t", " 12345", " ok", "!!", " x"]


def test_gpt2_tiny_specials(tiny_gpt2):
  assert tiny_gpt2.vocab_size == TINY_EOS + 1
  assert tiny_gpt2.eos_id == tiny_gpt2.pad_id == TINY_EOS
  assert tiny_gpt2.bos_id is None


def test_gpt2_bpe_hand_worked(tiny_gpt2):
  # hello: h e l l o -> he l l o -> he ll o -> hell o ("he ll" outranks "ll o"); then no rank.
  assert tiny_gpt2._bpe("hello") == ("hell", "o")
  # A pair occurring twice overlapping merges left to right.
  assert tiny_gpt2._bpe("lll") == ("ll", "l")
  # " world": Ġ w o r l d -> Ġw o r l d -> Ġw or l d -> Ġwor l d.
  assert tiny_gpt2._bpe("Ġworld") == ("Ġwor", "l", "d")
  assert tiny_gpt2.encode("hello world") == [258, ord("o"), 262, ord("l"), ord("d")]
  # Merges never cross pre-token boundaries: "h" + "e" split by a space stays bytes.
  assert tiny_gpt2.encode("h e") == [ord("h"), ord(" "), ord("e")]


def test_gpt2_merge_rank_order_matters(tmp_path):
  swapped = ["h e", "l l", "ll o", "he ll", "Ġ w", "o r", "Ġw or"]
  tok = tk.GPT2Tokenizer.from_dir(_write_tiny_gpt2(tmp_path / "swapped", swapped))
  assert tok.encode("hello") == [TINY_MERGED["he"], TINY_MERGED["llo"]]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + ["<|endoftext|>", "\x00\x01\x7f"])
def test_gpt2_tiny_round_trip(tiny_gpt2, text):
  ids = tiny_gpt2.encode(text)
  assert all(0 <= i < tiny_gpt2.vocab_size for i in ids)
  assert TINY_EOS not in ids  # The literal text is never turned into the special id.
  assert tiny_gpt2.decode(ids) == text


def test_gpt2_decode_drops_eos_and_never_raises_in_vocab(tiny_gpt2):
  assert tiny_gpt2.decode([TINY_EOS, 258, ord("o"), TINY_EOS, TINY_EOS]) == "hello"
  tiny_gpt2.decode(list(range(tiny_gpt2.vocab_size)))


def test_gpt2_rejects_merge_with_unknown_token(tmp_path):
  directory = _write_tiny_gpt2(tmp_path / "bad", TINY_MERGES + ["wor ld"])
  with pytest.raises(InputError, match=r"merges\.txt:9: merge 'wor ld' uses token 'wor'"):
    tk.GPT2Tokenizer.from_dir(directory)


def test_gpt2_rejects_malformed_merge_line(tmp_path):
  directory = _write_tiny_gpt2(tmp_path / "bad", ["h e", "l l l"])
  with pytest.raises(InputError, match=r"merges\.txt:3: expected two tokens"):
    tk.GPT2Tokenizer.from_dir(directory)


def test_gpt2_rejects_vocab_without_end_of_text(tmp_path):
  directory = _write_tiny_gpt2(tmp_path / "bad")
  vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
  del vocab["<|endoftext|>"]
  (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  with pytest.raises(InputError, match=r"vocab\.json: has no '<\|endoftext\|>'"):
    tk.GPT2Tokenizer.from_dir(directory)


def test_gpt2_rejects_invalid_json(tmp_path):
  directory = _write_tiny_gpt2(tmp_path / "bad")
  (directory / "vocab.json").write_text("{not json", encoding="utf-8")
  with pytest.raises(InputError, match=r"vocab\.json: is not valid JSON"):
    tk.GPT2Tokenizer.from_dir(directory)


# ---------------------------------------------------------------------------- GPT-2, real files

# Expected ids computed with Hugging Face `tokenizers` (an independent implementation).
VARIED_TEXT = "I'm sure it's 42, isn't it?\n\n  Tabs\there; café ☕ naïve 🤖 ok"
VARIED_IDS = [40, 1101, 1654, 340, 338, 5433, 11, 2125, 470, 340, 30, 628, 220, 309, 8937, 197,
              1456, 26, 40304, 34719, 243, 41492, 12520, 97, 244, 12876]


@pytest.fixture
def real_gpt2(shared_data):
  return tk.make_tokenizer("gpt2", shared_data / "gpt2_tokenizer")


def test_gpt2_real_known_ids(real_gpt2):
  assert real_gpt2.vocab_size == 50257
  assert real_gpt2.eos_id == real_gpt2.pad_id == 50256
  assert real_gpt2.encode("Hello world") == [15496, 995]
  assert real_gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
  assert real_gpt2.encode(VARIED_TEXT) == VARIED_IDS


def test_gpt2_real_round_trip(real_gpt2):
  paragraph = ("The year's 1st report (v2.0) said: \"we'll ship\" -- they didn't.\n\n"
               "   Indented\tline with    runs of spaces\r\nand CRLF; 3.14159 × 2 = 6.28; "
               "Zürich, São Paulo, 北京, Москва 🙂\n\n\n<|endoftext|> end  ")
  ids = real_gpt2.encode(paragraph)
  assert 50256 not in ids
  assert real_gpt2.decode(ids) == paragraph
  assert real_gpt2.decode(ids + [50256, 50256]) == paragraph


# ---------------------------------------------------------------------------- SentencePiece

CORPUS = ["the quick brown fox jumps over the lazy dog",
          "hello world this is a tiny corpus",
          "tokenizers split text into pieces"] * 20


def _train_sentencepiece(path: pathlib.Path, **options) -> pathlib.Path:
  import sentencepiece
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=40,
      hard_vocab_limit=False, minloglevel=2, **options)
  path.write_bytes(model.getvalue())
  return path


def test_sentencepiece_trained_model_with_pad(tmp_path):
  tok = tk.make_tokenizer("sentencepiece", _train_sentencepiece(tmp_path / "m.model", pad_id=3))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (3, 1, 2)
  text = "hello the lazy fox"
  ids = tok.encode(text)
  assert ids and all(0 <= i < tok.vocab_size for i in ids)
  assert not set(ids) & {1, 2, 3}
  assert tok.decode([1] + ids + [2, 3, 3]) == text
  assert tok.encode_batch([text, ""]) == [ids, []]


def test_sentencepiece_without_pad_or_bos_falls_back(tmp_path):
  model_dir = tmp_path / "checkpoint"
  model_dir.mkdir()
  _train_sentencepiece(model_dir / "tokenizer.model", bos_id=-1)
  tok = tk.make_tokenizer("sentencepiece", model_dir)  # A directory holding tokenizer.model.
  assert tok.pad_id == tok.eos_id >= 0
  assert tok.bos_id is None


def test_sentencepiece_rejects_model_without_eos(tmp_path):
  path = _train_sentencepiece(tmp_path / "m.model", eos_id=-1)
  with pytest.raises(InputError, match="no eos piece"):
    tk.SentencePieceTokenizer(path)


def test_sentencepiece_rejects_garbage_file(tmp_path):
  path = tmp_path / "garbage.model"
  path.write_bytes(b"this is not a protobuf")
  with pytest.raises(InputError, match="garbage.model: is not a SentencePiece model"):
    tk.make_tokenizer("sentencepiece", path)


def test_sentencepiece_real_model(shared_data):
  tok = tk.make_tokenizer("sentencepiece", shared_data / "sentencepiece" / "test_model.model")
  assert tok.vocab_size == 1000
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # No pad piece: pads with eos.
  text = "hello world this is a test"
  ids = tok.encode(text)
  assert all(0 <= i < 1000 for i in ids)
  assert tok.decode(ids + [tok.eos_id]) == text
  tok.decode(list(range(tok.vocab_size)))  # Never raises on an in-vocab id.


# ---------------------------------------------------------------------------- make_tokenizer


def test_make_tokenizer_default_is_bytes():
  assert isinstance(tk.make_tokenizer(), tk.ByteTokenizer)


def test_make_tokenizer_errors(tmp_path):
  with pytest.raises(InputError, match="unknown kind 'bpe'"):
    tk.make_tokenizer("bpe")
  with pytest.raises(InputError, match="takes no files"):
    tk.make_tokenizer("byte", tmp_path)
  with pytest.raises(InputError, match="needs a path"):
    tk.make_tokenizer("gpt2")
  with pytest.raises(InputError, match="nowhere: does not exist"):
    tk.make_tokenizer("gpt2", tmp_path / "nowhere")
  directory = _write_tiny_gpt2(tmp_path / "gpt2")
  (directory / "merges.txt").unlink()
  with pytest.raises(InputError, match="gpt2: has no merges.txt"):
    tk.make_tokenizer("gpt2", directory)
  (directory / "vocab.json").unlink()
  with pytest.raises(InputError, match="has no vocab.json or merges.txt"):
    tk.make_tokenizer("gpt2", directory)
  with pytest.raises(InputError, match="is not a directory"):
    tk.make_tokenizer("gpt2", _train_sentencepiece(tmp_path / "m.model"))
  with pytest.raises(InputError, match="without tokenizer.model"):
    tk.make_tokenizer("sentencepiece", tmp_path)
