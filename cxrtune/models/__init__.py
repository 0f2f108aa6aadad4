"""Backbones and checkpoints."""
