"""Run a two-party program end to end on this machine: client, two servers, dealer.

``secure_eval(program, inputs)`` starts the parties (:func:`hf_secure.runtime.run_parties`), and:

1. setup: the dealer sends each server its seed; the client tells the dealer the input shapes
   (public) and sends each server its share of every input;
2. offline: the dealer replays ``program`` on shapes only and sends server 1 its corrections;
3. online: both servers run ``program`` on their shares and send the client their output shares;
4. the client reconstructs and decodes the outputs.

``program(mpc, *inputs) -> list[Shared]`` must be a module-level function (it is sent to the
party processes by reference) and data-oblivious (same operations whatever the values).
"""

from __future__ import annotations

import os
import time

import torch

from ...runtime import Channel, Role, run_parties
from .core import DEALER, MPC, SERVER0, SERVER1
from .ring import DEFAULT_FRAC_BITS, decode, encode, share

_SERVERS = (SERVER0, SERVER1)


def _party(role: Role, channel: Channel, program, inputs, n_inputs: int, frac_bits: int) -> dict:
    client = int(Role.CLIENT)
    if role == Role.CLIENT:
        encoded = [encode(x, frac_bits) for x in inputs]
        channel.send(torch.tensor([len(encoded)]), DEALER)
        for x in encoded:
            channel.send(torch.tensor(x.shape, dtype=torch.int64), DEALER)
            x0, x1 = share(x)
            channel.send(x0, SERVER0)
            channel.send(x1, SERVER1)
        start = time.perf_counter()
        count = int(channel.recv(SERVER0, shape=(1,)).item())
        outputs = [decode(channel.recv(SERVER0) + channel.recv(SERVER1), frac_bits) for _ in range(count)]
        return {"outputs": outputs, "stats": channel.summary(), "seconds": time.perf_counter() - start}

    if role == Role.DEALER:
        seeds = tuple(int.from_bytes(os.urandom(7), "little") for _ in _SERVERS)
        for server, seed in zip(_SERVERS, seeds):
            channel.send(torch.tensor([seed]), server)
        mpc = MPC(DEALER, channel, seeds, frac_bits)
        count = int(channel.recv(client, shape=(1,)).item())
        shapes = [tuple(channel.recv(client).tolist()) for _ in range(count)]
        start = time.perf_counter()
        with channel.scope("offline"):
            program(mpc, *[mpc.placeholder(s) for s in shapes])
            nbytes = mpc.send_offline()
        return {"offline_bytes": nbytes, "offline_seconds": time.perf_counter() - start, "stats": channel.summary()}

    seed = int(channel.recv(DEALER, shape=(1,)).item())
    mpc = MPC(int(role), channel, seed, frac_bits)
    shares = [mpc.shared(channel.recv(client, dtype=torch.int64)) for _ in range(n_inputs)]
    if role == SERVER1:
        mpc.receive_offline()
    start = time.perf_counter()
    with channel.scope("online"):
        outputs = program(mpc, *shares)
    online = time.perf_counter() - start
    if role == SERVER0:
        channel.send(torch.tensor([len(outputs)]), client)
    for out in outputs:
        channel.send(out.share, client)
    return {"online_seconds": online, "stats": channel.summary()}


def secure_eval(program, inputs: list[torch.Tensor], frac_bits: int = DEFAULT_FRAC_BITS,
                timeout_s: float = 60.0) -> tuple[list[torch.Tensor], dict]:
    """Evaluate ``program`` on secret-shared ``inputs``; return (decoded outputs, per-role reports)."""
    # The inputs reach only the client process; the others learn how many there are.
    args = {role: (program, inputs if role == Role.CLIENT else None, len(inputs), frac_bits)
            for role in (Role.SERVER0, Role.SERVER1, Role.DEALER, Role.CLIENT)}
    results = run_parties(_party, args, timeout_s=timeout_s)
    return results[Role.CLIENT]["outputs"], {r.name: v for r, v in results.items()}
