"""Staged gradients: the autoencoder's forward and backward pass as one small program per stage.

Inside a single jitted program the compiler decides what stays alive, and XLA:CPU keeps far more
than the backward pass needs (rematerialisation hardly moves its peak). Here each stage of
`stages.plan` (`benchmarks/stages.py`) is its own jitted program, so only one stage's
temporaries exist at a time. The forward keeps each stage's input; the backward walks the stages
in reverse and recomputes each one's forward inside its vector-Jacobian product, except for the
stages whose saved residuals fit `residual_budget_mib`: those (the most FLOPs per saved byte
first, e.g. the upsamplers) keep their residuals from the forward and are not recomputed.

The gradient is the exact gradient of the same function (`tests/staged_grad_test.py`: equal to
`jax.value_and_grad` of the single program to float32 rounding). It suits memory-bound
training on a host CPU; on accelerators the single jitted program is the faster choice.

    grad_fn = StagedGrad(model, lambda y, x, aux: jnp.mean(jnp.abs(y - x)))
    loss, grads = grad_fn(params, video)          # grads: the same tree as params

It serves the device benchmark (`benchmarks/bench.py --grad staged`), beside which it lives.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import stages as stages_lib  # benchmarks/stages.py, beside this file

REGULARIZER = stages_lib.REGULARIZER
# Room for the upsamplers' residuals of the released 4x8x8 model at 17x64x64 (their
# recomputation is a quarter of the forward's FLOPs), with the peak kept low.
DEFAULT_BUDGET_MIB = 320.0


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _subtree(params, paths) -> dict:
  """The parameters a stage reads (paths absent from `params`, e.g. a parameter-free
  regularizer, are skipped)."""
  out = {}
  for path in paths:
    try:
      leaf = _get(params, path)
    except KeyError:
      continue
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out


def _merge(into: dict, tree: dict):
  for key, value in tree.items():
    if isinstance(value, dict) and isinstance(into.get(key), dict):
      _merge(into[key], value)
    else:
      into[key] = value


def _split_aux(aux: dict):
  """(differentiable float entries, the rest): integer token indices get no cotangent."""
  floats = {k: v for k, v in aux.items() if jnp.issubdtype(jnp.result_type(v), jnp.inexact)}
  return floats, {k: v for k, v in aux.items() if k not in floats}


def _nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def most_flops_within(items, budget_bytes: float, resolution: int = 1 << 16) -> list:
  """0/1 knapsack: the indices of `items` ((flops, bytes) pairs) with the largest total FLOPs
  whose bytes sum to at most `budget_bytes` (sizes in units of `budget / resolution`, rounded
  to nearest; a choice the rounding let over the budget is trimmed afterwards)."""
  unit = max(budget_bytes / resolution, 1.0)
  cap = int(budget_bytes // unit)
  weights = [int(round(b / unit)) for _, b in items]
  best = np.zeros(cap + 1)  # best[c]: most FLOPs within c units
  keep = np.zeros((len(items), cap + 1), bool)
  for k, ((flops, _), w) in enumerate(zip(items, weights, strict=True)):
    if w > cap:
      continue
    cand = best[:cap + 1 - w] + flops
    better = cand > best[w:]
    keep[k, w:] = better
    best[w:] = np.where(better, cand, best[w:])
  chosen, c = [], cap
  for k in reversed(range(len(items))):
    if keep[k, c]:
      chosen.append(k)
      c -= weights[k]
  chosen.sort(key=lambda k: items[k][0] / max(items[k][1], 1))
  while sum(items[k][1] for k in chosen) > budget_bytes:
    chosen.pop(0)  # the least FLOPs per byte goes first
  return sorted(chosen)


class StagedGrad:
  """`(params, x, step=0, rng=None) -> (loss, grads)` of `loss_fn(recon, x, aux)` through
  `model`'s whole-clip forward (`model.apply(..., x, sample, step)`'s `recon` and `aux`).

  `loss_fn` returns a scalar (or `(scalar, metrics)` with `has_aux=True`, then the call returns
  `((loss, metrics), grads)`). `sample` draws the KL sample from `rng`. `residual_budget_mib`:
  how much saved residual memory may replace recomputation (0: recompute every stage).
  """

  def __init__(self, model, loss_fn: Callable, *, sample: bool = False,
               compute_aux: bool = True, has_aux: bool = False,
               residual_budget_mib: float = DEFAULT_BUDGET_MIB,
               compiler_options: Optional[dict] = None):
    if residual_budget_mib < 0:
      raise ValueError(f"residual_budget_mib must be >= 0, got {residual_budget_mib}")
    self.model, self.spec, self.loss_fn = model, model.config, loss_fn
    self.stages = stages_lib.plan(self.spec, sample, compute_aux)
    self.has_aux, self.budget = has_aux, residual_budget_mib * 2**20
    self._saved: dict = {}  # input signature -> indices of the stages that keep residuals
    self._checked = False
    jit = lambda f: jax.jit(f, compiler_options=compiler_options)  # noqa: E731
    funcs = [self._stage_fn(k) for k in range(len(self.stages))]
    self._funcs = funcs
    self._fwd = [jit(f) for f in funcs]
    # The first stage's input is the data: its cotangent is never needed, so not computed.
    self._fwd_res = [jit(lambda p, h, step, key, f=f, k=k: self._vjp(f, p, h, step, key, k > 0))
                     for k, f in enumerate(funcs)]
    self._bwd = [jit(lambda p, h, step, key, ct, f=f, k=k:
                     self._vjp(f, p, h, step, key, k > 0)[1](ct)) for k, f in enumerate(funcs)]
    self._pull = jit(lambda vjp, ct: vjp(ct))

    def head(y, x, faux, iaux):
      return loss_fn(stages_lib.trim(self.spec, y, x.shape[1]), x, {**faux, **iaux})

    self._head = jit(jax.value_and_grad(head, argnums=(0, 2), has_aux=has_aux))

  def _stage_fn(self, k: int):
    """`f(p, h, step, key) -> (out, int_aux)`; the regularizer's `out` is `(z, float_aux)`."""
    stage, model = self.stages[k], self.model

    def f(p, h, step, key):
      if stage.name == REGULARIZER:
        z, aux = model.apply({"params": p}, h, step, rngs={"sample": key},
                             method=lambda m, h, step: stage.fn(m, h, step))
        floats, rest = _split_aux(aux)
        return (z, floats), rest
      return model.apply({"params": p}, h, method=stage.fn), {}

    return f

  @staticmethod
  def _vjp(f, p, h, step, key, wrt_input: bool = True):
    """`((out, int_aux), vjp)`; `vjp(ct) -> (d_params, d_input)` (d_input None if not
    `wrt_input`)."""
    if wrt_input:
      out, vjp, rest = jax.vjp(lambda p, h: f(p, h, step, key), p, h, has_aux=True)
      return (out, rest), vjp
    out, vjp, rest = jax.vjp(lambda p: f(p, h, step, key), p, has_aux=True)
    return (out, rest), jax.tree_util.Partial(lambda vjp, ct: (vjp(ct)[0], None), vjp)

  def _check_params(self, params):
    """Every parameter must belong to exactly one stage (else the plan and model disagree)."""
    used = []
    for stage in self.stages:
      used += [path for path in stage.params if _subtree(params, [path])]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [tuple(k.key for k in path) for path, _ in leaves]
    missing = [n for n in names if not any(n[:len(u)] == u for u in used)]
    if missing or len(set(used)) != len(used):
      raise ValueError(f"the stage plan does not cover the model's parameters exactly: "
                       f"unused {missing[:5]}, listed twice "
                       f"{sorted({u for u in used if used.count(u) > 1})}")
    self._checked = True

  def saved_stages(self, params, x, step=0, key=None) -> list:
    """The stages that keep their residuals for input `x`: the set whose forward FLOPs (the
    recomputation it spares) are largest while its residual bytes fit the budget (computed once
    per input signature, from shapes only)."""
    sig = (tuple(x.shape), str(x.dtype))
    if sig not in self._saved:
      key = jax.random.key(0) if key is None else key
      h, info = jax.ShapeDtypeStruct(x.shape, x.dtype), []
      for k, f in enumerate(self._funcs):
        p = _subtree(params, self.stages[k].params)
        (out, _), vjp = jax.eval_shape(lambda p, h, f=f: self._vjp(f, p, h, step, key), p, h)
        cost = self._fwd[k].lower(p, h, step, key).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info.append((float((cost or {}).get("flops", 0.0)), _nbytes(vjp)))
        h = out[0] if isinstance(out, tuple) else out
      self._saved[sig] = most_flops_within(info, self.budget)
    return self._saved[sig]

  def __call__(self, params, x, step=0, rng: Any = None):
    if jnp.ndim(x) != 5:
      raise ValueError(f"StagedGrad takes a video batch (B, T, H, W, C), got shape "
                       f"{jnp.shape(x)}")
    if not self._checked:
      self._check_params(params)
    key = jax.random.key(0) if rng is None else rng
    step = jnp.asarray(step, jnp.int32)
    saved = set(self.saved_stages(params, x, step, key))
    ps = [_subtree(params, s.params) for s in self.stages]
    inputs, vjps, h, aux = [], {}, x, None
    for k in range(len(self.stages)):
      inputs.append(None if k in saved else h)  # a saved stage's residuals hold what it needs
      if k in saved:
        (out, rest), vjps[k] = self._fwd_res[k](ps[k], h, step, key)
      else:
        out, rest = self._fwd[k](ps[k], h, step, key)
      if self.stages[k].name == REGULARIZER:
        (h, faux), iaux = out, rest
        aux = (faux, iaux)
      else:
        h = out
    value, (ct, ct_faux) = self._head(h, x, *aux)
    del h
    grads: dict = {}
    for k in reversed(range(len(self.stages))):
      h = inputs.pop()
      if self.stages[k].name == REGULARIZER:
        ct = (ct, ct_faux)
      if k in saved:
        dp, ct = self._pull(vjps.pop(k), ct)
      else:
        dp, ct = self._bwd[k](ps[k], h, step, key, ct)
      _merge(grads, dp)
    return value, grads
