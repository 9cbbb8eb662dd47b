"""The one entry point: `python -m experiments.run --config experiments/configs/X.py[:arg] --workdir DIR`.

It parses the config (locked: a mistyped `--config.field=value` is an error) and hands it to the
stage named by `config.stage`. Re-running the same command on the same workdir resumes; a
pipeline refuses stages whose config changed, and `--rerun=STAGE[,STAGE]` runs them again.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
_RERUN = flags.DEFINE_list(
    "rerun", [], "Pipeline only: stages to delete from the workdir and run again with this "
    "config, with every stage built from them (e.g. --rerun=sft reruns SFT, the RM, both PPO "
    "runs and the evaluation).")


def _parse_flags(argv):
  """absl's parser, but a bad `--config.x=y` override (ml_collections raises it as an
  AttributeError or KeyError from inside flag parsing) ends in one line naming the field, not a
  traceback from the config library."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections nests the KeyError's repr in the AttributeError's: unwrap both.
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    message = "; ".join(line.strip("'\" ") for line in text.splitlines() if line.strip("'\" "))
    print(f"error: bad --config override: no field {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  from instructjax import parallel
  from instructjax.trainers import stages
  from instructjax.errors import InputError
  from instructjax.metrics import NonFiniteLossError
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file they touch at INFO
  config = _CONFIG.value
  if config is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  parallel.maybe_initialize_distributed(config.get("distributed", False))
  os.makedirs(_WORKDIR.value, exist_ok=True)
  try:
    runner = stages.stage_runner(config.stage)
  except ValueError as e:
    raise app.UsageError(str(e))
  if _RERUN.value and config.stage != "pipeline":
    raise app.UsageError("--rerun is for a pipeline config (config.stage='pipeline'); a single "
                         "stage resumes its workdir, or starts afresh in a new one")
  kwargs = {"rerun": _RERUN.value} if config.stage == "pipeline" else {}
  try:
    runner(config, _WORKDIR.value, **kwargs)
  except InputError as e:  # bad input: one clear line, no traceback from inside jax
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except NonFiniteLossError as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  from experiments import host
  host.reexec("experiments.run", sys.argv[1:])
  app.run(main, flags_parser=_parse_flags)
