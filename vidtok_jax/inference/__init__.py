"""Inference on videos of any length and size: the tiled, causal `Streamer` (`streaming`) and the
video -> reconstruction / tokens -> video paths the `vidtok-reconstruct` command runs
(`reconstruct`). Nothing here imports the training package."""
