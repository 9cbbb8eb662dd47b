"""Which trainer runs each `config.stage` (kept apart from experiments/run.py, whose absl flags can
be defined only once per process)."""
import importlib

# config.stage -> the module under instructjax/trainers whose `run(config, workdir)` runs it.
STAGES = {
    "pretrain": "lm",
    "sft": "lm",
    "reward": "reward",
    "ppo": "ppo",
    "sample": "sample",
    "evaluate": "evaluate",
    "pipeline": "pipeline",
}


def stage_runner(stage: str):
  """The `run(config, workdir)` of a stage, imported lazily so that `--help` stays fast."""
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r} is not one of {sorted(STAGES)}")
  return importlib.import_module(f"instructjax.trainers.{STAGES[stage]}").run
