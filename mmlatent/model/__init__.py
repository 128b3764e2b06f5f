"""Model components: vision tower, projector, language model, backbones, latent modules and presets.

Nothing here imports Lightning or the data pipeline (DESIGN §6): the training and CLI layers sit on top.
"""
