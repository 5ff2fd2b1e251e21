"""bt_kernel.py: multiply-free balanced ternary GEMMs in Triton (bitplanes, AND + popcount).

Needs only torch and triton: copy this file alone into another project.

    from bt_kernel import pack_bitplanes, ternary_gemm_triton
    a_pos, a_neg = pack_bitplanes(x, threshold=0.5)   # float [M, K]: ternarize and pack in one pass
    w_pos, w_neg = pack_bitplanes(w_trits)            # int8 [N, K] in {-1, 0, +1}
    y = ternary_gemm_triton(a_pos, a_neg, w_pos, w_neg, alpha_p, alpha_n, bias)   # float32 [M, N]

    # inference chains: a conv on channel-packed maps, pooled, ternarized and packed for the next layer
    a_pos, a_neg = ternary_conv_packed(a_pos, a_neg, *pack_conv_weight(w_trits_4d), alpha_p, alpha_n, bias,
                                       kernel_size=5, pool=2, threshold=0.5)

Which kernel runs for a shape: choose_kernel(M, N, KW, gpu_spec(device)). From 4 activation rows up, on
sm_80 and later, the single-bit MMA of the tensor cores; 1 to 3 rows, the GEMV on the CUDA cores' POPC.
8-bit activations (ternary_gemm_int8): choose_int8_kernel(M, N, K, gpu_spec(device)); up to 2 rows a
bit-serial GEMV on the CUDA cores' POPC, more on the int8 tensor cores.
On the CPU the kernels run under Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported.

Contents, in the order data flows: popcount helpers; pack kernels; GEMM kernels (tile, GEMV, MMA,
bit-serial MMA; int8 rows by trits on the int8 tensor cores or bit-serially, the int8 row quantizer); dispatch
(choose_kernel, choose_int8_kernel); launch (one launcher for every popcount GEMM kernel, the pack
launchers); the public API; the weight quantizer rules; the layer's forward (custom operators
bt_kernel::pack_rows, ::gemm and ::gemm_int8 that torch.compile places in its graphs,
and the same sums in torch ops for CPUs without the kernels); autograd and TernaryLinearTriton. Without
triton installed the file still imports: the layer runs its torch path on the CPU and a kernel launch
raises.

Packed layout
-------------
A ternary matrix T [R, K] becomes two uint32 bitplanes `pos` and `neg`, each of shape [R, KW],
KW = ceil(K / 32):
    bit j of pos[r, w] is 1  iff  T[r, 32 * w + j] == +1
    bit j of neg[r, w] is 1  iff  T[r, 32 * w + j] == -1
Bit 0 is the least significant bit. Padding columns (32 * KW > K) are 0 in both planes and no bit is
ever set in both planes. The shape is logical; the memory order is free (any strides are accepted).
pack_bitplanes stores the words row-major (K words contiguous, each row padded with zero words to a
16-byte boundary: the planes are views [R, KW] of that storage): the MMA kernel and the GEMVs load 16-byte
runs of a row. With k_major=True it stores them K-word-major (a contiguous [KW, R] tensor,
returned transposed as [R, KW]), the tile kernel's layout: it loads, at each K step, one word for every
row of its tile, and consecutive rows are then consecutive addresses. Unsigned integers (8-bit pixels) are packed
bit-serially: planes [BITS, R, KW], plane b holding bit b of every value.

The GEMM
--------
    C[m, n] = sum_k A[m, k] * Weff[n, k] + bias[n],   Weff = alpha_p[n] [W = +1] - alpha_n[n] [W = -1]
With Sp = sum_k A[m, k] [W[n, k] = +1] and Sn = sum_k A[m, k] [W[n, k] = -1], C = alpha_p Sp - alpha_n Sn + bias.
Per pair of 32-trit words, since the pos and neg planes never overlap:
    NZ  = (ap | an) & (bp | bn)           products not 0                       one LOP3 (bp | bn: once a weight word)
    NEG = NZ & (an ^ bn)                  products equal to -1 (signs differ)  one LOP3
    P3  = popc(ap & (bp | bn))            a = +1 against a nonzero weight      one LOP3
    Sp = P3 - popc(NEG),  Sn = P3 - popc(NZ) + popc(NEG)     3 popcounts for learned asymmetric scales (TTQ)
    Sp - Sn = popc(NZ ^ NEG) - popc(NEG)                     2 popcounts when alpha_n is None (one scale)
(The textbook form, popc((ap & bp) | (an & bn)) - popc((ap & bn) | (an & bp)), needs two LOP3 a word for
each of its 4-input terms: 4 instead of 3 with one scale, 5 instead of 3 with TTQ scales. The GEMVs keep
it with one scale, where it measured faster.)
Bit-serial A (an = 0): Sp = popc(ap & bp), Sn = popc(ap & bn), shifted left by the bit's weight.
With CSA (tile kernel, and the GEMV's row loop), the product words of three K steps go through a
carry-save adder first, popc(x) + popc(y) + popc(z) = popc(x ^ y ^ z) + 2 popc(maj(x, y, z)): 2
popcounts for 3 words.
On sm_80 and later, from 4 rows, the MMA kernel counts popc(A AND B) on the tensor cores instead
(mma.sync m16n8k256 .b1 .and.popc), four plane products per [16 x 8] tile and 256 trits (section below).

Channel-packed maps (inference)
-------------------------------
A map of trits [B, H, W, C] is the matrix [B*H*W, C] packed and seen as [B, H, W, CW]. A conv reads
its patches straight from it (implicit GEMM): K words in (ky, kx, channel word) order, the order of
pack_conv_weight. ternary_conv_packed can max-pool, ternarize and pack in its epilogue, so the next
layer's input is again such a map and no float activation is ever written.
The sums are int32. The epilogue is float64 and every product in it is exact (a float32 scale times an
integer below 2^29), so the output, rounded once to float32, does not depend on FMA contraction: the
numpy path of bt_infer.py reproduces it bit for bit.

The popcount is a SWAR sequence on uint32: exact in the interpreter (libdevice.popc is not), and
compiled to one POPC instruction per word on sm_90 (on int32 the shifts are arithmetic and it is not).
"""
import functools
import math
import os
import re
from typing import NamedTuple, Optional

import torch
import torch.nn as nn


class _NoTriton:
    """Stands in for triton and triton.language where triton is not installed (it installs on Linux only):
    the kernels below are then defined as plain functions and never launched (_need_triton raises first),
    so the thresholds, the packers' torch path and the layers' CPU path still work."""
    constexpr = object

    @staticmethod
    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)

    @staticmethod
    def cdiv(a, b):
        return -(-a // b)

    @staticmethod
    def next_power_of_2(n):
        return 1 << max(0, int(n) - 1).bit_length()


try:
    import triton
    import triton.language as tl
    _NO_TRITON = None
except ImportError as e:
    triton = tl = _NoTriton()
    _NO_TRITON = e

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _need_triton():
    if _NO_TRITON is not None:
        raise RuntimeError(f"the popcount kernels need triton ({_NO_TRITON}); pip install triton (Linux), or use "
                           "the PyTorch layers (bt_quant.TernaryLinear, TernaryConv2d), which run without it")

# -----------------------------------------------------------------------------
# popcount


@triton.jit
def popc(x):
    # x: uint32. Logical shifts on uint32 are what lets the compiler see a popcount (POPC).
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _trit_products(ap, an, wp, wn, SYMMETRIC: tl.constexpr, NZ_FORM: tl.constexpr):
    """(Sp, Sn) of broadcast word pairs (module docstring); with SYMMETRIC, (Sp - Sn, 0) from 2 popcounts.
    NZ_FORM: through the nonzero and negative masks (fewer LOP3), else the textbook form (one scale only;
    the GEMV's one-scale loop measured faster with it, below)."""
    if SYMMETRIC and not NZ_FORM:
        sp = popc((ap & wp) | (an & wn)) - popc((ap & wn) | (an & wp))
        sn = tl.zeros_like(sp)
    else:
        w_nz = wp | wn                  # shared by every row that reads this weight word (CSE)
        nz = (ap | an) & w_nz           # products != 0
        neg = nz & (an ^ wn)            # products == -1
        if SYMMETRIC:   # not popc(nz) - 2 popc(neg): LLVM folds the 2x into the popcount and loses POPC
            sp = popc(nz ^ neg) - popc(neg)
            sn = tl.zeros_like(sp)
        else:
            p3 = popc(ap & w_nz)
            p_neg = popc(neg)
            sp, sn = p3 - p_neg, p3 - popc(nz) + p_neg
    return sp, sn


@triton.jit
def _csa(x, y, z):
    """Carry-save adder on words: popc(x) + popc(y) + popc(z) = popc(s) + 2 popc(c), in 2 LOP3, no popcount."""
    u = x ^ y
    return u ^ z, (x & y) | (u & z)


@triton.jit
def _trit_products3(ap0, an0, wp0, wn0, ap1, an1, wp1, wn1, ap2, an2, wp2, wn2, SYMMETRIC: tl.constexpr,
                    NZ_FORM: tl.constexpr):
    """_trit_products of three K steps, Harley-Seal style: each product word of the three steps goes
    through a carry-save adder first, so 2 popcounts count 3 words (6 per 3 word pairs instead of 9 with
    TTQ scales, 4 instead of 6 with one scale). Returns (Sp, Sn, Cp, Cn): the sums are Sp + 2 Cp, Sn + 2 Cn."""
    if SYMMETRIC and not NZ_FORM:   # +1 products against -1 products, textbook form
        s1, c1 = _csa((ap0 & wp0) | (an0 & wn0), (ap1 & wp1) | (an1 & wn1), (ap2 & wp2) | (an2 & wn2))
        s2, c2 = _csa((ap0 & wn0) | (an0 & wp0), (ap1 & wn1) | (an1 & wp1), (ap2 & wn2) | (an2 & wp2))
    else:
        z0, z1, z2 = wp0 | wn0, wp1 | wn1, wp2 | wn2
        nz0, nz1, nz2 = (ap0 | an0) & z0, (ap1 | an1) & z1, (ap2 | an2) & z2        # products != 0
        ng0, ng1, ng2 = nz0 & (an0 ^ wn0), nz1 & (an1 ^ wn1), nz2 & (an2 ^ wn2)   # products == -1
        if SYMMETRIC:   # +1 products against -1 products
            s1, c1 = _csa(nz0 ^ ng0, nz1 ^ ng1, nz2 ^ ng2)
            s2, c2 = _csa(ng0, ng1, ng2)
        else:
            s2, c2 = _csa(ng0, ng1, ng2)
            s1, c1 = _csa(nz0, nz1, nz2)
            s3, c3 = _csa(ap0 & z0, ap1 & z1, ap2 & z2)   # a = +1 on a nonzero weight
    if SYMMETRIC:
        zero = tl.zeros_like(popc(s1))
        sp, sn, cp, cn = popc(s1) - popc(s2), zero, popc(c1) - popc(c2), zero
    else:
        q3, r3 = popc(s3), popc(c3)
        n3, m3 = popc(s2), popc(c2)
        sp, sn, cp, cn = q3 - n3, q3 - popc(s1) + n3, r3 - m3, r3 - popc(c1) + m3
    return sp, sn, cp, cn


@triton.jit
def _gdc_wait():
    # programmatic dependent launch: wait until the kernel before this one has finished and its writes are visible
    tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gdc_launch_dependents():
    # ... and let the kernel after this one be scheduled now: its programs wait in _gdc_wait until this one ends
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def _gdc_enter(PDL: tl.constexpr):
    # under PDL: let the next kernel be scheduled now, then wait for the previous one to finish before touching
    # memory. Memory order stays that of plain launches, and the launch gaps between short kernels overlap (each
    # kernel's own wait keeps the next one from reading its output early). Waiting first measured slower
    if PDL:
        _gdc_launch_dependents()
        _gdc_wait()


@triton.jit
def _l2_prefetch(ptrs, mask):
    # bring the 128-byte lines at ptrs into L2 (a hint: always safe, even before _gdc_wait, since L2 is where
    # the writes of the kernel before this one land)
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; } // $0",
                              "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


# -----------------------------------------------------------------------------
# pack: ternarize (or take bits of) a tensor and pack it into uint32 bitplanes, im2col on the fly


@triton.jit
def _pack_kernel(
    # pointers
    x_ptr,                        # source, viewed as [B, C, H, W] (a matrix [R, K] is B=R, C=K, H=W=1)
    thr_ptr,                      # per-row thresholds [R] (MODE 2)
    pos_ptr, neg_ptr,             # outputs [BITS, R, KW] uint32 (neg unused in MODE 3)
    # sizes
    R, K, KW,
    OH, OW, KH, KWD, H, W,        # im2col geometry: output map, kernel, input map
    conv_stride, pad,
    threshold,                    # scalar threshold (MODE 1)
    # strides (elements)
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_pbit, stride_pr, stride_pk,
    # meta-parameters
    MODE: tl.constexpr,           # 0: int8 trits; 1: float > threshold; 2: float > thr[row]; 3: unsigned bits
    BITS: tl.constexpr,           # planes written in MODE 3
    IM2COL: tl.constexpr,         # rows are (b, oy, ox), columns (c, ky, kx) of a conv patch
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
    PDL: tl.constexpr = False,    # launched with programmatic dependent launch (sm_90+), as the GEMMs after it
):
    _gdc_enter(PDL)
    pid_r = tl.program_id(0)
    pid_w = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    lane = tl.arange(0, 32)
    r3 = r[:, None, None]
    k3 = (w[:, None] * 32 + lane[None, :])[None, :, :]          # [1, BLOCK_W, 32]
    valid = (r3 < R) & (k3 < K)
    if IM2COL:
        b = r3 // (OH * OW)
        oy = (r3 // OW) % OH
        ox = r3 % OW
        c = k3 // (KH * KWD)
        ky = (k3 // KWD) % KH
        kx = k3 % KWD
        iy = oy * conv_stride + ky - pad
        ix = ox * conv_stride + kx - pad
        valid = valid & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)   # zero padding reads as 0
        offs = b * stride_xb + c * stride_xc + iy * stride_xh + ix * stride_xw
    else:
        offs = r3 * stride_xb + k3 * stride_xc
    x = tl.load(x_ptr + offs, mask=valid, other=0)
    shift = lane.to(tl.uint32)[None, None, :]
    out = r[:, None] * stride_pr + w[None, :] * stride_pk
    out_mask = (r[:, None] < R) & (w[None, :] < KW)
    if MODE == 3:
        xu = x.to(tl.uint32)
        for bit in tl.static_range(BITS):
            # bits within a word are disjoint, so the sum is an OR
            word = tl.sum(((xu >> bit) & 1) << shift, axis=2)
            tl.store(pos_ptr + bit * stride_pbit + out, word, mask=out_mask)
    else:
        if MODE == 0:
            is_pos = x == 1
            is_neg = x == -1
        elif MODE == 1:
            xf = x.to(tl.float32)
            is_pos = xf > threshold
            is_neg = xf < -threshold
        else:
            t = tl.load(thr_ptr + r3, mask=r3 < R, other=0.0)
            xf = x.to(tl.float32)
            is_pos = xf > t
            is_neg = xf < -t
        pos = tl.sum(is_pos.to(tl.uint32) << shift, axis=2)
        neg = tl.sum(is_neg.to(tl.uint32) << shift, axis=2)
        tl.store(pos_ptr + out, pos, mask=out_mask)
        tl.store(neg_ptr + out, neg, mask=out_mask)


@triton.jit
def _pack_trits4_kernel(
    # pointers
    x_ptr,                        # int8 trits [R, K], K % 4 == 0, read as int32 words of 4 trits [R, K / 4]
    pos_ptr, neg_ptr,             # outputs [R, KW] uint32
    # sizes
    R, K4, KW,
    # strides (elements: int32 words of x, uint32 words of the planes)
    stride_xr, stride_pr, stride_pk,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
    PDL: tl.constexpr = False,    # as in _pack_kernel
):
    # MODE 0 of _pack_kernel with a quarter of the work per trit: one load, flag tests and bit gathering
    # for 4 trits at once, and a sum over 8 nibbles per output word instead of over 32 bits
    _gdc_enter(PDL)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    q = tl.arange(0, 8)
    r3 = r[:, None, None]
    k3 = (w[:, None] * 8 + q[None, :])[None, :, :]                 # [1, BLOCK_W, 8] int32 word of x
    x = tl.load(x_ptr + r3 * stride_xr + k3, mask=(r3 < R) & (k3 < K4), other=0).to(tl.uint32, bitcast=True)
    # one trit per byte (little-endian: byte j of word i is trit 4i + j): +1 = 0x01 has bit 0 and not bit 7,
    # -1 = 0xFF has bit 7. The flags, at bits 0, 8, 16 and 24, gather into bits 28..31 of one multiply
    # (by 2^28 + 2^21 + 2^14 + 2^7: the other partial products land on distinct bits below 28 or past 31,
    # so nothing carries into the nibble), and a shift brings the nibble down.
    s7 = x >> 7
    p = ((x ^ s7) & x & 0x01010101) * 0x10204080 >> 28
    n = (s7 & 0x01010101) * 0x10204080 >> 28
    shift = (q * 4).to(tl.uint32)[None, None, :]
    pos = tl.sum(p << shift, axis=2)                                # disjoint nibbles: the sum is an OR
    neg = tl.sum(n << shift, axis=2)
    out = r[:, None] * stride_pr + w[None, :] * stride_pk
    out_mask = (r[:, None] < R) & (w[None, :] < KW)
    tl.store(pos_ptr + out, pos, mask=out_mask)
    tl.store(neg_ptr + out, neg, mask=out_mask)


@triton.jit
def _slice_rows_kernel(
    # pointers
    x_ptr,                        # uint8 images [B, C, H, W], W + 2 * pad <= 32
    rows_ptr,                     # output uint32 [B * C * H, 8]: bit (x + pad) of word p = bit p of pixel x
    # sizes
    ROWS, C, H, W, pad,
    # strides (elements)
    stride_xb, stride_xc, stride_xh, stride_xw,
    # meta-parameters
    BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)     # image row (b, c, y)
    lane = tl.arange(0, 32)
    y = r % H
    c = (r // H) % C
    b = r // (H * C)
    ok = (r < ROWS)[:, None] & (lane < W)[None, :]
    px = tl.load(x_ptr + (b * stride_xb + c * stride_xc + y * stride_xh)[:, None] + lane[None, :] * stride_xw,
                 mask=ok, other=0).to(tl.uint32)
    shift = (lane + pad).to(tl.uint32)[None, :]
    for bit in tl.static_range(8):
        word = tl.sum(((px >> bit) & 1) << shift, axis=1)
        tl.store(rows_ptr + r * 8 + bit, word, mask=r < ROWS)


@triton.jit
def _im2col_rows_kernel(
    # pointers
    rows_ptr,                     # uint32 [B * C * H, 8] from _slice_rows_kernel
    planes_ptr,                   # output [8, R, 1] uint32: the patch bits of pack_im2col (MODE 3, K <= 32)
    # sizes
    R, C, H, OH, OW, KH, KWD, conv_stride, pad,
    # strides (elements)
    stride_pbit, stride_pr,
    # meta-parameters
    BLOCK_R: tl.constexpr,
):
    # each patch word is KH * C row segments of KWD bits, cut from the sliced rows: the pixels' bits are
    # taken apart once per image row, not once per patch (25 times for a 5x5 kernel)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    plane = tl.arange(0, 8)
    b = r // (OH * OW)
    oy = (r // OW) % OH
    ox = r % OW
    seg = (1 << KWD) - 1
    acc = tl.zeros((BLOCK_R, 8), dtype=tl.uint32)
    for ck in range(C * KH):
        c = ck // KH
        iy = oy * conv_stride + ck % KH - pad
        ok = (r < R) & (iy >= 0) & (iy < H)                     # rows of vertical padding read as 0
        row = tl.load(rows_ptr + ((b * C + c) * H + iy)[:, None] * 8 + plane[None, :], mask=ok[:, None], other=0)
        acc |= ((row >> (ox * conv_stride).to(tl.uint32)[:, None]) & seg) << (ck * KWD)
    tl.store(planes_ptr + plane[None, :] * stride_pbit + r[:, None] * stride_pr, acc, mask=(r < R)[:, None])


@triton.jit
def _gather_patches_kernel(
    # pointers
    map_pos_ptr, map_neg_ptr,     # packed maps [B, H, W, CW] uint32, trits (any strides)
    out_pos_ptr, out_neg_ptr,     # patch planes [M, KW]: K-word-major (the tile kernel's) or row-major (the MMA's)
    # sizes
    M, KW,
    KWS,                          # words written a row: KW, then zeros up to the row-major planes' padding
    # strides (elements)
    stride_mb, stride_my, stride_mx, stride_mc,
    stride_om, stride_ok,
    # meta-parameters: the conv's geometry is compiled in (its divisions become multiplications)
    OH: tl.constexpr, OW: tl.constexpr, KX: tl.constexpr, CW: tl.constexpr, CONV_STRIDE: tl.constexpr,
    POOL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ROWS_FIRST: tl.constexpr,     # row-major planes: K words fastest, so that stores run along a row
):
    # rows in the implicit GEMM's order (pooling windows of consecutive rows), K words in (ky, kx, cw) order.
    # The block's fastest dimension is the planes' contiguous one: rows of K-word-major planes, K words of
    # row-major ones (conv2 into row-major planes on [128 rows x 8 words] with rows fastest: 550 us, stores
    # 52 words apart; K words fastest on [32 x 64]: 112)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    b, oy, ox = _conv_rows(tl.program_id(0) * BLOCK_R, offs_r, M, OH, OW, POOL)
    tap = offs_k // CW
    row_src = b * stride_mb + oy * CONV_STRIDE * stride_my + ox * CONV_STRIDE * stride_mx
    k_src = (tap // KX) * stride_my + (tap % KX) * stride_mx + (offs_k % CW) * stride_mc
    m = tl.program_id(0) * BLOCK_R + offs_r
    if ROWS_FIRST:
        src = row_src[:, None] + k_src[None, :]
        m2, k2 = m[:, None], offs_k[None, :]
    else:
        src = row_src[None, :] + k_src[:, None]
        m2, k2 = m[None, :], offs_k[:, None]
    ok = (k2 < KW) & (m2 < M)
    dst = k2 * stride_ok + m2 * stride_om
    out_ok = (k2 < KWS) & (m2 < M)
    tl.store(out_pos_ptr + dst, tl.load(map_pos_ptr + src, mask=ok, other=0), mask=out_ok)
    tl.store(out_neg_ptr + dst, tl.load(map_neg_ptr + src, mask=ok, other=0), mask=out_ok)


# -----------------------------------------------------------------------------
# GEMM: two kernels, one for tiles of many rows (outer products, one K word a step) and one for
# few rows (a [BLOCK_K, BLOCK_N] block of weight words a step: many bytes in flight for the GEMV case).
# Both can split K across programs when the output has too few tiles to fill the GPU: partial int32
# sums meet in a workspace through atomics, and the last program of a tile applies the epilogue
# (integer sums add in any order, so the result stays deterministic).


@triton.jit
def _split_range(total, STEP: tl.constexpr, SPLIT_K: tl.constexpr):
    # [lo, hi) of `total`, in whole steps, for split program_id(2) of SPLIT_K (some may get nothing)
    lo, hi = 0, total
    if SPLIT_K > 1:
        per = tl.cdiv(tl.cdiv(total, SPLIT_K), STEP) * STEP
        lo = tl.program_id(2) * per
        hi = tl.minimum(total, lo + per)
    return lo, hi


@triton.jit
def _split_sums(acc_p, acc_n, ws, plane, mask, lock, SYMMETRIC: tl.constexpr, SPLIT_K: tl.constexpr):
    # split-K: the partial int32 sums meet in the workspace (Sn `plane` words after Sp) through atomics;
    # the block's last program takes the totals and leaves zeros for the next call. (last, acc_p, acc_n)
    tl.atomic_add(ws, acc_p, mask=mask)
    if not SYMMETRIC:
        tl.atomic_add(ws + plane, acc_n, mask=mask)
    tl.debug_barrier()
    last = tl.atomic_add(lock, 1) == SPLIT_K - 1
    if last:
        acc_p = tl.atomic_xchg(ws, tl.zeros_like(acc_p), mask=mask)
        if not SYMMETRIC:
            acc_n = tl.atomic_xchg(ws + plane, tl.zeros_like(acc_n), mask=mask)
        tl.atomic_xchg(lock, 0)
    return last, acc_p, acc_n


@triton.jit
def _finish(acc_p, acc_n, offs_m, offs_n, tile, alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, c_neg_ptr, ws_ptr,
            lock_ptr, M, N, stride_cm, stride_cn, threshold,
            SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
            PACK_OUT: tl.constexpr, POOL: tl.constexpr):
    last = True
    if SPLIT_K > 1:
        last, acc_p, acc_n = _split_sums(acc_p, acc_n, ws_ptr + offs_m[:, None] * N + offs_n[None, :], M * N,
                                         (offs_m[:, None] < M) & (offs_n[None, :] < N), lock_ptr + tile,
                                         SYMMETRIC, SPLIT_K)
    if last:
        _epilogue(acc_p, acc_n, offs_m, offs_n, alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, c_neg_ptr, M, N,
                  stride_cm, stride_cn, threshold, SYMMETRIC, HAS_BIAS, PACK_OUT, POOL)


@triton.jit
def _epilogue(acc_p, acc_n, offs_m, offs_n, alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, c_neg_ptr, M, N,
              stride_cm, stride_cn, threshold,
              SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, PACK_OUT: tl.constexpr, POOL: tl.constexpr):
    n_mask = offs_n < N
    # float64 with exact products (float32 scale x int32 sum): the result does not depend on FMA contraction
    ap = tl.load(alpha_p_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float64)
    c = ap[None, :] * acc_p.to(tl.float64)
    if not SYMMETRIC:
        an = tl.load(alpha_n_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float64)
        c = c - an[None, :] * acc_n.to(tl.float64)
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float64)[None, :]
    c = c.to(tl.float32)
    rows = offs_m
    if POOL > 1:
        # max-pool windows of POOL*POOL consecutive rows (the IMPLICIT row order)
        c = tl.max(tl.reshape(c, (c.shape[0] // (POOL * POOL), POOL * POOL, c.shape[1])), axis=1)
        rows = tl.max(tl.reshape(offs_m, (c.shape[0], POOL * POOL)), axis=1) // (POOL * POOL)
    row_ok = rows < M // (POOL * POOL)
    if not PACK_OUT:
        c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, c, mask=row_ok[:, None] & n_mask[None, :])
    else:
        # the next layer's input, never written as floats: ternarize at `threshold` (in float32, as the
        # pack kernel compares) and pack 32 channels per word
        lane = (offs_n % 32).to(tl.uint32)[None, :]
        pos = ((c > threshold) & n_mask[None, :]).to(tl.uint32) << lane
        neg = ((c < -threshold) & n_mask[None, :]).to(tl.uint32) << lane
        pos = tl.sum(tl.reshape(pos, (c.shape[0], c.shape[1] // 32, 32)), axis=2)   # disjoint bits: sum = OR
        neg = tl.sum(tl.reshape(neg, (c.shape[0], c.shape[1] // 32, 32)), axis=2)
        words = tl.max(tl.reshape(offs_n, (c.shape[1] // 32, 32)), axis=1) // 32
        out = rows[:, None] * stride_cm + words[None, :] * stride_cn
        out_mask = row_ok[:, None] & (words[None, :] < tl.cdiv(N, 32))
        tl.store(c_ptr + out, pos, mask=out_mask)
        tl.store(c_neg_ptr + out, neg, mask=out_mask)


@triton.jit
def _conv_rows(m0, offs, M, OH, OW, POOL: tl.constexpr):
    """Output position (b, oy, ox) of GEMM rows m0 + offs (m0 a multiple of POOL^2), rows past M clamped to
    the last one (loads need no mask; stores are masked by the caller). With POOL > 1 rows run over pooling
    windows (b, py, px, dy, dx), so that each window is POOL*POOL consecutive rows of one tile. The window
    is m0 // POOL^2 + offs // POOL^2: a thread whose rows are one window divides once, not once a row
    (conv1 on [4 x 64] tiles, K = 1 word: 1128 to 864 SASS instructions a thread, for 128 POPC)."""
    if POOL > 1:
        PP: tl.constexpr = POOL * POOL
        win = tl.minimum(m0 // PP + offs // PP, M // PP - 1)
        j = offs % PP
        pw = OW // POOL
        ph = OH // POOL
        q = win // pw        # two divisions, the remainders by multiplication
        b = q // ph
        oy = (q - b * ph) * POOL + j // POOL
        ox = (win - q * pw) * POOL + j % POOL
    else:
        m = tl.minimum(m0 + offs, M - 1)
        oy = (m // OW) % OH
        ox = m % OW
        b = m // (OW * OH)
    return b, oy, ox


@triton.jit
def _load_trit_step(a_pos_ptrs, a_neg_ptrs, b_pos_ptrs, b_neg_ptrs, k, CW, KX, stride_ay, stride_ax, stride_ak,
                    stride_bk, IMPLICIT: tl.constexpr):
    """The words of K step k: ap, an [BLOCK_M, 1] and wp, wn [1, BLOCK_N]."""
    if IMPLICIT:   # K word k is (ky, kx, cw) of the patch
        tap = k // CW
        a_k = (tap // KX) * stride_ay + (tap % KX) * stride_ax + (k % CW) * stride_ak
    else:
        a_k = k * stride_ak
    return (tl.load(a_pos_ptrs + a_k)[:, None], tl.load(a_neg_ptrs + a_k)[:, None],
            tl.load(b_pos_ptrs + k * stride_bk)[None, :], tl.load(b_neg_ptrs + k * stride_bk)[None, :])


@triton.jit
def _ternary_gemm_kernel(
    # pointers
    a_pos_ptr, a_neg_ptr,         # activations [A_BITS, M, KW] uint32 (a_neg unused when BIT_SERIAL);
                                  # IMPLICIT: packed maps [A_BITS, B, H, W, CW] read as conv patches
    b_pos_ptr, b_neg_ptr,         # weights [N, KW] uint32 (IMPLICIT: K words in (ky, kx, cw) order)
    alpha_p_ptr, alpha_n_ptr,     # per-channel scales [N] float32
    bias_ptr,                     # [N] float32
    c_ptr, c_neg_ptr,             # output float32 [M, N]; PACK_OUT: pos, neg planes [M / POOL^2, ceil(N / 32)]
    ws_ptr, lock_ptr,             # split-K workspace: int32 [2, M, N] and one counter per tile, all zero
    # sizes
    M, N, KW,
    OH, OW,                       # IMPLICIT: rows are conv output positions (b, oy, ox) of OH x OW maps
    KX, CW,                       # IMPLICIT: kernel width, words per map position (K words = KH * KX * CW)
    conv_stride,
    threshold,                    # PACK_OUT: ternarize the output at this value
    # strides (elements)
    stride_abit, stride_ab, stride_ay, stride_ax, stride_ak,   # plain: stride_ab is the row stride of A
    stride_bn, stride_bk,
    stride_cm, stride_cn,
    # meta-parameters
    A_BITS: tl.constexpr,         # bitplanes of A (1 for trits)
    BIT_SERIAL: tl.constexpr,     # A holds unsigned A_BITS-bit ints, one plane per bit (a_neg unused); else trits
    SYMMETRIC: tl.constexpr,      # one scale per channel: 2 popcounts per word pair instead of 3
    HAS_BIAS: tl.constexpr,
    IMPLICIT: tl.constexpr,       # A rows are gathered conv patches of packed maps (implicit GEMM)
    POOL: tl.constexpr,           # IMPLICIT: 2 orders rows by 2x2 pooling windows (b, py, px, dy, dx)
    PACK_OUT: tl.constexpr,       # write ternarized, packed (and pooled) output instead of float32
    CSA: tl.constexpr,            # trits: 3 K words a step through carry-save adders (fewer popcounts)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # grouped ordering: GROUP_M row tiles share each weight tile while it is in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    k_per = tl.cdiv(KW, SPLIT_K)
    k_lo = tl.program_id(1) * k_per
    k_hi = min(KW, k_lo + k_per)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap out-of-range rows/columns onto valid ones: loads need no mask, the store is masked. A modulo, not a
    # clamp: Triton sees that x % M keeps runs of 4 contiguous where M is 16-divisible, and loads 4 rows' words
    # as one 16-byte vector
    am = offs_m % M
    bn = offs_n % N
    if IMPLICIT:   # conv rows: window math once per pooling window, not once a row
        b, oy, ox = _conv_rows(pid_m * BLOCK_M, tl.arange(0, BLOCK_M), M, OH, OW, POOL)
        a_row = b * stride_ab + (oy * stride_ay + ox * stride_ax) * conv_stride
    else:
        a_row = am * stride_ab
    acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_n = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    b_pos_ptrs = b_pos_ptr + bn * stride_bn
    b_neg_ptrs = b_neg_ptr + bn * stride_bn
    if BIT_SERIAL:
        for bit in tl.static_range(A_BITS):
            a_bit_ptrs = a_pos_ptr + bit * stride_abit + a_row
            part_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            part_n = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for k in range(k_lo, k_hi):
                ap, _, wp, wn = _load_trit_step(a_bit_ptrs, a_bit_ptrs, b_pos_ptrs, b_neg_ptrs, k, CW, KX,
                                                stride_ay, stride_ax, stride_ak, stride_bk, IMPLICIT)
                part_p += popc(ap & wp)
                part_n += popc(ap & wn)
            acc_p += part_p << bit
            acc_n += part_n << bit
    else:
        a_pos_ptrs = a_pos_ptr + a_row
        a_neg_ptrs = a_neg_ptr + a_row
        k_end = k_lo
        if CSA:
            k_end = k_lo + (k_hi - k_lo) // 3 * 3
            for k in range(k_lo, k_end, 3):   # three K words a step through carry-save adders
                ap0, an0, wp0, wn0 = _load_trit_step(a_pos_ptrs, a_neg_ptrs, b_pos_ptrs, b_neg_ptrs, k, CW, KX,
                                                     stride_ay, stride_ax, stride_ak, stride_bk, IMPLICIT)
                ap1, an1, wp1, wn1 = _load_trit_step(a_pos_ptrs, a_neg_ptrs, b_pos_ptrs, b_neg_ptrs, k + 1, CW, KX,
                                                     stride_ay, stride_ax, stride_ak, stride_bk, IMPLICIT)
                ap2, an2, wp2, wn2 = _load_trit_step(a_pos_ptrs, a_neg_ptrs, b_pos_ptrs, b_neg_ptrs, k + 2, CW, KX,
                                                     stride_ay, stride_ax, stride_ak, stride_bk, IMPLICIT)
                sp, sn, cp, cn = _trit_products3(ap0, an0, wp0, wn0, ap1, an1, wp1, wn1, ap2, an2, wp2, wn2,
                                                 SYMMETRIC, True)
                # straight into the accumulators (x + 2y is one LEA): separate carry sums cost 2 registers per
                # output and made Triton 3.8 spill at [16 x 128] tiles
                acc_p += sp + 2 * cp
                acc_n += sn + 2 * cn
        for k in range(k_end, k_hi):          # one K word a step (with CSA: the last K % 3)
            ap, an, wp, wn = _load_trit_step(a_pos_ptrs, a_neg_ptrs, b_pos_ptrs, b_neg_ptrs, k, CW, KX,
                                             stride_ay, stride_ax, stride_ak, stride_bk, IMPLICIT)
            sp, sn = _trit_products(ap, an, wp, wn, SYMMETRIC, True)
            acc_p += sp
            acc_n += sn
    if SYMMETRIC and BIT_SERIAL:
        acc_p = acc_p - acc_n
    _finish(acc_p, acc_n, offs_m, offs_n, pid, alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, c_neg_ptr, ws_ptr,
            lock_ptr, M, N, stride_cm, stride_cn, threshold, SYMMETRIC, HAS_BIAS, SPLIT_K, PACK_OUT, POOL)


@triton.jit
def _row_products(a_pos_ptrs, a_neg_ptrs, k_ok, wp, wn, SYMMETRIC: tl.constexpr):
    # one activation row's K words [BLOCK_K] against a weight block [BLOCK_K, BLOCK_N], broadcast along N.
    # The GEMVs take the nonzero/negative masks with TTQ scales only: with one scale the textbook form measured
    # faster in them, though the masks spend fewer LOP3 (PERFORMANCE.md)
    ap = tl.load(a_pos_ptrs, mask=k_ok, other=0)[:, None]
    an = tl.load(a_neg_ptrs, mask=k_ok, other=0)[:, None]
    return _trit_products(ap, an, wp, wn, SYMMETRIC, False)


@triton.jit
def _row_products3(a_pos_ptrs, a_neg_ptrs, step, wp0, wn0, wp1, wn1, wp2, wn2, SYMMETRIC: tl.constexpr):
    # _row_products over three K blocks `step` words apart (all in range), through carry-save adders
    ap0 = tl.load(a_pos_ptrs)[:, None]
    an0 = tl.load(a_neg_ptrs)[:, None]
    ap1 = tl.load(a_pos_ptrs + step)[:, None]
    an1 = tl.load(a_neg_ptrs + step)[:, None]
    ap2 = tl.load(a_pos_ptrs + 2 * step)[:, None]
    an2 = tl.load(a_neg_ptrs + 2 * step)[:, None]
    sp, sn, cp, cn = _trit_products3(ap0, an0, wp0, wn0, ap1, an1, wp1, wn1, ap2, an2, wp2, wn2, SYMMETRIC, False)
    return sp + 2 * cp, sn + 2 * cn


@triton.jit
def _gemv_row_sums(a_pos_ptr, a_neg_ptr, b_pos_ptr, b_neg_ptr, bn, m0, M, k_lo, k_hi, stride_am, stride_ak,
                   stride_bn, stride_bk, SYMMETRIC: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                   W_EVICT: tl.constexpr, STAGES: tl.constexpr, CSA: tl.constexpr):
    """(Sp, Sn) [ROWS, BLOCK_N] of activation rows m0.. (up to 4, modulo M) against the weight rows bn, over
    K words [k_lo, k_hi). Everything stays 2D [BLOCK_K, BLOCK_N]: the weight words are used in the layout
    they are loaded in (16-byte vectors, no shared-memory shuffle per step), each row's activation words
    broadcast along N, and every row reuses the weight block from registers (not from L2). With CSA, three
    K blocks a step go through carry-save adders (2 popcounts per product word instead of 3), and the
    K % (3 BLOCK_K) words left over take the plain loop."""
    offs_k = tl.arange(0, BLOCK_K)
    b_offs = offs_k[:, None] * stride_bk + bn[None, :] * stride_bn
    a0 = (m0 % M) * stride_am
    a1 = ((m0 + 1) % M) * stride_am
    a2 = ((m0 + 2) % M) * stride_am
    a3 = ((m0 + 3) % M) * stride_am
    zero = tl.zeros((BLOCK_K, bn.shape[0]), dtype=tl.int32)
    p0, n0, p1, n1, p2, n2, p3, n3 = zero, zero, zero, zero, zero, zero, zero, zero
    k_mid = k_lo
    if CSA:
        k_mid = k_lo + (k_hi - k_lo) // (3 * BLOCK_K) * (3 * BLOCK_K)
        wstep = BLOCK_K * stride_bk
        astep = BLOCK_K * stride_ak
        for k0 in tl.range(k_lo, k_mid, 3 * BLOCK_K, num_stages=STAGES):
            # every word of the three blocks is in range: no masks
            wptr_p = b_pos_ptr + k0 * stride_bk + b_offs
            wptr_n = b_neg_ptr + k0 * stride_bk + b_offs
            wp0 = tl.load(wptr_p, eviction_policy=W_EVICT)
            wn0 = tl.load(wptr_n, eviction_policy=W_EVICT)
            wp1 = tl.load(wptr_p + wstep, eviction_policy=W_EVICT)
            wn1 = tl.load(wptr_n + wstep, eviction_policy=W_EVICT)
            wp2 = tl.load(wptr_p + 2 * wstep, eviction_policy=W_EVICT)
            wn2 = tl.load(wptr_n + 2 * wstep, eviction_policy=W_EVICT)
            a_offs = (k0 + offs_k) * stride_ak
            sp, sn = _row_products3(a_pos_ptr + a0 + a_offs, a_neg_ptr + a0 + a_offs, astep,
                                    wp0, wn0, wp1, wn1, wp2, wn2, SYMMETRIC)
            p0, n0 = p0 + sp, n0 + sn
            if ROWS > 1:
                sp, sn = _row_products3(a_pos_ptr + a1 + a_offs, a_neg_ptr + a1 + a_offs, astep,
                                        wp0, wn0, wp1, wn1, wp2, wn2, SYMMETRIC)
                p1, n1 = p1 + sp, n1 + sn
            if ROWS > 2:
                sp, sn = _row_products3(a_pos_ptr + a2 + a_offs, a_neg_ptr + a2 + a_offs, astep,
                                        wp0, wn0, wp1, wn1, wp2, wn2, SYMMETRIC)
                p2, n2 = p2 + sp, n2 + sn
                sp, sn = _row_products3(a_pos_ptr + a3 + a_offs, a_neg_ptr + a3 + a_offs, astep,
                                        wp0, wn0, wp1, wn1, wp2, wn2, SYMMETRIC)
                p3, n3 = p3 + sp, n3 + sn
    for k0 in tl.range(k_mid, k_hi, BLOCK_K, num_stages=STAGES):
        k_ok = (k0 + offs_k) < k_hi                  # words past the range load as 0 and add nothing
        # the weights first (from DRAM), then the activation words (L2 hits). With one row nobody re-reads a
        # weight word: evict_first keeps the stream from pushing the activations out of L2; with more rows the
        # other rows' programs re-read it from L2
        wp = tl.load(b_pos_ptr + k0 * stride_bk + b_offs, mask=k_ok[:, None], other=0, eviction_policy=W_EVICT)
        wn = tl.load(b_neg_ptr + k0 * stride_bk + b_offs, mask=k_ok[:, None], other=0, eviction_policy=W_EVICT)
        a_offs = (k0 + offs_k) * stride_ak
        sp, sn = _row_products(a_pos_ptr + a0 + a_offs, a_neg_ptr + a0 + a_offs, k_ok, wp, wn, SYMMETRIC)
        p0, n0 = p0 + sp, n0 + sn
        if ROWS > 1:
            sp, sn = _row_products(a_pos_ptr + a1 + a_offs, a_neg_ptr + a1 + a_offs, k_ok, wp, wn, SYMMETRIC)
            p1, n1 = p1 + sp, n1 + sn
        if ROWS > 2:
            sp, sn = _row_products(a_pos_ptr + a2 + a_offs, a_neg_ptr + a2 + a_offs, k_ok, wp, wn, SYMMETRIC)
            p2, n2 = p2 + sp, n2 + sn
            sp, sn = _row_products(a_pos_ptr + a3 + a_offs, a_neg_ptr + a3 + a_offs, k_ok, wp, wn, SYMMETRIC)
            p3, n3 = p3 + sp, n3 + sn
    # reduce over K once, then place each row's sums in its row of [ROWS, BLOCK_N]
    row = tl.arange(0, ROWS)[:, None]
    acc_p = tl.where(row == 0, tl.sum(p0, axis=0)[None, :], 0)
    acc_n = tl.where(row == 0, tl.sum(n0, axis=0)[None, :], 0)
    if ROWS > 1:
        acc_p = tl.where(row == 1, tl.sum(p1, axis=0)[None, :], acc_p)
        acc_n = tl.where(row == 1, tl.sum(n1, axis=0)[None, :], acc_n)
    if ROWS > 2:
        acc_p = tl.where(row == 2, tl.sum(p2, axis=0)[None, :], acc_p)
        acc_n = tl.where(row == 2, tl.sum(n2, axis=0)[None, :], acc_n)
        acc_p = tl.where(row == 3, tl.sum(p3, axis=0)[None, :], acc_p)
        acc_n = tl.where(row == 3, tl.sum(n3, axis=0)[None, :], acc_n)
    return acc_p, acc_n


@triton.jit
def _ternary_gemv_kernel(
    # pointers
    a_pos_ptr, a_neg_ptr,         # activations [M, KW] uint32, trits
    b_pos_ptr, b_neg_ptr,         # weights [N, KW] uint32 (row-major suits BLOCK_M = 1 best)
    alpha_p_ptr, alpha_n_ptr, bias_ptr,
    c_ptr,
    ws_ptr, lock_ptr,             # split-K workspace, as above
    # sizes
    M, N, KW,
    # strides (elements)
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_cm, stride_cn,
    # meta-parameters
    SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,        # activation rows per program
    ROW_LOOP: tl.constexpr,       # BLOCK_M <= 4 rows one after another on 2D weight blocks; else 3D products
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,            # launched with programmatic dependent launch (sm_90+)
    ONE_ROW: tl.constexpr,        # M == 1: every weight word is read once
    STAGES: tl.constexpr,         # software pipelining depth of the 2D K loop
    CSA: tl.constexpr,            # 2D K loop: 3 K blocks a step through carry-save adders (fewer popcounts)
):
    _gdc_enter(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    am = offs_m % M
    bn = offs_n % N
    k_step: tl.constexpr = 3 * BLOCK_K if CSA else BLOCK_K   # splits of whole steps: no plain-loop leftovers
    k_per = tl.cdiv(tl.cdiv(KW, SPLIT_K), k_step) * k_step
    k_lo = tl.program_id(2) * k_per
    k_hi = max(k_lo, min(KW, k_lo + k_per))   # a split past the end is empty, never negative
    if ROW_LOOP:
        tl.static_assert(BLOCK_M == 1 or BLOCK_M == 2 or BLOCK_M == 4)
        acc_p, acc_n = _gemv_row_sums(a_pos_ptr, a_neg_ptr, b_pos_ptr, b_neg_ptr, bn, pid_m * BLOCK_M, M, k_lo, k_hi,
                                      stride_am, stride_ak, stride_bn, stride_bk, SYMMETRIC, BLOCK_M, BLOCK_K,
                                      "evict_first" if ONE_ROW else "", STAGES, CSA)
    else:
        tl.static_assert(not CSA, "CSA needs the 2D row loop (ROW_LOOP)")
        # accumulate elementwise and reduce over K once at the end: no cross-thread reduction per step
        offs_k = tl.arange(0, BLOCK_K)
        acc3_p = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.int32)
        acc3_n = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.int32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < k_hi
            a_offs = am[:, None] * stride_am + kk[None, :] * stride_ak
            b_offs = kk[:, None] * stride_bk + bn[None, :] * stride_bn
            ap = tl.load(a_pos_ptr + a_offs, mask=k_ok[None, :], other=0)[:, :, None]
            an = tl.load(a_neg_ptr + a_offs, mask=k_ok[None, :], other=0)[:, :, None]
            wp = tl.load(b_pos_ptr + b_offs, mask=k_ok[:, None], other=0)[None, :, :]
            wn = tl.load(b_neg_ptr + b_offs, mask=k_ok[:, None], other=0)[None, :, :]
            sp, sn = _trit_products(ap, an, wp, wn, SYMMETRIC, False)
            acc3_p += sp
            acc3_n += sn
        acc_p = tl.sum(acc3_p, axis=1)
        acc_n = tl.sum(acc3_n, axis=1)
    tile = pid_m * tl.num_programs(0) + pid_n
    _finish(acc_p, acc_n, offs_m, offs_n, tile, alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, c_ptr, ws_ptr,
            lock_ptr, M, N, stride_cm, stride_cn, 0.0, SYMMETRIC, HAS_BIAS, SPLIT_K, False, 1)


# -----------------------------------------------------------------------------
# the GEMM on the tensor cores' single-bit MMA (sm_80 and later)
#
# mma.sync m16n8k256 .b1 .and.popc: D[16, 8] = C + popc(A_row AND B_col) over 256 bits, int32, on the tensor
# cores, one warp at a time. The same AND + popcount as the CUDA-core kernels, at another rate: on an H200
# 0.39 MMAs per clock per SM (`make bench`), at 4 MMAs per 16 x 8 outputs x 256 trits 1650 ternary TOP/s
# over the card, 13 times the 2-popcount ceiling of the POPC unit. Per lane (g = lane // 4, t = lane % 4)
# one register each:
#     A: a0 row g, a1 row g + 8 (K bits 32 t ..), a2 row g, a3 row g + 8 (K bits 128 + 32 t ..)
#     B: b0 column g (K bits 32 t ..), b1 column g (K bits 128 + 32 t ..)
#     C: c0 (g, 2 t), c1 (g, 2 t + 1), c2 (g + 8, 2 t), c3 (g + 8, 2 t + 1)
# Triton has no such op: the kernel keeps every register of a fragment as a 1D tensor of 32 * WARPS
# elements, element i in lane i % 32 of warp i // 32 (Triton's layout for that size: one element a thread;
# the SASS report checks it), and issues the MMA as inline PTX. Which 32 K words of a row go in which
# register is free, as long as A and B agree: lane t takes words 4 t .. 4 t + 3 of every 16, one 16-byte
# load a row.


@triton.jit
def and_popc_mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, EMULATE: tl.constexpr):
    """One warp-wide m16n8k256 AND-popcount MMA per warp of the block (fragments above): (c0, .., c3) +=.
    EMULATE: the same sums from tensor ops (the interpreter runs no inline PTX)."""
    if EMULATE:
        W: tl.constexpr = a0.shape[0] // 32
        # [warp, row g, column, word t]: lane 4 g + t holds word t of row g and of column g
        rows_lo = popc(tl.reshape(a0, (W, 8, 1, 4)) & tl.reshape(b0, (W, 1, 8, 4))) \
            + popc(tl.reshape(a2, (W, 8, 1, 4)) & tl.reshape(b1, (W, 1, 8, 4)))
        rows_hi = popc(tl.reshape(a1, (W, 8, 1, 4)) & tl.reshape(b0, (W, 1, 8, 4))) \
            + popc(tl.reshape(a3, (W, 8, 1, 4)) & tl.reshape(b1, (W, 1, 8, 4)))
        lo_even, lo_odd = tl.split(tl.reshape(tl.sum(rows_lo, axis=3), (W, 8, 4, 2)))   # columns 2 t, 2 t + 1
        hi_even, hi_odd = tl.split(tl.reshape(tl.sum(rows_hi, axis=3), (W, 8, 4, 2)))
        return (c0 + tl.reshape(lo_even, c0.shape), c1 + tl.reshape(lo_odd, c0.shape),
                c2 + tl.reshape(hi_even, c0.shape), c3 + tl.reshape(hi_odd, c0.shape))
    else:
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
            "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
            "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
            [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)


@triton.jit
def _words4(ptr, offs, mask, kk=None, k_hi=None, ZERO_PAST: tl.constexpr = False):
    """A lane's 4 words [32 * WARPS, 4] as four fragment registers (ZERO_PAST: words kk >= k_hi read as 0)."""
    x = tl.load(ptr + offs, mask=mask, other=0)
    if ZERO_PAST:
        x = tl.where(kk < k_hi, x, 0)
    even, odd = tl.split(tl.reshape(x, (x.shape[0], 2, 2)))   # words 0, 2 and 1, 3
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    return w0, w1, w2, w3


@triton.jit
def _mma_step(pl, ph, nl, nh, wp, wn, acc, SYMMETRIC: tl.constexpr, EMULATE: tl.constexpr):
    """One n-tile's MMAs over 16 K words: pl, ph, nl, nh: A's pos and neg words of rows g and g + 8; wp, wn:
    B's of column g (4 registers each). acc: 4 accumulators of 4 registers.
    SYMMETRIC: acc0 = [ap | an] . [wp | wn] and acc1 = [ap | an] . [wn | wp] (the planes side by side in K,
    128 trits an MMA), Sp - Sn = acc0 - acc1. Else the four plane products over 256 trits an MMA,
    Sp = pp - np, Sn = pn - nn. Both 8 MMAs per 16 words."""
    a0, a1, a2, a3 = acc
    if SYMMETRIC:
        for j in tl.static_range(4):
            a0 = and_popc_mma(pl[j], ph[j], nl[j], nh[j], wp[j], wn[j], a0[0], a0[1], a0[2], a0[3], EMULATE)
            a1 = and_popc_mma(pl[j], ph[j], nl[j], nh[j], wn[j], wp[j], a1[0], a1[1], a1[2], a1[3], EMULATE)
    else:
        for j in tl.static_range(0, 4, 2):
            a0 = and_popc_mma(pl[j], ph[j], pl[j + 1], ph[j + 1], wp[j], wp[j + 1], a0[0], a0[1], a0[2], a0[3],
                               EMULATE)
            a1 = and_popc_mma(nl[j], nh[j], nl[j + 1], nh[j + 1], wp[j], wp[j + 1], a1[0], a1[1], a1[2], a1[3],
                               EMULATE)
            a2 = and_popc_mma(pl[j], ph[j], pl[j + 1], ph[j + 1], wn[j], wn[j + 1], a2[0], a2[1], a2[2], a2[3],
                               EMULATE)
            a3 = and_popc_mma(nl[j], nh[j], nl[j + 1], nh[j + 1], wn[j], wn[j + 1], a3[0], a3[1], a3[2], a3[3],
                               EMULATE)
    return a0, a1, a2, a3


@triton.jit
def _mma_lanes(lane, pid_m, pid_n, COL_WARPS: tl.constexpr, N_TILES: tl.constexpr):
    """Where a lane's fragments sit: its A row g (and g + 8) and its B column g of the first n-tile. Warps side
    by side in N, COL_WARPS of them; the warps past those repeat the columns."""
    g = lane % 32 // 4
    col0 = (pid_n * COL_WARPS + lane // 32 % COL_WARPS) * (8 * N_TILES)
    return pid_m * 16 + g, col0 + g


@triton.jit
def _mma_n_tile(pl, ph, nl, nh, b_pos_ptr, b_neg_ptr, b, ok, acc, SYMMETRIC: tl.constexpr, EMULATE: tl.constexpr):
    """Load one n-tile's B words (offsets b) and run its MMAs against A's registers."""
    return _mma_step(pl, ph, nl, nh, _words4(b_pos_ptr, b, ok), _words4(b_neg_ptr, b, ok), acc, SYMMETRIC, EMULATE)


@triton.jit
def _k_warp_sum(x, K_WARPS: tl.constexpr):
    """Sum a fragment register over the K_WARPS warps that split K (warp-major: shared memory, once a tile)."""
    if K_WARPS == 1:
        return x
    else:
        return tl.sum(tl.reshape(x, (K_WARPS, x.shape[0] // K_WARPS)), axis=0)


@triton.jit
def _tile_sums(acc, SYMMETRIC: tl.constexpr, K_WARPS: tl.constexpr):
    """One n-tile's (Sp, Sn) per fragment register, summed over the warps that split K (Sn unused if SYMMETRIC)."""
    sp = (_k_warp_sum(acc[0][0] - acc[1][0], K_WARPS), _k_warp_sum(acc[0][1] - acc[1][1], K_WARPS),
          _k_warp_sum(acc[0][2] - acc[1][2], K_WARPS), _k_warp_sum(acc[0][3] - acc[1][3], K_WARPS))
    if SYMMETRIC:
        return sp, sp
    else:
        sn = (_k_warp_sum(acc[2][0] - acc[3][0], K_WARPS), _k_warp_sum(acc[2][1] - acc[3][1], K_WARPS),
              _k_warp_sum(acc[2][2] - acc[3][2], K_WARPS), _k_warp_sum(acc[2][3] - acc[3][3], K_WARPS))
        return sp, sn


@triton.jit
def _n_tile_2d(x, CW: tl.constexpr):
    """One n-tile's 4 fragment registers [32 * CW] as a [16, CW, 8] tile: rows, warps, columns."""
    lo = tl.reshape(tl.join(x[0], x[1]), (CW, 8, 8))   # [warp, row g, column 2 t + (0, 1)]
    hi = tl.reshape(tl.join(x[2], x[3]), (CW, 8, 8))   # rows g + 8
    return tl.reshape(tl.permute(tl.join(lo, hi), (3, 1, 0, 2)), (16, CW, 8))


@triton.jit
def _fragments_2d(sums, which, N_TILES: tl.constexpr, CW: tl.constexpr):
    """Sp (which 0) or Sn (1) of all n-tiles as [16, CW * N_TILES * 8]: column (warp * N_TILES + h) * 8 + c."""
    t0 = _n_tile_2d(sums[0][which], CW)
    if N_TILES == 1:
        return tl.reshape(t0, (16, CW * 8))
    elif N_TILES == 2:
        x = tl.permute(tl.join(t0, _n_tile_2d(sums[1][which], CW)), (0, 1, 3, 2))   # [16, CW, h, 8]
        return tl.reshape(x, (16, CW * 16))
    else:
        x = tl.join(tl.join(t0, _n_tile_2d(sums[1][which], CW)),
                    tl.join(_n_tile_2d(sums[2][which], CW), _n_tile_2d(sums[3][which], CW)))   # [16, CW, 8, a, b]
        return tl.reshape(tl.permute(x, (0, 1, 4, 3, 2)), (16, CW * 32))   # h = 2 b + a


@triton.jit
def _ternary_mma_kernel(
    # pointers
    a_pos_ptr, a_neg_ptr,         # activations [M, KW] uint32, trits (K words contiguous suit it best)
    b_pos_ptr, b_neg_ptr,         # weights [N, KW] uint32 (row-major suits it best)
    alpha_p_ptr, alpha_n_ptr, bias_ptr,
    c_ptr,                        # [M, N] float32, or [M / POOL^2, ceil(N / 32)] uint32 pos words (PACK_OUT)
    c_neg_ptr,                    # neg words (PACK_OUT)
    ws_ptr, lock_ptr,             # split-K workspace, as in the tile kernel
    # sizes
    M, N, KW,
    threshold,                    # PACK_OUT: the output's ternary threshold
    # strides (elements)
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_cm, stride_cn,
    # meta-parameters
    SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    POOL: tl.constexpr,           # 2: max-pool windows of 4 consecutive rows (the conv's gathered patches)
    PACK_OUT: tl.constexpr,       # ternarize and pack the output (the tile kernel's epilogue, on a 2D tile)
    WARPS: tl.constexpr,          # = num_warps: each warp one [16 rows x 8 N_TILES columns] tile
    N_TILES: tl.constexpr,        # 1, 2 or 4 n-tiles of 8 columns a warp, sharing A's registers
    K_WARPS: tl.constexpr,        # warps sharing each tile, each taking 16 words of every 16 K_WARPS
    SPLIT_K: tl.constexpr,        # programs sharing each tile, each taking a K range (atomics)
    STAGES: tl.constexpr,         # software pipelining depth of the K loop
    ALIGNED: tl.constexpr,        # rows of A and B start on 16-byte boundaries, K words contiguous
    EMULATE: tl.constexpr,        # the interpreter: tensor ops in place of the MMA
    PDL: tl.constexpr = False,    # launched with programmatic dependent launch (sm_90+)
    PREFETCH: tl.constexpr = 0,   # K words of each of the program's weight rows prefetched into L2 at the start
):
    tl.static_assert(N_TILES == 1 or N_TILES == 2 or N_TILES == 4)
    tl.static_assert(WARPS % K_WARPS == 0)
    COL_WARPS: tl.constexpr = WARPS // K_WARPS
    # row tiles in the grid's second dimension, which holds 65535 of them: the launcher runs taller A in chunks
    # (one grid dimension divided into row and column tiles measured 15 to 22% slower)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    lane = tl.arange(0, 32 * WARPS)
    row_lo, col = _mma_lanes(lane, pid_m, pid_n, COL_WARPS, N_TILES)
    row_hi = row_lo + 8
    k_per = tl.cdiv(tl.cdiv(KW, SPLIT_K), 16) * 16
    k_lo = tl.program_id(2) * k_per
    k_hi = min(KW, k_lo + k_per)
    if PDL:
        _gdc_launch_dependents()
    if PREFETCH > 0:
        # request the program's weight rows from DRAM now, ahead of the pipeline (under PDL, while the kernel
        # before this one finishes: a prefetch only fills L2, see _l2_prefetch)
        pf_cols = pid_n * (COL_WARPS * 8 * N_TILES) + tl.arange(0, COL_WARPS * 8 * N_TILES)
        pf_k = tl.arange(0, 8) * 32
        pf_hi = min(k_hi, k_lo + PREFETCH)
        for k0 in range(k_lo, pf_hi, 256):
            kk = k0 + pf_k
            ok = (pf_cols < N)[:, None] & (kk < pf_hi)[None, :]
            offs = pf_cols[:, None] * stride_bn + kk[None, :] * stride_bk
            _l2_prefetch(b_pos_ptr + offs, ok)
            _l2_prefetch(b_neg_ptr + offs, ok)
    if PDL:
        _gdc_wait()
    # the lane's 4 words of every 16, in its warp's 16 of every 16 K_WARPS
    kq0 = 16 * (lane // (32 * COL_WARPS)) + 4 * (lane % 4)
    kq = kq0[:, None] + tl.arange(0, 4)[None, :]
    if ALIGNED:
        # Triton vectorizes only what it can prove: strides that are multiples of 4 words, and a K mask that
        # is constant over each lane's 4 words. Neither holds for a K of 50 words (K = 1600, conv2), where
        # every word was its own load (_row_words)
        stride_am = stride_am // 4 * 4
        stride_bn = stride_bn // 4 * 4
    z = tl.zeros(lane.shape, dtype=tl.int32)
    acc0 = ((z, z, z, z), (z, z, z, z), (z, z, z, z), (z, z, z, z))
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    for k0 in tl.range(k_lo, k_hi, 16 * K_WARPS, num_stages=STAGES):
        kk = k0 + kq
        if ALIGNED:
            # masked by whole 16-byte vectors: the words of A's last vector past the range are read, then
            # zeroed (B's words there meet zeros in the AND)
            k_ok = tl.broadcast_to((k0 + kq0 < k_hi)[:, None], kk.shape)
            a_lo = row_lo[:, None] * stride_am + kk
            a_hi = row_hi[:, None] * stride_am + kk
            b = col[:, None] * stride_bn + kk
        else:
            k_ok = kk < k_hi                          # words past the range load as 0 and add nothing
            a_lo = row_lo[:, None] * stride_am + kk * stride_ak
            a_hi = row_hi[:, None] * stride_am + kk * stride_ak
            b = col[:, None] * stride_bn + kk * stride_bk
        ok_lo = k_ok & (row_lo < M)[:, None]
        ok_hi = k_ok & (row_hi < M)[:, None]
        pl = _words4(a_pos_ptr, a_lo, ok_lo, kk, k_hi, ALIGNED)
        ph = _words4(a_pos_ptr, a_hi, ok_hi, kk, k_hi, ALIGNED)
        nl = _words4(a_neg_ptr, a_lo, ok_lo, kk, k_hi, ALIGNED)
        nh = _words4(a_neg_ptr, a_hi, ok_hi, kk, k_hi, ALIGNED)
        acc0 = _mma_n_tile(pl, ph, nl, nh, b_pos_ptr, b_neg_ptr, b, k_ok & (col < N)[:, None], acc0, SYMMETRIC,
                           EMULATE)
        if N_TILES >= 2:
            acc1 = _mma_n_tile(pl, ph, nl, nh, b_pos_ptr, b_neg_ptr, b + 8 * stride_bn,
                               k_ok & (col + 8 < N)[:, None], acc1, SYMMETRIC, EMULATE)
        if N_TILES == 4:
            acc2 = _mma_n_tile(pl, ph, nl, nh, b_pos_ptr, b_neg_ptr, b + 16 * stride_bn,
                               k_ok & (col + 16 < N)[:, None], acc2, SYMMETRIC, EMULATE)
            acc3 = _mma_n_tile(pl, ph, nl, nh, b_pos_ptr, b_neg_ptr, b + 24 * stride_bn,
                               k_ok & (col + 24 < N)[:, None], acc3, SYMMETRIC, EMULATE)
    # (Sp, Sn) of fragment register r of n-tile h: rows (g, g, g + 8, g + 8), columns 2 t + (0, 1, 0, 1) + 8 h,
    # on the lanes of the first COL_WARPS warps once the warps that split K are summed
    sums = (_tile_sums(acc0, SYMMETRIC, K_WARPS), _tile_sums(acc1, SYMMETRIC, K_WARPS),
            _tile_sums(acc2, SYMMETRIC, K_WARPS), _tile_sums(acc3, SYMMETRIC, K_WARPS))
    # the fragments as one [16, COL_WARPS * 8 * N_TILES] tile for the tile kernel's epilogue: split-K, pooling,
    # packing 32 columns a word, and float rows stored in 16-byte vectors (faster than a store a fragment
    # register: 4096x1024x1024 16.4 against 26.1 us on an H200)
    tl.static_assert(not PACK_OUT or (COL_WARPS * N_TILES) % 4 == 0)
    offs_m = pid_m * 16 + tl.arange(0, 16)
    offs_n = pid_n * (COL_WARPS * 8 * N_TILES) + tl.arange(0, COL_WARPS * 8 * N_TILES)
    _finish(_fragments_2d(sums, 0, N_TILES, COL_WARPS), _fragments_2d(sums, 1, N_TILES, COL_WARPS), offs_m, offs_n,
            pid_m * tl.num_programs(0) + pid_n, alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, c_neg_ptr, ws_ptr,
            lock_ptr, M, N, stride_cm, stride_cn, threshold, SYMMETRIC, HAS_BIAS, SPLIT_K, PACK_OUT, POOL)


@triton.jit
def _bitserial_n_tile(a0, a1, a2, a3, b_pos_ptr, b_neg_ptr, col, N, stride_bn, t, BITS: tl.constexpr,
                      SYMMETRIC: tl.constexpr, EMULATE: tl.constexpr):
    """One n-tile's (Sp, Sn) over bit-serial A (see the kernel): per plane q, from the top bit down, the
    weight word goes into K slot q of B (zeros elsewhere), so one MMA counts plane q alone, and the sums so
    far, doubled, ride in as its accumulator (Horner): 2 MMAs a plane."""
    ok = col < N
    wp = tl.load(b_pos_ptr + col * stride_bn, mask=ok, other=0)
    wn = tl.load(b_neg_ptr + col * stride_bn, mask=ok, other=0)
    z = tl.zeros(col.shape, dtype=tl.int32)
    none = tl.zeros(col.shape, dtype=tl.uint32)
    sp = (z, z, z, z)
    sn = (z, z, z, z)
    for i in tl.static_range(BITS):
        q = BITS - 1 - i   # a compile-time constant: static_range unrolls
        bp = tl.where(t == q % 4, wp, none)
        bn = tl.where(t == q % 4, wn, none)
        # slot q is in register b0 (slots 0..3) or b1 (4..7)
        p0, p1, n0, n1 = bp, none, bn, none
        if q >= 4:
            p0, p1, n0, n1 = none, bp, none, bn
        sp = and_popc_mma(a0, a1, a2, a3, p0, p1, sp[0] << 1, sp[1] << 1, sp[2] << 1, sp[3] << 1, EMULATE)
        sn = and_popc_mma(a0, a1, a2, a3, n0, n1, sn[0] << 1, sn[1] << 1, sn[2] << 1, sn[3] << 1, EMULATE)
    if SYMMETRIC:
        return (sp[0] - sn[0], sp[1] - sn[1], sp[2] - sn[2], sp[3] - sn[3]), sn
    else:
        return sp, sn


@triton.jit
def _bitserial_mma_kernel(
    # pointers
    a_ptr,                        # bit planes [BITS, B, H, W] of one-word patches (pack_im2col's pixels)
    b_pos_ptr, b_neg_ptr,         # weights [N] words (one K word)
    alpha_p_ptr, alpha_n_ptr, bias_ptr,
    c_ptr, c_neg_ptr,             # as in the MMA kernel
    # sizes
    M, N,
    threshold,
    # strides (elements; the map's y and x strides times the conv stride)
    stride_abit, stride_ab, stride_ay, stride_ax,
    stride_bn,
    stride_cm, stride_cn,
    # meta-parameters
    OH: tl.constexpr, OW: tl.constexpr,   # the output map: GEMM rows are its positions, pooling windows first
    BITS: tl.constexpr,           # planes of A, up to 8: one MMA's 256 K bits hold 8 one-word patches
    SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, POOL: tl.constexpr, PACK_OUT: tl.constexpr,
    WARPS: tl.constexpr, N_TILES: tl.constexpr, EMULATE: tl.constexpr,
):
    # The first layer on the tensor cores: A's K is one word (a 5x5 patch of one channel), so the 8 bit
    # planes of a row fill the MMA's 8 K slots (plane q in slot q: registers a0, a2 of lane t hold planes t
    # and 4 + t), loaded once a tile; each of the 16 MMAs per n-tile then picks one plane through B.
    tl.static_assert(BITS <= 8)
    tl.static_assert(not PACK_OUT or (WARPS * N_TILES) % 4 == 0)
    pid_m = tl.program_id(0)      # row tiles in the grid's first dimension: conv1 has 360000 of them
    pid_n = tl.program_id(1)
    lane = tl.arange(0, 32 * WARPS)
    _, col = _mma_lanes(lane, pid_m, pid_n, WARPS, N_TILES)
    g = lane % 32 // 4
    t = lane % 4
    b, oy, ox = _conv_rows(pid_m * 16, g, M, OH, OW, POOL)
    lo = b * stride_ab + oy * stride_ay + ox * stride_ax
    b, oy, ox = _conv_rows(pid_m * 16, g + 8, M, OH, OW, POOL)
    hi = b * stride_ab + oy * stride_ay + ox * stride_ax
    a0 = tl.load(a_ptr + t * stride_abit + lo, mask=t < BITS, other=0)
    a1 = tl.load(a_ptr + t * stride_abit + hi, mask=t < BITS, other=0)
    a2 = tl.load(a_ptr + (t + 4) * stride_abit + lo, mask=t + 4 < BITS, other=0)
    a3 = tl.load(a_ptr + (t + 4) * stride_abit + hi, mask=t + 4 < BITS, other=0)
    z = tl.zeros(lane.shape, dtype=tl.int32)
    s1 = ((z, z, z, z), (z, z, z, z))
    s2 = s1
    s3 = s1
    s0 = _bitserial_n_tile(a0, a1, a2, a3, b_pos_ptr, b_neg_ptr, col, N, stride_bn, t, BITS, SYMMETRIC, EMULATE)
    if N_TILES >= 2:
        s1 = _bitserial_n_tile(a0, a1, a2, a3, b_pos_ptr, b_neg_ptr, col + 8, N, stride_bn, t, BITS, SYMMETRIC,
                               EMULATE)
    if N_TILES == 4:
        s2 = _bitserial_n_tile(a0, a1, a2, a3, b_pos_ptr, b_neg_ptr, col + 16, N, stride_bn, t, BITS, SYMMETRIC,
                               EMULATE)
        s3 = _bitserial_n_tile(a0, a1, a2, a3, b_pos_ptr, b_neg_ptr, col + 24, N, stride_bn, t, BITS, SYMMETRIC,
                               EMULATE)
    sums = (s0, s1, s2, s3)
    offs_m = pid_m * 16 + tl.arange(0, 16)
    offs_n = pid_n * (WARPS * 8 * N_TILES) + tl.arange(0, WARPS * 8 * N_TILES)
    _epilogue(_fragments_2d(sums, 0, N_TILES, WARPS), _fragments_2d(sums, 1, N_TILES, WARPS), offs_m, offs_n,
              alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, c_neg_ptr, M, N, stride_cm, stride_cn, threshold,
              SYMMETRIC, HAS_BIAS, PACK_OUT, POOL)


# -----------------------------------------------------------------------------
# 8-bit activations (W1.58A8, as in BitNet b1.58): rows quantized to int8 with a per-row absmax scale,
# times packed ternary weights on the int8 tensor cores (tl.dot: wgmma on Hopper, mma on Ampere). The
# weight's bitplanes are unpacked to int8 in registers, so 2 bits a weight stay the only weight bytes read.


@triton.jit
def _round_even(x):
    # round half to even in float32 for |x| < 2^22: adding 1.5 * 2^23 leaves no fraction bits (launched with
    # EXACT_ROUNDING, so that x * inv + c is not contracted into one FMA, which rounds once)
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, given_ptr, K, stride_xm, stride_xk, stride_qm,
                          GIVEN: tl.constexpr, BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr):
    # one row a program: its absmax (unless the scale is given), then q = round(x / scale) in [-127, 127].
    # ONE_BLOCK (K <= BLOCK_K): the row stays in registers between the two, one trip to memory
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row, q_row = x_ptr + row * stride_xm, q_ptr + row * stride_qm
    if ONE_BLOCK:
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        scale = tl.load(given_ptr + row) if GIVEN else tl.div_rn(tl.max(tl.abs(x), axis=0), 127.0)
        tl.store(q_row + offs, _quantize(x, scale), mask=offs < K)
    else:
        scale = tl.load(given_ptr + row) if GIVEN else _absmax_scale(x_row, offs, K, stride_xk, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0)
            tl.store(q_row + k0 + offs, _quantize(x.to(tl.float32), scale), mask=k0 + offs < K)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _absmax_scale(x_row, offs, K, stride_xk, STEP: tl.constexpr):
    # a row's absmax / 127 (float32, the division rounded to nearest), read at offsets k0 + offs < K for k0
    # = 0, STEP, ... (offs: any block of STEP offsets)
    amax = tl.zeros(offs.shape, dtype=tl.float32)
    for k0 in range(0, K, STEP):
        x = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    return tl.div_rn(tl.max(amax), 127.0)


@triton.jit
def _quantize(x, scale):
    # int8 round(x / scale) clamped to [-127, 127], through the float32 reciprocal; scale 0 gives 0
    inv = tl.where(scale > 0, tl.div_rn(1.0, tl.where(scale > 0, scale, 1.0)), 0.0)
    return tl.minimum(tl.maximum(_round_even(x * inv), -127.0), 127.0).to(tl.int8)


@triton.jit
def _split_bits(x, S: tl.constexpr, MASK: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    # [R, C] -> [R, 2C]: column 2c holds the low S bits of column c, column 2c + 1 the S bits above them
    return tl.reshape(tl.join(x & MASK, (x >> S) & MASK), (R, 2 * C))


@triton.jit
def _unpack_bits(words, R: tl.constexpr, W: tl.constexpr):
    # uint32 [R, W] -> 0/1 [R, 32 W]: column 32 w + j holds bit j of word w. Halving the words five times
    # with tl.join keeps each word's bits in the thread that loaded it (join adds an in-thread dimension):
    # about 2 instructions a bit, and the tile reaches shared memory in 16-byte stores (a shift by a
    # per-column amount instead spreads each word over 32 threads and stores single bytes)
    x = _split_bits(words, 16, 0xFFFF, R, W)
    x = _split_bits(x, 8, 0xFF, R, 2 * W)
    x = _split_bits(x, 4, 0xF, R, 4 * W)
    x = _split_bits(x, 2, 0x3, R, 8 * W)
    return _split_bits(x, 1, 0x1, R, 16 * W)


@triton.jit
def _dup(x, R: tl.constexpr, C: tl.constexpr):
    # [R, C] -> [R, 2C], each value twice side by side (tl.join: the copy stays in its thread)
    return tl.reshape(tl.join(x, x), (R, 2 * C))


@triton.jit
def _negated_bits_prmt(words, R: tl.constexpr, W: tl.constexpr, EMULATE: tl.constexpr):
    # uint32 [R, W] -> int8 [R, 32 W] of 0 / -1: minus bit j of word w at column 32 w + j, in under one
    # instruction a bit. Shifting a word left by 7 - j puts its bits j, 8 + j, 16 + j, 24 + j at the tops of
    # its 4 bytes; prmt with sign-replicate selectors (nibble 8 + byte) turns byte tops into 0x00 / 0xFF and,
    # in two stages, transposes the bytes of the 8 shifted copies so that output register q holds columns
    # 4q .. 4q + 3 (byte b: column 4q + b). One asm call takes 32 consecutive columns, all copies of one
    # word ($8 is the first): _dup keeps them in one thread, which Triton does not promise; the SASS report
    # checks the layout it gives the call. EMULATE: the same values from tensor ops.
    if EMULATE:
        return (-_unpack_bits(words, R, W)).to(tl.int8)
    x = words.to(tl.int32, bitcast=True)
    x = _dup(_dup(_dup(_dup(_dup(x, R, W), R, 2 * W), R, 4 * W), R, 8 * W), R, 16 * W)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 x<8>, s<8>;\n"
        "shl.b32 x0, $8, 7; shl.b32 x1, $8, 6; shl.b32 x2, $8, 5; shl.b32 x3, $8, 4;\n"
        "shl.b32 x4, $8, 3; shl.b32 x5, $8, 2; shl.b32 x6, $8, 1; mov.b32 x7, $8;\n"
        # stage 1, pairs (a, b): [a.b0, b.b0, a.b1, b.b1] and [a.b2, b.b2, a.b3, b.b3], sign-replicated
        "prmt.b32 s0, x0, x1, 0xD9C8; prmt.b32 s1, x0, x1, 0xFBEA;\n"
        "prmt.b32 s2, x2, x3, 0xD9C8; prmt.b32 s3, x2, x3, 0xFBEA;\n"
        "prmt.b32 s4, x4, x5, 0xD9C8; prmt.b32 s5, x4, x5, 0xFBEA;\n"
        "prmt.b32 s6, x6, x7, 0xD9C8; prmt.b32 s7, x6, x7, 0xFBEA;\n"
        # stage 2: register 2 i + g = byte i of copies 4 g .. 4 g + 3 = columns 8 i + 4 g .. 8 i + 4 g + 3
        "prmt.b32 $0, s0, s2, 0x5410; prmt.b32 $2, s0, s2, 0x7632;\n"
        "prmt.b32 $4, s1, s3, 0x5410; prmt.b32 $6, s1, s3, 0x7632;\n"
        "prmt.b32 $1, s4, s6, 0x5410; prmt.b32 $3, s4, s6, 0x7632;\n"
        "prmt.b32 $5, s5, s7, 0x5410; prmt.b32 $7, s5, s7, 0x7632; }",
        "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        [x], dtype=tl.int8, is_pure=True, pack=32)


@triton.jit
def _trits_of_negated(p, n, EMULATE: tl.constexpr):
    # int8 0 / -1 planes (disjoint) -> trits: (p & 1) | n is +1, -1 or 0, four bytes an instruction
    if EMULATE:
        return (n - p).to(tl.int8)
    return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x01010101, $2, 0xEA;", "=r,r,r", [p, n], dtype=tl.int8,
                                     is_pure=True, pack=4)


@triton.jit
def _int8_ternary_kernel(
    a_ptr, scale_ptr,             # int8 [M, K] rows, float32 [M] their scales
    b_pos_ptr, b_neg_ptr,         # uint32 planes [N, KW]
    alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr,
    ws_ptr, lock_ptr,             # split-K: int32 workspace [2, M, N] and a counter a tile, left zero
    M, N, K, KW, stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,        # programs sharing each tile, each taking a range of K steps
    UNPACK: tl.constexpr,         # 0: _unpack_bits (tensor ops); 1: _negated_bits_prmt (inline PTX)
    EMULATE: tl.constexpr,        # the interpreter: UNPACK 1 from tensor ops
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    acc_p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_n = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    k_lo, k_hi = _split_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=m_ok[:, None] & (offs_k[None, :] < K), other=0)
        offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        w_off = offs_n[:, None].to(tl.int64) * stride_bn + offs_w[None, :] * stride_bk
        w_ok = n_ok[:, None] & (offs_w[None, :] < KW)
        words_p = tl.load(b_pos_ptr + w_off, mask=w_ok, other=0)
        words_n = tl.load(b_neg_ptr + w_off, mask=w_ok, other=0)
        if UNPACK == 1:           # minus the bits: -Sp and -Sn, or the trits themselves
            wp = _negated_bits_prmt(words_p, BLOCK_N, BLOCK_K // 32, EMULATE)
            wn = _negated_bits_prmt(words_n, BLOCK_N, BLOCK_K // 32, EMULATE)
            if SYMMETRIC:
                acc_p += tl.dot(a, tl.trans(_trits_of_negated(wp, wn, EMULATE)), out_dtype=tl.int32)
            else:
                acc_p += tl.dot(a, tl.trans(wp), out_dtype=tl.int32)
                acc_n += tl.dot(a, tl.trans(wn), out_dtype=tl.int32)
        else:
            wp = _unpack_bits(words_p, BLOCK_N, BLOCK_K // 32)
            wn = _unpack_bits(words_n, BLOCK_N, BLOCK_K // 32)
            if SYMMETRIC:
                acc_p += tl.dot(a, tl.trans((wp - wn).to(tl.int8)), out_dtype=tl.int32)
            else:
                acc_p += tl.dot(a, tl.trans(wp.to(tl.int8)), out_dtype=tl.int32)
                acc_n += tl.dot(a, tl.trans(wn.to(tl.int8)), out_dtype=tl.int32)
    if UNPACK == 1 and not SYMMETRIC:
        acc_p, acc_n = -acc_p, -acc_n
    last = True
    if SPLIT_K > 1:
        last, acc_p, acc_n = _split_sums(acc_p, acc_n, ws_ptr + offs_m[:, None] * N + offs_n[None, :], M * N,
                                         m_ok[:, None] & n_ok[None, :], lock_ptr + pid_m * tl.num_programs(1) + pid_n,
                                         SYMMETRIC, SPLIT_K)
    if last:
        _int8_epilogue(acc_p, acc_n, offs_m, offs_n, tl.load(scale_ptr + offs_m, mask=m_ok, other=0.0),
                       alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, M, N, stride_cm, stride_cn, SYMMETRIC, HAS_BIAS)


@triton.jit
def _int8_epilogue(acc_p, acc_n, offs_m, offs_n, row_scales, alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, M, N,
                   stride_cm, stride_cn, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr):
    # float64: (alpha_p Sp - alpha_n Sn) (exact products) times the row's scale, plus bias, rounded once to
    # float32; launched with EXACT_ROUNDING, as the scale's product is not exact and an FMA of it and the
    # bias would round differently from the same steps in numpy or torch
    m_ok, n_ok = offs_m < M, offs_n < N
    c = tl.load(alpha_p_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)[None, :] * acc_p.to(tl.float64)
    if not SYMMETRIC:
        c -= tl.load(alpha_n_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)[None, :] * acc_n.to(tl.float64)
    c = c * row_scales.to(tl.float64)[:, None]
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)[None, :]
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn, c.to(tl.float32),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int8_row_planes_kernel(x_ptr, scale_ptr, given_ptr, planes_ptr, K, KW, stride_xm, stride_xk,
                            QUANTIZE: tl.constexpr,   # float rows: quantized here as quantize_rows_int8 does
                            GIVEN: tl.constexpr,      # QUANTIZE with the scales given, else absmax / 127
                            BLOCK_W: tl.constexpr, PDL: tl.constexpr):
    # the GEMV's first kernel: BLOCK_W words (32 values each) of a row to its 8 two's-complement bitplanes,
    # planes [M, 8, KW] (bit 7 weighs -128). Each program of a row takes the whole row's absmax itself, and
    # the first stores the scale
    _gdc_enter(PDL)
    row = tl.program_id(1)
    lane = tl.arange(0, 32)
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    scale = 0.0
    if QUANTIZE:
        if GIVEN:
            scale = tl.load(given_ptr + row)
        else:
            scale = _absmax_scale(x_row, tl.arange(0, BLOCK_W)[:, None] * 32 + lane[None, :], K, stride_xk,
                                  32 * BLOCK_W)
        if tl.program_id(0) == 0:
            tl.store(scale_ptr + row, scale)
    k = offs_w[:, None] * 32 + lane[None, :]
    x = tl.load(x_row + k * stride_xk, mask=k < K, other=0)
    q = (_quantize(x.to(tl.float32), scale) if QUANTIZE else x).to(tl.uint32)   # bits 0..7: q's byte
    out = planes_ptr + row.to(tl.int64) * 8 * KW + offs_w
    for bit in tl.static_range(8):   # disjoint bits: the sum over a word's lanes is an OR
        tl.store(out + bit * KW, tl.sum(((q >> bit) & 1) << lane.to(tl.uint32)[None, :], axis=1), mask=offs_w < KW)


@triton.jit
def _popc_asm(x, EMULATE: tl.constexpr):
    # popc of uint32 as one PTX instruction: the bit-serial sums shift and add popcounts, and LLVM then no
    # longer sees every SWAR popc (half stayed SWAR code with TTQ scales); EMULATE: the SWAR twin
    if EMULATE:
        return popc(x)
    return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _int8_gemv_kernel(
    planes_ptr, scale_ptr,        # the rows' bitplanes uint32 [M, 8, KW] (_int8_row_planes_kernel), float32 [M]
    b_pos_ptr, b_neg_ptr,         # uint32 planes [N, KW]
    alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr,
    ws_ptr, lock_ptr,             # split-K: int32 workspace [2, M, N] and a counter a column block, left zero
    M, N, KW, stride_bn, stride_bk, stride_cm, stride_cn,
    SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,   # [BLOCK_K words x BLOCK_N columns] of weights a step
    SPLIT_K: tl.constexpr,        # programs sharing a row's column block, each taking a range of K words
    PDL: tl.constexpr,            # launched with programmatic dependent launch after the planes kernel
    EMULATE: tl.constexpr,        # the interpreter: popc without inline asm
):
    # few rows on the CUDA cores, bit-serially: one row a program. A K step counts the row's 8 bitplanes
    # against the weight words, Sp = sum_b +-2^b popc(a_b & w_pos), the same for Sn: 16 popcounts a word
    # pair, no unpack of the weights, and no work across threads (the planes come made)
    _gdc_enter(PDL)
    row = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_w = tl.arange(0, BLOCK_K)
    a_row = planes_ptr + row.to(tl.int64) * 8 * KW
    acc_p = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.int32)
    acc_n = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.int32)
    w_lo, w_hi = _split_range(KW, BLOCK_K, SPLIT_K)
    for w0 in range(w_lo, w_hi, BLOCK_K):
        kw = w0 + offs_w
        k_ok = kw < KW
        w_off = offs_n[None, :].to(tl.int64) * stride_bn + kw[:, None] * stride_bk
        w_ok = n_ok[None, :] & k_ok[:, None]
        wp = tl.load(b_pos_ptr + w_off, mask=w_ok, other=0, eviction_policy="evict_first")
        wn = tl.load(b_neg_ptr + w_off, mask=w_ok, other=0, eviction_policy="evict_first")
        part_p = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.int32)
        part_n = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.int32)
        for bit in tl.static_range(7, -1, -1):   # Horner from bit 7 (weight -128) down: 2 part + popcounts
            a = tl.load(a_row + bit * KW + kw, mask=k_ok, other=0)[:, None]
            sp = _popc_asm(a & wp, EMULATE)
            sn = _popc_asm(a & wn, EMULATE)
            if SYMMETRIC:
                sp -= sn
            if bit == 7:
                part_p, part_n = -sp, -sn
            else:
                part_p, part_n = 2 * part_p + sp, 2 * part_n + sn
        acc_p += part_p
        acc_n += part_n
    sp, sn = tl.sum(acc_p, axis=0), tl.sum(acc_n, axis=0)
    offs_m = row + tl.arange(0, 1)
    row_scale = tl.zeros([1], dtype=tl.float32) + tl.load(scale_ptr + row)
    last = True
    if SPLIT_K > 1:
        last, sp, sn = _split_sums(sp, sn, ws_ptr + row * N + offs_n, M * N, n_ok,
                                   lock_ptr + row * tl.num_programs(0) + tl.program_id(0), SYMMETRIC, SPLIT_K)
    if last:
        _int8_epilogue(sp[None, :], sn[None, :], offs_m, offs_n, row_scale, alpha_p_ptr, alpha_n_ptr, bias_ptr,
                       c_ptr, M, N, stride_cm, stride_cn, SYMMETRIC, HAS_BIAS)


# -----------------------------------------------------------------------------
# dispatch: which kernel runs for a shape on a GPU, with which meta-parameters
#
# The rules come from config sweeps on an H200 (`python bt_bench.py --tune`); PERFORMANCE.md holds the
# measurements behind each one.


class GpuSpec(NamedTuple):
    """What the dispatch reads of a device (gpu_spec), or what a test says a GPU is."""
    capability: int            # compute capability, major: 8 and later have the single-bit MMA with AND
    sms: int                   # streaming multiprocessors
    l2_bytes: int = 0
    interpret: bool = False    # Triton's interpreter: small blocks keep its numpy emulation quick


INTERPRETER = GpuSpec(capability=0, sms=4, interpret=True)
EXACT_ROUNDING = dict(enable_fp_fusion=False)   # launch option of the int8 quantizer and GEMM: no multiply
                                                # and add contracted into one FMA, which rounds once
INT8_GEMV_ROWS = 2            # int8 rows up to this many go to the CUDA cores' bit-serial GEMV
INT8_PLANES_WORDS = 32        # K words of a row a program of the GEMV's bitplane kernel
QUANTIZE_ONE_BLOCK = 16384    # rows up to this long are quantized from registers (32 values a thread at most)
MMA_MIN_ROWS = 4               # from this many rows up, trits go to the MMA kernel where the GPU has it
MMA_CHUNK_TILES = 65535        # row tiles of the MMA kernel a launch: the most a grid's second dimension holds
_SPECS = {}


def gpu_spec(device):
    """The GpuSpec of a torch device, read once: INTERPRETER under TRITON_INTERPRET=1 or for CPU tensors."""
    device = device if isinstance(device, torch.device) else torch.device(device)   # asked on every launch
    if _INTERPRET or device.type != "cuda":
        return INTERPRETER
    if device not in _SPECS:
        p = torch.cuda.get_device_properties(device)
        _SPECS[device] = GpuSpec(p.major, p.multi_processor_count, getattr(p, "L2_cache_size", 0))
    return _SPECS[device]


def mma_available(device):
    """True where the single-bit tensor-core MMA runs (NVIDIA sm_80 and later, not the interpreter)."""
    return gpu_spec(device).capability >= 8


def _pdl(device):
    """Programmatic dependent launch (sm_90 and later): a kernel lets the next one be scheduled at its start
    and waits for the one before it to finish before touching memory, so short kernels' launch gaps overlap."""
    return gpu_spec(device).capability >= 9


def choose_kernel(M, N, KW, gpu, *, bit_serial=False, row_major_weights=True, symmetric=False, conv=False):
    """(kind, meta-parameters) of the kernel for [M, N] outputs over KW words of K on `gpu` (a GpuSpec).

    kind: "mma" (the tensor cores' single-bit MMA), "gemv" (few rows, CUDA cores' POPC), "tile" (many rows,
    POPC); for convs (conv=True) also "im2col" (patches gathered into planes, then the tile kernel).
    bit_serial: A holds unsigned ints bit-serially; symmetric: one scale per channel (alpha_n is None).
    """
    if conv:
        return _choose_conv_kernel(M, N, KW, gpu, bit_serial, symmetric)
    if gpu.interpret:
        if M <= 4 and not bit_serial:
            return "gemv", dict(BLOCK_M=1 if M <= 2 else 4, BLOCK_N=32, BLOCK_K=8, SPLIT_K=1, num_warps=4)
        return "tile", dict(BLOCK_M=32, BLOCK_N=32, GROUP_M=8, SPLIT_K=1, CSA=True, num_warps=4)
    if gpu.capability >= 8 and not bit_serial and M >= MMA_MIN_ROWS:
        return "mma", _mma_meta(M, N, KW, gpu.sms, symmetric)
    # CUDA cores: 1 to 3 rows everywhere, bit-serial A, and every shape on GPUs without the single-bit MMA
    # (the portable path). per_sm: programs per SM that split-K aims for
    sms, rows4 = gpu.sms, triton.cdiv(M, 4) * triton.cdiv(N, 64)
    if bit_serial:             # pixels: [16 x BLOCK_N] tiles, narrow layers (conv1: N = 32) waste no columns
        kind, meta, per_sm = "tile", dict(BLOCK_M=16, BLOCK_N=min(128, max(32, triton.next_power_of_2(N))),
                                          GROUP_M=8, CSA=False, num_warps=4), 4
    elif M <= 2:               # one row a program streaming long weight blocks
        kind, meta, per_sm = "gemv", _gemv_one_row(M, N, KW, sms, symmetric, row_major_weights), 1
    elif M <= 32 and not row_major_weights:   # 2 rows a program, 3 K blocks a step through carry-save adders
        kind, meta, per_sm = "gemv", _gemv_csa(M, N, KW, sms, symmetric), 1
    elif 8 <= M <= 32 and (rows4 >= sms if not symmetric else rows4 >= 2 * sms or M * N >= 65536):
        kind, meta, per_sm = "gemv", _gemv_rows(rows4, KW, sms, symmetric), 1   # rows share a weight block
    elif M <= 32:
        kind, meta, per_sm = "gemv", _gemv_one_row(M, N, KW, sms, symmetric, row_major_weights), 1
    elif M <= 256 and triton.cdiv(M, 16) * triton.cdiv(N, 128) >= sms:   # thin tiles fill every SM
        kind, meta, per_sm = "tile", _thin_tile(M, N, sms, symmetric), 1
    elif M <= 256 and not row_major_weights:  # too few row tiles: 2 rows a program, carry-save adders
        kind, meta, per_sm = "gemv", dict(BLOCK_M=2, ROW_LOOP=True, BLOCK_N=64,
                                          BLOCK_K=min(16, triton.next_power_of_2(KW)), CSA=True, num_warps=4), 4
    elif M <= 256:             # too few row tiles, row-major weights: 3D products, 2 rows a program
        kind, meta, per_sm = "gemv", dict(BLOCK_M=2, BLOCK_N=64, BLOCK_K=32, num_warps=4), 4
    else:
        kind, meta, per_sm = "tile", _thin_tile(M, N, sms, symmetric), 4
    # split K where the programs do not fill the GPU, keeping 2 blocks of K a split (2 steps of 3 with CSA)
    programs = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
    min_k = 2 * meta.get("BLOCK_K", 16) * (3 if kind == "gemv" and meta.get("CSA") else 1)
    meta["SPLIT_K"] = _split_k(programs, KW, sms, per_sm, min_k)
    return kind, meta


def choose_int8_kernel(M, N, K, gpu, symmetric=False):
    """Meta-parameters of ternary_gemm_int8 for int8 [M, K] rows by trits [N, K], from `bt_bench.py --tune
    --int8` on an H100 (PERFORMANCE.md, "8-bit activations"): KIND "gemv" is the CUDA cores' bit-serial GEMV
    (_int8_row_planes_kernel, then _int8_gemv_kernel; 1 row of 4096^2, int8 rows: 7.1 us, where the tensor
    cores' least tile, 16 rows, takes 11.4), else _int8_ternary_kernel's tiles on the tensor cores, the
    weight's bits unpacked by inline PTX (UNPACK 1: about half the K loop's instructions of the tensor ops)."""
    if M <= INT8_GEMV_ROWS:    # the CUDA cores, bit-serially: narrow blocks, programs enough
        return dict(KIND="gemv", BLOCK_N=16, BLOCK_K=2, SPLIT_K=1, num_warps=1) if gpu.interpret else \
            dict(KIND="gemv", BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, num_warps=8)
    if gpu.interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1, SPLIT_K=1, UNPACK=0)
    tile = lambda bm, bn, bk, w, s, split=1: dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s,
                                                  SPLIT_K=split, UNPACK=1)
    if M <= 16:                # a weight stream: 16 rows is mma.sync's least; narrow tiles for programs enough
        return tile(16, 32, 128, 4, 3, split=4) if symmetric and K > 8192 else tile(16, 32, 256, 4, 3)
    if M <= 64:
        return tile(64, 64, 128, 4, 4)
    # one scale: 128 x 128 tiles where they give each SM two or more; TTQ scales' two accumulators do not fit
    if symmetric and triton.cdiv(M, 128) * triton.cdiv(N, 128) >= 2 * gpu.sms:
        return tile(128, 128, 128, 4, 3)
    return tile(128, 64, 128, 4, 3)


def _choose_conv_kernel(M, N, KW, gpu, bit_serial, symmetric):
    """choose_kernel for ternary_conv_packed. On trits the patches are gathered first: the implicit GEMM's
    tiles have rows scattered over the map (no 16-byte loads, address work every K step), and are reached
    only through an explicit config=("tile", meta)."""
    mma = gpu.capability >= 8
    if mma and not bit_serial:
        return "mma", _mma_meta(M, N, KW, gpu.sms, symmetric)
    if mma and KW == 1:        # one-word pixel patches (conv1): the bit-serial MMA kernel
        return "mma", dict(WARPS=2 if N > 32 else 1, N_TILES=4)
    if not bit_serial:
        return "im2col", _thin_tile(M, N, gpu.sms, symmetric)
    if gpu.interpret:
        return "tile", dict(BLOCK_M=32, BLOCK_N=32, GROUP_M=8, SPLIT_K=1, CSA=True, num_warps=4)
    # pixels read in place on one warp: 8 rows (2 pooling windows) a thread where the patch is one word, so
    # that each thread's window math and epilogue serve 16 outputs; with a K loop 8 rows spill, so 4
    bn, bm = _thin_columns(N), 8 if KW == 1 else 4
    split = _split_k(triton.cdiv(M, bm) * triton.cdiv(N, bn), KW, gpu.sms)
    return "tile", dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, CSA=False, SPLIT_K=split, num_warps=1)


def _mma_meta(M, N, KW, sms, symmetric):
    """The MMA kernel's meta-parameters. Up to 32 rows the weight stream is the work, so what counts is bytes in
    flight: deep pipelines, and with one scale 4 warps splitting each tile's K. From 17 rows on, 4 n-tiles a
    warp share A's registers where there are programs enough. PDL with an L2 prefetch of the weight rows where
    it measured faster: the K split, and up to 16 rows of at most 4096 x 128 weight words."""
    programs = lambda n_tiles: triton.cdiv(M, 16) * triton.cdiv(N, 16 * n_tiles)   # 2 warps side by side
    if M <= 32 and symmetric and KW >= 128:
        return dict(WARPS=4, K_WARPS=4 if M <= 16 else 2, N_TILES=1, STAGES=1, SPLIT_K=1, num_warps=4,
                    PDL=True, PREFETCH=64)
    short = M <= 16 and N * KW <= 4096 * 128
    if M <= 32:
        n_tiles = 4 if M > 16 and programs(4) >= sms else 2 if 2 * triton.cdiv(N, 32) >= sms else 1
        stages = 4 if KW >= 256 else 6
    elif KW >= 128 or programs(4) >= sms:   # no pipelining past 256 rows: the loads are not the limit there
        n_tiles, stages = 4, 3 if M <= 256 else 1
    else:
        n_tiles, stages = 2 if 2 * triton.cdiv(N, 32) >= sms else 1, 3 if M <= 256 else 1
    return dict(WARPS=2, K_WARPS=1, N_TILES=n_tiles, STAGES=stages, num_warps=2, PDL=short,
                PREFETCH=128 if short else 0, SPLIT_K=_split_k(programs(n_tiles), KW, sms, per_sm=1, min_k=256))


def _gemv_one_row(M, N, KW, sms, symmetric, row_major_weights):
    """One row a program, [BLOCK_N x BLOCK_K] = 2048 weight words a step, the longest K block that keeps the
    programs to one wave; from 3 rows with TTQ scales the K loop is pipelined (3 stages) on 4 warps."""
    bk = min(128, triton.next_power_of_2(KW))
    bn = min(128, 2048 // bk)
    while M * triton.cdiv(N, bn) > 4 * sms and bk > 16:
        bk, bn = bk // 2, bn * 2
    pipelined = M >= 3 and not symmetric and row_major_weights
    return dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, STAGES=3 if pipelined else 1,
                num_warps=8 if row_major_weights and not pipelined else 4)


def _gemv_csa(M, N, KW, sms, symmetric):
    """K-word-major weights, 3 to 32 rows: 2 rows a program, three K blocks a step through carry-save adders;
    64 weight rows a program where that makes 3 to 6 programs an SM, else 32; blocks of 8 words at short K,
    so that the carry-save loop runs at all."""
    programs = triton.cdiv(M, 2) * triton.cdiv(N, 64)
    bk = 8 if KW < (96 if not symmetric else 48) else 16
    return dict(BLOCK_M=2, ROW_LOOP=True, BLOCK_N=64 if 3 * sms <= programs < 6 * sms else 32,
                BLOCK_K=min(bk, triton.next_power_of_2(KW)), CSA=True, num_warps=4)


def _gemv_rows(rows4, KW, sms, symmetric):
    """Row-major weights, 8 to 32 rows: 2 or 4 rows a program share each [64 x BLOCK_K] weight block from
    registers, the K loop pipelined (3 stages): 4 rows where that makes 2 programs an SM."""
    if rows4 >= 2 * sms:
        rows, bk = 4, (32 if symmetric else 16)
    else:
        rows, bk = (2, 32) if symmetric else (4, 32)
    return dict(BLOCK_M=rows, ROW_LOOP=True, BLOCK_N=64, BLOCK_K=min(bk, triton.next_power_of_2(KW)), STAGES=3,
                num_warps=4)


def _thin_columns(N):
    """Columns of a thin tile: 64 (2 warps, one column a thread), 32 on one warp where N <= 32."""
    return 64 if N > 32 else 32


def _thin_tile(M, N, sms, symmetric):
    """The tile kernel on trits: thin tiles of 4 (or 8) rows x 64 columns, one column a thread, three K words a
    step through carry-save adders. 4 to 8 outputs a thread fit in 56 to 91 registers, so enough warps share
    an SM to keep both the popcount and the logic pipes busy. One scale takes 8 rows where that still makes
    24 tiles an SM."""
    bn = _thin_columns(N)
    bm = 8 if symmetric and triton.cdiv(M, 8) * triton.cdiv(N, bn) >= 24 * sms else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, CSA=True, num_warps=bn // 32)


def _split_k(programs, KW, sms, per_sm=4, min_k=32):
    """Split K until there are about per_sm programs an SM, with at least min_k words a split."""
    return max(1, min(triton.cdiv(per_sm * sms, programs), KW // min_k))


# -----------------------------------------------------------------------------
# launch: the one place that turns (kind, meta) and operands into a kernel launch


_WORKSPACE = {}


def _workspace(device, words, tiles):
    """Zeroed int32 buffers for split-K, kept per device; every call leaves them zero again (so split-K calls
    must not run at once on two streams)."""
    ws, locks = _WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < words:
        ws = torch.zeros(max(words, 1 << 16), dtype=torch.int32, device=device)
    if locks is None or locks.numel() < tiles:
        locks = torch.zeros(max(tiles, 1 << 12), dtype=torch.int32, device=device)
    _WORKSPACE[device] = (ws, locks)
    return ws, locks


def _rows_aligned(pos, neg):
    """Both planes [R, KW] have K words contiguous and rows on 16-byte boundaries (the MMA kernel's vectors)."""
    return (pos.stride() == neg.stride() and pos.stride(1) == 1 and pos.stride(0) % 4 == 0
            and pos.data_ptr() % 16 == 0 and neg.data_ptr() % 16 == 0)


_META_DEFAULTS = dict(tile=dict(SPLIT_K=1, CSA=False), gemv=dict(SPLIT_K=1, STAGES=1, CSA=False),
                      mma=dict(SPLIT_K=1, STAGES=1, N_TILES=1, K_WARPS=1, PDL=False, PREFETCH=0),
                      bitserial_mma=dict(WARPS=2, N_TILES=4))


def _launch(kind, meta, a_pos, a_neg, b_pos, b_neg, alpha_p, alpha_n, bias, c, c_neg=None, *, M, conv=None,
            pool=1, threshold=None):
    """Launch one GEMM kernel, no checks; returns the compiled kernel (of the last chunk).

    a_pos: planes [BITS, M, KW] (a_neg [1, M, KW], or None: A is unsigned, bit-serial); with
    conv=(OH, OW, KX, CW, stride), maps [BITS, B, H, W, CW] read as the conv's patches (kinds "tile" and
    "bitserial_mma"). b_pos, b_neg: weights [N, KW]. c: float32 [M, N]; with a threshold, the output is
    ternarized, packed 32 columns a word into c (pos) and c_neg (neg); pool 2 max-pools windows of 4
    consecutive rows first. Scales float32 [N]: alpha_n None means one scale, bias None none.
    """
    _need_triton()
    N, KW = b_pos.shape
    meta = {**_META_DEFAULTS[kind], **meta}
    symmetric = alpha_n is None
    scales = (alpha_p, alpha_p if symmetric else alpha_n, alpha_p if bias is None else bias)
    flags = dict(SYMMETRIC=symmetric, HAS_BIAS=bias is not None)
    thr = 0.0 if threshold is None else float(threshold)
    c_neg = c if c_neg is None else c_neg
    split = meta["SPLIT_K"] if kind != "bitserial_mma" else 1
    workspace = lambda programs: _workspace(a_pos.device, 2 * M * N, programs) if split > 1 else (c, c)
    if kind == "tile":
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split)
        if conv is None:       # plain rows: a 1x1 map a row, K words read along the row
            geometry, a_strides = (1, 1, 1, KW, 1), (a_pos.stride(0), a_pos.stride(1), 0, 0, a_pos.stride(2))
            c_strides = c.stride()
        else:
            geometry, a_strides, c_strides = conv, a_pos.stride(), c.stride()[2:]
        return _ternary_gemm_kernel[grid](
            a_pos, a_pos if a_neg is None else a_neg, b_pos, b_neg, *scales, c, c_neg, *workspace(grid[0]),
            M, N, KW, *geometry, thr, *a_strides, *b_pos.stride(), *c_strides,
            A_BITS=a_pos.shape[0], BIT_SERIAL=a_neg is None, IMPLICIT=conv is not None, POOL=pool,
            PACK_OUT=threshold is not None, **flags, **meta)
    if kind == "gemv":
        meta.setdefault("ROW_LOOP", meta["BLOCK_M"] == 1)
        grid = (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]), split)
        pdl = _pdl(a_pos.device)
        return _ternary_gemv_kernel[grid](
            a_pos, a_neg, b_pos, b_neg, *scales, c, *workspace(grid[0] * grid[1]), M, N, KW,
            # one row: a row stride of 0 (never used) lets Triton see 16-byte aligned activation rows
            a_pos.stride(1) if M > 1 else 0, a_pos.stride(2), *b_pos.stride(), *c.stride(),
            PDL=pdl, ONE_ROW=M == 1, launch_pdl=pdl, **flags, **meta)
    if kind == "bitserial_mma":   # pixel maps [BITS, B, H, W, 1] of one-word patches
        OH, OW, _, _, stride = conv
        warps, n_tiles = meta["WARPS"], meta["N_TILES"]
        grid = (triton.cdiv(M, 16), triton.cdiv(N, 8 * warps * n_tiles))
        return _bitserial_mma_kernel[grid](
            a_pos, b_pos, b_neg, *scales, c, c_neg, M, N, thr, a_pos.stride(0), a_pos.stride(1),
            a_pos.stride(2) * stride, a_pos.stride(3) * stride, b_pos.stride(0), c.stride(0), c.stride(1),
            OH=OH, OW=OW, BITS=a_pos.shape[0], POOL=pool, PACK_OUT=threshold is not None, WARPS=warps,
            N_TILES=n_tiles, EMULATE=_INTERPRET, num_warps=warps, **flags)
    # "mma": trits [M, KW]; at most MMA_CHUNK_TILES row tiles a launch, chunks ending on whole pooling windows
    a_pos, a_neg = a_pos[0], a_neg[0]
    meta.setdefault("WARPS", meta.get("num_warps", 4))
    meta["num_warps"] = meta["WARPS"]
    meta.setdefault("ALIGNED", _rows_aligned(a_pos, a_neg) and _rows_aligned(b_pos, b_neg))
    meta["PDL"] = meta["PDL"] and _pdl(a_pos.device)
    meta["PREFETCH"] = meta["PREFETCH"] if meta["PDL"] and b_pos.stride(1) == 1 else 0   # rows of K words
    rows = MMA_CHUNK_TILES * 16
    for r0 in range(0, M, rows):
        m = min(rows, M - r0)
        o0, o1 = r0 // (pool * pool), (r0 + m) // (pool * pool)
        grid = (triton.cdiv(N, 8 * meta["WARPS"] // meta["K_WARPS"] * meta["N_TILES"]), triton.cdiv(m, 16), split)
        ws, locks = _workspace(a_pos.device, 2 * m * N, grid[0] * grid[1]) if split > 1 else (c, c)
        compiled = _ternary_mma_kernel[grid](
            a_pos[r0:], a_neg[r0:], b_pos, b_neg, *scales, c[o0:o1], c_neg[o0:o1], ws, locks, m, N, KW, thr,
            *a_pos.stride(), *b_pos.stride(), *c.stride(), POOL=pool, PACK_OUT=threshold is not None,
            EMULATE=_INTERPRET, launch_pdl=meta["PDL"], **flags, **meta)
    return compiled


def launch_gemm(a_pos, a_neg, b_pos, b_neg, alpha_p, alpha_n=None, bias=None, *, config=None, out=None):
    """ternary_gemm_triton without its checks and copies, for callers that checked once (the layers, the
    benchmark): a_pos [BITS, M, KW], a_neg [1, M, KW] or None (bit-serial), scales float32 contiguous.
    config: (kind, meta) as choose_kernel gives, None to choose. Returns (C, the compiled kernel or None)."""
    bits, M, KW = a_pos.shape
    N = b_pos.shape[0]
    c = torch.empty((M, N), dtype=torch.float32, device=a_pos.device) if out is None else out
    if M == 0 or N == 0:
        return c, None
    kind, meta = config or _kernel_for(M, N, KW, gpu_spec(a_pos.device), a_neg is None, b_pos.stride(1) == 1,
                                       alpha_n is None)
    return c, _launch(kind, meta, a_pos, a_neg, b_pos, b_neg, alpha_p, alpha_n, bias, c, M=M)


@functools.lru_cache(maxsize=4096)
def _kernel_for(M, N, KW, gpu, bit_serial, row_major_weights, symmetric):
    """choose_kernel, remembered: a layer asks for the same shapes every call (_launch copies the meta)."""
    return choose_kernel(M, N, KW, gpu, bit_serial=bit_serial, row_major_weights=row_major_weights,
                         symmetric=symmetric)


@functools.lru_cache(maxsize=256)
def _int8_kernel_for(M, N, K, gpu, symmetric):
    """choose_int8_kernel, remembered (_launch_int8 copies the meta)."""
    return choose_int8_kernel(M, N, K, gpu, symmetric)


def _row_words(kw):
    """The row stride of row-major planes: whole runs of 4 words, so that every row starts on a 16-byte
    boundary and the MMA kernel loads 16-byte vectors (rows of 50 words, K = 1600, otherwise load word by word:
    conv2 at 640000x128x1600 took twice as long)."""
    return triton.cdiv(kw, 4) * 4


def _new_planes(bits, rows, kw, device, k_major=True, padded=False):
    """K-word-major storage [BITS, KW, R], viewed as [BITS, R, KW]; or row-major [BITS, R, KW], rows padded to
    whole 16-byte runs (padded=True: the padded storage itself, for kernels that write the zeros there too)."""
    if not k_major:
        planes = torch.empty((bits, rows, _row_words(kw)), dtype=torch.uint32, device=device)
        return planes if padded else planes[:, :, :kw]
    return torch.empty((bits, kw, rows), dtype=torch.uint32, device=device).transpose(1, 2)


def _launch_pack(x4, R, K, geometry, mode, threshold=0.0, thr=None, bits=1, k_major=True):
    """Pack x4 (viewed [B, C, H, W]) into planes [bits, R, KW] with _pack_kernel; no checks."""
    _need_triton()
    KW = triton.cdiv(K, 32)
    pos = _new_planes(bits, R, KW, x4.device, k_major, padded=True)
    neg = pos if mode == 3 else _new_planes(1, R, KW, x4.device, k_major, padded=True)
    KWS = pos.shape[2]   # words written a row: row-major planes' padding gets its zeros in the same pass
    OH, OW, KH, KWD, H, W, stride, pad, im2col = geometry
    # about 4096 values a program; row-major planes take long runs of a row, few words a row go to more rows
    BLOCK_W = min(4 if k_major else 64, triton.next_power_of_2(KWS))
    BLOCK_R = (64 if _INTERPRET else 128) // BLOCK_W
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(KWS, BLOCK_W))
    pdl = _pdl(x4.device)
    _pack_kernel[grid](
        x4, thr if thr is not None else x4, pos, neg,
        R, K, KWS, OH, OW, KH, KWD, H, W, stride, pad, float(threshold),
        *x4.stride(), *pos.stride(),
        MODE=mode, BITS=bits, IM2COL=im2col, BLOCK_R=BLOCK_R, BLOCK_W=BLOCK_W, num_warps=4,
        PDL=pdl, launch_pdl=pdl)
    return pos[:, :, :KW], neg[:, :, :KW]


def _pack_trits4(x, k_major=False):
    """Pack int8 trits [R, K] with K % 4 == 0, unit column stride and 4-byte aligned rows: 4 trits a load."""
    _need_triton()
    R, K = x.shape
    KW = triton.cdiv(K, 32)
    pos = _new_planes(1, R, KW, x.device, k_major, padded=True)[0]
    neg = _new_planes(1, R, KW, x.device, k_major, padded=True)[0]
    KWS = pos.shape[1]   # words written a row, the padding's zeros too
    if R == 0:
        return pos[:, :KW], neg[:, :KW]
    x4 = x.view(torch.int32)
    BLOCK_W = min(8 if k_major else 32, triton.next_power_of_2(KWS))   # row-major planes: long runs of a row
    BLOCK_R, BLOCK_W = (16, 2) if _INTERPRET else (256 // BLOCK_W, BLOCK_W)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(KWS, BLOCK_W))
    pdl = _pdl(x.device)
    _pack_trits4_kernel[grid](x4, pos, neg, R, K // 4, KWS, x4.stride(0), pos.stride(0), pos.stride(1),
                              BLOCK_R=BLOCK_R, BLOCK_W=BLOCK_W, num_warps=4, PDL=pdl, launch_pdl=pdl)
    return pos[:, :KW], neg[:, :KW]


def _ternarize_rows(x, threshold):
    """int8 trits of x at a scalar threshold (or of x [R, K] at a per-row one), compared as the pack kernel
    does: in float32, float64 in its own precision (NaN gives 0)."""
    x = x if x.dtype == torch.float64 else x.float()
    t = threshold[:, None].to(x.dtype) if isinstance(threshold, torch.Tensor) else threshold
    return (x > t).to(torch.int8) - (x < -t).to(torch.int8)


def launch_pack(x, threshold=None, k_major=False):
    """pack_bitplanes without its checks, for callers that checked once (the layers, the benchmark):
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Returns (pos, neg) [R, KW]."""
    R, K = x.shape
    if x.dtype == torch.int8:
        if K % 4 == 0 and x.stride(1) == 1 and x.stride(0) % 4 == 0 and x.data_ptr() % 4 == 0:
            return _pack_trits4(x, k_major=k_major)
        mode, thr, t = 0, None, 0.0
    elif x.dtype == torch.float64:   # the kernel compares in float32: ternarize at float64 precision first
        return launch_pack(_ternarize_rows(x, threshold), k_major=k_major)
    elif isinstance(threshold, torch.Tensor):
        mode, thr, t = 2, _f32(threshold), 0.0
    else:
        mode, thr, t = 1, None, float(threshold)
    pos, neg = _launch_pack(x[:, :, None, None], R, K, (1, 1, 1, 1, 1, 1, 1, 0, False), mode, t, thr,
                            k_major=k_major)
    return pos[0], neg[0]


def _pack_pixel_patches(x, OH, OW, kh, kw, stride, padding):
    """pack_im2col's 8 bitplanes of uint8 x [B, C, H, W] when a patch fits one word (C*kh*kw <= 32) and a
    padded row one word (W + 2*padding <= 32): rows are bit-sliced once, then cut into patches."""
    _need_triton()
    B, C, H, W = x.shape
    R = B * OH * OW
    rows = torch.empty((B * C * H, 8), dtype=torch.uint32, device=x.device)
    block = 16 if _INTERPRET else 64
    _slice_rows_kernel[(triton.cdiv(B * C * H, block),)](x, rows, B * C * H, C, H, W, padding, *x.stride(),
                                                         BLOCK_R=block, num_warps=4)
    planes = _new_planes(8, R, 1, x.device)
    block = 32 if _INTERPRET else 128
    _im2col_rows_kernel[(triton.cdiv(R, block),)](rows, planes, R, C, H, OH, OW, kh, kw, stride, padding,
                                                  planes.stride(0), planes.stride(1), BLOCK_R=block, num_warps=4)
    return planes


_PATCH_WORDS = 1 << 25   # words a patch plane and chunk (128 MB)


def _conv_by_patches(a_pos, a_neg, w_pos, w_neg, scales, out, out_neg, kind, meta, OH, OW, kx, stride, pool,
                     threshold):
    """A trit conv through explicit patch planes: the patches of a chunk of images are gathered into packed
    planes (rows in the implicit GEMM's pooling-window order, so that the epilogue pools and packs as there),
    then a plain GEMM runs on them: kind "im2col", thin tiles on K-word-major planes; "mma", the MMA kernel
    on row-major planes. Chunks keep the planes under 2 x 128 MB."""
    _need_triton()
    B, H, W, CW = a_pos.shape
    N, KW = w_pos.shape
    rows = (OH // pool) * (OW // pool) * pool * pool   # per image
    mma = kind == "mma"
    row_words = _row_words(KW) if mma else KW
    images = max(1, min(B, _PATCH_WORDS // max(1, rows * row_words)))
    if mma:
        planes = torch.empty((2, images * rows, row_words), dtype=torch.uint32, device=a_pos.device)
        w_pos, w_neg = row_major_planes(w_pos, w_neg)   # K-word-major weights would cost a load a word
        if threshold is not None:   # the epilogue packs whole 32-column words of its 2D tile
            meta = dict(meta, K_WARPS=1, N_TILES=4)
        block_k = min(16 if _INTERPRET else 64, triton.next_power_of_2(row_words))   # about 2048 words a program
        block_r = (256 if _INTERPRET else 2048) // block_k
    else:
        ld = triton.cdiv(images * rows, 16) * 16        # a 16-divisible K stride lets the GEMM load rows in vectors
        planes = torch.empty((2, KW, ld), dtype=torch.uint32, device=a_pos.device).transpose(1, 2)
        block_r, block_k = (32, 4) if _INTERPRET else (128, 8)
    words = out.shape[-1]
    for b0 in range(0, B, images):
        b1 = min(B, b0 + images)
        M = (b1 - b0) * rows
        _gather_patches_kernel[(triton.cdiv(M, block_r), triton.cdiv(row_words, block_k))](
            a_pos[b0:b1], a_neg[b0:b1], planes[0], planes[1], M, KW, row_words,
            *a_pos.stride(), planes.stride(1), planes.stride(2), OH=OH, OW=OW, KX=kx, CW=CW, CONV_STRIDE=stride,
            POOL=pool, BLOCK_R=block_r, BLOCK_K=block_k, ROWS_FIRST=mma, num_warps=4)
        m = meta
        if not mma and "SPLIT_K" not in m:   # split-K for this chunk's rows
            tiles = triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"])
            m = dict(m, SPLIT_K=_split_k(tiles, KW, gpu_spec(a_pos.device).sms))
        _launch("mma" if mma else "tile", m, planes[0:1, :M], planes[1:2, :M], w_pos, w_neg, *scales,
                out[b0:b1].view(-1, words), out_neg[b0:b1].view(-1, words), M=M, pool=pool, threshold=threshold)


# -----------------------------------------------------------------------------
# public API: checks, then the launchers above


def _check_device(*tensors, allow_cpu=False):
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"tensors are on different devices: {dev} and {t.device}")
    if dev.type == "cpu" and not _INTERPRET and not allow_cpu:
        raise ValueError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton "
                         "(or move the tensors to a CUDA device)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {dev}: use cuda (or cpu with TRITON_INTERPRET=1)")


def _check_tensor(t, name, dtype=None, dim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {str(dtype).replace('torch.', '')} bitplanes (from pack_bitplanes), "
                        f"got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_pair(pos, neg, names, dim):
    """Two planes of one operand: uint32, same shape; returned in one layout (the kernels read both with the
    pos plane's strides, so a pair stored two ways is copied to one)."""
    _check_tensor(pos, names[0], torch.uint32, dim)
    _check_tensor(neg, names[1], torch.uint32, dim)
    if pos.shape != neg.shape:
        raise ValueError(f"{names[0]} and {names[1]} differ in shape: {tuple(pos.shape)} vs {tuple(neg.shape)}")
    return (pos, neg) if pos.stride() == neg.stride() else (pos.contiguous(), neg.contiguous())


def _check_scales(N, alpha_p, alpha_n, bias):
    """The epilogue's float32 [N] vectors (None stays None), outside autograd."""
    for name, t in (("alpha_p", alpha_p), ("alpha_n", alpha_n), ("bias", bias)):
        if t is None and name != "alpha_p":
            continue
        _check_tensor(t, name)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) (one per output channel), got {tuple(t.shape)}")
    return tuple(_f32(t) for t in (alpha_p, alpha_n, bias))


def _f32(t):
    """A scale or bias as the epilogue reads it: float32, contiguous, outside autograd (None stays None)."""
    return None if t is None else t.detach().float().contiguous()


def _check_threshold(threshold, rows=None):
    """A scalar (or, with rows, a per-row tensor) threshold >= 0, not NaN."""
    if isinstance(threshold, torch.Tensor) and rows is not None:
        if threshold.shape != (rows,):
            raise ValueError(f"per-row threshold must have shape ({rows},), got {tuple(threshold.shape)}")
        if threshold.numel() and not bool((threshold >= 0).all()):   # NaN fails >= too
            bad = threshold[~(threshold >= 0)][0].item()
            raise ValueError(f"per-row thresholds must be >= 0, got {bad}")
        return
    if not float(threshold) >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")


def pack_bitplanes(x, threshold=None, k_major=False):
    """Pack a ternary matrix into (pos, neg) uint32 bitplanes [R, ceil(K/32)] (layout: module docstring).

    x: int8 [R, K] with values in {-1, 0, +1}; or a float tensor [R, K] with `threshold` >= 0, ternarized
    in the same pass (+1 where x > threshold, -1 where x < -threshold, compared in x's precision; NaN gives
    0). `threshold` may also be a float tensor [R]: one threshold per row (output channel of a weight).
    CUDA tensors go through the Triton kernels; CPU tensors too under TRITON_INTERPRET=1, else through
    torch ops with the same result.

    The planes come back row-major (K words contiguous), the layout of the MMA kernel and of the GEMVs.
    k_major=True gives the tile kernel's layout instead (GPUs without the single-bit MMA). Any strides
    work everywhere; the layout is only speed (PERFORMANCE.md).
    """
    _check_tensor(x, "x", dim=2)
    R, K = x.shape
    if K < 1:
        raise ValueError("x must have at least one column (K >= 1)")
    if x.dtype == torch.int8:
        if threshold is not None:
            raise ValueError("threshold is for float input; int8 input must already hold trits")
        if x.numel() and bool(((x < -1) | (x > 1)).any()):
            bad = x[(x < -1) | (x > 1)][0].item()
            raise ValueError(f"x holds {bad}: int8 trits must be -1, 0 or +1")
    elif x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        if threshold is None:
            raise ValueError("float input needs a threshold (x > t -> +1, x < -t -> -1)")
        _check_threshold(threshold, R)
        if isinstance(threshold, torch.Tensor):
            _check_device(x, threshold, allow_cpu=True)
    else:
        raise TypeError(f"x must be int8 trits or a float tensor, got {x.dtype}")
    _check_device(x, allow_cpu=True)
    if not _kernel_path(x.device):   # no Triton on the CPU: the same words through torch ops
        pos, neg = _pack_torch(x if x.dtype == torch.int8 else _ternarize_rows(x, threshold))
        return (pos.t().contiguous().t(), neg.t().contiguous().t()) if k_major else (pos, neg)
    return launch_pack(x, threshold, k_major)


def _pack_torch(trits):
    """pack_bitplanes for int8 trits [R, K] in plain torch (CPU without Triton)."""
    R, K = trits.shape
    KW = triton.cdiv(K, 32)
    t = torch.nn.functional.pad(trits, (0, 32 * KW - K)).view(R, KW, 32).long()
    weights = 1 << torch.arange(32, dtype=torch.int64, device=trits.device)
    def plane(mask):
        words = (mask.long() * weights).sum(-1)
        return (words - (words >= 1 << 31).long() * (1 << 32)).to(torch.int32).view(torch.uint32)
    return plane(t == 1), plane(t == -1)


def pack_im2col(x, kernel_size, stride=1, padding=0, threshold=None):
    """Conv patches of x [B, C, H, W], ternarized or bit-sliced and packed, without materialising im2col.

    Rows are output positions (b, oy, ox), columns (c, ky, kx): the order of F.unfold and of
    weight.flatten(1). With a float threshold >= 0 (float x): returns (pos, neg), each [B*OH*OW, KW].
    With threshold=None and uint8 x: returns the 8 bitplanes [8, B*OH*OW, KW] of the unsigned values
    (pass them as a_pos with a_neg=None to ternary_gemm_triton). Also returns (OH, OW).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [B, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    B, C, H, W = x.shape
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    OH, OW = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    if OH < 1 or OW < 1 or stride < 1 or padding < 0:
        raise ValueError(f"bad conv geometry: input {H}x{W}, kernel {kh}x{kw}, stride {stride}, padding {padding}")
    _check_device(x)
    R, K = B * OH * OW, C * kh * kw
    geometry = (OH, OW, kh, kw, H, W, stride, padding, True)
    if threshold is None:
        if x.dtype != torch.uint8:
            raise TypeError(f"bit-serial packing takes uint8 input, got {x.dtype}")
        if K <= 32 and W + 2 * padding <= 32 and R:   # the first conv of small images: a faster way, same planes
            return _pack_pixel_patches(x, OH, OW, kh, kw, stride, padding), (OH, OW)
        planes, _ = _launch_pack(x, R, K, geometry, mode=3, bits=8)
        return planes, (OH, OW)
    if not x.is_floating_point():
        raise TypeError(f"a threshold needs float input, got {x.dtype}")
    _check_threshold(threshold)
    if x.dtype == torch.float64:   # compared at float64 precision: ternarize first, then pack the trits
        pos, neg = _launch_pack(_ternarize_rows(x, threshold), R, K, geometry, mode=0)
    else:
        pos, neg = _launch_pack(x, R, K, geometry, mode=1, threshold=float(threshold))
    return (pos[0], neg[0]), (OH, OW)


def unpack_bitplanes(pos, neg, K):
    """Inverse of pack_bitplanes (torch reference): int8 [R, K] trits."""
    shifts = torch.arange(32, device=pos.device, dtype=torch.int32)
    def bits(p):
        return ((p.view(torch.int32)[..., None] >> shifts) & 1).flatten(-2)[..., :K]
    return (bits(pos) - bits(neg)).to(torch.int8)


def row_major_planes(pos, neg):
    """Planes [R, KW] (any strides) as row-major planes with 16-byte aligned rows (zero padding), the MMA
    kernel's fast layout; planes already so are returned as they are."""
    R, KW = pos.shape
    if _rows_aligned(pos, neg):
        return pos, neg
    planes = torch.zeros((2, R, _row_words(KW)), dtype=torch.uint32, device=pos.device)
    planes[0, :, :KW] = pos
    planes[1, :, :KW] = neg
    return planes[0, :, :KW], planes[1, :, :KW]


def ternary_gemm_triton(a_pos, a_neg, b_pos, b_neg, alpha_p, alpha_n=None, bias=None):
    """C = A @ Weff^T + bias, float32 [M, N], from packed planes (module docstring), multiply-free.

    a_pos, a_neg: uint32 [M, KW], the packed activations (trits). Or a_pos [BITS, M, KW] with
        a_neg=None: unsigned BITS-bit integers given bit-serially (pack_im2col of uint8), exact.
    b_pos, b_neg: uint32 [N, KW], the packed weights.
    alpha_p, alpha_n: float [N]: Weff = alpha_p [W = +1] - alpha_n [W = -1]. alpha_n=None means
        alpha_n = alpha_p (2 popcounts per word pair instead of 3).
    bias: float [N] or None.
    Which kernel runs: choose_kernel(M, N, KW, gpu_spec(device)).
    """
    bit_serial = a_neg is None
    if bit_serial:
        _check_tensor(a_pos, "a_pos", torch.uint32)
        if a_pos.dim() != 3:
            raise ValueError(f"bit-serial a_pos (a_neg=None) must be [BITS, M, KW], got {tuple(a_pos.shape)}")
        if not 1 <= a_pos.shape[0] <= 16:
            raise ValueError(f"bit-serial A takes 1 to 16 bitplanes, got {a_pos.shape[0]}")
    else:
        a_pos, a_neg = _check_pair(a_pos, a_neg, ("a_pos", "a_neg"), 2)
    b_pos, b_neg = _check_pair(b_pos, b_neg, ("b_pos", "b_neg"), 2)
    KW, N = a_pos.shape[-1], b_pos.shape[0]
    if b_pos.shape[1] != KW:
        raise ValueError(f"K words differ: A has {KW} words per row, B has {b_pos.shape[1]}")
    scales = _check_scales(N, alpha_p, alpha_n, bias)
    _check_device(a_pos, b_pos, b_neg, *[t for t in (a_neg, alpha_p, alpha_n, bias) if t is not None])
    a = a_pos if bit_serial else a_pos[None]
    return launch_gemm(a, None if bit_serial else a_neg[None], b_pos, b_neg, *scales)[0]


def pack_conv_weight(w):
    """int8 trits [N, C, KH, KW] (or [N, C]) -> (pos, neg) [N, KH*KW*CW], CW = ceil(C / 32): the K word
    order (ky, kx, channel word) of ternary_conv_packed, channels zero-padded to whole words."""
    if not isinstance(w, torch.Tensor) or w.dtype != torch.int8 or w.dim() not in (2, 4):
        raise TypeError(f"w must be int8 trits [N, C, KH, KW] or [N, C], got {getattr(w, 'dtype', type(w).__name__)} "
                        f"{tuple(getattr(w, 'shape', ()))}")
    if w.dim() == 2:
        w = w[:, :, None, None]
    N, C, KH, KX = w.shape
    CW = triton.cdiv(C, 32)
    w = torch.nn.functional.pad(w.permute(0, 2, 3, 1), (0, 32 * CW - C))
    return pack_bitplanes(w.reshape(N, KH * KX * 32 * CW).contiguous(), k_major=True)   # the tile kernel's layout


def ternary_conv_packed(a_pos, a_neg, w_pos, w_neg, alpha_p, alpha_n=None, bias=None, *, kernel_size=1, stride=1,
                        pool=1, threshold=None, config=None):
    """One conv (or linear) layer of an inference chain on channel-packed maps: a popcount GEMM that can
    max-pool, ternarize and pack its output for the next layer, so that no float activation reaches memory.

    a_pos, a_neg: uint32 [B, H, W, CW] maps of trits, bit j of word w at (b, y, x) = channel 32 w + j
        (any strides: pack_bitplanes(x_nhwc.reshape(-1, C)) viewed as [B, H, W, CW], or this function's
        packed output). Or a_pos [BITS, B, H, W, CW] with a_neg=None: unsigned BITS-bit values, bit-serial.
    w_pos, w_neg: uint32 [N, KH*KW*CW] from pack_conv_weight. A linear layer on a map is the conv whose
        kernel is the whole map (the K order (c, y, x) of flatten); on a vector, a 1x1 conv of a 1x1 map.
    kernel_size, stride: the conv's (no padding). pool: 1, or 2 for 2x2 max-pooling with stride 2 (floor).
    threshold: None gives float32 [B, PH, PW, N], exactly as ternary_gemm_triton on the im2col planes;
        a number t >= 0 gives (pos, neg) uint32 [B, PH, PW, ceil(N / 32)], the output ternarized at t.
    config: None (choose_kernel(..., conv=True) decides), or ("mma", meta) / ("im2col", meta) /
        ("tile", meta). On trits, "mma" and "im2col" gather the patches into planes first and run the MMA
        kernel or the tile kernel on them; "tile" is the implicit GEMM, reading patches in place (chosen
        only when asked for: slower on trits). Bit-serial pixels: "tile" (implicit), or "mma" for one-word
        patches of up to 8 bits.
    """
    bit_serial = a_neg is None
    if bit_serial:
        _check_tensor(a_pos, "a_pos", torch.uint32)
    else:
        a_pos, a_neg = _check_pair(a_pos, a_neg, ("a_pos", "a_neg"), None)
    if a_pos.dim() != (5 if bit_serial else 4):
        raise ValueError(f"a_pos must be [B, H, W, CW]{' (bit-serial: [BITS, B, H, W, CW])' if bit_serial else ''}, "
                         f"got {tuple(a_pos.shape)}")
    a = a_pos if bit_serial else a_pos[None]
    bits, B, H, W, CW = a.shape
    kh, kx = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if stride < 1 or pool not in (1, 2) or kh < 1 or kx < 1 or kh > H or kx > W:
        raise ValueError(f"bad geometry: {H}x{W} map, kernel {kh}x{kx}, stride {stride}, pool {pool} (1 or 2)")
    OH, OW = (H - kh) // stride + 1, (W - kx) // stride + 1
    PH, PW = OH // pool, OW // pool
    if PH < 1 or PW < 1:
        raise ValueError(f"a {OH}x{OW} output cannot be pooled by {pool}")
    w_pos, w_neg = _check_pair(w_pos, w_neg, ("w_pos", "w_neg"), 2)
    N, KW = w_pos.shape
    if KW != kh * kx * CW:
        raise ValueError(f"weights have {KW} words per row, a {kh}x{kx} patch of {CW}-word positions has {kh * kx * CW}")
    scales = _check_scales(N, alpha_p, alpha_n, bias)
    if threshold is not None:
        _check_threshold(threshold)
    _check_device(a_pos, w_pos, w_neg, alpha_p, *[t for t in (a_neg, alpha_n, bias) if t is not None])
    M = B * PH * PW * pool * pool
    if threshold is None:
        out = out_neg = torch.empty((B, PH, PW, N), dtype=torch.float32, device=a_pos.device)
    else:
        out = torch.empty((B, PH, PW, triton.cdiv(N, 32)), dtype=torch.uint32, device=a_pos.device)
        out_neg = torch.empty_like(out)
    if M:
        kind, meta = config or choose_kernel(M, N, KW, gpu_spec(a_pos.device), bit_serial=bit_serial,
                                             symmetric=alpha_n is None, conv=True)
        if kind not in ("im2col", "tile", "mma"):
            raise ValueError(f"config must be ('im2col', 'tile' or 'mma', meta-parameters), got kind {kind!r}")
        if kind == "mma" and bit_serial and (KW != 1 or bits > 8):
            raise ValueError(f"config 'mma' on bit-serial pixels needs one-word patches of up to 8 bits "
                             f"(pack_im2col's, read as a map of 1x1 patches), got {KW} words a row and {bits} bits")
        if kind == "mma" and not _INTERPRET and not mma_available(a_pos.device):
            raise ValueError(f"config 'mma' needs the single-bit MMA of an NVIDIA GPU of sm_80 or later, not "
                             f"{a_pos.device}")
        geometry = (OH, OW, kx, CW, stride)
        if kind == "mma" and bit_serial:
            words = out.shape[-1]
            _launch("bitserial_mma", meta, a_pos, None, w_pos, w_neg, *scales, out.view(-1, words),
                    out_neg.view(-1, words), M=M, conv=geometry, pool=pool, threshold=threshold)
        elif kind in ("im2col", "mma"):
            _conv_by_patches(a_pos, a_neg, w_pos, w_neg, scales, out, out_neg, kind, meta, OH, OW, kx, stride, pool,
                             threshold)
        else:
            _launch("tile", meta, a, None if bit_serial else a_neg[None], w_pos, w_neg, *scales, out, out_neg, M=M,
                    conv=geometry, pool=pool, threshold=threshold)
    return out if threshold is None else (out, out_neg)


def ternary_gemm_reference(a_pos, a_neg, b_pos, b_neg, alpha_p, alpha_n=None, bias=None, K=None):
    """The same result through dense float64 torch ops (for tests and checks)."""
    K = K or 32 * b_pos.shape[1]
    if a_neg is None:
        A = sum(unpack_bitplanes(p, torch.zeros_like(p), K).double() * 2 ** b for b, p in enumerate(a_pos))
    else:
        A = unpack_bitplanes(a_pos, a_neg, K).double()
    Wt = unpack_bitplanes(b_pos, b_neg, K).double()
    ap = alpha_p.double()
    an = ap if alpha_n is None else alpha_n.double()
    weff = ap[:, None] * (Wt == 1) - an[:, None] * (Wt == -1)
    C = A @ weff.T
    return C + bias.double() if bias is not None else C


def _check_row_scales(t, name, rows, quantizing=False):
    """A float tensor [rows]: one scale per row of int8 activations; quantizing: >= 0 too (x / scale)."""
    _check_tensor(t, name, dim=1)
    if t.shape != (rows,) or not t.is_floating_point():
        raise ValueError(f"{name} must be float [{rows}] (one per row), got {t.dtype} {tuple(t.shape)}")
    if quantizing and rows and not bool((t >= 0).all()):
        raise ValueError("scales must be >= 0 and not NaN")


def _int8_rows_torch(x, scale=None):
    """quantize_rows_int8 in torch ops (the same float32 operations as the kernel)."""
    xf = x.float()
    s = xf.abs().amax(1) / 127.0 if scale is None else scale.float()
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    return (xf * inv[:, None]).round().clamp(-127, 127).to(torch.int8), s.contiguous()


def int8_activation(x):
    """x through BitNet b1.58's activation quantizer and back: q * scale per row of the last dimension
    (scale = absmax / 127, q = round(x / scale)), the gradient passed straight through. Torch ops."""
    q, s = _int8_rows_torch(x.detach().reshape(-1, x.shape[-1]))
    xq = (q.float() * s[:, None]).to(x.dtype).view_as(x)
    return x + (xq - x).detach()


def quantize_rows_int8(x, scale=None):
    """float x [M, K] -> (int8 [M, K] in [-127, 127], float32 scales [M]), x ~ q * scale per row.

    The scale is the row's absmax / 127 (BitNet b1.58's per-token quantizer), or the float [M] `scale`
    given; q = round(x / scale) (x times the float32 reciprocal, half to even), clamped. A row of zeros
    gets scale 0 and q 0. One pass of the Triton kernel (a CPU without TRITON_INTERPRET=1: torch ops).
    """
    _check_tensor(x, "x", dim=2)
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    M, K = x.shape
    if scale is not None:
        _check_row_scales(scale, "scale", M, quantizing=True)
        _check_device(x, scale, allow_cpu=True)
    _check_device(x, allow_cpu=True)
    if not _kernel_path(x.device):
        return _int8_rows_torch(x, scale)
    return _launch_quantize(x, scale)


def _launch_quantize(x, scale):
    """quantize_rows_int8 on the kernel, without its checks."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        given = _f32(scale) if scale is not None else s
        block = min(QUANTIZE_ONE_BLOCK, triton.next_power_of_2(K))
        _quantize_rows_kernel[(M,)](x, q, s, given, K, x.stride(0), x.stride(1), q.stride(0),
                                    GIVEN=scale is not None, BLOCK_K=block, ONE_BLOCK=K <= block,
                                    num_warps=min(16, max(4, block // 512)), **EXACT_ROUNDING)
    return q, s


def ternary_gemm_int8(a, a_scale, b_pos, b_neg, alpha_p, alpha_n=None, bias=None, *, config=None):
    """C = (q * scale) @ Weff^T + bias, float32 [M, N], for 8-bit activations and packed ternary weights:
    exact int32 sums on the int8 tensor cores, float64 epilogue rounded once.

    a: int8 [M, K] rows q with their float [M] scales a_scale (quantize_rows_int8's); or float [M, K] rows,
    quantized first by quantize_rows_int8 (a_scale None: per-row absmax; else the scales given). b_pos,
    b_neg: uint32 [N, ceil(K/32)]; scales as in ternary_gemm_triton. config: meta-parameters as
    choose_int8_kernel gives them (a tuning sweep's), None to choose.
    """
    _check_tensor(a, "a", dim=2)
    if a.dtype != torch.int8 and not a.is_floating_point():
        raise TypeError(f"a must be int8 rows or float rows, got {a.dtype}")
    b_pos, b_neg = _check_pair(b_pos, b_neg, ("b_pos", "b_neg"), 2)
    M, K = a.shape
    N = b_pos.shape[0]
    if b_pos.shape[1] != triton.cdiv(K, 32):
        raise ValueError(f"K words differ: a has K = {K} ({triton.cdiv(K, 32)} words), b has {b_pos.shape[1]}")
    if a.dtype == torch.int8 or a_scale is not None:
        _check_row_scales(a_scale, "a_scale", M, quantizing=a.dtype != torch.int8)
    scales = _check_scales(N, alpha_p, alpha_n, bias)
    _check_device(a, b_pos, b_neg, *[t for t in (a_scale, alpha_p, alpha_n, bias) if t is not None])
    return _launch_int8(a if a.stride(1) == 1 else a.contiguous(), None if a_scale is None else _f32(a_scale),
                        b_pos, b_neg, *scales, config=config)


def _launch_int8(a, a_scale, b_pos, b_neg, ap, an, b, config=None):
    """ternary_gemm_int8 without its checks: a with unit K stride, scales float32 contiguous."""
    M, K = a.shape
    N = b_pos.shape[0]
    c = torch.empty((M, N), dtype=torch.float32, device=a.device)
    if M == 0 or N == 0:
        return c
    _need_triton()
    meta = dict(config or _int8_kernel_for(M, N, K, gpu_spec(a.device), an is None))
    if meta.pop("KIND", "tensor") == "gemv":
        _run_int8_gemv(a, a_scale, b_pos, b_neg, ap, an, b, c, {"SPLIT_K": 1, **meta})
        return c
    if a.dtype != torch.int8:
        a, a_scale = _launch_quantize(a, a_scale)
    meta = {"UNPACK": 0, "SPLIT_K": 1, **meta}
    kernel = _run_int8(a, a_scale, b_pos, b_neg, ap, an, b, c, meta)
    if meta["UNPACK"] == 1 and not _INTERPRET and inline_asm_layout(kernel.asm["ttgir"]) != "ok":
        # Triton chose the layout of this tile: the unpack's 32 columns of a word are not in one thread, and
        # c holds wrong sums. A config asked for is refused; the dispatch's own runs again on UNPACK 0
        if config is not None:
            raise ValueError(f"config {config}: Triton splits the inline-PTX unpack's 32 columns of a word "
                             f"over threads at this tile ({inline_asm_layout(kernel.asm['ttgir'])}); use UNPACK 0")
        _run_int8(a, a_scale, b_pos, b_neg, ap, an, b, c, dict(meta, UNPACK=0))
    return c


def _run_int8_gemv(a, a_scale, b_pos, b_neg, ap, an, b, c, meta):
    """The bit-serial GEMV: the rows' bitplanes (float rows quantized on the way), then the popcounts; on
    sm_90 the second launch overlaps the first's end (PDL)."""
    M, K = a.shape
    N, KW = b_pos.shape
    pdl = _pdl(a.device)
    planes = torch.empty((M, 8, KW), dtype=torch.uint32, device=a.device)
    quantize = a.dtype != torch.int8
    scale = torch.empty(M, dtype=torch.float32, device=a.device) if quantize else a_scale
    block_w = 4 if _INTERPRET else INT8_PLANES_WORDS
    _int8_row_planes_kernel[(triton.cdiv(KW, block_w), M)](
        a, scale, scale if a_scale is None else a_scale, planes, K, KW, *a.stride(), QUANTIZE=quantize,
        GIVEN=a_scale is not None, BLOCK_W=block_w, PDL=pdl, num_warps=4, launch_pdl=pdl, **EXACT_ROUNDING)
    grid = (triton.cdiv(N, meta["BLOCK_N"]), M, meta["SPLIT_K"])
    ws, locks = _workspace(a.device, 2 * M * N, grid[0] * M) if meta["SPLIT_K"] > 1 else (c, c)
    _int8_gemv_kernel[grid](planes, scale, b_pos, b_neg, ap, ap if an is None else an, ap if b is None else b, c,
                            ws, locks, M, N, KW, *b_pos.stride(), *c.stride(), SYMMETRIC=an is None,
                            HAS_BIAS=b is not None, PDL=pdl, EMULATE=_INTERPRET, launch_pdl=pdl,
                            **EXACT_ROUNDING, **meta)


def _run_int8(a, a_scale, b_pos, b_neg, ap, an, b, c, meta):
    """One launch of the int8 kernel with these meta-parameters; the compiled kernel."""
    M, K = a.shape
    N = b_pos.shape[0]
    grid = (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
    ws, locks = _workspace(a.device, 2 * M * N, grid[0] * grid[1]) if meta["SPLIT_K"] > 1 else (c, c)
    return _int8_ternary_kernel[grid](a, a_scale, b_pos, b_neg, ap, ap if an is None else an,
                                      ap if b is None else b, c, ws, locks, M, N, K, b_pos.shape[1], *a.stride(),
                                      *b_pos.stride(), *c.stride(), SYMMETRIC=an is None, HAS_BIAS=b is not None,
                                      EMULATE=_INTERPRET, **EXACT_ROUNDING, **meta)


@functools.lru_cache(maxsize=None)
def inline_asm_layout(ttgir):
    """"ok" if every packed inline asm of a compiled kernel (pack > 1: the int8 kernel's unpack) gets its elements
    as it assumes: each group of `pack` consecutive elements of a thread consecutive along the last dimension,
    starting at a multiple of pack (a layout whose last dimension is the fastest, in-thread runs a multiple of
    pack); else the first layout that is not; "none" without such asm. ttgir: the kernel's asm["ttgir"]."""
    blocked = r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\].*order = \[([\d, ]+)\]\}>$"
    layouts = {name: (size, order) for name, size, order in re.findall(blocked, ttgir, re.M)}
    groups = [(int(pack), enc) for pack, enc in re.findall(
        r"tt\.elementwise_inline_asm .*packed_element = (\d+) .*-> tensor<[\dx]+xi8, (#\w+)>", ttgir)]
    for pack, enc in groups:
        if pack == 1:
            continue
        if enc not in layouts:
            return enc
        size, order = ([int(v) for v in t.split(",")] for t in layouts[enc])
        if order[0] != len(size) - 1 or size[-1] % pack:
            return f"{enc} {layouts[enc]}"
    return "ok" if any(pack > 1 for pack, _ in groups) else "none"


# -----------------------------------------------------------------------------
# weight quantizer rules (here, not in bt_quant.py, so that TernaryLinearTriton stands alone)


def ternary_thresholds(weight, rule="channel", t=0.7, delta=0.02):
    """Dead zone per output channel: 'channel' gives t * mean|W_c| (TWN), 'global' the fixed delta."""
    w = weight.detach().flatten(1)
    if rule == "channel":
        return t * w.abs().mean(1)
    if rule == "global":
        return torch.full((w.shape[0],), float(delta), dtype=w.dtype, device=w.device)
    raise ValueError(f"unknown threshold rule {rule!r}: use 'channel' or 'global'")


def initial_alphas(weight, thresholds):
    """TTQ scales from the weights: mean of W_c above +delta_c and of |W_c| below -delta_c.

    A channel with no weight past its threshold falls back to mean|W_c|.
    """
    w = weight.detach().flatten(1)
    d = thresholds[:, None]
    fallback = w.abs().mean(1)
    def mean_where(mask):
        cnt = mask.sum(1)
        return torch.where(cnt > 0, (w.abs() * mask).sum(1) / cnt.clamp(min=1), fallback)
    return mean_where(w > d), mean_where(w < -d)


def weight_ste_grads(g_weff, weight, alpha_p, alpha_n, thresholds, clip):
    """TTQ backward of Weff = alpha_p [W > d] - alpha_n [W < -d]: grads of latent W, alpha_p, alpha_n."""
    w = weight.flatten(1)
    pos = w > thresholds[:, None]
    neg = w < -thresholds[:, None]
    g = g_weff.flatten(1)
    g_ap = (g * pos).sum(1)
    g_an = -(g * neg).sum(1)
    scale = torch.where(pos, alpha_p[:, None], torch.where(neg, alpha_n[:, None], torch.ones_like(w)))
    g_w = g * scale * (w.abs() <= clip)
    return g_w.view_as(weight), g_ap, g_an


# -----------------------------------------------------------------------------
# the layer's forward: custom operators for torch.compile, and a torch path for CPUs without the kernels


def _pack_rows_impl(x: torch.Tensor, threshold: float,
                    row_thresholds: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_pack(x, threshold if row_thresholds is None else row_thresholds)


def _gemm_impl(a_pos: torch.Tensor, a_neg: torch.Tensor, b_pos: torch.Tensor, b_neg: torch.Tensor,
               alpha_p: torch.Tensor, alpha_n: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               out_dtype: torch.dtype) -> torch.Tensor:
    # the epilogue stores in out_dtype: the float64 result rounded to float32, then to out_dtype (to nearest)
    # on the store. Triton's interpreter truncates to bfloat16: there the rounding is torch's.
    store = torch.float32 if _INTERPRET and out_dtype == torch.bfloat16 else out_dtype
    out = torch.empty((a_pos.shape[0], b_pos.shape[0]), dtype=store, device=a_pos.device)
    return launch_gemm(a_pos[None], a_neg[None], b_pos, b_neg, alpha_p, alpha_n, bias, out=out)[0].to(out_dtype)


# The launches as PyTorch custom operators: torch.compile places them in its graph as opaque calls
# (fake implementations give the outputs' shapes, strides and dtypes without running anything). Eager
# calls skip the dispatcher and run the same functions directly.
_pack_rows_op = torch.library.custom_op("bt_kernel::pack_rows", _pack_rows_impl, mutates_args=())
_gemm_op = torch.library.custom_op("bt_kernel::gemm", _gemm_impl, mutates_args=())


@_pack_rows_op.register_fake
def _(x, threshold, row_thresholds):
    R, KW = x.shape[0], triton.cdiv(x.shape[1], 32)
    return tuple(x.new_empty((R, _row_words(KW)), dtype=torch.uint32)[:, :KW] for _ in range(2))


@_gemm_op.register_fake
def _(a_pos, a_neg, b_pos, b_neg, alpha_p, alpha_n, bias, out_dtype):
    return a_pos.new_empty((a_pos.shape[0], b_pos.shape[0]), dtype=out_dtype)


def _gemm_int8_impl(a: torch.Tensor, a_scale: Optional[torch.Tensor], b_pos: torch.Tensor, b_neg: torch.Tensor,
                    alpha_p: torch.Tensor, alpha_n: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    return ternary_gemm_int8(a, a_scale, b_pos, b_neg, alpha_p, alpha_n, bias)


_gemm_int8_op = torch.library.custom_op("bt_kernel::gemm_int8", _gemm_int8_impl, mutates_args=())


@_gemm_int8_op.register_fake
def _(a, a_scale, b_pos, b_neg, alpha_p, alpha_n, bias):
    return a.new_empty((a.shape[0], b_pos.shape[0]), dtype=torch.float32)


def _kernel_path(device):
    """True where the layers run the Triton kernels: CUDA, or the CPU under TRITON_INTERPRET=1."""
    return _NO_TRITON is None and (device.type == "cuda" or (_INTERPRET and device.type == "cpu"))


def _pack_rows(x, threshold):
    """Row-major planes of float x [R, K] at a scalar or per-row threshold."""
    per_row = isinstance(threshold, torch.Tensor)
    if torch.compiler.is_compiling():
        return _pack_rows_op(x, 0.0 if per_row else float(threshold), threshold if per_row else None)
    return launch_pack(x, threshold)


def prepare_weight(weight, thresholds):
    """A weight [N, K] as the layer's forward reads it: (pos, neg) bitplanes where the kernels run, int8
    trits (a 1-tuple) on a CPU without them. No autograd."""
    weight, thresholds = weight.detach(), thresholds.detach()
    if _kernel_path(weight.device):
        return _pack_rows(weight, thresholds)
    return (_ternarize_rows(weight, thresholds),)


def _dense_ternary(a, w, alpha_p, alpha_n, bias):
    """The kernels' sums and epilogue in float64 torch ops: Sp, Sn exact, then alpha_p Sp - alpha_n Sn + bias."""
    a = a.double()
    s_p, s_n = a @ (w == 1).double().T, a @ (w == -1).double().T
    c = alpha_p.double() * (s_p - s_n) if alpha_n is None else alpha_p.double() * s_p - alpha_n.double() * s_n
    return c if bias is None else c + bias.double()


def ternary_linear(x, act_delta, weight, alpha_p, alpha_n=None, bias=None, act_bits=None):
    """q(x) @ Weff^T + bias in x's dtype (any leading dimensions), no autograd. weight: prepare_weight's.
    act_bits=8: x as int8 rows with absmax scales (quantize_rows_int8) on the int8 kernel, act_delta unused.
    Where the kernels do not run (a CPU without TRITON_INTERPRET=1, or without triton) the same integer
    sums and float64 epilogue run in torch ops: the same result."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    ap, an, b = _f32(alpha_p), _f32(alpha_n), _f32(bias)
    if act_bits == 8:
        if len(weight) == 1:
            q, s = quantize_rows_int8(x2)
            y = _dense_ternary(q, weight[0], ap, an, None) * s.double()[:, None]
            y = (y if b is None else y + b.double()).float()
        elif torch.compiler.is_compiling():
            y = _gemm_int8_op(x2, None, *weight, ap, an, b)   # float rows: quantized by the op
        else:
            y = _launch_int8(x2 if x2.stride(-1) == 1 else x2.contiguous(), None, *weight, ap, an, b)
        y = y.to(x.dtype)
    elif len(weight) == 1:
        y = _dense_ternary(_ternarize_rows(x2, act_delta), weight[0], ap, an, b).float().to(x.dtype)
    else:
        a_pos, a_neg = _pack_rows(x2, act_delta)
        gemm = _gemm_op if torch.compiler.is_compiling() else _gemm_impl
        y = gemm(a_pos, a_neg, *weight, ap, an, b, x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# -----------------------------------------------------------------------------
# autograd and the nn.Module


class TernaryGemmFunction(torch.autograd.Function):
    """y = q(x) @ Weff^T + bias, forward on the popcount kernels, backward the STE surrogate.

    q(x) ternarizes the input with dead zone act_delta (STE: gradient passes where |x| <= act_clip);
    Weff = alpha_p [W > d] - alpha_n [W < -d] with per-channel d (TTQ gradients for W, alpha_p, alpha_n).
    prepared: the weight as prepare_weight gives it, when the caller holds it already.
    """

    @staticmethod
    def forward(ctx, x, weight, alpha_p, alpha_n, bias, thresholds, act_delta, act_clip, weight_clip,
                prepared=None, act_bits=None):
        if not x.is_floating_point():
            raise TypeError(f"input must be float, got {x.dtype}")
        prepared = prepared or prepare_weight(weight, thresholds)   # compared in the weight's precision
        ctx.save_for_backward(x, weight, alpha_p, alpha_n, thresholds)
        ctx.has_bias, ctx.act_delta, ctx.act_clip, ctx.weight_clip = bias is not None, act_delta, act_clip, weight_clip
        ctx.act_bits = act_bits
        return ternary_linear(x, act_delta, prepared, alpha_p, alpha_n, bias, act_bits)

    @staticmethod
    def backward(ctx, gy):
        x, weight, alpha_p, alpha_n, thresholds = ctx.saved_tensors
        K = weight.shape[1]
        x2 = x.reshape(-1, K)
        g2 = gy.reshape(-1, weight.shape[0]).to(x.dtype)
        pos = weight > thresholds[:, None]
        neg = weight < -thresholds[:, None]
        weff = alpha_p[:, None] * pos - alpha_n[:, None] * neg
        gx = g2 @ weff.to(g2.dtype)
        if ctx.act_bits == 8:   # 8-bit activations: the dequantized rows, the gradient passed straight through
            xq = int8_activation(x2.detach())
        else:
            xq = torch.sign(x2) * (x2.abs() > ctx.act_delta)
            gx = gx * (x2.abs() <= ctx.act_clip)
        g_w, g_ap, g_an = weight_ste_grads(g2.T @ xq, weight, alpha_p, alpha_n, thresholds, ctx.weight_clip)
        gb = g2.sum(0) if ctx.has_bias else None
        return gx.view_as(x), g_w, g_ap, g_an, gb, None, None, None, None, None, None


class TernaryWeights(nn.Module):
    """Base of the ternary layers: latent float weight, optional bias, per-channel alpha_p and alpha_n.

    alpha_p/alpha_n start from the weights (initial_alphas), not from 1. Weights are ternarized with the
    dead zone of delta_rule ('channel': delta_t * mean|W_c|, 'global': delta); the layer input, when
    act_delta is not None, with dead zone act_delta (STE where |x| <= act_clip), or with act_bits=8 to int8
    with absmax scales instead.
    """

    def __init__(self, weight_shape, bias, delta_rule, delta_t, delta, act_delta, act_clip, weight_clip,
                 act_bits=None):
        super().__init__()
        ternary_thresholds(torch.zeros(1, 1), delta_rule)   # reject an unknown rule now
        if act_delta is not None and not act_delta >= 0:
            raise ValueError(f"act_delta must be >= 0 or None, got {act_delta}")
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None (act_delta decides) or 8, got {act_bits!r}")
        self.delta_rule, self.delta_t, self.delta = delta_rule, delta_t, delta
        self.act_delta, self.act_clip, self.weight_clip, self.act_bits = act_delta, act_clip, weight_clip, act_bits
        out_channels = weight_shape[0]
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.alpha_p = nn.Parameter(torch.empty(out_channels))
        self.alpha_n = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def _input_repr(self):
        return f"act_delta={self.act_delta}" + (f", act_bits={self.act_bits}" if self.act_bits else "")

    def reset_parameters(self):
        # the init of nn.Linear / nn.Conv2d
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        self.init_alphas()

    @torch.no_grad()
    def init_alphas(self):
        ap, an = initial_alphas(self.weight, self.thresholds())
        self.alpha_p.copy_(ap)
        self.alpha_n.copy_(an)

    def thresholds(self):
        return ternary_thresholds(self.weight, self.delta_rule, self.delta_t, self.delta)

    def ternary_weight(self):
        """The trits of the weight, int8 [out_channels, ...]."""
        d = self.thresholds().view(-1, *[1] * (self.weight.dim() - 1))
        w = self.weight.detach()
        return ((w > d).to(torch.int8) - (w < -d).to(torch.int8))


class TernaryLinearTriton(TernaryWeights):
    """nn.Linear with ternary weights and ternary inputs, forward on the popcount kernels.

    Same parameters and state_dict keys as bt_quant.TernaryLinear, so a model switches path as it is.
    Input float32, bfloat16, float16 or float64 [..., in_features]; output in the input's dtype. When
    autograd does not need the weight (eval(), or no_grad), the packed weight is kept and reused until a
    parameter changes (in place too: version counters), the mode or the device; a forward then packs only
    its input. On a CPU without TRITON_INTERPRET=1 the same sums run in torch ops (ternary_linear).
    act_bits=8: the input is quantized to int8 per row (absmax, quantize_rows_int8) instead of to trits, and
    runs on the int8 kernel (W1.58A8); act_delta is then unused.
    """

    def __init__(self, in_features, out_features, bias=True, *, delta_rule="channel", delta_t=0.7,
                 delta=0.02, act_delta=0.5, act_clip=1.0, weight_clip=1.0, act_bits=None):
        if act_delta is None and act_bits is None:
            raise ValueError("TernaryLinearTriton packs its input as trits: act_delta must be a number >= 0 "
                             "(or act_bits=8)")
        self.in_features, self.out_features = in_features, out_features
        super().__init__((out_features, in_features), bias, delta_rule, delta_t, delta, act_delta, act_clip,
                         weight_clip, act_bits)
        self._packed = None

    def _packed_weight(self):
        """(prepared weight, alpha_p, alpha_n, bias), rebuilt when any parameter or threshold setting changed."""
        params = [p for p in (self.weight, self.alpha_p, self.alpha_n, self.bias) if p is not None]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params) + (
            self.delta_rule, self.delta_t, self.delta)
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                weights = (prepare_weight(self.weight, self.thresholds()),
                           *(_f32(t) for t in (self.alpha_p, self.alpha_n, self.bias)))
            self._packed = (key, weights)
        return self._packed[1]

    def train(self, mode=True):
        self._packed = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._packed = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"input must be float, got {x.dtype}")
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if torch.compiler.is_compiling():   # the weight is packed in the graph (the cache is Python-side state)
            packed = None
        elif self.training and needs_grad:  # training steps change the weight: nothing is kept
            packed = self._packed = None
        else:
            packed = self._packed_weight()
        if needs_grad:
            return TernaryGemmFunction.apply(x, self.weight, self.alpha_p, self.alpha_n, self.bias, self.thresholds(),
                                             self.act_delta, self.act_clip, self.weight_clip,
                                             packed[0] if packed else None, self.act_bits)
        if packed is None:
            packed = (prepare_weight(self.weight, self.thresholds()), self.alpha_p, self.alpha_n, self.bias)
        return ternary_linear(x, self.act_delta, *packed, self.act_bits)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"delta_rule={self.delta_rule}, {self._input_repr()}")


# the Triton kernels by kind, for tools that compile or inspect them (bt_bench.py's SASS report)
KERNELS = dict(tile=_ternary_gemm_kernel, gemv=_ternary_gemv_kernel, mma=_ternary_mma_kernel,
               bitserial_mma=_bitserial_mma_kernel, int8=_int8_ternary_kernel, int8_gemv=_int8_gemv_kernel,
               int8_planes=_int8_row_planes_kernel, quantize_rows=_quantize_rows_kernel)
