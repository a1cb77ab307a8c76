"""Offline converters: a transformers checkpoint in, a protocol-ready checkpoint and key out."""

from .approximate import convert_approximate
from .permute import convert_permute

__all__ = ["convert_approximate", "convert_permute"]
