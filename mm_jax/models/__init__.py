"""Flax NNX networks. Channels-last everywhere: video tensors are ``(B, F, H, W, C)``."""
