"""What the record builders share: input configs keyed by a hash, derived validation split.

A builder's config holds the input files per split. Its name is a hash of those files'
absolute paths, sizes and modification times (and of the record format's version), so
that TFDS stores each distinct input set in its own directory,
`data_dir/<builder>/<config name>/<version>/`, and a second build over the same,
unchanged files finds the finished directory and does nothing. Editing, replacing or
adding an input file changes the hash and so triggers a fresh build next to the old one.
"""
import abc
import dataclasses
import hashlib
import json
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


class RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the record builders: string features plus `source`, in input order.

  Subclasses set FIELDS and `read_records`. Registration with the TFDS catalogue is
  skipped: these builders are only ever constructed with an explicit `InputsConfig`.
  """
  VERSION = BUILDER_VERSION
  BUILDER_CONFIGS = []
  FIELDS: tuple[str, ...] = ()

  @abc.abstractmethod
  def read_records(self, path: str) -> Iterator[dict[str, str]]:
    """Yields validated records of one file, each with a `source` field."""

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

