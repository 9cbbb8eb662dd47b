"""One scoring rule: the reward model reads a response exactly as the policy emitted it — an EOS
only if one was sampled — in PPO's rollouts, in its own training rows, and in the normalisation
and evaluation, for responses that ended and for responses cut at max_new_tokens."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from instructjax import parallel
from instructjax.data import ranking_batches
from instructjax.data.formatting import Format, encode_pair
from instructjax.data.tokenizers import make_tokenizer
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel, ScalarModel
from instructjax.objectives import ppo
from instructjax.objectives.reward import reward_forward
from instructjax.trainers import common, generate, reward

PROMPTS = ["Sort: 3 1 2\nAnswer:", "Max: 4 9\nAnswer:", "First: 7 1\nAnswer:"]
RESPONSES = [" 1 2 3", " 9 and then some more", ""]
ENDED = [True, False, True]  # the second was cut at max_new_tokens; the third is EOS at once
PROMPT_LEN, NEW_TOKENS, SEQ_LEN = 24, 24, 48


def _split(model):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def _models():
  cfg = ModelConfig(flavour="gpt2", vocab_size=384, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                    max_len=64)
  return (_split(LanguageModel(cfg, rngs=nnx.Rngs(0))), _split(ScalarModel(cfg, rngs=nnx.Rngs(1))),
          _split(ScalarModel(cfg, rngs=nnx.Rngs(2))))


def _rollout(tokenizer):
  """What PPO's sampler hands the score phase: left-padded prompts, then the sampled tokens."""
  prompt_tokens, prompt_mask = generate.left_pad([tokenizer.encode(p) for p in PROMPTS],
                                                 PROMPT_LEN, tokenizer.pad_id)
  response = np.full((len(PROMPTS), NEW_TOKENS), tokenizer.pad_id, np.int32)
  response_mask = np.zeros_like(response)
  for i, (prompt, text, ended) in enumerate(zip(PROMPTS, RESPONSES, ENDED)):
    ids = encode_pair(tokenizer, Format(), prompt, text).response_ids + [tokenizer.eos_id] * ended
    response[i, :len(ids)], response_mask[i, :len(ids)] = ids, 1
  return dict(tokens=jnp.asarray(np.concatenate([prompt_tokens, response], 1)),
              mask=jnp.asarray(np.concatenate([prompt_mask, response_mask], 1)),
              response_mask=jnp.asarray(response_mask))


def test_ppo_training_and_normalisation_score_the_same_tokens_alike():
  tokenizer = make_tokenizer("byte")
  (policy_gd, policy), (value_gd, value), (rm_gd, rm) = _models()
  frozen = dict(reference=policy, reward=rm, reward_gain=jnp.float32(1.0),
                reward_bias=jnp.float32(0.0))
  scored = ppo.score_phase(dict(policy=policy, value=value), frozen, _rollout(tokenizer),
                           policy_graphdef=policy_gd, value_graphdef=value_gd,
                           reward_graphdef=rm_gd, cfg=ppo.PPOConfig(), eos_id=tokenizer.eos_id)
  np.testing.assert_array_equal(scored["ended"], ENDED)
  in_ppo = np.asarray(scored["score_raw"])

  in_training = []
  for prompt, text, ended in zip(PROMPTS, RESPONSES, ENDED):
    record = {"prompt": prompt, "responses": [text, "x"], "ranks": [0, 1], "ended": [ended, True]}
    rows = ranking_batches.tokenize_ranking(record, tokenizer, seq_len=SEQ_LEN,
                                            max_prompt_len=PROMPT_LEN, max_k=2)
    last = rows["tokens"][0, int(rows["mask"][0].sum()) - 1]
    assert (last == tokenizer.eos_id) == ended  # an EOS only where one was sampled
    in_training.append(float(reward_forward(rm, rm_gd, jnp.asarray(rows["tokens"][None]),
                                            jnp.asarray(rows["mask"][None]))[0, 0]))

  layout = common.Layout(parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                            jax.devices()[:1]), parallel.DEFAULT_RULES)
  in_normalisation = reward.score_texts(rm, rm_gd, tokenizer, PROMPTS, RESPONSES,
                                        seq_len=SEQ_LEN, max_prompt_len=PROMPT_LEN, batch_size=4,
                                        layout=layout, fmt=Format(), ended=ENDED)
  np.testing.assert_allclose(in_training, in_ppo, atol=1e-5)
  np.testing.assert_allclose(in_normalisation, in_ppo, atol=1e-5)
  # The rule matters: reading the cut response with an EOS appended gives another score.
  with_eos = reward.score_texts(rm, rm_gd, tokenizer, PROMPTS, RESPONSES, seq_len=SEQ_LEN,
                                max_prompt_len=PROMPT_LEN, batch_size=4, layout=layout,
                                fmt=Format())
  assert abs(with_eos[1] - in_ppo[1]) > 1e-4
  np.testing.assert_allclose(with_eos[[0, 2]], in_ppo[[0, 2]], atol=1e-5)


def test_ranking_records_say_which_sampled_responses_ended():
  import pytest
  from instructjax.data.rankings import validate_ranking
  from instructjax.errors import InputError
  sampled = {"prompt": "p", "responses": ["an answer", ""], "ranks": [0, 1], "ended": [False, True]}
  assert validate_ranking(sampled, "collected")["ended"] == [False, True]  # an empty sample too
  with pytest.raises(InputError, match="f.jsonl:3.*'ended' must be 2 booleans"):
    validate_ranking(dict(sampled, ended=[True]), "f.jsonl:3")
  with pytest.raises(InputError, match="responses\\[1\\] is empty"):  # written data: an error
    validate_ranking({k: v for k, v in sampled.items() if k != "ended"}, "f.jsonl:4")
