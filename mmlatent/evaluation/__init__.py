"""Evaluation on MMMU and ScienceQA that reproduces the official scorers.

`sources` finds and reads the Hugging Face parquet files (a Hub id or a local copy in either layout),
`mmmu` and `scienceqa` turn rows into `Question`s with their prompts (built by `mmlatent.benchmarks`, which
the training-data converters share, so training and evaluation prompts match), `parsing` is the official MMMU
answer parsing (also used for ScienceQA letters), `metrics` the breakdowns, `runner` batched generation,
scoring and the output files, `chart` the PNG, `command` the `mmlatent eval` command and `callback` the
optional evaluation during training.
"""
