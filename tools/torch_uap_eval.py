#!/usr/bin/python3
"""PyTorch reference for applying a published perturbation: the fooling rate of one UAP file on
torchvision's MobileNetV2, with the protocol `sfr eval --perturbation` uses.

    /usr/bin/python3 tools/torch_uap_eval.py --weights mobilenet_v2-b0353104.pth \
        --data ../shared/data/nips17 --limit 300 --perturbation FILE [--mat-transpose]

Protocol: PIL RGB decode, Resize(256) (bilinear, antialiased), CenterCrop(224), pixels on the
0-255 scale; perturbation added in pixel space, clipped to [0, 255]; then /255 and ImageNet
mean/std. Layouts: .mat (LTS4, variable r) H×W×C RGB as scipy returns it (--mat-transpose swaps
H and W, to test the other reading of its README); .h5 (SFR release, dataset v) C×W×H BGR ->
transpose (0, 2, 1) and reverse channels; .npy H×W×C RGB. Fooling rate = fraction of images whose
top-1 changes against the clean prediction. Prints one JSON object.
"""
import argparse, csv, json, os

import numpy as np
import torch, torchvision
import torchvision.transforms as T
from PIL import Image


def load_perturbation(path, mat_transpose):
    if path.endswith(".mat"):
        import scipy.io
        r = scipy.io.loadmat(path)["r"].astype(np.float32)  # H×W×C (MATLAB rows × cols × channels)
        if mat_transpose:
            r = r.transpose(1, 0, 2)
        return torch.from_numpy(r.transpose(2, 0, 1).copy())
    if path.endswith(".h5"):
        import h5py
        v = np.array(h5py.File(path, "r")["v"], dtype=np.float32)
        v = v.reshape(v.shape[-3:])  # C×W×H, BGR
        v = v.transpose(0, 2, 1)[::-1]  # C×H×W, RGB
        return torch.from_numpy(v.copy())
    if path.endswith(".npy"):
        v = np.load(path).astype(np.float32)
        v = v.reshape(v.shape[-3:])
        return torch.from_numpy(v.transpose(2, 0, 1).copy())
    raise SystemExit(f"unknown perturbation format: {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--perturbation", required=True)
    ap.add_argument("--mat-transpose", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = torchvision.models.mobilenet_v2()
    m.load_state_dict(torch.load(a.weights, map_location="cpu"))
    m.eval()
    v = load_perturbation(a.perturbation, a.mat_transpose)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    rows = list(csv.DictReader(open(os.path.join(a.data, "labels.csv"))))[: a.limit]
    fooled = n = 0
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            x = torch.stack([tf(Image.open(os.path.join(a.data, r["file"])).convert("RGB")) for r in rows[i:i + 32]]).float()
            clean = m((x / 255 - mean) / std).argmax(1)
            adv = m(((x + v).clamp(0, 255) / 255 - mean) / std).argmax(1)
            fooled += int((clean != adv).sum())
            n += len(x)
    print(json.dumps({"perturbation": a.perturbation, "n": n, "fooling_rate": fooled / n,
                      "linf": float(v.abs().max()), "mat_transpose": a.mat_transpose}))


if __name__ == "__main__":
    main()
