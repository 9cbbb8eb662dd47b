"""Supervised fine-tuning and pretraining: masked next-token cross-entropy.

InstructGPT step 1 fine-tunes on (prompt, demonstration) with the loss on demonstration tokens only;
pretraining is the same objective with every token a target. The batch carries `loss_mask`, which
marks the tokens to predict, so one step serves both stages.

The train state is a plain dict pytree:
  params      the model's parameters (a pure dict from `nnx.split`)
  opt_state   optax state
  step        int32 scalar, the number of updates applied
  rng         uint32[2] key; the dropout key of step s is fold_in(rng, s)
  bad_steps   int32 scalar, how many steps had a non-finite loss or gradient (their update is
              skipped, so parameters never become NaN; the trainer stops on the first one)
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Batch = Mapping[str, jax.Array]
State = dict[str, Any]

# Weight decay applies to matrices and embeddings, not to norms, biases or the scalar head's bias.
DECAYED = frozenset({"embed", "pos_embed", "lm_head", "wq", "wk", "wv", "wo", "w_in", "w_out",
                     "w_gate", "w_up", "w_down", "head_w"})


def token_cross_entropy(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array):
  """Sum of -log p(tokens[t] | tokens[<t]) over targets, and the number of targets.

  logits[:, t] predicts tokens[:, t + 1]; loss_mask[:, t] marks tokens[:, t] as a target.
  Returns sums (not means) so that shards and eval batches can be added before dividing.
  """
  # log p = logit - logsumexp(logits): only the target's logit is gathered, so the [B, T, V]
  # log-softmax (and its gradient) is never materialised (measured -7% CPU time of an SFT step).
  logits = logits[:, :-1].astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
  target_log_probs = target_logits - jax.nn.logsumexp(logits, axis=-1)
  weights = loss_mask[:, 1:].astype(jnp.float32)
  return -(target_log_probs * weights).sum(), weights.sum()


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int, decay: str = "cosine",
                           end_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0, then cosine or linear decay to `end_fraction * lr` (or constant)."""
  warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
  rest = max(total_steps - warmup_steps, 1)
  if decay == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=end_fraction)
  elif decay == "linear":
    after = optax.linear_schedule(lr, lr * end_fraction, rest)
  elif decay == "constant":
    after = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown learning-rate decay {decay!r}: cosine, linear or constant")
  return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params) -> Any:
  def decayed(path, _):
    return getattr(path[-1], "key", None) in DECAYED
  return jax.tree.map_with_path(decayed, params)


# How Adam turns its moments into a step. "torch" is PyTorch's / optax's AdamW:
#   m_hat / (sqrt(v_hat) + eps),            m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t);
# "tf" is TF1's tf.train.AdamOptimizer, which lm-human-preferences trained with (eps=1e-5):
#   sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps),
# i.e. eps is added to the uncorrected sqrt(v), an effective eps of eps / sqrt(1 - b2^t) early
# in training (x31.6 at step 1 with b2=0.999), so steps on small-gradient parameters are smaller.
ADAM_STYLES = ("torch", "tf")


def scale_by_tf_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-5
                     ) -> optax.GradientTransformation:
  """Adam's direction as TF1's AdamOptimizer computes it (the "epsilon hat" form of Kingma & Ba,
  section 2): lr_t = sqrt(1 - b2^t) / (1 - b1^t), step = lr_t * m / (sqrt(v) + eps). The state is
  optax's ScaleByAdamState (count, mu, nu), the same moments as `optax.scale_by_adam`."""

  def init(params):
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=optax.tree.zeros_like(params),
                                  nu=optax.tree.zeros_like(params))

  def update(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    scale = jnp.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
    step = jax.tree.map(lambda m, v: (scale * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
    return step, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, clip_norm: float | None = 1.0,
                   adam_style: str = "torch"):
  """AdamW with global-norm clipping (clip_norm None or <= 0 turns clipping off).

  adam_style "torch" is optax.adamw; "tf" swaps in `scale_by_tf_adam` (see ADAM_STYLES) and keeps
  the rest: clipping first, then decoupled weight decay on `decay_mask`'s leaves, then the
  schedule, so an update is -lr(t) * (adam_step + weight_decay * param). `eps` is used as given
  by either style (lm-human-preferences' TF value is 1e-5)."""
  if adam_style not in ADAM_STYLES:
    raise ValueError(f"unknown adam_style {adam_style!r}: one of {', '.join(ADAM_STYLES)}")
  parts = []
  if clip_norm and clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  if adam_style == "torch":
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
  else:  # optax.adamw's chain with TF's scaling: the state has the same tree in both styles
    parts.append(optax.chain(scale_by_tf_adam(b1, b2, eps),
                             optax.add_decayed_weights(weight_decay, decay_mask),
                             optax.scale_by_learning_rate(schedule)))
  return optax.chain(*parts)


def lm_loss(params, graphdef: nnx.GraphDef, batch: Batch, dropout_rng=None):
  """Mean cross-entropy over the batch's targets; aux = (sum, count) for exact averaging."""
  model = nnx.merge(graphdef, params)
  logits, _ = model(batch["tokens"], batch["mask"], dropout_rng=dropout_rng)
  total, count = token_cross_entropy(logits, batch["tokens"], batch["loss_mask"])
  return total / jnp.maximum(count, 1.0), (total, count)


def apply_if_finite(state: State, new_params, new_opt_state, loss, grad_norm) -> State:
  """Takes the update only when loss and gradient are finite; counts the steps that were not."""
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return dict(state,
              params=keep(new_params, state["params"]),
              opt_state=keep(new_opt_state, state["opt_state"]),
              step=state["step"] + 1,
              bad_steps=state["bad_steps"] + (~finite).astype(jnp.int32))


def apply_gradients(state: State, grads, loss, optimizer: optax.GradientTransformation
                    ) -> tuple[State, jax.Array]:
  """One optimizer update from `grads`, kept only when loss and gradient are finite; returns the
  new state and the gradient's global norm (every stage logs it as `grad_norm`)."""
  updates, new_opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  new_params = optax.apply_updates(state["params"], updates)
  grad_norm = optax.tree.norm(grads)
  return apply_if_finite(state, new_params, new_opt_state, loss, grad_norm), grad_norm


def train_step(state: State, batch: Batch, *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               use_dropout: bool = False) -> tuple[State, dict[str, jax.Array]]:
  """One AdamW update on the masked next-token loss. Pure: jit it with donated state."""
  dropout_rng = jax.random.fold_in(state["rng"], state["step"]) if use_dropout else None
  grad_fn = jax.value_and_grad(lm_loss, has_aux=True)
  (loss, (_, count)), grads = grad_fn(state["params"], graphdef, batch, dropout_rng)
  new_state, grad_norm = apply_gradients(state, grads, loss, optimizer)
  metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                 target_tokens=count)
  return new_state, metrics


def eval_step(params, batch: Batch, *, graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
  """Summed loss and target count of one held-out batch (padding rows have no targets)."""
  _, (total, count) = lm_loss(params, graphdef, batch)
  return dict(loss_sum=total, target_tokens=count)


def eval_metrics(sums: Mapping[str, float]) -> dict[str, float]:
  """Held-out loss and perplexity from summed eval_step outputs."""
  import math
  loss = sums["loss_sum"] / max(sums["target_tokens"], 1.0)
  return dict(eval_loss=loss, eval_perplexity=math.exp(min(loss, 50.0)))


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> State:
  return dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
              rng=jax.random.PRNGKey(seed), bad_steps=jnp.zeros((), jnp.int32))


StepFn = Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]
