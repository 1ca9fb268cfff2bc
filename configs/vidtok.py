r"""VidTok configs: every released variant, both training stages, and a CPU-sized `tiny` variant.

  python train.py --config=configs/vidtok.py:kl_causal_488_4chn,stage=1 --workdir=runs/x \
      --config.data.dir=/path/to/videos

The argument after ':' is `VARIANT[,stage=1|2][,tiny]`. The configs themselves live in the package
(`vidtok_jax/train/configs.py`), so an installed package has them too: the console scripts
(`vidtok-train`, `vidtok-eval`, `vidtok-reconstruct`) accept `--config=configs/vidtok.py:...`
outside a checkout. This file is the path a checkout's commands name.
"""

from vidtok_jax.train.configs import (  # noqa: F401
  get_config,
  loop_config,
  loss_config,
  parse_arg,
  train_config,
)
