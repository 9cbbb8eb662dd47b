"""TFDS builders that turn validated record files into array_record datasets.

`build("demonstrations" | "text" | "rankings", {"train": [...], "validation": [...]}, data_dir)`
writes (once per distinct set of input files) and returns random-access sources, one per
split, whose elements are dicts of UTF-8 `bytes`: the record's fields plus `source`
("path:line"). Reading uses no TensorFlow: TFDS array_record data sources only.
"""
import os
from typing import Any

import tensorflow_datasets as tfds

from instructjax.data.builders.base import (InputsConfig, PathsArg, TRAIN, VALIDATION,
                                            is_held_out, make_config, num_held_out)
from instructjax.data.builders.demonstrations import Demonstrations
from instructjax.data.builders.rankings import Rankings
from instructjax.data.builders.text_corpus import TextCorpus
from instructjax.errors import InputError

BUILDERS = {"demonstrations": Demonstrations, "text": TextCorpus, "rankings": Rankings}
# A random-access source: `len(source)` and `source[i]` -> dict of bytes.
RandomAccessSource = Any


def builder_for(kind: str, paths: PathsArg,
                data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """The builder of `kind` configured for these input files (nothing is built yet)."""
  if kind not in BUILDERS:
    raise InputError("kind", f"unknown record kind {kind!r}; expected one of {sorted(BUILDERS)}")
  return BUILDERS[kind](data_dir=os.fspath(data_dir), config=make_config(kind, paths),
                        file_format="array_record")


def build(kind: str, paths: PathsArg, data_dir: str | os.PathLike) -> dict[str, RandomAccessSource]:
  """Builds the dataset unless an identical build exists; returns split -> data source.

  Args:
    kind: "demonstrations", "text" or "rankings" (see `builders.rankings`).
    paths: split name -> one path or a list of paths. With only "train", a
      "validation" split is held out of it deterministically (every 20th record, at
      least one; none for a single record).
    data_dir: where TFDS keeps the built datasets.
  """
  builder = builder_for(kind, paths, data_dir)
  builder.download_and_prepare(file_format="array_record")
  return {split: builder.as_data_source(split) for split in builder.info.splits}


__all__ = ["BUILDERS", "Demonstrations", "InputsConfig", "RandomAccessSource", "Rankings", "TRAIN",
           "TextCorpus", "VALIDATION", "build", "builder_for", "is_held_out", "make_config",
           "num_held_out"]
