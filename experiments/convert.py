"""Converts between Hugging Face checkpoints and this project's orbax checkpoints.

From HF (a local directory; nothing is downloaded) to a directory laid out like a stage's workdir,
which `--config.init_from=OUT` accepts:

  python -m experiments.convert --from_hf ~/models/gpt2 --to /tmp/gpt2_init
    -> /tmp/gpt2_init/checkpoints/0/   orbax checkpoint, state {"params": ...}
       /tmp/gpt2_init/config.json      {"model": {...}, "tokenizer": {...}} to copy into a config

From a trained stage back to HF (`--from_checkpoint` is the stage's workdir or its checkpoints/
directory; the model section comes from the workdir's config.json unless `--config_json` says):

  python -m experiments.convert --to_hf /tmp/policy_hf --from_checkpoint /tmp/sft
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any, Sequence

import jax
import ml_collections
from flax import nnx

from instructjax import checkpoint, parallel
from instructjax.errors import InputError
from instructjax.models import hf
from instructjax.models.config import ModelConfig
from instructjax.trainers import common


def parse_mesh(text: str) -> dict[str, int]:
  """Parses "data=1,fsdp=-1,tensor=1" into {"data": 1, "fsdp": -1, "tensor": 1}."""
  mesh = {}
  for item in filter(None, text.split(",")):
    name, _, size = item.partition("=")
    if name not in parallel.MESH_AXES or not size.lstrip("-").isdigit():
      raise InputError("--mesh", f"expected axis=size pairs over {parallel.MESH_AXES}, got {item!r}")
    mesh[name] = int(size)
  return mesh


def from_hf(source: str, out: str, *, mesh: dict[str, int], vocab_size: int | None,
            step: int = 0) -> dict[str, Any]:
  """HF directory -> `out`/checkpoints/<step> + `out`/config.json; returns the config written."""
  layout = parallel.make_mesh(mesh)
  tokenizer_section = hf.tokenizer_section(source)
  if vocab_size is None:  # as `init_from_hf` reads the same checkpoint
    tokenizer = hf.make_tokenizer(**tokenizer_section) if tokenizer_section else None
    vocab_size = common.hf_vocab_size(hf.hf_model_overrides(source)["vocab_size"], tokenizer)
  model_cfg, params = hf.import_hf(source, mesh=layout, vocab_size=vocab_size)
  # Only the architecture: dtype, dropout and remat stay the training config's choice.
  written = {"model": dict(hf.hf_model_overrides(source), vocab_size=model_cfg.vocab_size),
             "tokenizer": tokenizer_section,
             "converted_from_hf": os.path.abspath(source)}
  with checkpoint.Checkpointer(os.path.join(out, "checkpoints"), save_every=1, keep=1) as ckpt:
    if ckpt.latest_step() is not None:  # saving would silently keep the old weights
      raise InputError(out, "already holds a checkpoint; choose an empty --to directory")
    ckpt.save(step, {"params": params}, {"converted_from_hf": os.path.abspath(source)}, force=True)
    ckpt.wait()
  if jax.process_index() == 0:
    pathlib.Path(out, "config.json").write_text(json.dumps(written, indent=2, sort_keys=True))
  return written


def _config_json_for(checkpoint_arg: str) -> pathlib.Path:
  path = pathlib.Path(checkpoint_arg.rstrip("/"))
  workdir = path.parent if path.name == "checkpoints" else path
  return workdir / "config.json"


def _restore_params(ckpt_dir: str, model_cfg, mesh, rules, params_path: tuple[str, ...],
                    step: int | None):
  _, abstract = hf.abstract_params(model_cfg)
  shardings = parallel.named(mesh, parallel.param_specs(abstract, rules, mesh))
  target = checkpoint.abstract_like(nnx.to_pure_dict(abstract), shardings)
  return checkpoint.restore_subtree(ckpt_dir, target, path=params_path, step=step)


def to_hf(ckpt_arg: str, out: str, *, config_json: str | None, mesh: dict[str, int],
          params_path: tuple[str, ...], step: int | None, dtype: str,
          trim_vocab: bool) -> pathlib.Path:
  """A stage's checkpoint + its config.json -> HF directory `out`."""
  config_path = pathlib.Path(config_json) if config_json else _config_json_for(ckpt_arg)
  if not config_path.is_file():
    raise InputError(str(config_path), "not found; pass --config_json (the stage's config.json "
                     "with its 'model' and 'tokenizer' sections)")
  try:
    config = json.loads(config_path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise InputError(str(config_path), f"is not valid JSON: {e}") from e
  if "model" not in config:
    raise InputError(str(config_path), "has no 'model' section")
  model = {k: v for k, v in config["model"].items() if k != "init_from_hf"}
  tokenizer = None
  if config.get("tokenizer"):
    tokenizer = hf.make_tokenizer(config["tokenizer"]["kind"], config["tokenizer"].get("path") or None)
    model_cfg = common.model_config(ml_collections.ConfigDict({"model": model}), tokenizer)
  elif model.get("vocab_size") is None:
    raise InputError(str(config_path), "has neither a tokenizer section nor model.vocab_size")
  else:
    model_cfg = ModelConfig.from_mapping(model)
  rules = parallel.rules_from_config(config.get("sharding_rules", parallel.DEFAULT_RULES))
  layout = parallel.make_mesh(mesh)
  params = _restore_params(common.checkpoint_dir(ckpt_arg), model_cfg, layout, rules,
                           params_path, step)
  extra, tokenizer_dir = {}, None
  if tokenizer is not None:
    extra = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if tokenizer.bos_id is not None:
      extra["bos_token_id"] = tokenizer.bos_id
    if config["tokenizer"]["kind"] != "byte":
      tokenizer_dir = config["tokenizer"]["path"]
  elif trim_vocab:
    raise InputError("--trim_vocab", f"{config_path} has no tokenizer section to trim to")
  return hf.export_hf(params, model_cfg, out, dtype=dtype,
                      vocab_size=tokenizer.vocab_size if trim_vocab else None,
                      tokenizer_dir=tokenizer_dir, extra_config=extra)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m experiments.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from_hf", help="HF checkpoint directory to import")
  direction.add_argument("--to_hf", help="HF directory to write")
  parser.add_argument("--to", help="with --from_hf: output directory (workdir layout)")
  parser.add_argument("--from_checkpoint", help="with --to_hf: a stage workdir or checkpoints dir")
  parser.add_argument("--config_json", help="with --to_hf: config.json holding the model section "
                      "(default: the workdir's)")
  parser.add_argument("--params_path", default="params",
                      help="with --to_hf: '/'-separated path of the params in the saved state")
  parser.add_argument("--step", type=int, default=None, help="with --to_hf: step (default latest)")
  parser.add_argument("--dtype", default="float32", choices=sorted(hf._EXPORT_DTYPES),
                      help="with --to_hf: dtype of the written tensors")
  parser.add_argument("--trim_vocab", action="store_true",
                      help="with --to_hf: drop the embedding rows beyond the tokenizer's vocab")
  parser.add_argument("--vocab_size", type=int, default=None,
                      help="with --from_hf: pad the embedding to this size (default: the "
                      "checkpoint's vocabulary padded to a multiple of 128, as init_from_hf does)")
  parser.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                      help="devices to shard the parameters over while converting")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    mesh = parse_mesh(args.mesh)
    if args.from_hf:
      if not args.to:
        raise InputError("--to", "is required with --from_hf")
      written = from_hf(args.from_hf, args.to, mesh=mesh, vocab_size=args.vocab_size)
      print(f"wrote {args.to}: init_from={args.to}; model section:\n"
            f"{json.dumps(written['model'], indent=2, sort_keys=True)}")
    else:
      if not args.from_checkpoint:
        raise InputError("--from_checkpoint", "is required with --to_hf")
      out = to_hf(args.from_checkpoint, args.to_hf, config_json=args.config_json, mesh=mesh,
                  params_path=tuple(filter(None, args.params_path.split("/"))), step=args.step,
                  dtype=args.dtype, trim_vocab=args.trim_vocab)
      print(f"wrote {out}")
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
