"""The protocols, by name: the registry the drop-in models bind through.

``config.hf_secure["protocol"]`` of a converted checkpoint names its engine here; each engine is a
:class:`~hf_secure.protocols.engine.SecureEngine`. A new protocol is a package under
``hf_secure/protocols/`` and one line in :data:`PROTOCOLS` (as CrypTen names its tuple providers
and peft registers its methods).
"""

from __future__ import annotations

from .errors import UnknownOptionError
from .protocols.engine import SecureEngine
from .protocols.fss.client import FSSEngine
from .protocols.he.client import HEEngine
from .protocols.mpc.client import MPCEngine
from .protocols.permute.engine import PermuteEngine

PROTOCOLS: dict[str, type[SecureEngine]] = {
    "permute": PermuteEngine,  # STIP, ePrint 2023/1763
    "mpc": MPCEngine,  # SecFormer, arXiv 2401.00793
    "fss": FSSEngine,  # Sigma, PoPETs 2024
    "he": HEEngine,  # NEXUS, NDSS 2025
}


def protocol_engine(name: str) -> type[SecureEngine]:
    """The engine class of protocol ``name``; UnknownOptionError for a name not registered."""
    if name not in PROTOCOLS:
        raise UnknownOptionError(f"unknown protocol {name!r}; available: {tuple(PROTOCOLS)}")
    return PROTOCOLS[name]
