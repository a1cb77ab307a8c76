"""Fuzzing (slow suite): the HTTP service from its OpenAPI schema, the wire format and the key parser.

One contract throughout: malformed input gets the package's own answer -- a 4xx with a message over
HTTP, an :class:`~hf_secure.errors.HfSecureError` in-process -- never a 500, a raw exception or a
hang. Every test prints how many cases it tried and how long it took (``pytest -m slow -s``).
A hang fails the test through SIGALRM; a single slow case through Hypothesis' deadline.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_secure.errors import CorruptKeyError, HfSecureError, InvalidRequestError, ServerError
from hf_secure.keys import load_key, read_key_metadata, save_key
from hf_secure.modeling import SecureModelForCausalLM
from hf_secure.protocols.permute.client import PermuteClient, PermuteKey
from hf_secure.server import wire
from hf_secure.server.access import AccessPolicy
from hf_secure.server.app import create_app
from hf_secure.server.process import free_port
from hf_secure.server.runtime import INPUT_NAMES, ModelServer

from .conftest import VOCAB

pytestmark = pytest.mark.slow

HIDDEN = 64  # hidden size of every tiny model in conftest
FAMILIES = [("gpt2", "client"), ("llama", "server"), ("bert", "client")]
TEST_LIMIT_S = 150  # a whole test; each is designed to take well under a minute
FUZZ = settings(deadline=timedelta(seconds=10), database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])  # tally counts across examples
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.uint64, torch.bool, torch.float8_e4m3fn, torch.complex64]
# Every dtype name safetensors knows (F4, F6_* and E8M0 have no torch dtype), and some it does not.
ST_DTYPES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
             "BF16", "I32", "U32", "F32", "F64", "I64", "U64", "C64", "E8M0", "F128", ""]


@pytest.fixture(autouse=True)
def no_hang(request):
    """Turn a hang into a failure: SIGALRM interrupts the test after TEST_LIMIT_S."""
    def expire(*_):
        raise TimeoutError(f"{request.node.name} ran past {TEST_LIMIT_S} s: something hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def tally(request, capsys):
    """Counts the cases a test tried, by outcome; prints them with the test's wall time."""
    counts, start = Counter(), time.monotonic()
    yield counts
    with capsys.disabled():
        print(f"\n[fuzz] {request.node.name}: {sum(counts.values())} cases in {time.monotonic() - start:.1f} s "
              f"{dict(sorted(counts.items(), key=str))}")


@pytest.fixture(scope="module")
def apps(tiny):
    """The FastAPI app of each tiny family, called in-process (no socket)."""
    from fastapi.testclient import TestClient

    apps = {}
    for family, embeddings in FAMILIES:
        server = ModelServer(str(tiny(family, embeddings)[1]))
        app = create_app(server, AccessPolicy.from_entries([f"fuzzer:{TOKEN}"]))
        apps[family] = (server, app, TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}))
    return apps


TOKEN = "fuzz-" + "t" * 27


def assert_clear(response) -> None:
    """Never a 5xx; a 4xx says in its JSON body what is wrong (``error``, or FastAPI's ``detail``)."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert body.get("error") or body.get("detail"), response.text


# -- safetensors messages, valid and damaged ---------------------------------------------------------------------

def split(blob: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def join(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


def often(usual, other):
    """``usual`` three times in four: requests the server accepts must be common enough to reach the model."""
    return st.sampled_from([usual, usual, usual, other]).flatmap(lambda strategy: strategy)


@st.composite
def tensors(draw, name: str, batch: int, seq: int) -> torch.Tensor:
    """A tensor for ``name``: often what the server expects (shape, dtype, values in range), else wrong in one
    respect: another shape, another dtype, or one value out of range, NaN, infinite or huge."""
    flaw = draw(often(st.none(), st.sampled_from(["shape", "dtype", "value"])))
    shape = [batch, seq, HIDDEN] if name == "inputs_embeds" else [batch, seq]
    if flaw == "shape":
        shape = draw(st.lists(st.integers(0, 4), max_size=4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    high = {"input_ids": VOCAB, "position_ids": seq}.get(name, 2)
    values = (torch.randn(shape, generator=gen) if name == "inputs_embeds"
              else torch.randint(0, high, shape, generator=gen))
    if flaw == "value" and values.numel():
        values = values.to(torch.float64)
        at = draw(st.integers(0, values.numel() - 1))
        values.view(-1)[at] = draw(st.sampled_from([float("nan"), float("inf"), 1e38, -1, VOCAB, 2**40]))
    dtype = torch.float32 if name == "inputs_embeds" else torch.int64
    return values.to(draw(st.sampled_from(DTYPES)) if flaw == "dtype" else dtype)


@st.composite
def message_parts(draw, main=st.sampled_from(INPUT_NAMES[:2])) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What a message carries: ids or embeddings (``main``), maybe a mask, positions or types (or strangers:
    both, unknown names), any metadata."""
    batch, seq = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    extras = often(st.lists(st.sampled_from(INPUT_NAMES[2:]), max_size=2, unique=True),
                   st.lists(st.sampled_from(INPUT_NAMES + ("pixels",)), max_size=2, unique=True))
    names = dict.fromkeys([draw(main), *draw(extras)])
    meta = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2))
    return {name: draw(tensors(name, batch, seq)) for name in names}, meta


messages = message_parts().map(lambda parts: wire.encode(*parts))


@st.composite
def damaged(draw, blob: bytes) -> bytes:
    """``blob`` as it is, or truncated, flipped, with a lying header length, an edited header, or replaced."""
    kind = draw(often(st.just("intact"), st.sampled_from(["truncate", "flip", "length", "header", "metadata",
                                                           "random"])))
    if kind == "intact":
        return blob
    if kind == "truncate":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if kind == "flip":
        at = draw(st.integers(0, len(blob) - 1))
        return blob[:at] + bytes([blob[at] ^ draw(st.integers(1, 255))]) + blob[at + 1 :]
    if kind == "length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + blob[8:]
    if kind == "random":
        return draw(st.binary(max_size=256))
    header, data = split(blob)
    if kind == "metadata":
        meta = header.setdefault("__metadata__", {})
        meta[draw(st.sampled_from(sorted(meta) + ["format", "protocol", "embeddings", "weights", "x"]))] = draw(
            st.sampled_from(["", "permute", "server", "client", "{}", "[]", "{not json", "[" * 5000])
            | st.text(max_size=20) | json_values)
        return join(header, data)
    names = [n for n in header if n != "__metadata__"]
    if names and draw(st.booleans()):  # one field of one tensor entry
        entry = header[draw(st.sampled_from(names))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry[field] = draw({"dtype": st.sampled_from(ST_DTYPES),
                             "shape": st.lists(st.integers(0, 2**64), max_size=4),
                             "data_offsets": st.lists(st.integers(-1, 2**64), min_size=2, max_size=2)}[field]
                            | json_values)
        return join(header, data)
    header = draw(json_values | st.just(header))  # a header that is no object, or a stray key
    if isinstance(header, dict) and draw(st.booleans()):
        header[draw(st.text(max_size=8))] = draw(json_values)
    return join(header, data)


bodies = often(messages.flatmap(damaged), st.binary(max_size=64))


# -- the HTTP service ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [f for f, _ in FAMILIES])
def test_http_service_from_its_openapi_schema(apps, family, tally):
    """Schemathesis generates requests from the app's own OpenAPI schema, valid and invalid (query types,
    path ids, binary bodies): no 5xx, every answer conforms to the schema, every 4xx carries a message."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_asgi("/openapi.json", apps[family][1])

    @schema.auth()
    class Bearer:  # the operator's token; schemathesis also tries requests without it (401 expected)
        def get(self, case, context):
            return TOKEN

        def set(self, case, data, context):
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))

    @settings(FUZZ, max_examples=300)
    @given(case=cases)
    def run(case):
        response = case.call()
        tally[f"{case.operation.label} {response.status_code}"] += 1
        assert_clear(response)
        # A schema-valid binary body is rarely valid safetensors: its 400 is right, not a failure.
        case.validate_response(response, excluded_checks=[positive_data_acceptance])

    run()
    assert sum(tally.values()) >= 100


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_forward_bodies_and_sessions(apps, tally, data):
    """Random, damaged and plausible safetensors bodies, posted alone or as a session of up to three requests
    with any past_length/output/logits_to_keep: each gets 200 with a decodable answer, or a clear 400/404."""
    family, embeddings = data.draw(st.sampled_from(FAMILIES))
    server, _, client = apps[family]
    session = client.post("/v1/sessions").json()["session_id"] if server.causal and data.draw(st.booleans()) else None
    main = often(st.just("input_ids" if embeddings == "server" else "inputs_embeds"), st.sampled_from(INPUT_NAMES))
    cached = 0
    for _ in range(data.draw(st.integers(1, 3))):
        params = {
            "session_id": data.draw(often(st.just(session), st.sampled_from(["f" * 32, None]))),
            "past_length": data.draw(often(st.just(cached), st.integers(-3, 200))),
            "output": data.draw(often(st.just("hidden"), st.sampled_from(["logits", "", "secrets"]))),
            "logits_to_keep": data.draw(often(st.sampled_from([0, 1]), st.integers(-2, 2**70))),
        }
        body = data.draw(often(message_parts(main).map(lambda parts: wire.encode(*parts)), bodies))
        response = client.post("/v1/forward", params={k: v for k, v in params.items() if v is not None},
                               content=body)
        tally[f"{family} {response.status_code}"] += 1
        assert_clear(response)
        if response.status_code == 200:
            outputs, meta = wire.decode(response.content)
            assert outputs
            cached = int(meta["length"])
    if session:
        assert client.delete(f"/v1/sessions/{session}").status_code == 200


@settings(FUZZ, max_examples=300)
@given(parts=message_parts())
def test_wire_round_trip(tally, parts):
    """decode(encode(message)) is the message, for every dtype and shape, empty ones included."""
    tensors, meta = wire.decode(wire.encode(*parts))
    assert meta == parts[1] and tensors.keys() == parts[0].keys()
    assert all(torch.equal(tensors[n].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
               for n, t in parts[0].items())
    tally["round trip"] += 1


@settings(FUZZ, max_examples=1000)
@given(blob=bodies)
def test_wire_decode(tally, blob):
    """wire.decode returns string metadata and tensors, or raises InvalidRequestError: nothing else."""
    try:
        tensors, meta = wire.decode(blob)
    except InvalidRequestError as exc:
        assert str(exc)
        tally["rejected"] += 1
        return
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    tally["decoded"] += 1


# -- the key parser ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clients(tiny):
    """A bound client model per embedding mode, to rebind with fuzzed keys; the server URL answers nothing,
    so a key that parses ends in ServerError (unreachable) after the whole key path ran."""
    bound = {}
    for family, embeddings in [("gpt2", "client"), ("llama", "server")]:
        _, folder, key = tiny(family, embeddings)
        bound[embeddings] = (SecureModelForCausalLM.from_pretrained(folder, key=key), key.read_bytes())
    return bound, f"http://127.0.0.1:{free_port()}"


def bind(model, path, url) -> str:
    """What a client does with a key file it is handed; the outcome's name."""
    try:
        model.bind(key=path, server_url=url, timeout=2)
    except ServerError:
        return "accepted"  # the key parsed and matched; only the (absent) server is missing
    except HfSecureError as exc:
        assert str(exc)
        return type(exc).__name__
    raise AssertionError("bind to an unreachable server cannot succeed")


@settings(FUZZ, max_examples=300)
@given(blob=st.binary(max_size=512) | st.binary(max_size=64).map(lambda b: (len(b)).to_bytes(8, "little") + b))
def test_random_bytes_are_no_key(clients, tmp_path_factory, tally, blob):
    """Random bytes (and a self-consistent header length around them) are refused with CorruptKeyError."""
    (bound, url), path = clients, tmp_path_factory.getbasetemp() / "random.key.safetensors"
    path.write_bytes(blob)
    try:
        assert isinstance(read_key_metadata(path), dict)  # b"{}" is a safetensors file, with no metadata
    except HfSecureError:
        pass
    with pytest.raises(HfSecureError):
        load_key(path)
    tally[bind(bound["client"][0], path, url)] += 1


@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_damaged_key_files(clients, tmp_path_factory, tally, data):
    """A real key file truncated, with flipped bytes, a lying header length, edited tensor entries or edited
    metadata: binding fails with an HfSecureError (mostly CorruptKeyError), or the key still parses."""
    (bound, url), path = clients, tmp_path_factory.getbasetemp() / "damaged.key.safetensors"
    model, original = bound[data.draw(st.sampled_from(sorted(bound)))]
    path.write_bytes(data.draw(damaged(original)))
    tally[bind(model, path, url)] += 1


@st.composite
def key_tensors(draw) -> dict[str, torch.Tensor]:
    """Key tensors for some hidden size and vocabulary, each field often right, else missing or another tensor."""
    hidden, vocab = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    right = {"hidden": torch.randperm(hidden, generator=gen), "key_id": torch.zeros(16, dtype=torch.uint8),
             "vocab": torch.randperm(vocab, generator=gen), "embed_tokens": torch.randn(vocab, hidden, generator=gen),
             "lm_head": torch.randn(vocab, hidden, generator=gen), "lm_head_bias": torch.randn(vocab, generator=gen)}
    out = {}
    for name in [*right, "stray"]:
        choice = draw(often(st.just("right"), st.sampled_from(["absent", "other"])))
        if choice == "right" and name in right:
            out[name] = right[name]
        elif choice == "other":
            out[name] = draw(tensors(name, hidden, vocab))
    return out


@settings(FUZZ, max_examples=500)
@given(fields=key_tensors(), embeddings=often(st.sampled_from(["client", "server"]), st.sampled_from(["", "x"])))
def test_key_files_with_any_tensors(tmp_path_factory, tally, fields, embeddings):
    """A well-formed key file (the format, a fingerprint that matches) holding any tensors: load_key and
    PermuteKey.from_tensors accept only a key PermuteClient can use -- it then encodes and decodes a token --
    and refuse anything else with CorruptKeyError."""
    path = tmp_path_factory.getbasetemp() / "any.key.safetensors"
    save_key(path, fields, {"protocol": "permute", "embeddings": embeddings, "weights": "{}"})
    try:
        key = PermuteKey.from_tensors(*load_key(path))
    except CorruptKeyError as exc:
        assert str(exc)
        tally["CorruptKeyError"] += 1
        return
    client = PermuteClient(key)
    assert len(client.encode(torch.zeros(1, 1, dtype=torch.int64), None)) == 1
    assert client.decode(torch.zeros(1, 1, key.hidden.numel()), "hidden").shape == (1, 1, key.hidden.numel())
    tally["accepted"] += 1
