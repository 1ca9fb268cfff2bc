"""Chunked ("tiled") inference of causal models (SPEC 1.2, 2.4, 6.2-6.4).

1. Parity with the official tiled paths (`v11_causal_kl_488_long`, float32): encode, decode with
   and without overlap, the tiled forward.
2. The exactness claims of SPEC 6.2 / 6.3 on tiny random models: tiled == untiled where the
   official algorithm is exact (to float32 rounding), different where it is not.
3. The explicit-state API (`encode_chunk` / `decode_chunk` run by hand over the official
   schedule == the tiled methods), FSQ indices and losses.
4. Errors. 5. `remat=True` still streams.

Compile time dominates on CPU: tiny models (ch=4, one res block per level, 16x16 frames), one
jitted function per (model, method, static arguments), results memoised across tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidtok_jax
from conftest import Ref, max_abs, ncthw_to_nthwc, nthwc_to_ncthw, random_params

# Reference README: whole models atol=2e-4, rtol=1e-4 on videos/latents (float32 vs float64).
ATOL, RTOL = 2e-4, 1e-4
# Tiny random models: paths that are mathematically identical (tiled vs untiled where SPEC 6.3
# says exact) differ by float32 rounding only, measured <= 3e-5 x max|output| (1e-13 when run in
# float64), while every schedule / cache error gives >= 1e-2 (the inexact official paths here:
# 0.5 - 1.4). So "exact" is checked at 1e-4 x max(1, max|expected|).
EXACT = 1e-4


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def assert_exact(actual, expected, rtol=EXACT):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(1.0, float(np.max(np.abs(expected))))
  assert max_abs(actual, expected) <= rtol * scale, (max_abs(actual, expected), scale)


def official_chunks(t: int, chunk: int):
  """SPEC 6.2 `build_chunk_start_end`, written out independently of the package."""
  return [(0, 1)] + [(s, min(t, s + chunk)) for s in range(1, t, chunk)]


def official_tiled_latents(t: int, chunk: int, f: int) -> int:
  """Latents of the official tiled v1.1 encode: each chunk is padded as a clip, ceil(len / f)."""
  return sum(-(-(e - s) // f) for s, e in official_chunks(t, chunk))


# ------------------------------------------------------------------------------------------------
# 1. Parity with the official tiled paths (v11_causal_kl_488_long: T=33, t_chunk_enc=8,
#    t_chunk_dec=2).


@pytest.fixture(scope="module")
def long():
  ref = Ref("v11_causal_kl_488_long")
  assert ref.meta["paths"]["tiled_overlap"] == {
      "use_tiling": True, "t_chunk_enc": 8, "t_chunk_dec": 2, "use_overlap": True}
  assert ref.meta["paths"]["tiled_no_overlap"]["use_overlap"] is False
  name = ref.meta["topology"].split()[0]
  enc = ref.meta["config"]["encoder_config"]["params"]
  cfg = vidtok_jax.load_config(name, **{k: enc[k] for k in ("ch", "ch_mult", "norm_type")})
  model = vidtok_jax.VidTok(cfg)
  variables = {"params": vidtok_jax.params_from_torch(ref.params, cfg)}
  x = jnp.asarray(ncthw_to_nthwc(ref.inputs["x"]))
  # The decoder is fed the reference's own tiled latents, so decoding is checked on its own.
  z_ref = jnp.asarray(ncthw_to_nthwc(ref.out["tiled_overlap/mean"]))
  # Separate jits: XLA compiles three programs faster than their union.
  forward = jax.jit(lambda v, x: model.apply(v, x, t_chunk_enc=8, use_overlap=True))
  decode = jax.jit(lambda v, z, o: model.apply(v, z, t_chunk_dec=2, use_overlap=o,
                                               method=model.decode), static_argnums=2)
  z, recon, aux = forward(variables, x)
  out = dict(z=z, recon=recon, aux=aux, dec_overlap=decode(variables, z_ref, True),
             dec_plain=decode(variables, z_ref, False))
  return ref, x, jax.device_get(out)


def test_long_tiled_encode_parity(long):
  ref, _, out = long
  aux = out["aux"]
  # The forward's encode is the tiled one (t_chunk_enc=8): chunks [0,1), [1,9), ..., [25,33).
  moments = np.concatenate([aux["mean"], aux["logvar"]], axis=-1)
  for path in ("tiled_overlap", "tiled_no_overlap"):  # the encoder ignores use_overlap
    assert_close(nthwc_to_ncthw(moments), ref.expected(f"{path}/moments"))
    assert_close(nthwc_to_ncthw(aux["mean"]), ref.expected(f"{path}/mean"))
    assert_close(nthwc_to_ncthw(aux["logvar"]), ref.expected(f"{path}/logvar"))
    np.testing.assert_allclose(float(aux["kl_loss"]), float(ref.expected(f"{path}/kl_loss")),
                               rtol=1e-5)
  np.testing.assert_array_equal(out["z"], aux["mean"])
  # Tiled kl_loss is the mean of 5 per-chunk losses, not the whole-clip sum: far from untiled.
  kl_untiled = float(ref.expected("untiled/kl_loss"))
  assert abs(float(aux["kl_loss"]) - kl_untiled) > 0.5 * kl_untiled


def test_long_tiled_decode_parity(long):
  ref, _, out = long
  untiled = ref.out["untiled/dec"]
  dec_overlap, dec_plain = nthwc_to_ncthw(out["dec_overlap"]), nthwc_to_ncthw(out["dec_plain"])
  assert dec_overlap.shape == dec_plain.shape == untiled.shape == (1, 3, 36, 32, 32)
  assert_close(dec_overlap, ref.out["tiled_overlap/dec"])
  assert_close(dec_plain, ref.out["tiled_no_overlap/dec"])
  # The paths are told apart: the reference's own tiled/untiled gaps (9.6e-3 / 0.66 in float64)
  # are far above the tolerance, and ours reproduce them.
  assert max_abs(ref.out["tiled_overlap/dec"], untiled) > 1e-3
  assert max_abs(dec_overlap, untiled) > 1e-3
  assert max_abs(dec_plain, untiled) > 0.1
  assert max_abs(dec_plain, dec_overlap) > 0.1
  # Latent 0 is decoded on its own in every path: its 4 frames agree with untiled decoding.
  assert_close(dec_overlap[:, :, :4], untiled[:, :, :4])
  assert_close(dec_plain[:, :, :4], untiled[:, :, :4])


def test_long_tiled_forward_parity(long):
  ref, x, out = long
  t = x.shape[1]
  assert out["recon"].shape == x.shape
  assert_close(nthwc_to_ncthw(out["recon"]), ref.out["tiled_overlap/dec"][:, :, -t:])
  assert_close(nthwc_to_ncthw(out["z"]), ref.expected("tiled_overlap/mean"))


# ------------------------------------------------------------------------------------------------
# Tiny random models.


class Tiny:
  """A tiny random model; `call` runs a jitted method (one jit per method and static
  arguments), `run` memoises it on a named input of `inputs`."""

  def __init__(self, name, seed=0, **overrides):
    overrides = dict(dict(ch=4, num_res_blocks=1), **overrides)
    self.cfg = vidtok_jax.load_config(name, **overrides)
    self.model = vidtok_jax.VidTok(self.cfg)
    self.spec = self.model.config
    self.f = self.spec.time_downsample_factor
    self.abstract = vidtok_jax.abstract_params(self.cfg)
    self.variables = {"params": random_params(self.abstract, seed)}
    self.inputs = {}
    self._fns, self._results = {}, {}

  def _target(self, method):
    return None if method == "__call__" else getattr(type(self.model), method)

  def call(self, method, *args, **static):
    key = (method, tuple(sorted(static.items())))
    if key not in self._fns:
      model, target = self.model, self._target(method)
      self._fns[key] = jax.jit(lambda v, *a: model.apply(v, *a, method=target, **static))
    return jax.device_get(self._fns[key](self.variables, *args))

  def run(self, method, input_name, **static):
    key = (method, input_name, tuple(sorted(static.items())))
    if key not in self._results:
      self._results[key] = self.call(method, self.inputs[input_name], **static)
    return self._results[key]

  def shapes(self, method, *shapes, **static):
    """`jax.eval_shape` of a method on `(shape, dtype)` inputs: traces only, no compile."""
    target = self._target(method)
    return jax.eval_shape(
        lambda p, *a: self.model.apply({"params": p}, *a, method=target, **static),
        self.abstract, *[jax.ShapeDtypeStruct(s, d) for s, d in shapes])


def video(t, hw=16, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (1, t, hw, hw, 3)).astype(np.float32)


def latents(m, t, seed=1):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((1, t, 2, 2, m.spec.z_channels)).astype(np.float32)


X25 = video(25)  # 1 + 3*8 frames: the 8-frame chunks give a first chunk and 3 under the scan


@functools.lru_cache(maxsize=None)
def tiny(key):
  """The tiny models of this file, built once each, with their inputs."""
  specs = {
      "v11_488": ("vidtok_kl_causal_488_4chn_v1_1", {}),  # trilinear
      "v11_288": ("vidtok_kl_causal_288_8chn_v1_1", {}),  # trilinear
      "v11_888": ("vidtok_fsq_causal_888_32768_v1_1", {}),  # trilinear (shapes only)
      "v11_888_nearest": ("vidtok_fsq_causal_888_32768_v1_1", dict(interpolation_mode="nearest")),
      "v10_488": ("vidtok_kl_causal_488_4chn", {}),
      "noncausal": ("vidtok_kl_noncausal_488_4chn", {}),
  }
  name, overrides = specs[key]
  m = Tiny(name, **overrides)
  m.inputs["x"] = X25
  # 7 latents, chunks of 2: first [0,1), steady chunks under the scan, a final chunk (v1.0: 3
  # latents, all its paths are exact and cheaper to compile without the scan).
  m.inputs["z"] = latents(m, 3 if key == "v10_488" else 7)
  return m


def decode_all(m, input_name="z", t_chunk_dec=2, t_chunk_plain=2):
  """Untiled, tiled with overlap, tiled without overlap."""
  return (m.run("decode", input_name),
          m.run("decode", input_name, t_chunk_dec=t_chunk_dec, use_overlap=True),
          m.run("decode", input_name, t_chunk_dec=t_chunk_plain, use_overlap=False))


# ------------------------------------------------------------------------------------------------
# 2a. v1.1 encoders: tiling is exact for T = 1 + k * chunk (SPEC 6.2); ragged tails.


def test_v11_tiled_encode_equals_untiled():
  m = tiny("v11_488")
  z, aux = m.run("encode", "x")
  zt, auxt = m.run("encode", "x", t_chunk_enc=8)
  assert zt.shape == z.shape == (1, 7, 2, 2, 4)
  assert_exact(auxt["mean"], aux["mean"])
  assert_exact(auxt["logvar"], aux["logvar"])
  np.testing.assert_array_equal(zt, auxt["mean"])
  # kl_loss: the mean of the per-chunk sums (1, 2, 2, 2 latents), not the whole-clip sum.
  assert abs(float(auxt["kl_loss"]) - float(aux["kl_loss"])) > 0.1 * float(aux["kl_loss"])


def test_v11_888_fsq_tiled_encode_equals_untiled():
  m = tiny("v11_888_nearest")  # chunks of 8 = f: each steady chunk is one latent
  z, aux = m.run("encode", "x")
  zt, auxt = m.run("encode", "x", t_chunk_enc=8)
  assert zt.shape == (1, 4, 2, 2, 5)
  np.testing.assert_array_equal(zt, z)  # FSQ codes: exact
  np.testing.assert_array_equal(auxt["indices"], aux["indices"])
  assert len(np.unique(aux["indices"])) > 4  # a non-degenerate test


@pytest.mark.parametrize("key,t,chunk", [("v11_488", 14, 8), ("v11_888", 20, 8)])
def test_v11_tiled_encode_ragged_shapes(key, t, chunk):
  """A final chunk of any length is padded as a clip: the official tiled latent count (here one
  more than untiled); the tiled forward still returns T frames."""
  m = tiny(key)
  z, _ = m.shapes("encode", ((1, t, 16, 16, 3), jnp.float32), t_chunk_enc=chunk)
  n = official_tiled_latents(t, chunk, m.f)
  assert z.shape == (1, n, 2, 2, m.spec.z_channels)
  assert n == -(-t // m.f) + 1
  if m.f == 4:
    _, y, _ = m.shapes("__call__", ((1, t, 16, 16, 3), jnp.float32), t_chunk_enc=chunk,
                       use_overlap=True)
    assert y.shape == (1, t, 16, 16, 3)


def test_v11_tiled_encode_ragged_values():
  """A ragged final chunk is front-padded with copies of its own first frame (SPEC 6.2), and the
  earlier chunks do not see it."""
  m = tiny("v11_488")
  x = m.inputs["x"]  # 25 frames: [0,1) [1,9) [9,17) [17,25)
  m.inputs["x22"] = x[:, :22]  # final chunk [17,22): 5 frames -> 3 copies of frame 17 in front
  m.inputs["x_padded"] = np.concatenate([x[:, :17], np.repeat(x[:, 17:18], 3, 1), x[:, 17:22]],
                                        axis=1)
  full, _ = m.run("encode", "x", t_chunk_enc=8)
  ragged, _ = m.run("encode", "x22", t_chunk_enc=8)
  padded, _ = m.run("encode", "x_padded", t_chunk_enc=8)
  assert ragged.shape[1] == 7 == official_tiled_latents(22, 8, 4)
  assert_exact(ragged[:, :5], full[:, :5])
  assert_exact(ragged[:, 5:], padded[:, 5:])
  assert max_abs(ragged[:, 5:], full[:, 5:]) > 1e-3  # the tail really changed them


# ------------------------------------------------------------------------------------------------
# 2b-e. Decoders (SPEC 6.3 consequences).


def test_v11_288_trilinear_overlap_is_exact():
  """f=2 trilinear: the one look-ahead latent covers the single upsampler's look-ahead."""
  m = tiny("v11_288")
  untiled, overlap, plain = decode_all(m)
  assert untiled.shape == (1, 2 * 7, 16, 16, 3)
  assert_exact(overlap, untiled)
  assert max_abs(plain, untiled) > 1e-2
  assert_exact(plain[:, :2], untiled[:, :2])  # latent 0 is decoded alone


def test_v10_chunked_encode_and_decode_are_exact():
  """v1.0 is fully causal: chunked encoding and decoding equal whole-clip for T = 1 + f*k."""
  m = tiny("v10_488")
  z, aux = m.run("encode", "x")
  zt, auxt = m.run("encode", "x", t_chunk_enc=8)
  assert z.shape[1] == 7
  assert_exact(auxt["mean"], aux["mean"])
  assert_exact(auxt["logvar"], aux["logvar"])
  untiled, overlap, plain = decode_all(m)
  assert untiled.shape[1] == 4 * 3 - 3  # v1.0 drops f - 1 frames, only once
  assert_exact(overlap, untiled)
  assert_exact(plain, untiled)


def test_v11_nearest_tiled_decode_is_exact():
  """Nearest temporal upsampling is causal: tiled decoding, with the overlap (f=8: cache offsets
  2/4/8) or without, equals untiled; f*T' frames."""
  m = tiny("v11_888_nearest")
  m.inputs["codes"] = m.run("encode", "x", t_chunk_enc=8)[0]  # 4 latents
  untiled, overlap, plain = decode_all(m, "codes", t_chunk_plain=3)
  assert untiled.shape == overlap.shape == plain.shape == (1, 8 * 4, 16, 16, 3)
  assert_exact(overlap, untiled)
  assert_exact(plain, untiled)


def test_v11_888_trilinear_tiled_decode_shapes():
  """The released f=8 (trilinear, m = 1/2/4) decoder traces through both tiled schedules and
  gives f*T' frames (the values of the f=8 offsets are checked above in nearest mode)."""
  for use_overlap in (True, False):
    trilinear = tiny("v11_888").shapes("decode", ((1, 5, 2, 2, 5), jnp.float32), t_chunk_dec=2,
                                       use_overlap=use_overlap)
    assert trilinear.shape == (1, 40, 16, 16, 3)


# ------------------------------------------------------------------------------------------------
# 3. Explicit-state API: the official schedule written out by hand, chunk by chunk.


def encode_by_hand(m, x, chunk):
  zs, auxs, state = [], [], None
  for s, e in official_chunks(x.shape[1], chunk):
    z, aux, state = m.call("encode_chunk", x[:, s:e], state)
    zs.append(z)
    auxs.append(aux)
  return np.concatenate(zs, axis=1), auxs


def decode_by_hand(m, z, chunk, use_overlap, indices=False):
  ys, state, t = [], None, z.shape[1]
  for s, e in official_chunks(t, chunk):
    look_ahead = use_overlap and e + 1 <= t
    y, state = m.call("decode_chunk", z[:, s:e + look_ahead], state, use_overlap=look_ahead,
                      indices=indices)
    ys.append(y)
  return np.concatenate(ys, axis=1)


def test_encode_chunk_by_hand_equals_tiled_encode():
  m = tiny("v11_488")
  z_hand, auxs = encode_by_hand(m, m.inputs["x"], 8)
  zt, auxt = m.run("encode", "x", t_chunk_enc=8)
  assert len(auxs) == 4
  assert_exact(z_hand, zt)
  np.testing.assert_allclose(float(auxt["kl_loss"]), np.mean([a["kl_loss"] for a in auxs]),
                             rtol=1e-6)


def test_decode_chunk_by_hand_equals_tiled_decode():
  m = tiny("v11_488")  # trilinear: the interpolation caches and offsets matter
  y_hand = decode_by_hand(m, m.inputs["z"], 2, use_overlap=True)
  assert_exact(y_hand, m.run("decode", "z", t_chunk_dec=2, use_overlap=True))


def test_fsq_chunks_indices_and_losses():
  m = tiny("v11_888_nearest")
  zt, auxt = m.run("encode", "x", t_chunk_enc=8)
  z_hand, auxs = encode_by_hand(m, m.inputs["x"], 8)
  np.testing.assert_array_equal(zt, z_hand)
  indices = np.concatenate([a["indices"] for a in auxs], axis=1)
  assert auxt["indices"].shape == (1, 4, 2, 2) and auxt["indices"].dtype == np.int32
  np.testing.assert_array_equal(auxt["indices"], indices)
  # aux_loss (and its parts) are the means of the per-chunk values.
  for key in ("aux_loss", "per_sample_entropy", "codebook_entropy", "commit_loss"):
    np.testing.assert_allclose(float(auxt[key]), np.mean([a[key] for a in auxs]), rtol=1e-6,
                               err_msg=key)
  # Indices decode through the same tiled schedule as their codes.
  m.inputs["codes"], m.inputs["indices"] = zt, auxt["indices"]
  from_codes = m.run("decode", "codes", t_chunk_dec=2, use_overlap=True)
  from_indices = m.run("decode_indices", "indices", t_chunk_dec=2, use_overlap=True)
  assert from_codes.shape == (1, 32, 16, 16, 3)
  assert_exact(from_indices, from_codes)


# ------------------------------------------------------------------------------------------------
# 4. Errors (raised while tracing: checked on abstract shapes).

VID = lambda t: ((1, t, 16, 16, 3), jnp.float32)
LAT = lambda t, c=4: ((1, t, 2, 2, c), jnp.float32)


def test_errors():
  m = tiny("v11_488")
  with pytest.raises(ValueError, match="multiple of the time factor 4"):
    m.shapes("encode", VID(17), t_chunk_enc=6)
  with pytest.raises(ValueError, match="multiple of the time factor 8"):
    tiny("v11_888").shapes("__call__", VID(17), t_chunk_enc=4)
  with pytest.raises(ValueError, match="positive int"):
    m.shapes("decode", LAT(5), t_chunk_dec=0)
  # use_overlap belongs to tiled decoding.
  with pytest.raises(ValueError, match="t_chunk_dec"):
    m.shapes("decode", LAT(5), use_overlap=True)
  with pytest.raises(ValueError, match="t_chunk_dec"):
    tiny("v11_888").shapes("decode_indices", ((1, 5, 2, 2), jnp.int32), use_overlap=True)
  with pytest.raises(ValueError, match="at least 2 latents"):
    m.shapes("decode_chunk", LAT(1), use_overlap=True)
  # v1.0 chunked encoding needs T = 1 + f*k.
  with pytest.raises(ValueError, match=r"1 \+ 4k frames, got 16"):
    tiny("v10_488").shapes("encode", VID(16), t_chunk_enc=8)
  tiny("v10_488").shapes("encode", VID(17), t_chunk_enc=8)  # fine


@pytest.mark.parametrize("method,shape,static", [
    ("encode", VID(16), dict(t_chunk_enc=8)), ("decode", LAT(4), dict(t_chunk_dec=2)),
    ("__call__", VID(16), dict(t_chunk_enc=8)), ("encode_chunk", VID(16), {}),
    ("decode_chunk", LAT(4), {})])
def test_chunked_non_causal_raises(method, shape, static):
  with pytest.raises(ValueError, match="non-causal"):
    tiny("noncausal").shapes(method, shape, **static)


# ------------------------------------------------------------------------------------------------
# 5. Rematerialised blocks stream too.


def test_remat_tiled_decode():
  m = tiny("v11_488")
  r = Tiny("vidtok_kl_causal_488_4chn_v1_1", remat=True)
  assert r.spec.remat == "blocks" and m.spec.remat == "none"
  assert jax.tree_util.tree_structure(r.abstract) == jax.tree_util.tree_structure(m.abstract)
  r.variables, r.inputs = m.variables, m.inputs  # same weights, same latents
  assert_exact(r.run("decode", "z", t_chunk_dec=2, use_overlap=True),
               m.run("decode", "z", t_chunk_dec=2, use_overlap=True))
