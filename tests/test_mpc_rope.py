"""Llama's RoPE in the mpc protocol: cos/sin from transformers' own rotary module, every rope_type."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hf_secure.compat import CACHE_NAME
from hf_secure.errors import UnsupportedModelError
from hf_secure.protocols.mpc.approximations import Approximations
from hf_secure.protocols.mpc.client import calibrate
from hf_secure.protocols.mpc.llama import LlamaProgram
from hf_secure.protocols.mpc.run import MPCSession

from .conftest import randomize_norms, tiny_config

ORIGINAL = 8  # positions the (tiny) model was "trained" on: scaled variants change past it
HEAD_DIM = 16  # tiny_config: 64 / 4 heads
ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * (HEAD_DIM // 2),
                 "long_factor": [1.5 + i / 4 for i in range(HEAD_DIM // 2)],
                 "original_max_position_embeddings": ORIGINAL},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
}
# one query after another, as the parties see them: within, past and back within the original length
QUERIES = [torch.arange(6)[None], torch.arange(20).expand(2, -1), torch.tensor([[20], [13]]), torch.arange(3, 9)[None]]


def _config(rope: dict, name: str = "rope_parameters"):
    """The tiny Llama with ``rope`` under ``name`` (``rope_scaling``: the legacy name)."""
    fields = {k: v for k, v in tiny_config("llama").to_dict().items()
              if k not in ("model_type", "rope_parameters", "rope_scaling")}
    return LlamaConfig(**{**fields, "max_position_embeddings": ORIGINAL, name: dict(rope)})


def _program(config) -> LlamaProgram:
    return LlamaProgram.from_config(config, Approximations(activation="series_silu"))


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rope_tables_are_transformers_own_for_every_rope_type(kind):
    """cos/sin of the program (pickled, as the parties receive it) equal the plaintext model's,
    query after query: dynamic scaling keeps transformers' state across queries."""
    config = _config(ROPES[kind])
    program = pickle.loads(pickle.dumps(_program(config)))
    rotary = LlamaRotaryEmbedding(config)
    for positions in QUERIES:
        cos, sin = program.with_constants({"position_ids": positions})["rope"]
        expected = rotary(torch.empty(0), positions)
        assert cos.shape == (*positions.shape[:1], 1, positions.shape[1], HEAD_DIM)
        assert torch.equal(cos[:, 0].float(), expected[0]) and torch.equal(sin[:, 0].float(), expected[1])
    if kind != "default":  # past the original length the scaling shows
        plain = LlamaRotaryEmbedding(_config(ROPES["default"]))(torch.empty(0), QUERIES[1])
        scaled = program.with_constants({"position_ids": QUERIES[1]})["rope"][0][:, 0].float()
        assert not torch.allclose(plain[0], scaled)


def test_legacy_rope_scaling_name_gives_the_same_tables():
    positions = torch.arange(20)[None]
    tables = [_program(_config(ROPES["yarn"], name)).with_constants({"position_ids": positions})["rope"]
              for name in ("rope_parameters", "rope_scaling")]
    assert all(torch.equal(a, b) for a, b in zip(*tables))


def test_pickled_program_leaves_the_rotary_module_behind():
    program = _program(_config(ROPES["dynamic"]))
    program.with_constants({"position_ids": torch.arange(20)[None]})  # grows the dynamic scaling
    assert "rotary" in program.__dict__ and "rotary" not in pickle.loads(pickle.dumps(program)).__dict__


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "no_such_rope", "factor": 2.0}, "no_such_rope"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "rotates 8 of the 16"),
])
def test_unsupported_rope_is_refused_clearly(rope, match):
    with pytest.raises(UnsupportedModelError, match=match):
        _program(_config(rope))


def test_dynamic_rope_past_the_original_length_matches_transformers_through_mpc():
    """A tiny Llama with dynamic NTK scaling: a 12-token prompt (past the 8 original positions)
    then one cached token, against transformers' own forward with its own cache."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(ROPES["dynamic"])).eval()
    randomize_norms(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prompt = model(ids[:, :12], use_cache=True)
        step = model(ids[:, 12:], **{CACHE_NAME: getattr(prompt, CACHE_NAME)}).logits
    bounds = calibrate(model, "llama", input_ids=ids)
    approx = Approximations(activation="series_silu", softmax="exact", ln_bounds=bounds)
    weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    onehot = torch.nn.functional.one_hot(ids, model.config.vocab_size)

    def public(past, new):
        return {"attention_mask": torch.ones(1, past + new, dtype=torch.long),
                "position_ids": torch.arange(past, past + new)[None], "cache": torch.tensor([1]),
                "past_length": torch.tensor([past]), "logits_to_keep": torch.tensor([0]),
                "drop": torch.tensor([], dtype=torch.long), "token_only": torch.tensor([0])}

    with MPCSession(_program(model.config), weights, timeout_s=60) as session:
        (got_prompt,), _ = session.run([onehot[:, :12]], public(0, 12))
        (got_step,), _ = session.run([onehot[:, 12:]], public(12, 1))
    assert (got_prompt - prompt.logits).abs().max() < 0.03
    assert (got_step - step).abs().max() < 0.03


def test_a_sliding_window_bounds_the_sequence_a_llama_like_program_accepts():
    """Mistral attends within a window, Qwen2 only where a layer says so; the mpc program attends
    over everything, so it refuses sequences longer than the window instead of diverging."""
    from transformers import MistralConfig, Qwen2Config

    from hf_secure.errors import InvalidInputError
    from hf_secure.protocols.mpc.llama import attention_window

    shape = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    mistral = MistralConfig(**shape, sliding_window=16)
    assert attention_window(mistral) == 16
    assert attention_window(Qwen2Config(**shape)) is None
    assert attention_window(Qwen2Config(**shape, use_sliding_window=True, sliding_window=16, max_window_layers=1)) == 16
    program = _program(mistral)
    program.check_length(16)
    with pytest.raises(InvalidInputError, match="sliding window of 16"):
        program.check_length(17)
