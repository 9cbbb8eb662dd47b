"""trainers/workdirs: reading a finished stage's workdir back."""
import json

import pytest

from instructjax.errors import InputError
from instructjax.trainers import workdirs


def test_a_workdir_or_its_checkpoints_directory_names_the_same_stage(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text(json.dumps({"stage": "ppo", "seed": 3}))
  for path in (str(tmp_path), str(tmp_path / "checkpoints"), str(tmp_path) + "/"):
    assert workdirs.stage_dir(path) == str(tmp_path)
    assert workdirs.read_config(path).seed == 3
  assert workdirs.policy_path(workdirs.read_config(str(tmp_path))) == ("params", "policy")


def test_a_missing_config_is_none_or_an_error_naming_the_file_and_the_need(tmp_path):
  assert workdirs.read_config(str(tmp_path)) is None
  with pytest.raises(InputError, match=r"config\.json.*a reward model"):
    workdirs.read_config(str(tmp_path), required="a reward model")
  assert workdirs.policy_path(None) == ("params",)


def test_a_stage_started_from_another_takes_its_architecture_and_keeps_its_runtime(tmp_path):
  import tiny
  from instructjax.trainers import common
  sft = tiny.lm_config("sft")
  tokenizer = common.tokenizer_from_config(sft)
  with sft.unlocked():
    sft.model.update(d_model=48, n_layers=3, n_heads=3, dtype="float32")
  sft_cfg = common.model_config(sft, tokenizer)
  common.save_config(str(tmp_path / "sft"), sft, sft_cfg)
  stored = json.load(open(tmp_path / "sft" / "config.json"))
  assert stored["resolved_model"]["d_model"] == 48 and stored["model"]["d_model"] == 48

  rm = tiny.reward_config(init_from=str(tmp_path / "sft"))
  with rm.unlocked():
    rm.model.update(d_model=256, remat="full", dtype="bfloat16")  # sizes ignored, runtime kept
  rm_cfg = common.model_config(rm, tokenizer)
  assert (rm_cfg.d_model, rm_cfg.n_layers, rm_cfg.n_heads) == (48, 3, 3)
  assert (rm_cfg.remat, rm_cfg.dtype) == ("full", "bfloat16")
  assert rm_cfg.vocab_size == sft_cfg.vocab_size
  # Without init_from, a stage's own section decides.
  with rm.unlocked():
    rm.init_from = ""
  assert common.model_config(rm, tokenizer).d_model == 256


def test_a_stage_refuses_a_source_trained_with_another_tokenizer(tmp_path):
  import tiny
  from instructjax.trainers import common
  sft = tiny.lm_config("sft")
  tokenizer = common.tokenizer_from_config(sft)
  common.save_config(str(tmp_path / "sft"), sft, common.model_config(sft, tokenizer))
  stored = json.load(open(tmp_path / "sft" / "config.json"))
  stored["tokenizer"] = {"kind": "gpt2", "path": str(tmp_path / "elsewhere")}
  json.dump(stored, open(tmp_path / "sft" / "config.json", "w"))
  rm = tiny.reward_config(init_from=str(tmp_path / "sft"))
  with pytest.raises(InputError, match=r"config.init_from: .*sft was trained with tokenizer "
                     r"\{'kind': 'gpt2'"):
    common.model_config(rm, tokenizer)
