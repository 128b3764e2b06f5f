"""Evaluation on MMMU and ScienceQA that reproduces the official scorers.

`sources` finds and reads the Hugging Face parquet files (a Hub id or a local copy in either layout),
`mmmu` and `scienceqa` turn rows into `Question`s with their prompts (built by `mmlatent.benchmarks`, which
the training-data converters share, so training and evaluation prompts match), `protocols` names the
official scorer whose rules judge an answer (`parsing`: MMMU's and lmms-eval's MMMU parser; `scienceqa_parsing`:
LLaVA's, the ScienceQA authors' and lmms-eval's letters), `metrics` the breakdowns, `runner` batched
generation, scoring and the output files, `chart` the PNG, `command` the `mmlatent eval` command, `callback`
the optional evaluation during training, and `lmms_model` the lmms-eval model `latent_vlm` (`lmms` extra).
"""
