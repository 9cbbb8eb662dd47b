"""The real-model configs: they build, and every parameter of GPT-2 small and the 1B Llama splits
evenly over the v5e-16 and 8-GPU meshes (checked on abstract shapes: nothing is allocated)."""
import jax
import pytest

from experiments.configs import real
from instructjax import parallel
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel
from instructjax.trainers import common

DEVICES = {"8gpu": 8, "v5e-16": 16, "cpu": 2}


@pytest.mark.parametrize("model", sorted(real.MODELS))
@pytest.mark.parametrize("hardware", sorted(real.HARDWARE))
def test_real_model_shards_evenly_on_its_mesh(model, hardware):
  config = real.get_config(f"{model},{hardware},sft")
  fields = config.model.to_dict()
  fields.pop("init_from_hf")
  cfg = ModelConfig.from_mapping(fields)
  shape = parallel.mesh_shape(dict(config.mesh), DEVICES[hardware])
  mesh = jax.sharding.AbstractMesh(shape, parallel.MESH_AXES)
  _, abstract = common.split_model(lambda rngs: LanguageModel(cfg, rngs=rngs))
  specs = parallel.param_specs(abstract, parallel.rules_from_config(config.sharding_rules), mesh)
  assert specs["backbone"]["layers"]["w_in" if cfg.mlp == "gelu" else "w_up"] is not None
  assert config.batch_size % (shape[0] * shape[1]) == 0


@pytest.mark.parametrize("stage", sorted(real.STAGES))
def test_every_stage_has_a_real_config(stage):
  config = real.get_config(f"llama-1b,v5e-16,{stage}")
  assert config.model.n_kv_heads == 4 and config.mesh.fsdp == 16


def test_a_bad_argument_names_the_choices():
  with pytest.raises(ValueError, match="MODEL,HARDWARE,STAGE"):
    real.get_config("gpt3,8gpu,sft")
