"""The model's forward against logits that transformers computed once, checked without torch.

A tiny GPT-2 and a tiny Llama with fixed weights (numpy's legacy RandomState, whose stream never
changes, in Hugging Face's tensor names and layouts) are written as HF checkpoints, imported with
`hf.import_hf` and run; their logits must match `golden/hf_logits.npz`, which transformers
computed from the same files. So a wrong formula in the forward (a rotary-embedding sign, a norm,
an activation, a head split) or in the import mapping fails on every run, torch or not; the
transformers parity tests in test_hf.py need torch.

Regenerate the golden file (needs torch and transformers) only when the checkpoints here change,
from the repository root:
    python tests/test_golden_logits.py
"""
import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import parity
from instructjax.models import hf

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "hf_logits.npz"
FLAVOURS = ("gpt2", "llama")
VOCAB, D, LAYERS, HEADS, KV_HEADS, D_FF, MAX_LEN = 96, 32, 2, 4, 2, 64, 32

HF_CONFIGS = {
    "gpt2": dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=VOCAB,
                 n_embd=D, n_layer=LAYERS, n_head=HEADS, n_inner=D_FF, n_positions=MAX_LEN,
                 n_ctx=MAX_LEN, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                 tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                 reorder_and_upcast_attn=False, bos_token_id=0, eos_token_id=0,
                 torch_dtype="float32"),
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB,
                  hidden_size=D, intermediate_size=D_FF, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  max_position_embeddings=MAX_LEN, rms_norm_eps=1e-6, hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                  torch_dtype="float32"),
}

# Left-padded rows of different lengths (positions come from the mask) and one full row.
TOKENS = np.array([[0, 0, 0, 5, 17, 95, 3, 42],
                   [8, 1, 77, 64, 2, 33, 90, 4],
                   [0, 0, 0, 0, 0, 0, 12, 61]], np.int32)
MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8, [0] * 6 + [1, 1]], np.int32)


def hf_tensors(flavour):
  """(name, shape, kind) of every tensor of the HF checkpoint, in a fixed order."""
  H = D // HEADS
  if flavour == "gpt2":
    out = [("transformer.wte.weight", (VOCAB, D), "w"), ("transformer.wpe.weight", (MAX_LEN, D), "w")]
    for i in range(LAYERS):
      p = f"transformer.h.{i}."
      out += [(p + "ln_1.weight", (D,), "norm"), (p + "ln_1.bias", (D,), "w"),
              (p + "attn.c_attn.weight", (D, 3 * D), "w"), (p + "attn.c_attn.bias", (3 * D,), "w"),
              (p + "attn.c_proj.weight", (D, D), "w"), (p + "attn.c_proj.bias", (D,), "w"),
              (p + "ln_2.weight", (D,), "norm"), (p + "ln_2.bias", (D,), "w"),
              (p + "mlp.c_fc.weight", (D, D_FF), "w"), (p + "mlp.c_fc.bias", (D_FF,), "w"),
              (p + "mlp.c_proj.weight", (D_FF, D), "w"), (p + "mlp.c_proj.bias", (D,), "w")]
    return out + [("transformer.ln_f.weight", (D,), "norm"), ("transformer.ln_f.bias", (D,), "w")]
  out = [("model.embed_tokens.weight", (VOCAB, D), "w")]
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    out += [(p + "input_layernorm.weight", (D,), "norm"),
            (p + "self_attn.q_proj.weight", (HEADS * H, D), "w"),
            (p + "self_attn.k_proj.weight", (KV_HEADS * H, D), "w"),
            (p + "self_attn.v_proj.weight", (KV_HEADS * H, D), "w"),
            (p + "self_attn.o_proj.weight", (D, HEADS * H), "w"),
            (p + "post_attention_layernorm.weight", (D,), "norm"),
            (p + "mlp.gate_proj.weight", (D_FF, D), "w"), (p + "mlp.up_proj.weight", (D_FF, D), "w"),
            (p + "mlp.down_proj.weight", (D, D_FF), "w")]
  return out + [("model.norm.weight", (D,), "norm"), ("lm_head.weight", (VOCAB, D), "w")]


def hf_weights(flavour):
  """Deterministic weights, every one random (norm scales and biases too, so that no swapped or
  transposed tensor can hide): 0.2 N(0, 1), norm scales 1 + 0.2 N(0, 1)."""
  rng = np.random.RandomState(1234 if flavour == "gpt2" else 4321)
  out = {}
  for name, shape, kind in hf_tensors(flavour):
    w = 0.2 * rng.standard_normal(shape)
    out[name] = (w + 1.0 if kind == "norm" else w).astype(np.float32)
  return out


def fingerprint(weights):
  return float(sum(np.abs(w.astype(np.float64)).sum() for w in weights.values()))


def write_checkpoint(flavour, directory):
  """config.json and model.safetensors, as transformers' save_pretrained lays them out."""
  from safetensors.numpy import save_file
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  weights = hf_weights(flavour)
  save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(HF_CONFIGS[flavour], indent=2))
  return weights


@pytest.fixture(scope="module")
def golden():
  if not GOLDEN.is_file():
    pytest.fail(f"{GOLDEN} is missing; regenerate it with `python {__file__}`", pytrace=False)
  with np.load(GOLDEN) as data:
    return {k: data[k] for k in data.files}


def our_logits(cfg, params):
  graphdef = hf.abstract_params(cfg)[0]
  forward = jax.jit(lambda params, tokens, mask: nnx.merge(graphdef, params)(tokens, mask)[0])
  return np.asarray(forward(params, TOKENS, MASK))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_imported_checkpoint_reproduces_the_golden_logits(tmp_path, golden, flavour):
  np.testing.assert_array_equal(golden["tokens"], TOKENS)
  np.testing.assert_array_equal(golden["mask"], MASK)
  weights = write_checkpoint(flavour, tmp_path)
  assert fingerprint(weights) == pytest.approx(float(golden[f"{flavour}_fingerprint"]),
                                               rel=1e-12), "the weights changed: regenerate"
  cfg, params = hf.import_hf(tmp_path)
  assert (cfg.flavour, cfg.vocab_size, cfg.d_model, cfg.n_layers) == (flavour, VOCAB, D, LAYERS)
  expected = golden[f"{flavour}_logits"]
  ours = our_logits(cfg, params)[MASK > 0]
  assert expected.shape == ours.shape == (int(MASK.sum()), VOCAB)
  assert np.abs(expected).max() > 0.5  # logits that actually vary
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_export_writes_back_the_same_tensors(tmp_path, flavour):
  """Import then export gives the checkpoint's own tensors, bit for bit, under the same names:
  a mapping that is wrong both ways (and so still round-trips our own params) fails here."""
  from safetensors.numpy import load_file
  weights = write_checkpoint(flavour, tmp_path / "source")
  cfg, params = hf.import_hf(tmp_path / "source")
  hf.export_hf(params, cfg, tmp_path / "exported", dtype="float32")
  exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
  assert sorted(exported) == sorted(weights)
  for name, value in weights.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


def transformers_logits(directory):
  """What transformers computes for TOKENS/MASK from the checkpoint in `directory`."""
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  return parity.transformers_logits(model, TOKENS, MASK)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_golden_logits_are_what_transformers_computes(tmp_path, golden, flavour):
  """The stored values still agree with transformers (a parity test: needs torch, required in CI)."""
  import parity
  parity.require("torch")
  parity.require("transformers")
  write_checkpoint(flavour, tmp_path)
  reference = transformers_logits(tmp_path)[MASK > 0]
  np.testing.assert_allclose(golden[f"{flavour}_logits"], reference, atol=1e-5, rtol=1e-5)


def regenerate(path=GOLDEN):
  import tempfile
  import torch
  import transformers
  arrays = dict(tokens=TOKENS, mask=MASK,
                versions=np.array([f"torch {torch.__version__}",
                                   f"transformers {transformers.__version__}"]))
  for flavour in FLAVOURS:
    with tempfile.TemporaryDirectory() as directory:
      weights = write_checkpoint(flavour, directory)
      arrays[f"{flavour}_logits"] = transformers_logits(directory)[MASK > 0]
      arrays[f"{flavour}_fingerprint"] = np.float64(fingerprint(weights))
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **arrays)
  print(f"wrote {path} ({path.stat().st_size} bytes): "
        + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
  regenerate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else GOLDEN)
