r"""Reconstruct a video with a VidTok model (the official `inference_reconstruct.py`).

  python reconstruct.py --config=configs/vidtok.py:kl_causal_488_4chn \
      --torch_checkpoint=vidtok_kl_causal_488_4chn.ckpt --input=clip.mp4 --output_dir=out
  python reconstruct.py --config=configs/vidtok.py:fsq_causal_488_4096 --checkpoint=params/ \
      --input=clip.mp4 --output_dir=out --save_tokens          # also out/clip_tokens.npz
  python reconstruct.py --config=configs/vidtok.py:fsq_causal_488_4096 --checkpoint=params/ \
      --tokens=out/clip_tokens.npz --output_dir=out            # -> out/clip_decoded.mp4

Weights: `--workdir` (a train workdir: its latest good checkpoint; `--use_ema`), `--checkpoint`
(a checkpoints folder, a step folder or a `convert to-flax` folder), `--torch_checkpoint` (an
official .ckpt / .safetensors) or `--pretrained=NAME` (the released weights of variant NAME from
the Hugging Face hub, cached after the first call). Frames are sampled at `--sample_fps`, resized
(short side) and centre-cropped to `--size` (square, as eval.py's) or `--height`x`--width` (a
warning when the crop or padding loses most of a frame), split into windows of `--num_frames`
(17 causal, 16 non-causal; the incomplete tail is dropped) and reconstructed with the official
forward (KL models sample the latent, seeded by `--seed`). `--long` instead streams the WHOLE video chunk by
chunk (`--chunk_size` frames, `--use_overlap`; `--tile H,W` for large frames), with a progress
bar, in memory that does not grow with its length; every frame comes back, and its tokens file
decodes the same way. Writes `<stem>_recon.mp4`,
`<stem>_side_by_side.mp4` (input | reconstruction, with `--concat_input`), `<stem>_psnr.png`,
`<stem>_psnr.json` and, with `--save_tokens`, `<stem>_tokens.npz` (FSQ indices or KL posterior
means). Existing outputs are refused before any work unless `--force`; each file is written
under a temporary name and renamed when complete. See `vidtok_jax/inference/reconstruct.py` for the
library functions.
"""

import logging

from absl import app, flags

from vidtok_jax.cli import flags as cli_flags
from vidtok_jax.cli import check_positive

FLAGS = flags.FLAGS
cli_flags.define_model_flags()
flags.DEFINE_string("input", None, "Video to reconstruct.")
flags.DEFINE_string("tokens", None, "A tokens .npz (from --save_tokens) to decode instead.")
flags.DEFINE_string("output_dir", None, "Folder for the outputs.")
flags.DEFINE_integer("size", 256, "Frame height and width (short side resized to it, centre "
                     "crop), as eval.py --size.")
flags.DEFINE_integer("height", None, "Frame height (short side resized to it, centre crop); "
                     "default --size.")
flags.DEFINE_integer("width", None, "Frame width (centre crop); default --size.")
flags.DEFINE_float("sample_fps", 30.0, "Frame rate frames are sampled at (interval "
                   "round(fps / sample_fps)); the outputs are written at this rate.")
flags.DEFINE_integer("num_frames", None, "Window length (default: 17 causal, 16 non-causal).")
flags.DEFINE_bool("concat_input", True, "Also write input | reconstruction side by side.")
flags.DEFINE_bool("save_tokens", False, "Save the FSQ indices / KL posterior means (.npz).")
flags.DEFINE_integer("seed", 42, "Seed of the KL posterior samples (one key per window).")
flags.DEFINE_integer("batch_size", 1, "Windows per model call.")
flags.DEFINE_bool("long", False, "Reconstruct the whole video (every sampled frame), streamed "
                  "chunk by chunk in bounded memory (official --read_long_video).")
flags.DEFINE_integer("chunk_size", 16, "--long: frames per encoder chunk (a multiple of the time "
                     "factor; decoder chunks are chunk_size / f latents).")
flags.DEFINE_bool("use_overlap", True, "--long: decode each chunk with one look-ahead latent "
                  "(official).")
flags.DEFINE_list("tile", None, "--long: spatial tile HEIGHT,WIDTH in pixels for frames too large "
                  "for memory (e.g. 256,256); tiles are blended over --tile_overlap pixels.")
flags.DEFINE_integer("tile_overlap", 64, "--long: pixels shared by neighbouring tiles.")
flags.DEFINE_bool("force", False, "Replace existing output files.")
flags.mark_flags_as_required(["output_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  weights = cli_flags.weights_source(*cli_flags.one_of(cli_flags.WEIGHT_FLAGS))
  _, source = cli_flags.one_of(("input", "tokens"))
  height = FLAGS.size if FLAGS.height is None else FLAGS.height
  width = FLAGS.size if FLAGS.width is None else FLAGS.width
  check_positive(size=FLAGS.size, height=height, width=width, sample_fps=FLAGS.sample_fps,
                 num_frames=FLAGS.num_frames, batch_size=FLAGS.batch_size,
                 chunk_size=FLAGS.chunk_size)
  long = None
  if FLAGS.long:
    try:
      tile = [int(v) for v in FLAGS.tile] if FLAGS.tile else None
    except ValueError:
      raise app.UsageError(f"--tile must be HEIGHT,WIDTH integers, got {FLAGS.tile}") from None
    long = dict(t_chunk_enc=FLAGS.chunk_size, use_overlap=FLAGS.use_overlap, tile=tile,
                tile_overlap=FLAGS.tile_overlap)
  import vidtok_jax
  from vidtok_jax.inference import reconstruct
  from vidtok_jax.files import refuse_existing
  from vidtok_jax.weights.load import load_params

  logging.getLogger("vidtok_jax").setLevel(logging.INFO)
  config = FLAGS.config
  variant = config.get("variant", config.model.get("name"))
  model = vidtok_jax.VidTok(config.model)
  # Cheap checks first: a bad size, video, tokens file or existing output fails before the
  # weights load (errors are printed alone, one line: vidtok_jax.cli.run).
  if FLAGS.input:
    num_frames = FLAGS.num_frames or reconstruct.default_num_frames(model.config)
    reconstruct.check_window(model.config, num_frames, height, width)
    outputs = reconstruct.output_paths(source, FLAGS.output_dir, concat_input=FLAGS.concat_input,
                                       save=FLAGS.save_tokens)
  else:
    reconstruct.load_tokens(FLAGS.tokens, variant=variant, model_config=model.config)
    outputs = reconstruct.output_paths(source, FLAGS.output_dir, tokens=True)
  refuse_existing(outputs, FLAGS.force)
  params = load_params(weights, config, use_ema=FLAGS.use_ema)
  if FLAGS.input:
    result = reconstruct.run_video(
        model, params, source, FLAGS.output_dir, variant=variant,
        size=(height, width), sample_fps=FLAGS.sample_fps, num_frames=num_frames,
        concat_input=FLAGS.concat_input, save=FLAGS.save_tokens, seed=FLAGS.seed,
        batch_size=FLAGS.batch_size, long=long, force=FLAGS.force)
    what = (f"{result['num_output_frames']} frames streamed" if long is not None else
            f"{result['num_windows']} window(s) x {result['num_frames']} frames")
    print(f"{result['input']}: {what} at {result['size'][0]}x{result['size'][1]} "
          f"({result['dropped_frames']} tail frame(s) dropped), mean PSNR "
          f"{result['mean']:.2f} dB; wrote " + ", ".join(result["written"]))
  else:
    result = reconstruct.run_tokens(model, params, source, FLAGS.output_dir, variant=variant,
                                    batch_size=FLAGS.batch_size, force=FLAGS.force)
    print(f"{result['tokens']}: decoded {result['num_windows']} window(s) into "
          f"{result['num_output_frames']} frames at {result['size'][0]}x{result['size'][1]}; "
          f"wrote {result['written'][0]}")


def run():
  """The console entry point (`vidtok-reconstruct`)."""
  from vidtok_jax.cli import run as run_command

  run_command(__name__, main)


if __name__ == "__main__":
  run()
