"""bt_bench.py: the numbers behind README.md and PERFORMANCE.md (needs a CUDA GPU, except --sass).

    python bt_bench.py                  # ceilings, pack bandwidth, GEMM tables against torch bf16/fp32 (and gemlite)
    python bt_bench.py --infer EXPORT   # the inference engine against the same network in float on cuDNN, per layer
    python bt_bench.py --tune --shapes 16x8192x8192   # sweep kernel configs, fastest first
    python bt_bench.py --tune --int8    # the int8 kernels' configs (compiled in parallel processes first)
    python bt_bench.py --int8 --shapes 1x4096x4096   # the W1.58A8 table, these rows only
    python bt_bench.py --sass DIR       # SASS for sm_90 and its instruction counts (no GPU needed)

`make bench` runs the tables, two short training runs and --infer. gemlite, if importable, is timed beside.
May import every file of the project; none imports it.
"""
import argparse
import collections
import concurrent.futures
import datetime
import math
import multiprocessing
import os
import re
import statistics
import subprocess

import torch
import torch.nn as nn
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.testing import do_bench

import bt_infer
import bt_kernel as bk
import bt_train

# -----------------------------------------------------------------------------
# ceilings and timing


def _mma_count(M, N, KW, bits=0):
    """Single-bit MMAs of the MMA kernel for [M, N] outputs over KW words: 4 per [16 x 8] outputs and 256
    trits, every tile whole (the tables' floors); bits: bit-serial A of one word, 2 a plane."""
    if bits:
        return triton.cdiv(M, 16) * triton.cdiv(N, 8) * 2 * bits
    return triton.cdiv(M, 16) * triton.cdiv(N, 8) * triton.cdiv(KW, 8) * 4


def _sm_ghz():
    """The SM clock the per-clock rates are quoted at (Triton's driver reports it in kHz)."""
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
        return props["sm_clock_rate"] / 1e6
    except Exception:
        return getattr(torch.cuda.get_device_properties(0), "clock_rate", 0) / 1e6 or float("nan")


@triton.jit
def _popc_rate_kernel(out_ptr, seed, ITERS, BLOCK: tl.constexpr):
    # 4 independent dependency chains per element, 8 popcounts per chain per trip: popc throughput, not latency
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x0 = offs.to(tl.uint32) ^ seed
    x1 = x0 * 3
    x2 = x0 * 5
    x3 = x0 * 7
    for _ in range(ITERS):
        for _j in tl.static_range(8):
            x0 = x0 + bk.popc(x0).to(tl.uint32)
            x1 = x1 + bk.popc(x1).to(tl.uint32)
            x2 = x2 + bk.popc(x2).to(tl.uint32)
            x3 = x3 + bk.popc(x3).to(tl.uint32)
    tl.store(out_ptr + offs, x0 ^ x1 ^ x2 ^ x3)


@triton.jit
def _mma_rate_kernel(out_ptr, seed, ITERS, WARPS: tl.constexpr):
    # 4 independent accumulator chains per warp: single-bit MMA throughput, not latency
    lane = tl.program_id(0) * 32 * WARPS + tl.arange(0, 32 * WARPS)
    a0 = lane.to(tl.uint32) * 747796405 + seed
    a1 = a0 * 3
    a2 = a0 * 5
    a3 = a0 * 7
    z = tl.zeros(lane.shape, dtype=tl.int32)
    c0, c1, c2, c3 = (z, z, z, z), (z, z, z, z), (z, z, z, z), (z, z, z, z)
    for _ in range(ITERS):
        c0 = bk.and_popc_mma(a0, a1, a2, a3, a0, a1, c0[0], c0[1], c0[2], c0[3], False)
        c1 = bk.and_popc_mma(a0, a1, a2, a3, a1, a0, c1[0], c1[1], c1[2], c1[3], False)
        c2 = bk.and_popc_mma(a1, a0, a2, a3, a2, a3, c2[0], c2[1], c2[2], c2[3], False)
        c3 = bk.and_popc_mma(a0, a1, a3, a2, a3, a2, c3[0], c3[1], c3[2], c3[3], False)
    s = c0[0] ^ c0[1] ^ c0[2] ^ c0[3] ^ c1[0] ^ c1[1] ^ c1[2] ^ c1[3]
    s = s ^ c2[0] ^ c2[1] ^ c2[2] ^ c2[3] ^ c3[0] ^ c3[1] ^ c3[2] ^ c3[3]
    tl.store(out_ptr + lane, s)


def _graph_ms(fn, calls=10, rep=100):
    """Kernel time per call from CUDA-graph replays of `calls` calls (fn(i) may rotate inputs): no launch overhead."""
    for i in range(calls):   # warm up / compile outside the capture
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    return do_bench(g.replay, warmup=max(5, rep // 4), rep=rep, return_mode="median") / calls


def _eager_ms(fn):
    return do_bench(lambda: fn(0), return_mode="median")


def _ceilings():
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / (do_bench(lambda: y.copy_(x), return_mode="median") * 1e-3)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    BLOCK, iters = 256, 256
    grid = sms * 32
    out = torch.empty(grid * BLOCK, dtype=torch.uint32, device="cuda")
    ms = do_bench(lambda: _popc_rate_kernel[(grid,)](out, 12345, iters, BLOCK=BLOCK, num_warps=8), return_mode="median")
    popc = grid * BLOCK * iters * 8 * 4 / (ms * 1e-3)
    mma = 0.0
    if bk.mma_available(torch.device("cuda")):
        warps, grid = 16, sms * 4
        out = torch.empty(grid * 32 * warps, dtype=torch.int32, device="cuda")
        ms = do_bench(lambda: _mma_rate_kernel[(grid,)](out, 12345, iters, WARPS=warps, num_warps=warps),
                      return_mode="median")
        mma = grid * warps * iters * 4 / (ms * 1e-3)
    return bw, popc, mma


def _gemm_inputs(M, N, K, sets, device="cuda"):
    a = torch.randint(-1, 2, (M, K), dtype=torch.int8, device=device)
    ap, an = bk.pack_bitplanes(a)
    ws = [bk.pack_bitplanes(torch.randint(-1, 2, (N, K), dtype=torch.int8, device=device)) for _ in range(sets)]
    alpha_p, alpha_n = torch.rand(N, device=device) + 0.5, torch.rand(N, device=device) + 0.5
    return a, ap, an, ws, alpha_p, alpha_n


def _rotation(bytes_per_call):
    # weight sets rotated through a timing so that they do not sit in L2 (as a real model's layers would not)
    l2 = bk.gpu_spec(torch.device("cuda")).l2_bytes or 60 << 20
    return max(1, min(10, math.ceil(3 * l2 / max(bytes_per_call, 1))))


def _gemlite():
    """The nearest peer's module if installed, else None (its import also fails where it finds no GPU)."""
    try:
        import gemlite.helper
        return gemlite
    except Exception:
        return None


def _gemlite_ternary(w_trits, kind="A16W158_INT"):
    """gemlite's ternary layer of int8 trits [N, K], or None: A16W158_INT (fp16 activations) or
    A8W158_INT_dynamic (int8 activations, quantized in the call)."""
    gemlite = _gemlite()
    if gemlite is None:
        return None
    layer = getattr(gemlite.helper, kind)(device=w_trits.device, dtype=torch.float16).from_weights(
        w_trits.half(), torch.tensor(1.0, device=w_trits.device))
    if isinstance(getattr(layer, "scales", None), torch.Tensor):   # gemlite 0.6 leaves them on the CPU
        layer.scales.data = layer.scales.data.to(w_trits.device)
    return layer


def _bench_gemm_row(M, N, K, bw, popc_rate, mma_rate):
    KW = triton.cdiv(K, 32)
    _, ap, an, ws, alpha_p, alpha_n = _gemm_inputs(M, N, K, _rotation(2 * N * KW * 4))
    c = torch.empty(M, N, device="cuda")
    t3 = lambda i: bk.launch_gemm(ap[None], an[None], *ws[i % len(ws)], alpha_p, alpha_n, None, out=c)
    t2 = lambda i: bk.launch_gemm(ap[None], an[None], *ws[i % len(ws)], alpha_p, None, None, out=c)
    x = torch.randn(M, K, device="cuda")
    xh = x.half()   # the activations gemlite's A16 layer takes, and pack+t3 with it
    def packed(i):
        p, n = bk.launch_pack(xh, 0.5)
        return bk.launch_gemm(p[None], n[None], *ws[i % len(ws)], alpha_p, alpha_n, None, out=c)
    wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(_rotation(2 * N * K))]
    xb = x.bfloat16()
    bf16 = lambda i: torch.nn.functional.linear(xb, wb[i % len(wb)])
    wf = [w.float() for w in wb[:_rotation(4 * N * K)]]
    f32 = lambda i: torch.nn.functional.linear(x, wf[i % len(wf)])
    contenders = [("t3", t3), ("t2", t2), ("pack+t3", packed), ("bf16", bf16), ("fp32", f32)]
    try:
        w0 = bk.unpack_bitplanes(*ws[0], K)
        layers = [_gemlite_ternary(w0)] + [_gemlite_ternary(bk.unpack_bitplanes(*w, K)) for w in ws[1:]]   # same rotation
        if layers[0] is not None:
            ref = xh.float() @ w0.float().T
            err = ((layers[0](xh).float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:   # time no peer that computes something else
                raise RuntimeError(f"relative error {err:.1e} against a float reference")
            contenders.append(("gemlite", lambda i: layers[i % len(layers)](xh)))
    except Exception as e:   # a broken peer costs its column, not the table
        print(f"gemlite skipped at {M}x{N}x{K}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    torch.backends.cuda.matmul.allow_tf32 = False
    ms = {name: _graph_ms(fn) for name, fn in contenders}
    ms["t3 eager"], ms["bf16 eager"] = _eager_ms(t3), _eager_ms(bf16)
    t = ms["t3"] * 1e-3
    tops = 2 * M * N * K / t / 1e12
    kind, _ = bk.choose_kernel(M, N, KW, bk.gpu_spec(c.device), row_major_weights=ws[0][0].stride(1) == 1)
    if kind == "mma":   # 4 MMAs per [16 x 8] outputs and 256 trits, every row tile whole
        pct_unit = 100 * _mma_count(M, N, KW) / t / mma_rate
    else:
        pct_unit = 100 * M * N * KW * 3 / t / popc_rate
    pct_bw = 100 * (2 * (M + N) * KW * 4 + M * N * 4) / t / bw
    return ms, tops, pct_unit, pct_bw, kind


TUNE_CONFIGS = {
    # 2D row loop (1, 2 or 4 rows a program, K loop pipelined or not; plain, then with carry-save adders), then
    # the 3D kernel
    "gemv": [dict(BLOCK_M=bm, ROW_LOOP=True, BLOCK_N=bn, BLOCK_K=bk, STAGES=st, SPLIT_K=sk, num_warps=w)
             for bm in (1, 2, 4) for bn, bk in ((16, 128), (32, 64), (64, 32), (128, 16), (64, 16), (32, 32))
             for st in (1, 3) for sk in (1, 4) for w in (4, 8)]
            + [dict(BLOCK_M=bm, ROW_LOOP=True, BLOCK_N=bn, BLOCK_K=bk, STAGES=st, SPLIT_K=sk, CSA=True, num_warps=4)
               for bm in (1, 2, 4) for bn, bk in ((32, 8), (32, 16), (64, 16), (32, 32)) for st in (1, 3)
               for sk in (1, 4)]
            + [dict(BLOCK_M=bm, ROW_LOOP=False, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=4) for bm in (2, 4)
               for bn, bk in ((16, 64), (32, 64), (64, 32)) for sk in (1, 4)],
    "tile": [dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, SPLIT_K=sk, CSA=csa, num_warps=w) for bm, bn, w in
             ((16, 64, 4), (16, 128, 4), (16, 64, 8), (16, 128, 8), (32, 128, 8)) for sk in (1, 4)
             for csa in (False, True)]
            # thin tiles, one column a thread
            + [dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, SPLIT_K=sk, CSA=csa, num_warps=bn // 32) for bm in (4, 8)
               for bn in (32, 64, 128) for sk in (1, 4) for csa in (False, True)],
    # the single-bit MMA kernel (sm_80 and later)
    "mma": [dict(WARPS=w, K_WARPS=kw, N_TILES=nt, STAGES=st, SPLIT_K=sk)
            for w, kw in ((2, 1), (4, 1), (4, 2), (4, 4), (8, 4), (8, 8)) for nt in (1, 2, 4) for st in (1, 2, 4)
            for sk in (1, 2)],
}


def _tune(shapes):
    print(f"{'M':>6} {'N':>6} {'K':>6}  {'kernel':6} config -> us (3 popc, graph replay)")
    for M, N, K in shapes:
        KW = triton.cdiv(K, 32)
        _, ap, an, ws, alpha_p, alpha_n = _gemm_inputs(M, N, K, _rotation(2 * N * KW * 4))
        c = torch.empty(M, N, device="cuda")
        results = []
        for kind, configs in TUNE_CONFIGS.items():
            for meta in configs:
                if kind == "gemv" and (M > 256 or meta["BLOCK_M"] > max(M, 1) * 2):
                    continue
                if kind == "tile" and (meta["BLOCK_M"] > 2 * max(M, 16) or (M >= 1024 and meta["SPLIT_K"] > 1)):
                    continue
                if kind == "mma" and not bk.mma_available(c.device):
                    continue
                fn = lambda i: bk.launch_gemm(ap[None], an[None], *ws[i % len(ws)], alpha_p, alpha_n, None,
                                              config=(kind, meta), out=c)
                try:
                    us = _graph_ms(fn, rep=25) * 1e3
                    compiled = fn(0)[1]
                    regs, spills = compiled.n_regs, compiled.n_spills
                except Exception:   # out of resources etc.
                    us, regs, spills = float("inf"), 0, 0
                results.append((us, kind, meta, regs, spills))
        results.sort(key=lambda r: r[0])
        for us, kind, meta, regs, spills in results[:5]:
            print(f"{M:>6} {N:>6} {K:>6}  {kind:6} {meta} -> {us:9.2f} us  regs {regs} spills {spills}")
        default = bk.choose_kernel(M, N, KW, bk.gpu_spec(c.device), row_major_weights=ws[0][0].stride(1) == 1)
        fn = lambda i: bk.launch_gemm(ap[None], an[None], *ws[i % len(ws)], alpha_p, alpha_n, None, out=c)
        print(f"{M:>6} {N:>6} {K:>6}  default {default} -> {_graph_ms(fn) * 1e3:9.2f} us", flush=True)


# int8 kernel configs: for few rows the bit-serial GEMV on the CUDA cores or 16-row tiles (mma.sync), K split
# across programs where tiles are few; wgmma tiles from 64 rows; the weight's bits unpacked by tensor ops
# (UNPACK 0) or inline PTX (1)
INT8_TUNE_CONFIGS = {
    # the CUDA cores' bit-serial GEMV, one row a program (at most 16 rows), K split across programs or not
    "gemv": [dict(KIND="gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=w) for bn in (16, 32, 64)
             for bk in (8, 16, 32) for sk in (1, 2, 4) for w in (2, 4, 8) if bn * bk >= 32 * w],
    "few": [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st, SPLIT_K=sk, UNPACK=u)
            for bn in (32, 64, 128) for bk in (128, 256) for st in (3,) for sk in (1, 2, 4, 8) for u in (0, 1)],
    "mid": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, num_warps=4, num_stages=st, SPLIT_K=sk, UNPACK=u)
            for bm in (32, 64) for bn in (64, 128) for st in (3, 4) for sk in (1, 2, 4) for u in (0, 1)],
    "many": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, SPLIT_K=1, UNPACK=u)
             for bm in (128, 256) for bn in (64, 128) for bk in (64, 128) for w in (4, 8) for st in (3, 4)
             for u in (0, 1) if not (bm == 256 and w == 4)],
}
_INT8_OPERANDS = {}


def _int8_operands(M, N, K):
    """int8 rows with their scales, rotated weight planes and scales of one shape, made once a process."""
    if (M, N, K) not in _INT8_OPERANDS:
        planes = [bk.pack_bitplanes(torch.randint(-1, 2, (N, K), dtype=torch.int8, device="cuda"))
                  for _ in range(_rotation(N * K // 4))]
        q, s = bk.quantize_rows_int8(torch.randn(M, K, device="cuda"))
        _INT8_OPERANDS[(M, N, K)] = (q, s, planes, torch.rand(N, device="cuda") + 0.5, torch.rand(N, device="cuda") + 0.5)
    return _INT8_OPERANDS[(M, N, K)]


def _int8_configs(M):
    if M <= 16:
        return INT8_TUNE_CONFIGS["gemv"] + INT8_TUNE_CONFIGS["few"]
    return INT8_TUNE_CONFIGS["mid" if M <= 64 else "many"]


def _int8_family(meta):
    return "gemv" if meta.get("KIND") == "gemv" else f"tensor cores, unpack {meta['UNPACK']}"


def _compile_int8(job):
    """One launch of a sweep's config (in a worker process: Triton caches the compiled kernel on disk)."""
    M, N, K, symmetric, meta = job
    q, s, planes, ap, an = _int8_operands(M, N, K)
    try:
        bk.ternary_gemm_int8(q, s, *planes[0], ap, None if symmetric else an, config=meta)
        torch.cuda.synchronize()
    except Exception:   # out of resources etc.: the sweep reports it
        pass


def _precompile_int8(shapes):
    """Compile every config of the sweep in parallel worker processes first: the sweep then loads each from
    Triton's disk cache instead of compiling some hundreds of kernels one after another."""
    jobs = [(M, N, K, sym, meta) for M, N, K in shapes for sym in (False, True) for meta in _int8_configs(M)]
    workers = max(1, min(16, (os.cpu_count() or 2) - 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile_int8, jobs, chunksize=4))


def _tune_int8(shapes):
    """The int8 kernels' configs (the GEMV's blocks, the tensor cores' tiles) at each shape and scale kind,
    int8 rows given: the five fastest and the best of each kernel, each checked against the default's output
    (the same exact sums), then the default."""
    try:
        _precompile_int8(shapes)
    except Exception as e:   # the sweep still runs, compiling as it goes
        print(f"parallel compile failed ({type(e).__name__}: {e}); compiling one config at a time")
    print(f"{'M':>6} {'N':>6} {'K':>6}  scales  config -> us (int8 rows given, graph replay)")
    for M, N, K in shapes:
        q, s, planes, ap, an = _int8_operands(M, N, K)
        for tag, alpha_n in (("ttq", an), ("one", None)):
            want = bk.ternary_gemm_int8(q, s, *planes[0], ap, alpha_n)
            results = []
            for meta in _int8_configs(M):
                fn = lambda i: bk.ternary_gemm_int8(q, s, *planes[i % len(planes)], ap, alpha_n, config=meta)
                try:
                    exact = torch.equal(fn(0), want)
                    us = _graph_ms(fn, rep=25) * 1e3
                except Exception:   # out of resources etc.
                    us, exact = float("inf"), False
                results.append((us, meta, exact))
            results.sort(key=lambda r: r[0])
            for us, meta, exact in results[:5]:
                print(f"{M:>6} {N:>6} {K:>6}  {tag:6}  {meta} -> {us:9.2f} us{'' if exact else '  WRONG SUMS'}")
            for family in sorted({_int8_family(meta) for _, meta, _ in results}):   # the best of each kernel
                us, meta, exact = min((r for r in results if _int8_family(r[1]) == family), key=lambda r: r[0])
                if (us, meta, exact) not in results[:5]:
                    print(f"{M:>6} {N:>6} {K:>6}  {tag:6}  {meta} -> {us:9.2f} us{'' if exact else '  WRONG SUMS'}")
            wrong = sum(not exact for us, _, exact in results if us < float("inf"))
            default = bk.choose_int8_kernel(M, N, K, bk.gpu_spec(q.device), symmetric=alpha_n is None)
            fn = lambda i: bk.ternary_gemm_int8(q, s, *planes[i % len(planes)], ap, alpha_n)
            print(f"{M:>6} {N:>6} {K:>6}  {tag:6}  default {default} -> {_graph_ms(fn) * 1e3:9.2f} us; "
                  f"{wrong} configs with wrong sums", flush=True)
        _INT8_OPERANDS.clear()
        torch.cuda.empty_cache()


def _mma_lanes_ok(ttgir, warps):
    """"ok" if every operand of the inline MMA has the layout the fragments assume: one element a thread,
    element i in lane i % 32 of warp i // 32 (else what Triton chose)."""
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<.*>)$", ttgir, re.M))
    want = (f"#ttg.blocked<{{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [{warps}], "
            f"order = [0]}}>")
    seen = set()
    for line in ttgir.splitlines():
        if "tt.elementwise_inline_asm" in line and "mma.sync" in line:
            seen.update(re.findall(r"tensor<\d+xi32, (#\w+)>", line))
    bad = sorted(layouts.get(name, name) for name in seen if layouts.get(name) != want)
    return "ok" if seen and not bad else (bad[0] if bad else "none")


def _sass_report(folder):
    """Compile the GEMM kernels for sm_90 (no GPU needed: Triton's own ptxas), dump SASS, count instructions.

    What matters: one POPC per popcount, no SWAR emulation (dozens of SHF/LOP3/IMAD per word), no spills;
    BAR and LDS count shared-memory layout conversions. Each kernel is specialized as the library launches
    it on large operands: K-word-major planes (bk.pack_bitplanes(k_major=True)) (unit row and weight-column strides, the K
    strides 16-divisible), channel-packed maps (unit word stride) for the conv, 16-divisible pointers and
    sizes, the default GEMV configs for M = 1 (row-major and K-word-major weights), M = 16 (row-major
    weights: four rows per program, the K loop pipelined; K-word-major weights: two rows per program and
    carry-save adders; TTQ scales and one scale) and the 3D kernel (row-major weights, 33 to 256 rows), the
    thin carry-save tiles of large M, the conv layers of the inference engine (trits, bit-serial pixels), and the
    int8 kernels and row quantizer as launched (EXACT_ROUNDING: PTXFMA, the PTX's float FMAs, must be 0)."""
    os.makedirs(folder, exist_ok=True)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    def signature(fn, constexprs):
        floats = ("alpha", "bias") if constexprs.get("PACK_OUT") else ("alpha", "bias", "c_ptr")
        ptr = lambda n: "*fp32" if n.startswith(floats) else "*i32" if n in ("ws_ptr", "lock_ptr") else "*u32"
        scalar = lambda n: "fp32" if n == "threshold" else "i32"
        own = {}
        if fn is bk.KERNELS["int8"]:   # int8 rows, their scales
            own = dict(a_ptr="*i8", scale_ptr="*fp32")
        if fn is bk.KERNELS["int8_planes"]:   # bf16 rows quantized on the way to their bitplanes
            own = dict(x_ptr="*bf16", scale_ptr="*fp32", given_ptr="*fp32")
        if fn is bk.KERNELS["int8_gemv"]:
            own = dict(scale_ptr="*fp32")
        if fn is bk.KERNELS["quantize_rows"]:
            own = dict(x_ptr="*bf16", q_ptr="*i8", scale_ptr="*fp32", given_ptr="*fp32")
        return {n: "constexpr" if n in constexprs else own.get(n) or (ptr(n) if n.endswith("_ptr") else scalar(n))
                for n in fn.arg_names}
    plain = dict(A_BITS=1, BIT_SERIAL=False, HAS_BIAS=True, IMPLICIT=False, POOL=1, PACK_OUT=False, CSA=False,
                 BLOCK_M=16, GROUP_M=8, SPLIT_K=1)
    # launch specializations: strides equal to 1, and which other strides are 16-divisible
    gemv = (dict(stride_ak=1, stride_bk=1, stride_cn=1), ("stride_am", "stride_bn", "stride_cm"))   # row-major W
    gemv_kmajor = (dict(stride_ak=1, stride_bn=1, stride_cn=1), ("stride_am", "stride_bk", "stride_cm"))
    gemv16 = (dict(stride_am=1, stride_bk=1, stride_cn=1), ("stride_ak", "stride_bn", "stride_cm"))   # 16 rows
    gemv_rows = (dict(stride_am=1, stride_bn=1, stride_cn=1), ("stride_ak", "stride_bk", "stride_cm"))
    rows = (dict(stride_ab=1, stride_bn=1, stride_cn=1), ("stride_abit", "stride_ak", "stride_bk", "stride_cm"))
    maps = (dict(stride_ak=1, stride_bn=1, stride_cn=1), ("stride_abit", "stride_bk"))   # map strides: CW multiples
    pixels = (dict(maps[0], KW=1, KX=1, CW=1, conv_stride=1, stride_bk=1), ("stride_abit",))   # conv1: 25 taps, 1 word
    m1 = dict(HAS_BIAS=True, BLOCK_M=1, ROW_LOOP=True, BLOCK_N=16, BLOCK_K=128, SPLIT_K=1, PDL=True, ONE_ROW=True,
              STAGES=1, CSA=False)
    m16 = dict(m1, BLOCK_M=4, BLOCK_N=64, BLOCK_K=16, ONE_ROW=False, STAGES=3)   # 4 rows a program, pipelined
    m16_kmajor = dict(m16, BLOCK_M=2, BLOCK_N=32, BLOCK_K=16, STAGES=1, CSA=True)   # 2 rows, carry-save adders
    m64_3d = dict(m16, BLOCK_M=2, ROW_LOOP=False, BLOCK_N=64, BLOCK_K=32, STAGES=1)
    kernels = [("gemv_3popc", bk.KERNELS["gemv"], dict(m1, SYMMETRIC=False), gemv, 8),
               ("gemv_2popc", bk.KERNELS["gemv"], dict(m1, SYMMETRIC=True), gemv, 8),
               ("gemv_3popc_kmajor", bk.KERNELS["gemv"], dict(m1, SYMMETRIC=False), gemv_kmajor, 4),
               ("gemv16_3popc", bk.KERNELS["gemv"], dict(m16, SYMMETRIC=False), gemv16, 4),
               ("gemv16_2popc", bk.KERNELS["gemv"], dict(m16, SYMMETRIC=True, BLOCK_K=32), gemv16, 4),
               ("gemv16_3popc_kmajor", bk.KERNELS["gemv"], dict(m16_kmajor, SYMMETRIC=False), gemv_rows, 4),
               ("gemv16_2popc_kmajor", bk.KERNELS["gemv"], dict(m16_kmajor, SYMMETRIC=True), gemv_rows, 4),
               ("gemv2rows_3popc", bk.KERNELS["gemv"], dict(m64_3d, SYMMETRIC=False), gemv16, 4),
               ("tile_3popc", bk.KERNELS["tile"], dict(plain, SYMMETRIC=False, BLOCK_N=128), rows, 4),
               ("tile_2popc", bk.KERNELS["tile"], dict(plain, SYMMETRIC=True, BLOCK_N=128), rows, 4),
               ("tile_3popc_csa", bk.KERNELS["tile"], dict(plain, SYMMETRIC=False, BLOCK_M=4, BLOCK_N=64, CSA=True),
                rows, 2),
               ("tile_2popc_csa", bk.KERNELS["tile"], dict(plain, SYMMETRIC=True, BLOCK_M=8, BLOCK_N=64, CSA=True),
                rows, 2),
               ("tile_bitserial8", bk.KERNELS["tile"], dict(plain, A_BITS=8, BIT_SERIAL=True, SYMMETRIC=False,
                                                              BLOCK_N=32), rows, 4),
               ("conv_pool_pack", bk.KERNELS["tile"], dict(plain, SYMMETRIC=False, BLOCK_N=128, IMPLICIT=True, POOL=2,
                                                             PACK_OUT=True), maps, 4),
               ("conv_bitserial8_pool_pack", bk.KERNELS["tile"], dict(plain, A_BITS=8, BIT_SERIAL=True, SYMMETRIC=False,
                                                                        BLOCK_M=8, BLOCK_N=64, IMPLICIT=True, POOL=2,
                                                                        PACK_OUT=True), pixels, 1)]
    # the MMA kernel as launched (row-major operands: unit K strides) at 16x8192x8192 (TTQ scales; one scale:
    # 4 warps splitting K, PDL and the L2 prefetch), at 4096^3 (4 n-tiles a warp) and as the engine's conv2
    # (pooled, packed output)
    mma = dict(HAS_BIAS=True, WARPS=2, K_WARPS=1, N_TILES=2, SPLIT_K=1, STAGES=4, POOL=1, PACK_OUT=False,
               ALIGNED=True, EMULATE=False, PDL=False, PREFETCH=0)
    rows_major = (dict(stride_ak=1, stride_bk=1, stride_cn=1), ("stride_am", "stride_bn", "stride_cm"))
    kernels += [("mma_3popc", bk.KERNELS["mma"], dict(mma, SYMMETRIC=False), rows_major, 2),
                ("mma_2popc_kwarps", bk.KERNELS["mma"], dict(mma, SYMMETRIC=True, WARPS=4, K_WARPS=4, N_TILES=1,
                                                               STAGES=1, PDL=True, PREFETCH=64), rows_major, 4),
                ("mma_3popc_4tiles", bk.KERNELS["mma"], dict(mma, SYMMETRIC=False, N_TILES=4, STAGES=2),
                 rows_major, 2),
                ("mma_3popc_pool_pack", bk.KERNELS["mma"], dict(mma, SYMMETRIC=False, N_TILES=4, STAGES=1, POOL=2,
                                                                  PACK_OUT=True), rows_major, 2),
                # conv1 of the engine: 8 pixel planes of one-word patches, 64 channels, pooled and packed
                ("mma_bitserial8_pool_pack", bk.KERNELS["bitserial_mma"],
                 dict(OH=24, OW=24, BITS=8, SYMMETRIC=False, HAS_BIAS=True, POOL=2, PACK_OUT=True, WARPS=2, N_TILES=4,
                      EMULATE=False), (dict(stride_ax=1, stride_cn=1), ("stride_abit", "stride_ab", "stride_ay")), 2)]
    # int8 rows by trits on the int8 tensor cores, with the dispatch's tiles: 4096 rows (one scale, TTQ scales)
    # and 1 row; the row quantizer
    gpu = bk.GpuSpec(capability=9, sms=132)
    int8_rows = (dict(stride_ak=1, stride_bk=1, stride_cn=1), ("K", "stride_am", "stride_bn", "stride_cm"))
    for tag, M, sym, unpack in (("int8_ttq", 4096, False, 0), ("int8_one_scale", 4096, True, 0),
                                ("int8_16_rows", 16, False, 0), ("int8_prmt_ttq", 4096, False, 1),
                                ("int8_prmt_one_scale", 4096, True, 1), ("int8_prmt_16_rows", 16, False, 1)):
        meta = bk.choose_int8_kernel(M, 4096, 4096, gpu, symmetric=sym)
        warps = meta.pop("num_warps")
        meta.pop("num_stages")
        kernels.append((tag, bk.KERNELS["int8"], dict(meta, HAS_BIAS=True, SYMMETRIC=sym, UNPACK=unpack, EMULATE=False),
                        int8_rows, warps))
    # a tile the inline-PTX unpack cannot take (64-trit K steps: a word's columns spread over threads); the
    # launcher refuses it, and its "lanes" must say so
    narrow = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1, UNPACK=1, HAS_BIAS=True, SYMMETRIC=False, EMULATE=False)
    kernels.append(("int8_prmt_narrow", bk.KERNELS["int8"], narrow, int8_rows, 4))
    # one row on the CUDA cores, bit-serially: bf16 rows to bitplanes (quantized on the way), then the GEMV
    kernels.append(("int8_planes_quantize", bk.KERNELS["int8_planes"],
                    dict(QUANTIZE=True, GIVEN=False, BLOCK_W=bk.INT8_PLANES_WORDS, PDL=True),
                    (dict(stride_xk=1), ("K", "stride_xm")), 4))
    gemv = bk.choose_int8_kernel(1, 4096, 4096, gpu, symmetric=True)
    warps = gemv.pop("num_warps")
    gemv.pop("KIND")
    for tag, sym in (("int8_gemv_one_scale", True), ("int8_gemv_ttq", False)):
        kernels.append((tag, bk.KERNELS["int8_gemv"],
                        dict(gemv, HAS_BIAS=True, SYMMETRIC=sym, PDL=True, EMULATE=False),
                        (dict(stride_bk=1, stride_cn=1), ("stride_bn", "stride_cm")), warps))
    kernels.append(("quantize_rows", bk.KERNELS["quantize_rows"], dict(GIVEN=False, BLOCK_K=4096, ONE_BLOCK=True),
                    (dict(stride_xk=1), ("stride_xm", "stride_qm")), 8))
    exact_rounding = [bk.KERNELS[n] for n in ("int8", "int8_gemv", "int8_planes", "quantize_rows")]
    print(f"SASS for sm_90, triton {triton.__version__}: instruction counts of the whole kernel")
    for tag, fn, constexprs, (ones, div16), warps in kernels:
        constexprs = dict(constexprs, **ones)
        aligned = [(fn.arg_names.index(n),) for n in fn.arg_names if n not in constexprs and
                   (n.endswith("_ptr") or n in ("N", "KW") + div16)]
        k = triton.compile(ASTSource(fn=fn, signature=signature(fn, constexprs), constexprs=constexprs,
                                     attrs={i: [["tt.divisibility", 16]] for i in aligned}),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, **(
                               bk.EXACT_ROUNDING if fn in exact_rounding else {})))
        cubin = os.path.join(folder, tag + ".cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
        usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True).stdout
        with open(os.path.join(folder, tag + ".sass"), "w") as f:
            f.write(sass)
        ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", sass, re.M))
        regs = re.search(r"REG:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)
        ops["PTXFMA"] = len(re.findall(r"fma\.rn\.f(32|64)", k.asm["ptx"]))   # before ptxas (IEEE division adds FFMAs)
        keys = ("POPC", "BMMA", "IGMMA", "IMMA", "PTXFMA", "LOP3", "IADD3", "IMAD", "SHF", "LDG", "BAR", "LDS", "STL", "LDL", "ATOMG", "DFMA",
                "CCTL")
        lanes = _mma_lanes_ok(k.asm["ttgir"], warps) if fn in (bk.KERNELS["mma"], bk.KERNELS["bitserial_mma"]) else \
            bk.inline_asm_layout(k.asm["ttgir"]) if fn is bk.KERNELS["int8"] else "-"
        print(f"  {tag:25} regs {regs.group(1) if regs else '?':>3} stack {stack.group(1) if stack else '?':>3}  "
              + "  ".join(f"{o} {ops.get(o, 0)}" for o in keys) + f"  lanes {lanes}")


def bench_kernels(quick=False):
    """Ceilings, pack bandwidth and the GEMM table (the first part of `make bench`)."""
    props = torch.cuda.get_device_properties(0)
    sms, ghz = props.multi_processor_count, _sm_ghz()
    bw, popc_rate, mma_rate = _ceilings()
    print(f"ceilings: copy bandwidth {bw / 1e12:.2f} TB/s (read + write); popcount {popc_rate / 1e12:.2f} T/s "
          f"= {popc_rate / sms / ghz / 1e9:.1f} per clock per SM at {ghz:.2f} GHz; "
          f"ternary ceiling {2 * 32 * popc_rate / 3 / 1e12:.0f} TOP/s at 3 popc per word pair, "
          f"{2 * 32 * popc_rate / 2 / 1e12:.0f} at 2")
    if mma_rate:
        print(f"ceilings: single-bit MMA (m16n8k256 AND + popc) {mma_rate / 1e9:.1f} G/s = {mma_rate / sms / ghz / 1e9:.2f} "
              f"per clock per SM at {ghz:.2f} GHz; ternary ceiling {2 * 16 * 8 * 256 / 4 * mma_rate / 1e12:.0f} TOP/s at "
              f"4 MMAs per 16 x 8 outputs x 256 trits")
    # pack: float -> trits -> bitplanes, one pass. Timed from CUDA-graph replays like the GEMMs: the int8 pack
    # takes about 50 us, near what its eager Python call costs, so eager timings of it vary with the host
    for R, K, dtype in ((16384, 8192, torch.float32), (16384, 8192, torch.bfloat16), (16384, 8192, torch.int8)):
        x = torch.randn(R, K, device="cuda").to(dtype) if dtype != torch.int8 else \
            torch.randint(-1, 2, (R, K), dtype=torch.int8, device="cuda")
        thr = 0.5 if dtype != torch.int8 else None
        ms = _graph_ms(lambda i: bk.launch_pack(x, thr), rep=200)
        eager = do_bench(lambda: bk.launch_pack(x, thr), return_mode="median")
        nbytes = x.numel() * x.element_size() + 2 * R * triton.cdiv(K, 32) * 4
        print(f"pack {R}x{K} {str(dtype).replace('torch.', ''):8}: {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s "
              f"= {100 * nbytes / ms / 1e-3 / bw:3.0f}% of copy bandwidth (graph replays; eager {eager * 1e3:.1f} us)")
    # GEMM table
    gemlite = _gemlite()
    if gemlite is not None:
        print(f"gemlite {getattr(gemlite, '__version__', '?')} installed: timed beside us")
    Ms = (1, 16, 128, 1024, 4096) if not quick else (1, 16, 4096)
    shapes = [(M, NK, NK) for NK in (1024, 4096, 8192) for M in Ms]
    # the default LeNet (64,128,512) as GEMMs: fc1 and conv2 (im2col rows = images x 8x8 outputs), batch 128 and 10k
    shapes += [(128, 512, 2048), (128 * 64, 128, 1600), (10000, 512, 2048), (10000 * 64, 128, 1600)]
    print("times in us per call from CUDA-graph replays (weights rotated beyond L2; operands as pack_bitplanes "
          "gives them, row-major); t3: TTQ scales; t2: one scale; kern: the kernel t3 runs on (mma: single-bit "
          "tensor-core MMA; gemv, tile: POPC on the CUDA cores); %unit: t3 against that unit's ceiling above (the "
          "MMA's 4 per [16 x 8] outputs x 256 trits, or 3 popcounts per word pair, passed where carry-save adders "
          "count 3 words with 2); pack+t3: fp16 activations (as gemlite takes them) packed first; eager: one Python call; gemlite "
          "(if installed): its A16W158 layer, ternary weights and fp16 activations; gl/t3, gl/p+t3 > 1: we are faster")
    hdr = (f"{'M':>6} {'N':>5} {'K':>5} | {'t3':>8} {'t2':>8} {'pack+t3':>8} {'bf16':>8} {'fp32':>8} | {'kern':>4} {'TOP/s':>6} "
           f"{'%unit':>5} {'%BW':>4} | {'bf16/t3':>7} {'bf16/t2':>7} | {'t3 eager':>8} {'bf16 eager':>10} | "
           f"{'gemlite':>8} {'gl/t3':>6} {'gl/p+t3':>7}")
    print(hdr)
    print("-" * len(hdr))
    for M, N, K in shapes:
        ms, tops, pct_unit, pct_bw, kind = _bench_gemm_row(M, N, K, bw, popc_rate, mma_rate)
        us = {k: v * 1e3 for k, v in ms.items()}
        print(f"{M:>6} {N:>5} {K:>5} | {us['t3']:8.2f} {us['t2']:8.2f} {us['pack+t3']:8.2f} {us['bf16']:8.2f} "
              f"{us['fp32']:8.2f} | {kind:>4} {tops:6.1f} {pct_unit:5.0f} {pct_bw:4.0f} | {us['bf16'] / us['t3']:7.2f} "
              f"{us['bf16'] / us['t2']:7.2f} | {us['t3 eager']:8.2f} {us['bf16 eager']:10.2f} | "
              + (f"{us['gemlite']:8.2f} {us['gemlite'] / us['t3']:6.2f} {us['gemlite'] / us['pack+t3']:7.2f}"
                 if "gemlite" in us else f"{'-':>8} {'-':>6} {'-':>7}"),
              flush=True)
        torch.cuda.empty_cache()


def bench_modules():
    """nn.Linear in bf16 against TernaryLinearTriton in eval (bf16 in, bf16 out: input pack, GEMM, scales), as
    a model calls them: CUDA-graph replays (layers rotated beyond L2), and one eager call at 1 row."""
    print("layers in eval, bf16 input and output, us per call from CUDA-graph replays (layers rotated beyond L2); "
          "ternary: TernaryLinearTriton (packed weight kept; the call packs its input); eager: one Python call")
    hdr = f"{'M':>6} {'N':>5} {'K':>5} | {'bf16':>8} {'ternary':>8} {'speedup':>7} | {'bf16 eager':>10} {'tern eager':>10}"
    print(hdr)
    print("-" * len(hdr))
    for N, K in ((4096, 4096), (11008, 4096)):
        with torch.no_grad():
            floats = [nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
                      for _ in range(_rotation(2 * N * K))]
            ternaries = [bk.TernaryLinearTriton(K, N, bias=False).cuda().eval() for _ in range(_rotation(N * K // 4))]
            for M in (1, 16, 2048):
                xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                us = {}
                for name, mods in (("bf16", floats), ("ternary", ternaries)):
                    call = lambda i, mods=mods: mods[i % len(mods)](xs[i % 2])
                    us[name] = _graph_ms(call, calls=max(10, len(mods))) * 1e3
                    if M == 1:
                        us[name + " eager"] = _eager_ms(call) * 1e3
                eager = (f"{us['bf16 eager']:10.2f} {us['ternary eager']:10.2f}" if M == 1 else f"{'':>10} {'':>10}")
                print(f"{M:>6} {N:>5} {K:>5} | {us['bf16']:8.2f} {us['ternary']:8.2f} {us['bf16'] / us['ternary']:7.2f}x "
                      f"| {eager}", flush=True)
        del floats, ternaries
        torch.cuda.empty_cache()


def _int8_rate():
    """The int8 tensor cores' measured rate (OP/s): torch._int_mm (cuBLASLt) at 4096^3, the better layout."""
    a = torch.randint(-128, 128, (4096, 4096), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 128, (4096, 4096), dtype=torch.int8, device="cuda")
    ms = min(do_bench(lambda: torch._int_mm(a, w), return_mode="median") for w in (b, b.t()))
    return 2 * 4096 ** 3 / (ms * 1e-3)


INT8_SHAPES = [(M, N, K) for N, K in ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192))
               for M in (1, 16, 64, 512, 4096)]


def bench_int8(shapes=None):
    """W1.58A8: float rows quantized per row to int8 (absmax) by packed ternary weights on the int8 tensor
    cores, against torch bf16 and gemlite's A8W158 and A16W158, CUDA-graph timed; and (all shapes) ternary x
    ternary on the int8 kernel against the single-bit MMA. shapes: (M, N, K) rows of the table, else all."""
    rows = shapes or INT8_SHAPES
    rate = _int8_rate()
    gpu = bk.gpu_spec(torch.device("cuda"))
    print(f"ceiling: int8 tensor cores (torch._int_mm, 4096^3) {rate / 1e12:.0f} TOP/s")
    print("W1.58A8, us per call from CUDA-graph replays (weights rotated beyond L2). ttq: alpha_p/alpha_n a "
          "channel (2 int8 dots); one: one scale a channel, BitNet's (1 dot). a8: int8 rows given; q+a8: bf16 rows "
          "in, quantized in the call. gl8 / gl16: gemlite A8W158 / A16W158 (fp16 rows). x: bf16 (or gemlite) time "
          "over q+a8; %int8: the one-scale a8 GEMM's rate over the ceiling")
    hdr = (f"{'M':>5} {'N':>5} {'K':>5} | {'bf16':>7} {'a8 ttq':>7} {'q+a8':>7} {'a8 one':>7} {'q+a8':>7} "
           f"{'gl8':>7} {'gl16':>7} | {'x ttq':>5} {'x one':>5} {'x gl8':>5} {'x gl16':>6} {'%int8':>5} | tile")
    print(hdr)
    print("-" * len(hdr))
    for N, K in dict.fromkeys((N, K) for _, N, K in rows):
        sets = _rotation(N * K // 4)
        trits = [torch.randint(-1, 2, (N, K), dtype=torch.int8, device="cuda") for _ in range(sets)]
        planes = [bk.pack_bitplanes(t) for t in trits]
        ap, an = torch.rand(N, device="cuda") + 0.5, torch.rand(N, device="cuda") + 0.5
        wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(_rotation(2 * N * K))]
        peers = {}
        for name, kind in (("gl8", "A8W158_INT_dynamic"), ("gl16", "A16W158_INT")):
            try:
                layers = [_gemlite_ternary(t, kind) for t in trits]
                if layers[0] is not None:
                    peers[name] = layers
            except Exception as e:
                print(f"gemlite {name} skipped at {N}x{K}: {type(e).__name__}")
        for M in [m for m, n, k in rows if (n, k) == (N, K)]:
            xb = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            xh = xb.half()
            q, s = bk.quantize_rows_int8(xb)
            w = lambda i: planes[i % len(planes)]
            runs = {"bf16": lambda i: torch.nn.functional.linear(xb, wb[i % len(wb)]),
                    "a8 ttq": lambda i: bk.ternary_gemm_int8(q, s, *w(i), ap, an),
                    "q+a8 ttq": lambda i: bk.ternary_gemm_int8(xb, None, *w(i), ap, an),
                    "a8 one": lambda i: bk.ternary_gemm_int8(q, s, *w(i), ap),
                    "q+a8 one": lambda i: bk.ternary_gemm_int8(xb, None, *w(i), ap)}
            for name, layers in peers.items():
                runs[name] = lambda i, layers=layers: layers[i % len(layers)](xh)
            us = {name: _graph_ms(fn) * 1e3 for name, fn in runs.items()}
            col = lambda n: f"{us[n]:7.2f}" if n in us else f"{'-':>7}"
            x = lambda n, d, w: f"{us[n] / us[d]:{w}.2f}" if n in us else f"{'-':>{w}}"
            meta = bk.choose_int8_kernel(M, N, K, gpu, symmetric=True)
            tile = f"gemv {meta['BLOCK_N']}x{32 * meta['BLOCK_K']}" if meta.get("KIND") == "gemv" else \
                f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}" + \
                (f" split {meta['SPLIT_K']}" if meta["SPLIT_K"] > 1 else "")
            print(f"{M:>5} {N:>5} {K:>5} | {us['bf16']:7.2f} {us['a8 ttq']:7.2f} {us['q+a8 ttq']:7.2f} "
                  f"{us['a8 one']:7.2f} {us['q+a8 one']:7.2f} {col('gl8')} {col('gl16')} | {x('bf16', 'q+a8 ttq', 5)} "
                  f"{x('bf16', 'q+a8 one', 5)} {x('gl8', 'q+a8 ttq', 5)} {x('gl16', 'q+a8 ttq', 6)} "
                  f"{100 * 2 * M * N * K / (us['a8 one'] * 1e-6) / rate:5.0f} | {tile}", flush=True)
        torch.cuda.empty_cache()
    if shapes:
        return
    # ternary x ternary at 4096^3: trits as int8 rows (scale 1) on the int8 kernel, against the single-bit MMA
    a = torch.randint(-1, 2, (4096, 4096), dtype=torch.int8, device="cuda")
    w = torch.randint(-1, 2, (4096, 4096), dtype=torch.int8, device="cuda")
    (a_pos, a_neg), (w_pos, w_neg) = bk.pack_bitplanes(a), bk.pack_bitplanes(w)
    one, ap = torch.ones(4096, device="cuda"), torch.rand(4096, device="cuda") + 0.5
    wb = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    xb = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    bf16 = _graph_ms(lambda i: torch.nn.functional.linear(xb, wb)) * 1e3
    for tag, an in (("TTQ scales", ap.flip(0)), ("one scale", None)):
        mma = _graph_ms(lambda i: bk.ternary_gemm_triton(a_pos, a_neg, w_pos, w_neg, ap, an)) * 1e3
        int8 = _graph_ms(lambda i: bk.ternary_gemm_int8(a, one, w_pos, w_neg, ap, an)) * 1e3
        print(f"ternary x ternary 4096^3, {tag}: bf16 {bf16:.1f} us, single-bit MMA {mma:.1f} us ({bf16 / mma:.2f}x "
              f"bf16), int8 tensor cores {int8:.1f} us ({bf16 / int8:.2f}x); the dispatch keeps the "
              f"{'MMA' if mma <= int8 else 'int8 kernel (faster here: choose_kernel should be revisited)'}")


def float_twin(state):
    """An nn.Sequential of float Conv2d/Linear + BatchNorm + ReLU with the export's shapes (random weights)."""
    layers, ternary = [], [r for r in state["layers"] if r["type"] in ("conv", "linear")]
    for rec in state["layers"]:
        last = rec is ternary[-1]
        if rec["type"] == "conv":
            layers += [nn.Conv2d(rec["in_channels"], rec["out_features"], tuple(rec["kernel_size"]), rec["stride"],
                                 rec["padding"]), nn.BatchNorm2d(rec["out_features"]), nn.ReLU()]
        elif rec["type"] == "linear":
            layers += [nn.Linear(rec["in_features"], rec["out_features"])]
            layers += [] if last else [nn.BatchNorm1d(rec["out_features"]), nn.ReLU()]
        elif rec["type"] == "maxpool":
            layers.append(nn.MaxPool2d(rec["kernel_size"], rec["stride"]))
        else:
            layers.append(nn.Flatten())
    return nn.Sequential(*layers).eval()


def _event_seconds(fn, reps=20):
    """Median seconds of fn() alone, timed with CUDA events, after one warm-up call (JIT compilation and
    autotuning of the first launches)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


@torch.no_grad()
def bench_against_float(state, images, triton_seconds):
    n = len(images)
    model = float_twin(state).cuda()
    x = images.float().div(255)
    rows = [("triton ternary (popcount)", triton_seconds)]
    rows.append(("torch fp32 (cuDNN, TF32 on)", _event_seconds(lambda: model(x))))   # torch's default for convs
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    rows.append(("torch fp32 (cuDNN, TF32 off)", _event_seconds(lambda: model(x))))
    torch.backends.cudnn.allow_tf32 = tf32
    model_bf16, x_bf16 = float_twin(state).cuda().bfloat16(), x.bfloat16()
    rows.append(("torch bf16 (cuDNN)", _event_seconds(lambda: model_bf16(x_bf16))))
    print(f"inference of {n} images, {torch.cuda.get_device_name()}, torch {torch.__version__}, median of 20 runs:")
    print(f"  {'engine':<30}{'ms':>9}{'images/s':>12}{'vs triton':>11}")
    for name, sec in rows:
        print(f"  {name:<30}{sec * 1e3:9.3f}{n / sec:12.3e}{triton_seconds / sec:10.2f}x")


@torch.no_grad()
def bench_layers(state, images, reps=20):
    """Where the fused engine's time goes: each of its kernels alone on the activations of these images, as
    GPU time (CUDA-graph replays, no launch overhead) and as one eager call (CUDA events, host work
    included), with its GEMM shape, the kernel it runs on, and its floor at the card's measured rate of that
    kernel's unit (single-bit MMAs on the tensor cores, or popcounts on the CUDA cores)."""
    steps = state["fused_steps"]
    if steps is None:
        print("per layer: the fused engine does not cover this network (the layer-by-layer engine ran)")
        return
    timed = lambda fn: (_graph_ms(lambda i: fn(), calls=3, rep=reps) * 1e3, _event_seconds(fn, reps) * 1e6)
    _, popc_rate, mma_rate = _ceilings()
    x = bt_infer.images_4d(images, state["input_shape"], "images")
    rows = [("pixels -> bit planes (pack_im2col)", "", "", "", *timed(lambda: bt_infer.fused_input(steps, x)), None)]
    a = bt_infer.fused_input(steps, x)
    counts = {}
    for st in steps:
        rec = st["rec"]
        name = "conv" if rec["type"] == "conv" else "fc"
        counts[name] = counts.get(name, 0) + 1
        ks, stride = st["conv"]
        kh, kw = ks if isinstance(ks, tuple) else (ks, ks)
        bits, B, H, W = (a[0].shape[0], *a[0].shape[1:4]) if a[1] is None else (None, *a[0].shape[:3])
        M = B * ((H - kh) // stride + 1) * ((W - kw) // stride + 1)
        N, KW = st["pos"].shape
        kind = bk.choose_kernel(M, N, KW, bk.gpu_spec(a[0].device), bit_serial=bits is not None,
                                symmetric=rec["alpha_n"] is None, conv=True)[0]
        if kind == "mma":
            floor = _mma_count(M, N, KW, bits or 0) / mma_rate
        else:
            floor = M * N * KW * (2 * bits if bits else 2 if rec["alpha_n"] is None else 3) / popc_rate
        call = lambda a=a, st=st: bt_infer.fused_step(st, a)
        what = (f"{name}{counts[name]} {rec['out_features']} out" + (f", {bits}-bit pixels" if bits else "")
                + (", + pool" if st["pool"] > 1 else "") + (", + pack" if st["threshold"] is not None else ", float"))
        rows.append((what, f"{M}x{N}x{rec['in_features']}", f"{bits or 1} x {KW}", "mma" if kind == "mma" else "tile",
                     *timed(call), floor * 1e6))
        a = call()
        a = a if isinstance(a, tuple) else (a, None)
    total, total_eager = sum(r[4] for r in rows), sum(r[5] for r in rows)
    print(f"per layer (each kernel alone: GPU time from CUDA-graph replays, and one eager call; floors at the rates "
          f"measured here: {mma_rate:.3g} single-bit MMAs/s (mma), {popc_rate:.3g} popcounts/s (tile)):")
    print(f"  {'step':<40}{'GEMM M x N x K':>18}{'planes x words':>16}{'kern':>6}{'us':>8}{'share':>7}{'eager us':>10}"
          f"{'floor us':>10}{'of floor':>9}")
    for what, shape, words, kern, us, us_eager, floor in rows:
        tail = f"{floor:10.0f}{100 * floor / us:8.0f}%" if floor else ""
        print(f"  {what:<40}{shape:>18}{words:>16}{kern:>6}{us:8.0f}{100 * us / total:6.0f}%{us_eager:10.0f}{tail}")
    print(f"  {'sum':<40}{'':>18}{'':>16}{'':>6}{total:8.0f}{'':>7}{total_eager:10.0f}")


def bench_inference(path, data="data", batch=10000):
    """The export on the Triton engine over the test set (accuracy, agreement, images/s), then against the float
    network on cuDNN and layer by layer (the last part of `make bench`)."""
    state = bt_infer.load_export(path)
    _, _, images, labels = bt_train.load_dataset(state.get("dataset", "mnist"), root=data)
    images = bt_infer.images_4d(images, state["input_shape"], "test images")
    dev_state = bt_infer.prepare_triton(state, "cuda")
    x = images.cuda()
    seconds = _event_seconds(lambda: bt_infer.run_triton(dev_state, x, batch), reps=5)
    preds = bt_infer.run_triton(dev_state, x, batch).argmax(1).cpu()
    ref = state.get("reference_predictions")
    agree = f"{100 * float((preds == ref[:len(preds)].long()).float().mean()):.2f}%" if ref is not None else "n/a"
    print(f"triton cuda   accuracy {100 * float((preds == labels).float().mean()):.2f}%  images/s "
          f"{len(x) / seconds:.2e}  agreement with PyTorch model {agree}")
    bench_against_float(state, x, seconds)
    bench_layers(dev_state, x)


def _shape(text):
    """--shapes' MxNxK: three positive ints (argparse turns the error into one line and exit 2)."""
    dims = text.split("x")
    if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not MxNxK with positive ints, e.g. 16x8192x8192")
    return tuple(int(d) for d in dims)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bt_bench.py",
                                     description="Benchmark the popcount kernels against torch (needs a CUDA GPU).")
    parser.add_argument("--tune", action="store_true",
                        help="sweep kernel configs on a few shapes; with --int8 the int8 kernel's (default: off)")
    parser.add_argument("--shapes", type=_shape, nargs="+", metavar="MxNxK",
                        help="--tune or --int8 only these shapes, e.g. 16x8192x8192 (default: the usual set)")
    parser.add_argument("--sass", metavar="DIR",
                        help="compile the GEMM kernels for sm_90 (no GPU needed), dump SASS to DIR, count instructions")
    parser.add_argument("--infer", metavar="EXPORT", help="time the inference engine on this export (default: off)")
    parser.add_argument("--data", default="data", metavar="DIR", help="dataset root for --infer (default: data)")
    parser.add_argument("--quick", action="store_true", help="fewer GEMM shapes (default: off)")
    parser.add_argument("--modules", action="store_true", help="only the layer table (default: off)")
    parser.add_argument("--int8", action="store_true", help="only the W1.58A8 tables (default: off)")
    args = parser.parse_args(argv)
    if args.shapes and not (args.tune or args.int8):
        parser.error("argument --shapes: goes with --tune or --int8 (MxNxK rows of their tables)")
    if args.sass:   # compiles for sm_90 without a GPU
        _sass_report(args.sass)
        return
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("needs a CUDA GPU (and TRITON_INTERPRET unset); --sass DIR works without one")
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs | torch {torch.__version__} | triton {triton.__version__} "
          f"| {datetime.date.today()}")
    if args.tune and args.int8:
        _tune_int8(args.shapes or [(1, 4096, 4096), (1, 4096, 11008), (4, 4096, 4096), (8, 4096, 4096),
                                   (16, 11008, 4096), (64, 4096, 4096), (512, 4096, 4096), (4096, 4096, 4096)])
    elif args.tune:
        _tune(args.shapes or [(1, 8192, 8192), (16, 8192, 8192), (128, 4096, 4096), (4096, 4096, 4096),
                              (128, 256, 1024), (8192, 64, 800)])
    elif args.infer:
        bench_inference(args.infer, args.data)
    elif args.modules:
        bench_modules()
    elif args.int8:
        bench_int8(args.shapes)
    else:
        bench_kernels(args.quick)
        bench_modules()
        bench_int8()


if __name__ == "__main__":
    main()
