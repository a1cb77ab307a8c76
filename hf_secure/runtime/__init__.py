"""The party runtime shared by the multi-party protocols: roles, launch, messages, accounting."""

from .channel import Channel
from .launch import Role, run_parties

__all__ = ["Channel", "Role", "run_parties"]
