"""Grain input pipelines for pretraining, SFT and the reward model: fixed-shape numpy batches,
resumable.

Every language-model pipeline yields dicts of numpy arrays, the per-process slice of the global
batch (the reward model's ranking batches are in `instructjax.data.ranking_batches`):

  tokens     int32   [B, T]  token ids, right-padded with `tokenizer.pad_id`
  mask       int32   [B, T]  1 = real token, 0 = padding
  loss_mask  float32 [B, T]  1 where tokens[t] is a target to predict

SFT rows are `prompt ids + completion ids + [eos]`, the ids of the joined text `prompt +
separator + completion` cut where the prompt's end (`formatting.encode_pair`); `loss_mask` is 1
on the completion and its EOS, 0 on the prompt and padding. Rows that do not fit follow `too_long`:

  "truncate": the prompt keeps its LAST `max_prompt_len` tokens (the text nearest the
      completion), then the completion + EOS is cut to what remains of `seq_len` (so the
      EOS is lost when the completion is cut);
  "error": raise InputError(source, ...) naming the record;
  "skip": drop the record, log it with its source and count it in `stats`.

`max_prompt_len` must be below `seq_len`, so every kept prompt leaves room for at least
one completion token.

Pretraining concatenates each document's ids + [eos] and cuts the stream into rows of
exactly `seq_len` tokens (documents may span rows; no cross-document attention masking,
as in GPT-2); `loss_mask` = `mask`.

Multi-host: every process shuffles the whole dataset with the same seed, takes records
`[process_index::process_count]`, and batches them with the per-process batch size;
the result depends only on (seed, process_count, process_index). Repeating reshuffles
each epoch (grain reseeds the shuffle with seed + epoch). Training batches are full
(the last partial batch of a finite pass is dropped); `eval_dataset` makes one ordered
pass instead, padding with all-zero-mask rows so that nothing is dropped and every
process gets the same number of batches.

Iterators are checkpointable: `it.get_state()` is a JSON-able dict and
`it.set_state(state)` on a fresh iterator resumes at exactly the next batch.
`PipelineStats` counters are local to the process and are not part of that state.
"""
import dataclasses
import logging
import math
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence

import grain
import numpy as np

from instructjax.data.formatting import Format, encode_pair
from instructjax.errors import InputError

_log = logging.getLogger(__name__)
TOO_LONG_CHOICES = ("truncate", "error", "skip")
_MAX_SEED = 2**32
# Documents can be large (a whole book is one document), so pretraining prefetches few
# of them: grain's default of 500 would hold 500 tokenised books in memory.
PRETRAIN_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


class TokenizerLike(Protocol):
  pad_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    ...


@dataclasses.dataclass
class PipelineStats:
  """What a pipeline did to the records it delivered, for the trainer to log.

  Counted when a record reaches the consumer (after prefetching), once per epoch.

  Attributes:
    examples: records turned into rows (SFT) or documents packed (pretraining).
    truncated: SFT records cut by the "truncate" policy.
    skipped: SFT records dropped by the "skip" policy (in evaluation: replaced by an
      all-zero-mask row).
    boundary_cases: SFT records whose prompt and completion could not be cut on a token
      boundary of their joined text (`formatting.encode_pair`); kept, encoded apart.
    last_skipped: source of the most recent skipped record.
  """
  examples: int = 0
  truncated: int = 0
  skipped: int = 0
  boundary_cases: int = 0
  last_skipped: str | None = None

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- records


class WithSource:
  """A random-access source whose records all carry `source` ("record N" if absent)."""

  def __init__(self, source: Sequence[dict]):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    if not isinstance(record, dict):
      raise InputError(f"record {index}", f"expected a dict, got {type(record).__name__}")
    if "source" not in record:
      record = {**record, "source": f"record {index}"}
    return record


def text_field(record: dict, field: str) -> str:
  """The field as str; data sources built by TFDS hold UTF-8 bytes."""
  where = record_where(record)
  if field not in record:
    raise InputError(where, f"missing field {field!r}")
  value = record[field]
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise InputError(where, f"field {field!r} is not valid UTF-8 ({e.reason})") from None
  if not isinstance(value, str):
    raise InputError(where, f"field {field!r} must be a string, got {type(value).__name__}")
  return value


def record_where(record: dict) -> str:
  source = record["source"]
  return source.decode("utf-8") if isinstance(source, bytes) else str(source)


# ----------------------------------------------------------------------------- SFT rows


class SftExample(NamedTuple):
  """One SFT record made into a row, or the reason it does not fit."""
  row: dict[str, np.ndarray] | None
  source: str
  problem: str | None = None
  truncated: bool = False
  exact: bool = True  # the ids are those of the joined text (`formatting.Pair.exact`)


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """A row of padding only: contributes nothing to any loss or metric."""
  return {"tokens": np.full([seq_len], pad_id, np.int32), "mask": np.zeros([seq_len], np.int32),
          "loss_mask": np.zeros([seq_len], np.float32)}


def sft_example(prompt_ids: Sequence[int], completion_ids: Sequence[int], *, source: str,
                seq_len: int, max_prompt_len: int, eos_id: int, pad_id: int,
                too_long: str = "truncate") -> SftExample:
  """The row `prompt + completion + [eos]` right-padded to `seq_len` (see module doc).

  With too_long="truncate" the row is cut to fit; otherwise a record that does not fit
  comes back with `row=None` and `problem` saying why.
  """
  if not completion_ids:
    raise InputError(source, "completion has no tokens")
  prompt_ids, target_ids = list(prompt_ids), [*completion_ids, eos_id]
  truncated = False
  if len(prompt_ids) > max_prompt_len:
    if too_long != "truncate":
      return SftExample(None, source,
                        f"prompt has {len(prompt_ids)} tokens > max_prompt_len={max_prompt_len}")
    prompt_ids, truncated = prompt_ids[len(prompt_ids) - max_prompt_len:], True
  needed = len(prompt_ids) + len(target_ids)
  if needed > seq_len:
    if too_long != "truncate":
      return SftExample(None, source,
                        f"prompt+completion needs {needed} tokens > seq_len={seq_len}")
    target_ids, truncated = target_ids[:seq_len - len(prompt_ids)], True
  if not target_ids:  # Unreachable while max_prompt_len < seq_len; kept as a guard.
    raise InputError(source,
                     f"prompt of {len(prompt_ids)} tokens leaves no room in seq_len={seq_len}")
  row = empty_row(seq_len, pad_id)
  n_prompt, n_real = len(prompt_ids), len(prompt_ids) + len(target_ids)
  row["tokens"][:n_real] = prompt_ids + target_ids
  row["mask"][:n_real] = 1
  row["loss_mask"][n_prompt:n_real] = 1.0
  return SftExample(row, source, truncated=truncated)


def _sft_record_to_example(tokenizer: TokenizerLike, *, seq_len: int, max_prompt_len: int,
                           too_long: str, fmt: Format) -> Callable[[dict], SftExample]:
  def to_example(record: dict) -> SftExample:
    pair = encode_pair(tokenizer, fmt, text_field(record, "prompt"),
                       text_field(record, "completion"))
    example = sft_example(
        pair.prompt_ids, pair.response_ids, source=record_where(record), seq_len=seq_len,
        max_prompt_len=max_prompt_len, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        too_long=too_long)
    return example._replace(exact=pair.exact)
  return to_example


class _Accountant:
  """Consumer-side bookkeeping of SFT examples: counts, logs, raises or replaces.

  Runs in the thread that consumes batches, so an "error" surfaces as the InputError
  itself and counts follow what was delivered, not what was prefetched.
  """

  def __init__(self, stats: PipelineStats, too_long: str, *, epoch_size: int, seq_len: int,
               pad_id: int, keep_skipped_as_padding: bool):
    self._stats, self._too_long = stats, too_long
    self._epoch_size, self._seq_len, self._pad_id = epoch_size, seq_len, pad_id
    self._keep_skipped = keep_skipped_as_padding
    self._skipped_in_a_row = 0

  def keep(self, example: SftExample) -> bool:
    if example.problem is None:
      self._stats.examples += 1
      self._stats.truncated += int(example.truncated)
      self._stats.boundary_cases += int(not example.exact)
      self._skipped_in_a_row = 0
      return True
    if self._too_long == "error":
      raise InputError(example.source, example.problem)
    self._stats.skipped += 1
    self._stats.last_skipped = example.source
    _log.warning("skipping %s: %s", example.source, example.problem)
    self._skipped_in_a_row += 1
    if self._skipped_in_a_row > self._epoch_size:  # Else an endless pipeline would hang.
      raise InputError("sft_dataset", f"all {self._epoch_size} records of this process are "
                       "too long and skipped; raise seq_len/max_prompt_len or use "
                       "too_long='truncate'")
    return self._keep_skipped

  def row(self, example: SftExample) -> dict[str, np.ndarray]:
    return example.row if example.row is not None else empty_row(self._seq_len, self._pad_id)


# ----------------------------------------------------------------------------- packing


def document_ids(tokenizer: TokenizerLike) -> Callable[[dict], np.ndarray]:
  """Record -> int32 ids of its text followed by EOS."""
  def to_ids(record: dict) -> np.ndarray:
    return np.asarray([*tokenizer.encode(text_field(record, "text")), tokenizer.eos_id], np.int32)
  return to_ids


def _packed_row(tokens: np.ndarray, num_real: int) -> dict[str, np.ndarray]:
  mask = (np.arange(len(tokens)) < num_real).astype(np.int32)
  return {"tokens": tokens, "mask": mask, "loss_mask": mask.astype(np.float32)}


class _PackIterator(grain.DatasetIterator):
  """Cuts a stream of id arrays into rows of exactly seq_len (a final partial row is padded).

  Its state is the parent's state from just before the current document plus the offset
  into it, so resuming re-reads (re-tokenises) one document and stores no tokens.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int,
               stats: PipelineStats):
    super().__init__(parent)
    self._seq_len, self._pad_id, self._pipeline_stats = seq_len, pad_id, stats
    self._doc: np.ndarray | None = None
    self._doc_state: dict | None = None
    self._offset = 0

  def _load_next_document(self) -> bool:
    state = self._parent.get_state()
    try:
      doc = next(self._parent)
    except StopIteration:
      self._doc, self._doc_state, self._offset = None, None, 0
      return False
    self._doc, self._doc_state, self._offset = doc, state, 0
    self._pipeline_stats.examples += 1
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    tokens = np.full([self._seq_len], self._pad_id, np.int32)
    filled = 0
    while filled < self._seq_len:
      if self._doc is None or self._offset == len(self._doc):
        if not self._load_next_document():
          break
      take = min(self._seq_len - filled, len(self._doc) - self._offset)
      tokens[filled:filled + take] = self._doc[self._offset:self._offset + take]
      filled += take
      self._offset += take
    if filled == 0:
      raise StopIteration
    return _packed_row(tokens, filled)

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "in_document": False, "offset": 0}
    return {"parent": self._doc_state, "in_document": True, "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc, self._doc_state, self._offset = None, None, 0
    if state["in_document"]:
      self._doc_state = self._parent.get_state()
      self._doc = next(self._parent)
      self._offset = int(state["offset"])

  def __str__(self) -> str:
    return f"PackIterator(seq_len={self._seq_len})"


class PackIterDataset(grain.IterDataset):
  """Packs documents (int32 id arrays) into rows of `seq_len`; see `_PackIterator`."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int,
               stats: PipelineStats | None = None):
    super().__init__(parent)
    self._seq_len, self._pad_id = seq_len, pad_id
    self._pipeline_stats = stats if stats is not None else PipelineStats()

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._pipeline_stats)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len})"


def pack_documents(docs: Iterable[np.ndarray], seq_len: int, pad_id: int) -> Iterator[dict]:
  """The rows PackIterDataset makes, as a plain generator (for one-off passes)."""
  buffer: list[np.ndarray] = []
  size = 0
  for doc in docs:
    buffer.append(doc)
    size += len(doc)
    if size >= seq_len:
      stream = np.concatenate(buffer)
      whole = len(stream) // seq_len * seq_len
      for start in range(0, whole, seq_len):
        yield _packed_row(stream[start:start + seq_len].copy(), seq_len)
      buffer, size = [stream[whole:]], len(stream) - whole
  if size:
    tokens = np.full([seq_len], pad_id, np.int32)
    tokens[:size] = np.concatenate(buffer)
    yield _packed_row(tokens, size)


# ----------------------------------------------------------------------------- checks


def check_batch_shapes(*, seq_len: int, batch_size: int, process_index: int, process_count: int):
  if seq_len < 2:
    raise InputError("seq_len", f"must be at least 2, got {seq_len}")
  if batch_size < 1:
    raise InputError("batch_size", f"must be at least 1, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise InputError("process_index", f"must be in [0, {process_count}), got {process_index}")


def _check_sft(*, seq_len: int, max_prompt_len: int, too_long: str):
  if too_long not in TOO_LONG_CHOICES:
    raise InputError("too_long", f"must be one of {TOO_LONG_CHOICES}, got {too_long!r}")
  if not 0 <= max_prompt_len < seq_len:
    raise InputError("max_prompt_len", f"must be in [0, seq_len={seq_len}) so that a completion "
                     f"token always fits, got {max_prompt_len}")


def _check_seed(seed: int):
  if not 0 <= seed < _MAX_SEED:
    raise InputError("seed", f"must be in [0, 2**32), got {seed}")


def process_records(source: Sequence[dict], *, seed: int, shuffle: bool, repeat: bool,
                     process_index: int, process_count: int) -> grain.MapDataset:
  """This process's records: global shuffle, then every process_count-th, then epochs."""
  _check_seed(seed)
  ds = grain.MapDataset.source(WithSource(source))
  if shuffle:
    ds = ds.shuffle(seed)
  ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise InputError(f"process {process_index}", f"gets no records: the source has {len(source)} "
                     f"records for {process_count} processes")
  # Slicing maps epoch e of the slice onto epoch e of the shuffle, which grain reseeds
  # with seed + e: each epoch is a fresh permutation, still split disjointly.
  return ds.repeat() if repeat else ds


# ----------------------------------------------------------------------------- pipelines


def sft_dataset(source: Sequence[dict], tokenizer: TokenizerLike, *, seq_len: int,
                max_prompt_len: int, batch_size: int, seed: int, shuffle: bool = True,
                repeat: bool = True, process_index: int = 0, process_count: int = 1,
                too_long: str = "truncate", stats: PipelineStats | None = None,
                read_options: grain.ReadOptions | None = None,
                fmt: Format = Format()) -> grain.IterDataset:
  """Batches of SFT rows for this process (see module doc for the row layout and policy).

  Args:
    source: random-access records with "prompt", "completion" (str or UTF-8 bytes) and
      optionally "source"; e.g. `build("demonstrations", ...)["train"]` or a list.
    tokenizer: has `encode(str) -> list[int]`, `pad_id` and `eos_id`.
    batch_size: rows per batch on this process (global batch / process_count).
    stats: filled in as batches are consumed (truncated/skipped counts).
    read_options: grain's threads and prefetch buffer for reading and tokenising
      (grain's default when None).
    fmt: how prompt and completion join into one text (`formatting`).
  """
  check_batch_shapes(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                process_count=process_count)
  _check_sft(seq_len=seq_len, max_prompt_len=max_prompt_len, too_long=too_long)
  stats = stats if stats is not None else PipelineStats()
  records = process_records(source, seed=seed, shuffle=shuffle, repeat=repeat,
                             process_index=process_index, process_count=process_count)
  epoch_size = len(range(process_index, len(source), process_count))
  accountant = _Accountant(stats, too_long, epoch_size=epoch_size, seq_len=seq_len,
                           pad_id=tokenizer.pad_id, keep_skipped_as_padding=False)
  examples = records.map(_sft_record_to_example(tokenizer, seq_len=seq_len,
                                                max_prompt_len=max_prompt_len, too_long=too_long,
                                                fmt=fmt))
  return (examples.to_iter_dataset(read_options)
          .filter(accountant.keep)
          .map(accountant.row)
          .batch(batch_size, drop_remainder=True))


def pretrain_dataset(source: Sequence[dict], tokenizer: TokenizerLike, *, seq_len: int,
                     batch_size: int, seed: int, shuffle: bool = True, repeat: bool = True,
                     process_index: int = 0, process_count: int = 1,
                     stats: PipelineStats | None = None,
                     read_options: grain.ReadOptions = PRETRAIN_READ_OPTIONS) -> grain.IterDataset:
  """Batches of packed pretraining rows for this process (see module doc).

  Args:
    source: random-access records with "text" (str or UTF-8 bytes) and optionally
      "source"; e.g. `build("text", ...)["train"]` or a list.
    stats: `examples` counts the documents packed so far.
    read_options: grain's threads and prefetch buffer (in documents) for reading and
      tokenising.
  """
  check_batch_shapes(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                process_count=process_count)
  stats = stats if stats is not None else PipelineStats()
  records = process_records(source, seed=seed, shuffle=shuffle, repeat=repeat,
                             process_index=process_index, process_count=process_count)
  docs = records.map(document_ids(tokenizer)).to_iter_dataset(read_options)
  return (PackIterDataset(docs, seq_len=seq_len, pad_id=tokenizer.pad_id, stats=stats)
          .batch(batch_size, drop_remainder=True))


def num_eval_batches(num_items: int, process_count: int, batch_size: int) -> int:
  """Batches every process yields: enough for the largest process's share."""
  return math.ceil(math.ceil(num_items / process_count) / batch_size)


def _sft_eval(source, tokenizer, *, seq_len, max_prompt_len, batch_size, process_index,
              process_count, too_long, stats, fmt) -> grain.IterDataset:
  _check_sft(seq_len=seq_len, max_prompt_len=max_prompt_len, too_long=too_long)
  records = grain.MapDataset.source(WithSource(source))[process_index::process_count]
  padded_len = num_eval_batches(len(source), process_count, batch_size) * batch_size
  to_example = _sft_record_to_example(tokenizer, seq_len=seq_len, max_prompt_len=max_prompt_len,
                                      too_long=too_long, fmt=fmt)
  padding = SftExample(empty_row(seq_len, tokenizer.pad_id), "padding")
  accountant = _Accountant(stats, too_long, epoch_size=len(source), seq_len=seq_len,
                           pad_id=tokenizer.pad_id, keep_skipped_as_padding=True)

  def example_at(i: int) -> SftExample:
    return to_example(records[i]) if i < len(records) else padding

  def account(example: SftExample) -> dict[str, np.ndarray]:
    if example is not padding:
      accountant.keep(example)
    return accountant.row(example)

  return (grain.MapDataset.range(padded_len).map(example_at).to_iter_dataset()
          .map(account).batch(batch_size))


def _pretrain_eval(source, tokenizer, *, seq_len, batch_size, process_index, process_count,
                   stats) -> grain.IterDataset:
  # Packs the whole source in order on every process (so rows are the same everywhere)
  # and keeps every process_count-th row; only this process's rows stay in memory.
  to_ids = document_ids(tokenizer)
  records = WithSource(source)

  def docs():
    for i in range(len(records)):
      stats.examples += 1
      yield to_ids(records[i])

  rows, num_rows = [], 0
  for num_rows, row in enumerate(pack_documents(docs(), seq_len, tokenizer.pad_id), start=1):
    if (num_rows - 1) % process_count == process_index:
      rows.append(row)
  padded_len = num_eval_batches(num_rows, process_count, batch_size) * batch_size
  rows += [empty_row(seq_len, tokenizer.pad_id)] * (padded_len - len(rows))
  return grain.MapDataset.source(rows).batch(batch_size).to_iter_dataset()


def eval_dataset(source: Sequence[dict], tokenizer: TokenizerLike, *, kind: str, seq_len: int,
                 batch_size: int, max_prompt_len: int | None = None, process_index: int = 0,
                 process_count: int = 1, too_long: str = "truncate",
                 stats: PipelineStats | None = None, fmt: Format = Format()
                 ) -> grain.IterDataset:
  """One ordered pass over `source` in full batches, padded with all-zero-mask rows.

  Every process yields the same number of batches and, over all processes, every record
  is used exactly once (SFT: records `[process_index::process_count]`; pretraining: the
  whole source is packed in order and rows are dealt out `[process_index::process_count]`).
  An SFT record that too_long="skip" rejects becomes an all-zero-mask row, so batch
  counts stay equal across processes.

  Args:
    kind: "sft" (needs max_prompt_len) or "pretrain".
    fmt: how an SFT record's prompt and completion join (`formatting`).
  """
  check_batch_shapes(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                process_count=process_count)
  stats = stats if stats is not None else PipelineStats()
  if kind == "sft":
    if max_prompt_len is None:
      raise InputError("max_prompt_len", "is required for kind='sft'")
    return _sft_eval(source, tokenizer, seq_len=seq_len, max_prompt_len=max_prompt_len,
                     batch_size=batch_size, process_index=process_index,
                     process_count=process_count, too_long=too_long, stats=stats, fmt=fmt)
  if kind == "pretrain":
    return _pretrain_eval(source, tokenizer, seq_len=seq_len, batch_size=batch_size,
                          process_index=process_index, process_count=process_count, stats=stats)
  raise InputError("kind", f"must be 'sft' or 'pretrain', got {kind!r}")


# ----------------------------------------------------------------------------- PPO prompts
#
# PPO's rollouts start from prompts alone. Each element is one prompt, LEFT-padded (the sampler
# appends the response after the last column) or cut to its last `prompt_len` tokens:
#
#   tokens  int32 [B, P]  pad_id, then the prompt's ids
#   mask    int32 [B, P]  1 on the prompt's ids
#   index   int32 [B]     the record's index in the source (to find its text again)


def left_padded_prompt(ids: Sequence[int], prompt_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One prompt row; a longer prompt keeps its last `prompt_len` tokens (nearest the answer)."""
  ids = list(ids)[-prompt_len:]
  tokens = np.full([prompt_len], pad_id, np.int32)
  mask = np.zeros([prompt_len], np.int32)
  if ids:
    tokens[prompt_len - len(ids):] = ids
    mask[prompt_len - len(ids):] = 1
  return {"tokens": tokens, "mask": mask}


class _PromptExample(NamedTuple):
  row: dict[str, np.ndarray]
  truncated: bool


def prompt_dataset(source: Sequence[dict], tokenizer: TokenizerLike, *, prompt_len: int,
                   batch_size: int, seed: int, shuffle: bool = True, repeat: bool = True,
                   process_index: int = 0, process_count: int = 1,
                   stats: PipelineStats | None = None,
                   read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """Batches of left-padded prompts for this process (layout above), for PPO rollouts.

  Args:
    source: random-access records with "prompt" (str or UTF-8 bytes) and optionally "source".
      A prompt without tokens is an InputError naming its source.
    prompt_len: P; a longer prompt is cut at the front and counted in `stats.truncated`.
  Shuffling, epochs (reshuffled each), multi-host slicing and checkpointable iterators are
  those of `sft_dataset`.
  """
  check_batch_shapes(seq_len=max(prompt_len, 2), batch_size=batch_size, process_index=process_index,
                process_count=process_count)
  if prompt_len < 1:
    raise InputError("prompt_len", f"must be at least 1, got {prompt_len}")
  stats = stats if stats is not None else PipelineStats()
  indexed = grain.MapDataset.range(len(source)).map(lambda i: (i, WithSource(source)[i]))
  if shuffle:
    _check_seed(seed)
    indexed = indexed.shuffle(seed)
  indexed = indexed[process_index::process_count]
  if len(indexed) == 0:
    raise InputError(f"process {process_index}", f"gets no prompts: the source has "
                     f"{len(source)} for {process_count} processes")
  if repeat:
    indexed = indexed.repeat()

  def to_example(item) -> _PromptExample:
    index, record = item
    ids = tokenizer.encode(text_field(record, "prompt"))
    if not ids:
      raise InputError(record_where(record), "prompt has no tokens")
    row = left_padded_prompt(ids, prompt_len, tokenizer.pad_id)
    row["index"] = np.int32(index)
    return _PromptExample(row, len(ids) > prompt_len)

  def account(example: _PromptExample) -> dict[str, np.ndarray]:
    # In the consuming thread, so counts follow what was delivered, not what was prefetched.
    stats.examples += 1
    stats.truncated += int(example.truncated)
    return example.row

  return (indexed.map(to_example).to_iter_dataset(read_options).map(account)
          .batch(batch_size, drop_remainder=True))
