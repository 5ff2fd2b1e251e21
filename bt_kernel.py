"""bt_kernel.py: multiply-free balanced ternary GEMMs in Triton (bitplanes, AND + popcount).

Needs only torch and triton: copy this file alone into another project.

    from bt_kernel import pack_bitplanes, ternary_gemm_triton
    a_pos, a_neg = pack_bitplanes(x, threshold=0.5)   # float [M, K]: ternarize and pack in one pass
    w_pos, w_neg = pack_bitplanes(w_trits)            # int8 [N, K] in {-1, 0, +1}
    y = ternary_gemm_triton(a_pos, a_neg, w_pos, w_neg, alpha_p, alpha_n, bias)   # float32 [M, N]

    python bt_kernel.py            # the kernel benchmark tables of `make bench` (needs a GPU)

On the CPU the kernels run under Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported.

Packed layout
-------------
A ternary matrix T [R, K] becomes two uint32 bitplanes `pos` and `neg`, each of shape [R, KW],
KW = ceil(K / 32):
    bit j of pos[r, w] is 1  iff  T[r, 32 * w + j] == +1
    bit j of neg[r, w] is 1  iff  T[r, 32 * w + j] == -1
Bit 0 is the least significant bit. Padding columns (32 * KW > K) are 0 in both planes and no bit is
ever set in both planes. The shape is logical; the memory order is free (any strides are accepted).
pack_bitplanes stores the words K-word-major (a contiguous [KW, R] tensor, returned transposed as
[R, KW]) because the GEMM loads, at each K step, one word for every row of its tile: consecutive rows
are then consecutive addresses. Unsigned integers (8-bit pixels) are packed bit-serially: planes
[BITS, R, KW], plane b holding bit b of every value.

The GEMM
--------
    C[m, n] = sum_k A[m, k] * Weff[n, k] + bias[n],   Weff = alpha_p[n] [W = +1] - alpha_n[n] [W = -1]
With Sp = sum_k A[m, k] [W[n, k] = +1] and Sn = sum_k A[m, k] [W[n, k] = -1], C = alpha_p Sp - alpha_n Sn + bias.
Per pair of 32-trit words, since the pos and neg planes never overlap:
    P1 = popc((ap & bp) | (an & bn))      products equal to +1
    P2 = popc((ap & bn) | (an & bp))      products equal to -1
    P3 = popc(ap & (bp | bn))             a = +1 against a nonzero weight
    Sp = P3 - P2,  Sn = P3 - P1           3 popcounts for learned asymmetric scales (TTQ)
    Sp - Sn = P1 - P2                     2 popcounts when alpha_n is None (one scale per channel)
Bit-serial A (an = 0): Sp = popc(ap & bp), Sn = popc(ap & bn), shifted left by the bit's weight.
The sums are int32. The epilogue is float64 and every product in it is exact (a float32 scale times an
integer below 2^29), so the output, rounded once to float32, does not depend on FMA contraction: the
numpy path of bt_infer.py reproduces it bit for bit.

The popcount is a SWAR sequence on uint32: exact in the interpreter (libdevice.popc is not), and
compiled to one POPC instruction per word on sm_90 (on int32 the shifts are arithmetic and it is not).
"""
import math
import os

import torch
import torch.nn as nn
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# -----------------------------------------------------------------------------
# popcount


@triton.jit
def _popc(x):
    # x: uint32. Logical shifts on uint32 are what lets the compiler see a popcount (POPC).
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


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
):
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


def _new_planes(bits, rows, kw, device):
    # K-word-major storage [BITS, KW, R], viewed as [BITS, R, KW]
    return torch.empty((bits, kw, rows), dtype=torch.uint32, device=device).transpose(1, 2)


def _launch_pack(x4, R, K, geometry, mode, threshold=0.0, thr=None, bits=1):
    """Pack x4 (viewed [B, C, H, W]) into planes [bits, R, KW]; no checks (callers check)."""
    KW = triton.cdiv(K, 32)
    pos = _new_planes(bits, R, KW, x4.device)
    neg = pos if mode == 3 else _new_planes(1, R, KW, x4.device)
    OH, OW, KH, KWD, H, W, stride, pad, im2col = geometry
    BLOCK_R, BLOCK_W = (16, 4) if _INTERPRET else (32, 4)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(KW, BLOCK_W))
    _pack_kernel[grid](
        x4, thr if thr is not None else x4, pos, neg,
        R, K, KW, OH, OW, KH, KWD, H, W, stride, pad, float(threshold),
        *x4.stride(), *pos.stride(),
        MODE=mode, BITS=bits, IM2COL=im2col, BLOCK_R=BLOCK_R, BLOCK_W=BLOCK_W, num_warps=4,
    )
    return pos, neg


def _check_device(*tensors):
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"tensors are on different devices: {dev} and {t.device}")
    if dev.type == "cpu" and not _INTERPRET:
        raise ValueError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton "
                         "(or move the tensors to a CUDA device)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {dev}: use cuda (or cpu with TRITON_INTERPRET=1)")


def _check_matrix(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, K], got shape {tuple(x.shape)}")


def _check_int8_trits(x, name):
    if x.numel() and bool((x.abs() > 1).any()):
        bad = x[x.abs() > 1][0].item()
        raise ValueError(f"{name} holds {bad}: int8 trits must be -1, 0 or +1")


def pack_bitplanes(x, threshold=None):
    """Pack a ternary matrix into (pos, neg) uint32 bitplanes [R, ceil(K/32)] (layout: module docstring).

    x: int8 [R, K] with values in {-1, 0, +1}; or a float tensor [R, K] with `threshold` >= 0, which is
    ternarized on the fly (+1 where x > threshold, -1 where x < -threshold) in the same pass. `threshold`
    may also be a float tensor [R]: one threshold per row (per output channel of a weight matrix).
    """
    _check_matrix(x, "x")
    R, K = x.shape
    if K < 1:
        raise ValueError("x must have at least one column (K >= 1)")
    if x.dtype == torch.int8:
        if threshold is not None:
            raise ValueError("threshold is for float input; int8 input must already hold trits")
        _check_device(x)
        _check_int8_trits(x, "x")
        mode, thr, t = 0, None, 0.0
    elif x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        if threshold is None:
            raise ValueError("float input needs a threshold (x > t -> +1, x < -t -> -1)")
        if isinstance(threshold, torch.Tensor):
            if threshold.shape != (R,):
                raise ValueError(f"per-row threshold must have shape ({R},), got {tuple(threshold.shape)}")
            _check_device(x, threshold)
            mode, thr, t = 2, threshold.detach().float().contiguous(), 0.0
        else:
            t = float(threshold)
            if not t >= 0:
                raise ValueError(f"threshold must be >= 0, got {threshold}")
            _check_device(x)
            mode, thr = 1, None
        if x.dtype == torch.float64:   # the kernel compares in float32
            x = x.float()
    else:
        raise TypeError(f"x must be int8 trits or a float tensor, got {x.dtype}")
    geometry = (1, 1, 1, 1, 1, 1, 1, 0, False)
    pos, neg = _launch_pack(x.view(R, K, 1, 1) if x.is_contiguous() else x[:, :, None, None], R, K,
                            geometry, mode, threshold=t, thr=thr)
    return pos[0], neg[0]


def pack_im2col(x, kernel_size, stride=1, padding=0, threshold=None):
    """Conv patches of x [B, C, H, W], ternarized or bit-sliced and packed, without materialising im2col.

    Rows are output positions (b, oy, ox), columns (c, ky, kx): the order of F.unfold and of
    weight.flatten(1). With a float threshold (float x): returns (pos, neg), each [B*OH*OW, KW].
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
        planes, _ = _launch_pack(x, R, K, geometry, mode=3, bits=8)
        return planes, (OH, OW)
    if not x.is_floating_point():
        raise TypeError(f"a threshold needs float input, got {x.dtype}")
    pos, neg = _launch_pack(x.float() if x.dtype == torch.float64 else x, R, K, geometry, mode=1,
                            threshold=float(threshold))
    return (pos[0], neg[0]), (OH, OW)


def unpack_bitplanes(pos, neg, K):
    """Inverse of pack_bitplanes (torch reference): int8 [R, K] trits."""
    shifts = torch.arange(32, device=pos.device, dtype=torch.int32)
    def bits(p):
        return ((p.view(torch.int32)[..., None] >> shifts) & 1).flatten(-2)[..., :K]
    return (bits(pos) - bits(neg)).to(torch.int8)


# -----------------------------------------------------------------------------
# GEMM: two kernels, one for tiles of many rows (outer products, one K word a step) and one for
# few rows (a [BLOCK_K, BLOCK_N] block of weight words a step: many bytes in flight for the GEMV case)


@triton.jit
def _epilogue(acc_p, acc_n, offs_m, offs_n, alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, M, N,
              stride_cm, stride_cn, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr):
    n_mask = offs_n < N
    # float64 with exact products (float32 scale x int32 sum): the result does not depend on FMA contraction
    ap = tl.load(alpha_p_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float64)
    c = ap[None, :] * acc_p.to(tl.float64)
    if not SYMMETRIC:
        an = tl.load(alpha_n_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float64)
        c = c - an[None, :] * acc_n.to(tl.float64)
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float64)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, c.to(tl.float32), mask=(offs_m[:, None] < M) & n_mask[None, :])


@triton.jit
def _ternary_gemm_kernel(
    # pointers
    a_pos_ptr, a_neg_ptr,         # activations [A_BITS, M, KW] uint32 (a_neg unused when A_BITS > 1)
    b_pos_ptr, b_neg_ptr,         # weights [N, KW] uint32
    alpha_p_ptr, alpha_n_ptr,     # per-channel scales [N] float32
    bias_ptr,                     # [N] float32
    c_ptr,                        # output [M, N] float32
    # sizes
    M, N, KW,
    # strides (elements)
    stride_abit, stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_cm, stride_cn,
    # meta-parameters
    A_BITS: tl.constexpr,         # 1: A is trits (pos, neg planes); > 1: unsigned A_BITS-bit ints, bit-serial
    SYMMETRIC: tl.constexpr,      # one scale per channel: 2 popcounts per word pair instead of 3
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
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

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap out-of-range rows/columns onto valid ones: loads need no mask, the store is masked
    am = offs_m % M
    bn = offs_n % N
    acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_n = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    b_pos_ptrs = b_pos_ptr + bn * stride_bn
    b_neg_ptrs = b_neg_ptr + bn * stride_bn
    for bit in tl.static_range(A_BITS):
        a_pos_ptrs = a_pos_ptr + bit * stride_abit + am * stride_am
        a_neg_ptrs = a_neg_ptr + am * stride_am
        part_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        part_n = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, KW):
            ap = tl.load(a_pos_ptrs + k * stride_ak)[:, None]
            wp = tl.load(b_pos_ptrs + k * stride_bk)[None, :]
            wn = tl.load(b_neg_ptrs + k * stride_bk)[None, :]
            if A_BITS > 1:
                part_p += _popc(ap & wp)
                part_n += _popc(ap & wn)
            else:
                an = tl.load(a_neg_ptrs + k * stride_ak)[:, None]
                p1 = _popc((ap & wp) | (an & wn))
                p2 = _popc((ap & wn) | (an & wp))
                if SYMMETRIC:
                    part_p += p1 - p2
                else:
                    p3 = _popc(ap & (wp | wn))
                    part_p += p3 - p2
                    part_n += p3 - p1
        acc_p += part_p << bit
        acc_n += part_n << bit
    if SYMMETRIC and A_BITS > 1:
        acc_p = acc_p - acc_n
    _epilogue(acc_p, acc_n, offs_m, offs_n, alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, M, N,
              stride_cm, stride_cn, SYMMETRIC, HAS_BIAS)


@triton.jit
def _ternary_gemv_kernel(
    # pointers
    a_pos_ptr, a_neg_ptr,         # activations [M, KW] uint32, trits
    b_pos_ptr, b_neg_ptr,         # weights [N, KW] uint32
    alpha_p_ptr, alpha_n_ptr, bias_ptr,
    c_ptr,
    # sizes
    M, N, KW,
    # strides (elements)
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_cm, stride_cn,
    # meta-parameters
    SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    am = offs_m % M
    bn = offs_n % N
    acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_n = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, KW, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < KW                              # words past KW load as 0 and add nothing
        a_offs = am[:, None] * stride_am + kk[None, :] * stride_ak
        b_offs = kk[:, None] * stride_bk + bn[None, :] * stride_bn
        ap = tl.load(a_pos_ptr + a_offs, mask=k_ok[None, :], other=0)[:, :, None]
        an = tl.load(a_neg_ptr + a_offs, mask=k_ok[None, :], other=0)[:, :, None]
        wp = tl.load(b_pos_ptr + b_offs, mask=k_ok[:, None], other=0)[None, :, :]
        wn = tl.load(b_neg_ptr + b_offs, mask=k_ok[:, None], other=0)[None, :, :]
        p1 = _popc((ap & wp) | (an & wn))
        p2 = _popc((ap & wn) | (an & wp))
        if SYMMETRIC:
            acc_p += tl.sum(p1 - p2, axis=1)
        else:
            p3 = _popc(ap & (wp | wn))
            acc_p += tl.sum(p3 - p2, axis=1)
            acc_n += tl.sum(p3 - p1, axis=1)
    _epilogue(acc_p, acc_n, offs_m, offs_n, alpha_p_ptr, alpha_n_ptr, bias_ptr, c_ptr, M, N,
              stride_cm, stride_cn, SYMMETRIC, HAS_BIAS)


def _gemm_config(M, N, KW, bit_serial):
    """(kernel, meta-parameters) by shape; measured choices on an H200 in `python bt_kernel.py --tune`."""
    if _INTERPRET:   # small tiles keep the numpy emulation quick
        if M <= 4 and not bit_serial:
            return "gemv", dict(BLOCK_M=triton.next_power_of_2(M), BLOCK_N=32, BLOCK_K=8, num_warps=4)
        return "tile", dict(BLOCK_M=32, BLOCK_N=32, GROUP_M=8, num_warps=4)
    if M <= 4 and not bit_serial:
        return "gemv", dict(BLOCK_M=triton.next_power_of_2(M), BLOCK_N=64, BLOCK_K=16, num_warps=4)
    if M <= 32:
        return "tile", dict(BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=64, GROUP_M=1, num_warps=4)
    return "tile", dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8)


def _launch_gemm(a_pos, a_neg, b_pos, b_neg, alpha_p, alpha_n, bias, config=None):
    """a_pos [BITS, M, KW] (a_neg [1, M, KW] or None for unsigned bit-serial A); no checks."""
    bits, M, KW = a_pos.shape
    N = b_pos.shape[0]
    c = torch.empty((M, N), dtype=torch.float32, device=a_pos.device)
    if M == 0 or N == 0:
        return c
    symmetric = alpha_n is None
    an = a_pos if a_neg is None else a_neg
    kind, meta = config or _gemm_config(M, N, KW, a_neg is None)
    common = dict(SYMMETRIC=symmetric, HAS_BIAS=bias is not None)
    args = (a_pos, an, b_pos, b_neg, alpha_p, alpha_p if symmetric else alpha_n,
            alpha_p if bias is None else bias, c, M, N, KW)
    if kind == "gemv":
        grid = (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))
        _ternary_gemv_kernel[grid](*args, a_pos.stride(1), a_pos.stride(2), b_pos.stride(0), b_pos.stride(1),
                                   c.stride(0), c.stride(1), **common, **meta)
    else:
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _ternary_gemm_kernel[grid](*args, a_pos.stride(0), a_pos.stride(1), a_pos.stride(2),
                                   b_pos.stride(0), b_pos.stride(1), c.stride(0), c.stride(1),
                                   A_BITS=bits, **common, **meta)
    return c


def ternary_gemm_triton(a_pos, a_neg, b_pos, b_neg, alpha_p, alpha_n=None, bias=None):
    """C = A @ Weff^T + bias, float32 [M, N], from packed planes (module docstring), multiply-free.

    a_pos, a_neg: uint32 [M, KW], the packed activations (trits). Or a_pos [BITS, M, KW] with
        a_neg=None: unsigned BITS-bit integers given bit-serially (pack_im2col of uint8), exact.
    b_pos, b_neg: uint32 [N, KW], the packed weights.
    alpha_p, alpha_n: float [N]: Weff = alpha_p [W = +1] - alpha_n [W = -1]. alpha_n=None means
        alpha_n = alpha_p (2 popcounts per word pair instead of 3).
    bias: float [N] or None.
    """
    for name, t in (("a_pos", a_pos), ("b_pos", b_pos), ("b_neg", b_neg), ("alpha_p", alpha_p)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    bit_serial = a_neg is None
    if bit_serial:
        if a_pos.dim() != 3:
            raise ValueError(f"bit-serial a_pos (a_neg=None) must be [BITS, M, KW], got {tuple(a_pos.shape)}")
        if not 1 <= a_pos.shape[0] <= 16:
            raise ValueError(f"bit-serial A takes 1 to 16 bitplanes, got {a_pos.shape[0]}")
        planes_a = (("a_pos", a_pos),)
    else:
        _check_matrix(a_pos, "a_pos")
        _check_matrix(a_neg, "a_neg")
        if a_pos.shape != a_neg.shape:
            raise ValueError(f"a_pos and a_neg differ in shape: {tuple(a_pos.shape)} vs {tuple(a_neg.shape)}")
        planes_a = (("a_pos", a_pos), ("a_neg", a_neg))
    _check_matrix(b_pos, "b_pos")
    _check_matrix(b_neg, "b_neg")
    if b_pos.shape != b_neg.shape:
        raise ValueError(f"b_pos and b_neg differ in shape: {tuple(b_pos.shape)} vs {tuple(b_neg.shape)}")
    for name, t in planes_a + (("b_pos", b_pos), ("b_neg", b_neg)):
        if t.dtype != torch.uint32:
            raise TypeError(f"{name} must be uint32 bitplanes (from pack_bitplanes), got {t.dtype}")
    KW, N = a_pos.shape[-1], b_pos.shape[0]
    if b_pos.shape[1] != KW:
        raise ValueError(f"K words differ: A has {KW} words per row, B has {b_pos.shape[1]}")
    scales = [("alpha_p", alpha_p)] + [(n, t) for n, t in (("alpha_n", alpha_n), ("bias", bias)) if t is not None]
    for name, t in scales:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) (one per output channel), got {tuple(t.shape)}")
    _check_device(*[t for _, t in planes_a], b_pos, b_neg, *[t for _, t in scales])
    f32 = [None if t is None else t.detach().float().contiguous() for t in (alpha_p, alpha_n, bias)]
    a = a_pos if bit_serial else a_pos[None]
    return _launch_gemm(a, None if bit_serial else a_neg[None], b_pos, b_neg, *f32)


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


def _weight_ste_grads(g_weff, weight, alpha_p, alpha_n, thresholds, clip):
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
# autograd and the nn.Module


class TernaryGemmFunction(torch.autograd.Function):
    """y = q(x) @ Weff^T + bias, forward on the popcount kernels, backward the STE surrogate.

    q(x) ternarizes the input with dead zone act_delta (STE: gradient passes where |x| <= act_clip);
    Weff = alpha_p [W > d] - alpha_n [W < -d] with per-channel d (TTQ gradients for W, alpha_p, alpha_n).
    """

    @staticmethod
    def forward(ctx, x, weight, alpha_p, alpha_n, bias, thresholds, act_delta, act_clip, weight_clip):
        K = weight.shape[1]
        x2 = x.reshape(-1, K)
        if not x2.is_floating_point():
            raise TypeError(f"input must be float, got {x.dtype}")
        geometry = (1, 1, 1, 1, 1, 1, 1, 0, False)
        R = x2.shape[0]
        x4 = x2.float() if x2.dtype == torch.float64 else x2
        a_pos, a_neg = _launch_pack(x4.view(R, K, 1, 1) if x4.is_contiguous() else x4[:, :, None, None],
                                    R, K, geometry, mode=1, threshold=act_delta)
        w_pos, w_neg = _launch_pack(weight.detach().float().contiguous().view(-1, K, 1, 1), weight.shape[0], K,
                                    geometry, mode=2, thr=thresholds.detach().float().contiguous())
        y = _launch_gemm(a_pos, a_neg, w_pos[0], w_neg[0], alpha_p.detach().float().contiguous(),
                         alpha_n.detach().float().contiguous(),
                         None if bias is None else bias.detach().float().contiguous())
        ctx.save_for_backward(x, weight, alpha_p, alpha_n, thresholds)
        ctx.has_bias, ctx.act_delta, ctx.act_clip, ctx.weight_clip = bias is not None, act_delta, act_clip, weight_clip
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, weight, alpha_p, alpha_n, thresholds = ctx.saved_tensors
        K = weight.shape[1]
        x2 = x.reshape(-1, K)
        g2 = gy.reshape(-1, weight.shape[0]).to(x.dtype)
        xq = torch.sign(x2) * (x2.abs() > ctx.act_delta)
        pos = weight > thresholds[:, None]
        neg = weight < -thresholds[:, None]
        weff = alpha_p[:, None] * pos - alpha_n[:, None] * neg
        gx = (g2 @ weff.to(g2.dtype)) * (x2.abs() <= ctx.act_clip)
        g_w, g_ap, g_an = _weight_ste_grads(g2.T @ xq, weight, alpha_p, alpha_n, thresholds, ctx.weight_clip)
        gb = g2.sum(0) if ctx.has_bias else None
        return gx.view_as(x), g_w, g_ap, g_an, gb, None, None, None, None


class TernaryWeights(nn.Module):
    """Base of the ternary layers: latent float weight, optional bias, per-channel alpha_p and alpha_n.

    alpha_p/alpha_n start from the weights (initial_alphas), not from 1. Weights are ternarized with the
    dead zone of delta_rule ('channel': delta_t * mean|W_c|, 'global': delta); the layer input, when
    act_delta is not None, with dead zone act_delta (STE where |x| <= act_clip).
    """

    def __init__(self, weight_shape, bias, delta_rule, delta_t, delta, act_delta, act_clip, weight_clip):
        super().__init__()
        ternary_thresholds(torch.zeros(1, 1), delta_rule)   # reject an unknown rule now
        if act_delta is not None and not act_delta >= 0:
            raise ValueError(f"act_delta must be >= 0 or None, got {act_delta}")
        self.delta_rule, self.delta_t, self.delta = delta_rule, delta_t, delta
        self.act_delta, self.act_clip, self.weight_clip = act_delta, act_clip, weight_clip
        out_channels = weight_shape[0]
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.alpha_p = nn.Parameter(torch.empty(out_channels))
        self.alpha_n = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

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
    """

    def __init__(self, in_features, out_features, bias=True, *, delta_rule="channel", delta_t=0.7,
                 delta=0.02, act_delta=0.5, act_clip=1.0, weight_clip=1.0):
        if act_delta is None:
            raise ValueError("TernaryLinearTriton packs its input as trits: act_delta must be a number >= 0")
        self.in_features, self.out_features = in_features, out_features
        super().__init__((out_features, in_features), bias, delta_rule, delta_t, delta, act_delta, act_clip,
                         weight_clip)

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        return TernaryGemmFunction.apply(x, self.weight, self.alpha_p, self.alpha_n, self.bias, self.thresholds(),
                                         self.act_delta, self.act_clip, self.weight_clip)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"delta_rule={self.delta_rule}, act_delta={self.act_delta}")
