#!/usr/bin/python3
"""PyTorch reference generator for the sfr model zoo (numerical parity tests).

Usage
-----
    /usr/bin/python3 tools/zoo_reference.py --out DIR [--arch NAME ...]
                                            [--cache DIR] [--threads N] [--no-f64]

Needs Debian's CPU PyTorch (python3-torch, python3-torchvision); no other
third-party Python package is required.  The EfficientNet-Lite reference model
comes from the PyPI package ``efficientnet-lite-pytorch==0.1.0``: if it is not
importable, the script runs ``python3 -m pip download --no-deps`` for it into
``--cache`` (default /tmp/sfr_zoo_reference_cache), unzips the wheel there and
puts it on sys.path (nothing is installed into the system).

For every architecture NAME it writes

* ``DIR/NAME.safetensors``: the weights.  Every floating tensor is F32; key
  names are exactly the reference model's ``state_dict()`` keys (torchvision's
  for torchvision models, the efficientnet-lite-pytorch package's for the lite
  models, which equal the keys of the released ``efficientnet-liteN-*.pth``
  files; Caffe layer names for caffenet/vgg_f).  BatchNorm
  ``num_batches_tracked`` is saved too, as a shape-[] I64 tensor (0).
* ``DIR/NAME_io.safetensors`` with tensors
    - ``input``  F32 [2, 3, H, W]: the network input, already normalised
      (seeded N(0,1); for caffenet/vgg_f seeded N(0, 60^2), i.e. the scale of
      Caffe's mean-subtracted 0..255 BGR pixels),
    - ``logits`` F32 [2, 1000]: ``model.eval()`` output on ``input`` (float32
      forward, 1 thread),
    - ``site.<name>`` F32 [2, C, h, w] for the first two Conv2d layers in
      forward order: the raw conv output (after conv + bias, before BN/ReLU).
      Site names are the conv's state_dict path minus ``.weight``
      (``features.0``, ``conv1``, ``conv1.conv``, ``features.0.0``,
      ``_conv_stem``, ...; caffenet/vgg_f: ``conv1``, ``conv2``).
  and string metadata (safetensors ``__metadata__`` is a str->str map):
    arch, height, width, batch, sites (comma separated, forward order),
    input_dist, logit_std, logit_absmax, f64_max_abs_diff (max |float32 logits
    - float64 logits| of the same weights/input: the float32 noise floor),
    input_sensitivity (std(logits[0]-logits[1]) / (sqrt(2) * logit_std)),
    seed, torch, torchvision, plus per-family extras (transform_input for
    googlenet*, width_mult/depth_mult/package for efficientnet_lite*).

Determinism: every random draw comes from fixed seeds (crc32 of the arch name),
so a subset run produces the same files as a full run.

Weights
-------
* torchvision models: full-size architectures with torchvision's own random
  init (``weights=None``); efficientnet-lite: the package's own init (PyTorch
  defaults); caffenet/vgg_f: conv/fc weights N(0, 2/fan_in), biases N(0, 1).
* BatchNorm (every BatchNorm2d): running stats and affine params are
  overwritten with random, non-trivial values that are *calibrated* so the
  signal neither vanishes nor explodes through deep nets: a forward pass (eval
  mode) on a separate seeded calibration batch sets, just before each BN runs,
  with m, v = per-channel mean and biased variance of that BN's input,
      running_var  = (v + 0.05 * mean_c(v) + 1e-6) * U(0.5, 1.5)
      running_mean = m + 0.1 * N(0, 1) * sqrt(running_var)
      weight       = U(0.5, 1.5)
      bias         = N(0, 0.1^2)
  (later BNs see the already-randomised earlier ones).
* Final classifier (last nn.Linear): the weight is scaled so that the
  input-dependent part W x of the logits has std 1 on the test input, and its
  bias is replaced by N(0, 0.1^2).  So logit std is ~1 for every arch and an
  absolute tolerance is also a relative one.

Architectures and input sizes (H x W)
-------------------------------------
  alexnet            160x160  (torchvision; features end at 4x4, so the
                               AdaptiveAvgPool2d(6) really averages
                               overlapping bins; 96 would give 2x2 = pure
                               replication)
  vgg16              64x64    (features end 2x2 -> AdaptiveAvgPool2d(7))
  googlenet          64x64    (aux_logits=False, transform_input=False,
                               init_weights=True)
  googlenet_ti       64x64    same weights file content and same input as
                               googlenet, but transform_input=True
  resnet18/50/152    64x64
  mobilenet_v2       64x64
  efficientnet_lite0 64x64    (all stride-2 "same" paddings even-sized)
  efficientnet_lite1 72x72    (odd-sized stride-2 inputs: 9 for k3, 5 for k5)
  efficientnet_lite2 80x80    (odd-sized stride-2 input 5 for k5)
  efficientnet_lite3 64x64
  efficientnet_lite4 64x72    (H=64, W=72: non-square, pad_h != pad_w)
  caffenet           224x224
  vgg_f              224x224

CaffeNet (bvlc_reference_caffenet) and VGG-F (VGG_CNN_F)
--------------------------------------------------------
Keys conv1..conv5, fc6..fc8 (.weight/.bias); conv weight [out, in/groups, k, k],
fc weight [out, in] (PyTorch Linear layout).  Max pools are 3x3 stride 2 with
Caffe's ceil rounding (ceil_mode=True).  LRN is Caffe's ACROSS_CHANNELS LRN,
identical to torch.nn.LocalResponseNorm(size, alpha, beta, k):
b_c = a_c / (k + alpha/size * sum_{c' in [c-2, c+2]} a_c'^2)^beta (zero pad).
Flatten before fc6 is C-major (C, H, W), as Caffe's InnerProduct.
  caffenet: conv1 96 k11 s4 -> ReLU -> pool -> LRN(5, 1e-4, .75, k=1)
            -> conv2 256 k5 p2 g2 -> ReLU -> pool -> LRN -> conv3 384 k3 p1
            -> ReLU -> conv4 384 k3 p1 g2 -> ReLU -> conv5 256 k3 p1 g2 -> ReLU
            -> pool -> fc6 9216->4096 -> ReLU -> fc7 4096 -> ReLU -> fc8 1000
            (224: conv1 54, pools 27 / 13 / 6)
  vgg_f:    conv1 64 k11 s4 -> ReLU -> LRN(5, 5e-4, .75, k=2) -> pool
            -> conv2 256 k5 p2 -> ReLU -> LRN -> pool -> conv3 256 k3 p1 -> ReLU
            -> conv4 256 k3 p1 -> ReLU -> conv5 256 k3 p1 -> ReLU -> pool
            -> fc6 9216->4096 -> ReLU -> fc7 -> ReLU -> fc8 1000
  (VGG_CNN_F_deploy.prototxt has alpha 0.0005, k 2 for both LRNs; the
  caffe-tensorflow conversion of it shows alpha/size = 1e-4, consistent.)
  Dropout layers are identity at inference and are omitted.

EfficientNet-Lite (efficientnet-lite-pytorch 0.1.0 == TF efficientnet/lite)
--------------------------------------------------------------------------
Keys: ``_conv_stem.weight, _bn0.*, _blocks.{i}._expand_conv.weight (absent when
expand_ratio == 1, i.e. block 0), _blocks.{i}._bn0.*, _blocks.{i}._depthwise_conv
.weight, _blocks.{i}._bn1.*, _blocks.{i}._project_conv.weight, _blocks.{i}._bn2.*,
_conv_head.weight, _bn1.*, _fc.weight [1000, 1280], _fc.bias``.  Blocks are
numbered consecutively over all stages.  No conv has a bias; no SE.

Per variant (width_mult, depth_mult, native resolution, dropout):
  lite0 (1.0, 1.0, 224, 0.2)   lite1 (1.0, 1.1, 240, 0.2)
  lite2 (1.1, 1.2, 260, 0.3)   lite3 (1.2, 1.4, 280, 0.3)
  lite4 (1.4, 1.8, 300, 0.3)
Base block args (repeats, kernel, stride, expand, in, out), id_skip everywhere:
  s1 (1, 3, 1, 1,  32,  16)   s2 (2, 3, 2, 6,  16,  24)   s3 (2, 5, 2, 6, 24, 40)
  s4 (3, 3, 2, 6,  40,  80)   s5 (3, 5, 1, 6,  80, 112)   s6 (4, 5, 2, 6, 112, 192)
  s7 (1, 3, 1, 6, 192, 320)
Scaling:
  round_filters(f) = f if width_mult is 1.0 (or fixed), else:
      d = 8; x = f * width_mult; n = max(8, int(x + d/2) // d * d);
      if n < 0.9 * x: n += d
  round_repeats(r) = ceil(depth_mult * r)
  Lite fixes stem and head ("fix_head_stem"): stem is always 32 channels,
  head always 1280; stage s1's input is always 32; the repeats of the FIRST
  and LAST stage (s1, s7) are NOT scaled; all other in/out channel counts
  (including s1's output and s7's output) are round_filters'ed; repeats of
  s2..s6 are round_repeats'ed.
Resulting stages (repeats, k, s, e, in, out):
  lite0: (1,3,1,1,32,16) (2,3,2,6,16,24) (2,5,2,6,24,40) (3,3,2,6,40,80)
         (3,5,1,6,80,112) (4,5,2,6,112,192) (1,3,1,6,192,320)       16 blocks
  lite1: (1,3,1,1,32,16) (3,3,2,6,16,24) (3,5,2,6,24,40) (4,3,2,6,40,80)
         (4,5,1,6,80,112) (5,5,2,6,112,192) (1,3,1,6,192,320)       21 blocks
  lite2: (1,3,1,1,32,16) (3,3,2,6,16,24) (3,5,2,6,24,48) (4,3,2,6,48,88)
         (4,5,1,6,88,120) (5,5,2,6,120,208) (1,3,1,6,208,352)       21 blocks
  lite3: (1,3,1,1,32,24) (3,3,2,6,24,32) (3,5,2,6,32,48) (5,3,2,6,48,96)
         (5,5,1,6,96,136) (6,5,2,6,136,232) (1,3,1,6,232,384)       24 blocks
  lite4: (1,3,1,1,32,24) (4,3,2,6,24,32) (4,5,2,6,32,56) (6,3,2,6,56,112)
         (6,5,1,6,112,160) (8,5,2,6,160,272) (1,3,1,6,272,448)      30 blocks
  Within a stage only the first block has the stage's stride and input
  channels; the others have stride 1 and in = out.
Network:
  stem:  conv 3x3 s2 "same", 3 -> 32, no bias -> BN -> ReLU6
  block (MBConv, in -> out, expand e, kernel k, stride s):
      if e != 1: 1x1 conv in -> in*e (no bias) -> BN (_bn0) -> ReLU6
      depthwise kxk conv stride s "same", groups = in*e -> BN (_bn1) -> ReLU6
      1x1 conv in*e -> out (no bias) -> BN (_bn2)   (no activation)
      residual add of the block input iff s == 1 and in == out
      (drop_connect only in training)
  head:  1x1 conv -> 1280 (no bias) -> BN -> ReLU6 -> global average pool
         -> dropout (identity at inference) -> Linear 1280 -> 1000
  BN: eps = 1e-3 (momentum 0.01 in PyTorch convention; irrelevant in eval).
  ReLU6 everywhere (min(max(x, 0), 6)).
  TF "same" padding (every conv, including 1x1 and stride 1), per spatial dim
  with input size i, kernel k, stride s:
      o = ceil(i / s); pad = max((o - 1) * s + k - i, 0);
      pad_before = pad // 2; pad_after = pad - pad_before   (zero padding)
  i.e. stride 1: symmetric (k-1)/2; stride 2 on even i: extra pixel at the
  bottom/right; stride 2 on odd i: symmetric.  The package computes this
  statically from its ``image_size``; this script builds the model with
  image_size = (H, W) of the test input, which equals the dynamic rule above.
  Preprocessing of the released weights (not used here): (x - 127) / 128 on
  0..255 RGB, native resolution above.
"""

import argparse
import copy
import glob
import json
import math
import os
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

LITE_PKG = "efficientnet-lite-pytorch"
LITE_VERSION = "0.1.0"
BATCH = 2

# name -> (H, W)
SIZES = {
    "alexnet": (160, 160),
    "vgg16": (64, 64),
    "googlenet": (64, 64),
    "googlenet_ti": (64, 64),
    "resnet18": (64, 64),
    "resnet50": (64, 64),
    "resnet152": (64, 64),
    "mobilenet_v2": (64, 64),
    "efficientnet_lite0": (64, 64),
    "efficientnet_lite1": (72, 72),
    "efficientnet_lite2": (80, 80),
    "efficientnet_lite3": (64, 64),
    "efficientnet_lite4": (64, 72),
    "caffenet": (224, 224),
    "vgg_f": (224, 224),
}
ARCHS = list(SIZES)
CAFFE_INPUT_STD = 60.0


# --------------------------------------------------------------------------
# safetensors (hand-written; Debian has no python3-safetensors)
# --------------------------------------------------------------------------

_DTYPES = {torch.float32: ("F32", np.float32), torch.int64: ("I64", np.int64)}


def save_safetensors(path, tensors, metadata=None):
    """tensors: ordered dict name -> torch.Tensor (float32 or int64)."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    off = 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype.is_floating_point:
            t = t.to(torch.float32)
        code, npdt = _DTYPES[t.dtype]
        b = t.numpy().astype(npdt, copy=False).astype(np.dtype(npdt).newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    npdt = {"F32": np.float32, "I64": np.int64}
    out = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        arr = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=np.dtype(npdt[v["dtype"]]).newbyteorder("<"))
        out[k] = torch.from_numpy(arr.reshape(v["shape"]).astype(npdt[v["dtype"]]))
    return out, meta


# --------------------------------------------------------------------------
# Caffe models
# --------------------------------------------------------------------------

class _CaffeAlexStyle(nn.Module):
    def __init__(self, convs, lrn, lrn_before_pool):
        super().__init__()
        for i, (cin, cout, k, s, p, g) in enumerate(convs, 1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g))
        self.fc6 = nn.Linear(convs[-1][1] * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, 1000)
        self.lrn = nn.LocalResponseNorm(*lrn)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.lrn_before_pool = lrn_before_pool

    def _norm_pool(self, x):
        if self.lrn_before_pool:
            return self.pool(self.lrn(x))
        return self.lrn(self.pool(x))

    def forward(self, x):
        x = self._norm_pool(F.relu(self.conv1(x)))
        x = self._norm_pool(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = self.pool(F.relu(self.conv5(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc6(x))
        x = F.relu(self.fc7(x))
        return self.fc8(x)


def caffenet():
    # (in, out, k, stride, pad, groups); LRN(size, alpha, beta, k)
    return _CaffeAlexStyle(
        [(3, 96, 11, 4, 0, 1), (96, 256, 5, 1, 2, 2), (256, 384, 3, 1, 1, 1),
         (384, 384, 3, 1, 1, 2), (384, 256, 3, 1, 1, 2)],
        (5, 1e-4, 0.75, 1.0), lrn_before_pool=False)


def vgg_f():
    return _CaffeAlexStyle(
        [(3, 64, 11, 4, 0, 1), (64, 256, 5, 1, 2, 1), (256, 256, 3, 1, 1, 1),
         (256, 256, 3, 1, 1, 1), (256, 256, 3, 1, 1, 1)],
        (5, 5e-4, 0.75, 2.0), lrn_before_pool=True)


def caffe_init(model, gen):
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))


# --------------------------------------------------------------------------
# efficientnet-lite package
# --------------------------------------------------------------------------

def import_lite(cache):
    try:
        import efficientnet_lite_pytorch as pkg  # noqa: F401
        if getattr(pkg, "__version__", None) != LITE_VERSION:
            print(f"warning: importable efficientnet_lite_pytorch is version "
                  f"{getattr(pkg, '__version__', '?')}, expected {LITE_VERSION}", file=sys.stderr)
        return pkg
    except ImportError:
        pass
    root = os.path.join(cache, f"efficientnet_lite_pytorch-{LITE_VERSION}")
    if not os.path.exists(os.path.join(root, "efficientnet_lite_pytorch", "model.py")):
        os.makedirs(cache, exist_ok=True)
        pattern = os.path.join(cache, f"efficientnet_lite_pytorch-{LITE_VERSION}-*.whl")
        if not glob.glob(pattern):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "-d", cache, f"{LITE_PKG}=={LITE_VERSION}"], check=True)
        wheels = glob.glob(pattern)
        if not wheels:
            raise SystemExit(f"pip download did not produce {pattern}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(root)
    sys.path.insert(0, root)
    import efficientnet_lite_pytorch as pkg
    return pkg


# --------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------

def seed_of(name):
    return zlib.crc32(name.encode("utf-8"))


def build_raw(arch, hw, args):
    """Returns (model, extra_metadata) with the family's own random init."""
    tv = torchvision.models
    if arch == "alexnet":
        return tv.alexnet(weights=None), {}
    if arch == "vgg16":
        return tv.vgg16(weights=None), {}
    if arch == "googlenet":
        return tv.googlenet(weights=None, aux_logits=False, transform_input=False, init_weights=True), {}
    if arch in ("resnet18", "resnet50", "resnet152", "mobilenet_v2"):
        return getattr(tv, arch)(weights=None), {}
    if arch.startswith("efficientnet_lite"):
        pkg = import_lite(args.cache)
        name = arch.replace("_", "-")
        m = pkg.EfficientNet.from_name(name, image_size=list(hw))
        gp = m._global_params
        return m, {"width_mult": gp.width_coefficient, "depth_mult": gp.depth_coefficient,
                   "package": f"{LITE_PKG}=={LITE_VERSION}", "bn_eps": gp.batch_norm_epsilon}
    if arch in ("caffenet", "vgg_f"):
        m = caffenet() if arch == "caffenet" else vgg_f()
        g = torch.Generator().manual_seed(seed_of(arch) + 1)
        caffe_init(m, g)
        return m, {}
    raise ValueError(arch)


def make_input(arch, hw, salt):
    g = torch.Generator().manual_seed(seed_of(arch) + salt)
    x = torch.randn((BATCH, 3) + tuple(hw), generator=g)
    if arch in ("caffenet", "vgg_f"):
        x = x * CAFFE_INPUT_STD
    return x


def calibrate_bn(model, x_cal, gen):
    """Randomise every BatchNorm2d with stats matched to its actual input."""
    handles = []

    def pre_hook(mod, inp):
        if getattr(mod, "_zoo_done", False):
            return
        t = inp[0].detach().double()
        m = t.mean(dim=(0, 2, 3))
        v = t.var(dim=(0, 2, 3), unbiased=False)
        c = m.numel()
        rv = (v + 0.05 * v.mean() + 1e-6) * (0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
        rm = m + 0.1 * torch.randn(c, generator=gen, dtype=torch.float64) * rv.sqrt()
        with torch.no_grad():
            mod.running_var.copy_(rv)
            mod.running_mean.copy_(rm)
            mod.weight.copy_(0.5 + torch.rand(c, generator=gen))
            mod.bias.copy_(0.1 * torch.randn(c, generator=gen))
        mod._zoo_done = True

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        handles.append(bn.register_forward_pre_hook(pre_hook))
    with torch.no_grad():
        model(x_cal)
    for h in handles:
        h.remove()
    for bn in bns:
        if not getattr(bn, "_zoo_done", False):
            raise RuntimeError("a BatchNorm2d was not reached by the calibration pass")
        del bn._zoo_done
    return len(bns)


def rescale_head(model, x, gen):
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        logits = model(x)
        wx = logits - fc.bias
        s = wx.std().item()
        fc.weight.mul_(1.0 / s)
        fc.bias.copy_(0.1 * torch.randn(fc.bias.shape, generator=gen))
    return s


def build(arch, args):
    """Fully prepared eval-mode model, plus metadata extras."""
    hw = SIZES[arch]
    base = "googlenet" if arch == "googlenet_ti" else arch
    torch.manual_seed(seed_of(base))
    model, extra = build_raw(base, hw, args)
    model.eval()
    gen = torch.Generator().manual_seed(seed_of(base) + 2)
    nbn = calibrate_bn(model, make_input(base, hw, 3), gen)
    raw_std = rescale_head(model, make_input(base, hw, 0), gen)
    if base == "googlenet":
        model.transform_input = arch == "googlenet_ti"
        extra["transform_input"] = str(model.transform_input).lower()
    extra["n_batchnorm"] = nbn
    extra["raw_head_std"] = f"{raw_std:.6g}"
    return model, extra, base


def forward_with_sites(model, x):
    names = {m: n for n, m in model.named_modules()}
    seen = []
    handles = []

    def hook(mod, inp, out):
        if len(seen) < 2:
            seen.append((names[mod], out.detach().clone()))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(x)
    for h in handles:
        h.remove()
    return logits, seen


def generate(arch, args):
    t0 = time.time()
    model, extra, base = build(arch, args)
    hw = SIZES[arch]
    x = make_input(base, hw, 0)
    logits, sites = forward_with_sites(model, x)
    sd = model.state_dict()
    wpath = os.path.join(args.out, f"{arch}.safetensors")
    save_safetensors(wpath, sd, {"arch": arch, "format": "pytorch_state_dict"})
    f64 = ""
    if not args.no_f64:
        m64 = copy.deepcopy(model).double()
        with torch.no_grad():
            l64 = m64(x.double())
        f64 = f"{(logits.double() - l64).abs().max().item():.3g}"
        del m64, l64
    std = logits.std().item()
    sens = (logits[0] - logits[1]).std().item() / (math.sqrt(2) * std)
    meta = {
        "arch": arch, "height": hw[0], "width": hw[1], "batch": BATCH,
        "sites": ",".join(n for n, _ in sites),
        "input_dist": f"N(0,{CAFFE_INPUT_STD:g}^2)" if base in ("caffenet", "vgg_f") else "N(0,1)",
        "logit_std": f"{std:.6g}", "logit_absmax": f"{logits.abs().max().item():.6g}",
        "f64_max_abs_diff": f64, "input_sensitivity": f"{sens:.4g}",
        "seed": seed_of(base), "torch": torch.__version__, "torchvision": torchvision.__version__,
    }
    meta.update(extra)
    io = {"input": x, "logits": logits}
    for n, t in sites:
        io[f"site.{n}"] = t
    iopath = os.path.join(args.out, f"{arch}_io.safetensors")
    save_safetensors(iopath, io, meta)
    dt = time.time() - t0
    nparam = sum(v.numel() for v in sd.values() if v.dtype.is_floating_point)
    print(f"{arch:20s} {hw[0]:>3d}x{hw[1]:<3d} params {nparam / 1e6:8.2f}M  "
          f"weights {os.path.getsize(wpath) / 2**20:8.1f} MiB  io {os.path.getsize(iopath) / 2**20:6.2f} MiB  "
          f"logit std {std:.4f} absmax {logits.abs().max().item():.3f}  sens {sens:.3f}  "
          f"f32-vs-f64 {f64 or '-'}  sites {meta['sites']}  {dt:6.1f}s", flush=True)
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", nargs="+", default=None, choices=ARCHS, metavar="NAME",
                    help="architectures (default: all): " + " ".join(ARCHS))
    ap.add_argument("--cache", default="/tmp/sfr_zoo_reference_cache",
                    help="where to pip-download/unzip efficientnet-lite-pytorch if not importable")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-f64", action="store_true", help="skip the float64 noise-floor check")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    total = 0.0
    for arch in args.arch or ARCHS:
        total += generate(arch, args)
    print(f"total {total:.1f}s")


if __name__ == "__main__":
    main()
