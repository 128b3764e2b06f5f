"""Evaluation on MMMU and ScienceQA that reproduces the official scorers.

`sources` finds and reads the Hugging Face parquet files (a Hub id or a local copy in either layout),
`mmmu` and `scienceqa` turn rows into `Question`s with their prompts (built by `mmlatent.benchmark_prompts`,
which the training-data converters share, so training and evaluation prompts match), each task judges
answers by a protocol of `mmlatent.scoring`, `metrics` the breakdowns, `runner` batched generation, scoring
and the output files, `chart` the PNG, `command` the `mmlatent eval` command, `callback` the optional
evaluation during training, and `lmms_model` the lmms-eval model `latent_vlm` (`lmms` extra).
"""
