"""Errors raised by hf_secure.

Every error derives from :class:`HfSecureError`, which deliberately does *not* derive from
``ValueError``/``OSError``/``RuntimeError``. transformers' pipeline loader swallows those and
retries with the classes named in ``config.architectures``; for a converted checkpoint that would
load the permuted weights as a plain model and return garbage instead of failing. Our errors
propagate instead: fail closed.
"""


class HfSecureError(Exception):
    """Base class of every error hf_secure raises on purpose."""


class MissingKeyError(HfSecureError):
    """No key was given and none with the model's fingerprint is in the local key store."""


class KeyMismatchError(HfSecureError):
    """The key belongs to another model (fingerprint differs from the checkpoint's)."""


class CorruptKeyError(HfSecureError):
    """The key file cannot be read or its content does not match its own fingerprint."""


class KeyReuseError(HfSecureError):
    """A one-time key (an FSS key of one query) is presented a second time."""


class TamperedCheckpointError(HfSecureError):
    """The checkpoint's weight files do not match the digests recorded at conversion."""


class ModelNotFoundError(HfSecureError):
    """A model name that is neither a local folder nor a Hub repository that can be reached; the
    message says which (no such folder, no such repo or revision, gated, Hub unreachable)."""


class UnsupportedModelError(HfSecureError):
    """The architecture (or a feature of it) is not supported by the requested protocol."""


class UnknownOptionError(HfSecureError):
    """An option name or value that hf_secure does not know."""


class InvalidInputError(HfSecureError):
    """The caller's input cannot be computed on: token ids out of range, a mask or position tensor of
    the wrong shape or dtype, a value outside what the protocol was built for."""


class OutOfRangeError(InvalidInputError):
    """A value of the query left the input range a fixed-point approximation was built for: the
    servers refused the query rather than return garbage (see ``protocols/mpc/ranges.py``)."""


class NotConvertedError(HfSecureError):
    """A plain checkpoint was given where a converted one is needed; the message names the command."""


class ServerError(HfSecureError):
    """The computing server rejected a request, lost a session, or cannot be reached."""


class KeyMaterialUploadError(HfSecureError):
    """An upload to the Hub would have included key material."""


class InvalidRequestError(HfSecureError):
    """A request to the server is malformed (wrong tensors, shapes, dtypes or session state)."""


class UnknownSessionError(InvalidRequestError):
    """The request names a session the server does not hold (expired, evicted, or server restarted)."""


class QuotaExceededError(InvalidRequestError):
    """The caller holds as many sessions, or as many bytes of KV cache, as its quota allows."""


class TooManyRequestsError(InvalidRequestError):
    """More requests in flight than the server, or the caller's share of it, allows: retry later."""


class UnauthorizedError(InvalidRequestError):
    """The request carries no bearer token, or one the server does not know."""


class PartyFailedError(HfSecureError):
    """A party of a multi-party protocol died, timed out, or sent a message that does not fit."""


class ProgramError(HfSecureError):
    """A two-party program asked a protocol primitive for something it cannot do (a truncation
    width outside 1..62, a modulus that is not a power of two, operands whose shapes do not
    multiply): a bug in the program, not in the caller's input."""


class ProgramMismatchError(ProgramError, PartyFailedError):
    """The offline replay of a program and its online run differ (a value prepared or dealt for one
    step was taken by another, or was left over): the program is not data-oblivious. A bug; the
    session fails as when a party fails."""
