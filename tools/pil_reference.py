#!/usr/bin/env python3
"""Reference outputs of PIL + torchvision for the parity tests of `sfr::data`.

Usage:
  pil_reference.py pipeline OUT_DIR IMAGE...   decode, resize, crop the given images
  pil_reference.py formats OUT_DIR             write small images of many pixel formats, and
                                               what PIL decodes them to

Every output is a raw file: 8 bytes of header (width, height as little-endian u32) then the
HWC RGB bytes. OUT_DIR/manifest.json lists what was written:

pipeline, per image i (in the order given):
  i.decoded.rgb  Image.open(p).convert("RGB")
  i.resized.rgb  torchvision Resize(256) of the above (PIL bilinear)
  i.crop.rgb     torchvision Compose([Resize(256), CenterCrop(224)])
  i.squash.rgb   Image.resize((227, 227), BILINEAR)   (Caffe-style squash)
  i.up.rgb       Image.resize((2w+1, h+3), BILINEAR)  (upscaling, odd sizes)
  i.odd.rgb      Image.resize((w//3+1, h//7+1), BILINEAR)
formats: OUT_DIR/formats/NAME (the image) and NAME.rgb (PIL's RGB conversion).

Uses only Debian's python3-pil, python3-numpy and python3-torchvision; writes only under OUT_DIR.
"""
import json
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image

BILINEAR = getattr(Image, "Resampling", Image).BILINEAR


def write_rgb(path, im):
    im = im.convert("RGB")
    with open(path, "wb") as f:
        f.write(struct.pack("<II", im.size[0], im.size[1]))
        f.write(im.tobytes())


def pipeline(out_dir, images):
    from torchvision import transforms

    resize = transforms.Resize(256)  # bilinear is the default
    crop = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    entries = []
    for i, path in enumerate(images):
        decoded = Image.open(path).convert("RGB")
        w, h = decoded.size
        outputs = {
            "decoded": decoded,
            "resized": resize(decoded),
            "crop": crop(decoded),
            "squash": decoded.resize((227, 227), BILINEAR),
            "up": decoded.resize((2 * w + 1, h + 3), BILINEAR),
            "odd": decoded.resize((w // 3 + 1, h // 7 + 1), BILINEAR),
        }
        for name, im in outputs.items():
            write_rgb(os.path.join(out_dir, f"{i}.{name}.rgb"), im)
        entries.append({"index": i, "source": path, "mode": Image.open(path).mode})
    return entries


def png_bytes(arr, color_type, bit_depth, plte=None, trns=None):
    """A PNG written by hand, for layouts PIL cannot save (16-bit RGB, 2-bit grey, ...)."""
    h, w = arr.shape[:2]
    if bit_depth == 16:
        a = arr.astype(">u2")
        rows = [a[i].tobytes() for i in range(h)]
    elif bit_depth < 8:
        per = 8 // bit_depth
        rows = []
        for i in range(h):
            out, bits, n = bytearray(), 0, 0
            for v in arr[i].reshape(-1):
                bits, n = (bits << bit_depth) | int(v), n + 1
                if n == per:
                    out.append(bits)
                    bits, n = 0, 0
            if n:
                out.append(bits << (bit_depth * (per - n)))
            rows.append(bytes(out))
    else:
        rows = [arr[i].astype(np.uint8).tobytes() for i in range(h)]
    raw = b"".join(b"\x00" + r for r in rows)

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    if plte is not None:
        data += chunk(b"PLTE", plte)
    if trns is not None:
        data += chunk(b"tRNS", trns)
    return data + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def formats(out_dir):
    d = os.path.join(out_dir, "formats")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    h, w = 37, 53
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(xx * 5) % 256, (yy * 7) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    sm, nz = Image.fromarray(smooth), Image.fromarray(noise)
    saves = {
        "cmyk.jpg": (sm.convert("CMYK"), {"quality": 95}),
        "rgb420.jpg": (sm, {"quality": 90}),
        "rgb444.jpg": (sm, {"quality": 90, "subsampling": 0}),
        "rgb422.jpg": (sm, {"quality": 90, "subsampling": 1}),
        "progressive.jpg": (sm, {"quality": 90, "progressive": True}),
        "grey.jpg": (sm.convert("L"), {"quality": 90}),
        "rgb.png": (nz, {}),
        "grey.png": (nz.convert("L"), {}),
        "la.png": (nz.convert("LA"), {}),
        "rgba.png": (nz.convert("RGBA"), {}),
        "palette.png": (nz.convert("P"), {}),
        "bilevel.png": (nz.convert("1"), {}),
    }
    names = []
    for name, (im, opts) in saves.items():
        im.save(os.path.join(d, name), **opts)
        names.append(name)
    h, w = 19, 23
    g16 = rng.integers(0, 65536, (h, w))
    g16[0, :10] = np.arange(10) * 30  # values below 256 survive PIL's clipping of mode I
    pal = rng.integers(0, 256, 16 * 3).astype(np.uint8).tobytes()
    hand = {
        "rgb16.png": png_bytes(rng.integers(0, 65536, (h, w, 3)), 2, 16),
        "rgba16.png": png_bytes(rng.integers(0, 65536, (h, w, 4)), 6, 16),
        "la16.png": png_bytes(rng.integers(0, 65536, (h, w, 2)), 4, 16),
        "grey16.png": png_bytes(g16, 0, 16),
        "grey16_trns.png": png_bytes(g16, 0, 16, trns=struct.pack(">H", 30)),
        "grey1.png": png_bytes(rng.integers(0, 2, (h, w)), 0, 1),
        "grey2.png": png_bytes(rng.integers(0, 4, (h, w)), 0, 2),
        "grey4.png": png_bytes(rng.integers(0, 16, (h, w)), 0, 4),
        "grey_trns.png": png_bytes(rng.integers(0, 256, (h, w)), 0, 8, trns=struct.pack(">H", 7)),
        "palette4_trns.png": png_bytes(
            rng.integers(0, 16, (h, w)), 3, 4, plte=pal, trns=bytes(range(0, 160, 10))
        ),
        "rgb_trns.png": png_bytes(
            rng.integers(0, 256, (h, w, 3)), 2, 8, trns=struct.pack(">HHH", 1, 2, 3)
        ),
    }
    for name, data in hand.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        names.append(name)
    entries = []
    for name in names:
        p = os.path.join(d, name)
        im = Image.open(p)
        entries.append({"file": name, "mode": im.mode})
        write_rgb(p + ".rgb", im)
    return entries


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("pipeline", "formats"):
        sys.exit(__doc__)
    out_dir = sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    if sys.argv[1] == "pipeline":
        entries = pipeline(out_dir, sys.argv[3:])
    else:
        entries = formats(out_dir)
    import PIL

    manifest = {"pil_version": PIL.__version__, "entries": entries}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
