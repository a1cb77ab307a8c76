"""fss building blocks: fixed-key AES, DPF (exhaustive on small domains), packing, key files."""

import pytest
import torch

from hf_secure.errors import CorruptKeyError, KeyMismatchError, KeyReuseError
from hf_secure.protocols.fss import aes, dpf
from hf_secure.protocols.fss.keyfile import KeyReader, KeyWriter
from hf_secure.protocols.fss.packing import pack, unpack
from hf_secure.protocols.mpc.prg import PRG


def _blocks(n):
    return PRG.fresh().ring((n, 2))


@pytest.mark.parametrize("key", sorted(aes.FIXED_KEYS))
def test_table_aes_matches_openssl(key):
    blocks = _blocks(777)
    assert torch.equal(aes.encrypt(blocks, key, "table"), aes.encrypt(blocks, key, "cryptography"))
    assert not torch.equal(aes.mmo(blocks, key), blocks)


def test_aes_refuses_bad_blocks():
    with pytest.raises(ValueError):
        aes.encrypt(torch.zeros(4, 3, dtype=torch.int64), "L")
    with pytest.raises(ValueError):
        aes.encrypt(torch.zeros(4, 2, dtype=torch.int32), "L")
    with pytest.raises(ValueError):
        aes.encrypt(torch.zeros(4, 2, dtype=torch.int64), "L", backend="nope")


def _keys(alpha, bits, backend=None):
    n = alpha.numel()
    return dpf.gen(alpha, bits, (_blocks(n), _blocks(n)), backend)


def _repeat(key, times):
    return dpf.DPFKey(key.party, key.bits, key.seed.repeat_interleave(times, 0),
                      key.cw_seed.repeat_interleave(times, 1), key.cw_t.repeat_interleave(times, 1),
                      key.leaf.repeat_interleave(times, 0))


@pytest.mark.parametrize("bits", [1, 2, 7, 8, 9, 10, 12])
def test_dpf_every_point(bits):
    size = 1 << bits
    alpha = torch.cat([torch.tensor([0, size - 1]), torch.randint(0, size, (6,))])
    k0, k1 = _keys(alpha, bits)
    x = torch.arange(size)
    onehot = (x.unsqueeze(0) == alpha.unsqueeze(1)).to(torch.uint8)
    assert torch.equal(dpf.eval_all(k0) ^ dpf.eval_all(k1), onehot)
    r0, r1 = _repeat(k0, size), _repeat(k1, size)
    xs, alphas = x.repeat(alpha.numel()), alpha.repeat_interleave(size)
    assert torch.equal(dpf.eval_point(r0, xs) ^ dpf.eval_point(r1, xs), (xs == alphas).long())
    assert torch.equal(dpf.eval_greater(r0, xs) ^ dpf.eval_greater(r1, xs), (alphas > xs).long())


@pytest.mark.parametrize("bits", [8, 11])
def test_dpf_backends_bit_identical(bits):
    alpha = torch.randint(0, 1 << bits, (64,))
    roots = (_blocks(64), _blocks(64))
    by_table = dpf.gen(alpha, bits, roots, "table")
    by_openssl = dpf.gen(alpha, bits, roots, "cryptography")
    for a, b in zip(by_table, by_openssl):
        for name, t in a.tensors().items():
            assert torch.equal(t, b.tensors()[name]), name
    x = torch.randint(0, 1 << bits, (64,))
    for key in by_table:  # keys made by one backend evaluate identically on the other
        assert torch.equal(dpf.eval_greater(key, x, "table"), dpf.eval_greater(key, x, "cryptography"))
        assert torch.equal(dpf.eval_all(key, "table"), dpf.eval_all(key, "cryptography"))


def test_one_key_reveals_nothing_obvious():
    bits = 10
    alpha = torch.full((200,), 321)
    k0, k1 = _keys(alpha, bits)
    j0, _ = _keys(alpha, bits)
    onehot = torch.zeros(1 << bits, dtype=torch.uint8)
    onehot[321] = 1
    shares = dpf.eval_all(k0)
    assert not any(torch.equal(row, onehot) for row in shares)  # no share equals the secret
    assert not torch.equal(shares, dpf.eval_all(j0))  # shares of the same point differ across keys
    assert 0.4 < shares.double().mean() < 0.6  # and look uniform
    assert not torch.equal(k0.cw_seed, j0.cw_seed)


def test_dpf_refuses_bad_domain():
    with pytest.raises(ValueError):
        _keys(torch.tensor([256]), 8)
    with pytest.raises(ValueError):
        _keys(torch.tensor([0]), 0)
    k0, _ = _keys(torch.tensor([3, 4]), 8)
    with pytest.raises(ValueError):
        dpf.eval_point(k0, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("width", list(range(1, 65)))
def test_packing_every_width(width):
    for count in (0, 1, 63, 1001):
        v = PRG.fresh().ring((count,))
        v = v if width == 64 else v & ((1 << width) - 1)
        words = pack(v, width)
        assert words.numel() == (count * width + 63) // 64
        assert torch.equal(unpack(words, width, (count,)), v)


def _key_bytes(records, header=None):
    writer = KeyWriter(None, header or {"key_id": "k1", "party": 0})
    for r in records:
        writer.put(r)
    return writer.close()


def test_key_file_roundtrip_and_reuse(tmp_path):
    path = tmp_path / "key-0.bin"
    writer = KeyWriter(path, {"key_id": "abc", "party": 0, "program": "bert/128"})
    a, b = torch.arange(6).view(2, 3), torch.tensor([1, 2], dtype=torch.uint8)
    writer.put(a)
    writer.put(b)
    writer.close()
    ledger = tmp_path / "used"
    reader = KeyReader(path, expect={"party": 0, "program": "bert/128"}, ledger=ledger)
    assert torch.equal(reader.take((2, 3)), a)
    assert torch.equal(reader.take((2,), torch.uint8), b)
    reader.finish()
    assert not path.exists()  # a used key is deleted
    # a copy of the same key is refused
    writer = KeyWriter(path, {"key_id": "abc", "party": 0, "program": "bert/128"})
    writer.close()
    with pytest.raises(KeyReuseError):
        KeyReader(path, ledger=ledger)


def test_key_file_faults(tmp_path):
    data = _key_bytes([torch.arange(10)])
    seeded = _key_bytes([torch.arange(10)], {"key_id": "k1", "party": 0, "seed": "00" * 16})
    at = seeded.index(b'"seed": "') + len(b'"seed": "')
    with pytest.raises(CorruptKeyError, match="header"):  # still valid hex: only the CRC sees it
        KeyReader(seeded[:at] + b"1" + seeded[at + 1:])
    with pytest.raises(CorruptKeyError):
        KeyReader(data[:-20]).take((10,))  # truncated
    with pytest.raises(CorruptKeyError):
        KeyReader(b"not a key at all")
    with pytest.raises(KeyMismatchError):
        KeyReader(data, expect={"party": 1})  # another party's key
    with pytest.raises(KeyMismatchError):
        KeyReader(data).take((11,))  # another program's shapes
    reader = KeyReader(data)
    with pytest.raises(KeyMismatchError):
        reader.finish()  # records left over
    reader = KeyReader(data)
    reader.take((10,))
    with pytest.raises(KeyMismatchError):
        reader.take((10,))  # the program wants more than the key holds
    with pytest.raises(CorruptKeyError):
        KeyReader(tmp_path / "missing.bin")


def test_limb_matmul_is_exact_on_every_fss_ring():
    from hf_secure.protocols.fss.core import limb_matmul

    mask = (1 << 51) - 1
    for shape_a, shape_b in (((3, 7, 300), (3, 300, 5)), ((16, 3072), (3072, 8))):
        a, b = PRG.fresh().ring(shape_a), PRG.fresh().ring(shape_b)
        assert torch.equal(limb_matmul(a, b) & mask, torch.matmul(a, b) & mask)


def test_key_file_is_private_and_a_flipped_bit_is_caught(tmp_path):
    path = tmp_path / "key.bin"
    writer = KeyWriter(path, {"key_id": "k2", "party": 0})
    writer.put(torch.arange(1000))
    writer.close()
    assert path.stat().st_mode & 0o777 == 0o600
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # inside the record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptKeyError, match="digest"):
        KeyReader(path).take((1000,))
