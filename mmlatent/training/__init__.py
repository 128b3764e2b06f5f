"""Training: stages, the Lightning module and data module, optimisation. Sits on top of model/ and data/."""
