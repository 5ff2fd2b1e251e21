"""test_bt.py: the project's tests, against independent references (dense float64 / integer torch, pure PyTorch).

    make test                      # CPU: Triton kernels run in the interpreter (TRITON_INTERPRET=1)
    python -m pytest -q test_bt.py # on a CUDA machine: the same tests on the compiled kernels
"""
import os
import shutil

# the interpreter must be chosen before triton is first imported (it is read when @triton.jit decorates)
if not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest
import torch

import bt_kernel
import bt_quant
from bt_kernel import (TernaryGemmFunction, TernaryLinearTriton, pack_bitplanes, pack_im2col,
                       ternary_gemm_reference, ternary_gemm_triton, unpack_bitplanes)
from bt_quant import TernaryConv2d, TernaryLinear

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def rand_trits(*shape, gen=None):
    return torch.randint(-1, 2, shape, dtype=torch.int8, generator=gen).to(DEVICE)


def int_sums(a, w):
    """(Sp, Sn) in int64: Sp = sum a [w = +1], Sn = sum a [w = -1]."""
    a = a.long().cpu()
    w = w.long().cpu()
    return a @ (w == 1).long().T, a @ (w == -1).long().T


# -----------------------------------------------------------------------------
# pack


@pytest.mark.parametrize("R,K", [(1, 1), (3, 31), (5, 32), (7, 33), (2, 1000), (33, 65)])
def test_pack_roundtrip_int8(R, K):
    x = rand_trits(R, K)
    pos, neg = pack_bitplanes(x)
    assert pos.dtype == torch.uint32 and pos.shape == (R, math.ceil(K / 32))
    assert torch.equal(unpack_bitplanes(pos, neg, K), x)
    assert not bool(((pos.view(torch.int32) & neg.view(torch.int32)) != 0).any())   # planes never overlap


def test_pack_layout_bit_by_bit():
    # column 32*w + j is bit j of word w; +1 in pos, -1 in neg
    x = torch.zeros(2, 40, dtype=torch.int8)
    x[0, 0], x[0, 33], x[1, 31], x[1, 39] = 1, -1, -1, 1
    pos, neg = pack_bitplanes(x.to(DEVICE))
    assert pos.cpu().view(torch.int32).tolist() == [[1, 0], [0, 1 << 7]]
    assert neg.cpu().view(torch.int32).tolist() == [[0, 1 << 1], [-2 ** 31, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_float_threshold(dtype):
    x = torch.randn(9, 70).to(DEVICE, dtype)
    pos, neg = pack_bitplanes(x, threshold=0.5)
    want = (x.float() > 0.5).to(torch.int8) - (x.float() < -0.5).to(torch.int8)
    assert torch.equal(unpack_bitplanes(pos, neg, 70), want)
    thr = torch.rand(9, device=DEVICE)                       # one threshold per row
    pos, neg = pack_bitplanes(x, threshold=thr)
    want = (x.float() > thr[:, None]).to(torch.int8) - (x.float() < -thr[:, None]).to(torch.int8)
    assert torch.equal(unpack_bitplanes(pos, neg, 70), want)


def test_pack_noncontiguous():
    x = rand_trits(40, 12).T                                  # [12, 40], strides (1, 12)
    pos, neg = pack_bitplanes(x)
    assert torch.equal(unpack_bitplanes(pos, neg, 40), x)


def test_pack_im2col_matches_unfold():
    x = torch.randn(2, 3, 9, 8, device=DEVICE)
    (pos, neg), (OH, OW) = pack_im2col(x, 3, stride=2, padding=1, threshold=0.3)
    cols = torch.nn.functional.unfold(x, 3, stride=2, padding=1).transpose(1, 2).reshape(-1, 27)
    assert (OH, OW) == (5, 4)
    assert torch.equal(unpack_bitplanes(pos, neg, 27), bt_quant.ternarize(cols, 0.3).to(torch.int8))
    img = torch.randint(0, 256, (2, 1, 10, 10), dtype=torch.uint8, device=DEVICE)
    planes, _ = pack_im2col(img, 5)
    cols = torch.nn.functional.unfold(img.double(), 5).transpose(1, 2).reshape(-1, 25).long()
    for b in range(8):
        assert torch.equal(unpack_bitplanes(planes[b], torch.zeros_like(planes[b]), 25).long(), (cols >> b) & 1)


# -----------------------------------------------------------------------------
# GEMM against integer and float64 references

SHAPES = [(1, 1, 1), (1, 7, 31), (3, 1, 32), (5, 9, 33), (2, 3, 1000), (37, 45, 100), (65, 33, 64), (1, 70, 97)]
CONFIGS = [None, ("tile", dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=2, num_warps=4)),
           ("gemv", dict(BLOCK_M=4, BLOCK_N=16, BLOCK_K=4, num_warps=4)),
           ("tile", dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=2, SPLIT_K=3, num_warps=4)),
           ("gemv", dict(BLOCK_M=2, BLOCK_N=16, BLOCK_K=2, SPLIT_K=3, num_warps=4))]


@pytest.mark.parametrize("config", CONFIGS, ids=["auto", "tile", "gemv", "tile-splitk", "gemv-splitk"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_gemm_integer_sums_exact(M, N, K, config):
    a, w = rand_trits(M, K), rand_trits(N, K)
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w)
    sp, sn = int_sums(a, w)
    one, zero = torch.ones(N, device=DEVICE), torch.zeros(N, device=DEVICE)
    run = lambda alpha_p, alpha_n: bt_kernel._launch_gemm(ap[None], an[None], wp, wn, alpha_p, alpha_n, None, config)
    # alpha_n = 0 reads out Sp alone, alpha_p = 0 and alpha_n = -1 Sn alone; both are exact in float32.
    # Three calls in a row also check that split-K leaves its workspace zeroed for the next call.
    assert torch.equal(run(one, zero).cpu().long(), sp)
    assert torch.equal(run(zero, -one).cpu().long(), sn)
    assert torch.equal(run(one, None).cpu().long(), sp - sn)      # symmetric: 2 popcounts


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_gemm_scaled_matches_float64(M, N, K):
    a, w = rand_trits(M, K), rand_trits(N, K)
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w)
    alpha_p, alpha_n = torch.rand(N, device=DEVICE) + 0.1, torch.rand(N, device=DEVICE) + 0.1
    bias = torch.randn(N, device=DEVICE)
    weff = alpha_p.double()[:, None] * (w == 1) - alpha_n.double()[:, None] * (w == -1)
    ref = a.double() @ weff.T + bias.double()
    out = ternary_gemm_triton(ap, an, wp, wn, alpha_p, alpha_n, bias)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    ref_sym = a.double() @ (alpha_p.double()[:, None] * w.double()).T
    torch.testing.assert_close(ternary_gemm_triton(ap, an, wp, wn, alpha_p).double(), ref_sym, rtol=1e-6, atol=1e-6)


def test_gemm_bit_serial_pixels_exact():
    x = torch.randint(0, 256, (6, 57), dtype=torch.uint8, device=DEVICE)
    planes, _ = pack_im2col(x[:, :, None, None], 1)            # a 1x1 "conv" over 57 channels: rows = x
    w = rand_trits(5, 57)
    wp, wn = pack_bitplanes(w)
    sp, sn = int_sums(x, w)
    one, zero = torch.ones(5, device=DEVICE), torch.zeros(5, device=DEVICE)
    assert torch.equal(ternary_gemm_triton(planes, None, wp, wn, one, zero).cpu().long(), sp)
    assert torch.equal(ternary_gemm_triton(planes, None, wp, wn, zero, -one).cpu().long(), sn)
    assert torch.equal(ternary_gemm_triton(planes, None, wp, wn, one).cpu().long(), sp - sn)


def test_gemm_any_strides():
    a, w = rand_trits(9, 70), rand_trits(11, 70)
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w)
    alpha = torch.rand(11, device=DEVICE)
    ref = ternary_gemm_triton(ap, an, wp, wn, alpha)
    # row-major copies, and slices of wider buffers
    wide = torch.zeros(11, 7, dtype=torch.uint32, device=DEVICE)
    wide[:, 2:5] = wp
    wide_n = torch.zeros_like(wide)
    wide_n[:, 2:5] = wn
    out = ternary_gemm_triton(ap.contiguous(), an.contiguous(), wide[:, 2:5], wide_n[:, 2:5], alpha)
    assert torch.equal(out, ref)


def test_reference_helper_agrees():
    a, w = rand_trits(4, 40), rand_trits(3, 40)
    planes = [*pack_bitplanes(a), *pack_bitplanes(w)]
    alpha_p, alpha_n, bias = torch.rand(3, device=DEVICE), torch.rand(3, device=DEVICE), torch.randn(3, device=DEVICE)
    ref = ternary_gemm_reference(*planes, alpha_p, alpha_n, bias, K=40)
    torch.testing.assert_close(ternary_gemm_triton(*planes, alpha_p, alpha_n, bias).double(), ref, rtol=1e-6, atol=1e-6)


# -----------------------------------------------------------------------------
# quantizer rules


def test_channel_and_global_thresholds():
    w = torch.randn(6, 20)
    d = bt_kernel.ternary_thresholds(w, "channel", t=0.7)
    for c in range(6):
        assert math.isclose(d[c].item(), 0.7 * sum(abs(v) for v in w[c].tolist()) / 20, rel_tol=1e-5)
    assert torch.equal(bt_kernel.ternary_thresholds(w, "global", delta=0.05), torch.full((6,), 0.05))
    layer = TernaryLinear(20, 6, delta_rule="channel")
    trits = layer.ternary_weight()
    d = 0.7 * layer.weight.detach().abs().mean(1, keepdim=True)
    assert torch.equal(trits, ((layer.weight > d).to(torch.int8) - (layer.weight < -d).to(torch.int8)))
    with pytest.raises(ValueError, match="rule"):
        TernaryLinear(4, 4, delta_rule="median")


def test_alpha_init_from_weights():
    torch.manual_seed(1)
    for layer in (TernaryLinear(30, 5), TernaryConv2d(3, 4, 3), TernaryLinearTriton(30, 5)):
        w = layer.weight.detach().flatten(1)
        d = layer.thresholds()
        for c in range(w.shape[0]):
            above = [v for v in w[c].tolist() if v > d[c]]
            below = [-v for v in w[c].tolist() if v < -d[c]]
            assert math.isclose(layer.alpha_p[c].item(), sum(above) / len(above), rel_tol=1e-5)
            assert math.isclose(layer.alpha_n[c].item(), sum(below) / len(below), rel_tol=1e-5)
    w = torch.zeros(2, 4)
    w[0] = torch.tensor([0.5, 0.1, 0.1, 0.1])                # no negative weight past the threshold
    ap, an = bt_kernel.initial_alphas(w, torch.tensor([0.2, 0.2]))
    assert ap[0].item() == 0.5 and math.isclose(an[0].item(), 0.2, rel_tol=1e-6)   # fallback: mean|W_c|


def test_ternary_activation_ste():
    x = torch.tensor([-2.0, -0.9, -0.5, -0.2, 0.0, 0.3, 0.5, 0.51, 1.0, 1.5], requires_grad=True)
    y = bt_quant.ternary_activation(x, delta=0.5, clip=1.0)
    assert y.tolist() == [-1, -1, 0, 0, 0, 0, 0, 1, 1, 1]
    y.backward(torch.arange(10.0))
    assert x.grad.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]


def test_ternary_weight_ttq_grads():
    w = torch.tensor([[0.9, -0.8, 0.1, 1.5], [-0.3, 0.3, -2.0, 0.0]], requires_grad=True)
    ap = torch.tensor([2.0, 3.0], requires_grad=True)
    an = torch.tensor([4.0, 5.0], requires_grad=True)
    d = torch.tensor([0.5, 0.2])
    weff = bt_quant.ternary_weight(w, ap, an, d, clip=1.0)
    assert weff.tolist() == [[2, -4, 0, 2], [-5, 3, -5, 0]]
    g = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])
    weff.backward(g)
    assert ap.grad.tolist() == [1 + 4, 6]
    assert an.grad.tolist() == [-2, -(5 + 7)]
    # latent: alpha_p g above, g inside the dead zone, alpha_n g below; zero where |w| > clip
    assert w.grad.tolist() == [[2 * 1, 4 * 2, 3, 0], [5 * 5, 3 * 6, 0, 8]]


# -----------------------------------------------------------------------------
# autograd: the Triton path against the pure-PyTorch module


@pytest.mark.parametrize("bias,rule", [(True, "channel"), (False, "global")])
def test_triton_linear_matches_pytorch(bias, rule):
    torch.manual_seed(0)
    ref = TernaryLinear(45, 13, bias=bias, delta_rule=rule, delta=0.05).to(DEVICE)
    tri = TernaryLinearTriton(45, 13, bias=bias, delta_rule=rule, delta=0.05).to(DEVICE)
    with torch.no_grad():
        ref.weight.mul_(2.0)
        ref.weight[0, :5] = torch.tensor([1.5, -1.2, 0.9, -0.95, 3.0])   # some latent weights past the clip
        ref.init_alphas()
    tri.load_state_dict(ref.state_dict())                                  # same keys, no conversion
    assert list(ref.state_dict()) == list(tri.state_dict())
    x = (torch.randn(3, 7, 45) * 1.2).to(DEVICE)                           # |x| spans delta and clip
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yt = ref(xr), tri(xt)
    torch.testing.assert_close(yt, yr, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(yr)
    yr.backward(g)
    yt.backward(g)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(tri.named_parameters())[name].grad, p.grad, rtol=1e-5, atol=1e-5)


def test_conv_module_matches_unfold_linear():
    torch.manual_seed(2)
    conv = TernaryConv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    cols = torch.nn.functional.unfold(bt_quant.ternarize(x, 0.5), 3, padding=1)          # [B, 27, 36]
    weff = (conv.alpha_p[:, None] * (conv.ternary_weight().flatten(1) == 1)
            - conv.alpha_n[:, None] * (conv.ternary_weight().flatten(1) == -1)).double()
    ref = (weff @ cols.double()).view(2, 5, 6, 6)
    torch.testing.assert_close(conv(x).double(), ref, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# bad input: clear errors, never a wrong answer or a crash inside Triton


def test_bad_inputs_raise():
    a, w = rand_trits(4, 40), rand_trits(3, 40)
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w)
    alpha = torch.rand(3, device=DEVICE)
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        pack_bitplanes(torch.full((2, 5), 3, dtype=torch.int8, device=DEVICE))
    with pytest.raises(TypeError, match="int8 trits or a float"):
        pack_bitplanes(torch.zeros(2, 5, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="2-D"):
        pack_bitplanes(torch.zeros(2, 5, 3, dtype=torch.int8, device=DEVICE))
    with pytest.raises(ValueError, match="needs a threshold"):
        pack_bitplanes(torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match=">= 0"):
        pack_bitplanes(torch.zeros(2, 5, device=DEVICE), threshold=-1.0)
    with pytest.raises(ValueError, match="K >= 1"):
        pack_bitplanes(torch.zeros(2, 0, dtype=torch.int8, device=DEVICE))
    with pytest.raises(TypeError, match="torch.Tensor"):
        pack_bitplanes([[1, 0, -1]])
    with pytest.raises(TypeError, match="uint32"):
        ternary_gemm_triton(ap.view(torch.int32), an, wp, wn, alpha)
    with pytest.raises(ValueError, match="K words differ"):
        ternary_gemm_triton(ap, an, *pack_bitplanes(rand_trits(3, 70)), alpha)
    with pytest.raises(ValueError, match="2-D"):
        ternary_gemm_triton(ap[None], an, wp, wn, alpha)
    with pytest.raises(ValueError, match="differ in shape"):
        ternary_gemm_triton(ap, an[:2], wp, wn, alpha)
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        ternary_gemm_triton(ap, an, wp, wn, torch.rand(4, device=DEVICE))
    with pytest.raises(TypeError, match="float"):
        ternary_gemm_triton(ap, an, wp, wn, torch.ones(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="different devices"):
        ternary_gemm_triton(ap, an, wp, wn, alpha.to("meta"))
    with pytest.raises(ValueError, match="act_delta"):
        TernaryLinearTriton(4, 4, act_delta=None)
    with pytest.raises(ValueError, match="expected input"):
        TernaryLinearTriton(4, 4).to(DEVICE)(torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(TypeError, match="uint8"):
        pack_im2col(torch.zeros(1, 1, 5, 5, dtype=torch.int32, device=DEVICE), 3)
    with pytest.raises(ValueError, match="geometry"):
        pack_im2col(torch.zeros(1, 1, 2, 2, device=DEVICE), 3, threshold=0.5)
