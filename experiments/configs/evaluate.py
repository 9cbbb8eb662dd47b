"""Evaluation (InstructGPT section 4, in miniature): GPT, GPT-prompted, SFT, PPO and PPO-ptx on
held-out prompts (the synthetic task's, or your own file's), against SFT, with a report.

Run after the stages you want to compare (any subset; SFT is the baseline of the win rates and
the KL, so give it whenever you can):

  python -m experiments.run --config experiments/configs/evaluate.py --workdir /tmp/eval \
      --config.models.sft=/tmp/sft --config.models.gpt=/tmp/pretrain \
      --config.models.ppo=/tmp/ppo --config.models.ppo_ptx=/tmp/ppo_ptx \
      --config.reward_from=/tmp/rm

On your own data (prepare_data's eval split; GPT may be the Hugging Face checkpoint itself; the
judge is a second reward model trained on a disjoint part of the comparisons; the alignment tax
on the held-out part of the ptx corpus):

  python -m experiments.run --config experiments/configs/evaluate.py --workdir /tmp/eval \
      --config.prompts_file=/tmp/prepared/eval/prompts.jsonl \
      --config.rankings_file=/tmp/prepared/eval/rankings.jsonl \
      --config.models.sft=/tmp/sft --config.models.ppo_ptx=/tmp/ppo_ptx \
      --config.reward_from=/tmp/rm --config.judge_from=/tmp/judge \
      --config.ptx_eval.source=heldout --config.ptx_eval.files=/tmp/corpus.jsonl

(plus the stages' tokenizer and format flags, e.g. --config.tokenizer.kind=gpt2
--config.tokenizer.path=CKPT --config.format.separator=' ').

It writes /tmp/eval/report.md (tables and plots), report.json (every number) and the PNGs.
Responses are greedy by default (low variance with a few hundred prompts);
`--config.greedy=False` samples with the `sampling` section instead. GPT-prompted (the GPT
checkpoint with `few_shot.n_shots` solved examples before each prompt) needs a longer prompt:
`few_shot.prompt_len` + `sampling.max_new_tokens` must fit the model's max_len; the report counts
the few-shot prompts that had to be cut. Variants: `tiny` (default) and `small` (match the
variant the models were trained with; shapes are read from each workdir's config.json).
"""
from ml_collections import config_dict

from experiments.configs import base


def get_config(arg: str = "tiny"):
  size = arg or "tiny"
  c = base.base_config("evaluate")
  # Only for a workdir without config.json; otherwise each model's own section is used.
  c.model = base.model_config(size)
  c.models = config_dict.ConfigDict(dict(gpt="", sft="", ppo="", ppo_ptx=""))
  c.reward_from = ""          # the proxy reward model PPO optimised: its scores and accuracy
  c.judge_from = ""           # a held-out judge reward model: the headline win rate off-task
  # JSONL of {"prompt"} (prepare_data's eval/prompts.jsonl); empty: the synthetic task's split.
  c.prompts_file = ""
  # Held-out rankings for the reward models' accuracy by K (prepare_data's eval/rankings.jsonl);
  # empty: the comparisons the reward model collected, if it did.
  c.rankings_file = ""
  # The RM breakdown also scores this many of its training rankings: an RM that misjudges a kind
  # of pair there as well never learned it (underfitting), rather than overfitting. 0: off.
  c.rm_train_rankings = 256
  c.synthetic = base.synthetic_config()
  c.split = "eval"            # synthetic: held-out prompts, disjoint from every stage's prompts
  c.num_prompts = 256
  c.greedy = True             # False: sample with sampling.temperature/top_k/top_p
  c.sampling = base.sampling_config(prompt_len=64)
  c.sampling.batch_size = 64
  c.few_shot = config_dict.ConfigDict(dict(n_shots=1, prompt_len=104))
  c.kl_from_sft = True        # KL on one temperature-1 sample per prompt from each model
  c.ptx_eval = config_dict.ConfigDict(dict(
      source="synthetic",     # synthetic | files | heldout | none (see PTX_EVAL_SOURCES)
      files="",               # comma-separated text/JSONL files for source=files / heldout
      num_documents=256,      # the pretraining stage's held-out documents (its data.num_eval)
      seq_len=128, batch_size=16, max_batches=0))  # 0 = all of them
  c.confidence = 0.95
  c.report_examples = 5       # prompts whose responses report.md shows
  if size != "tiny":
    c.num_prompts = 512
    c.sampling.prompt_len = 128
    c.few_shot = config_dict.ConfigDict(dict(n_shots=2, prompt_len=224))
    c.ptx_eval.seq_len = 256
  c.lock()
  return c
