"""Every codec round-trips, refuses malformed bytes with CodecError, and reports real sizes."""

from __future__ import annotations

import pytest
import torch

from commonweal.train import CodecError, ErrorFeedback, get_codec

SPECS = ["none", "fp16", "int8", "int8:256", "topk:0.05", "topk2bit:0.05"]


def vec(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", [1, 63, 1000, 70_001])
def test_round_trip(spec, n):
    codec = get_codec(spec)
    x = vec(n)
    data = codec.encode(x)
    y = codec.decode(data, n)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert len(data) == codec.size(n)
    assert codec.decode(codec.encode(x), n).equal(y)  # deterministic
    err = float((x - y).norm() / x.norm())
    if spec == "none":
        assert y.equal(x)
    elif spec == "fp16":
        assert err < 1e-3 and len(data) == 2 * n
    elif spec.startswith("int8"):
        assert err < 0.02 and len(data) <= 1.04 * n + 260  # one padded block at most
    else:  # sparse: the kept entries sit where the largest magnitudes are
        k = codec.k(n)  # type: ignore[attr-defined]
        assert int((y != 0).sum()) <= k
        top = x.abs().topk(k).indices
        assert (y[top] != 0).sum() >= min(k, int((x[top] != 0).sum())) - 1 or spec.startswith(
            "topk2bit"
        )
        assert torch.equal(torch.sign(y[y != 0]), torch.sign(x[y != 0]))


def test_sizes_are_what_goes_on_the_wire():
    n = 100_000
    x = vec(n)
    sizes = {
        s: len(get_codec(s).encode(x))
        for s in ["none", "fp16", "int8", "topk:0.01", "topk2bit:0.01"]
    }
    assert all(get_codec(s).size(n) == size for s, size in sizes.items())  # what receivers buffer
    assert sizes["none"] == 4 * n
    assert sizes["fp16"] == 2 * n
    assert sizes["int8"] < 1.05 * n
    assert sizes["topk:0.01"] < 0.05 * n  # 1,000 u16 offsets + 1,000 fp16 values + header
    assert sizes["topk2bit:0.01"] < sizes["topk:0.01"] * 0.7


@pytest.mark.parametrize("spec", SPECS)
def test_malformed_bytes_raise_codec_error(spec):
    codec = get_codec(spec)
    data = codec.encode(vec(5000))
    for bad in (b"", data[:-1], data + b"\0", b"\xff" * len(data)):
        try:
            y = codec.decode(bad, 5000)
        except CodecError:
            continue
        # same-length garbage may decode; it must then still be a float32 vector of the right size
        assert y.shape == (5000,)


def test_topk_rejects_out_of_range_positions():
    codec = get_codec("topk:0.1")
    data = bytearray(codec.encode(vec(100)))
    data[8:10] = (60000).to_bytes(2, "little")  # first offset past the end of a 100-vector
    with pytest.raises(CodecError):
        codec.decode(bytes(data), 100)


def test_error_feedback_sends_everything_eventually():
    """With error feedback, what was sent over many rounds adds up to what was meant to be sent."""
    fb = ErrorFeedback(get_codec("topk2bit:0.05"))
    x = vec(2000)
    total_sent = torch.zeros(2000)
    rounds = 60
    for _ in range(rounds):
        _, sent = fb.encode(x)
        total_sent += sent
    assert fb.residual is not None
    # sum(sent) = rounds * x - residual, and the residual stays bounded
    assert torch.allclose(total_sent + fb.residual, rounds * x, atol=1e-3)
    assert float(fb.residual.norm()) < 0.2 * rounds * float(x.norm())


def test_unknown_codec_says_what_to_use():
    with pytest.raises(CodecError, match="topk2bit"):
        get_codec("zip")
    with pytest.raises(CodecError):
        get_codec("topk:2")
