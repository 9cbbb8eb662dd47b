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
