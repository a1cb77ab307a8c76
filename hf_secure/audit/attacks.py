"""The published attacks on what a server sees, implemented from their descriptions.

Vocabulary matching (Zheng et al., "An Attack to Break Permutation-Based Private Third-Party
Inference Schemes for LLMs", arXiv 2505.18332, section 3): the attacker knows the open weights.
For position ``i`` and a recovered prefix, it runs every vocabulary candidate through the public
model up to the observed site and keeps the candidate whose value at ``i`` is closest to what the
server saw. Distances (:func:`canonical`): L1 in the clear basis; L1 between sorted vectors for a
view permuted along its width (sorting removes any permutation); for Q/K/V with permuted heads and
head dimensions, each head sorted and the heads put in order of their sums.

A position's value depends only on the tokens up to it in a causal model, and, in a bidirectional
one (BERT), before the first attention (embedding output, block 0's Q/K/V). There the search is
sequential and exact. Deeper in a bidirectional model every position depends on every other, so
the search is joint (:meth:`VocabularyMatcher.joint`): a shortlist of candidates per position,
guesses for all positions, then each position re-matched given the others, for a few sweeps.

Key recovery from weights (:func:`recover_permutations`, the attack STIP's own analysis names):
each slice of a permuted weight along a permuted axis is a public slice with its other axes
permuted, so its sorted values identify it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .probe import Probe, Site


def canonical(values: torch.Tensor, kind: str, permuted: bool, head_dim: int) -> torch.Tensor:
    """A permutation-invariant form of ``values [..., width]`` when ``permuted`` (else unchanged).

    Q/K/V (``kind`` "q", "k", "v"): each ``head_dim`` group sorted, then the heads ordered by their
    sums; anything else: the whole width sorted.
    """
    if not permuted:
        return values
    if kind in ("q", "k", "v"):
        heads = values.unflatten(-1, (-1, head_dim)).sort(dim=-1).values
        order = heads.sum(-1).argsort(dim=-1)
        return torch.take_along_dim(heads, order[..., None], dim=-2).flatten(-2)
    return values.sort(dim=-1).values


def position_wise(site: Site, causal: bool) -> bool:
    """Whether the value at position ``i`` depends only on tokens ``<= i`` (sequential search is exact)."""
    return causal or (site.layer == 0 and site.kind != "ffn")


@dataclass
class Search:
    """One view to attack: ``observed [seq, width]`` as read at ``site``; ``permuted``: compare in
    :func:`canonical` form; ``shortlist`` > 0: also keep that many closest candidates per position."""

    site: Site
    observed: torch.Tensor
    permuted: bool
    shortlist: int = 0
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    ranked: list = field(default_factory=list)

    def target(self, head_dim: int) -> torch.Tensor:
        return canonical(self.observed.float(), self.site.kind, self.permuted, head_dim)


class VocabularyMatcher:
    """Vocabulary matching with the public model (arXiv 2505.18332).

    Args:
        model: the public (open-weight) transformers model, eval mode, float32.
        family: its family name.
        causal: whether the model attends causally.
        chunk_tokens: tokens per batched forward (memory bound).
    """

    def __init__(self, model, family: str, causal: bool, chunk_tokens: int = 1 << 15):
        self.model = model
        self.family = family
        self.causal = causal
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        self.chunk_tokens = chunk_tokens

    def _values(self, sites: list[Site], input_ids: torch.Tensor, position: int | None,
                position_ids: torch.Tensor | None = None) -> dict[Site, torch.Tensor]:
        """The values of ``sites`` for each row of ``input_ids`` (at ``position``; None: every
        position), with ``position_ids [1, seq]`` when given."""
        out = {site: [] for site in sites}
        rows = max(1, self.chunk_tokens // input_ids.shape[1])
        probe = Probe(self.model, self.family, sites)
        extra = {} if position_ids is None else {"position_ids": position_ids}
        for chunk in input_ids.split(rows):
            inputs = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), **extra}
            for site, value in probe.run(**inputs).items():
                out[site].append(value[:, position] if position is not None else value)
        return {site: torch.cat(values) for site, values in out.items()}

    def sequential(self, searches: list[Search], bar=None) -> None:
        """Recover the tokens behind each search's view position by position (exact where
        :func:`position_wise`): at position ``i`` every vocabulary token follows the search's own
        recovered prefix; searches that share a prefix share one batched forward. In a bidirectional
        model a position-wise value depends on its own token and position only, so each candidate
        runs alone at position ``i``. Fills each search's ``tokens [seq]`` and, with ``shortlist``,
        ``ranked`` (the closest candidates)."""
        targets = [s.target(self.head_dim) for s in searches]
        vocab = torch.arange(self.vocab_size)[:, None]
        for i in range(searches[0].observed.shape[0] if searches else 0):
            groups: dict[tuple, list[int]] = {}
            for n, search in enumerate(searches):
                groups.setdefault(tuple(search.tokens.tolist()) if self.causal else (), []).append(n)
            for prefix, members in groups.items():
                sites = sorted({searches[n].site for n in members})
                if self.causal:
                    ids = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(self.vocab_size, -1), vocab], dim=1)
                    values = self._values(sites, ids, i)
                else:
                    values = self._values(sites, vocab, 0, position_ids=torch.tensor([[i]]))
                for n in members:
                    search = searches[n]
                    candidates = canonical(values[search.site], search.site.kind, search.permuted, self.head_dim)
                    distance = (candidates - targets[n][i]).abs().sum(-1)
                    search.tokens = torch.cat([search.tokens, distance.argmin()[None]])
                    if search.shortlist:
                        search.ranked.append(distance.topk(min(search.shortlist, self.vocab_size), largest=False).indices)
                    if bar is not None:
                        bar.update()

    def joint(self, search: Search, shortlist: torch.Tensor, sweeps: int = 2, bar=None) -> torch.Tensor:
        """Bidirectional models, deep sites: start from each position's first shortlisted token, then
        re-match every position among its shortlist ``[seq, K]`` given the others, comparing the
        whole sequence's values; up to ``sweeps`` sweeps (fewer when a sweep changes nothing)."""
        target = search.target(self.head_dim)
        guesses = shortlist[:, 0].clone()
        for _ in range(sweeps):
            changed = False
            for i in range(target.shape[0]):
                batch = guesses.repeat(shortlist.shape[1], 1)
                batch[:, i] = shortlist[i]
                values = self._values([search.site], batch, None)[search.site]
                values = canonical(values, search.site.kind, search.permuted, self.head_dim)
                best = shortlist[i, (values - target).abs().sum((-1, -2)).argmin()]
                changed |= bool(best != guesses[i])
                guesses[i] = best
                if bar is not None:
                    bar.update()
            if not changed:
                break
        return guesses


def _signatures(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """Slices of ``tensor`` along ``axis`` with their other axes' values sorted: ``[n, rest]``."""
    flat = tensor.float().movedim(axis, 0).reshape(tensor.shape[axis], -1)
    return flat.sort(dim=1).values


def _match(server: torch.Tensor, public: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each server signature row, the public row it equals (else the nearest in L1): returns
    (index ``[n]``, whether the match was exact and unique ``[n]`` bool)."""
    seen: dict[bytes, list[int]] = {}
    for j, row in enumerate(public):
        seen.setdefault(row.numpy().tobytes(), []).append(j)
    index = torch.empty(server.shape[0], dtype=torch.long)
    exact = torch.zeros(server.shape[0], dtype=torch.bool)
    missing = []
    for j, row in enumerate(server):
        hits = seen.get(row.numpy().tobytes())
        if hits:
            index[j], exact[j] = hits[0], len(hits) == 1
        else:
            missing.append(j)
    for chunk in torch.tensor(missing, dtype=torch.long).split(256):
        index[chunk] = torch.cdist(server[chunk], public, p=1).argmin(dim=1)
    return index, exact


def recover_permutations(server_state: dict[str, torch.Tensor], public_state: dict[str, torch.Tensor],
                         rules: list) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Recover each permutation the family's ``rules`` apply (:mod:`hf_secure.families`) by matching
    sorted weight slices of the server's checkpoint against the public one's.

    Returns {name: (index, exact)}: "hidden" and "vocab" (when the server holds a permuted table),
    and per layer ``"{n}.{name}"`` for the internal ones ("ffn", "q", "k", "v", "qkv"). ``index[j]``
    is the public slice that server slice ``j`` is, i.e. the permutation itself (``x' = x[..., index]``).
    For each name the 2-D weight with the longest slices is used.
    """
    best: dict[str, tuple[int, str, int]] = {}
    for pattern, axes in rules:
        compiled = re.compile(r"(^|\.)" + pattern.replace("{n}", r"(?P<n>\d+)") + "$")
        for name, tensor in server_state.items():
            match = compiled.search(name)
            public = public_state.get(name)
            if match is None or tensor.dim() != 2 or public is None or public.shape != tensor.shape:
                continue
            layer = match.groupdict().get("n")
            for axis, perm in axes.items():
                key = perm if layer is None or perm in ("hidden", "vocab") else f"{layer}.{perm}"
                length = tensor.shape[1 - axis]
                if key not in best or length > best[key][0]:
                    best[key] = (length, name, axis)
    recovered = {}
    for key, (_, name, axis) in best.items():
        recovered[key] = _match(_signatures(server_state[name], axis), _signatures(public_state[name], axis))
    return recovered

