"""Tokenizers: one small interface, three implementations, no downloads.

* `ByteTokenizer` - UTF-8 bytes plus three special ids. Needs no files; the default.
* `GPT2Tokenizer` - the exact GPT-2 byte-level BPE, read from `vocab.json` + `merges.txt`.
* `SentencePieceTokenizer` - wraps a SentencePiece `.model` file.

Every tokenizer encodes plain text WITHOUT adding special tokens (callers decide where BOS/EOS
go), decodes while dropping pad/eos/bos ids, and reports `vocab_size`, an exclusive upper bound
on every id it produces: the model's embedding table must have at least that many rows.
"""
from __future__ import annotations

import abc
import functools
import json
import pathlib
from collections.abc import Iterable, Sequence

import regex

from instructjax.errors import InputError


class Tokenizer(abc.ABC):
  """Text <-> token ids.

  Attributes:
    vocab_size: every id `encode` produces is `< vocab_size`.
    pad_id: id used to pad batches; `decode` drops it.
    eos_id: id that ends a sequence; `decode` drops it.
    bos_id: id that may start a sequence, or None when the tokenizer has none.
  """

  vocab_size: int
  pad_id: int
  eos_id: int
  bos_id: int | None

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no special tokens are added."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, dropping pad/eos/bos. Raises InputError only for ids outside the vocab."""

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [self.encode(text) for text in texts]

  @property
  def special_ids(self) -> frozenset[int]:
    """The ids `decode` drops."""
    return frozenset(i for i in (self.pad_id, self.eos_id, self.bos_id) if i is not None)

  def _ordinary_ids(self, ids: Sequence[int]) -> list[int]:
    """`ids` as Python ints with special ids removed; out-of-vocab ids raise InputError."""
    special = self.special_ids
    kept = []
    for position, token_id in enumerate(ids):
      token_id = int(token_id)  # Accepts numpy / jax integer scalars.
      if not 0 <= token_id < self.vocab_size:
        raise InputError(
            f"token {position}",
            f"id {token_id} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
      if token_id not in special:
        kept.append(token_id)
    return kept


def _check_text(text: object) -> str:
  if not isinstance(text, str):
    raise InputError("encode", f"expected text as str, got {type(text).__name__}")
  return text


class ByteTokenizer(Tokenizer):
  """Ids 0..255 are the UTF-8 bytes of the text; 256 = pad, 257 = eos, 258 = bos."""

  pad_id = 256
  eos_id = 257
  bos_id = 258
  vocab_size = 259

  def encode(self, text: str) -> list[int]:
    return list(_check_text(text).encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    # A model can emit any byte sequence; invalid UTF-8 becomes U+FFFD rather than an error.
    return bytes(self._ordinary_ids(ids)).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


# GPT-2's pre-tokenisation: contractions, letter runs, digit runs and punctuation runs each
# with at most one leading space, then whitespace. BPE never merges across these pieces.
_GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

GPT2_END_OF_TEXT = "<|endoftext|>"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table.

  Printable Latin-1 bytes map to themselves; the other 68 bytes (control characters, space,
  ...) map to code points 256 and up, so that every token in vocab.json is visible text
  (e.g. space is 'Ġ', newline is 'Ċ').
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in printable}
  next_code_point = 256
  for b in range(256):
    if b not in table:
      table[b] = chr(next_code_point)
      next_code_point += 1
  return table


def _split_words(text: str) -> list[str]:
  """GPT-2 pre-tokenisation of `text` into the pieces BPE runs on."""
  return _GPT2_SPLIT.findall(text)


def _load_gpt2_vocab(vocab_path: pathlib.Path) -> dict[str, int]:
  try:
    with open(vocab_path, encoding="utf-8") as f:
      vocab = json.load(f)
  except OSError as e:
    raise InputError(str(vocab_path), f"cannot read the GPT-2 vocabulary: {e}") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(str(vocab_path), f"is not valid JSON: {e}") from e
  if not isinstance(vocab, dict) or not vocab:
    raise InputError(str(vocab_path), "must be a non-empty JSON object mapping token -> id")
  seen: dict[int, str] = {}
  for token, token_id in vocab.items():
    if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
      raise InputError(str(vocab_path), f"token {token!r} has id {token_id!r}, not an int >= 0")
    if token_id in seen:
      raise InputError(str(vocab_path),
                       f"tokens {seen[token_id]!r} and {token!r} share id {token_id}")
    seen[token_id] = token
  missing = [c for c in bytes_to_unicode().values() if c not in vocab]
  if missing:
    raise InputError(
        str(vocab_path),
        f"lacks {len(missing)} of the 256 byte tokens (e.g. {missing[0]!r}), so some text could "
        "not be encoded; is this a byte-level BPE vocabulary?")
  if GPT2_END_OF_TEXT not in vocab:
    raise InputError(str(vocab_path), f"has no {GPT2_END_OF_TEXT!r} token (GPT-2's end of text)")
  return vocab


def _load_gpt2_merges(merges_path: pathlib.Path,
                      vocab: dict[str, int]) -> dict[tuple[str, str], int]:
  """Merge ranks: the pair on line k after the '#version' header has rank k."""
  try:
    with open(merges_path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except OSError as e:
    raise InputError(str(merges_path), f"cannot read the GPT-2 merges: {e}") from e
  except UnicodeDecodeError as e:
    raise InputError(str(merges_path), f"is not UTF-8 text: {e}") from e
  ranks: dict[tuple[str, str], int] = {}
  for line_number, line in enumerate(lines, start=1):
    if not line or (line_number == 1 and line.startswith("#version")):
      continue
    parts = line.split(" ")
    where = f"{merges_path}:{line_number}"
    if len(parts) != 2 or not all(parts):
      raise InputError(where, f"expected two tokens separated by one space, got {line!r}")
    first, second = parts
    # Checked here so that encode can never fail on a merge producing an unknown token.
    for token in (first, second, first + second):
      if token not in vocab:
        raise InputError(where, f"merge {line!r} uses token {token!r}, which is not in vocab.json")
    if (first, second) in ranks:
      raise InputError(where, f"merge {line!r} appears twice, so its rank is ambiguous")
    ranks[(first, second)] = len(ranks)
  return ranks


class GPT2Tokenizer(Tokenizer):
  """GPT-2's byte-level BPE, bit-for-bit (the algorithm of openai/gpt-2 `encoder.py`).

  Special ids: GPT-2 has one special token, `<|endoftext|>` (50256 in the real files), which
  serves as `eos_id` and also as `pad_id` (GPT-2 has no pad token; padded positions must be
  masked out anyway). `bos_id` is None: GPT-2 marks document starts with `<|endoftext|>` too,
  so a caller wanting a start marker prepends `eos_id` explicitly.

  `encode` treats the literal text "<|endoftext|>" as ordinary characters, so text from a
  dataset can never inject an end-of-sequence id.
  """

  def __init__(self, vocab_path: str | pathlib.Path, merges_path: str | pathlib.Path,
               cache_size: int = 1 << 16):
    vocab_path, merges_path = pathlib.Path(vocab_path), pathlib.Path(merges_path)
    self._encoder = _load_gpt2_vocab(vocab_path)
    self._merge_ranks = _load_gpt2_merges(merges_path, self._encoder)
    self._decoder = {token_id: token for token, token_id in self._encoder.items()}
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    self.vocab_size = max(self._decoder) + 1
    self.eos_id = self._encoder[GPT2_END_OF_TEXT]
    self.pad_id = self.eos_id
    self.bos_id = None
    # Per instance (not a method decorator) so the cache dies with the tokenizer.
    self._cached_bpe = functools.lru_cache(maxsize=cache_size)(self._bpe)
    self._paths = (vocab_path, merges_path)

  @classmethod
  def from_dir(cls, directory: str | pathlib.Path) -> GPT2Tokenizer:
    """Reads `directory`/vocab.json and merges.txt (also a HF GPT-2 checkpoint's layout)."""
    vocab_path, merges_path = _require_gpt2_files(pathlib.Path(directory))
    return cls(vocab_path, merges_path)

  def _bpe(self, word: str) -> tuple[str, ...]:
    """Splits one pre-tokenised word (in the byte alphabet) into vocabulary tokens.

    Repeatedly merges the lowest-ranked adjacent pair present, every occurrence left to
    right, until no adjacent pair has a rank.
    """
    parts = tuple(word)
    ranks = self._merge_ranks
    while len(parts) > 1:
      pairs = set(zip(parts, parts[1:]))
      best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
      if best not in ranks:
        break
      first, second = best
      merged = []
      i = 0
      while i < len(parts):
        if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = tuple(merged)
    return parts

  def encode(self, text: str) -> list[int]:
    ids = []
    for word in _split_words(_check_text(text)):
      byte_word = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
      ids.extend(self._encoder[token] for token in self._cached_bpe(byte_word))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    # Ids inside [0, vocab_size) that name no token (gaps in a custom vocab) decode to nothing.
    text = "".join(self._decoder.get(token_id, "") for token_id in self._ordinary_ids(ids))
    return byte_level_text(text, self._byte_decoder)

  def __repr__(self) -> str:
    return f"GPT2Tokenizer({str(self._paths[0])!r}, {str(self._paths[1])!r})"


def _require_gpt2_files(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  if not directory.is_dir():
    raise InputError(str(directory), "is not a directory; a GPT-2 tokenizer needs a directory "
                     "holding vocab.json and merges.txt")
  paths = directory / "vocab.json", directory / "merges.txt"
  missing = [p.name for p in paths if not p.is_file()]
  if missing:
    raise InputError(str(directory), f"has no {' or '.join(missing)} (a GPT-2 tokenizer needs "
                     "both vocab.json and merges.txt)")
  return paths


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model (`.model` file), e.g. a T5 / LLaMA-style tokenizer.

  `pad_id`, `eos_id` and `bos_id` come from the model. Models trained without a pad piece
  (pad id -1, SentencePiece's default) pad with `eos_id` instead; a model without a bos piece
  has `bos_id` None. A model without an eos piece is rejected: generation needs one.
  Note SentencePiece normalises text (e.g. NFKC, whitespace runs), so `decode(encode(s))`
  returns the normalised form of `s`, which need not equal `s`.
  """

  def __init__(self, model_path: str | pathlib.Path):
    import sentencepiece  # Imported here so the other tokenizers do not need the package.

    model_path = pathlib.Path(model_path)
    if not model_path.is_file():
      raise InputError(str(model_path), "SentencePiece model file not found")
    processor = sentencepiece.SentencePieceProcessor()
    try:
      processor.Load(str(model_path))
    except (OSError, RuntimeError) as e:
      raise InputError(str(model_path), f"is not a SentencePiece model: {e}") from e
    if processor.eos_id() < 0:
      raise InputError(str(model_path), "model has no eos piece (eos_id = -1); retrain it with "
                       "--eos_id set, as end-of-sequence is needed for generation")
    self._processor = processor
    self._path = model_path
    self.vocab_size = processor.GetPieceSize()
    self.eos_id = processor.eos_id()
    self.pad_id = processor.pad_id() if processor.pad_id() >= 0 else self.eos_id
    self.bos_id = processor.bos_id() if processor.bos_id() >= 0 else None

  def encode(self, text: str) -> list[int]:
    return self._processor.EncodeAsIds(_check_text(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self._processor.DecodeIds(self._ordinary_ids(ids))

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({str(self._path)!r})"


TOKENIZER_KINDS = ("byte", "gpt2", "sentencepiece")


def byte_level_text(text: str, byte_decoder: dict[str, int]) -> str:
  """Byte-level BPE token text back to a string; bad UTF-8 becomes U+FFFD.

  A custom vocab may hold characters outside the byte alphabet; they stand for themselves.
  """
  data = bytearray()
  for c in text:
    byte = byte_decoder.get(c)
    data.extend(c.encode("utf-8") if byte is None else (byte,))
  return data.decode("utf-8", errors="replace")


def make_tokenizer(kind: str = "byte", path: str | pathlib.Path | None = None) -> Tokenizer:
  """Builds a tokenizer from a config.

  Args:
    kind: "byte" (no files; `path` must be empty), "gpt2" (`path` is a directory holding
      vocab.json and merges.txt, e.g. a Hugging Face GPT-2 checkpoint) or "sentencepiece"
      (`path` is a .model file, or a directory holding tokenizer.model).
    path: where the tokenizer's files are.

  Raises:
    InputError: unknown kind, or missing / unreadable files (the message names the path).
  """
  if kind not in TOKENIZER_KINDS:
    raise InputError("tokenizer kind", f"unknown kind {kind!r}; expected one of {TOKENIZER_KINDS}")
  if kind == "byte":
    if path:
      raise InputError(str(path), "the byte tokenizer takes no files; leave the path empty")
    return ByteTokenizer()
  if not path:
    raise InputError(f"{kind} tokenizer", "needs a path to its files, none given")
  path = pathlib.Path(path)
  if not path.exists():
    raise InputError(str(path), f"does not exist (expected the {kind} tokenizer's files here)")
  if kind == "gpt2":
    return GPT2Tokenizer.from_dir(path)
  if path.is_dir():
    model_path = path / "tokenizer.model"
    if not model_path.is_file():
      raise InputError(str(path), "is a directory without tokenizer.model; pass the .model file")
    path = model_path
  return SentencePieceTokenizer(path)
