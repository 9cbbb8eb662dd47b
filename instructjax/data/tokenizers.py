"""Tokenizers: one small interface, four kinds, no downloads.

* `ByteTokenizer` ("byte") - UTF-8 bytes plus three special ids. Needs no files; the default.
* `GPT2Tokenizer` ("gpt2") - the exact GPT-2 byte-level BPE, read from `vocab.json` +
  `merges.txt`.
* `HFJsonTokenizer` ("hf_json") - the same byte-level BPE read from a Hugging Face
  `tokenizer.json` (GPT-2, Llama-3, Qwen style), special tokens from the checkpoint's files.
  It and `GPT2Tokenizer` share one BPE implementation, `ByteLevelBPETokenizer`.
* `SentencePieceTokenizer` ("sentencepiece") - wraps a SentencePiece `.model` file.

Every tokenizer encodes plain text WITHOUT adding special tokens (callers decide where BOS/EOS
go), decodes while dropping pad/eos/bos ids, and reports `vocab_size`, an exclusive upper bound
on every id it produces: the model's embedding table must have at least that many rows. Its
`fingerprint` hashes what decides its ids, so tokenizers are compared by content, not by where
their files are (`difference`).
"""
from __future__ import annotations

import abc
import copy
import functools
import hashlib
import json
import pathlib
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

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

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 (hex) of everything that decides this tokenizer's ids and text.

    Two tokenizers with the same fingerprint encode and decode alike wherever their files
    live; a changed merge, vocabulary entry or special id changes it. Computed once.
    """
    return hashlib.sha256(self._content()).hexdigest()

  def _content(self) -> bytes:
    """Bytes that determine `encode`, `decode` and the special ids (hashed by `fingerprint`)."""
    raise NotImplementedError(f"{type(self).__name__} cannot be compared by content")

  def reading_special_tokens(self) -> "Tokenizer":
    """This tokenizer recognising its special tokens' text (`<|im_start|>`, `<|eot_id|>`) as
    those tokens: for text a chat template rendered. Off by default, so dataset text cannot
    inject them. Only byte-level BPE tokenizers carry such tokens."""
    raise InputError("config.tokenizer.special_tokens_in_text",
                     f"{type(self).__name__} has no special tokens written as text")

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

  def _content(self) -> bytes:
    return b"byte"  # no files: every ByteTokenizer is the same

  def __repr__(self) -> str:
    return "ByteTokenizer()"


# GPT-2's pre-tokenisation: contractions, letter runs, digit runs and punctuation runs each
# with at most one leading space, then whitespace. BPE never merges across these pieces. It is
# also the split of `tokenizers`' ByteLevel pre-tokenizer (use_regex=true).
_GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

GPT2_END_OF_TEXT = "<|endoftext|>"
TOKENIZER_JSON = "tokenizer.json"


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


@functools.cache
def _byte_decoder() -> dict[str, int]:
  return {c: b for b, c in bytes_to_unicode().items()}


def _isolated_pieces(pattern: regex.Pattern, text: str) -> Iterator[str]:
  """`tokenizers`' Split(behavior=Isolated): every match is a piece, and so is every gap.

  For GPT-2's split, which matches every character, this is `findall`.
  """
  start = 0
  for match in pattern.finditer(text):
    if match.start() > start:
      yield text[start:match.start()]
    if match.end() > match.start():
      yield match.group()
    start = match.end()
  if start < len(text):
    yield text[start:]


def _isolated_splitter(pattern: regex.Pattern) -> Callable[[str], list[str]]:
  """`_isolated_pieces` as a function of the text, at C speed where it can be: with the whole
  pattern in one capturing group, `split` returns the gaps and the matches in order."""
  if pattern.groups == 0:
    try:
      captured = regex.compile(f"({pattern.pattern})", pattern.flags)
    except regex.error:  # e.g. a global flag that must stay at the start
      pass
    else:
      return lambda text: [piece for piece in captured.split(text) if piece]
  return lambda text: list(_isolated_pieces(pattern, text))


_split_words = _isolated_splitter(_GPT2_SPLIT)  # GPT-2's pre-tokenisation, for the tests


def _byte_level_bytes(text: str) -> bytes:
  """Byte-level token text back to its bytes; a character outside the byte alphabet (a custom
  vocab may hold some) stands for its own UTF-8."""
  decoder = _byte_decoder()
  data = bytearray()
  for c in text:
    byte = decoder.get(c)
    data.extend(c.encode("utf-8") if byte is None else (byte,))
  return bytes(data)


class ByteLevelBPETokenizer(Tokenizer):
  """Byte-level BPE: the one implementation behind the "gpt2" and "hf_json" kinds.

  The algorithm of openai/gpt-2 `encoder.py`, which `tokenizers`' BPE model also runs:
  text -> (added tokens matched in the text) -> (normalisation) -> pieces by a split regex ->
  each piece's UTF-8 bytes in GPT-2's printable byte alphabet -> merges applied by rank -> ids.
  The subclasses only read their files into the arguments below.

  Args:
    vocab: token (byte-alphabet text) -> id; holds all 256 byte tokens.
    merge_ranks: (left, right) -> rank; lower merges first. Every pair and its concatenation
      is in `vocab` (checked by the loaders, so `encode` cannot fail).
    split: the pre-tokenisation regex; matches and the gaps between them are the pieces.
    eos_id, pad_id, bos_id: the special ids (`decode` drops them).
    added: added tokens, content -> id. One not in `vocab` decodes to its content as written.
    matched_in_text: contents of added tokens that `encode` recognises in the text (the
      non-special ones, as `tokenizers` does). Special tokens are never recognised: dataset
      text cannot inject an end-of-sequence id.
    ignore_merges: a piece that is itself a vocab token is emitted whole (Llama-3).
    normalizer: None, or the Unicode normal form ("NFC" for Qwen2) applied before the split.
  """

  def __init__(self, *, vocab: dict[str, int], merge_ranks: dict[tuple[str, str], int],
               split: regex.Pattern, eos_id: int, pad_id: int, bos_id: int | None,
               added: Mapping[str, int] | None = None, matched_in_text: Iterable[str] = (),
               ignore_merges: bool = False, normalizer: str | None = None,
               cache_size: int = 1 << 16):
    self._encoder = vocab
    self._merge_ranks = merge_ranks
    self._split = split
    self._pieces = _isolated_splitter(split)
    self._ignore_merges = ignore_merges
    self._normalizer = normalizer
    self._decoder = {token_id: token for token, token_id in vocab.items()}
    added = dict(added or {})
    self._literal = {i: content.encode("utf-8") for content, i in added.items()
                     if content not in vocab}
    self._id_bytes: dict[int, bytes] = {}  # filled by decode
    self._added = added
    self._matched = {content: added[content] for content in matched_in_text}
    self._matched_pattern = _alternation(self._matched)
    self._byte_encoder = bytes_to_unicode()
    self.vocab_size = max([*self._decoder, *self._literal]) + 1
    self.eos_id, self.pad_id, self.bos_id = eos_id, pad_id, bos_id
    # Per instance (not a method decorator) so the cache dies with the tokenizer.
    self._cached_bpe = functools.lru_cache(maxsize=cache_size)(self._bpe)

  def _bpe(self, word: str) -> tuple[str, ...]:
    """Splits one pre-tokenised word (in the byte alphabet) into vocabulary tokens.

    Repeatedly merges the lowest-ranked adjacent pair present, every occurrence left to
    right, until no adjacent pair has a rank.
    """
    if self._ignore_merges and word in self._encoder:
      return (word,)
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

  def reading_special_tokens(self) -> "ByteLevelBPETokenizer":
    twin = copy.copy(self)  # shares the vocabulary, merges and BPE cache
    twin._matched = dict(self._added)
    twin._matched_pattern = _alternation(twin._matched)
    twin.__dict__.pop("fingerprint", None)  # it encodes differently: its own fingerprint
    return twin

  def _segments(self, text: str) -> Iterator[tuple[str, int | None]]:
    """(text, None) runs for BPE, and (content, id) for each added token found in the text."""
    if self._matched_pattern is None:
      yield text, None
      return
    start = 0
    for match in self._matched_pattern.finditer(text):
      if match.start() > start:
        yield text[start:match.start()], None
      yield match.group(), self._matched[match.group()]
      start = match.end()
    if start < len(text):
      yield text[start:], None

  def encode(self, text: str) -> list[int]:
    ids = []
    for segment, added_id in self._segments(_check_text(text)):
      if added_id is not None:
        ids.append(added_id)
        continue
      if self._normalizer:
        segment = unicodedata.normalize(self._normalizer, segment)
      for word in self._pieces(segment):
        byte_word = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
        ids.extend(self._encoder[token] for token in self._cached_bpe(byte_word))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    data = b"".join(map(self._bytes_of, self._ordinary_ids(ids)))
    return data.decode("utf-8", errors="replace")

  def _bytes_of(self, token_id: int) -> bytes:
    """The bytes a token stands for. Ids inside [0, vocab_size) that name no token (gaps in a
    custom vocab) stand for nothing."""
    data = self._id_bytes.get(token_id)
    if data is None:
      literal = self._literal.get(token_id)
      data = literal if literal is not None else _byte_level_bytes(
          self._decoder.get(token_id, ""))
      self._id_bytes[token_id] = data
    return data

  def _content(self) -> bytes:
    # What decides encode and decode, in a canonical order: the same vocabulary read from
    # vocab.json + merges.txt or from tokenizer.json gives the same bytes.
    ranks = self._merge_ranks
    return _canonical_json({
        "algorithm": "byte-level BPE", "split": self._split.pattern,
        "normalizer": self._normalizer, "ignore_merges": self._ignore_merges,
        "vocab": sorted(self._encoder.items(), key=lambda item: item[1]),
        "merges": sorted(ranks, key=ranks.get),
        "literal": sorted((i, t.decode("utf-8")) for i, t in self._literal.items()),
        "matched_in_text": sorted(self._matched.items()),
        "special": [self.pad_id, self.eos_id, self.bos_id]})


def _alternation(contents: Iterable[str]) -> regex.Pattern | None:
  """A regex matching any of `contents` literally, or None for none. Longest first: where two
  start at the same place the longer wins, as in `tokenizers`' leftmost-longest matching."""
  ordered = sorted(contents, key=len, reverse=True)
  return regex.compile("|".join(map(regex.escape, ordered))) if ordered else None


def _canonical_json(value: Any) -> bytes:
  return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _read_json(path: pathlib.Path, what: str) -> Any:
  try:
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not an error
      return json.load(f)
  except OSError as e:
    raise InputError(str(path), f"cannot read {what}: {e}") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(str(path), f"is not valid JSON: {e}") from e


def _check_vocab(vocab: Any, where: str) -> dict[str, int]:
  """A byte-level BPE vocabulary: token -> unique int id, holding all 256 byte tokens."""
  if not isinstance(vocab, dict) or not vocab:
    raise InputError(where, "must be a non-empty JSON object mapping token -> id")
  seen: dict[int, str] = {}
  for token, token_id in vocab.items():
    if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
      raise InputError(where, f"token {token!r} has id {token_id!r}, not an int >= 0")
    if token_id in seen:
      raise InputError(where, f"tokens {seen[token_id]!r} and {token!r} share id {token_id}")
    seen[token_id] = token
  missing = [c for c in bytes_to_unicode().values() if c not in vocab]
  if missing:
    raise InputError(
        where,
        f"lacks {len(missing)} of the 256 byte tokens (e.g. {missing[0]!r}), so some text could "
        "not be encoded; is this a byte-level BPE vocabulary?")
  return vocab


def _check_merge(where: str, first: str, second: str, vocab: dict[str, int],
                 vocab_name: str) -> None:
  # Checked when loading so that encode can never fail on a merge producing an unknown token.
  for token in (first, second, first + second):
    if token not in vocab:
      raise InputError(where, f"merge {first + ' ' + second!r} uses token {token!r}, which is "
                       f"not in {vocab_name}")


def _load_gpt2_vocab(vocab_path: pathlib.Path) -> dict[str, int]:
  vocab = _check_vocab(_read_json(vocab_path, "the GPT-2 vocabulary"), str(vocab_path))
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
    _check_merge(where, first, second, vocab, "vocab.json")
    if (first, second) in ranks:
      raise InputError(where, f"merge {line!r} appears twice, so its rank is ambiguous")
    ranks[(first, second)] = len(ranks)
  return ranks


class GPT2Tokenizer(ByteLevelBPETokenizer):
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
    vocab = _load_gpt2_vocab(vocab_path)
    eos_id = vocab[GPT2_END_OF_TEXT]
    super().__init__(vocab=vocab, merge_ranks=_load_gpt2_merges(merges_path, vocab),
                     split=_GPT2_SPLIT, eos_id=eos_id, pad_id=eos_id, bos_id=None,
                     cache_size=cache_size)
    self._paths = (vocab_path, merges_path)

  @classmethod
  def from_dir(cls, directory: str | pathlib.Path) -> GPT2Tokenizer:
    """Reads `directory`/vocab.json and merges.txt (also a HF GPT-2 checkpoint's layout)."""
    vocab_path, merges_path = _require_gpt2_files(pathlib.Path(directory))
    return cls(vocab_path, merges_path)

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


# ------------------------------------------------------------------ tokenizer.json (hf_json)

# model fields of `tokenizers`' BPE this implementation does not have; a truthy value is refused.
_UNSUPPORTED_BPE_FIELDS = ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix",
                           "dropout")
_NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")


def _bpe_model(spec: Any, where: str) -> dict:
  if not isinstance(spec, dict):
    raise InputError(where, "must be a JSON object (a Hugging Face tokenizer.json)")
  model = spec.get("model")
  if not isinstance(model, dict):
    raise InputError(where, "has no 'model' object; is this a Hugging Face tokenizer.json?")
  if model.get("type", "BPE") != "BPE":  # `tokenizers` writes no type for some old BPE files
    raise InputError(f"{where}: model.type", f"{model.get('type')!r} is not supported (only "
                     "byte-level BPE, as GPT-2, Llama-3 and Qwen use)")
  if "vocab" not in model:
    raise InputError(f"{where}: model.vocab", "is missing; a BPE model needs its vocabulary")
  for field in _UNSUPPORTED_BPE_FIELDS:
    if model.get(field):
      raise InputError(f"{where}: model.{field}", f"{model[field]!r} is not supported")
  return model


def _tokenizer_json_merges(merges: Any, vocab: dict[str, int],
                           where: str) -> dict[tuple[str, str], int]:
  """Ranks from model.merges, given as "a b" strings or as [a, b] pairs.

  A pair listed twice keeps its later rank, as `tokenizers` does (its merge map is built by
  inserting in order).
  """
  if not isinstance(merges, list):
    raise InputError(f"{where}: model.merges", f"must be a list, got {type(merges).__name__}")
  ranks: dict[tuple[str, str], int] = {}
  for rank, merge in enumerate(merges):
    pair = tuple(merge.split(" ")) if isinstance(merge, str) else merge
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(
        isinstance(token, str) and token for token in pair):
      raise InputError(f"{where}: model.merges[{rank}]", f"expected a pair of tokens, got "
                       f"{merge!r}")
    _check_merge(f"{where}: model.merges[{rank}]", *pair, vocab, "model.vocab")
    ranks[tuple(pair)] = rank
  return ranks


def _split_pattern(pre: Any, where: str) -> regex.Pattern:
  """The split regex of a ByteLevel pre-tokenizer (GPT-2's) or Sequence[Split, ByteLevel]."""
  def byte_level(step: Any, use_regex: bool) -> bool:
    if not isinstance(step, dict) or step.get("type") != "ByteLevel":
      return False
    if step.get("add_prefix_space", False):
      raise InputError(f"{where}: pre_tokenizer", "ByteLevel add_prefix_space is not supported")
    return step.get("use_regex", True) == use_regex

  if byte_level(pre, True):
    return _GPT2_SPLIT
  is_sequence = isinstance(pre, dict) and pre.get("type") == "Sequence"
  steps = (pre.get("pretokenizers") if is_sequence else None) or []
  if (len(steps) == 2 and isinstance(steps[0], dict)
      and steps[0].get("type") == "Split" and "Regex" in (steps[0].get("pattern") or {})
      and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert", False)
      and byte_level(steps[1], False)):
    try:
      return regex.compile(steps[0]["pattern"]["Regex"])
    except regex.error as e:
      raise InputError(f"{where}: pre_tokenizer", f"the Split regex does not compile: {e}") from e
  raise InputError(f"{where}: pre_tokenizer", "only ByteLevel or Sequence[Split(regex, "
                   f"Isolated), ByteLevel(use_regex=false)] are supported, got "
                   f"{json.dumps(pre)[:200]}")


def _normalizer_form(normalizer: Any, where: str) -> str | None:
  """None, or the Unicode normal form of a NFC/NFD/NFKC/NFKD normalizer (Qwen2 uses NFC)."""
  if normalizer is None:
    return None
  kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
  if kind not in _NORMALIZERS:
    raise InputError(f"{where}: normalizer", f"{kind!r} is not supported (only none or one of "
                     f"{', '.join(_NORMALIZERS)})")
  return kind


def _added_tokens(tokens: Any, vocab: dict[str, int],
                  where: str) -> tuple[dict[str, int], list[str]]:
  """(content -> id of every added token, contents `encode` must recognise in text)."""
  if tokens is None:
    return {}, []
  if not isinstance(tokens, list):
    raise InputError(f"{where}: added_tokens", "must be a list")
  added, matched = {}, []
  for k, token in enumerate(tokens):
    place = f"{where}: added_tokens[{k}]"
    content, token_id = (token.get("content"), token.get("id")) if isinstance(token, dict) \
        else (None, None)
    if not isinstance(content, str) or not content or isinstance(token_id, bool) \
        or not isinstance(token_id, int) or token_id < 0:
      raise InputError(place, f"expected {{'id': int >= 0, 'content': text, ...}}, got {token!r}")
    if vocab.get(content, token_id) != token_id:
      raise InputError(place, f"{content!r} has id {token_id} but model.vocab gives it "
                       f"{vocab[content]}")
    added[content] = token_id
    if not token.get("special", False):
      # Matched in text as `tokenizers` does; its whitespace options are not implemented.
      flags = [f for f in ("lstrip", "rstrip", "single_word") if token.get(f)]
      if flags:
        raise InputError(place, f"non-special added token {content!r} sets {', '.join(flags)}, "
                         "which is not supported")
      matched.append(content)
  return added, matched


def _special_token(value: Any) -> str | None:
  """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _checkpoint_special_ids(directory: pathlib.Path, ids: Mapping[str, int],
                            vocab_size: int) -> tuple[int, int, int | None]:
  """(eos, pad, bos) from tokenizer_config.json (`eos_token`, ...), else config.json
  (`eos_token_id`, ...); eos falls back to GPT-2's <|endoftext|>, pad to eos."""
  config_path, model_config_path = directory / "tokenizer_config.json", directory / "config.json"
  config = _read_json(config_path, "the tokenizer config") if config_path.is_file() else {}
  model_config = (_read_json(model_config_path, "the model config")
                  if model_config_path.is_file() else {})

  def special(name: str) -> int | None:
    content = _special_token(config.get(f"{name}_token")) if isinstance(config, dict) else None
    if content is not None:
      if content not in ids:
        raise InputError(str(config_path), f"{name}_token {content!r} is not in the vocabulary")
      return ids[content]
    value = model_config.get(f"{name}_token_id") if isinstance(model_config, dict) else None
    value = value[0] if isinstance(value, list) and value else value  # Llama-3.1: a list
    valid = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size
    return value if valid else None

  eos = special("eos")
  if eos is None:
    eos = ids.get(GPT2_END_OF_TEXT)
  if eos is None:
    raise InputError(str(directory), "names no eos token (tokenizer_config.json eos_token or "
                     "config.json eos_token_id) and has no <|endoftext|>; generation needs one")
  pad = special("pad")
  return eos, eos if pad is None else pad, special("bos")


class HFJsonTokenizer(ByteLevelBPETokenizer):
  """A byte-level BPE `tokenizer.json` (GPT-2, Llama-3, Qwen style), without `tokenizers`.

  Supported: model BPE (merges as "a b" strings or pairs, `ignore_merges`), no normalizer or a
  Unicode normal form (NFC ...), and a pre-tokenizer that is ByteLevel (GPT-2's split) or
  Sequence[Split(regex, Isolated), ByteLevel] (Llama-3's, Qwen's). Anything else is refused
  with the component named. As for the other tokenizers, `encode` adds no special tokens and
  treats special-token text as ordinary characters; non-special added tokens are recognised in
  the text, as `tokenizers` does. With the vocabulary and merges of vocab.json + merges.txt it
  encodes and decodes exactly as `GPT2Tokenizer` does (and has the same `fingerprint`).

  Special ids come from tokenizer_config.json (`eos_token`, `bos_token`, `pad_token`) or else
  from config.json (`eos_token_id`, ...) beside tokenizer.json; eos falls back to
  `<|endoftext|>`, pad to eos.

  Args:
    path: a directory holding tokenizer.json (a Hugging Face checkpoint), or the file itself.
  """

  def __init__(self, path: str | pathlib.Path, cache_size: int = 1 << 16):
    path = pathlib.Path(path)
    file = path / TOKENIZER_JSON if path.is_dir() else path
    if not file.is_file():
      raise InputError(str(path), f"has no {TOKENIZER_JSON} (the hf_json tokenizer reads a "
                       "Hugging Face tokenizer.json, or a directory holding one)")
    where = str(file)
    spec = _read_json(file, "the tokenizer")
    model = _bpe_model(spec, where)
    vocab = _check_vocab(model["vocab"], f"{where}: model.vocab")
    added, matched = _added_tokens(spec.get("added_tokens"), vocab, where)
    ids = {**vocab, **added}
    eos_id, pad_id, bos_id = _checkpoint_special_ids(file.parent, ids, max(ids.values()) + 1)
    super().__init__(vocab=vocab, merge_ranks=_tokenizer_json_merges(model.get("merges", []),
                                                                     vocab, where),
                     split=_split_pattern(spec.get("pre_tokenizer"), where),
                     eos_id=eos_id, pad_id=pad_id, bos_id=bos_id, added=added,
                     matched_in_text=matched, ignore_merges=bool(model.get("ignore_merges")),
                     normalizer=_normalizer_form(spec.get("normalizer"), where),
                     cache_size=cache_size)
    self._path = file

  def __repr__(self) -> str:
    return f"HFJsonTokenizer({str(self._path)!r})"


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

  def _content(self) -> bytes:
    # The serialised model holds the pieces, scores, normaliser and special ids: all of it.
    return b"sentencepiece\0" + self._processor.serialized_model_proto()

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({str(self._path)!r})"


TOKENIZER_KINDS = ("byte", "gpt2", "hf_json", "sentencepiece")


def make_tokenizer(kind: str = "byte", path: str | pathlib.Path | None = None,
                   special_tokens_in_text: bool = False) -> Tokenizer:
  """Builds a tokenizer from a config.

  Args:
    kind: "byte" (no files; `path` must be empty), "gpt2" (`path` is a directory holding
      vocab.json and merges.txt, e.g. a Hugging Face GPT-2 checkpoint), "hf_json" (`path` is a
      directory holding a byte-level BPE tokenizer.json, e.g. a Llama-3 or Qwen checkpoint, or
      the file itself) or "sentencepiece" (`path` is a .model file, or a directory holding
      tokenizer.model).
    path: where the tokenizer's files are.
    special_tokens_in_text: read special-token text as those tokens (`reading_special_tokens`),
      for records a chat template rendered.

  Raises:
    InputError: unknown kind, or missing / unreadable files (the message names the path).
  """
  tokenizer = _read_tokenizer(kind, path)
  return tokenizer.reading_special_tokens() if special_tokens_in_text else tokenizer


def _read_tokenizer(kind: str, path: str | pathlib.Path | None) -> Tokenizer:
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
  if kind == "hf_json":
    return HFJsonTokenizer(path)
  if path.is_dir():
    model_path = path / "tokenizer.model"
    if not model_path.is_file():
      raise InputError(str(path), "is a directory without tokenizer.model; pass the .model file")
    path = model_path
  return SentencePieceTokenizer(path)


def _spec(section: Mapping[str, Any]) -> tuple[str, str, bool]:
  """(kind, path, special_tokens_in_text) of a config's tokenizer section; "" and None paths
  are the same."""
  return (section.get("kind") or "byte", str(section.get("path") or ""),
          bool(section.get("special_tokens_in_text", False)))


def difference(tokenizer: Tokenizer, section: Mapping[str, Any],
               other: Mapping[str, Any]) -> str | None:
  """None when config section `other` names a tokenizer with the same content as `tokenizer`
  (built from `section`); otherwise why not, for a message that names both sections.

  Compared by `fingerprint`, not by path: the same files copied into two directories are the
  same tokenizer (even read as "gpt2" in one and "hf_json" in the other). Identical sections
  are the same without reading any file.
  """
  if _spec(other) == _spec(section):
    return None
  try:
    theirs = make_tokenizer(*_spec(other)).fingerprint
  except InputError as e:
    return f"the first cannot be read to compare their contents ({e})"
  mine = tokenizer.fingerprint
  if theirs == mine:
    return None
  return f"their contents differ (fingerprint {theirs[:12]} vs {mine[:12]})"
