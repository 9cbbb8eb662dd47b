"""The sampling entry for people: completions of a trained checkpoint, printed and saved."""
import json

import pytest

from experiments.configs import sample as sample_config
from instructjax.errors import InputError
from instructjax.trainers import sample


def test_samples_from_an_sft_checkpoint_with_gold_scores(tiny_sft_dir, tmp_path, capsys):
  config = sample_config.get_config()
  with config.unlocked():
    config.checkpoint = tiny_sft_dir
    config.num_prompts = 3
    config.sampling.prompt_len = 40
    config.sampling.max_new_tokens = 8
    config.sampling.batch_size = 8
  sample.run(config, str(tmp_path / "out"))
  rows = [json.loads(l) for l in open(tmp_path / "out" / "samples.jsonl")]
  assert len(rows) == 3
  assert all(0.0 <= r["gold_score"] <= 1.0 and isinstance(r["completion"], str) for r in rows)
  assert rows[0]["prompt"] in capsys.readouterr().out

  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "Reverse: abc\\nAnswer:"}\n{"nope": 1}\n')
  with config.unlocked():
    config.prompts_file = str(prompts)
  with pytest.raises(InputError, match="prompts.jsonl:2"):
    sample.run(config, str(tmp_path / "out2"))
  # The user's own prompts (not the task's) sample without a gold score, instead of the gold
  # scorer refusing them.
  prompts.write_text('{"prompt": "\\n\\nHuman: how do I bake bread?\\n\\nAssistant:"}\n')
  sample.run(config, str(tmp_path / "out3"))
  rows = [json.loads(l) for l in open(tmp_path / "out3" / "samples.jsonl")]
  assert len(rows) == 1 and "gold_score" not in rows[0] and "Human:" in rows[0]["prompt"]


def test_a_directory_without_a_trained_config_is_a_clear_error(tmp_path):
  config = sample_config.get_config()
  with config.unlocked():
    config.checkpoint = str(tmp_path)
  with pytest.raises(InputError, match="config.json"):
    sample.run(config, str(tmp_path / "out"))
