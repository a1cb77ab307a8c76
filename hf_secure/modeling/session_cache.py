"""A transformers ``Cache`` whose keys and values live on the server.

``generate()`` threads the cache (``cache`` since transformers 5.24, ``past_key_values`` before)
from one forward to the next; for a secure model that
object is a handle: the session id on the server and the number of tokens cached there. The
client never holds the (permuted) keys and values, so it has nothing to reorder for beam search.
"""

from __future__ import annotations

import weakref

from transformers.cache_utils import Cache

from ..errors import ServerError, UnknownOptionError


def _close_quietly(backend, session_id: str) -> None:
    try:
        backend.close_session(session_id)
    except ServerError:
        pass  # the server is gone or already dropped the session: nothing left to free


class RemoteSessionCache(Cache):
    """Handle on a server-side KV cache (session id + cached length)."""

    def __init__(self, backend, session_id: str):
        super().__init__(layers=[])
        self.backend = backend
        self.session_id = session_id
        self.length = 0
        self._finalizer = weakref.finalize(self, _close_quietly, backend, session_id)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    # transformers reads these from ``self.layers``, which a handle does not hold; for an empty list
    # ``all(cache.is_linear)`` is True and generate() would stop slicing the prompt to the uncached
    # tokens. The server keeps full attention keys and values, which it can crop.
    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return True

    def crop(self, max_length: int) -> None:
        """Forget tokens past ``max_length``; the server crops its cache on the next forward."""
        if max_length < 0:
            max_length = self.length + max_length
        self.length = min(self.length, max_length)

    def reorder_cache(self, beam_idx) -> None:
        raise UnknownOptionError("beam search is not supported with a server-side KV cache; use greedy or sampling")

    def close(self) -> None:
        """Free the session on the server now (it is also freed when this object is collected)."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"RemoteSessionCache(session={self.session_id[:8]}..., length={self.length})"
