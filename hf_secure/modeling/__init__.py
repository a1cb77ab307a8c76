"""Drop-in client models for converted checkpoints."""

from .secure import SecureModel, SecureModelForCausalLM, SecurePreTrainedModel
from .session_cache import RemoteSessionCache

__all__ = ["RemoteSessionCache", "SecureModel", "SecureModelForCausalLM", "SecurePreTrainedModel"]
