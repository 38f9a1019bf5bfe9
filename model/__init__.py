"""Flax graph attention network, differentiable clustering and circle fit, losses, training, inference."""
