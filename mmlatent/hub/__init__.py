"""Publishing on the Hugging Face Hub: the model card and `mmlatent export`.

- `model_card.py`: the `README.md` of an exported model (YAML metadata, `model-index` results, body).
- `export.py`: `export_checkpoint` and the `mmlatent export` command (Lightning checkpoint -> Hub-ready
  folder, optionally pushed).
- `remote_code/`: the configuration and modeling files copied into every exported folder, so that
  transformers' Auto classes load it with `trust_remote_code=True`.

Saving, loading and uploading a `LatentVLM` itself is `mmlatent.model.pretrained`, which knows nothing of
Lightning; `export.py` sits on top of the training module. Nothing is imported here, so importing
`mmlatent.hub` stays cheap.
"""
