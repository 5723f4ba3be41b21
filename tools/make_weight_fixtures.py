#!/usr/bin/env python3
"""Writes PyTorch checkpoint fixtures for the Rust weight-loader tests.

Usage:
  make_weight_fixtures.py OUT_DIR
      Writes small checkpoints (zip + legacy formats, several dtypes, strided
      views, nested/`module.`-prefixed state dicts, malicious pickles, corrupt
      archives) into OUT_DIR and the expected tensors to OUT_DIR/expected.json
      ({file: {key: {"shape": [...], "values": [...]}}}, values as float32).

  make_weight_fixtures.py --reference CHECKPOINT OUT_JSON
      torch.load()s a real checkpoint and writes its key count, every tensor's
      shape and sums, and the full values of a few small tensors.

Never unpickles the malicious fixtures it writes.
"""
import collections
import json
import os
import struct
import sys
import zipfile

import torch


def as_expected(sd):
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k] = {
                "shape": list(v.shape),
                "values": v.detach().to(torch.float32).flatten().tolist(),
            }
    return out


def tiny_state_dict():
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        collections.OrderedDict(
            conv=torch.nn.Conv2d(3, 4, 3, bias=False),
            bn=torch.nn.BatchNorm2d(4),
            relu=torch.nn.ReLU(),
            pool=torch.nn.AdaptiveAvgPool2d(1),
            flat=torch.nn.Flatten(),
            fc=torch.nn.Linear(4, 5),
        )
    )
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.5, 0.5)
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.num_batches_tracked.fill_(7)
    return m.state_dict()


def mixed_state_dict():
    torch.manual_seed(1)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 1.0
    half_base = torch.randn(2, 3).to(torch.float16)
    sd = collections.OrderedDict()
    sd["f64"] = torch.randn(2, 3, dtype=torch.float64)
    sd["f16"] = torch.randn(4).to(torch.float16)
    sd["bf16"] = torch.randn(3).to(torch.bfloat16)
    sd["i64"] = torch.tensor([1, -2, 3, 1 << 40], dtype=torch.int64)
    sd["i32"] = torch.tensor([[5, -6]], dtype=torch.int32)
    sd["u8"] = torch.tensor([0, 7, 255], dtype=torch.uint8)
    sd["i8"] = torch.tensor([-128, 5], dtype=torch.int8)
    sd["boolean"] = torch.tensor([True, False, True])
    sd["base"] = base
    sd["transposed"] = base.t()  # non-contiguous, shares storage
    sd["sliced"] = base[1:, 1:3]  # storage_offset 5
    sd["strided"] = base[:, ::2]  # stride (4, 2)
    sd["f16_transposed"] = half_base.t()
    sd["scalar"] = torch.tensor(3.25)
    sd["empty"] = torch.zeros(0, 3)
    sd["expanded"] = torch.tensor([1.0, 2.0, 3.0]).expand(2, 3)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2))
    sd["count"] = 5  # non-tensor leaves are skipped
    sd["note"] = "hello"
    assert not sd["transposed"].is_contiguous()
    assert sd["sliced"].storage_offset() == 5
    return sd


def plain(sd):
    return collections.OrderedDict(
        (k, v.detach() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()
    )


def write_fixtures(out):
    os.makedirs(out, exist_ok=True)
    expected = {}

    def save(name, obj, legacy=False, expect=None, **kw):
        path = os.path.join(out, name)
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy, **kw)
        if expect is not None:
            expected[name] = as_expected(expect)
        return path

    tiny = tiny_state_dict()
    mixed = mixed_state_dict()
    save("tiny_zip.pth", tiny, expect=tiny)
    save("tiny_legacy.pth", tiny, legacy=True, expect=tiny)
    save("tiny_zip_proto4.pth", tiny, expect=tiny, pickle_protocol=4)
    save("mixed_zip.pth", mixed, expect=plain(mixed))
    save("mixed_legacy.pth", mixed, legacy=True, expect=plain(mixed))

    prefixed = collections.OrderedDict(("module." + k, v) for k, v in tiny.items())
    save("nested_zip.pth", {"epoch": 3, "arch": "tiny", "state_dict": prefixed}, expect=tiny)
    save("nested_legacy.pth", {"model": prefixed, "best_acc1": 0.5}, legacy=True, expect=tiny)

    expected["torch2_style.pth"] = as_expected(write_torch2_style(os.path.join(out, "torch2_style.pth")))

    # Not state dicts.
    save("list.pth", [1, 2, 3])
    save("no_tensors.pth", {"epoch": 1, "lr": 0.1})

    # Malicious pickles (hand-assembled; never loaded here).
    marker = os.path.join(out, "PWNED").encode()
    cmd = b"touch " + marker
    evil = b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(cmd)) + cmd + b"q\x01\x85q\x02Rq\x03."
    with open(os.path.join(out, "malicious.pkl"), "wb") as f:
        f.write(evil)
    evil4 = (
        b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94"
        + b"\x8c\x0bprint(1337)\x94\x85\x94R\x94."
    )
    with open(os.path.join(out, "malicious_proto4.pkl"), "wb") as f:
        f.write(evil4)
    with zipfile.ZipFile(os.path.join(out, "malicious_zip.pth"), "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", evil)
        z.writestr("archive/version", "3\n")

    # A zip checkpoint whose first storage is 4 bytes short.
    src = os.path.join(out, "tiny_zip.pth")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(
        os.path.join(out, "storage_mismatch.pth"), "w", zipfile.ZIP_STORED
    ) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data/0"):
                data = data[:-4]
            zout.writestr(info.filename, data)

    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f)


class _Storage:
    """Stands for a storage in a hand-written torch 2.x style pickle."""

    def __init__(self, key, storage_type, numel, data):
        self.key, self.storage_type, self.numel, self.data = key, storage_type, numel, data


class _Tensor:
    """Pickles like torch 2.x's Tensor.__reduce_ex__ (v2, or v3 with a dtype)."""

    def __init__(self, storage, offset, size, stride, dtype=None):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())
        self.dtype = dtype

    def __reduce__(self):
        if self.dtype is None:
            return (torch._utils._rebuild_tensor_v2, self.args)
        return (torch._utils._rebuild_tensor_v3, self.args + (self.dtype,))


def write_torch2_style(path):
    """A zip checkpoint laid out like torch 2.x writes it: top folder 'archive',
    byteorder/version/.data/serialization_id records, 64-byte aligned stored
    entries, typed storages (torch.FloatStorage) for float32 tensors and a
    torch.UntypedStorage + _rebuild_tensor_v3(dtype=torch.float16) tensor."""
    import io
    import pickle

    if not hasattr(torch._utils, "_rebuild_tensor_v3"):  # torch < 2: stand-in for pickling only

        def _rebuild_tensor_v3(*args):
            raise RuntimeError("stand-in")

        _rebuild_tensor_v3.__module__ = "torch._utils"
        _rebuild_tensor_v3.__qualname__ = "_rebuild_tensor_v3"
        torch._utils._rebuild_tensor_v3 = _rebuild_tensor_v3

    torch.manual_seed(2)
    w = torch.randn(3, 4)
    h = torch.randn(2, 5).to(torch.float16)
    b = torch.randn(6).to(torch.bfloat16)
    s_w = _Storage("0", torch.FloatStorage, w.numel(), w.numpy().tobytes())
    s_h = _Storage("1", torch.UntypedStorage, h.numel() * 2, h.view(torch.int16).numpy().tobytes())
    s_b = _Storage("2", torch.BFloat16Storage, b.numel(), b.view(torch.int16).numpy().tobytes())
    sd = collections.OrderedDict()
    sd["fc.weight"] = _Tensor(s_w, 0, (3, 4), (4, 1))
    sd["fc.weight_t"] = _Tensor(s_w, 0, (4, 3), (1, 4))
    sd["half_v3"] = _Tensor(s_h, 0, (2, 5), (5, 1), dtype=torch.float16)
    sd["half_v3_tail"] = _Tensor(s_h, 5, (5,), (1,), dtype=torch.float16)
    sd["bf16"] = _Tensor(s_b, 0, (6,), (1,))
    storages = [s_w, s_h, s_b]

    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)
    p.persistent_id = lambda o: (
        ("storage", o.storage_type, o.key, "cpu", o.numel) if isinstance(o, _Storage) else None
    )
    p.dump(sd)

    records = [("archive/data.pkl", buf.getvalue()), ("archive/byteorder", b"little")]
    records += [(f"archive/data/{s.key}", s.data) for s in storages]
    records += [("archive/version", b"3\n"), ("archive/.data/serialization_id", b"0123456789")]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            start = z.fp.tell() + 30 + len(name) + 4
            pad = (-start) % 64
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            z.writestr(info, data)

    return {
        "fc.weight": w,
        "fc.weight_t": w.t(),
        "half_v3": h,
        "half_v3_tail": h.flatten()[5:],
        "bf16": b,
    }


def unwrap(obj):
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        for k in ("state_dict", "model_state_dict", "model", "net"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
        else:
            break
    sd = collections.OrderedDict((k, v) for k, v in obj.items() if isinstance(v, torch.Tensor))
    if sd and all(k.startswith("module.") for k in sd):
        sd = collections.OrderedDict((k[len("module."):], v) for k, v in sd.items())
    return sd


def write_reference(ckpt, out_json):
    sd = unwrap(torch.load(ckpt, map_location="cpu"))
    keys = list(sd.keys())
    small = [k for k in keys if sd[k].numel() <= 100_000]
    chosen = set(small[:3] + small[-2:])
    chosen.update([k for k in small if k.endswith("running_var")][:1])
    chosen.update([k for k in small if k.endswith("num_batches_tracked")][:1])
    ref = {
        "format": "zip" if zipfile.is_zipfile(ckpt) else "legacy",
        "num_keys": len(keys),
        "tensors": {
            k: {
                "shape": list(v.shape),
                "dtype": str(v.dtype),
                "sum": float(v.double().sum()),
                "abs_sum": float(v.double().abs().sum()),
            }
            for k, v in sd.items()
        },
        "values": {k: sd[k].detach().to(torch.float32).flatten().tolist() for k in sorted(chosen)},
    }
    with open(out_json, "w") as f:
        json.dump(ref, f)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--reference":
        write_reference(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 2:
        write_fixtures(sys.argv[1])
    else:
        sys.exit(__doc__)
