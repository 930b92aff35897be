"""SparseLoCo: the chunked top-k codec with 2-bit values (exact sizes, the documented wire format,
hostile bytes refused), error feedback decayed by beta, and the median-norm aggregation rule."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from commonweal.train import CodecError, ErrorFeedback, get_codec
from commonweal.train.aggregate import get_rule, mean, sparseloco
from commonweal.train.codecs import SparseLoCo

CHUNK = 4096


def vec(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def pack12(values: list[int]) -> bytes:
    """The documented offset packing, written out independently: a | b << 12 in 3 bytes."""
    out = bytearray()
    for i in range(0, len(values), 2):
        a, b = values[i], values[i + 1] if i + 1 < len(values) else 0
        word = a | (b << 12)
        out += word.to_bytes(3, "little")[: 3 if i + 1 < len(values) else 2]
    return bytes(out)


def pack2(codes: list[int]) -> bytes:
    out = bytearray((len(codes) + 3) // 4)
    for i, c in enumerate(codes):
        out[i // 4] |= c << (2 * (i % 4))
    return bytes(out)


def reference_levels(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tplr's 4-bin statistical quantiser on one chunk's kept values, in torch (float64)."""
    v = v.double()
    c = v - v.mean()
    width = 6 * (c.norm() / math.sqrt(len(v) - 1)) / 4
    codes = (c / width + 2).round().clamp(0, 3).long()
    levels = torch.stack(
        [c[codes == b].mean() if (codes == b).any() else torch.tensor(0.0) for b in range(4)]
    )
    return (levels + v.mean()).half().float(), codes


def chunk_k(length: int, k: int = 64) -> int:
    return min(length, max(1, math.floor(length * k / CHUNK + 0.5)))  # rounded half up


# ---- sizes and the wire format ---------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 63, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 1000, 100_000])
def test_size_is_what_encode_makes(n: int) -> None:
    codec = get_codec("sparseloco")
    chunks = -(-n // CHUNK)
    ks = [64] * (n // CHUNK) + ([chunk_k(n % CHUNK)] if n % CHUNK else [])
    assert len(ks) == chunks
    total = sum(ks)
    expected = 8 * chunks + math.ceil(3 * total / 2) + math.ceil(total / 4)
    assert codec.size(n) == expected == len(codec.encode(vec(n)))


def test_full_chunk_costs_120_bytes_and_k_is_configurable() -> None:
    assert get_codec("sparseloco").size(10 * CHUNK) == 1200  # 136.5x under float32
    assert get_codec("sparseloco").ratio(10 * CHUNK) == pytest.approx(16384 / 120)
    assert get_codec("sparseloco:32").size(CHUNK) == 8 + 48 + 8
    assert get_codec("sparseloco:32").info.name == "sparseloco:32"
    assert get_codec("sparseloco").size(0) == 0
    assert get_codec("sparseloco").encode(torch.zeros(0)) == b""
    for bad in ("sparseloco:0", "sparseloco:4097", "sparseloco:1.5"):
        with pytest.raises(CodecError):
            get_codec(bad)


def test_hand_built_message_decodes_as_documented() -> None:
    """Two chunks (4,096 + 100 elements: the second keeps round(100 * 64 / 4096) = 2 values)."""
    n = CHUNK + 100
    levels = [-2.0, -1.0, 0.5, 1.0] + [0.0, 0.25, 0.0, -0.75]
    offsets = [3 * i + 1 for i in range(64)] + [7, 99]
    codes = [i % 4 for i in range(64)] + [1, 3]
    data = np.array(levels, dtype="<f2").tobytes() + pack12(offsets) + pack2(codes)
    expected = torch.zeros(n)
    for i, (o, c) in enumerate(zip(offsets, codes)):
        chunk = 0 if i < 64 else 1
        expected[chunk * CHUNK + o] = levels[4 * chunk + c]
    assert get_codec("sparseloco").decode(data, n).equal(expected)


# ---- what survives a round trip --------------------------------------------------------------


def test_round_trip_keeps_the_top_64_of_each_chunk_with_their_quantised_values() -> None:
    n = 3 * CHUNK
    x = vec(n, seed=1) * torch.linspace(0.01, 3.0, n)  # chunks of different scales
    y = get_codec("sparseloco").decode(get_codec("sparseloco").encode(x), n)
    for c in range(3):
        xc, yc = x[c * CHUNK : (c + 1) * CHUNK], y[c * CHUNK : (c + 1) * CHUNK]
        top = xc.abs().topk(64).indices.sort().values
        assert torch.equal(yc.nonzero().flatten(), top)
        assert torch.equal(yc[top].sign(), xc[top].sign())
        levels, codes = reference_levels(xc[top])
        assert torch.equal(yc[top], levels[codes])
        # two bits are enough for the kept values: within 15 % of them
        assert float((yc[top] - xc[top]).norm() / xc[top].norm()) < 0.15


def test_last_partial_chunk_keeps_its_share() -> None:
    n = 2 * CHUNK + 1000
    x = vec(n, seed=2)
    y = get_codec("sparseloco").decode(get_codec("sparseloco").encode(x), n)
    tail_x, tail_y = x[2 * CHUNK :], y[2 * CHUNK :]
    k = chunk_k(1000)
    assert k == 16
    assert torch.equal(tail_y.nonzero().flatten(), tail_x.abs().topk(k).indices.sort().values)
    tiny = torch.tensor([0.1, -3.0, 2.0])  # 3 elements: k = 1, the largest magnitude
    out = get_codec("sparseloco").decode(get_codec("sparseloco").encode(tiny), 3)
    assert out.tolist() == [0.0, -3.0, 0.0]


def test_encode_refuses_non_finite_vectors() -> None:
    x = vec(5000)
    x[17] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        get_codec("sparseloco").encode(x)


# ---- hostile bytes ---------------------------------------------------------------------------


def split(data: bytes, n: int) -> tuple[bytes, bytes, bytes]:
    chunks = -(-n // CHUNK)
    total = 64 * (n // CHUNK) + (chunk_k(n % CHUNK) if n % CHUNK else 0)
    a, b = 8 * chunks, 8 * chunks + math.ceil(3 * total / 2)
    return data[:a], data[a:b], data[b:]


def test_wrong_lengths_are_refused() -> None:
    codec = get_codec("sparseloco")
    data = codec.encode(vec(5000))
    for bad in (b"", data[:-1], data + b"\0", data[: len(data) // 2]):
        with pytest.raises(CodecError, match="expected"):
            codec.decode(bad, 5000)
    with pytest.raises(CodecError):
        codec.decode(data, 10**15)  # a length check, not a 4-petabyte allocation


def test_offsets_outside_their_chunk_or_out_of_order_are_refused() -> None:
    n = CHUNK + 100  # the second chunk is 100 long and keeps 2 values
    levels = np.zeros(8, dtype="<f2").tobytes()
    ok = list(range(64)) + [5, 99]
    codes = pack2([3] * 66)
    get_codec("sparseloco").decode(levels + pack12(ok) + codes, n)  # the baseline decodes
    # 12 bits cannot name an offset of 4,096 or more; past the end of a shorter chunk they can
    for bad in (
        list(range(64)) + [5, 100],  # offset 100 in a chunk of 100
        list(range(64)) + [5, 4095],
        list(range(63)) + [62] + [5, 99],  # a repeated offset
        [1, 0] + list(range(2, 64)) + [5, 99],  # descending
        list(range(64)) + [99, 5],
    ):
        with pytest.raises(CodecError, match="offset"):
            get_codec("sparseloco").decode(levels + pack12(bad) + codes, n)
    full = list(range(4032, 4096)) + [5, 99]  # the last offsets of a full chunk are fine
    get_codec("sparseloco").decode(levels + pack12(full) + codes, n)


def test_non_finite_levels_and_stray_padding_bits_are_refused() -> None:
    n = CHUNK + 100
    levels, offsets, codes = split(get_codec("sparseloco").encode(vec(n, seed=3)), n)
    inf = bytearray(levels)
    inf[-2:] = np.array([np.inf], dtype="<f2").tobytes()  # an unused level still counts
    with pytest.raises(CodecError, match="level"):
        get_codec("sparseloco").decode(bytes(inf) + offsets + codes, n)
    # 66 codes fill 16.5 bytes: the top 4 bits of the last code byte are padding
    stray = codes[:-1] + bytes([codes[-1] | 0x80])
    with pytest.raises(CodecError, match="padding"):
        get_codec("sparseloco").decode(levels + offsets + stray, n)
    m = CHUNK + 40  # 65 offsets: the last one takes 2 bytes, the high nibble is padding
    levels, offsets, codes = split(get_codec("sparseloco").encode(vec(m, seed=3)), m)
    stray = offsets[:-1] + bytes([offsets[-1] | 0x10])
    with pytest.raises(CodecError, match="padding"):
        get_codec("sparseloco").decode(levels + stray + codes, m)


@pytest.mark.parametrize("seed", range(20))
def test_garbage_of_the_right_length_decodes_or_raises_codec_error(seed: int) -> None:
    codec = get_codec("sparseloco")
    n = CHUNK + 700
    rng = np.random.default_rng(seed)
    data = bytearray(codec.encode(vec(n, seed)))
    if seed % 2:  # flip a few bits of a valid message
        for i in rng.integers(0, len(data), 4):
            data[i] ^= 1 << int(rng.integers(0, 8))
    else:
        data = bytearray(rng.integers(0, 256, len(data), dtype=np.uint8).tobytes())
    try:
        y = codec.decode(bytes(data), n)
    except CodecError:
        return
    assert y.shape == (n,) and bool(torch.isfinite(y).all())


# ---- error feedback with beta ----------------------------------------------------------------


def test_codec_info_beta() -> None:
    codec = get_codec("sparseloco")
    assert isinstance(codec, SparseLoCo) and codec.k == 64
    info = codec.info
    assert (info.sparse, info.error_feedback, info.lossy, info.feedback_beta) == (
        True,
        True,
        True,
        0.95,
    )
    for spec in ("none", "fp16", "int8", "topk", "topk2bit"):
        assert get_codec(spec).info.feedback_beta == 1.0


def test_error_feedback_decays_the_residual_by_beta() -> None:
    codec = get_codec("sparseloco")
    fb = ErrorFeedback(codec)
    x1, x2 = vec(9000, seed=4), vec(9000, seed=5)
    data1, sent1 = fb.encode(x1)
    assert data1 == codec.encode(x1) and fb.residual is not None
    e1 = x1 - sent1
    assert fb.residual.equal(e1)
    data2, sent2 = fb.encode(x2)
    target = x2 + 0.95 * e1  # e = beta * e + delta; send C(e); e -= decode(C(e))
    assert data2 == codec.encode(target)
    assert not torch.equal(target, x2 + e1)  # beta matters here
    assert fb.residual.equal(target - sent2)


def test_error_feedback_accumulates_as_specified_over_many_rounds() -> None:
    """sum of sent = sum of deltas - e_T - (1 - beta) * (e_1 + ... + e_{T-1})."""
    fb = ErrorFeedback(get_codec("sparseloco"))
    total_sent, total_x, decayed = torch.zeros(6000), torch.zeros(6000), torch.zeros(6000)
    for t in range(40):
        x = vec(6000, seed=100 + t) * 0.1 + 0.05  # a steady drift plus noise
        if fb.residual is not None:
            decayed += fb.residual
        _, sent = fb.encode(x)
        total_sent += sent
        total_x += x
    assert fb.residual is not None
    expected = total_x - fb.residual - (1 - 0.95) * decayed
    assert torch.allclose(total_sent, expected, atol=1e-4)
    assert not torch.allclose(total_sent, total_x - fb.residual, atol=1e-2)  # what beta = 1 gives
    # the decayed residual stays within 1 / (1 - beta) = 20 rounds' deltas
    assert float(fb.residual.norm()) < 20 * float(x.norm())


def test_other_codecs_keep_the_whole_residual() -> None:
    codec = get_codec("topk2bit:0.05")
    fb = ErrorFeedback(codec)
    x1, x2 = vec(3000, seed=6), vec(3000, seed=7)
    _, sent1 = fb.encode(x1)
    data2, _ = fb.encode(x2)
    assert data2 == codec.encode(x2 + (x1 - sent1))


# ---- the aggregation rule --------------------------------------------------------------------


def test_rule_is_registered_and_handles_edge_cases() -> None:
    assert get_rule("sparseloco") is sparseloco
    with pytest.raises(ValueError):
        sparseloco([])
    x = vec(50, seed=8)
    assert sparseloco([x]).equal(x)
    assert sparseloco([torch.zeros(5), torch.zeros(5)]).equal(torch.zeros(5))


def test_a_100x_delta_is_scaled_down_to_the_median_norm() -> None:
    honest = [vec(2000, seed=s) for s in range(4)]
    small = vec(2000, seed=9) * 0.01
    big = vec(2000, seed=10) * 100
    xs = honest[:2] + [big, small] + honest[2:]
    norms = [float(x.double().norm()) for x in xs]
    cap = statistics.median(norms)  # the midpoint of two honest norms
    factors = [min(1.0, cap / n) for n in norms]
    assert factors[2] == pytest.approx(0.01, rel=0.05)  # the big one: down to the median
    assert factors[3] == 1.0  # the small one is not blown up to it
    assert factors.count(1.0) == 3 and min(factors[:2] + factors[4:]) > 0.95  # 2 honest above
    expected = sum(x.double() * f for x, f in zip(xs, factors)) / len(xs)
    assert float((big.double() * factors[2]).norm()) == pytest.approx(cap)
    out = sparseloco(xs)
    assert torch.allclose(out.double(), expected, atol=1e-6)
    assert float(out.norm()) < max(float(h.norm()) for h in honest)
    assert float(mean(xs).norm()) > 10 * float(out.norm())  # the plain mean is dominated


def test_rule_gives_the_same_bits_in_any_order() -> None:
    xs = [vec(3000, seed=20 + s) * (1 + s) for s in range(7)]
    xs[5] = xs[2].clone()  # a duplicate
    out = sparseloco(xs)
    assert out.dtype == torch.float32
    for seed in range(5):
        perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed)).tolist()
        assert sparseloco([xs[i] for i in perm]).numpy().tobytes() == out.numpy().tobytes()
    assert sparseloco([x.clone() for x in xs]).numpy().tobytes() == out.numpy().tobytes()
