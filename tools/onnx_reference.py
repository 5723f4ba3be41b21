#!/usr/bin/python3
"""ONNX exports of torchvision networks outside sfr's zoo, with PyTorch reference outputs, for
tests/onnx_models.rs.

    /usr/bin/python3 tools/onnx_reference.py --out DIR [--arch NAME ...] [--size 64]
        [--mobilenet-v2 WEIGHTS.pth]

For each architecture (default: resnet34, densenet121, mobilenet_v3_large, shufflenet_v2_x1_0,
squeezenet1_1, regnet_x_400mf, efficientnet_b0): torchvision's model with its own random init
(seeded by the name), batch-norm statistics randomised against the model's actual activations
(tools/zoo_reference.py's calibrate_bn), exported with torch.onnx.export (opset 13, eval mode,
constant folding: batch norm folded into the convs; the batch dimension dynamic) to
DIR/<arch>.onnx, and DIR/<arch>_io.safetensors holding
  input     [2, 3, size, size] normalised input,
  logits    PyTorch's logits,
  site.0, site.1   the outputs of the first two convolutions as the ONNX graph computes them
            (after the batch norm folded into each, where there is one),
with metadata `sites` = the two convolutions' module paths.

It also writes three small graphs for the error tests: bad_leaky_relu.onnx (an operator sfr does
not run), bad_dynamic_size.onnx (height and width dynamic), bad_no_conv.onnx (no convolution).

--mobilenet-v2 also exports torchvision's MobileNetV2 with the given (registry) weights at 224
to DIR/mobilenet_v2_registry.onnx, for the accuracy and speed comparison with the built-in model.
"""
import argparse
import os
import sys
import zlib

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo_reference  # noqa: E402
from grad_reference import save  # noqa: E402

ARCHS = ["resnet34", "densenet121", "mobilenet_v3_large", "shufflenet_v2_x1_0", "squeezenet1_1",
         "regnet_x_400mf", "efficientnet_b0"]


def export(model, x, path):
    torch.onnx.export(model, x, path, opset_version=13, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)


def first_sites(model, x):
    """Module paths and outputs (after a directly following batch norm) of the first two convs."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    # The output tensor itself (to recognise the batch norm reading it) and a copy of its values
    # (an in-place ReLU after the conv overwrites the tensor).
    outs, vals, handles = {}, {}, []
    for n, m in convs:
        def keep(_m, _i, o, n=n):
            outs.setdefault(n, o)
            vals.setdefault(n, o.detach().clone())
        handles.append(m.register_forward_hook(keep))
    after_bn = {}
    for _, bn in model.named_modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            def hook(_m, i, o):
                for n, t in outs.items():
                    if i[0] is t and n not in after_bn:
                        after_bn[n] = o.detach().clone()
            handles.append(bn.register_forward_hook(hook))
    order = []
    for n, m in convs:
        handles.append(m.register_forward_hook(lambda _m, _i, _o, n=n: order.append(n) if n not in order else None))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    names = order[:2]
    return names, [after_bn.get(n, vals[n]) for n in names]


def write_bad(out):
    """Small graphs for the error tests."""
    torch.manual_seed(0)
    nn = torch.nn
    leaky = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    export(leaky, torch.randn(1, 3, 32, 32), os.path.join(out, "bad_leaky_relu.onnx"))
    dyn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    torch.onnx.export(dyn, torch.randn(1, 3, 32, 32), os.path.join(out, "bad_dynamic_size.onnx"), opset_version=13,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch", 2: "h", 3: "w"}, "logits": {0: "batch"}})
    noconv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10)).eval()
    export(noconv, torch.randn(1, 3, 32, 32), os.path.join(out, "bad_no_conv.onnx"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", action="append")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--mobilenet-v2")
    ap.add_argument("--only-mobilenet-v2", action="store_true", help="skip the other exports")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    os.makedirs(a.out, exist_ok=True)
    for arch in [] if a.only_mobilenet_v2 else (a.arch or ARCHS):
        seed = zlib.crc32(arch.encode())
        torch.manual_seed(seed)
        m = getattr(torchvision.models, arch)(weights=None).eval()
        g = torch.Generator().manual_seed(seed + 2)
        x_cal = torch.randn(4, 3, a.size, a.size, generator=g)
        zoo_reference.calibrate_bn(m, x_cal, g)
        m.eval()
        x = torch.randn(2, 3, a.size, a.size, generator=torch.Generator().manual_seed(seed + 3))
        with torch.no_grad():
            logits = m(x)
        names, sites = first_sites(m, x)
        export(m, x, os.path.join(a.out, f"{arch}.onnx"))
        save(os.path.join(a.out, f"{arch}_io.safetensors"),
             {"input": x, "logits": logits, "site.0": sites[0], "site.1": sites[1]},
             {"sites": ",".join(names), "size": a.size})
        print(f"{arch}: sites {names}, logits std {logits.std().item():.3f}")
    if not a.only_mobilenet_v2:
        write_bad(a.out)
    if a.mobilenet_v2:
        m = torchvision.models.mobilenet_v2()
        m.load_state_dict(torch.load(a.mobilenet_v2, map_location="cpu"))
        m.eval()
        export(m, torch.randn(1, 3, 224, 224), os.path.join(a.out, "mobilenet_v2_registry.onnx"))
        print("mobilenet_v2_registry.onnx")


if __name__ == "__main__":
    main()
