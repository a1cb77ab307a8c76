"""What differs between the transformers releases this package supports, kept in one place.

transformers 5.24 renamed the KV cache argument of ``forward``/``generate`` and the field of model
outputs from ``past_key_values`` to ``cache`` (the old name is still accepted there, with a
deprecation warning; both at once is an error). Earlier 5.x releases know only
``past_key_values``. Our client models accept either name and answer with the one the installed
release uses; the server passes the installed release's name to the plain model.
"""

from __future__ import annotations

from transformers.modeling_outputs import CausalLMOutputWithPast

from .errors import UnknownOptionError

# The installed release's name of the KV cache, in forward/generate arguments and in outputs.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def one_cache(cache, past_key_values):
    """The KV cache a caller passed under either name; both at once is refused (as transformers does)."""
    if cache is not None and past_key_values is not None:
        raise UnknownOptionError(
            "pass the KV cache once: as `cache` or as `past_key_values`, not both"
            + ("" if CACHE_NAME == "cache" else
               f" (this transformers' generate() knows only `{CACHE_NAME}`: pass the cache to generate() under that name)"))
    return cache if cache is not None else past_key_values
