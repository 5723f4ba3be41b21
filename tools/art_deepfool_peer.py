#!/usr/bin/env python3
"""The peer of `sfr attack deepfool`: ART's UniversalPerturbation (attacker "deepfool") on the
same MobileNetV2, the same images and the same budget, timed on the same machine.

    python3 -m venv --system-site-packages ENV
    ENV/bin/pip install adversarial-robustness-toolbox==1.20.1 packaging
    ENV/bin/python tools/art_deepfool_peer.py --weights mobilenet_v2-b0353104.pth \
        --train ../shared/data/imagenet-sample --limit 100 \
        --test ../shared/data/nips17 --test-limit 300 --out art_uap.npy

Images are prepared as sfr prepares them (PIL: resize the shorter side to 256 with bilinear
filtering, centre crop 224, RGB, 0–255 floats); the model takes 0–255 pixels and normalises
inside, so the budget ξ is in the same units as sfr's. One JSON object goes to stdout: seconds for
the pass, seconds per visited image, ‖v‖∞, ‖v‖₂, and the fooling rate on the test images (label
change against the clean prediction), plus the same figure for random ±ξ sign noise. The
perturbation is written as an H×W×C float32 `.npy` (RGB, 0–255 units), which
`sfr eval -p FILE.npy` reads, so both tools' fooling rates can be checked on either side.
"""

import argparse
import csv
import json
import os
import time

import numpy as np
import torch
import torchvision
from PIL import Image


def load_folder(folder, skip, limit):
    with open(os.path.join(folder, "labels.csv")) as f:
        rows = [r for r in csv.DictReader(f)]
    rows = rows[skip : skip + limit if limit else None]
    tf = torchvision.transforms.Compose(
        [torchvision.transforms.Resize(256), torchvision.transforms.CenterCrop(224)]
    )
    xs = []
    for r in rows:
        img = Image.open(os.path.join(folder, r["file"])).convert("RGB")
        xs.append(np.asarray(tf(img), dtype=np.float32).transpose(2, 0, 1))
    return np.stack(xs)


class Pixels(torch.nn.Module):
    """MobileNetV2 on 0–255 RGB pixels."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def predict(model, x, bs=32):
    out = []
    with torch.no_grad():
        for i in range(0, len(x), bs):
            out.append(model(torch.from_numpy(x[i : i + bs])).argmax(1).numpy())
    return np.concatenate(out)


def fooling(model, x, v, clean):
    adv = np.clip(x + v[None], 0, 255).astype(np.float32)
    return float((predict(model, adv) != clean).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--test", required=True)
    ap.add_argument("--test-skip", type=int, default=0)
    ap.add_argument("--test-limit", type=int, default=300)
    ap.add_argument("--eps", type=float, default=10.0)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()

    from art.attacks.evasion import UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    torch.set_num_threads(a.threads)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(a.weights, map_location="cpu"))
    model = Pixels(net).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    clf = PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(3, 224, 224),
        nb_classes=1000,
        clip_values=(0.0, 255.0),
    )
    x = load_folder(a.train, a.skip, a.limit)
    xt = load_folder(a.test, a.test_skip, a.test_limit)
    clean_t = predict(model, xt)
    attack = UniversalPerturbation(
        clf,
        attacker="deepfool",
        delta=0.2,
        max_iter=a.passes,
        eps=a.eps,
        norm=np.inf,
        verbose=False,
    )
    t0 = time.time()
    attack.generate(x)
    dt = time.time() - t0
    v = attack.noise[0].astype(np.float32)
    rng = np.random.default_rng(a.seed)
    noise = (rng.integers(0, 2, size=v.shape) * 2 - 1).astype(np.float32) * a.eps
    if a.out:
        np.save(a.out, v.transpose(1, 2, 0))
    print(
        json.dumps(
            {
                "tool": "ART 1.20.1 UniversalPerturbation(attacker='deepfool')",
                "torch": torch.__version__,
                "threads": a.threads,
                "train_images": len(x),
                "passes": a.passes,
                "seconds": dt,
                "seconds_per_image": dt / (len(x) * a.passes),
                "train_fooling_rate": float(attack.fooling_rate),
                "linf": float(np.abs(v).max()),
                "l2": float(np.sqrt((v.astype(np.float64) ** 2).sum())),
                "test_images": len(xt),
                "test_fooling_rate": fooling(model, xt, v, clean_t),
                "random_sign_fooling_rate": fooling(model, xt, noise, clean_t),
            }
        )
    )


if __name__ == "__main__":
    main()
