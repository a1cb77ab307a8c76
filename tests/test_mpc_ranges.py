"""Fixed-point approximations refuse inputs outside their ranges instead of returning garbage."""

from __future__ import annotations

import pytest
import torch

from hf_secure.errors import OutOfRangeError
from hf_secure.protocols.mpc.approximations import Approximations
from hf_secure.families import family
from hf_secure.protocols.mpc.client import calibrate
from hf_secure.protocols.mpc.nonlinear import softmax
from hf_secure.protocols.mpc.ranges import FINE, expect_within, verify_ranges
from hf_secure.protocols.mpc.run import MPCSession, secure_eval

from .conftest import make_tiny

LOGIT_TOL = 0.05  # SecFormer approximations and fixed point, against the exact model (no approximated twin here)


def _public(mask, positions):
    return {"attention_mask": mask, "position_ids": positions, "cache": torch.tensor([1]),
            "past_length": torch.tensor([0]), "logits_to_keep": torch.tensor([0]), "drop": torch.tensor([0]),
            "token_only": torch.tensor([0])}


def test_an_embedding_beyond_the_calibrated_range_is_refused_and_the_session_goes_on(tmp_path):
    """The case of the issue: one token's embedding row 4x / 30x larger than any calibration token's
    (layer-0 variance ~9x / ~500x the bound) gave logits off by 4e9 with no error."""
    model = make_tiny("gpt2", tmp_path / "gpt2")
    with torch.no_grad():
        model.transformer.wte.weight[100] *= 30
        model.transformer.wte.weight[101] *= 4
    calibration = torch.arange(3, 60).view(3, 19)
    approx = Approximations(activation="secformer_gelu", softmax="exact",
                            ln_bounds=calibrate(model, "gpt2", input_ids=calibration))
    weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    vocab = model.config.vocab_size
    with MPCSession(family("gpt2").program.from_config(model.config, approx), weights, timeout_s=60) as session:
        for big in (100, 101):
            ids = torch.tensor([[5, 6, big, 7]])
            with pytest.raises(OutOfRangeError, match="LayerNorm/RMSNorm statistic"):
                session.run([torch.nn.functional.one_hot(ids, vocab)],
                            _public(torch.ones_like(ids), torch.arange(4)[None]))
        ids = torch.tensor([[5, 6, 8, 7]])
        (logits,), _ = session.run([torch.nn.functional.one_hot(ids, vocab)],
                                   _public(torch.ones_like(ids), torch.arange(4)[None]))
    with torch.no_grad():
        assert (logits - model(ids).logits).abs().max() < LOGIT_TOL


def _checked(mpc, x):
    expect_within(x, -3.0, 5.0, "exact")
    expect_within(x, -100.0, 100.0, "fine", FINE)
    out = verify_ranges(mpc)
    if mpc.offline:
        return [mpc.placeholder((2,))]
    return [mpc.shared(torch.tensor([out.get("exact", 0), out.get("fine", 0)]) * mpc.scale * (mpc.role == 0))]


def test_verify_ranges_counts_values_outside_each_range():
    x = torch.tensor([-4.0, -3.0, 0.0, 4.9, 5.5, 150.0, -1000.0, 99.0])
    (counts,), _ = secure_eval(_checked, [x])
    # exact [-3, 5]: -4, 5.5, 150, -1000, 99 are out; fine [-100, 100] (resolution 1): 150, -1000
    assert counts.tolist() == [5, 2]


def _masked_softmax(mpc, scores):
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    return [softmax(scores, mask)]


def test_masked_scores_are_excluded_by_selection_whatever_their_value():
    """A masked score far above the others (once pushed down by a constant, -64) cannot win the max;
    a row that attends to nothing attends uniformly, as transformers' masks make it."""
    scores = torch.tensor([[0.5, -1.0, 200.0, 90.0], [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0]])
    (probs,), _ = secure_eval(_masked_softmax, [scores])
    expected = torch.stack([torch.cat([scores[0, :2].softmax(-1), torch.zeros(2)]), scores[1].softmax(-1),
                            scores[2].softmax(-1)])
    assert (probs - expected).abs().max() < 1e-2


@pytest.mark.parametrize("family, projection, activation", [("gpt2", "mlp.c_fc", "secformer_gelu"),
                                                            ("llama", "mlp.gate_proj", "series_silu"),
                                                            ("bert", "intermediate.dense", "secformer_gelu")])
def test_the_activation_bound_from_the_weights_holds_for_any_input(tmp_path, family, projection, activation):
    from hf_secure.protocols.mpc.client import activation_bound

    model = make_tiny(family, tmp_path / family)
    bound = activation_bound(model, family, activation)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out.abs().max().item()))
             for name, m in model.named_modules() if name.endswith(projection)]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for scale in (1.0, 100.0):  # embeddings blown up: LayerNorm keeps the projection bounded
            embeds = model.get_input_embeddings()(torch.randint(0, 200, (4, 16), generator=gen)) * scale
            model(inputs_embeds=embeds)
    for hook in hooks:
        hook.remove()
    scale = 2 ** -0.5 if activation == "secformer_gelu" else 1.0
    assert 0 < max(seen) * scale <= bound < 1000


def test_conversion_bounds_admit_every_token_as_a_first_token(tmp_path):
    """Every vocabulary token as a one-token prompt stays inside the checked LayerNorm range (the
    demo GPT-2 refused 24 of its 2048 tokens, e.g. '%', before the one-token calibration)."""
    from transformers import AutoModelForCausalLM

    from hf_secure.convert import convert_approximate
    from hf_secure.demo import DEMO_MODEL
    from hf_secure.protocols.mpc.gpt2 import norm_sites
    from hf_secure.protocols.mpc.nonlinear import INV_SQRT_CHECKED

    section = convert_approximate(str(DEMO_MODEL), tmp_path / "approx")
    bounds = section["approximations"]["ln_bounds"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "approx").eval()
    calibrated = calibrate(model, "gpt2", margin=2.0, input_ids=torch.arange(model.config.vocab_size)[:, None])
    # margin 2: calibrate's bound is margin * max / 2, i.e. the largest statistic itself
    assert set(calibrated) == set(norm_sites(model.config.n_layer).values())
    for site, largest in calibrated.items():
        assert largest <= INV_SQRT_CHECKED[1] * bounds[site], site


def test_logits_beyond_the_argmax_lanes_are_refused_when_only_the_token_is_revealed(tmp_path):
    """With ``token_only`` the logits feed 20-bit comparisons (differences below 2048): logits past
    +-1000 are refused rather than compared after a wrap; the same query revealing logits is not
    compared, so it runs; in range, the token is the plaintext argmax."""
    model = make_tiny("gpt2", tmp_path / "gpt2")
    approx = Approximations(activation="secformer_gelu", softmax="exact",
                            ln_bounds=calibrate(model, "gpt2", input_ids=torch.arange(3, 60).view(3, 19)))
    weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    loud = dict(weights, **{"transformer.ln_f.weight": weights["transformer.ln_f.weight"] * 2000,
                            "transformer.ln_f.bias": weights["transformer.ln_f.bias"] * 2000})
    ids = torch.tensor([[5, 6, 8, 7], [9, 3, 4, 2]])
    onehot = torch.nn.functional.one_hot(ids, model.config.vocab_size)
    public = _public(torch.ones_like(ids), torch.arange(4)[None].expand(2, -1))
    program = family("gpt2").program.from_config(model.config, approx)
    with MPCSession(program, loud, timeout_s=60) as session:
        with pytest.raises(OutOfRangeError, match="argmax input"):
            session.run([onehot], dict(public, token_only=torch.tensor([1])))
        (logits,), _ = session.run([onehot], public)
        assert logits.abs().max() > 1000
    with MPCSession(program, weights, timeout_s=60) as session:
        (tokens,), _ = session.run([onehot], dict(public, token_only=torch.tensor([1])))
    with torch.no_grad():
        expected = model(ids).logits
    assert tokens.shape == ids.shape and torch.equal(tokens.round().long(), expected.argmax(-1))


def _gelu_and_silu(mpc, x):
    from hf_secure.protocols.mpc.nonlinear import gelu, silu

    return [gelu(x), silu(x)]


def test_activation_inputs_beyond_the_segment_lanes_are_refused():
    """The segment tests compare x -+ cut on 15-bit lanes (|x| < 1024): up to 1000 the result is the
    activation's, beyond it the query is refused instead of picking a segment after a wrap."""
    x = torch.tensor([999.0, -999.0, 3.0, -3.0, 0.25])
    (got_gelu, got_silu), _ = secure_eval(_gelu_and_silu, [x])
    assert (got_gelu - torch.nn.functional.gelu(x)).abs().max() < 0.06
    assert (got_silu - torch.nn.functional.silu(x)).abs().max() < 5e-3
    with pytest.raises(OutOfRangeError, match="GeLU/SiLU input"):
        secure_eval(_gelu_and_silu, [torch.tensor([0.5, 1500.0])])
