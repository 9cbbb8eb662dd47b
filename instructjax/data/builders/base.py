"""What the record builders share: input configs keyed by a hash, derived validation split.

A builder's config holds the input files per split. Its name is a hash of those files'
absolute paths, sizes and modification times (and of the record format's version), so
that TFDS stores each distinct input set in its own directory,
`data_dir/<builder>/<config name>/<version>/`, and a second build over the same,
unchanged files finds the finished directory and does nothing. Editing, replacing or
adding an input file changes the hash and so triggers a fresh build next to the old one.

Before a build, every input file must hold at least one record (InputError naming the file
otherwise), and the build announces itself with one line, `[data] building NAME from FILE
(offline)`, in place of TFDS's download messages: nothing here is ever downloaded.
"""
import abc
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Iterable, Iterator, Mapping, Sequence

import tensorflow_datasets as tfds

from instructjax.errors import InputError

# Bump when the stored features or the way records are read change, so that old
# builds of the same input files are not reused.
RECORD_FORMAT_VERSION = "1"
BUILDER_VERSION = tfds.core.Version("1.0.0")
TRAIN, VALIDATION = "train", "validation"
# When only a train split is given, every VALIDATION_EVERY-th record (evenly spaced) is
# held out as validation, but at least one when there are two or more records. A
# single record (e.g. one big text file) may instead be cut in two by the builder.
VALIDATION_EVERY = 20
_SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# TFDS warns with this (and the whole config) for every builder given an explicit config, which
# is how every builder here is made: not news to the user, so it is not shown.
_CUSTOM_CONFIG_WARNING = "Using custom data configuration"

PathsArg = Mapping[str, "str | os.PathLike | Sequence[str | os.PathLike]"]


@dataclasses.dataclass(eq=False)
class InputsConfig(tfds.core.BuilderConfig):
  """A builder config naming the input files per split (absolute paths, in order).

  Attributes:
    paths: split name -> input files, read in the given order.
    derive_validation: hold out a validation split from "train" (set when "train" is
      the only split given).
  """
  paths: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  derive_validation: bool = False


def _normalise_paths(paths: PathsArg) -> dict[str, tuple[str, ...]]:
  if not paths:
    raise InputError("paths", "no splits given; expected e.g. {'train': ['data.jsonl']}")
  result = {}
  for split, files in paths.items():
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
      raise InputError("paths", f"split name {split!r} must be letters, digits and _")
    if isinstance(files, (str, os.PathLike)):
      files = [files]
    files = [os.path.abspath(os.fspath(f)) for f in files]
    if not files:
      raise InputError(f"paths[{split!r}]", "no input files")
    for f in files:
      if not os.path.isfile(f):
        raise InputError(f, "no such file")
    result[split] = tuple(files)
  return result


def _fingerprint(kind: str, paths: dict[str, tuple[str, ...]]) -> str:
  """Hash of the inputs' identity: cheap (no reading), changes when any file changes."""
  listing = {
      split: [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
      for split, files in sorted(paths.items())
  }
  blob = json.dumps([RECORD_FORMAT_VERSION, kind, listing], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_config(kind: str, paths: PathsArg) -> InputsConfig:
  """The config for these input files; its name changes whenever an input changes."""
  paths = _normalise_paths(paths)
  return InputsConfig(
      name=f"inputs_{_fingerprint(kind, paths)}",
      version=BUILDER_VERSION,
      description=json.dumps(paths),
      paths=paths,
      derive_validation=set(paths) == {TRAIN},
  )


def num_held_out(num_records: int) -> int:
  """How many of `num_records` train records the derived validation split takes."""
  if num_records < 2:
    return 0
  return max(1, num_records // VALIDATION_EVERY)


def is_held_out(index: int, num_records: int) -> bool:
  """Whether train record `index` goes to the derived validation split.

  Picks `num_held_out` records spread evenly over the whole input, so validation sees
  every file and not just the tail of the last one; depends only on positions, so the
  split is the same on every machine and every rebuild.
  """
  k = num_held_out(num_records)
  return (index + 1) * k // num_records > index * k // num_records


class _DropMessage(logging.Filter):
  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _without_absl_message(prefix: str):
  """Drops absl log records (TFDS logs through absl) whose message starts with `prefix`."""
  absl_logger = logging.getLogger("absl")
  drop = _DropMessage(prefix)
  absl_logger.addFilter(drop)
  try:
    yield
  finally:
    absl_logger.removeFilter(drop)


def _describe_files(files: Sequence[str]) -> str:
  """"a.jsonl", or "a.jsonl and 2 more files": the inputs of a build, in one short phrase."""
  more = len(files) - 1
  return files[0] + (f" and {more} more file{'s' if more > 1 else ''}" if more else "")


class RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the record builders: string features plus `source`, in input order.

  Subclasses set FIELDS and `read_records`. Registration with the TFDS catalogue is
  skipped: these builders are only ever constructed with an explicit `InputsConfig`.
  """
  VERSION = BUILDER_VERSION
  BUILDER_CONFIGS = []
  FIELDS: tuple[str, ...] = ()

  def __init__(self, **kwargs):
    with _without_absl_message(_CUSTOM_CONFIG_WARNING):
      super().__init__(**kwargs)

  @abc.abstractmethod
  def read_records(self, path: str) -> Iterator[dict[str, str]]:
    """Yields validated records of one file, each with a `source` field."""

  def no_records_problem(self) -> str:
    """What is wrong with an input file from which `read_records` yields nothing."""
    return "has no records: the file is empty or holds only blank lines"

  def _has_a_record(self, path: str) -> bool:
    for _ in self.read_records(path):  # reads (and validates) up to the first record only
      return True
    return False

  def check_every_file_has_records(self) -> None:
    """An input file without records is refused before anything is written: TFDS would only
    fail at the end, with "No examples were yielded", naming neither the file nor the cause."""
    for files in self.builder_config.paths.values():
      for path in files:
        if not self._has_a_record(path):
          raise InputError(path, self.no_records_problem())

  def download_and_prepare(self, **kwargs) -> None:
    """TFDS's build (which does nothing when this exact build exists), preceded by the input
    check and one line of our own. Nothing is downloaded: the inputs are local files."""
    if not self.data_path.exists():
      self.check_every_file_has_records()
      files = [f for split in self.builder_config.paths.values() for f in split]
      print(f"[data] building {self.name} from {_describe_files(files)} (offline)", flush=True)
    super().download_and_prepare(**kwargs)

  # TFDS prints "Downloading and preparing dataset Unknown size (download: Unknown size, ...)"
  # and "Dataset ... downloaded and prepared" (termcolor, straight to stdout, whatever the log
  # level): on an offline machine they read like network access. The line above replaces them.
  # These are TFDS's private hooks (4.9); tests/test_input_files.py notices if they are renamed.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    features = {name: tfds.features.Text() for name in (*self.FIELDS, "source")}
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict(features),
        # Keep the input order: makes builds reproducible and `source` easy to follow.
        disable_shuffling=True,
    )

  def _read_all(self, files: Sequence[str]) -> Iterator[dict[str, str]]:
    for path in files:
      yield from self.read_records(path)

  def _split_generators(self, dl_manager):
    del dl_manager  # Inputs are local files.
    config = self.builder_config
    if not config.derive_validation:
      return {split: self._generate_examples(files) for split, files in config.paths.items()}
    files = config.paths[TRAIN]
    # A first pass counts (and validates) every record before anything is written.
    count = sum(1 for _ in self._read_all(files))
    if count == 1:
      parts = self.split_single_record(next(self._read_all(files)))
      if parts is not None:
        return {TRAIN: self._enumerate([parts[0]]), VALIDATION: self._enumerate([parts[1]])}
    splits = {TRAIN: self._generate_examples(files, count=count, held_out=False)}
    if num_held_out(count):
      splits[VALIDATION] = self._generate_examples(files, count=count, held_out=True)
    return splits

  def split_single_record(
      self, record: dict[str, str]) -> tuple[dict[str, str], dict[str, str]] | None:
    """(train part, validation part) of the only train record, or None to not split it."""
    del record
    return None

  def _enumerate(self, records: Iterable[dict[str, str]]):
    for index, record in enumerate(records):
      yield index, {name: record[name] for name in (*self.FIELDS, "source")}

  def _generate_examples(self, files, count=None, held_out=None):
    records = self._read_all(files)
    if held_out is not None:
      records = (r for i, r in enumerate(records) if is_held_out(i, count) == held_out)
    return self._enumerate(records)

