"""Whole videos through `vidtok_jax.inference.streaming.Streamer` (SPEC 1.3, 6.2-6.4): official long-video
parity, equality with the in-model tiled path, the frame-count rule of every family, one compile
per chunk shape, spatial tiling and sharding, and the errors.

Models are tiny (ch=4, one res block per level, 16x16 / 32x32 frames) so that compiles stay cheap;
every Streamer is a module-scoped fixture because its jitted chunk steps are per instance.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, Ref, max_abs, ncthw_to_nthwc, nthwc_to_ncthw, random_params

import vidtok_jax
from vidtok_jax.models.autoencoder import abstract_params
from vidtok_jax.models.tiling import chunk_bounds
from vidtok_jax.inference.streaming import Streamer, _tile_starts, blend_weights, pad_frames, valid_length

# Reference README: whole models atol=2e-4, rtol=1e-4 (float32 port vs float64 reference).
ATOL, RTOL = 2e-4, 1e-4


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


@functools.lru_cache
def tiny_abstract(name):
  return abstract_params(vidtok_jax.load_config(name, ch=4, num_res_blocks=1))


def tiny(name, seed=0, **overrides):
  cfg = vidtok_jax.load_config(name, **{"ch": 4, "num_res_blocks": 1, **overrides})
  return cfg, random_params(abstract_params(cfg), seed)


def video(t, hw=16, seed=0, b=1):
  hw = (hw, hw) if isinstance(hw, int) else hw
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (b, t) + tuple(hw) + (3,)).astype(np.float32)


def assert_same_computation(a, b):
  """Two compilations of one computation: bitwise on CPU; GPU kernels may pick other algorithms
  per compilation."""
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(a, b)
  else:
    np.testing.assert_allclose(a, b, atol=ATOL)


def spec_of(name):
  return vidtok_jax.VidTok(vidtok_jax.load_config(name)).config


def assert_valid_recon(y, x):
  assert y.shape == x.shape, (y.shape, x.shape)
  assert y.dtype == np.float32
  assert np.all(np.isfinite(y))
  assert y.min() >= -1 and y.max() <= 1
  assert np.abs(y).max() > 0  # not a blank output


# ------------------------------------------------------------------------------------------------
# 1. The official long-video fixture (v1.1 KL 4x8x8, 33 frames, t_chunk_enc=8, t_chunk_dec=2).


@pytest.fixture(scope="module")
def long_ref():
  ref = Ref("v11_causal_kl_488_long")
  enc = ref.meta["config"]["encoder_config"]["params"]
  cfg = vidtok_jax.load_config(ref.meta["topology"].split()[0],
                               **{k: enc[k] for k in ("ch", "ch_mult", "norm_type")})
  assert ref.meta["paths"]["tiled_overlap"] == {"use_tiling": True, "t_chunk_enc": 8,
                                                "t_chunk_dec": 2, "use_overlap": True}
  params = vidtok_jax.params_from_torch(ref.params, cfg)
  x = ncthw_to_nthwc(ref.inputs["x"])
  return ref, cfg, params, x


def test_long_video_fixture_parity(long_ref):
  ref, cfg, params, x = long_ref
  t = x.shape[1]
  st = Streamer(cfg, params, t_chunk_enc=8, use_overlap=True)
  assert (st.t_chunk_enc, st.t_chunk_dec) == (8, 2)
  z, aux = st.encode(x)
  assert aux == {}  # KL: no indices
  assert z.dtype == np.float32
  assert_close(nthwc_to_ncthw(z), ref.expected("tiled_overlap/mean"))
  dec = np.clip(ref.out["tiled_overlap/dec"], -1, 1)  # (1, 3, 36, 32, 32): 9 latents * 4
  full = st.decode(z)
  assert_close(nthwc_to_ncthw(full), dec)
  y = st.decode(z, num_frames=t)  # v1.1 keeps the LAST t frames
  assert_close(nthwc_to_ncthw(y), dec[:, :, -t:])
  np.testing.assert_array_equal(y, full[:, -t:])
  np.testing.assert_array_equal(st.reconstruct(x), y)  # the one-call path
  # The check discriminates: the tiled+overlap decode is not the untiled one (SPEC 6.3, f=4
  # trilinear: ~1e-3), and the Streamer follows the tiled one.
  untiled = np.clip(ref.out["untiled/dec"], -1, 1)[:, :, -t:]
  assert max_abs(untiled, dec[:, :, -t:]) > 5 * ATOL
  assert max_abs(nthwc_to_ncthw(y), untiled) > 5 * ATOL


def test_long_video_fixture_parity_no_overlap(long_ref):
  ref, cfg, params, x = long_ref
  st = Streamer(cfg, params, t_chunk_enc=8, use_overlap=False)
  z = ncthw_to_nthwc(ref.out["tiled_no_overlap/mean"])
  y = st.decode(z, num_frames=x.shape[1])
  expected = np.clip(ref.out["tiled_no_overlap/dec"], -1, 1)[:, :, -x.shape[1]:]
  assert_close(nthwc_to_ncthw(y), expected)
  # without overlap the official tiling differs a lot from the overlap path (SPEC 6.3)
  overlap = np.clip(ref.out["tiled_overlap/dec"], -1, 1)[:, :, -x.shape[1]:]
  assert max_abs(expected, overlap) > 1e-2


# ------------------------------------------------------------------------------------------------
# Shared tiny models. The causal Streamers are built with 16x16 spatial tiles: on 16x16 frames that
# is no tiling (one tile), and 32x32 frames then run through the very same compiled chunk steps.


@pytest.fixture(scope="module")
def v11():
  """v1.1 KL 4x8x8 (trilinear), streamed with t_chunk_enc=8 (t_chunk_dec=2) and overlap."""
  cfg, params = tiny("vidtok_kl_causal_488_4chn_v1_1", seed=1)
  st = Streamer(cfg, params, t_chunk_enc=8, use_overlap=True, tile=(16, 16), tile_overlap=8)
  return vidtok_jax.VidTok(cfg), params, st


@pytest.fixture(scope="module")
def fsq():
  """v1.1 FSQ 8x8x8 (f=8): t_chunk_enc=8, so t_chunk_dec=1. The encoder's conv_out is scaled
  by 3 (like the reference FSQ fixtures) so that many levels occur."""
  cfg, params = tiny("vidtok_fsq_causal_888_32768_v1_1", seed=2)
  params["encoder"]["conv_out"]["conv"]["kernel"] *= 3
  st = Streamer(cfg, params, t_chunk_enc=8, use_overlap=True, tile=(16, 16), tile_overlap=8)
  return vidtok_jax.VidTok(cfg), params, st


@pytest.fixture(scope="module")
def v10():
  """v1.0 KL 4x8x8 (nearest upsampling: exact streaming), t_chunk_enc=4, computing in float64
  (use it under `jax.enable_x64`): chunked and whole-clip processing then agree to float64
  precision (~1e-13; at most the float32 rounding of the returned frames), where float32
  compute, amplified by a random ch=4 model, leaves ~5e-5."""
  _, params = tiny("vidtok_kl_causal_488_4chn", seed=3)
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  cfg = vidtok_jax.load_config("vidtok_kl_causal_488_4chn", ch=4, num_res_blocks=1,
                               dtype="float64", param_dtype="float64")
  with jax.enable_x64(True):  # the Streamer places its weights at construction: keep float64
    st = Streamer(cfg, params, t_chunk_enc=4)
  return vidtok_jax.VidTok(cfg), params, st


@pytest.fixture(scope="module")
def noncausal():
  """Non-causal KL 4x8x8 in independent windows of 8 frames."""
  cfg, params = tiny("vidtok_kl_noncausal_488_4chn", seed=4)
  return vidtok_jax.VidTok(cfg), params, Streamer(cfg, params, window=8)


# ------------------------------------------------------------------------------------------------
# 4. One compiled program per chunk shape: a longer video with the same remainder structure
#    compiles nothing new. (Runs first among the users of `v11`, but does not rely on it.)


def test_longer_video_compiles_nothing(v11):
  _, _, st = v11
  fresh = st._enc[False]._cache_size() == 0 and st._dec[False]._cache_size() == 0
  y = st.reconstruct(video(1 + 8 * 2, seed=10))  # 17 frames: 5 latents
  assert y.shape[1] == 17
  enc, dec = st._enc[False]._cache_size(), st._dec[False]._cache_size()
  if fresh:
    # encoder: frame 0 alone, then 8-frame chunks; decoder: latent 0 (+1 look-ahead), 2-latent
    # chunks (+1 look-ahead), the last 2-latent chunk without look-ahead
    assert (enc, dec) == (2, 3)
  y = st.reconstruct(video(1 + 8 * 5, seed=11))  # 41 frames: 11 latents, 3 more steady chunks
  assert y.shape[1] == 41 and np.all(np.isfinite(y))
  assert (st._enc[False]._cache_size(), st._dec[False]._cache_size()) == (enc, dec)


# ------------------------------------------------------------------------------------------------
# 2. The Streamer equals the in-model tiled path (`encode(t_chunk_enc=...)`,
#    `decode(t_chunk_dec=..., use_overlap=True)`).


def test_v11_kl_equals_in_model_tiling(v11):
  model, params, st = v11
  variables = {"params": params}
  t = 6  # chunks [0,1) [1,6): the short last chunk is padded inside the encoder (3 latents)
  x = video(t, seed=20)
  z, _ = st.encode(x)
  zm, aux = jax.jit(lambda v, x: model.apply(v, x, t_chunk_enc=8, method=model.encode))(
      variables, x)
  assert z.shape == zm.shape == (1, 3, 2, 2, 4)
  np.testing.assert_allclose(z, np.asarray(aux["mean"]), atol=1e-5)
  ym = jax.jit(lambda v, z: model.apply(v, z, t_chunk_dec=2, use_overlap=True,
                                        method=model.decode))(variables, zm)
  ym = np.clip(np.asarray(ym), -1, 1)
  y = st.decode(z)
  assert y.shape == ym.shape == (1, 12, 16, 16, 3)
  np.testing.assert_allclose(y, ym, atol=1e-4)
  recon = st.reconstruct(x)
  assert_valid_recon(recon, x)
  np.testing.assert_allclose(recon, ym[:, -t:], atol=1e-4)


def test_v11_fsq_equals_in_model_tiling(fsq):
  """FSQ: the streamed tokens are the in-model tiled encoding's, and decoding the tokens equals
  decoding their codes. (The decoder is the KL test's; its in-model parity is checked there.)"""
  model, params, st = fsq
  t = 9  # chunks [0,1) [1,9): 2 latents
  x = video(t, seed=30)
  z, aux = st.encode(x)
  idx = aux["indices"]
  assert z.shape == (1, 2, 2, 2, 5)
  assert idx.shape == (1, 2, 2, 2) and np.issubdtype(idx.dtype, np.integer)
  assert len(np.unique(idx)) >= 6  # the checks compare real tokens, not one constant
  zm, auxm = jax.jit(lambda v, x: model.apply(v, x, compute_aux=False, t_chunk_enc=8,
                                              method=model.encode))({"params": params}, x)
  np.testing.assert_array_equal(idx, np.asarray(auxm["indices"]))
  np.testing.assert_array_equal(z, np.asarray(zm))  # codes are a function of the indices
  y = st.decode(z)
  assert y.shape == (1, 16, 16, 16, 3)
  y_idx = st.decode(idx, indices=True)
  np.testing.assert_allclose(y_idx, y, atol=1e-6)
  recon = st.reconstruct(x)
  assert_valid_recon(recon, x)
  np.testing.assert_array_equal(recon, y[:, -t:])


# ------------------------------------------------------------------------------------------------
# 3. The frame-count rule (SPEC 1.3 and the module doc): any T >= 1 comes back as T frames.


@pytest.mark.parametrize("name,window,cases", [
    ("vidtok_kl_causal_488_4chn", 16, {1: 1, 2: 5, 4: 5, 5: 5, 6: 9, 17: 17, 18: 21}),
    ("vidtok_kl_causal_288_8chn", 16, {1: 1, 2: 3, 3: 3, 4: 5, 17: 17}),
    ("vidtok_fsq_causal_41616_262144", 16, {1: 1, 2: 5, 16: 17}),
    ("vidtok_kl_causal_488_4chn_v1_1", 16, {1: 1, 2: 2, 5: 5, 18: 18}),
    ("vidtok_fsq_causal_888_32768_v1_1", 16, {1: 1, 3: 3, 17: 17}),
    ("vidtok_kl_noncausal_488_4chn", 16, {1: 16, 4: 16, 16: 16, 17: 32, 33: 48}),
    ("vidtok_kl_noncausal_488_4chn", 8, {1: 8, 8: 8, 9: 16, 18: 24}),
    ("vidtok_fsq_noncausal_41616_262144", 4, {1: 4, 5: 8}),
])
def test_valid_length(name, window, cases):
  spec = spec_of(name)
  for t, expected in cases.items():
    assert valid_length(spec, t, window) == expected, (t, expected)


def test_pad_frames():
  x = video(3, hw=8)
  p = pad_frames(x, 7)
  assert p.shape == (1, 7, 8, 8, 3)
  np.testing.assert_array_equal(p[:, :3], x)
  np.testing.assert_array_equal(p[:, 3:], np.repeat(x[:, 2:3], 4, axis=1))
  assert pad_frames(x, 3) is x and pad_frames(x, 2) is x


# Frame counts per family: every remainder mod f, T = 1, and several chunks (chosen to reuse the
# chunk shapes the other tests compile).
FRAME_COUNTS = {"v10": (1, 2, 5, 8, 18), "v11": (1, 4, 6, 9, 12, 22), "fsq": (1, 9),
                "noncausal": (1, 2, 5, 9, 18)}


@pytest.mark.parametrize("family", sorted(FRAME_COUNTS))
def test_reconstruct_returns_t_frames(family, request):
  _, _, st = request.getfixturevalue(family)
  with jax.enable_x64(family == "v10"):
    for t in FRAME_COUNTS[family]:
      x = video(t, seed=40 + t)
      y = st.reconstruct(x)
      assert_valid_recon(y, x)  # float32 frames, also from the float64 model


def test_v10_streaming_is_exact(v10):
  """v1.0 streams exactly: the chunked reconstruction of an end-padded video equals the whole-clip
  forward of that padded video (first T frames); so do the latents."""
  model, params, st = v10
  t = 18
  x = video(t, seed=50)
  xp = pad_frames(x, valid_length(st.spec, t))
  assert xp.shape[1] == 21
  with jax.enable_x64(True):
    z_full, y_full, _ = jax.jit(lambda v, x: model.apply(v, x))({"params": params},
                                                              xp.astype(np.float64))
    z, _ = st.encode(x)
    y = st.reconstruct(x)
    full = st.decode(z)
  assert z.shape == z_full.shape == (1, 6, 2, 2, 4)
  assert max_abs(z, z_full) < 1e-6
  assert y.shape == x.shape
  assert max_abs(y, np.clip(np.asarray(y_full), -1, 1)[:, :t]) < 1e-6
  # decode without num_frames returns all 21 padded frames; num_frames keeps the FIRST ones
  assert full.shape[1] == 21
  np.testing.assert_array_equal(y, full[:, :t])


def test_noncausal_windows_are_independent(noncausal):
  """Non-causal: the end-padded video is cut into windows, each run through the model alone."""
  model, params, st = noncausal
  t = 18
  x = video(t, seed=60)
  xp = pad_frames(x, valid_length(st.spec, t, st.window))
  assert xp.shape[1] == 24
  fwd = jax.jit(lambda v, w: model.apply(v, w))
  outs = [fwd({"params": params}, xp[:, s: s + 8]) for s in (0, 8, 16)]
  z, _ = st.encode(x)
  np.testing.assert_allclose(z, np.concatenate([np.asarray(o[0]) for o in outs], 1), atol=1e-5)
  expected = np.clip(np.concatenate([np.asarray(o[1]) for o in outs], 1), -1, 1)
  y = st.reconstruct(x)
  assert y.shape == x.shape
  np.testing.assert_allclose(y, expected[:, :t], atol=ATOL)
  np.testing.assert_array_equal(st.reconstruct(x[0]), y)  # a (T, H, W, 3) video: batch of one
  # Independence: changing the second window's frames leaves the first window's output alone.
  x2 = x.copy()
  x2[:, 8:] = video(t - 8, seed=62)
  y2 = st.reconstruct(x2)
  np.testing.assert_array_equal(y2[:, :8], y[:, :8])
  assert np.abs(y2[:, 8:] - y[:, 8:]).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# 5. Spatial tiling.


@pytest.mark.parametrize("n,tile,overlap", [
    (40, 16, 8), (48, 32, 8), (33, 10, 3), (64, 16, 0), (16, 16, 8), (10, 16, 8), (7, 2, 1),
    (64, 24, 8), (128, 32, 16)])
def test_tile_starts_cover_the_axis(n, tile, overlap):
  starts = _tile_starts(n, tile, overlap)
  assert starts == sorted(set(starts)) and starts[0] == 0
  size = min(tile, n)
  assert starts[-1] + size == n  # the last tile ends at the edge, none runs past it
  covered = np.zeros(n, bool)
  for s in starts:
    covered[s: s + size] = True
  assert covered.all()
  for a, b in zip(starts[:-1], starts[1:], strict=True):  # neighbours share >= `overlap`
    assert a + size - b >= overlap
  if tile >= n:
    assert starts == [0]


@pytest.mark.parametrize("n,tile,ramp", [(40, 16, 8), (32, 16, 8), (64, 24, 8), (24, 8, 0),
                                         (33, 10, 3), (16, 16, 8)])
def test_blend_weights(n, tile, ramp):
  starts = _tile_starts(n, tile, ramp)
  w = blend_weights(n, starts, tile, ramp)
  assert w.shape == (len(starts), n)
  np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)
  assert w.min() >= 0 and w.max() <= 1
  pos = np.arange(n)
  for k, s in enumerate(starts):  # zero outside the tile
    assert np.all(w[k][(pos < s) | (pos >= s + tile)] == 0)
  # positions covered by one tile only take it whole
  count = sum(((pos >= s) & (pos < s + tile)).astype(int) for s in starts)
  assert np.all(w.max(0)[count == 1] == 1)
  if len(starts) > 1 and ramp > 1:  # a real ramp: weights strictly between 0 and 1 somewhere
    assert np.any((w > 0) & (w < 1))
  if len(starts) > 1:  # monotone: the first tile fades out, the last one fades in
    assert np.all(np.diff(w[0][: starts[0] + tile]) <= 1e-12)
    assert np.all(np.diff(w[-1][starts[-1]:]) >= -1e-12)
  hard = blend_weights(n, starts, tile, ramp, hard=True)
  assert set(np.unique(hard)) <= {0.0, 1.0}
  np.testing.assert_array_equal(hard.sum(0), 1.0)
  for p in range(n):  # the owner is a covering tile whose centre is nearest
    k = int(np.argmax(hard[:, p]))
    assert starts[k] <= p < starts[k] + tile
    d = [abs(p + 0.5 - (s + tile / 2)) for s in starts if s <= p < s + tile]
    assert abs(p + 0.5 - (starts[k] + tile / 2)) == min(d)


def test_blend_weights_linear_ramp():
  w = blend_weights(24, [0, 8], 16, 8)  # tiles [0, 16) and [8, 24), 8 shared pixels
  np.testing.assert_allclose(w[0, :8], 1)
  np.testing.assert_allclose(w[1, 16:], 1)
  np.testing.assert_allclose(w[1, 8:16], (np.arange(8) + 0.5) / 8)
  np.testing.assert_allclose(w[0, 8:16], 1 - (np.arange(8) + 0.5) / 8)


@pytest.fixture(scope="module")
def noncausal_tiled(noncausal):
  model, params, _ = noncausal
  return Streamer(model.config, params, window=8, tile=(16, 16), tile_overlap=8)


def test_tile_covering_the_frame_is_no_tiling(noncausal, noncausal_tiled):
  x = video(8, seed=80)
  z, _ = noncausal[2].encode(x)
  z_t, _ = noncausal_tiled.encode(x)
  assert_same_computation(z_t, z)
  assert_same_computation(noncausal_tiled.decode(z_t), noncausal[2].decode(z))


def test_spatial_tiles_blend(noncausal_tiled):
  """32x32 frames in 16x16 tiles with 8 shared pixels (3x3 tiles): the result is each tile's
  own encoding (decoding) blended with `blend_weights`; where one tile alone covers a position
  it is that tile's output exactly."""
  st = noncausal_tiled
  x = video(8, hw=32, seed=81)
  z, aux = st.encode(x)
  assert z.shape == (1, 2, 4, 4, 4) and aux == {}
  starts = [0, 8, 16]
  assert _tile_starts(32, 16, 8) == starts
  w = blend_weights(4, [s // 8 for s in starts], 2, 1)
  expected = np.zeros(z.shape)
  for i, h in enumerate(starts):
    for j, v in enumerate(starts):
      zt, _ = st.encode(x[:, :, h: h + 16, v: v + 16])  # one tile: runs untiled
      wt = w[i, h // 8: h // 8 + 2, None] * w[j, None, v // 8: v // 8 + 2]
      expected[:, :, h // 8: h // 8 + 2, v // 8: v // 8 + 2] += zt * wt[..., None]
      if i == j == 0:
        np.testing.assert_array_equal(z[:, :, 0, 0], zt[:, :, 0, 0])
  np.testing.assert_allclose(z, expected, atol=1e-6)

  y = st.decode(z)
  assert y.shape == (1, 8, 32, 32, 3) and np.all(np.isfinite(y)) and np.abs(y).max() <= 1
  w = blend_weights(32, starts, 16, 8)
  expected = np.zeros(y.shape)
  for i, h in enumerate(starts):
    for j, v in enumerate(starts):
      yt = st.decode(z[:, :, h // 8: h // 8 + 2, v // 8: v // 8 + 2])
      wt = w[i, h: h + 16, None] * w[j, None, v: v + 16]
      expected[:, :, h: h + 16, v: v + 16] += yt * wt[..., None]
      if i == j == 0:  # pixels 0..7 belong to the first tile alone
        np.testing.assert_array_equal(y[:, :, :8, :8], yt[:, :, :8, :8])
  np.testing.assert_allclose(y, expected, atol=1e-6)
  # non-square frames: tiles along one axis only
  x = video(8, hw=(16, 32), seed=82)
  assert_valid_recon(st.reconstruct(x), x)


def test_causal_spatial_tiles(v11):
  """Causal KL: each 16x16 tile is streamed over time on its own, then blended."""
  _, _, st = v11
  x = video(9, hw=32, seed=85)
  z, _ = st.encode(x)
  assert z.shape == (1, 3, 4, 4, 4) and np.all(np.isfinite(z))
  zt, _ = st.encode(x[:, :, :16, :16])  # the corner latent belongs to the corner tile alone
  np.testing.assert_array_equal(z[:, :, 0, 0], zt[:, :, 0, 0])
  y = st.decode(z, num_frames=9)
  assert_valid_recon(y, x)
  yt = st.decode(z[:, :, :2, :2], num_frames=9)
  np.testing.assert_array_equal(y[:, :, :8, :8], yt[:, :, :8, :8])
  np.testing.assert_array_equal(st.reconstruct(x, progress=True), y)  # with a progress bar


def test_fsq_tiles_keep_valid_tokens(fsq):
  """FSQ latents are not blended: each position takes the code (and index) of the tile whose
  centre is nearest, so indices stay valid tokens and `codes(indices) == z`."""
  model, params, st = fsq
  x = video(9, hw=32, seed=90)
  z, aux = st.encode(x)
  idx = aux["indices"]
  k = int(np.prod(model.config.levels))
  assert z.shape == (1, 2, 4, 4, 5) and idx.shape == (1, 2, 4, 4)
  assert np.issubdtype(idx.dtype, np.integer) and idx.min() >= 0 and idx.max() < k
  codes = model.apply({"params": params}, jnp.asarray(idx),
                      method=lambda m, i: m.regularization.indices_to_codes(i))
  np.testing.assert_array_equal(z, np.asarray(codes))
  # the owner of each latent position is the tile of `blend_weights(hard=True)`
  starts = [0, 8, 16]
  hard = blend_weights(4, [0, 1, 2], 2, 1, hard=True)
  exp_z, exp_i = np.zeros(z.shape), np.zeros(idx.shape, np.int64)
  for i, h in enumerate(starts):
    for j, v in enumerate(starts):
      zt, at = st.encode(x[:, :, h: h + 16, v: v + 16])
      wt = hard[i, h // 8: h // 8 + 2, None] * hard[j, None, v // 8: v // 8 + 2]
      exp_z[:, :, h // 8: h // 8 + 2, v // 8: v // 8 + 2] += zt * wt[..., None]
      exp_i[:, :, h // 8: h // 8 + 2, v // 8: v // 8 + 2] += at["indices"] * wt.astype(np.int64)
  np.testing.assert_array_equal(z, exp_z)
  np.testing.assert_array_equal(idx, exp_i)
  # tokens decode like their codes (streamed over time, in spatial tiles)
  y = st.decode(idx, num_frames=9, indices=True)
  assert_valid_recon(y, x)
  np.testing.assert_allclose(y, st.decode(z, num_frames=9), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 6. Sharding each chunk's height over devices (4 forced CPU devices, in a subprocess). A v1.0
#    model computing in float64: its streaming is exact (test_v10_streaming_is_exact), so the
#    sharded stream must equal the unsharded whole-clip forward to float64 precision (up to the
#    float32 rounding of returned frames), not merely to float32 compute rounding amplified by a
#    random tiny model (~5e-4 here).

SHARDED_CHILD = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_disable_most_optimizations", True)
    import numpy as np
    import vidtok_jax
    sys.path.insert(0, "tests")  # random_weights (cwd: the repository)
    from random_weights import random_params
    from vidtok_jax.models.autoencoder import abstract_params
    from vidtok_jax.inference.streaming import Streamer

    assert len(jax.devices()) == 4, jax.devices()
    name = "vidtok_kl_causal_488_4chn"
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), random_params(
        abstract_params(vidtok_jax.load_config(name, ch=4, num_res_blocks=1)), 5))
    cfg = vidtok_jax.load_config(name, ch=4, num_res_blocks=1, dtype="float64",
                                 param_dtype="float64")
    x = np.random.default_rng(5).uniform(-1, 1, (1, 5, 32, 32, 3)).astype(np.float32)
    model = vidtok_jax.VidTok(cfg)
    z0, y0, _ = jax.jit(lambda v, x: model.apply(v, x))({"params": params}, x.astype(np.float64))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("space",))
    sharded = Streamer(cfg, params, t_chunk_enc=4, mesh=mesh)
    placed = sharded._put(x)
    shards = sorted(s.data.shape[2] for s in placed.addressable_shards)
    z1, _ = sharded.encode(x)
    y1 = sharded.decode(z1, num_frames=5)
    json.dump({"shards": shards, "z_err": float(np.abs(z1 - np.asarray(z0)).max()),
               "y_err": float(np.abs(y1 - np.clip(np.asarray(y0), -1, 1)).max()),
               "shape": list(y1.shape),
               "finite": bool(np.isfinite(y1).all()), "y_max": float(np.abs(y1).max())},
              sys.stdout)
    """)


def test_height_sharded_over_a_mesh_equals_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  p = subprocess.run([sys.executable, "-c", SHARDED_CHILD], capture_output=True, text=True,
                     timeout=600, cwd=REPO, env=env)
  assert p.returncode == 0, p.stderr[-6000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["shards"] == [8, 8, 8, 8]  # each device holds a quarter of the height
  assert out["shape"] == [1, 5, 32, 32, 3] and out["finite"] and out["y_max"] > 0
  assert out["z_err"] < 1e-6 and out["y_err"] < 1e-6, out


# ------------------------------------------------------------------------------------------------
# 7. Errors name the rule (raised before anything is compiled).


@pytest.mark.parametrize("name,kwargs,match", [
    ("vidtok_kl_causal_488_4chn_v1_1", dict(t_chunk_enc=6), "multiple of the time factor 4"),
    ("vidtok_kl_causal_488_4chn_v1_1", dict(t_chunk_enc=0), "multiple of the time factor 4"),
    ("vidtok_fsq_causal_888_32768_v1_1", dict(t_chunk_enc=4), "multiple of the time factor 8"),
    ("vidtok_kl_causal_488_4chn", dict(tile=(12, 16)), "spatial factor 8"),
    ("vidtok_kl_causal_488_4chn", dict(tile=(16,)), "tile must be"),
    ("vidtok_kl_causal_488_4chn", dict(tile=(0, 16)), "tile must be"),
    ("vidtok_kl_causal_41616_4chn", dict(tile=(24, 32)), "spatial factor 16"),
    ("vidtok_kl_causal_488_4chn", dict(tile=(16, 16), tile_overlap=16), "tile_overlap"),
    ("vidtok_kl_causal_488_4chn", dict(tile=(16, 32), tile_overlap=4), "tile_overlap"),
    ("vidtok_kl_causal_488_4chn", dict(tile=(16, 16), tile_overlap=-8), "tile_overlap"),
    ("vidtok_kl_noncausal_488_4chn", dict(window=6), "window must be a positive multiple of 4"),
    ("vidtok_kl_noncausal_488_4chn", dict(window=0), "window must be a positive multiple of 4"),
])
def test_bad_settings(name, kwargs, match):
  cfg = vidtok_jax.load_config(name, ch=4, num_res_blocks=1)
  with pytest.raises(ValueError, match=match):
    Streamer(cfg, tiny_abstract(name), **kwargs)


def test_mesh_needs_one_axis():
  cfg = vidtok_jax.load_config("vidtok_kl_causal_488_4chn", ch=4, num_res_blocks=1)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("a", "b"))
  with pytest.raises(ValueError, match="one axis"):
    Streamer(cfg, tiny_abstract("vidtok_kl_causal_488_4chn"), mesh=mesh)


@pytest.mark.parametrize("shape,dtype,match", [
    ((1, 5, 16, 16, 4), np.float32, r"expected a video \(B, T, H, W, 3\)"),
    ((1, 5, 16, 16), np.float32, "expected a video"),
    ((5, 16, 16), np.float32, "expected a video"),
    ((1, 1, 5, 16, 16, 3), np.float32, "expected a video"),
    ((1, 5, 12, 16, 3), np.float32, "divisible by the spatial factor 8"),
    ((1, 5, 16, 20, 3), np.float32, "divisible by the spatial factor 8"),
    ((1, 5, 16, 16, 3), np.uint8, "float pixels"),
    ((1, 5, 16, 16, 3), np.int32, "float pixels"),
])
def test_bad_video(v10, shape, dtype, match):
  _, _, st = v10
  bad = np.zeros(shape, dtype)
  for call in (st.encode, st.reconstruct):
    with pytest.raises(ValueError, match=match):
      call(bad)


@pytest.mark.parametrize("family", ["v10", "noncausal"])
def test_empty_video(family, request):
  _, _, st = request.getfixturevalue(family)
  for shape in ((1, 0, 16, 16, 3), (0, 5, 16, 16, 3)):
    with pytest.raises(ValueError):
      st.reconstruct(np.zeros(shape, np.float32))


def test_bad_latents_and_indices(v10, fsq):
  _, _, st = v10
  with pytest.raises(ValueError, match="needs an FSQ model"):
    st.decode(np.zeros((1, 2, 2, 2), np.int32), indices=True)
  with pytest.raises(ValueError, match=r"expected latents \(B, T', h, w, 4\)"):
    st.decode(np.zeros((1, 2, 2, 2, 5), np.float32))
  with pytest.raises(ValueError, match="expected latents"):
    st.decode(np.zeros((1, 2, 2, 4), np.float32))
  with pytest.raises(ValueError, match=r"expected token indices \(B, T', h, w\)"):
    fsq[2].decode(np.zeros((1, 2, 2, 2, 5), np.int32), indices=True)


# ------------------------------------------------------------------------------------------------
# 7. Pipelining: tiles batched into one call equal tiles one at a time (sampling included: each
#    tile keeps its key), and whole videos run under a transfer guard (explicit copies only).


@pytest.mark.parametrize("name", ["vidtok_kl_causal_488_4chn_v1_1",
                                  "vidtok_fsq_causal_888_32768_v1_1",
                                  "vidtok_kl_noncausal_488_4chn"])
def test_tile_batch_equals_tiles_one_at_a_time_under_a_transfer_guard(name):
  cfg, params = tiny(name, seed=6)
  kw = dict(t_chunk_enc=8, window=8, tile=(16, 16), tile_overlap=8, sample=True, seed=3)
  one, three = Streamer(cfg, params, **kw), Streamer(cfg, params, tile_batch=3, **kw)
  x = video(17, hw=(32, 24), seed=7)  # 3x2 tiles: a group of 3 twice
  z1, a1 = one.encode(x)
  y1 = one.decode(z1, num_frames=17)
  with jax.transfer_guard("disallow"):
    z3, a3 = three.encode(x)
    y3 = three.decode(z3, num_frames=17)
    # The vmapped program batches the convs: the same sums, other float32 rounding (amplified
    # by the random ch=4 model to ~1e-4 in the frames): the module's float32 tolerance.
    assert_close(z3, z1)
    assert_close(y3, y1)
    if "indices" in a1:
      np.testing.assert_array_equal(a3["indices"], a1["indices"])
      yi = three.decode(a3["indices"], num_frames=17, indices=True)
      assert_close(yi, one.decode(a1["indices"], num_frames=17, indices=True))
    y = one.reconstruct(x[:, :13])  # a new length: no implicit transfer either
  assert y.shape == (1, 13, 32, 24, 3)


def test_bad_tile_batch():
  cfg, params = tiny("vidtok_kl_causal_488_4chn", seed=0)
  with pytest.raises(ValueError, match="tile_batch must be >= 1"):
    Streamer(cfg, params, tile=(16, 16), tile_overlap=8, tile_batch=0)


def test_progress_counts_real_frames_not_padding():
  from vidtok_jax.inference.streaming import _RealFrames

  class Bar:
    n = 0

    def update(self, k):
      self.n += k

    def close(self):
      pass

  bar = Bar()
  with _RealFrames(bar, real=10, padded=16) as b:  # two tiles of a 10-frame video padded to 16
    for _ in range(2):
      for k in (4, 4, 4, 4):
        b.update(k)
  assert bar.n == 20
  bar = Bar()
  with _RealFrames(bar, real=10, padded=16) as b:  # the same two tiles side by side (tile_batch)
    seen = []
    for k in (4, 4, 4, 4):
      b.update(k, 2)
      seen.append(bar.n)
  assert seen == [8, 16, 20, 20]


# ------------------------------------------------------------------------------------------------
# 8. Sampling with tiles: each tile draws its own noise (its key folds in its grid position), and
#    the tiled draw is the per-tile formula mean + exp(logvar / 2) * N(key(seed, chunk, tile)).


@pytest.mark.parametrize("name", ["vidtok_kl_causal_488_4chn_v1_1", "vidtok_kl_noncausal_488_4chn"])
def test_tiles_draw_their_own_noise(name):
  cfg, params = tiny(name, seed=6)
  kw = dict(t_chunk_enc=8, window=8, tile=(16, 16), tile_overlap=0, seed=3)
  mode, sampled = Streamer(cfg, params, **kw), Streamer(cfg, params, sample=True, **kw)
  # The same content in both 16x16 tiles: any difference between the tiles' draws is the noise.
  half = video(8 if not cfg.causal else 9, hw=16, seed=7)
  x = np.concatenate([half, half], axis=3)  # (1, T, 16, 32, 3): tiles (0, 0) and (0, 1)
  z0, _ = mode.encode(x)
  z1, _ = sampled.encode(x)
  noise = z1 - z0
  left, right = noise[:, :, :, :2], noise[:, :, :, 2:]  # latent width 4: 2 per tile
  np.testing.assert_array_equal(z0[:, :, :, :2], z0[:, :, :, 2:])  # same content, same mean
  assert np.abs(left).max() > 1e-3 and np.abs(right).max() > 1e-3
  assert np.abs(left - right).max() > 1e-3, "tiles drew the same noise"
  # The per-tile formula, chunk (or window) by chunk: the model's own sampled encode of the
  # tile's chunk (caches carried) under the tile's key fold_in(fold_in(key(seed), k), tile).
  model, v = vidtok_jax.VidTok(cfg), {"params": params}
  if cfg.causal:
    spans = list(enumerate(chunk_bounds(half.shape[1], kw["t_chunk_enc"])))
  else:
    starts = range(0, half.shape[1], kw["window"])
    spans = [(k, (s, s + kw["window"])) for k, s in enumerate(starts)]
  for tile, zt in enumerate((z1[:, :, :, :2], z1[:, :, :, 2:])):
    expect, state = [], None
    for k, (s, e) in spans:
      rngs = {"sample": jax.random.fold_in(jax.random.fold_in(jax.random.key(3), k), tile)}
      xc = jnp.asarray(half[:, s:e])
      if cfg.causal:
        z, _, state = model.apply(v, xc, state, True, rngs=rngs,
                                  method=vidtok_jax.VidTok.encode_chunk)
      else:
        z, _ = model.apply(v, xc, True, rngs=rngs, method=vidtok_jax.VidTok.encode)
      expect.append(np.asarray(z))
    assert_close(zt, np.concatenate(expect, axis=1))
