"""Evaluation: PSNR / SSIM / LPIPS / FVD (and, for FSQ models, the token rate) of a tokenizer over
a folder of videos, streamed window by window (`Evaluator`); the metrics live in
`vidtok_jax.metrics`."""

from vidtok_jax.evaluation.evaluator import Evaluator, default_batch_size, format_table, windows

__all__ = ["Evaluator", "default_batch_size", "format_table", "windows"]
