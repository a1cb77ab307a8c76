"""``hf-secure audit``: run a checkpoint's protocol on sample text, record what each non-client party
sees, and attack those views with the published attacks (:mod:`.attacks`).

Threat assumed: the attacker is a server (or the dealer) and knows the original open weights, as
in arXiv 2505.18332. What each protocol's servers see:

permute
    the request (permuted embeddings, or vocabulary-permuted ids), the weights it holds, and every
    activation its model computes (:class:`.probe.Probe` on the server's own forward): the residual
    stream and attention input up to the hidden permutation, Q/K/V and FFN activations up to the
    internal permutations (in the clear without them).
mpc
    each server's input shares, every value it opens and its share of every layer's output
    (``record_views``, :meth:`hf_secure.protocols.mpc.core.MPC.see`); the dealer sees public fields
    and shapes only.
fss
    each server's input shares and every masked value ``x + r`` it opens
    (:meth:`hf_secure.protocols.fss.core.FSS.see`); the dealer sees public fields and shapes only
    (its keys are made before the input exists).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ..engines import protocol_engine
from ..errors import UnknownOptionError
from ..families import family
from ..hub import resolve_folder
from ..modeling import SecureModel, SecureModelForCausalLM
from ..progress import progress
from ..protocols.fss.core import signed
from ..protocols.mpc.ring import DEFAULT_FRAC_BITS
from ..protocols.permute.client import gather_last, inverse
from ..server.runtime import read_section
from .attacks import Search, VocabularyMatcher, position_wise, recover_permutations
from .probe import KINDS, Probe, Site, sites_of

AUDITED = ("permute", "mpc", "fss")  # protocols whose parties' views the audit knows how to record
DEFAULT_LAYERS = ("0", "1", "mid", "last")
DEFAULT_TEXTS = (
    "The patient was admitted with chest pain and shortness of breath.",
    "Please transfer the remaining balance to my savings account tomorrow.",
    "My password for the company laptop is written on a yellow note.",
)
SEQUENTIAL = "sequential, full vocabulary"


def resolve_layers(names, num_layers: int) -> list[int]:
    """Residual-stream layers from names: an integer, "mid" (``num_layers // 2``) or "last"
    (``num_layers``, the final hidden state). UnknownOptionError for anything else."""
    out = []
    for name in names:
        name = str(name).strip()
        if name == "mid":
            out.append(num_layers // 2)
        elif name == "last":
            out.append(num_layers)
        elif name.isascii() and name.isdigit() and int(name) <= num_layers:
            out.append(int(name))
        else:
            raise UnknownOptionError(f"layer {name!r}: give 0..{num_layers}, 'mid' or 'last'")
    return sorted(set(out))


@dataclass
class AuditReport:
    """What :func:`audit` measured: one row per (party, view, layer, attack) with token and
    whole-prompt recovery in percent, key recovery per permutation, and the output's error."""

    settings: dict
    rows: list[dict] = field(default_factory=list)
    keys: list[dict] = field(default_factory=list)
    quality: dict = field(default_factory=dict)

    def table(self) -> str:
        """The rows as an aligned text table."""
        head = ("protocol", "party", "view", "layer", "attack", "search", "tokens %", "prompts %", "chance %")
        lines = [[r["protocol"], r["party"], r["view"], str(r["layer"]), r["attack"], r["search"], f"{r['tokens_pct']:.1f}",
                  f"{r['prompts_pct']:.1f}", f"{r['chance_pct']:.3f}"] for r in self.rows]
        widths = [max(len(h), *(len(line[k]) for line in lines)) if lines else len(h) for k, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines]
        for party, (pct, view) in sorted(self.best_view().items()):
            out.append(f"{party}: its most revealing view ({view}) gives back {pct:.1f}% of the tokens")
        for k in self.keys:
            out.append(f"key recovery from weights: {k['permutation']}: {k['recovered_pct']:.1f}% ({k['measure']})")
        if self.quality:
            out.append("output vs plaintext: " + ", ".join(f"{k} {v:.4g}" for k, v in self.quality.items()))
        return "\n".join(out)

    def best_view(self) -> dict[str, tuple[float, str]]:
        """Per party, the highest token recovery of any of its views and that view: a party holds
        all its views at once, so this is a lower bound on what it learns."""
        best = {}
        for r in self.rows:
            if r["party"] not in best or r["tokens_pct"] > best[r["party"]][0]:
                best[r["party"]] = (r["tokens_pct"], f"{r['view']} {r['layer']}, {r['attack']}")
        return best

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            quality = {k: v if math.isfinite(v) else str(v) for k, v in self.quality.items()}  # strict JSON
            json.dump({"settings": self.settings, "rows": self.rows, "keys": self.keys, "quality": quality,
                       "best_view": self.best_view()}, f, indent=2)

    def plot(self, path: str, title: str | None = None) -> None:
        """A PNG of token recovery by layer, one line per (party, view, attack). Needs matplotlib
        (``pip install 'hf-secure[audit]'``)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import matplotlib.ticker
        except ImportError as exc:
            raise UnknownOptionError("the chart needs matplotlib: pip install 'hf-secure[audit]'") from exc
        lines = defaultdict(list)
        for r in self.rows:
            lines[(r["party"], r["view"], r["attack"])].append((r["layer"], r["tokens_pct"]))
        fig, ax = plt.subplots(figsize=(11, 4.5))
        for (party, view, attack), points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{party}: {view} ({attack})")
        chance = max((r["chance_pct"] for r in self.rows), default=0.0)
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("tokens recovered (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(title or f"hf-secure audit: {self.settings.get('protocol')} ({self.settings.get('variant')})")
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)


class _Tally:
    """Recovery counts per row key, summed over the texts."""

    def __init__(self):
        self.counts = defaultdict(lambda: [0, 0, 0, 0])  # tokens hit, tokens scored, prompts hit, prompts

    def add(self, key: tuple, recovered: torch.Tensor, truth: torch.Tensor, scored: torch.Tensor) -> None:
        hits = (recovered == truth)[scored]
        c = self.counts[key]
        c[0] += int(hits.sum())
        c[1] += int(scored.sum())
        c[2] += int(bool(hits.all()))
        c[3] += 1

    def rows(self, protocol: str, chance: float) -> list[dict]:
        out = []
        for (party, view, layer, attack, search), (hit, scored, prompts, texts) in sorted(self.counts.items()):
            out.append({"protocol": protocol, "party": party, "view": view, "layer": layer, "attack": attack,
                        "search": search, "tokens_pct": 100.0 * hit / max(scored, 1),
                        "prompts_pct": 100.0 * prompts / max(texts, 1), "chance_pct": chance,
                        "tokens": scored, "texts": texts})
        return out


def audit(folder: str, *, original: str | None = None, protocol: str | None = None, texts=None,
          layers=DEFAULT_LAYERS, views=KINDS, key=None, embedding_noise: float | None = None, shortlist: int = 64,
          sweeps: int = 2, max_length: int = 32, opened_per_layer: int = 2) -> AuditReport:
    """Measure what a converted checkpoint's parties could learn from the user's text.

    Args:
        folder: a converted checkpoint (folder or Hub id).
        original: the open checkpoint the attacker knows (required for permute, whose server holds
            permuted weights; mpc: default the checkpoint itself, whose weights are the model).
        protocol: the protocol to audit; None: the checkpoint's. Must be one of :data:`AUDITED`.
        texts: sample texts (default :data:`DEFAULT_TEXTS`), each truncated to ``max_length`` tokens.
        layers: residual-stream layers (:func:`resolve_layers`); block sites are read at each.
        views: the kinds of site to read (:data:`.probe.KINDS`; permute: all by default).
        key: permute: the client key file (None: the key store).
        embedding_noise: permute, client-held embeddings: the noise defence's standard deviation.
        shortlist: candidates per position in the joint search (bidirectional models, deep sites).
        sweeps: sweeps of the joint search.
        opened_per_layer: mpc, fss: how many of a block's opened values of hidden width are attacked,
            evenly spaced (2: the first and the last; all are uniformly masked).

    Returns an :class:`AuditReport`. Raises UnknownOptionError for a protocol not audited here or
    not the checkpoint's, or options of another protocol; the loading errors of
    :meth:`SecureModel.from_pretrained` (missing or wrong key, tampered checkpoint) pass through.
    """
    if protocol is not None:
        protocol_engine(protocol)  # an unknown name lists the registered protocols
        if protocol not in AUDITED:
            raise UnknownOptionError(f"the audit knows the views of {AUDITED}, not {protocol!r}")
    for name, value in (("layers", layers), ("views", views), ("texts", texts)):
        if value is not None and not isinstance(value, (list, tuple)):
            raise UnknownOptionError(f"{name} must be a list or tuple, got {type(value).__name__}")
    if texts is not None and (not texts or not all(isinstance(t, str) and t.strip() for t in texts)):
        raise UnknownOptionError("texts must be non-empty strings (None: the built-in samples)")
    if not layers:
        raise UnknownOptionError("layers is empty: nothing to measure")
    for name, value in (("shortlist", shortlist), ("sweeps", sweeps), ("max_length", max_length),
                        ("opened_per_layer", opened_per_layer)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UnknownOptionError(f"{name} must be a positive integer, got {value!r}")
    folder = resolve_folder(folder)
    config = AutoConfig.from_pretrained(folder)
    section = read_section(config, folder, protocol)
    proto = section["protocol"]
    if protocol is not None and proto != protocol:
        raise UnknownOptionError(f"{folder} was converted for protocol {proto!r}, not {protocol!r}")
    if proto not in AUDITED:
        raise UnknownOptionError(f"the audit knows the views of {AUDITED}, not {proto!r}")
    spec = family(section["family"])
    residual_layers = resolve_layers(layers, config.num_hidden_layers)
    if proto == "permute" and original is None:
        raise UnknownOptionError("auditing permute needs the original open checkpoint the attacker knows "
                                 "(--original / original=)")
    public_src = resolve_folder(original) if original is not None else folder
    public_config = AutoConfig.from_pretrained(public_src)
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads")
    if any(getattr(public_config, name, None) != getattr(config, name) for name in shape):
        raise UnknownOptionError(f"{public_src} is not the model {folder} was converted from "
                                 f"({', '.join(f'{n} {getattr(public_config, n, None)}' for n in shape)} against "
                                 f"{', '.join(f'{n} {getattr(config, n)}' for n in shape)})")
    public = (AutoModelForCausalLM if spec.causal else AutoModel).from_pretrained(public_src, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder if _has_tokenizer(folder) else public_src)
    if proto != "permute" and tuple(views) != KINDS:
        raise UnknownOptionError(f"views choose the permute server's activations; an {proto} server's views are all read")
    if proto == "permute" and opened_per_layer != 2:
        raise UnknownOptionError("opened_per_layer is an option of the mpc audit")
    options = {"key": key, "embedding_noise": embedding_noise}  # the engine refuses what its protocol lacks
    if proto != "permute":
        options["record_views"] = True
    if proto == "fss":
        options["protocol"] = "fss"  # fss runs the checkpoint as it is
    secure = (SecureModelForCausalLM if spec.causal else SecureModel).from_pretrained(folder, **options)
    settings = {"protocol": proto, "variant": _variant(section, embedding_noise), "family": spec.name,
                "checkpoint": str(folder), "original": str(public_src), "layers": residual_layers,
                "shortlist": shortlist, "sweeps": sweeps, "texts": len(texts or DEFAULT_TEXTS), "max_length": max_length}
    try:
        if secure.engine.vocab_size != public.get_input_embeddings().weight.shape[0]:
            raise UnknownOptionError(f"{public_src} has another vocabulary than {folder}: not its original")
        auditor = _PermuteAudit(secure, public, spec, section, residual_layers, tuple(views)) \
            if proto == "permute" else _SharesAudit(secure, public, spec, residual_layers, opened_per_layer)
        auditor.matcher = VocabularyMatcher(public, spec.name, spec.causal)
        auditor.shortlist, auditor.sweeps = shortlist, sweeps
        report = AuditReport(settings, keys=auditor.keys())
        tally, errors, agreement, jobs = _Tally(), [], [], []
        for text in texts or DEFAULT_TEXTS:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
            special = tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True)
            if all(special):
                raise UnknownOptionError(f"text {text!r} has no token that is not a special token: nothing to recover")
            output, seen = auditor.observe(ids)
            with torch.no_grad():
                plain = public(input_ids=ids, attention_mask=torch.ones_like(ids))
            plain = plain.logits if spec.causal else plain.last_hidden_state
            errors.append(float((output - plain).abs().max()))
            if spec.causal:
                agreement.append(float((output.argmax(-1) == plain.argmax(-1)).float().mean()))
            jobs.append((ids[0], ~torch.tensor(special, dtype=torch.bool), auditor.views(seen, ids[0].numel())))
        with progress(sum(auditor.work(v) for _, _, v in jobs), "audit", unit="position") as bar:
            for truth, scored, entries in jobs:
                for row_key, recovered in auditor.attack(entries, bar):
                    tally.add(row_key, recovered, truth, scored)
        report.rows = tally.rows(proto, 100.0 / auditor.matcher.vocab_size)
        report.quality = {"max_abs_error": float(torch.tensor(errors).max())}  # NaN stays NaN
        if agreement:
            report.quality["top1_agreement"] = sum(agreement) / len(agreement)
        return report
    finally:
        secure.engine.close()


def _has_tokenizer(folder: str) -> bool:
    return any(Path(folder, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def _variant(section: dict, noise: float | None) -> str:
    if section["protocol"] != "permute":
        return section["protocol"]
    internal = "on" if section.get("internal_permutations", True) else "off"
    return f"embeddings={section['embeddings']}, internal permutations {internal}, noise {noise or 0}"


@dataclass
class _Entry:
    """One attack on one view: its row (party, view, layer, attack), and either a search to run
    or tokens already recovered (``direct``, with the search's description)."""

    party: str
    view: str
    layer: int
    attack: str
    search: Search | None = None
    direct: tuple[torch.Tensor, str] | None = None
    decoded: bool = False  # the view read with the recovered key (its shortlist seeds its block first)


class _Audit:
    """What both protocols' audits share: running the searches of one text's views."""

    matcher: VocabularyMatcher
    shortlist: int
    sweeps: int

    def __init__(self, secure, public, spec, residual_layers: list[int], views=KINDS):
        self.secure = secure
        self.public = public
        self.spec = spec
        self.residual_layers = residual_layers
        self.sites = sites_of(spec.name, public.config.num_hidden_layers, residual_layers, views)
        if not self.sites:
            raise UnknownOptionError(f"views {list(views)} read nothing in a {spec.name} model")
        if not spec.causal and "residual" not in views and any(not position_wise(s, False) for s in self.sites):
            raise UnknownOptionError("in a bidirectional model the deep Q/K/V/FFN views are searched among the "
                                     "candidates of the residual view: add 'residual' to views")

    def keys(self) -> list[dict]:
        """Key recovery results (protocols with keys)."""
        return []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The secure model's logits (causal) or last hidden state on ``ids [1, seq]``."""
        out = self.secure(input_ids=ids, attention_mask=torch.ones_like(ids),
                          **({"use_cache": False} if self.spec.causal else {}))
        return out.logits if self.spec.causal else out.last_hidden_state

    def _proxied(self, entry: _Entry) -> bool:
        search = entry.search
        return search.site.kind in ("residual", "attention_input") and \
            search.observed.shape[-1] == self.public.config.hidden_size

    def attack(self, entries: list[_Entry], bar):
        """Yield (row key, recovered tokens) for each entry.

        Causal models and position-wise sites: sequential search (:meth:`.attacks.VocabularyMatcher.sequential`).
        Bidirectional deep sites: joint search; the shortlist of a hidden-width view comes from
        sequential matching against the candidates' embedding output (a proxy: deep states keep
        much of their own token), that of a Q/K/V/FFN view from its party's residual view nearest
        in depth (the one read with the recovered key where there is one: the party holds both).
        """
        searched = [e for e in entries if e.search is not None]
        for e in searched:  # every residual view can seed the joint search of its block's other views
            if e.search.site.kind == "residual":
                e.search.shortlist = self.shortlist
        sequential = [e for e in searched if position_wise(e.search.site, self.spec.causal)]
        joint = [e for e in searched if not position_wise(e.search.site, self.spec.causal)]
        proxies = {id(e): Search(Site("residual", 0), e.search.observed, e.search.permuted, self.shortlist)
                   for e in joint if self._proxied(e)}
        self.matcher.sequential([e.search for e in sequential] + list(proxies.values()), bar)
        for e in entries:
            if e.direct is not None:
                bar.update(e.direct[0].numel())
                yield (e.party, e.view, e.layer, e.attack, e.direct[1]), e.direct[0]
        shortlists: dict[str, dict[int, torch.Tensor]] = {}  # party -> residual layer -> [seq, K]

        def seed(e: _Entry, shortlist: torch.Tensor) -> None:  # a residual view's candidates, key-read first
            if e.search.site.kind == "residual" and (e.decoded or e.layer not in shortlists.get(e.party, {})):
                shortlists.setdefault(e.party, {})[e.layer] = shortlist

        for e in sequential:
            if e.search.ranked:
                seed(e, torch.stack(e.search.ranked))
            yield (e.party, e.view, e.layer, e.attack, SEQUENTIAL), e.search.tokens
        for e in sorted(joint, key=lambda e: not self._proxied(e)):  # proxied views first: they seed the rest
            if id(e) in proxies:
                shortlist, source = torch.stack(proxies[id(e)].ranked), "embedding-output proxy"
                seed(e, shortlist)
            else:
                mine = shortlists[e.party]
                nearest = min(mine, key=lambda layer: (abs(layer - e.layer), -layer))  # ties: the deeper
                shortlist, source = mine[nearest], f"residual {nearest} views"
            tokens = self.matcher.joint(e.search, shortlist, self.sweeps, bar)
            yield (e.party, e.view, e.layer, e.attack,
                   f"joint, {shortlist.shape[1]} candidates from the {source}, {self.sweeps} sweeps"), tokens

    def work(self, entries: list[_Entry]) -> int:
        """Progress steps of one text's entries (positions searched)."""
        steps = 0
        for e in entries:
            if e.search is None:
                steps += e.direct[0].numel()
                continue
            seq = e.search.observed.shape[0]
            steps += seq if position_wise(e.search.site, self.spec.causal) else \
                seq * self.sweeps + (seq if self._proxied(e) else 0)
        return steps


class _PermuteAudit(_Audit):
    """The permute server: its request, weights and every activation it computes."""

    def __init__(self, secure, public, spec, section, residual_layers, views):
        super().__init__(secure, public, spec, residual_layers, views)
        self.internal = section.get("internal_permutations", True)
        backend = secure.engine.backend
        if not hasattr(backend, "server"):
            raise UnknownOptionError("the audit runs the permute server in this process (no server_url)")
        self.server_model = backend.server.model
        self.recorded: list[tuple[str, str, torch.Tensor]] = []
        secure.engine.observe(lambda party, what, tensor: self.recorded.append((party, what, tensor.clone())))
        client_key = secure.engine.client.key
        self.recovered = recover_permutations(self.server_model.base_model.state_dict(), public.base_model.state_dict(),
                                              spec.rules)
        self.truth = {"hidden": client_key.hidden, "vocab": client_key.vocab}

    def keys(self) -> list[dict]:
        groups = defaultdict(list)
        for name, (index, exact) in self.recovered.items():
            kind = name.split(".")[-1]
            if kind not in ("hidden", "vocab") and not self.internal:
                continue  # internal permutations off: these are identities, nothing to recover
            kind = "attention (q/k/v/o units)" if kind in ("q", "k", "v", "qkv", "o_in") else kind
            truth = self.truth.get(name)
            if truth is not None:
                groups[kind].append((float((index == truth).float().mean()), "equal to the key"))
            else:
                groups[kind].append((float(exact.float().mean()), "unique exact matches (the key holds no truth)"))
        return [{"permutation": kind, "recovered_pct": 100.0 * sum(v for v, _ in vals) / len(vals),
                 "measure": vals[0][1], "count": len(vals)} for kind, vals in sorted(groups.items())]

    def observe(self, ids: torch.Tensor):
        self.recorded.clear()
        with torch.no_grad(), Probe(self.server_model, self.spec.name, self.sites) as probe:
            output = self.forward(ids)
        return output, {**{(p, w): t for p, w, t in self.recorded}, **{s: v[0] for s, v in probe.captured.items()}}

    def views(self, views: dict, seq: int) -> list[_Entry]:
        hidden = self.recovered.get("hidden")
        entries = []
        for site in self.sites:
            observed = views[site]
            basis = site.kind in ("residual", "attention_input")
            permuted = basis or self.internal
            attack = "vocabulary matching, " + ("sorted L1" if permuted else "L1")
            if site.kind in ("q", "k", "v") and permuted:
                attack = "vocabulary matching, per-head sorted L1"
            view = site.kind.replace("_", " ")
            entries.append(_Entry("server", view, site.layer, attack, Search(site, observed, permuted)))
            if basis and hidden is not None:
                clear = gather_last(observed, inverse(hidden[0]))
                entries.append(_Entry("server", view, site.layer, "key recovered from weights, then vocabulary "
                                      "matching (L1)", Search(site, clear, False), decoded=True))
        ids = views.get(("server", "input_ids"))
        if ids is not None and "vocab" in self.recovered:
            entries.append(_Entry("server", "input ids", 0, "vocabulary permutation recovered from weights",
                                  direct=(self.recovered["vocab"][0][ids[0]], "lookup")))
        return entries


class _SharesAudit(_Audit):
    """Each mpc or fss server: its input shares, the values it opens (mpc: shares opened; fss:
    masked values ``x + r``), and (mpc) its shares of each layer's output."""

    def __init__(self, secure, public, spec, residual_layers, opened_per_layer: int):
        super().__init__(secure, public, spec, residual_layers)
        self.opened_per_layer = opened_per_layer
        params = getattr(secure.engine, "params", None)  # fss: its ring and fixed point; mpc: 64 bits
        self.ring_bits, self.frac_bits = (params.ring_bits, params.frac_bits) if params else (64, DEFAULT_FRAC_BITS)
        self.recorded: list[tuple[str, str, torch.Tensor]] = []
        secure.engine.observe(lambda party, what, tensor: self.recorded.append((party, what, tensor)))

    def observe(self, ids: torch.Tensor):
        self.recorded.clear()
        with torch.no_grad():
            output = self.forward(ids)
        return output, list(self.recorded)

    def fixed_point(self, ring: torch.Tensor) -> torch.Tensor:
        """int64 ring elements (a share or an opened value) read as the protocol's signed fixed point, float32."""
        return (signed(ring, self.ring_bits).double() / (1 << self.frac_bits)).float()

    def views(self, recorded: list, seq: int) -> list[_Entry]:
        """The attacked views: each server's input share (one-hot rows), its share of each layer's
        output, and the first and last opened values of hidden width per layer, all read as fixed point."""
        fixed_point = self.fixed_point
        hidden = self.public.config.hidden_size
        blocks = {min(layer, self.public.config.num_hidden_layers - 1) for layer in self.residual_layers}
        entries, opened = [], defaultdict(list)
        for party, what, tensor in recorded:
            if party not in ("server0", "server1") or "/" not in what:
                continue  # the dealer's view and the public fields: shapes and masks, public by design
            scope, kind = what.split("/", 1)
            if kind == "input share":
                entries.append(_Entry(party, "input share (one-hot rows)", 0, "largest decoded entry per row",
                                      direct=(fixed_point(tensor).reshape(seq, -1).argmax(-1), "direct")))
            elif scope.startswith("layer.") and tensor.numel() == seq * hidden:
                layer = int(scope.split(".")[1])
                if kind == "output share" and layer + 1 in self.residual_layers:
                    entries.append(_Entry(party, "share of the layer output", layer + 1, "vocabulary matching, L1",
                                          Search(Site("residual", layer + 1), fixed_point(tensor).reshape(seq, hidden),
                                                 False)))
                elif kind == "opened" and layer in blocks:  # compared with the block's input
                    opened[(party, layer)].append(tensor)
        for (party, layer), values in opened.items():
            picks = torch.linspace(0, len(values) - 1, min(self.opened_per_layer, len(values))).round().long()
            for pick in picks.tolist():  # evenly spaced: 2 is the first and the last
                entries.append(_Entry(party, "opened value (hidden width)", layer, "vocabulary matching, L1",
                                      Search(Site("residual", layer), fixed_point(values[pick]).reshape(seq, hidden),
                                             False)))
        return entries


