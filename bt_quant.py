"""bt_quant.py: balanced ternary quantizers, PyTorch modules, float-model conversion, BatchNorm folding and export.

Holds the quantizers (ternarize, ternary_activation, ternary_weight); the modules TernaryActivation,
TernaryLinear and TernaryConv2d (nn.Linear's and nn.Conv2d's signatures); ternarize_model (a float model's
nn.Linear/nn.Conv2d layers to ternary ones, made from their weights) and use_triton_kernels /
use_pytorch_layers (TernaryLinear to and from bt_kernel's TernaryLinearTriton, same state_dict); and the
export: export_ternary_state, save_export, atomic_write, export_size_report. Builds on bt_kernel.py (the
weight threshold rule and alpha init live there, so that TernaryLinearTriton stands alone); imports
nothing else of this project.

    from bt_quant import TernaryConv2d, TernaryLinear, export_ternary_state, ternarize_model, use_triton_kernels
    layer = TernaryLinear(1024, 256)          # ternary weights; input ternarized with act_delta=0.5
    conv = TernaryConv2d(1, 32, 5, act_delta=None)   # ternary weights, float input (raw pixels)
    model = ternarize_model(float_model, keep_float=("0", "4"))   # layers 0 and 4 stay float
    fast = use_triton_kernels(model)          # TernaryLinear -> TernaryLinearTriton, same state_dict
    state = export_ternary_state(net, input_shape=(1, 28, 28), input_scale=1 / 255)   # all layers ternary
    save_export(state, "bt_mnist_export.pt")  # atomic; loads with torch.load(weights_only=True)

q(x) = sign(x) [|x| > delta] projects onto {-1, 0, +1}. Its straight-through estimator passes the
gradient where |x| <= clip and zeroes it outside. Weights: Weff = alpha_p [W > d_c] - alpha_n [W < -d_c]
with learned per-output-channel alpha_p, alpha_n (TTQ): dL/dalpha_p = sum of dL/dWeff over W > d_c,
dL/dalpha_n = -sum over W < -d_c, and the latent W gets dL/dWeff scaled by alpha_p, 1 or alpha_n
(inside the clip).
"""
import copy
import os
import tempfile
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from bt_kernel import (TernaryLinearTriton, TernaryWeights, weight_ste_grads, initial_alphas, int8_activation,
                       pack_bitplanes, ternary_thresholds)

__all__ = ["ternarize", "ternary_activation", "ternary_weight", "TernaryActivation", "TernaryLinear",
           "TernaryLinearTriton", "TernaryConv2d", "ternary_thresholds", "initial_alphas", "ternarize_model",
           "use_triton_kernels", "use_pytorch_layers", "export_ternary_state", "save_export", "atomic_write",
           "export_size_report", "EXPORT_FORMAT", "EXPORT_VERSION"]

# -----------------------------------------------------------------------------
# quantizers


def ternarize(x, delta):
    """q(x) = sign(x) [|x| > delta], no gradient; delta a number or a tensor that broadcasts."""
    return torch.sign(x) * (x.abs() > delta)


class _TernaryActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, clip):
        ctx.save_for_backward(x)
        ctx.clip = clip
        # clamping to [-clip, clip] first changes no trit (delta < clip), so it is left implicit
        return ternarize(x, delta)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= ctx.clip), None, None


def ternary_activation(x, delta=0.5, clip=1.0):
    """Clamp to [-clip, clip], project to {-1, 0, +1} with dead zone delta; STE backward."""
    return _TernaryActivation.apply(x, delta, clip)


class _TernaryWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, alpha_p, alpha_n, thresholds, clip):
        d = thresholds.view(-1, *[1] * (weight.dim() - 1))
        ctx.save_for_backward(weight, alpha_p, alpha_n, thresholds)
        ctx.clip = clip
        shape = (-1,) + (1,) * (weight.dim() - 1)
        return alpha_p.view(shape) * (weight > d) - alpha_n.view(shape) * (weight < -d)

    @staticmethod
    def backward(ctx, g):
        weight, alpha_p, alpha_n, thresholds = ctx.saved_tensors
        return (*weight_ste_grads(g, weight, alpha_p, alpha_n, thresholds, ctx.clip), None, None)


def ternary_weight(weight, alpha_p, alpha_n, thresholds, clip=1.0):
    """Weff = alpha_p [W > d] - alpha_n [W < -d] per output channel, TTQ gradients."""
    return _TernaryWeight.apply(weight, alpha_p, alpha_n, thresholds, clip)


class TernaryActivation(nn.Module):
    """Ternary activation: clamp, then project to {-1, 0, +1}; STE backward."""

    def __init__(self, delta=0.5, clip=1.0):
        super().__init__()
        self.delta, self.clip = delta, clip

    def forward(self, x):
        return ternary_activation(x, self.delta, self.clip)

    def extra_repr(self):
        return f"delta={self.delta}, clip={self.clip}"


# -----------------------------------------------------------------------------
# modules (pure PyTorch; TernaryLinearTriton in bt_kernel.py is the kernel twin of TernaryLinear)


def _to_factory(module, device, dtype):
    # the parameters are made (and alpha_p/alpha_n initialised) in float32 on the CPU, then moved as nn's
    # device= and dtype= would have made them
    return module if device is None and dtype is None else module.to(device=device, dtype=dtype)


class TernaryLinear(TernaryWeights):
    """nn.Linear with ternary weights (and ternary inputs unless act_delta is None), in pure PyTorch.

    Same signature, defaults and parameters as nn.Linear, plus alpha_p/alpha_n and the keyword-only
    ternary options. Load float weights with ternarize_model: load_state_dict(strict=False) of an
    nn.Linear's weights leaves the alphas of the random initialisation.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, delta_rule="channel",
                 delta_t=0.7, delta=0.02, act_delta=0.5, act_clip=1.0, weight_clip=1.0, act_bits=None):
        self.in_features, self.out_features = in_features, out_features
        super().__init__((out_features, in_features), bias, delta_rule, delta_t, delta, act_delta, act_clip,
                         weight_clip, act_bits)
        _to_factory(self, device, dtype)

    def forward(self, x):
        if self.act_bits == 8:   # BitNet b1.58's int8 activations (per-row absmax), act_delta unused
            x = int8_activation(x)
        elif self.act_delta is not None:
            x = ternary_activation(x, self.act_delta, self.act_clip)
        w = ternary_weight(self.weight, self.alpha_p, self.alpha_n, self.thresholds(), self.weight_clip)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"delta_rule={self.delta_rule}, {self._input_repr()}")


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _int_pair(value, name, low):
    """An int or a pair of ints, each >= low, as a tuple (the geometry arguments of nn.Conv2d)."""
    pair = (value, value) if isinstance(value, int) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in pair)):
        raise ValueError(f"{name} must be an int >= {low} or a pair of them, got {value!r}")
    return tuple(pair)


class TernaryConv2d(TernaryWeights):
    """nn.Conv2d with ternary weights and per-output-channel alpha_p/alpha_n, in pure PyTorch.

    Same signature, defaults, attributes and parameters as nn.Conv2d (stride, padding, 'same'/'valid',
    dilation, groups, bias, padding_mode), plus alpha_p/alpha_n and the keyword-only ternary options.
    The input is ternarized with dead zone act_delta first; act_delta=None keeps it as it is (raw
    pixels); act_bits=8 quantizes it to int8 with one absmax scale per image (over C, H, W: BitNet b1.58's
    quantizer, gradient straight through), act_delta unused then. The export (export_ternary_state) takes
    a subset: see there.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", device=None, dtype=None, *, delta_rule="channel", delta_t=0.7, delta=0.02,
                 act_delta=0.5, act_clip=1.0, weight_clip=1.0, act_bits=None):
        self.kernel_size = _int_pair(kernel_size, "kernel_size", 1)
        self.stride = _int_pair(stride, "stride", 1)
        self.dilation = _int_pair(dilation, "dilation", 1)
        self.padding = padding if isinstance(padding, str) else _int_pair(padding, "padding", 0)
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
        if padding == "same" and self.stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride={stride!r}")
        if not (isinstance(groups, int) and groups >= 1 and in_channels % groups == 0 and out_channels % groups == 0):
            raise ValueError(f"groups must be an int >= 1 dividing in_channels ({in_channels}) and out_channels "
                             f"({out_channels}), got {groups!r}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.padding_mode = groups, padding_mode
        super().__init__((out_channels, in_channels // groups, *self.kernel_size), bias, delta_rule, delta_t, delta,
                         act_delta, act_clip, weight_clip, act_bits)
        _to_factory(self, device, dtype)

    def side_padding(self):
        """(left, right, top, bottom): the padding on each side of the input, the order of F.pad."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":   # an even span pads one more on the right and the bottom, as nn.Conv2d does
            (sh, sw) = (d * (k - 1) for d, k in zip(self.dilation, self.kernel_size))
            return (sw // 2, sw - sw // 2, sh // 2, sh - sh // 2)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def forward(self, x):
        # padding after quantizing: a padded value is 0 or a copy of a quantized one
        if self.act_bits == 8:   # one scale per image: its [C, H, W] values are one row of the quantizer
            x = int8_activation(x.flatten(-3)).reshape(x.shape)
        elif self.act_delta is not None:
            x = ternary_activation(x, self.act_delta, self.act_clip)
        w = ternary_weight(self.weight, self.alpha_p, self.alpha_n, self.thresholds(), self.weight_clip)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self.side_padding(), mode=self.padding_mode), 0
        else:
            padding = self.padding
        return F.conv2d(x, w.to(x.dtype), b, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        for name, default in (("padding", (0, 0)), ("dilation", (1, 1)), ("groups", 1), ("padding_mode", "zeros")):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)!r}"
        return s + f", bias={self.bias is not None}, {self._input_repr()}"


# -----------------------------------------------------------------------------
# converting: float nn.Linear / nn.Conv2d to ternary layers, and TernaryLinear to and from its kernel twin

_QUANT_OPTIONS = ("delta_rule", "delta_t", "delta", "act_clip", "weight_clip")


def _ternary_options(layer):
    return {name: getattr(layer, name) for name in _QUANT_OPTIONS + ("act_delta", "act_bits")}


def _copy_requires_grad(new, old):
    for name, p in old.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(p.requires_grad)


def _names_by_module(model):
    """{id(module): (module, [its names in model.named_modules(), shared modules under each])}."""
    names_of = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), (module, []))[1].append(name)
    return names_of


def _replace_layers(model, replacement, inplace):
    """model (or a deep copy of it) with each module m swapped for replacement(names, m) where that is not None.

    names: every name of m in model.named_modules(). All replacements are built before the first swap, so
    an error leaves the model as it was; a module registered under several names stays shared.
    """
    model = model if inplace else copy.deepcopy(model)
    new = {key: replacement(names, module) for key, (module, names) in _names_by_module(model).items()}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and new[id(module)] is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new[id(module)])
    return model if new[id(model)] is None else new[id(model)]


def _keep_float_rule(model, keep_float):
    """(name, module) -> bool from keep_float: names (a container's keeps all inside it), modules, callables."""
    if keep_float is None:
        rules = []
    else:
        rules = list(keep_float) if isinstance(keep_float, (list, tuple, set)) else [keep_float]
    names_of = {key: names for key, (_, names) in _names_by_module(model).items()}
    prefixes, predicates = [], []
    for rule in rules:
        if isinstance(rule, nn.Module):   # before callable: a module is callable too
            if id(rule) not in names_of:
                raise ValueError(f"keep_float holds a {type(rule).__name__} that is not a module of the model")
            prefixes += names_of[id(rule)]
        elif isinstance(rule, str):
            prefixes.append(rule)
        elif callable(rule):
            predicates.append(rule)
        else:
            raise TypeError(f"keep_float takes module names, modules and callables (name, module) -> bool, "
                            f"got {rule!r}")
    known = {name for names in names_of.values() for name in names}
    unknown = [p for p in prefixes if p not in known]
    if unknown:
        layers = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
        raise ValueError(f"keep_float names no module of the model: {unknown}; its nn.Linear and nn.Conv2d "
                         f"layers: {layers}")
    return lambda name, module: (any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)
                                 or any(bool(f(name, module)) for f in predicates))


@torch.no_grad()
def _ternary_twin(layer, act_delta, quant):
    """The TernaryLinear / TernaryConv2d of a float layer: its geometry, weight, bias, device, dtype and mode."""
    w, has_bias = layer.weight, layer.bias is not None
    options = dict(device=w.device, dtype=w.dtype, act_delta=act_delta, **quant)
    if type(layer) is nn.Linear:
        new = TernaryLinear(layer.in_features, layer.out_features, has_bias, **options)
    else:
        new = TernaryConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                            layer.dilation, layer.groups, has_bias, layer.padding_mode, **options)
    new.weight.copy_(w)
    if has_bias:
        new.bias.copy_(layer.bias)
    new.init_alphas()   # from the copied weight, as a new layer's from its random one
    _copy_requires_grad(new, layer)
    return new.train(layer.training)


def ternarize_model(model, *, keep_float=(), act_delta=0.5, act_bits=None, inplace=False, **quant):
    """The model with each nn.Linear and nn.Conv2d replaced by a TernaryLinear or TernaryConv2d made from it.

    A new layer keeps the float layer's geometry, weight and bias (copied exactly), device, dtype,
    requires_grad and train/eval mode; its alpha_p/alpha_n start from that weight (initial_alphas).
    Containers are searched at any depth; only modules of exactly these two classes convert (a subclass
    may compute something else). Make the optimizer after converting: the parameters are new.

    keep_float: layers left float, commonly the first and the last: names as in model.named_modules()
        (a container's name keeps everything inside it), modules of the model, and/or callables
        (name, module) -> bool. A name or module that is not in the model raises ValueError.
    act_delta: the dead zone of the converted layers' ternary inputs; None keeps their inputs float
        (ternary weights only, and such linear layers stay on the PyTorch path: use_triton_kernels).
    act_bits: 8 gives the converted layers int8 inputs instead of trits (W1.58A8): absmax per row of a
        linear layer's input, per image of a conv's; act_delta is then unused.
    inplace: False converts a deep copy, leaving `model` as it was; True converts `model` itself. Either
        way use the returned model (a bare nn.Linear or nn.Conv2d comes back as a new layer).
    quant: the weight rule and clips of the new layers (delta_rule, delta_t, delta, act_clip, weight_clip);
        the ternary layers' defaults where not given.
    """
    unknown = sorted(set(quant) - set(_QUANT_OPTIONS))
    if unknown:
        raise TypeError(f"ternarize_model got unknown options {unknown}: it takes keep_float, act_delta, act_bits, inplace, "
                        f"{', '.join(_QUANT_OPTIONS)}")
    keep = _keep_float_rule(model, keep_float)
    for name, m in model.named_modules():
        if isinstance(m, (nn.LazyLinear, nn.LazyConv2d)) and m.has_uninitialized_params():
            raise ValueError(f"{name or 'the model'}: {type(m).__name__} has no weights yet: run one forward first")

    def convert(names, m):
        if type(m) not in (nn.Linear, nn.Conv2d) or any(keep(name, m) for name in names):
            return None
        return _ternary_twin(m, act_delta, dict(quant, act_bits=act_bits))
    return _replace_layers(model, convert, inplace)


@torch.no_grad()
def _swap_class(layer, cls):
    """layer as a cls (TernaryLinear or TernaryLinearTriton): the same options, device, dtype, mode and state_dict."""
    new = cls(layer.in_features, layer.out_features, layer.bias is not None, **_ternary_options(layer))
    new.to(device=layer.weight.device, dtype=layer.weight.dtype)
    new.load_state_dict(layer.state_dict())
    _copy_requires_grad(new, layer)
    return new.train(layer.training)


def use_triton_kernels(model, *, inplace=False):
    """The model with each TernaryLinear swapped for a TernaryLinearTriton: forward on the popcount kernels.

    Same options and state_dict (so the outputs match up to float32 rounding). A TernaryLinear with
    act_delta=None takes float input, which the kernels do not: it stays, and a UserWarning names it.
    TernaryConv2d stays in PyTorch (the export runs convs on the kernels). inplace as in ternarize_model.
    """
    float_input = []

    def swap(names, m):
        if type(m) is not TernaryLinear:
            return None
        if m.act_delta is None and m.act_bits is None:
            float_input.append(names[0])
            return None
        return _swap_class(m, TernaryLinearTriton)
    model = _replace_layers(model, swap, inplace)
    if float_input:
        warnings.warn(f"use_triton_kernels: {float_input} take float input (act_delta=None) and stay TernaryLinear "
                      f"on the PyTorch path", stacklevel=2)
    return model


def use_pytorch_layers(model, *, inplace=False):
    """The model with each TernaryLinearTriton swapped back for a TernaryLinear (pure PyTorch: any device, no
    Triton), same options and state_dict. inplace as in ternarize_model."""
    return _replace_layers(model, lambda names, m: _swap_class(m, TernaryLinear)
                           if type(m) is TernaryLinearTriton else None, inplace)


# -----------------------------------------------------------------------------
# export: BatchNorm folded into the scales, weights as 2-bit planes, one self-describing dict

EXPORT_FORMAT = "btmnist-ternary"
EXPORT_VERSION = 1


def _fold_batchnorm(alpha_p, alpha_n, bias, bn):
    # y = s * (alpha_p Sp - alpha_n Sn + b) + t, in float64 then rounded once
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    t = bn.bias.double() - s * bn.running_mean.double()
    return alpha_p * s, alpha_n * s, bias * s + t


def _input_kind(layer):
    """What a ternary layer takes in the export: 'int8' (act_bits=8), 'pixels' (act_delta=None) or 'trits'."""
    if getattr(layer, "act_bits", None) == 8:
        return "int8"
    return "pixels" if layer.act_delta is None else "trits"


def _export_conv_geometry(conv, where):
    """kernel_size [kh, kw], stride and padding as ints: the convs the inference engine runs, else ValueError."""
    unsupported = []
    if conv.stride[0] != conv.stride[1]:
        unsupported.append(f"stride={conv.stride} (needs one stride for both directions)")
    pads = conv.side_padding()
    if len(set(pads)) != 1:
        unsupported.append(f"padding={conv.padding!r} (needs the same padding on every side)")
    elif pads[0] and conv.padding_mode != "zeros":
        unsupported.append(f"padding_mode={conv.padding_mode!r} (needs 'zeros')")
    if conv.dilation != (1, 1):
        unsupported.append(f"dilation={conv.dilation} (needs 1)")
    if conv.groups != 1:
        unsupported.append(f"groups={conv.groups} (needs 1)")
    if unsupported:
        raise ValueError(f"{where}: cannot export " + ", ".join(unsupported))
    return list(conv.kernel_size), conv.stride[0], pads[0]


@torch.no_grad()
def export_ternary_state(model, input_shape=(1, 28, 28), input_scale=1 / 255, **meta):
    """A packed, self-describing export of an nn.Sequential of ternary layers, BatchNorm, MaxPool2d, Flatten.

    Convs: one stride for both directions, the same zero padding on every side, no dilation, one group
    (else ValueError naming the layer and the setting).

    Each ternary layer becomes {type, geometry, input kind, pos/neg uint32 planes [N, KW] (2 bits per
    weight, K in F.unfold's (c, ky, kx) order), alpha_p, alpha_n, bias (float32, BatchNorm folded in)}.
    The first layer may take raw pixels (act_delta=None): their scale input_scale is folded into its
    alphas, so inference feeds exact integers. A layer after it with act_bits=8 takes int8 input
    ("int8": absmax per row of a linear layer, per image of a conv; the scale multiplies the integer
    sums before BatchNorm's affine map, so the folding is the same). `meta` (dataset, classes, arch, ...)
    is stored as it is.
    """
    layers = []
    mods = list(model.children()) if isinstance(model, nn.Sequential) else list(model.modules())[1:]
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, (TernaryConv2d, TernaryLinear, TernaryLinearTriton)):
            first = not any(l["type"] in ("conv", "linear") for l in layers)
            kind = _input_kind(m)
            if kind == "pixels" and not first:
                raise ValueError(f"layer {i} ({type(m).__name__}) takes float input: only the first layer may")
            if kind == "int8" and first:
                raise ValueError(f"layer {i} ({type(m).__name__}) has act_bits=8: the first layer takes the pixels "
                                 f"(act_delta=None) or trits, int8 inputs are for the layers after it")
            trits = m.ternary_weight().flatten(1)
            pos, neg = (p.contiguous() for p in pack_bitplanes(trits.cpu()))   # no row padding in the file
            ap, an = m.alpha_p.double().cpu(), m.alpha_n.double().cpu()
            b = torch.zeros_like(ap) if m.bias is None else m.bias.double().cpu()
            if kind == "pixels":
                ap, an = ap * input_scale, an * input_scale
            if i + 1 < len(mods) and isinstance(mods[i + 1], (nn.BatchNorm1d, nn.BatchNorm2d)):
                ap, an, b = _fold_batchnorm(ap, an, b, mods[i + 1].cpu())
                i += 1
            rec = dict(type="conv" if isinstance(m, TernaryConv2d) else "linear",
                       in_features=trits.shape[1], out_features=trits.shape[0],
                       input=kind, act_delta=float(m.act_delta) if kind == "trits" else None,
                       pos=pos.contiguous(), neg=neg.contiguous(),
                       alpha_p=ap.float(), alpha_n=an.float(), bias=b.float())
            if isinstance(m, TernaryConv2d):
                kernel_size, stride, padding = _export_conv_geometry(m, f"layer {i} (TernaryConv2d)")
                rec.update(in_channels=m.in_channels, kernel_size=kernel_size, stride=stride, padding=padding)
            layers.append(rec)
        elif isinstance(m, nn.MaxPool2d):
            k, s = m.kernel_size, m.stride or m.kernel_size
            if not (isinstance(k, int) and isinstance(s, int)) or m.padding not in (0, (0, 0)) or m.dilation not in (1, (1, 1)):
                raise ValueError("only MaxPool2d(k, stride) with square int kernel, no padding or dilation")
            layers.append(dict(type="maxpool", kernel_size=k, stride=s))
        elif isinstance(m, nn.Flatten):
            layers.append(dict(type="flatten"))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            raise ValueError(f"layer {i}: BatchNorm must follow a ternary layer to be folded")
        elif not isinstance(m, (nn.Identity, nn.Dropout)):
            raise ValueError(f"layer {i}: cannot export {type(m).__name__}")
        i += 1
    return dict(format=EXPORT_FORMAT, version=EXPORT_VERSION, input_shape=list(input_shape),
                input_scale=float(input_scale), layers=layers, **meta)


def atomic_write(path, write):
    """write(f) into a temporary file in path's folder, then rename it to path: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes 0600; exports and data are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_export(state, path):
    """torch.save, atomically (atomic_write)."""
    atomic_write(path, lambda f: torch.save(state, f))


def export_size_report(state, path=None):
    """(weights, packed bytes, bits per weight, ratio to float32) of an export, as one printable line."""
    n_weights = sum(l["out_features"] * l["in_features"] for l in state["layers"] if "pos" in l)
    plane_bytes = sum(l["pos"].numel() * 4 * 2 for l in state["layers"] if "pos" in l)
    scale_bytes = sum(4 * (l["alpha_p"].numel() * 3) for l in state["layers"] if "pos" in l)
    file_bytes = os.path.getsize(path) if path else plane_bytes + scale_bytes
    return (f"export: {n_weights} weights in {plane_bytes} B of bitplanes ({8 * plane_bytes / n_weights:.2f} bits/weight) "
            f"+ {scale_bytes} B of scales; file {file_bytes} B = {8 * file_bytes / n_weights:.2f} bits/weight, "
            f"{4 * n_weights / file_bytes:.1f}x smaller than float32 weights ({4 * n_weights} B)")
