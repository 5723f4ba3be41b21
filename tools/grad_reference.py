#!/usr/bin/python3
"""PyTorch autograd references for sfr's gradient-parity test (tests/gradient_parity.rs).

    /usr/bin/python3 tools/grad_reference.py --out DIR [--mobilenet-v2 W.pth] [--lite0 W.pth]
        [--resnet50 DIR_OF_ZOO_REFERENCE] [--shared ../shared] [--cache DIR]

For each network given, writes DIR/<arch>_grad.safetensors with
  input     the network input (normalised NCHW): the reference images of
            ../shared/reference for the registry weights of mobilenet_v2 and efficientnet_lite0,
            the fixed input of tools/zoo_reference.py for resnet50 (its random weights);
  logits    PyTorch's logits (f32);
  grad32    d loss / d input in f32, loss = mean cross-entropy against each image's own top-1
            (the loss of SGD-UAP's step);
  grad64    the same in f64 (the model and input cast to double), stored as f32;
  noise32   PyTorch's own f32 error: the largest relative l2 distance between its f32 and f64
            gradients over this input and four copies multiplied by (1 + 1e-7 N(0, 1)).
The f32 and f64 gradients differ by the rounding of f32 arithmetic, which moves some
activations across ReLU/ReLU6 kinks; in a deep network with random weights (resnet50 here)
that is chaotic: inputs that differ by rounding give PyTorch f32 errors from 1e-6 to 1e-2.
noise32 is the noise floor any f32 implementation has (the test holds sfr to it).

For mobilenet_v2 it also writes DIR/mobilenet_v2_fru.safetensors: one FRU (sfr's unit:
conv1x1 N->D, BN, ReLU, conv3x3, BN, ReLU, conv3x3, BN, ReLU, conv1x1 D->N, plus the skip) with
fixed random weights on channels `regen` of the stem site features.0.0, in training mode (batch
statistics), the loss being the cross-entropy against the undefended network's top-1; `<p>` are
the unit's parameters and `grad32.<p>` / `grad64.<p>` their gradients.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo_reference  # noqa: E402


def save(path, tensors, meta=None):
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        a = np.ascontiguousarray(v.detach().cpu().float().numpy() if torch.is_tensor(v) else v, dtype=np.float32)
        b = a.tobytes()
        header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if meta:
        header["__metadata__"] = {k: str(v) for k, v in meta.items()}
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def input_grad(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    loss = F.cross_entropy(y, y.argmax(1).detach())
    loss.backward()
    return y.detach(), x.grad.detach()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def jitter(x, seed):
    """x with a relative perturbation of the order of f32 rounding."""
    if seed < 0:
        return x
    g = torch.Generator().manual_seed(seed)
    return x * (1 + 1e-7 * torch.randn(x.shape, generator=g, dtype=x.dtype))


def both(model, x):
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    y32, g32 = input_grad(model, x.float())
    _, g64 = input_grad(model.double(), x.double())
    model.float()
    noise = rel(g32, g64)
    for seed in range(4):
        xj = jitter(x, seed)
        _, a = input_grad(model, xj.float())
        _, b = input_grad(model.double(), xj.double())
        model.float()
        noise = max(noise, rel(a, b))
    return y32, g32, g64.float(), noise


class Fru(torch.nn.Module):
    def __init__(self, n, d, gen):
        super().__init__()
        r = lambda *s: torch.randn(*s, generator=gen)
        self.w1 = torch.nn.Parameter(r(d, n, 1, 1) * 0.3)
        self.w2 = torch.nn.Parameter(r(d, d, 3, 3) * 0.1)
        self.w3 = torch.nn.Parameter(r(d, d, 3, 3) * 0.1)
        self.w4 = torch.nn.Parameter(r(n, d, 1, 1) * 0.1)
        for i in (1, 2, 3):
            setattr(self, f"g{i}", torch.nn.Parameter(1.0 + 0.1 * r(d)))
            setattr(self, f"b{i}", torch.nn.Parameter(0.1 * r(d)))

    def forward(self, x):
        h = x
        for i, pad in ((1, 0), (2, 1), (3, 1)):
            h = F.conv2d(h, getattr(self, f"w{i}"), padding=pad)
            h = F.batch_norm(h, None, None, getattr(self, f"g{i}"), getattr(self, f"b{i}"), training=True, eps=1e-5)
            h = F.relu(h)
        return x + F.conv2d(h, self.w4)

    def names(self):
        return ["w1", "g1", "b1", "w2", "g2", "b2", "w3", "g3", "b3", "w4"]


def fru_reference(model, x, out):
    gen = torch.Generator().manual_seed(7)
    conv = dict(model.named_modules())["features.0.0"]
    c = conv.out_channels
    regen = conv.weight.abs().sum((1, 2, 3)).argsort(descending=True)[: c // 2]
    fru = Fru(len(regen), len(regen), gen)
    init = {k: getattr(fru, k).detach().clone() for k in fru.names()}
    with torch.no_grad():
        labels = model(x).argmax(1)
    result = {"regen": regen.float(), "input": x}

    def grads(dtype, xin):
        m = model.to(dtype)
        f = fru.to(dtype)
        for k in f.names():
            getattr(f, k).grad = None

        def hook(_m, _i, o):
            y = o.clone()
            y[:, regen] = f(o[:, regen])
            return y

        h = conv.register_forward_hook(hook)
        loss = F.cross_entropy(m(xin.to(dtype)), labels)
        loss.backward()
        h.remove()
        return {k: getattr(f, k).grad.detach().clone() for k in f.names()}

    g32, g64 = grads(torch.float32, x), grads(torch.float64, x)
    noise = {k: rel(g32[k], g64[k]) for k in g32}
    for seed in range(4):
        a, b = grads(torch.float32, jitter(x, seed)), grads(torch.float64, jitter(x, seed))
        noise = {k: max(noise[k], rel(a[k], b[k])) for k in noise}
    for k in g32:
        result[f"grad32.{k}"] = g32[k].float()
        result[f"grad64.{k}"] = g64[k].float()
        result[f"noise32.{k}"] = torch.tensor([noise[k]])
    model.float()
    fru.float()
    result.update(init)
    save(out, result, {"site": "features.0.0", "loss": "cross-entropy against the undefended top-1",
                       "bn": "training mode, eps 1e-5"})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mobilenet-v2")
    ap.add_argument("--lite0")
    ap.add_argument("--resnet50", help="tools/zoo_reference.py output folder")
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "sfr-bench"))
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    os.makedirs(a.out, exist_ok=True)
    for arch, weights in (("mobilenet_v2", a.mobilenet_v2), ("efficientnet_lite0", a.lite0)):
        if not weights:
            continue
        if arch == "mobilenet_v2":
            m = torchvision.models.mobilenet_v2()
        else:
            pkg = zoo_reference.import_lite(a.cache)
            m = pkg.EfficientNet.from_name("efficientnet-lite0")
        m.load_state_dict(torch.load(weights, map_location="cpu"))
        m.eval()
        ref, _ = zoo_reference.load_safetensors(os.path.join(a.shared, "reference", f"{arch}_nips17_first8.safetensors"))
        x = ref["input_nchw"].float()
        y, g32, g64, noise = both(m, x)
        save(os.path.join(a.out, f"{arch}_grad.safetensors"),
             {"input": x, "logits": y, "grad32": g32, "grad64": g64, "noise32": torch.tensor([noise])})
        if arch == "mobilenet_v2":
            for p in m.parameters():
                p.requires_grad_(False)
            fru_reference(m, x, os.path.join(a.out, "mobilenet_v2_fru.safetensors"))
    if a.resnet50:
        m = torchvision.models.resnet50()
        sd, _ = zoo_reference.load_safetensors(os.path.join(a.resnet50, "resnet50.safetensors"))
        m.load_state_dict(sd)
        io, _ = zoo_reference.load_safetensors(os.path.join(a.resnet50, "resnet50_io.safetensors"))
        x = io["input"].float()
        y, g32, g64, noise = both(m, x)
        save(os.path.join(a.out, "resnet50_grad.safetensors"),
             {"input": x, "logits": y, "grad32": g32, "grad64": g64, "noise32": torch.tensor([noise])})


if __name__ == "__main__":
    main()
