"""The last step's checkpoint is written before its evaluation: a failure there never costs the
trained parameters, and the same command then evaluates again instead of training again."""
import json
import os

import pytest

import tiny
from instructjax.trainers import lm, loop, workdirs


def test_a_failing_final_evaluation_keeps_the_checkpoint_and_a_rerun_only_evaluates(tmp_path):
  config, workdir = tiny.lm_config("sft", steps=2), str(tmp_path / "sft")

  def broken(*_):
    raise RuntimeError("the final evaluation broke")

  with pytest.raises(RuntimeError, match="the final evaluation broke"):
    lm.train(config, workdir, extra_eval=broken)
  assert workdirs.latest_step(workdir) == 2
  assert not os.path.exists(os.path.join(workdir, loop.FINAL_EVAL_FILE))
  trained = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]

  final = lm.train(config, workdir, extra_eval=lambda *_: {"late_metric": 1.0})
  assert final["late_metric"] == 1.0 and "eval_loss" in final
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r for r in rows if "loss" in r] == [r for r in trained if "loss" in r]  # no step again
  assert json.load(open(os.path.join(workdir, loop.FINAL_EVAL_FILE)))["late_metric"] == 1.0
  # Finished and evaluated: the same command has nothing left to do.
  assert lm.train(config, workdir, extra_eval=broken) == {}
