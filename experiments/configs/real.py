"""Real-model runs: GPT-2 small or a ~1B Llama (TinyLlama-1.1B shape) on your own files, on a TPU
v5e-16 pod or an 8-GPU host. The argument is `MODEL,HARDWARE,STAGE`:

  # convert the public checkpoint once (local files, nothing is downloaded):
  python -m experiments.convert --from_hf ~/models/gpt2 --to gs://BUCKET/gpt2_init --vocab_size 50304
  # SFT on an 8-GPU host:
  python -m experiments.run --config experiments/configs/real.py:gpt2-small,8gpu,sft \
      --workdir /shared/runs/gpt2_sft --config.init_from=/shared/gpt2_init \
      --config.tokenizer.path=~/models/gpt2 --config.data.train_files=demos.jsonl
  # the same on a v5e-16 pod (every worker runs it; see launch/README.md):
  launch/tpu_pod.sh --zone ZONE run -- --config experiments/configs/real.py:llama-1b,v5e-16,sft \
      --workdir gs://BUCKET/llama_sft --config.init_from=gs://BUCKET/llama_init ...

MODEL: gpt2-small (12 layers, d_model 768, GPT-2 BPE) | llama-1b (22 layers, d_model 2048, GQA 32/4,
SentencePiece): the family's tokenizer kind and a default shape. Any checkpoint of the family
works instead of converting it: `--config.model.init_from_hf=DIR --config.tokenizer.path=DIR` takes
its architecture and weights (`common.model_config`; later stages inherit them through
`init_from`). All stages in one command on one GPU: `instructgpt.py:hf` (docs/real-recipe.md). HARDWARE: 8gpu (one host, 8 devices) | v5e-16 (16 chips over 4 hosts) | cpu.
STAGE: sft | reward | ppo — the stage config with the model, tokenizer, mesh, batch and bf16
compute set for the hardware; data paths are yours to give (`--config.data.*`).
"""
from experiments.configs import base, ppo, reward, sft

MODELS = {
    "gpt2-small": dict(
        model=dict(flavour="gpt2", vocab_size=50304, d_model=768, n_layers=12, n_heads=12,
                   d_ff=3072, max_len=1024),
        tokenizer=dict(kind="gpt2", path="")),
    "llama-1b": dict(
        model=dict(flavour="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32,
                   n_kv_heads=4, d_ff=5632, max_len=2048, rope_theta=10_000.0),
        tokenizer=dict(kind="sentencepiece", path="")),
}
# Meshes: FSDP over the chips of a pod (parameters and optimizer state sharded, batch split over
# data x fsdp); a single 8-GPU host shards parameters over its 8 devices too, which fits a 1B model
# with Adam in fp32 comfortably and costs one all-gather per layer.
HARDWARE = {
    "8gpu": dict(mesh=dict(data=1, fsdp=8, tensor=1), batch_size=64, dtype="bfloat16",
                 remat="dots"),
    "v5e-16": dict(mesh=dict(data=1, fsdp=16, tensor=1), batch_size=128, dtype="bfloat16",
                   remat="full"),
    "cpu": dict(mesh=dict(data=-1, fsdp=1, tensor=1), batch_size=8, dtype="float32",
                remat="dots"),
}
STAGES = {"sft": sft, "reward": reward, "ppo": ppo}


def get_config(arg: str = "gpt2-small,8gpu,sft"):
  model, hardware, stage = (arg.split(",") + ["", "", ""])[:3]
  if model not in MODELS or hardware not in HARDWARE or stage not in STAGES:
    raise ValueError(f"real.py:{arg}: expected MODEL,HARDWARE,STAGE with MODEL in {sorted(MODELS)}, "
                     f"HARDWARE in {sorted(HARDWARE)}, STAGE in {sorted(STAGES)}")
  c = STAGES[stage].get_config("small")
  spec, hw = MODELS[model], HARDWARE[hardware]
  with c.unlocked():
    c.model = base.model_config("small", flavour=spec["model"]["flavour"])
    c.model.update(spec["model"])
    c.model.dtype = hw["dtype"]
    c.model.remat = hw["remat"]
    c.tokenizer.update(spec["tokenizer"])
    c.mesh.update(hw["mesh"])
    c.data.source = "files"
    if stage == "ppo":
      c.rollout_batch_size = hw["batch_size"]
      c.ptx.source = "files"
    else:
      c.batch_size = hw["batch_size"]
      c.data.seq_len = 1024 if stage == "sft" else 512
      c.data.max_prompt_len = 768 if stage == "sft" else 384
    c.sampling.prompt_len = 512
    c.sampling.max_new_tokens = 256
  c.lock()
  return c
