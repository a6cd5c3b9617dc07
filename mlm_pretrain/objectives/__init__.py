"""Pretraining objectives: what a batch of text is turned into and what the model learns from it."""
