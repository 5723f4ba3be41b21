#!/usr/bin/python3
"""PyTorch side of sfr's benchmarks: the same workloads as `bench/run.sh` runs with sfr.

    /usr/bin/python3 tools/torch_bench.py eval --model mobilenet_v2 [--weights FILE.pth] --data DIR
        [--limit N] [--batch-size 32] [--threads 2]
        decode (PIL) + Resize(256) + CenterCrop(224) + normalise + forward + top-5, like `sfr eval`.
    /usr/bin/python3 tools/torch_bench.py grad --model mobilenet_v2 [--weights FILE] [--batch-size 32]
        [--iters 5]: input-gradient passes of a shared perturbation (the inner step of SGD-UAP).

Prints one JSON object. Without --weights the model keeps torchvision's random init: speed does
not depend on the values.
"""
import argparse, csv, json, os, time

import torch, torchvision
from PIL import Image
import torchvision.transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def model_of(name, weights):
    m = getattr(torchvision.models, name)()
    if weights:
        m.load_state_dict(torch.load(weights, map_location="cpu"))
    return m.eval()


def eval_cmd(a):
    m = model_of(a.model, a.weights)
    rows = list(csv.DictReader(open(os.path.join(a.data, "labels.csv"))))[: a.limit]
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    t0 = time.time()
    top1 = 0
    with torch.no_grad():
        for i in range(0, len(rows), a.batch_size):
            chunk = rows[i : i + a.batch_size]
            x = torch.stack([tf(Image.open(os.path.join(a.data, r["file"])).convert("RGB")) for r in chunk])
            pred = m(x).topk(5, 1).indices
            top1 += sum(int(p[0]) == int(r["label"]) for p, r in zip(pred, chunk))
    dt = time.time() - t0
    return {"workload": "eval", "model": a.model, "n": len(rows), "top1": top1 / len(rows),
            "seconds": dt, "images_per_second": len(rows) / dt}


def grad_cmd(a):
    m = model_of(a.model, a.weights)
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.rand(a.batch_size, 3, 224, 224) * 255
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    times = []
    for i in range(a.iters + 1):
        d = torch.zeros(1, 3, 224, 224, requires_grad=True)
        t0 = time.time()
        y = m(((x + d).clamp(0, 255) - mean) / std)
        loss = torch.nn.functional.cross_entropy(y, y.argmax(1))
        loss.backward()
        _ = d.grad.sign()
        if i > 0:
            times.append(time.time() - t0)
    per = sum(times) / len(times)
    return {"workload": "grad", "model": a.model, "batch_size": a.batch_size,
            "images_per_second": a.batch_size / per}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=["eval", "grad"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--data")
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    r = eval_cmd(a) if a.workload == "eval" else grad_cmd(a)
    r["threads"] = a.threads
    r["torch"] = torch.__version__
    print(json.dumps(r))


if __name__ == "__main__":
    main()
