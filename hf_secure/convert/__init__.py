"""Offline converters: a transformers checkpoint in, a protocol-ready checkpoint and key out."""

from .permute import convert_permute

__all__ = ["convert_permute"]
