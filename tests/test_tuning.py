"""The tiny stage configs agree on the synthetic task and pass its knobs through to TaskConfig."""
import pytest

from experiments.configs import base, pretrain, reward, sft
from instructjax.data.synthetic import INSTRUCTIONS, TaskConfig
from instructjax.errors import InputError
from instructjax.trainers.data_sources import synthetic_task


def test_config_fields_reach_the_task():
  config = sft.get_config("tiny")
  with config.unlocked():
    config.synthetic.instructions = " max , sort"
    config.synthetic.list_len = (3, 3)
    config.synthetic.alphabet = "ab"
    config.synthetic.max_prompt_chars = 40
  task = synthetic_task(config)
  assert task.config.instructions == ("max", "sort")
  assert task.config.list_len == (3, 3) and task.config.alphabet == "ab"
  for prompt in task.prompts(40, "train"):
    problem = task.parse(prompt)
    assert problem.instruction in ("max", "sort") and len(problem.digits) == 3


def test_empty_instructions_mean_all_and_json_lists_are_accepted():
  config = sft.get_config("tiny")
  with config.unlocked():
    config.synthetic.instructions = ""
    config.synthetic.list_len = [2, 5]  # as read back from a stage's config.json
  task = synthetic_task(config)
  assert task.config.instructions == tuple(INSTRUCTIONS)
  assert task.config.list_len == (2, 5)


def test_a_config_without_the_new_fields_gets_the_task_defaults():
  config = sft.get_config("tiny")
  with config.unlocked():
    config.synthetic = base.config_dict.ConfigDict(dict(seed=3, labeler_agreement=0.8))
  assert synthetic_task(config).config == TaskConfig(seed=3, labeler_agreement=0.8)


def test_an_unknown_instruction_is_an_input_error():
  config = sft.get_config("tiny")
  with config.unlocked():
    config.synthetic.instructions = "max,sortt"
  with pytest.raises(InputError, match="sortt"):
    synthetic_task(config)


def test_tiny_stages_share_model_and_task_and_rows_fit_the_longest_demonstration():
  configs = [module.get_config("tiny") for module in (pretrain, sft, reward)]
  assert len({str(c.model) for c in configs}) == 1
  assert len({str(c.synthetic) for c in configs}) == 1
  task = synthetic_task(configs[1])
  longest = max(len(d["prompt"]) + len(d["completion"]) + 1  # + EOS
                for d in task.demonstrations(2_000, "train"))
  for config in configs[1:]:
    assert longest <= config.data.seq_len
    assert task.config.max_prompt_chars <= config.data.max_prompt_len
