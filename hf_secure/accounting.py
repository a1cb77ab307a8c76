"""What a secure run costs: messages (rounds), bytes each way, and time spent waiting on the server.

Every backend owns one :class:`Accounting`; protocols with several parties will keep one per party.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Accounting:
    rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    server_seconds: float = 0.0

    def record(self, sent: int, received: int, seconds: float) -> None:
        self.rounds += 1
        self.bytes_sent += sent
        self.bytes_received += received
        self.server_seconds += seconds

    def snapshot(self) -> dict:
        return asdict(self)

    def reset(self) -> None:
        self.rounds = self.bytes_sent = self.bytes_received = 0
        self.server_seconds = 0.0
