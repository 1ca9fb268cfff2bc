"""Token-rate figures of an FSQ tokenizer, as tokenized-video-compression papers report them.

    counts = token_counts(ids, codebook_size)           # accumulate over a dataset
    fig = rate_figures(counts, codebook_size, num_pixels, coded_bits=...)

* utilisation: % of the codebook's K codes used at least once;
* entropy: empirical order-0 entropy of the ids, bits per token;
* raw bpp: log2(K) bits per token, per pixel of the input video (frames x height x width);
* entropy bpp: the order-0 entropy per pixel (the bound an order-0 coder approaches);
* coded bpp: the size of the real entropy-coded stream (`entropy_code`: constriction's ANS coder
  with the order-0 model of the data), per pixel. The model (the used ids and their counts) is
  side information a decoder needs too; it is reported apart (`model_bits`), not in coded bpp.
"""

import math

import numpy as np

_COUNT_DTYPE = np.int64


def token_counts(ids, codebook_size: int, counts=None) -> np.ndarray:
  """int64 `(codebook_size,)` histogram of `ids` (any shape), added to `counts` if given.
  ValueError for ids outside [0, codebook_size)."""
  ids = np.asarray(ids).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= codebook_size):
    raise ValueError(f"token ids must be in [0, {codebook_size}), got [{ids.min()}, {ids.max()}]")
  c = np.bincount(ids.astype(np.int64), minlength=codebook_size).astype(_COUNT_DTYPE)
  return c if counts is None else counts + c


def _model(counts):
  """(used ids sorted, their float64 probabilities) of the order-0 model."""
  counts = np.asarray(counts, np.float64)
  used = np.flatnonzero(counts)
  if not len(used):
    raise ValueError("no tokens: the order-0 model is empty")
  return used, counts[used] / counts[used].sum()


def entropy_code(ids, counts) -> np.ndarray:
  """uint32 words of `ids` (1-D) ANS-coded with the order-0 model `counts` (constriction).
  Every id must have a non-zero count."""
  import constriction

  used, p = _model(counts)
  ids = np.asarray(ids).reshape(-1).astype(np.int64)
  sym = np.searchsorted(used, ids)
  if len(ids) and (sym.max() >= len(used) or np.any(used[np.minimum(sym, len(used) - 1)] != ids)):
    raise ValueError("entropy_code: some ids have a zero count in the model")
  coder = constriction.stream.stack.AnsCoder()
  if len(used) == 1:  # a one-symbol alphabet needs no bits
    return np.zeros(0, np.uint32)
  model = constriction.stream.model.Categorical(p, perfect=False)
  coder.encode_reverse(sym.astype(np.int32), model)
  return np.asarray(coder.get_compressed(), np.uint32)


def entropy_decode(words, counts, n: int) -> np.ndarray:
  """The `n` ids of `entropy_code(ids, counts)`, as int64."""
  import constriction

  used, p = _model(counts)
  if len(used) == 1:
    return np.full(n, used[0], np.int64)
  coder = constriction.stream.stack.AnsCoder(np.asarray(words, np.uint32))
  model = constriction.stream.model.Categorical(p, perfect=False)
  return used[np.asarray(coder.decode(model, n), np.int64)]


def entropy_bits(counts) -> float:
  """Empirical order-0 entropy, bits per token."""
  _, p = _model(counts)
  return max(0.0, float(-(p * np.log2(p)).sum()))  # no -0.0 for one code


def rate_figures(counts, codebook_size: int, num_pixels: int, coded_bits=None) -> dict:
  """The rate figures (module doc) of a dataset's token histogram `counts`; `num_pixels`: input
  frames x height x width over the same tokens; `coded_bits`: size of the entropy-coded stream."""
  counts = np.asarray(counts)
  n = int(counts.sum())
  used = int(np.count_nonzero(counts))
  h = entropy_bits(counts)
  raw = math.log2(codebook_size)
  out = {
      "codebook_size": int(codebook_size), "tokens": n, "pixels": int(num_pixels),
      "codes_used": used, "utilisation_pct": 100.0 * used / codebook_size,
      "entropy_bits_per_token": h, "raw_bits_per_token": raw,
      "raw_bpp": n * raw / num_pixels, "entropy_bpp": n * h / num_pixels,
      # Side information of the order-0 model: each used id and its count, 32 bits apiece.
      "model_bits": used * 64,
  }
  if coded_bits is not None:
    out.update(coded_bits=int(coded_bits), coded_bpp=coded_bits / num_pixels,
               coded_bits_per_token=coded_bits / max(n, 1))
  return out


def dataset_rate(ids, codebook_size: int, num_pixels: int, verify: bool = True) -> dict:
  """`rate_figures` of a whole 1-D id stream, with the real coded size; `verify` decodes the
  stream back and raises if it is not the input (a lossless round trip)."""
  ids = np.asarray(ids).reshape(-1)
  counts = token_counts(ids, codebook_size)
  words = entropy_code(ids, counts)
  if verify and not np.array_equal(entropy_decode(words, counts, len(ids)), ids):
    raise RuntimeError("entropy coding round trip failed (constriction)")
  return rate_figures(counts, codebook_size, num_pixels, coded_bits=32 * len(words))


def format_rate(fig: dict) -> str:
  """One line of the figures."""
  line = (f"codebook {fig['codes_used']}/{fig['codebook_size']} used "
          f"({fig['utilisation_pct']:.2f}%), entropy {fig['entropy_bits_per_token']:.3f} "
          f"bits/token, raw {fig['raw_bpp']:.5f} bpp, order-0 {fig['entropy_bpp']:.5f} bpp")
  if "coded_bpp" in fig:
    line += f", ANS-coded {fig['coded_bpp']:.5f} bpp"
  return line
