"""bt_infer.py: serve a packed balanced ternary export, with Triton popcount kernels or multiply-free numpy.

    python bt_infer.py --export bt_mnist_export.pt --device cuda    # Triton kernels, timed with CUDA events
    python bt_infer.py --export bt_mnist_export.pt --device cpu     # numpy popcount path, the same logits
    python bt_infer.py --errors errors.png --limit 2000             # misclassified digits of the first 2000

    from bt_infer import load_export, run_triton, run_numpy
    state = load_export("bt_mnist_export.pt")           # validated; never unpickles code
    logits = run_triton(state, images)                  # uint8 [B, 1, 28, 28] on cuda (cpu: TRITON_INTERPRET=1)
    logits_np = run_numpy(state, images.cpu().numpy())  # the same float32 logits, bit for bit

The export (bt_quant.export_ternary_state) holds every conv and linear layer as two uint32 bitplanes and
three float32 vectors with BatchNorm and the pixel scale folded in. Both paths compute the exact integer
sums Sp, Sn with AND + popcount on those very planes, then out = float32((f64(alpha_p) Sp - f64(alpha_n) Sn)
+ f64(bias)): the products are exact, so the two agree bit for bit. On trit and pixel inputs nothing on
either path multiplies activations by weights; no path runs a float matmul or a float conv.

A layer with int8 inputs (input "int8", act_bits=8 in training) quantizes its input per image (scale =
absmax / 127, q = round(x / scale)); Triton runs the int8 GEMM on the ternary planes (int8 tensor cores),
numpy the same sums bit-serially (q + 128 as 8 bitplanes, the offset taken off); both then compute
float32((f64(alpha_p) Sp - f64(alpha_n) Sn) * f64(scale) + f64(bias)). Such exports run layer by layer.
"""
import argparse
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

import bt_kernel
import bt_quant

EXPORT_FORMAT = bt_quant.EXPORT_FORMAT
EXPORT_VERSION = bt_quant.EXPORT_VERSION
PROG = "bt_infer.py"

# -----------------------------------------------------------------------------
# loading and validating an export


class ExportError(ValueError):
    """An export file is missing, unreadable, unsafe or inconsistent; the message is one line."""


def _first_line(text, limit=160):
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    return (lines[0] if lines else "")[:limit]


def _looks_like_text(head):
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:   # only a multi-byte character cut at the end of the sample is allowed
            return False
    return all(c >= 32 or c in b"\t\n\r\f" for c in head)


def _describe_load_failure(path, head, exc):
    """One line for whatever torch.load raised: the exception types vary with the way the file is broken."""
    msg = str(exc)
    if "Weights only load failed" in msg:
        # torch's weights-only unpickler refuses any global it does not know: code never runs
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        if m:
            return (f"{path}: not a weights-only file: refused to execute code (it references {m.group(1)}); "
                    f"an export holds only tensors, numbers and strings")
        if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:   # PROTO opcode: a raw pickle, no torch.save
            return (f"{path}: a raw pickle, not a weights-only torch file: refused to execute code "
                    f"(save exports with bt_quant.save_export)")
        if _looks_like_text(head):
            return f"{path}: a text file, not a torch export"
        return f"{path}: not a torch file, or corrupted ({_first_line(msg.split('error:')[-1]) or 'unpickling failed'})"
    if _looks_like_text(head):
        return f"{path}: a text file, not a torch export"
    if head[:2] == b"PK":
        return f"{path}: truncated or corrupted torch file ({_first_line(msg.split('. ')[0]) or type(exc).__name__})"
    if isinstance(exc, EOFError):
        return f"{path}: truncated file (unexpected end of data)"
    return f"{path}: cannot read it as a torch file ({type(exc).__name__}: {_first_line(msg) or 'no detail'})"


def load_export(path):
    """Load and fully validate an export written by bt_quant.save_export; raise ExportError otherwise.

    torch.load runs with weights_only=True: a file that would need code to unpickle is refused, never run.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ExportError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ExportError(f"{path}: is a folder, not an export file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise ExportError(f"{path}: cannot read it ({e.strerror or e})") from None
    if size == 0:
        raise ExportError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():   # torch warns about pickle protocols before refusing: keep it one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # RuntimeError, EOFError, UnpicklingError, KeyError, ...: it depends on the damage
        raise ExportError(_describe_load_failure(path, head, e)) from None
    if _is_training_checkpoint(state):
        raise ExportError(f"{path}: {_checkpoint_hint(state, path)}")
    try:
        validate_export(state)
    except ExportError as e:
        raise ExportError(f"{path}: {e}") from None
    return state


# the keys of a checkpoint that bt_train.py writes after every epoch (bt_train.save_checkpoint)
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "args")


def _is_training_checkpoint(state):
    return isinstance(state, dict) and "format" not in state and all(k in state for k in CHECKPOINT_KEYS)


def _checkpoint_hint(state, path="CKPT"):
    """What a training checkpoint is, and the command that exports it: --resume runs the epochs it still
    lacks, if any, then re-estimates BatchNorm and writes the packed export."""
    epoch = state.get("epoch")
    run = state.get("args")
    epochs = run.get("epochs") if isinstance(run, dict) else None
    known = _is_int(epoch) and _is_int(epochs)
    held = f" after epoch {epoch} of {epochs}" if known else ""
    left = f" (it first trains the {epochs - epoch} epoch(s) left)" if known and epoch < epochs else ""
    return (f"a training checkpoint of bt_train.py{held}, not an export; export it with: "
            f"python bt_train.py --resume {shlex.quote(os.fspath(path))} --export bt_mnist_export.pt{left}")


def _is_int(v, lo=1):
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _shape_str(shape):
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check_tensor(rec, key, where, dtype, shape):
    t = rec.get(key)
    if not isinstance(t, torch.Tensor):
        raise ExportError(f"{where}: '{key}' is {type(t).__name__}, expected a tensor")
    if t.dtype != dtype:
        raise ExportError(f"{where}: '{key}' has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ExportError(f"{where}: '{key}' has shape {_shape_str(t.shape)}, expected {_shape_str(shape)}")
    return t


def _check_ternary(rec, where, index_of_ternary, data):
    K, N = rec.get("in_features"), rec.get("out_features")
    if not (_is_int(K) and _is_int(N)):
        raise ExportError(f"{where}: in_features and out_features must be ints >= 1, got {K!r} and {N!r}")
    kind = rec.get("input")
    if kind not in ("pixels", "trits", "int8"):
        raise ExportError(f"{where}: input must be 'pixels', 'trits' or 'int8', got {kind!r}")
    if kind == "pixels" and index_of_ternary != 0:
        raise ExportError(f"{where}: input 'pixels' is only allowed for the first ternary layer")
    if kind == "int8" and index_of_ternary == 0:
        raise ExportError(f"{where}: input 'int8' is not allowed for the first ternary layer (it takes the pixels)")
    if kind in ("pixels", "int8"):
        if rec.get("act_delta") is not None:
            raise ExportError(f"{where}: input '{kind}' takes no act_delta, got {rec.get('act_delta')!r}")
    elif not (_is_number(rec.get("act_delta")) and rec["act_delta"] >= 0):
        raise ExportError(f"{where}: act_delta must be a finite number >= 0, got {rec.get('act_delta')!r}")
    KW = (K + 31) // 32
    pos = _check_tensor(rec, "pos", where, torch.uint32, (N, KW))
    neg = _check_tensor(rec, "neg", where, torch.uint32, (N, KW))
    scales = [_check_tensor(rec, k, where, torch.float32, (N,)) for k in ("alpha_p", "alpha_n", "bias")]
    if not data:
        return K, N
    p, n = pos.detach().cpu().numpy(), neg.detach().cpu().numpy()
    both = np.bitwise_and(p, n)
    if both.any():
        r, w = np.argwhere(both)[0]
        raise ExportError(f"{where}: a weight has both its +1 and its -1 bit set (output {r}, word {w}): "
                          "the planes must not overlap")
    if K % 32:
        # bits past K would add phantom weights: zero on the kernels' side, but a corrupt file all the same
        stray = np.uint32(~np.uint32((1 << (K % 32)) - 1))
        if (np.bitwise_and(p[:, -1], stray).any() or np.bitwise_and(n[:, -1], stray).any()):
            raise ExportError(f"{where}: bits set past in_features={K} in the last word of the planes")
    for key, t in zip(("alpha_p", "alpha_n", "bias"), scales):
        if not bool(torch.isfinite(t).all()):
            raise ExportError(f"{where}: '{key}' holds inf or nan")
    return K, N


def validate_export(state, data=True):
    """Raise ExportError (one line) unless `state` is a consistent export; data=False skips the checks
    that read tensor values (overlapping bits, bits past K, finite scales), e.g. for tensors on a GPU."""
    if not isinstance(state, dict):
        raise ExportError(f"not an export: the file holds a {type(state).__name__}, expected a dict")
    if _is_training_checkpoint(state):
        raise ExportError(_checkpoint_hint(state))
    if "format" not in state:
        hint = " (looks like a plain state_dict: export it with bt_quant.export_ternary_state)" if any(
            isinstance(v, torch.Tensor) for v in state.values()) else ""
        raise ExportError(f"not an export: no 'format' key{hint}")
    if not isinstance(state["format"], str) or state["format"] != EXPORT_FORMAT:
        raise ExportError(f"format is {state['format']!r}, expected {EXPORT_FORMAT!r}")
    version = state.get("version")
    if not _is_int(version) or version != EXPORT_VERSION:
        raise ExportError(f"unsupported export version {version!r}: this reader knows version {EXPORT_VERSION}")
    shape = state.get("input_shape")
    if not (isinstance(shape, (list, tuple)) and len(shape) in (1, 3) and all(_is_int(s) for s in shape)):
        raise ExportError(f"input_shape must be [C, H, W] or [K] of ints >= 1, got {shape!r}")
    scale = state.get("input_scale")
    if not (_is_number(scale) and scale > 0):
        raise ExportError(f"input_scale must be a finite number > 0, got {scale!r}")
    layers = state.get("layers")
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ExportError("'layers' must be a non-empty list")
    for key in ("dataset",):
        if key in state and not isinstance(state[key], str):
            raise ExportError(f"'{key}' must be a string, got {type(state[key]).__name__}")
    ref = state.get("reference_predictions")
    if ref is not None and not (isinstance(ref, torch.Tensor) and ref.dim() == 1 and not ref.is_floating_point()):
        raise ExportError("'reference_predictions' must be a 1-D integer tensor")

    # walk the chain of shapes: ("map", C, H, W) or ("flat", K)
    cur = ("map", *shape) if len(shape) == 3 else ("flat", shape[0])
    n_ternary = 0
    for i, rec in enumerate(layers):
        if not isinstance(rec, dict):
            raise ExportError(f"layer {i}: expected a dict, got {type(rec).__name__}")
        kind = rec.get("type")
        where = f"layer {i} ({kind})"
        if kind in ("conv", "linear"):
            K, N = _check_ternary(rec, where, n_ternary, data)
            n_ternary += 1
            if kind == "conv":
                C, ks, s, p = rec.get("in_channels"), rec.get("kernel_size"), rec.get("stride"), rec.get("padding")
                if not (_is_int(C) and isinstance(ks, (list, tuple)) and len(ks) == 2 and all(_is_int(k) for k in ks)
                        and _is_int(s) and _is_int(p, lo=0)):
                    raise ExportError(f"{where}: bad geometry: in_channels={C!r}, kernel_size={ks!r}, stride={s!r}, "
                                      f"padding={p!r} (ints >= 1, padding >= 0)")
                if C * ks[0] * ks[1] != K:
                    raise ExportError(f"{where}: in_channels*kh*kw = {C}*{ks[0]}*{ks[1]} = {C * ks[0] * ks[1]}, "
                                      f"but in_features is {K}")
                if cur[0] != "map":
                    raise ExportError(f"{where}: needs a [C, H, W] input, gets a flat vector of {cur[1]}")
                if cur[1] != C:
                    raise ExportError(f"{where}: takes {C} input channels, gets {cur[1]} ({_shape_str(cur[1:])})")
                OH, OW = (cur[2] + 2 * p - ks[0]) // s + 1, (cur[3] + 2 * p - ks[1]) // s + 1
                if OH < 1 or OW < 1:
                    raise ExportError(f"{where}: kernel {ks[0]}x{ks[1]} does not fit its {cur[2]}x{cur[3]} input")
                cur = ("map", N, OH, OW)
            else:
                if cur[0] != "flat":
                    raise ExportError(f"{where}: needs a flat input, gets {_shape_str(cur[1:])} (no flatten before it)")
                if cur[1] != K:
                    raise ExportError(f"{where}: in_features is {K}, but its input has {cur[1]} values")
                cur = ("flat", N)
        elif kind == "maxpool":
            k, s = rec.get("kernel_size"), rec.get("stride")
            if not (_is_int(k) and _is_int(s)):
                raise ExportError(f"{where}: kernel_size and stride must be ints >= 1, got {k!r} and {s!r}")
            if n_ternary == 0:
                raise ExportError(f"{where}: max pooling of raw pixels is not supported")
            if cur[0] != "map":
                raise ExportError(f"{where}: needs a [C, H, W] input, gets a flat vector of {cur[1]}")
            if cur[2] < k or cur[3] < k:
                raise ExportError(f"{where}: kernel {k} is larger than its {cur[2]}x{cur[3]} input")
            cur = ("map", cur[1], (cur[2] - k) // s + 1, (cur[3] - k) // s + 1)
        elif kind == "flatten":
            cur = ("flat", math.prod(cur[1:]))
        else:
            raise ExportError(f"layer {i}: unknown type {kind!r} (expected conv, linear, maxpool or flatten)")
    if n_ternary == 0:
        raise ExportError("no conv or linear layer")
    if cur[0] != "flat":
        raise ExportError(f"the network ends in a {_shape_str(cur[1:])} map: expected flat logits")
    classes = state.get("classes")
    if classes is not None and (not _is_int(classes) or classes != cur[1]):
        raise ExportError(f"classes is {classes!r}, but the last layer has {cur[1]} outputs")


def _summary(state):
    n = sum(l["type"] in ("conv", "linear") for l in state["layers"])
    n8 = sum(l.get("input") == "int8" for l in state["layers"])
    int8 = f" ({n8} with int8 inputs)" if n8 else ""
    return f"{state.get('dataset', 'unknown dataset')}, {n} ternary layers{int8}"


# -----------------------------------------------------------------------------
# Triton inference: every conv and linear layer on the popcount kernels


def images_4d(images, input_shape, what):
    """uint8 [B, *input_shape]; [B, H, W] is accepted when input_shape is [1, H, W]."""
    shape = tuple(input_shape)
    is_u8 = images.dtype == torch.uint8 if isinstance(images, torch.Tensor) else images.dtype == np.uint8
    if not is_u8:
        raise ValueError(f"{what} must be uint8 pixels, got {images.dtype}")
    if len(shape) == 3 and shape[0] == 1 and images.ndim == 3 and tuple(images.shape[1:]) == shape[1:]:
        return images.reshape(images.shape[0], *shape)
    if images.ndim != 1 + len(shape) or tuple(images.shape[1:]) != shape:
        raise ValueError(f"{what} must have shape [B, {', '.join(map(str, shape))}], got {list(images.shape)}")
    return images


def _layers_to(state, device):
    """A copy of the layer records with every tensor on `device` (a no-op for tensors already there)."""
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in rec.items()}
            for rec in state["layers"]]


def _packed_rows(rec, x, thr):
    """(planes, (OH, OW)) of a trit- or pixel-input layer: thr None packs x's 8-bit pixels bit-serially, else
    x ternarized at thr; a conv's patches by im2col, rows (b, oy, ox). A flat input: (None, None)."""
    if rec["type"] == "conv" or x.dim() == 4:
        if rec["type"] == "conv":
            ks, s, p = tuple(rec["kernel_size"]), rec["stride"], rec["padding"]
        else:   # flatten(1) of an NCHW map has K order (c, y, x): the im2col order of a conv with the map's size
            ks, s, p = tuple(x.shape[2:]), 1, 0
        return bt_kernel.pack_im2col(x, ks, s, p, threshold=thr)
    if thr is None:   # flat raw pixels: bit-serial through the 1x1 im2col
        return bt_kernel.pack_im2col(x[:, :, None, None], 1, 1, 0, threshold=None)[0], (None, None)
    return bt_kernel.pack_bitplanes(x, thr), (None, None)


def _int8_rows(rec, x):
    """(int8 rows [M, K], float32 scales [M], (OH, OW)) of an int8-input layer: x quantized with one absmax
    scale per image, then for a conv its patches (im2col of the int8 values, zero padding: a zero stays
    zero), rows (b, oy, ox) each with its image's scale. A linear layer: one row an image, (None, None)."""
    B = x.shape[0]
    q, scale = bt_kernel.quantize_rows_int8(x.reshape(B, -1))   # (c, y, x): flatten's order, the export's K order
    if rec["type"] != "conv":
        return q, scale, (None, None)
    (kh, kw), s, p = rec["kernel_size"], rec["stride"], rec["padding"]
    q = F.pad(q.view(x.shape), (p, p, p, p)) if p else q.view(x.shape)
    patches = q.unfold(2, kh, s).unfold(3, kw, s)   # a view [B, C, OH, OW, kh, kw]
    OH, OW = patches.shape[2:4]
    rows = patches.permute(0, 2, 3, 1, 4, 5).reshape(B * OH * OW, -1)   # columns (c, ky, kx): F.unfold's order
    return rows, scale.repeat_interleave(OH * OW), (OH, OW)


def _forward_triton(layers, x, input_scale):
    # x: uint8 [B, C, H, W] or [B, K]; raw pixels until the first ternary layer
    pixels = True
    for rec in layers:
        kind = rec["type"]
        if kind == "flatten":
            continue   # a map stays 4-D: the next linear layer reads it as one whole-map conv patch
        if kind == "maxpool":
            x = F.max_pool2d(x, rec["kernel_size"], rec["stride"])
            continue
        if pixels and rec["input"] == "trits":
            # a first layer that ternarizes its input sees the scaled float pixels, exactly as the model did
            x = x.float() * torch.tensor(input_scale, dtype=torch.float32, device=x.device)
        thr = None if rec["input"] == "pixels" else rec["act_delta"]
        pixels = False
        if rec["input"] == "int8":   # never the first layer: x is the float32 output of the one before
            q, scale, (OH, OW) = _int8_rows(rec, x)
            y = bt_kernel.ternary_gemm_int8(q, scale, rec["pos"], rec["neg"], rec["alpha_p"], rec["alpha_n"],
                                            rec["bias"])
        else:
            planes, (OH, OW) = _packed_rows(rec, x, thr)
            a_pos, a_neg = (planes, None) if thr is None else planes
            y = bt_kernel.ternary_gemm_triton(a_pos, a_neg, rec["pos"], rec["neg"], rec["alpha_p"], rec["alpha_n"],
                                              rec["bias"])
        B, N = x.shape[0], y.shape[1]
        if kind == "conv":
            # rows are (b, oy, ox): an NHWC buffer, seen as NCHW without a copy
            x = y.view(B, OH, OW, N).permute(0, 3, 1, 2)
        else:
            x = y
    return x.flatten(1) if x.dim() > 2 else x


def _fused_plan(layers, input_shape):
    """Steps of the fused engine, one ternary_conv_packed call per conv/linear layer, or None for a network it
    does not cover (it needs raw pixels into the first layer, trits into the others, no padding after the
    first, and 2x2/2 max-pools)."""
    ternary = [r for r in layers if r["type"] in ("conv", "linear")]
    if ternary[0]["input"] != "pixels" or any(r["input"] == "int8" for r in ternary):
        return None
    steps = []
    H, W = (input_shape[1], input_shape[2]) if len(input_shape) == 3 else (1, 1)
    for rec in layers:
        kind = rec["type"]
        if kind == "flatten":
            continue
        if kind == "maxpool":
            if rec["kernel_size"] != 2 or rec["stride"] != 2 or steps[-1]["pool"] != 1:
                return None
            steps[-1]["pool"] = 2
            H, W = H // 2, W // 2
            continue
        N, K = rec["out_features"], rec["in_features"]
        step = dict(rec=rec, pool=1, threshold=None)
        if not steps:
            # raw pixels: pack_im2col's bit-serial patches in the export's own K order (c, ky, kx), read as
            # a map of 1x1 patches; a linear layer is a conv over the whole image
            step.update(pos=rec["pos"], neg=rec["neg"], conv=(1, 1))
            if kind == "conv":
                step.update(kernel=tuple(rec["kernel_size"]), stride=rec["stride"], padding=rec["padding"])
            else:
                step.update(kernel=(H, W), stride=1, padding=0)
        else:
            if kind == "conv":
                if rec["padding"] != 0:
                    return None
                kh, kw = rec["kernel_size"]
                step["conv"] = ((kh, kw), rec["stride"])
            else:   # the K order of flatten of a [C, H, W] map is (c, y, x): a conv over the whole map
                kh, kw = H, W
                step["conv"] = ((H, W), 1)
            trits = bt_kernel.unpack_bitplanes(rec["pos"], rec["neg"], K).view(N, K // (kh * kw), kh, kw)
            step["pos"], step["neg"] = bt_kernel.pack_conv_weight(trits)
            if bt_kernel.mma_available(trits.device):   # the MMA kernel loads 16-byte aligned weight rows in vectors
                step["pos"], step["neg"] = bt_kernel.row_major_planes(step["pos"], step["neg"])
            steps[-1]["threshold"] = rec["act_delta"]
        steps.append(step)
        if kind == "conv":
            (kh, kw), s, p = rec["kernel_size"], rec["stride"], rec["padding"]
            H, W = (H + 2 * p - kh) // s + 1, (W + 2 * p - kw) // s + 1
        else:
            H, W = 1, 1
    return steps


def fused_input(steps, x):
    """The fused engine's first input: raw pixels x, uint8 [B, C, H, W] or [B, K], as pack_im2col's bit-serial
    patches of the first layer, read as a map of 1x1 patches: (planes [BITS, B, OH, OW, 1], None)."""
    x = x[:, :, None, None] if x.dim() == 2 else x
    first = steps[0]
    planes, (OH, OW) = bt_kernel.pack_im2col(x, first["kernel"], first["stride"], first["padding"], threshold=None)
    return planes.unflatten(1, (x.shape[0], OH, OW)), None


def fused_step(st, x):
    """One layer of the fused engine on x = (pos, neg) packed maps (neg None: bit-serial pixels): packed maps
    for the next layer, or float32 NHWC after the last."""
    rec = st["rec"]
    return bt_kernel.ternary_conv_packed(*x, st["pos"], st["neg"], rec["alpha_p"], rec["alpha_n"], rec["bias"],
                                         kernel_size=st["conv"][0], stride=st["conv"][1], pool=st["pool"],
                                         threshold=st["threshold"])


def _forward_fused(steps, x):
    # x: uint8 [B, C, H, W] or [B, K] raw pixels; one GEMM per layer, activations stay packed between them
    x = fused_input(steps, x)
    for st in steps:
        x = fused_step(st, x)
    return x.permute(0, 3, 1, 2).flatten(1)   # float32 NHWC -> flatten's (c, y, x) order


def prepare_triton(state, device="cuda", fused=True):
    """The export ready for run_triton on `device`: tensors moved once and, for the fused engine, the
    weights re-packed into its (ky, kx, channel) word order. run_triton accepts the result in place of
    the export (and prepares an export itself on every call otherwise)."""
    validate_export(state, data=False)
    layers = _layers_to(state, device)
    return dict(state, layers=layers, fused_steps=_fused_plan(layers, state["input_shape"]) if fused else None)


def run_triton(state, images, batch_size=10000, fused=True):
    """Logits float32 [B, classes] of the export on the Triton popcount kernels.

    images: uint8 [B, *input_shape] (or [B, 28, 28] for input_shape [1, 28, 28]) on cuda, or on the cpu
    with TRITON_INTERPRET=1. fused=True runs one GEMM per layer on packed activations (pooling,
    ternarizing and packing in its epilogue; trit convs gather their packed patches first) where the
    network allows it; fused=False runs the layer-by-layer engine (im2col pack, GEMM to float32,
    F.max_pool2d). Both give the same logits bit for bit. `state` is an export or, to keep weight
    preparation out of timed runs, prepare_triton's result.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prepared = isinstance(state, dict) and "fused_steps" in state
    if not (prepared and next(l["pos"] for l in state["layers"] if "pos" in l).device == images.device):
        state = prepare_triton(state, images.device, fused)
    x = images_4d(images, state["input_shape"], "images")
    layers, steps = state["layers"], state["fused_steps"] if fused else None
    classes = [l for l in layers if l["type"] in ("conv", "linear")][-1]["out_features"]
    out = torch.empty((x.shape[0], classes), dtype=torch.float32, device=x.device)
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):   # bounds the im2col planes: 8 x 576 words per image for conv1
            xb = x[i:i + batch_size]
            out[i:i + batch_size] = _forward_fused(steps, xb) if steps else \
                _forward_triton(layers, xb, state["input_scale"])
    return out


# -----------------------------------------------------------------------------
# numpy inference: the same network multiply-free on the CPU, on the same packed planes


def _np_pack(bits, K):
    """[M, K] (nonzero = 1) -> uint32 words [M, KW], bit j of word w = column 32 w + j (the kernels' layout)."""
    b = np.packbits(bits, axis=-1, bitorder="little")
    KW = (K + 31) // 32
    if b.shape[-1] != 4 * KW:
        b = np.concatenate([b, np.zeros((b.shape[0], 4 * KW - b.shape[-1]), np.uint8)], axis=-1)
    return np.ascontiguousarray(b).view("<u4").astype(np.uint32, copy=False)


def _np_word_major(words):
    """uint32 [M, KW] -> word-major [KWw, M], uint64 pairs of words when there are several (half the popcounts).

    Pairs are built by value (lo | hi << 32), so weights and activations pair up alike on any byte order.
    """
    if words.shape[1] == 1:
        return np.ascontiguousarray(words.T)
    if words.shape[1] % 2:
        words = np.concatenate([words, np.zeros((words.shape[0], 1), np.uint32)], axis=1)
    w64 = words[:, 0::2].astype(np.uint64) | (words[:, 1::2].astype(np.uint64) << np.uint64(32))
    return np.ascontiguousarray(w64.T)


def _np_im2col(x, kh, kw, stride, pad):
    """x [B, H, W, C] -> [B*OH*OW, C*kh*kw], columns (c, ky, kx): F.unfold's order and the export's K order."""
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]   # [B, OH, OW, C, kh, kw]
    B, OH, OW = win.shape[:3]
    return win.reshape(B * OH * OW, -1), (OH, OW)


def _np_maxpool(x, k, s):
    """x [B, H, W, C] -> [B, OH, OW, C], F.max_pool2d's floor mode."""
    B, H, W, C = x.shape
    OH, OW = (H - k) // s + 1, (W - k) // s + 1
    if k == s:   # non-overlapping windows: a reshape, much faster than window views
        return x[:, :OH * k, :OW * k].reshape(B, OH, k, OW, k, C).max(axis=(2, 4))
    return sliding_window_view(x, (k, k), axis=(1, 2))[:, ::s, ::s].max(axis=(-2, -1))


def _np_layer(rec):
    """Per-layer constants, once per run: weight words (pos columns, then neg), each output's count of +1 and
    of -1 weights (int64 [2N], the same order), and float64 scales."""
    wcat = np.concatenate([rec["pos"].detach().cpu().numpy(), rec["neg"].detach().cpu().numpy()], axis=0)
    return dict(w=_np_word_major(wcat), N=rec["out_features"], K=rec["in_features"],
                counts=np.bitwise_count(wcat).sum(axis=1, dtype=np.int64),
                alpha_p=rec["alpha_p"].detach().cpu().numpy().astype(np.float64),
                alpha_n=rec["alpha_n"].detach().cpu().numpy().astype(np.float64),
                bias=rec["bias"].detach().cpu().numpy().astype(np.float64))


def _np_gemm(planes, L, bit_serial, rows=None, offset=0, row_scale=None):
    """Popcount GEMM and the kernels' epilogue: float32 [M, N].

    planes: word-major activation planes [P, KWw, M]: P = 2 (pos, neg trits) or the bit-serial bitplanes of
    unsigned ints (bit 0 first). Sums are exact integers; the epilogue is the float64 one of bt_kernel.
    offset: the unsigned ints are the values + offset (int8 as uint8: offset 128), taken off each sum
    exactly (offset times the count of +1 or -1 weights); row_scale: float64 [M], the int8 epilogue's.
    """
    w, N, K = L["w"], L["N"], L["K"]
    P, KWw, M = planes.shape
    N2 = w.shape[1]
    # counts: K per trit plane pair; (2^P - 1) K for unsigned P-bit ints. uint16 when it fits: half the traffic
    top = ((1 << P) - 1) * K if bit_serial else K
    acc_t = np.uint16 if top < 1 << 15 else np.uint32
    rows = rows or max(64, (1 << 17) // N2)   # keep one chunk's temporaries in L2
    out = np.empty((M, N), np.float32)
    tmp = np.empty((rows, N2), w.dtype)
    cnt = np.empty((rows, N2), np.uint8)
    acc = np.empty((rows, N2), acc_t)
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        m = r1 - r0
        t, c, a = tmp[:m], cnt[:m], acc[:m]
        a[...] = 0
        if bit_serial:
            for bit in range(P - 1, -1, -1):   # Horner: acc = 2 acc + popcounts of this bit
                if bit < P - 1:
                    np.add(a, a, out=a)
                for k in range(KWw):
                    np.bitwise_and(planes[bit, k, r0:r1, None], w[k][None, :], out=t)
                    np.bitwise_count(t, out=c)
                    np.add(a, c, out=a)
            S = a
        else:
            # popc(ap & w) - popc(an & w), wrapping in unsigned: exact once viewed as signed (|S| <= K)
            for k in range(KWw):
                np.bitwise_and(planes[0, k, r0:r1, None], w[k][None, :], out=t)
                np.bitwise_count(t, out=c)
                np.add(a, c, out=a)
                np.bitwise_and(planes[1, k, r0:r1, None], w[k][None, :], out=t)
                np.bitwise_count(t, out=c)
                np.subtract(a, c, out=a)
            S = a.view(np.int16 if acc_t is np.uint16 else np.int32)
        if offset:
            S = S.astype(np.int64) - offset * L["counts"]
        Sp, Sn = S[:, :N].astype(np.float64), S[:, N:].astype(np.float64)
        # the order of bt_kernel._epilogue: (alpha_p Sp - alpha_n Sn) + bias, products exact, one rounding to f32;
        # int8 rows (_int8_ternary_kernel): (alpha_p Sp - alpha_n Sn) times the row's scale, then + bias
        y = L["alpha_p"] * Sp
        y -= L["alpha_n"] * Sn
        if row_scale is not None:
            y *= row_scale[r0:r1, None]
        y += L["bias"]
        out[r0:r1] = y
    return out


def _np_trit_planes(x2d, K, delta):
    t = np.float32(delta)   # the kernels compare in float32 against a float32 threshold
    pos = _np_word_major(_np_pack(x2d > t, K))
    neg = _np_word_major(_np_pack(x2d < -t, K))
    return np.stack([pos, neg])


def _np_pixel_planes(x2d, K):
    return np.stack([_np_word_major(_np_pack(np.bitwise_and(x2d, np.uint8(1 << b)), K)) for b in range(8)])


def _np_int8_rows(x2d):
    """bt_kernel.quantize_rows_int8 in numpy, the same float32 operations in the same order: scale = absmax /
    127, inv = 1 / scale (0 where the scale is 0), q = x * inv rounded half to even, clipped to [-127, 127]."""
    x = x2d.astype(np.float32, copy=False)
    scale = np.abs(x).max(axis=1) / np.float32(127)
    inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, np.float32(1)), np.float32(0))
    q = np.clip(np.rint(x * inv.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def _np_int8_layer(rec, L, x):
    """An int8-input layer, multiply-free: x (float32 NHWC map or [B, K]) quantized per image, the int8 values
    offset to uint8 (+128) as 8 bit-serial planes, the offset taken off the sums exactly, the int8 epilogue."""
    B = x.shape[0]
    q, scale = _np_int8_rows(x.reshape(B, -1))   # the absmax and q = round(x / scale) do not depend on the order
    q = q.reshape(x.shape)
    if x.ndim == 4:
        if rec["type"] == "conv":
            (kh, kw), s, p = rec["kernel_size"], rec["stride"], rec["padding"]
        else:   # flatten: (c, y, x) order, as nn.Flatten of NCHW
            kh, kw, s, p = x.shape[1], x.shape[2], 1, 0
        q, (OH, OW) = _np_im2col(q, kh, kw, s, p)   # zero padding: an int8 zero, offset below like any value
        scale = np.repeat(scale, OH * OW)
    u = (q.astype(np.int16) + 128).astype(np.uint8)
    y = _np_gemm(_np_pixel_planes(u, L["K"]), L, True, offset=128, row_scale=scale.astype(np.float64))
    return y.reshape(B, OH, OW, L["N"]) if rec["type"] == "conv" else y


def _np_forward(layers, consts, x, input_scale):
    # x: uint8 [B, H, W, C] (NHWC: the GEMM's rows (b, oy, ox) need no transpose) or [B, K]
    pixels = True
    for rec, L in zip(layers, consts):
        kind = rec["type"]
        if kind == "maxpool":
            x = _np_maxpool(x, rec["kernel_size"], rec["stride"])
            continue
        if kind == "flatten":
            continue   # a map stays NHWC; the next linear layer reads it as one whole-map conv patch
        if rec["input"] == "int8":   # never the first layer: x is the float32 output of the one before
            x = _np_int8_layer(rec, L, x)
            continue
        if pixels and rec["input"] == "trits":
            x = x.astype(np.float32) * np.float32(input_scale)
        bit_serial = rec["input"] == "pixels"
        pixels = False
        K = L["K"]
        if x.ndim == 4:
            if kind == "conv":
                (kh, kw), s, p = rec["kernel_size"], rec["stride"], rec["padding"]
            else:   # flatten: (c, y, x) order, as nn.Flatten of NCHW
                kh, kw, s, p = x.shape[1], x.shape[2], 1, 0
            B = x.shape[0]
            if bit_serial:
                cols, (OH, OW) = _np_im2col(x, kh, kw, s, p)
                planes = _np_pixel_planes(cols, K)
            else:
                # ternarize before im2col: bools are 4x smaller to copy than floats
                t = np.float32(rec["act_delta"])
                cp, (OH, OW) = _np_im2col(x > t, kh, kw, s, p)
                cn, _ = _np_im2col(x < -t, kh, kw, s, p)
                planes = np.stack([_np_word_major(_np_pack(cp, K)), _np_word_major(_np_pack(cn, K))])
            y = _np_gemm(planes, L, bit_serial)
            x = y.reshape(B, OH, OW, L["N"]) if kind == "conv" else y
        else:
            planes = _np_pixel_planes(x, K) if bit_serial else _np_trit_planes(x, K, rec["act_delta"])
            x = _np_gemm(planes, L, bit_serial)
    if x.ndim == 4:
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
    return x


def run_numpy(state, images_np, chunk=128, threads=None, progress=None):
    """Logits float32 numpy [B, classes], bit-identical to run_triton's, multiply-free on the CPU.

    images_np: uint8 [B, *input_shape] (or [B, 28, 28]). Chunks of `chunk` images run in `threads`
    threads (default: the usable cores): numpy's ufuncs release the GIL. progress, if given, is called
    with the number of images done after each chunk, in order, on the calling thread.
    """
    validate_export(state, data=False)
    x = images_4d(np.asarray(images_np), state["input_shape"], "images_np")
    if x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)   # NHWC
    layers = state["layers"]
    consts = [_np_layer(rec) if rec["type"] in ("conv", "linear") else None for rec in layers]
    classes = [c for c in consts if c is not None][-1]["N"]
    out = np.empty((x.shape[0], classes), np.float32)
    starts = range(0, x.shape[0], chunk)

    def work(i):
        out[i:i + chunk] = _np_forward(layers, consts, x[i:i + chunk], state["input_scale"])
        return min(i + chunk, len(out))   # images done once this chunk and those before it are

    report = progress or (lambda done: None)
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads <= 1 or len(starts) <= 1:
        for i in starts:
            report(work(i))
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            done = pool.map(work, starts)
            try:
                for n in done:
                    report(n)
            finally:
                done.close()   # an exception here (Ctrl-C) cancels the chunks not yet started
    return out


# -----------------------------------------------------------------------------
# error grid


def save_error_grid(images, preds, labels, path, max_images=100, scale=3, columns=10):
    """PNG grid of misclassified images, each labelled 'pred/true'; written atomically. Returns how many."""
    from PIL import Image, ImageDraw, ImageFont   # only this needs Pillow

    images, preds, labels = (np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a)
                             for a in (images, preds, labels))
    if images.ndim == 4:
        images = images[:, 0]   # first channel of [B, C, H, W]
    wrong = np.flatnonzero(preds != labels)[:max_images]
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:   # Pillow < 10.1: bitmap font only
        font = ImageFont.load_default()
    if len(wrong) == 0:
        grid = Image.new("RGB", (200, 30), "black")
        ImageDraw.Draw(grid).text((6, 8), "no misclassified images", fill="white", font=font)
    else:
        h, w = images.shape[1] * scale, images.shape[2] * scale
        strip = 16
        cols = min(columns, len(wrong))
        rows = -(-len(wrong) // cols)
        grid = Image.new("RGB", (cols * (w + 2), rows * (h + strip + 2)), (40, 40, 40))
        draw = ImageDraw.Draw(grid)
        for j, i in enumerate(wrong):
            x0, y0 = (j % cols) * (w + 2) + 1, (j // cols) * (h + strip + 2) + 1
            img = images[i]
            if img.dtype != np.uint8:
                img = np.clip(img, 0, 255).astype(np.uint8)
            grid.paste(Image.fromarray(img, "L").resize((w, h), Image.NEAREST).convert("RGB"), (x0, y0))
            draw.text((x0 + 2, y0 + h + 1), f"{int(preds[i])}/{int(labels[i])}", fill=(255, 90, 90), font=font)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            grid.save(f, format="PNG")
        os.chmod(tmp, 0o644)   # mkstemp makes it 0600: an image is for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return len(wrong)


# -----------------------------------------------------------------------------
# command line


def _one_line(text):
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    out = ""
    for l in lines:
        out += (" " if not out or out.endswith(":") else "; ") + l
    return out.strip() or "no detail"


def _fail(message, status):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(status)


def get_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description="Balanced ternary MNIST inference from a packed export: "
                                     "Triton popcount kernels on cuda, multiply-free numpy on cpu.")
    parser.add_argument("--export", default="bt_mnist_export.pt", metavar="PATH",
                        help="export written by bt_train.py (default: bt_mnist_export.pt)")
    parser.add_argument("--device", default="cuda",
                        help="cuda: Triton kernels; cpu: numpy popcount path (default: cuda)")
    parser.add_argument("--data", default="data", metavar="DIR", help="dataset root folder (default: data)")
    parser.add_argument("--batch", type=int, default=10000, metavar="N",
                        help="images per Triton batch (default: 10000)")
    parser.add_argument("--errors", default=None, metavar="PATH",
                        help="write a PNG grid of misclassified test images here (default: none)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="use only the first N test images (default: all)")
    args = parser.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        parser.error(f"argument --device: unknown device {args.device!r} (choose cuda or cpu)")
    if args.batch <= 0:
        parser.error(f"argument --batch: must be >= 1, got {args.batch}")
    if args.limit is not None and args.limit <= 0:
        parser.error(f"argument --limit: must be >= 1, got {args.limit}")
    if not os.path.exists(args.export):
        parser.error(f"argument --export: {args.export}: no such file (train and export with bt_train.py)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{PROG}: warning: CUDA is not available, falling back to --device cpu (numpy path)", file=sys.stderr)
        args.device = "cpu"
    return args


def load(args):
    """(export, images, labels): the validated export and its data set's test images, uint8 [N, *input_shape]."""
    try:
        state = load_export(args.export)
    except ExportError as e:
        _fail(e, 2)
    print(f"export {args.export}: {_summary(state)}, {os.path.getsize(args.export) / 1000:.0f} KB")
    import bt_train   # lazily: its data code is only needed here
    dataset = state.get("dataset", "mnist")
    try:
        _, _, images, labels = bt_train.load_dataset(dataset, root=args.data)
    except (bt_train.DataError, ValueError) as e:
        _fail(_one_line(e), 1)
    if args.limit is not None:
        images, labels = images[:args.limit], labels[:args.limit]
    if len(images) == 0:
        _fail(f"the {dataset} test set is empty", 1)
    try:
        images = images_4d(images, state["input_shape"], f"{dataset} test images")
    except ValueError as e:
        _fail(f"{e} (export input_shape {state['input_shape']})", 2)
    print(f"data {dataset} test set: {len(images)} images")
    return state, images, labels


def infer(state, images, device, batch, reps=5):
    """(predictions on the CPU, seconds for all images, engine name). On the CPU a progress line shows when
    the run is slow (bt_train.ProgressLine). On cuda the seconds are the median of `reps` runs timed with
    CUDA events, after one run that compiles and autotunes; weights are moved and re-packed once, outside
    the timing."""
    if device == "cpu":
        import bt_train   # lazily, as in load: its progress line
        line = bt_train.ProgressLine(len(images), "images", f"{'numpy':<7} {device:<6} ")
        t0 = time.perf_counter()
        logits = run_numpy(state, images.numpy(), progress=line.update)
        seconds = time.perf_counter() - t0
        line.clear()   # report's line takes its place on a terminal
        return torch.from_numpy(logits.argmax(1)), seconds, "numpy"
    dev_state, x = prepare_triton(state, "cuda"), images.cuda()
    logits = run_triton(dev_state, x, batch)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_triton(dev_state, x, batch)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return logits.argmax(1).cpu(), statistics.median(times), "triton"


def report(args, state, images, labels, preds, seconds, engine):
    """Accuracy, images/s and agreement with the PyTorch model's predictions; the error grid with --errors."""
    n = len(images)
    correct = int((preds == labels).sum())
    ref = state.get("reference_predictions")
    if ref is not None and len(ref) >= n:
        same = int((preds == ref[:n].long().cpu()).sum())
        agreement = f"{100 * same / n:.2f}% ({same}/{n})"
    else:
        agreement = "n/a" if ref is None else f"n/a (reference has {len(ref)} predictions)"
    print(f"{engine:<7} {args.device:<6} accuracy {100 * correct / n:.2f}%  images/s {n / seconds:.2e}  "
          f"agreement with PyTorch model {agreement}")
    if args.errors:
        shown = save_error_grid(images, preds, labels, args.errors)
        print(f"errors: {n - correct} misclassified, {shown} drawn in {args.errors}")


def main(argv=None):
    args = get_args(argv)
    state, images, labels = load(args)
    preds, seconds, engine = infer(state, images, args.device, args.batch)
    report(args, state, images, labels, preds, seconds, engine)


if __name__ == "__main__":
    main()
