"""Publishing on the Hugging Face Hub: uploads, the model card and `mmlatent export`.

- `publish.py`: push an export folder, or a model with its card, to a Hub repo (tokens, clear errors).
- `model_card.py`: the `README.md` of an exported model (YAML metadata, `model-index` results, body).
- `export.py`: `export_checkpoint` and the `mmlatent export` command (Lightning checkpoint -> Hub-ready
  folder, optionally pushed).

The folder format itself (saving and loading a `LatentVLM`, fetching a Hub id, the transformers
remote-code files) is `mmlatent.model.serialization`, which knows nothing of this package: the
dependency points hub -> model. `export.py` sits on top of the training module. Nothing is imported
here, so importing `mmlatent.hub` stays cheap.
"""
