"""The party runtime shared by the multi-party protocols: roles, launch, messages, accounting."""

from .channel import Channel
from .launch import PIPE, PartyGroup, Role, join, run_parties

__all__ = ["PIPE", "Channel", "PartyGroup", "Role", "join", "run_parties"]
