"""Test-only dependencies for the Hugging Face parity tests (torch, transformers).

A user's plain `pytest` run without them skips those tests. CI sets INSTRUCTJAX_REQUIRE_PARITY=1
(see .ci/run): there a missing or broken torch/transformers fails the tests instead, so the
parity checks can never turn into quiet skips.
"""
import importlib
import os

import pytest

REQUIRE_ENV = "INSTRUCTJAX_REQUIRE_PARITY"


def required() -> bool:
  return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def require(module: str):
  """The module, imported; if it cannot be: a skip, or under INSTRUCTJAX_REQUIRE_PARITY a
  failure that names the module and the error."""
  if not required():
    return pytest.importorskip(module, exc_type=ImportError)
  try:
    return importlib.import_module(module)
  except Exception as e:  # ImportError, or a broken install failing at import time
    error = f"{type(e).__name__}: {e}"
  pytest.fail(f"{REQUIRE_ENV} is set but {module!r} cannot be imported ({error}); the Hugging "
              "Face parity tests must run here, not be skipped", pytrace=False)


def transformers_logits(model, tokens, mask):
  """A transformers causal LM's float32 logits for left-padded `tokens`/`mask`, with position
  ids counted over the real tokens (as our decoder derives them from the mask)."""
  import numpy as np
  torch = require("torch")
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()
