"""TFDS builder for K-way rankings: the reward model's comparison data.

Each element holds the ranking's `prompt`, its `responses` and `ranks` as JSON text (so
every field is a plain Text feature, as in the other record builders, whatever K is), any
other keys of the record (e.g. the synthetic task's `gold_scores`) as one JSON object
in `extra`, and `source` ("path:line"). `decode` turns an element back into a record.

Records are validated with `rankings.validate_ranking` while building. `on_bad` decides
what an invalid record does: "error" (the default, what `builders.build("rankings", ...)`
uses) raises InputError naming file:line; "skip" leaves it out. A caller that skips must
count and report the skipped records itself (the reward trainer's `check_files` pass does);
the policy is part of the build's identity, so builds with different policies never mix.
"""
import dataclasses
import json
import os
from typing import Any, Iterator, Mapping

from instructjax.data import ranking_batches, rankings
from instructjax.data.builders import base
from instructjax.data.records import iter_jsonl

FIELDS = ("prompt", "responses", "ranks", "extra")
_CORE_KEYS = ("prompt", "responses", "ranks", "source")


@dataclasses.dataclass(eq=False)
class RankingsConfig(base.InputsConfig):
  """Input files per split plus what to do with an invalid ranking ("error" or "skip")."""
  on_bad: str = "error"


def make_config(paths: base.PathsArg, on_bad: str = "error") -> RankingsConfig:
  """The config for these files and policy; its name changes when either changes."""
  rankings.check_on_bad(on_bad)
  inputs = base.make_config(f"rankings/on_bad={on_bad}", paths)
  return RankingsConfig(**{f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)
                           if f.init}, on_bad=on_bad)


def encode(record: Mapping[str, Any], where: str) -> dict[str, str]:
  """A validated ranking record as the builder's string fields."""
  extra = {k: v for k, v in record.items() if k not in _CORE_KEYS}
  return {"prompt": record["prompt"], "responses": json.dumps(record["responses"]),
          "ranks": json.dumps(record["ranks"]), "extra": json.dumps(extra, sort_keys=True),
          "source": where}


def decode(element: Mapping[str, Any]) -> dict[str, Any]:
  """A built element back as {prompt, responses, ranks, source, **extra} (not re-validated)."""
  return ranking_batches.ranking_record(dict(element))


class Rankings(base.RecordsBuilder, skip_registration=True):
  """K-way rankings {prompt, responses, ranks} read from JSONL, validated."""
  FIELDS = FIELDS

  def no_records_problem(self) -> str:
    if getattr(self.builder_config, "on_bad", "error") == "skip":
      return ("has no valid rankings: the file is empty, or every line is blank or an invalid "
              "ranking skipped by on_bad=skip")
    return super().no_records_problem()

  def read_records(self, path: str) -> Iterator[dict[str, str]]:
    on_bad = getattr(self.builder_config, "on_bad", "error")
    for where, value in iter_jsonl(path):
      try:
        record = rankings.validate_ranking(value, where)
      except rankings.RankingProblem:
        if on_bad == "error":
          raise
        continue  # counted by the caller's `rankings.read_rankings` pass
      yield encode(record, where)


def build(paths: base.PathsArg, data_dir: str | os.PathLike,
          on_bad: str = "error") -> dict[str, Any]:
  """Builds (once per distinct input files and policy); returns split -> data source."""
  builder = Rankings(data_dir=os.fspath(data_dir), config=make_config(paths, on_bad),
                     file_format="array_record")
  builder.download_and_prepare(file_format="array_record")
  return {split: builder.as_data_source(split) for split in builder.info.splits}
