"""A researcher's own model and data through the first two stages, as docs/huggingface.md
("Training from a checkpoint stage by stage") runs them: a random GPT-2-shaped Hugging Face
checkpoint (written here with `hf.export_hf`, with a tiny GPT-2-style tokenizer beside it),
HH-RLHF records prepared with `experiments.prepare_data`, then SFT from `model.init_from_hf` and
the reward model from the SFT workdir, each with the data flags prepare_data prints, through the
stage runner `experiments.run` calls.
"""
import json
import pathlib
import shlex

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tiny
from experiments import prepare_data
from experiments.configs import reward as reward_configs
from experiments.configs import sft as sft_configs
from instructjax.data import pipeline
from instructjax.data import tokenizers as tk
from instructjax.models import hf
from instructjax.models.config import ModelConfig
from instructjax.trainers import common, lm, stages

H, A = "\n\nHuman:", "\n\nAssistant:"
# Merges over GPT-2's byte alphabet in which a word takes its leading space ("Ġ"), as GPT-2's do,
# so that encoding a prompt and its response apart would give other ids than the document.
MERGES = ["Ġ T", "h i", "hi n", "hin g", "ĠT hing", "Ġ i", "Ġ n", "i c", "ic e", "Ġn ice",
          "Ġ N", "ĠN o", "Ġ H", "e l", "el l", "ell o", "ĠH ello", "Ġ t", "Ġt hing", "Ġ q"]
D_MODEL = 40  # not the `tiny` config's 128: the checkpoint decides the architecture


def write_tokenizer(directory: pathlib.Path) -> tk.Tokenizer:
  """GPT-2's files (vocab.json + merges.txt) for a tiny vocabulary: 256 bytes, the merges,
  <|endoftext|>."""
  return tk.make_tokenizer("gpt2", tiny.write_gpt2_files(directory, MERGES))


def write_checkpoint(directory: pathlib.Path) -> tuple[pathlib.Path, tk.Tokenizer]:
  """A random GPT-2-shaped HF checkpoint with its tokenizer files, as a user would have one."""
  tokenizer = write_tokenizer(directory)
  cfg = ModelConfig(flavour="gpt2", vocab_size=tokenizer.vocab_size, d_model=D_MODEL, n_layers=1,
                    n_heads=2, d_ff=4 * D_MODEL, max_len=128)
  rng = np.random.default_rng(0)
  _, abstract = hf.abstract_params(cfg)
  params = jax.tree.map(lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape, np.float32)),
                        nnx.to_pure_dict(abstract))
  hf.export_hf(params, cfg, directory,
               extra_config={"eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.eos_id})
  return directory, tokenizer


def hh_records(n=24):
  rows = []
  for i in range(n):
    prefix = f"{H} Hi {i}?{A} Hello.{H} A thing {i}?{A}"
    rows.append({"chosen": f"{prefix} Thing {i} is nice.", "rejected": f"{prefix} No."})
  return rows


def stage_flags(printed: str) -> dict[str, dict[str, str]]:
  """{stage: {config field: value}} from the flags prepare_data prints."""
  flags = {}
  for line in printed.splitlines():
    stage, _, rest = line.strip().partition(":")
    if stage in ("sft", "reward") and rest.strip().startswith("--config."):
      flags[stage] = dict(word.removeprefix("--config.").split("=", 1)
                          for word in shlex.split(rest))
  return flags


def configure(config, overrides: dict):
  """Overrides `--config.a.b=value` style, each value parsed as its field's type."""
  with config.unlocked():
    for key, value in overrides.items():
      *parents, leaf = key.split(".")
      section = config
      for parent in parents:
        section = section[parent]
      section[leaf] = type(section[leaf])(value) if isinstance(value, str) else value
  return config


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_sft_and_reward_model_from_prepared_data_on_a_hugging_face_checkpoint(tmp_path, capsys):
  ckpt, tokenizer = write_checkpoint(tmp_path / "ckpt")
  data = tmp_path / "hh.jsonl"
  data.write_text("".join(json.dumps(row) + "\n" for row in hh_records()), encoding="utf-8")
  assert prepare_data.main(["hh_rlhf", "--in", str(data), "--out", str(tmp_path / "data"),
                            "--fractions", "sft=0.5,rm=0.5", "--holdout", "0.2"]) == 0
  flags = stage_flags(capsys.readouterr().out)
  assert flags["sft"]["format.separator"] == flags["reward"]["format.separator"] == " "
  common_flags = {"tokenizer.kind": "gpt2", "tokenizer.path": str(ckpt), "batch_size": 8,
                  "log_every": 1, "eval_every": 2, "save_every": 2, "eval_batches": 1,
                  "optimizer.warmup_steps": 1}

  sft = configure(sft_configs.get_config("tiny"), {
      **common_flags, **flags["sft"], "model.init_from_hf": str(ckpt), "steps": 2})
  final = stages.stage_runner(sft.stage)(sft, str(tmp_path / "sft"))
  assert np.isfinite(final["eval_loss"])
  metrics = read_metrics(tmp_path / "sft")
  assert max(m["step"] for m in metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics
                                                       if "loss" in m)
  # Every SFT pair was cut on a token boundary (none fell back to separate encodings).
  assert [m["boundary_cases"] for m in metrics if "boundary_cases" in m][-1] == 0

  rm = configure(reward_configs.get_config("tiny"), {
      **common_flags, **flags["reward"], "init_from": str(tmp_path / "sft"), "steps": 2,
      "normalisation_prompts": 8, "sampling.batch_size": 8, "sampling.max_new_tokens": 4})
  final = stages.stage_runner(rm.stage)(rm, str(tmp_path / "rm"))
  assert 0 <= final["eval_accuracy"] <= 1 and np.isfinite(final["normalisation_gain"])
  assert max(m["step"] for m in read_metrics(tmp_path / "rm")) == 2
  assert (tmp_path / "rm" / "reward_normalisation.json").is_file()

  # The reward model took the checkpoint's architecture through the SFT workdir.
  for stage in ("sft", "rm"):
    written = json.loads((tmp_path / stage / "config.json").read_text())
    assert written["resolved_model"]["d_model"] == D_MODEL
    assert written["resolved_model"]["n_layers"] == 1
    assert written["resolved_model"]["position"] == "learned"

  # SFT trained on the documents' own ids: prompt + " " + completion encoded as one text, then
  # EOS, with the loss from where the prompt's ids end. The rows are the trainer's own first
  # batch (`lm.datasets` on the SFT workdir's built records).
  demonstrations = [json.loads(line) for line in pathlib.Path(flags["sft"]["data.train_files"])
                    .read_text().splitlines()]
  expected = {}
  for record in demonstrations:
    ids = tokenizer.encode(record["prompt"] + " " + record["completion"]) + [tokenizer.eos_id]
    expected[tuple(ids)] = len(tokenizer.encode(record["prompt"]))
    apart = tokenizer.encode(record["prompt"]) + tokenizer.encode(record["completion"])
    assert apart != ids[:-1]  # the test's tokenizer tells the two apart
  train_ds, _ = lm.datasets(sft, str(tmp_path / "sft"), common.tokenizer_from_config(sft),
                            sft.batch_size, pipeline.PipelineStats())
  batch = next(iter(train_ds))
  for tokens, mask, loss_mask in zip(batch["tokens"], batch["mask"], batch["loss_mask"]):
    row = tuple(tokens[:int(mask.sum())].tolist())
    assert row in expected, tokenizer.decode(list(row))
    assert loss_mask.nonzero()[0].tolist() == list(range(expected[row], len(row)))
