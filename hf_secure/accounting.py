"""What a secure run costs: bytes each way, messages, rounds and seconds.

One :class:`Traffic` per party and scope (a layer, "setup", "online"...) in the multi-party
runtime, one per connection for the client/server protocols. A round is one wait for a peer's
answer: a request/response or an exchange.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Traffic:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    rounds: int = 0
    seconds: float = 0.0

    def record(self, sent: int, received: int, seconds: float) -> None:
        """One request and its answer (one round)."""
        self.bytes_sent += sent
        self.bytes_received += received
        self.messages += 1
        self.rounds += 1
        self.seconds += seconds

    def snapshot(self) -> dict:
        return asdict(self)

    def reset(self) -> None:
        self.__init__()
