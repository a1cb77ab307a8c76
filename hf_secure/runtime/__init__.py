"""The party runtime shared by the multi-party protocols: roles, launch, messages, accounting."""

from .channel import Channel
from .launch import CONTEXT, PartyGroup, Role, join, run_parties

__all__ = ["CONTEXT", "Channel", "PartyGroup", "Role", "join", "run_parties"]
