"""tf.data input pipeline: TFDS video datasets -> numpy clip batches `(B, T, H, W, 3)` in [-1, 1].

Training (`make_train_iterator`) is *step-indexed*: the batch of host p at step s is a pure
function of (seed, s, p, process_count, dataset), so a run restarted at step s continues
bitwise identically — no iterator state to checkpoint. Global sample k = s * global_batch +
p * per_host_batch + i (i < per_host_batch); epoch, position = divmod(k, N); the example is
`permutation(seed, epoch)[position]`, and the clip start is floor(u * start_range) with u a
stateless hash uniform of (seed, k) (`vidtok_jax.data.randomness`). Hosts therefore never
share an example within a step.

Two storage paths (chosen from the prepared dataset's file format):
* ArrayRecord (`video_folder` builds, or a named dataset prepared with
  `--file_format=array_record`): random access by id, exactly as above.
* TFRecord (most prepared named datasets: ucf101, bair_robot_pushing_small, moving_mnist, ...):
  streaming — files sharded per host (`ReadConfig.input_context`; an element shard when there
  are fewer files than hosts), seeded file + example shuffling, and a restart at step s skips
  the s * per_host_batch records already consumed (parsed, not decoded). Deterministic too,
  but not a pure function of k: examples may repeat across hosts within a step after epoch 1.

Clip (official): indices = `sampling.sample_frame_indices(total, fps, T, sample_fps, start)`,
the last index repeated to T frames when the video is short; only those frames' JPEG/PNG are
decoded; shorter side resized to `size[0]` (bilinear, antialias), centre crop, x * 2 - 1.
A record found unusable before decoding (no frames, bytes that are not an image, a truncated
JPEG) is logged with its path and replaced by the next example of the permutation: still a
pure function of the step. Image bytes that pass that check but then fail to decode in TF (a
corrupt JPEG body) cannot be replaced there: the element is dropped with a warning, which shifts
later batches, so bitwise resume no longer holds after it. `strict` raises on both instead.
Builds written by `video_folder` contain only frames that decoded, so this needs files damaged
on disk after the build.
"""

import atexit
import logging
import threading
import weakref

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vidtok_jax.data import config as config_lib
from vidtok_jax.data import sampling, tfds_builder
from vidtok_jax.data.randomness import _STREAM_START, clip_indices, epoch_permutation, hash_uniform

log = logging.getLogger("vidtok_jax.data")

_FRAME_KEYS = ("frames", "video", "image", "images", "image_sequence")
_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM")
_LIVE = weakref.WeakSet()  # open iterators, closed at exit: tf.data threads that outlive the
# interpreter abort the process ("terminate called without an active exception")
atexit.register(lambda: [it.close() for it in list(_LIVE)])


# ------------------------------------------------------------------ sources


def open_builder(cfg):
  """The TFDS builder of a resolved data config: a `video_folder` build of `cfg.dir` (built on
  first use; on real multi-host runs process 0 builds while the others wait) or `cfg.tfds_name`."""
  if cfg.dir is not None:
    import jax  # only for the multi-host barrier

    build = lambda: tfds_builder.build_video_folder(
        cfg.dir, cfg.tfds_data_dir, csv=cfg.csv, store_short_side=cfg.store_short_side,
        strict=cfg.strict, min_side=cfg.min_side)
    if jax.process_count() > 1:
      if jax.process_index() == 0:
        build()
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("vidtok_jax.data.build")
    return build()
  try:
    builder = tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir)
    if builder.is_prepared():
      return builder
  except Exception:  # noqa: BLE001 -- unknown code / config: read what is on disk instead
    pass
  try:
    return tfds.core.read_only_builder.builder_from_files(cfg.tfds_name,
                                                          data_dir=cfg.tfds_data_dir)
  except Exception as e:
    raise ValueError(f"config.data.tfds_name: {cfg.tfds_name!r} is not prepared under "
                     f"{cfg.tfds_data_dir!r} (run `tfds build {cfg.tfds_name}` first): {e}") from e


class Source:
  """One split of a prepared TFDS video dataset, with its frames feature and storage path.

  `encoded`: frames are per-frame JPEG/PNG strings (decoded lazily, only those sampled) rather
  than a raw uint8 `(T, H, W, C)` tensor. `random_access`: ArrayRecord files.
  """

  def __init__(self, builder, split, cfg):
    self.builder, self.split, self.cfg = builder, split, cfg
    self.name = builder.info.full_name
    feats = builder.info.features
    self.frames_key = _frames_key(feats)
    f = feats[self.frames_key]
    self.encoded = _is_image_sequence(f)
    self.has_fps = "fps" in feats
    try:  # also TFDS slices, e.g. "train[:90%]"
      self.num_examples = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise ValueError(f"config.data.*_split: {split!r} is not a split of {self.name} "
                       f"(splits: {sorted(builder.info.splits)})") from e
    if self.num_examples < 1:
      raise ValueError(f"{self.name}: split {split!r} has no examples")
    fmt = builder.info.file_format
    self.random_access = fmt is not None and "array_record" in str(fmt.value)
    self._records = None
    if self.random_access:
      self._records = builder.as_data_source(
          split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES).data_source
    self.skipped_at_build = tfds_builder.skipped_files(builder)

  def fps(self, value) -> float:
    v = float(value) if value is not None else 0.0
    return v if v > 0 else float(self.cfg.default_fps)

  def example(self, i: int) -> dict:
    """Random access: `{"frames": sequence of T bytes (or uint8 (T,H,W,C)), "fps", "path"}`."""
    raw = self._records[int(i)]
    if self.encoded:  # lazy upb parse: only the sampled frames' bytes are ever copied
      feats = tf.train.Example.FromString(raw).features.feature
      frames = feats[self.frames_key].bytes_list.value
      fps = feats["fps"].float_list.value[0] if self.has_fps else None
      path = feats["path"].bytes_list.value[0].decode() if "path" in feats else None
      n = feats["num_frames"].int64_list.value[0] if "num_frames" in feats else len(frames)
      if n != len(frames):
        frames = []  # inconsistent record: treated as bad below
    else:
      ex = self.builder.info.features.deserialize_example_np(raw)
      frames, fps, path = ex[self.frames_key], ex.get("fps"), ex.get("path")
      path = path.decode() if isinstance(path, bytes) else path
    return dict(frames=frames, fps=self.fps(fps), path=path or f"{self.name}[{self.split}][{i}]")


def _is_image_sequence(f) -> bool:  # also `tfds.features.Video`, a Sequence(Image)
  return isinstance(f, tfds.features.Sequence) and isinstance(f.feature, tfds.features.Image)


def _frames_key(features) -> str:
  """The feature holding the frames: a known name, else the first video-like feature."""
  video_like = lambda f: _is_image_sequence(f) or (
      isinstance(f, tfds.features.Tensor) and len(f.shape) == 4 and f.np_dtype == np.uint8)
  for k in [*[k for k in _FRAME_KEYS if k in features], *features.keys()]:
    if video_like(features[k]):
      return k
  raise ValueError(f"no video feature (sequence of images, or uint8 (T, H, W, C)) in {features}")


def check_frames(frames, indices) -> str:
  """'' if the sampled frames look usable, else why not (cheap: no decoding)."""
  if len(frames) == 0:
    return "no frames"
  if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
    return ""
  for i in sorted(set(int(j) for j in indices)):
    b = frames[i]
    if not b.startswith(_MAGIC):
      return f"frame {i}: not an image"
    if b.startswith(b"\xff\xd8") and not b.rstrip(b"\x00").endswith(b"\xff\xd9"):
      return f"frame {i}: truncated JPEG"
  return ""


# ------------------------------------------------------------------ TF decode / resize / crop


def resize_crop(x, size):
  """uint8 or [0,1] float `(T, H, W, C)` -> float32 `(T, h, w, C)` in [0, 1]: torchvision-style
  shorter side -> h (antialiased bilinear), zero pad if needed, centre crop (h, w).
  Matches `sampling.resize_short_side_and_center_crop` (float32 vs its float64)."""
  ch, cw = config_lib.size_hw(size)
  x = tf.image.convert_image_dtype(x, tf.float32) if x.dtype == tf.uint8 else x
  shape = tf.shape(x)
  h, w = tf.cast(shape[1], tf.float64), tf.cast(shape[2], tf.float64)
  # int(short * long / shorter) in float64, exactly as `sampling.resized_size`.
  short = tf.constant(ch, tf.float64)
  nh = tf.where(w <= h, tf.floor(ch * h / w), short)
  nw = tf.where(w <= h, short, tf.floor(ch * w / h))
  nh, nw = tf.cast(nh, tf.int32), tf.cast(nw, tf.int32)
  x = tf.cond(tf.logical_and(nh == shape[1], nw == shape[2]), lambda: x,
              lambda: tf.image.resize(x, tf.stack([nh, nw]), "bilinear", antialias=True))
  ph, pw = tf.maximum(ch - nh, 0), tf.maximum(cw - nw, 0)
  x = tf.pad(x, [[0, 0], [ph // 2, ph - ph // 2], [pw // 2, pw - pw // 2], [0, 0]])
  # round((dim - crop) / 2) with Python's half-to-even, as torchvision.
  top = tf.cast(tf.round(tf.cast(nh + ph - ch, tf.float64) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(nw + pw - cw, tf.float64) / 2), tf.int32)
  x = x[:, top:top + ch, left:left + cw, :3]
  return tf.ensure_shape(x, [None, ch, cw, 3])


def decode_frames(frames, num_frames=None):
  """`(T,)` encoded strings -> uint8 `(T, H, W, 3)`; `num_frames` static T unrolls the decodes
  (independent ops, run in parallel by TF) instead of a sequential map_fn loop."""
  dec = lambda s: tf.io.decode_image(s, channels=3, expand_animations=False)
  if num_frames is not None:
    return tf.stack([dec(frames[i]) for i in range(num_frames)])
  return tf.map_fn(dec, frames, fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


def to_clip(frames, size, num_frames=None):
  """Selected frames (encoded `(T,)` strings or uint8 `(T, H, W, C)`) -> float32 `(T, h, w, 3)`
  in [-1, 1]."""
  if frames.dtype == tf.string:
    frames = decode_frames(frames, num_frames)
  elif frames.shape[-1] == 1:
    frames = tf.image.grayscale_to_rgb(frames)
  # Antialias weights sum to 1 only up to rounding (values reach 1 + 2e-7): clip, then map.
  return tf.clip_by_value(resize_crop(frames, size), 0.0, 1.0) * 2.0 - 1.0


# ------------------------------------------------------------------ training iterator


class TrainIterator:
  """Iterator of host batches `{"video": float32 (B_host, T, h, w, 3) in [-1, 1]}` from
  `start_step` on; with `with_meta` also "id" (example id; -1 when streaming), "k" (global
  sample index), "frame_indices" `(B_host, T)` and "path". `.step` is the next batch's step."""

  def __init__(self, cfg, source, start_step, process_index, process_count, with_meta=False):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.cfg, self.source, self.step = cfg, source, int(start_step)
    self.process_index, self.process_count = process_index, process_count
    self.per_host = cfg.global_batch_size // process_count
    self._perms, self._bad, self._lock = {}, {}, threading.Lock()
    self.skipped = list(source.skipped_at_build)
    ds = self._random_access_ds() if source.random_access else self._streaming_ds()
    ds = ds.batch(self.per_host, drop_remainder=True)
    if not with_meta:
      ds = ds.map(lambda b: {"video": b["video"]})
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options).prefetch(cfg.prefetch)
    self.dataset = ds
    self._it = iter(tfds.as_numpy(ds))
    _LIVE.add(self)

  def close(self):
    """Stop the tf.data threads now (also done at exit)."""
    self._it = None
    self.dataset = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _k(self, j):
    """Local element j (counted from step 0) -> global sample index k."""
    s, i = divmod(j, self.per_host)
    return s * self.cfg.global_batch_size + self.process_index * self.per_host + i

  def _perm(self, epoch):
    with self._lock:  # computed once per epoch; the oldest of > 2 cached ones is dropped
      if epoch not in self._perms:
        self._perms = {e: p for e, p in self._perms.items() if e > epoch - 2}
        self._perms[epoch] = epoch_permutation(self.cfg.seed, epoch, self.source.num_examples)
      return self._perms[epoch]

  def _reject(self, i, path, why):
    """Log (once) and record a bad example; strict mode raises. `i`: id, or path if streaming."""
    msg = f"{self.source.name}: example {i} ({path}): {why}"
    if self.cfg.strict:
      raise ValueError(msg + " (strict mode)")
    with self._lock:
      if i not in self._bad:
        self._bad[i] = why
        self.skipped.append({"path": path, "reason": why, "split": self.source.split})
        log.warning("skip %s; using the next example of the permutation", msg)

  def _fetch(self, j):
    """numpy: local element j -> (selected frames, id, k, frame indices, path)."""
    cfg, src, n = self.cfg, self.source, self.source.num_examples
    k = self._k(int(j))
    epoch, pos = divmod(k, n)
    perm = self._perm(epoch)
    u = float(hash_uniform(cfg.seed, _STREAM_START, k)[0])
    for attempt in range(n):
      i = int(perm[(pos + attempt) % n])
      if i in self._bad:
        continue
      ex = src.example(i)
      total = len(ex["frames"])
      idx = clip_indices(total, ex["fps"], cfg.num_frames, cfg.sample_fps, u)[1] if total else []
      why = check_frames(ex["frames"], idx)
      if why:
        self._reject(i, ex["path"], why)
        continue
      if src.encoded:
        sel = np.array([ex["frames"][t] for t in idx], dtype=object)
      else:
        sel = np.asarray(ex["frames"])[idx]
      return sel, np.int64(i), np.int64(k), idx, ex["path"].encode()
    raise ValueError(f"{src.name}[{src.split}]: no usable example at all")

  def _random_access_ds(self):
    cfg, t = self.cfg, self.cfg.num_frames
    out = (tf.string if self.source.encoded else tf.uint8, tf.int64, tf.int64, tf.int64, tf.string)

    def element(j):
      sel, i, k, idx, path = tf.numpy_function(self._fetch, [j], out, stateful=False)
      sel = tf.ensure_shape(sel, [t] if self.source.encoded else [t, None, None, None])
      video = to_clip(sel, cfg.size, t)
      return {"video": video, "id": tf.ensure_shape(i, []), "k": tf.ensure_shape(k, []),
              "frame_indices": tf.ensure_shape(idx, [t]), "path": tf.ensure_shape(path, [])}

    ds = tf.data.Dataset.range(self.step * self.per_host, 2**62)
    ds = ds.map(element, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    return ds if cfg.strict else ds.ignore_errors(log_warning=True)

  def _streaming_ds(self):
    cfg, src, t = self.cfg, self.source, self.cfg.num_frames
    info = src.builder.info
    num_files = len(info.splits[src.split].file_instructions)
    ctx = None
    if self.process_count > 1 and num_files >= self.process_count:
      ctx = tf.distribute.InputContext(self.process_count, self.process_index, self.per_host)
    read = tfds.ReadConfig(shuffle_seed=cfg.seed, input_context=ctx, add_tfds_id=True)
    decoders = {src.frames_key: tfds.decode.SkipDecoding()} if src.encoded else None
    ds = src.builder.as_dataset(split=src.split, shuffle_files=True, decoders=decoders,
                                read_config=read)
    if self.process_count > 1 and ctx is None:  # too few files: every host reads all, keeps 1/P
      ds = ds.shard(self.process_count, self.process_index)
    has_path = "path" in info.features
    keep = [src.frames_key, "tfds_id", *(["fps"] * src.has_fps), *(["path"] * has_path)]
    ds = ds.map(lambda ex: {k: ex[k] for k in keep})
    ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().skip(self.step * self.per_host)  # restore: skip before any decoding

    def select(frames, fps, j, tfds_id):
      k = self._k(int(j))
      u = float(hash_uniform(cfg.seed, _STREAM_START, k)[0])
      idx = clip_indices(len(frames), src.fps(fps), t, cfg.sample_fps, u)[1] if len(frames) else []
      why = check_frames(frames, idx)
      if why:
        self._reject(tfds_id.decode(), tfds_id.decode(), why)
        return frames[:0], np.int64(k), np.zeros(t, np.int64), False
      return frames[idx], np.int64(k), idx, True

    def element(j, ex):
      fps = ex["fps"] if src.has_fps else tf.constant(0.0, tf.float32)
      sel, k, idx, ok = tf.numpy_function(
          select, [ex[src.frames_key], fps, j, ex["tfds_id"]],
          (ex[src.frames_key].dtype, tf.int64, tf.int64, tf.bool), stateful=False)
      return {"sel": sel, "k": k, "frame_indices": idx, "ok": ok,
              "path": ex["path"] if has_path else ex["tfds_id"]}

    def finish(e):
      sel = tf.ensure_shape(e["sel"], [t] if src.encoded else [t, None, None, None])
      return {"video": to_clip(sel, cfg.size, t), "id": tf.constant(-1, tf.int64),
              "k": tf.ensure_shape(e["k"], []),
              "frame_indices": tf.ensure_shape(e["frame_indices"], [t]), "path": e["path"]}

    ds = ds.map(element, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    # Dropping a bad record shifts later batches: documented limit of the streaming path.
    ds = ds.filter(lambda e: tf.ensure_shape(e["ok"], []))
    ds = ds.map(finish, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    return ds if cfg.strict else ds.ignore_errors(log_warning=True)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      raise StopIteration
    batch = next(self._it)
    self.step += 1
    return batch


def make_train_iterator(config, start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None, with_meta: bool = False):
  """`TrainIterator` over `config.data.train_split`, starting exactly at `start_step`.

  `config`: a full config (uses `config.data`) or a data config. process_index/count default to
  `jax.process_index()` / `jax.process_count()`; the host batch is global_batch_size / count.
  """
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  cfg = config_lib.resolve(config, process_count)
  source = Source(open_builder(cfg), cfg.train_split, cfg)
  return TrainIterator(cfg, source, start_step, process_index, process_count, with_meta)


# ------------------------------------------------------------------ evaluation

LONG_CHUNK = sampling.LONG_CHUNK


def _eval_videos(cfg, process_index, process_count):
  """Yield (video index, example dict) of `cfg.eval_split`, in storage order, this host's 1/P."""
  src = Source(open_builder(cfg), cfg.eval_split, cfg)
  if src.random_access:
    for i in range(process_index, src.num_examples, process_count):
      yield i, src.example(i)
    return
  decoders = {src.frames_key: tfds.decode.SkipDecoding()} if src.encoded else None
  ds = src.builder.as_dataset(split=src.split, shuffle_files=False, decoders=decoders,
                              read_config=tfds.ReadConfig(add_tfds_id=True))
  for i, ex in enumerate(tfds.as_numpy(ds)):
    if i % process_count == process_index:
      path = ex.get("path", ex["tfds_id"])
      yield i, dict(frames=ex[src.frames_key], fps=src.fps(ex.get("fps")),
                    path=path.decode() if isinstance(path, bytes) else path)


def _eval_frames(cfg, process_index, process_count):
  """Yield (video index, example, sampled frame ids at eval_sample_fps from 0, clip fn)."""
  clip = tf.function(lambda f: to_clip(f, cfg.size), reduce_retracing=True)
  for i, ex in _eval_videos(cfg, process_index, process_count):
    total = len(ex["frames"])
    ids = np.arange(0, total, sampling.frame_interval(ex["fps"], cfg.eval_sample_fps))
    why = check_frames(ex["frames"], ids) if total else "no frames"
    if why:
      if cfg.strict:
        raise ValueError(f"eval video {i} ({ex['path']}): {why} (strict mode)")
      log.warning("skip eval video %d (%s): %s", i, ex["path"], why)
      continue
    yield i, ex, ids, lambda idx, ex=ex: clip(_select(ex["frames"], idx)).numpy()


def _select(frames, idx):  # raw uint8 array, or encoded frames (numpy / lazy proto list)
  raw = isinstance(frames, np.ndarray) and frames.dtype != object
  return frames[idx] if raw else tf.constant([frames[int(t)] for t in idx], tf.string)


def iterate_eval_clips(config, process_index: int = 0, process_count: int = 1):
  """Evaluation windows: per eval video, frames 0, d, 2d, ... (d = round(fps / eval_sample_fps))
  cut into consecutive non-overlapping windows of `num_frames`; the last partial window is padded
  by repeating its last frame. Yields dicts: "video" float32 `(T, h, w, 3)` in [-1, 1], "path",
  "video_index", "window", "num_valid" (real frames in the window), "frame_indices" `(T,)`."""
  cfg = config_lib.resolve(config, 1)
  t = cfg.num_frames
  for i, ex, ids, clip in _eval_frames(cfg, process_index, process_count):
    for w, local in enumerate(sampling.eval_windows(len(ids), t)):
      idx = ids[local]
      yield {"video": clip(idx), "path": ex["path"], "video_index": i, "window": w,
             "num_valid": min(t, len(ids) - w * t), "frame_indices": idx}


def iterate_long_videos(config, process_index: int = 0, process_count: int = 1):
  """Long mode: per eval video, the first 16 * floor((L - 1) / 16) + 1 (causal) or
  16 * floor(L / 16) (non-causal) of its L frames at eval_sample_fps; shorter videos are skipped
  (logged). Yields "video" float32 `(T, h, w, 3)` in [-1, 1], "path", "video_index",
  "frame_indices"."""
  cfg = config_lib.resolve(config, 1)
  causal = config_lib.is_causal(cfg)
  for i, ex, ids, clip in _eval_frames(cfg, process_index, process_count):
    n = len(ids)
    keep = sampling.long_clip_frames(n, causal)
    if not keep:
      log.warning("skip long eval video %d (%s): %d frames at eval_sample_fps, need %s", i,
                  ex["path"], n, "> 16" if causal else ">= 16")
      continue
    yield {"video": clip(ids[:keep]), "path": ex["path"], "video_index": i,
           "frame_indices": ids[:keep]}
