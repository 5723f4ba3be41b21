#!/usr/bin/env python3
"""Reference arrays for the perturbation importers (`sfr::perturbation::import`).

Reads perturbation files with the Python stack (numpy, h5py, scipy.io) and writes each array
as raw little-endian float32 in C order, plus `manifest.json` describing them, so the Rust
tests can compare shapes and every value exactly.

    dump_arrays.py --out DIR --root ROOT    every .npy/.mat/.h5/.hdf5 under ROOT
    dump_arrays.py --out DIR --fixtures     write small synthetic files covering the formats'
                                            variants into DIR/fixtures, then dump those

Manifest entries: {"file": absolute path, "reader": "any"|"npy"|"mat"|"h5", "arg": name or
null, "shape": [...], "raw": file name in DIR} or, for inputs that must be rejected,
{"file", "reader", "arg", "error": "<ImportError variant>"}.

Selection rules mirror the Rust `read_any`: .npy → the array; .mat → the first real,
non-logical numeric variable (scipy.io.loadmat order); .h5/.hdf5 → dataset "v", else the root
group's only dataset.

Runs with Debian's /usr/bin/python3 (python3-numpy, python3-h5py, python3-scipy).
"""

import argparse
import json
import os
import sys

import h5py
import numpy as np
import scipy.io

EXTS = (".npy", ".mat", ".h5", ".hdf5")


NUMERIC_CLASSES = {"double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"}


def first_numeric_mat(path):
    # loadmat returns logicals as uint8: whosmat still knows their MATLAB class.
    classes = {name: cls for name, _, cls in scipy.io.whosmat(path)}
    data = scipy.io.loadmat(path)
    for name, val in data.items():
        if name.startswith("__") or classes.get(name) not in NUMERIC_CLASSES:
            continue
        if isinstance(val, np.ndarray) and val.dtype.kind in "iuf":
            return val
    raise ValueError(f"{path}: no real numeric variable")


def load(path, reader="any", arg=None):
    ext = os.path.splitext(path)[1].lower()
    if reader == "npy" or (reader == "any" and ext == ".npy"):
        return np.load(path, allow_pickle=False)
    if reader == "mat" or (reader == "any" and ext == ".mat"):
        if arg is None:
            return first_numeric_mat(path)
        return scipy.io.loadmat(path)[arg]
    if reader == "h5" or (reader == "any" and ext in (".h5", ".hdf5")):
        with h5py.File(path, "r") as f:
            if arg is None:
                names = [k for k, v in f.items() if isinstance(v, h5py.Dataset)]
                arg = "v" if "v" in names else (names[0] if len(names) == 1 else None)
                if arg is None:
                    raise ValueError(f"{path}: no dataset v and not exactly one dataset")
            return f[arg][()]
    raise ValueError(f"{path}: unknown reader {reader} for extension {ext}")


class Manifest:
    def __init__(self, out):
        self.out = out
        self.entries = []

    def add(self, path, reader="any", arg=None):
        a = np.asarray(load(path, reader, arg))
        raw = f"{len(self.entries)}.f32"
        np.ascontiguousarray(a, dtype="<f4").tofile(os.path.join(self.out, raw))
        self.entries.append(
            {
                "file": os.path.abspath(path),
                "reader": reader,
                "arg": arg,
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "raw": raw,
            }
        )

    def reject(self, path, reader, arg, error):
        self.entries.append(
            {"file": os.path.abspath(path), "reader": reader, "arg": arg, "error": error}
        )

    def write(self):
        with open(os.path.join(self.out, "manifest.json"), "w") as f:
            json.dump(self.entries, f, indent=1)


def walk(root):
    for d, _, files in os.walk(root):
        for name in sorted(files):
            if name.lower().endswith(EXTS):
                yield os.path.join(d, name)


def write_npy_v(path, a, version):
    with open(path, "wb") as f:
        np.lib.format.write_array(f, a, version=version)


def make_fixtures(out, m):
    d = os.path.join(out, "fixtures")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(7)
    p = lambda name: os.path.join(d, name)  # noqa: E731

    # --- .npy ---
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.save(p("c_f4.npy"), a)
    np.save(p("fortran_f8.npy"), np.asfortranarray(rng.standard_normal((3, 4, 5))))
    np.save(p("be_f8.npy"), rng.standard_normal((4, 5)).astype(">f8"))
    half = np.array(
        [0.0, -0.0, 1.0, -2.5, 65504.0, 6e-8, 1e-5, np.inf, -np.inf, 0.1], dtype="<f2"
    )
    np.save(p("f2.npy"), half)
    np.save(p("i2.npy"), np.arange(-6, 6, dtype="<i2").reshape(3, 4))
    np.save(p("u1.npy"), np.arange(0, 256, 17, dtype=np.uint8))
    np.save(p("i8.npy"), np.array([-(2**40), 3, 2**53 + 1], dtype="<i8"))
    np.save(p("b1.npy"), np.array([[True, False], [False, True]]))
    np.save(p("scalar.npy"), np.float32(3.5))
    np.save(p("empty.npy"), np.zeros((0, 3), dtype=np.float32))
    write_npy_v(p("v2.npy"), a, (2, 0))
    write_npy_v(p("v3.npy"), a, (3, 0))
    for name in [
        "c_f4", "fortran_f8", "be_f8", "f2", "i2", "u1", "i8", "b1", "scalar", "empty", "v2", "v3",
    ]:
        m.add(p(f"{name}.npy"), "npy")
    np.save(p("complex.npy"), np.ones(3, dtype=np.complex64))
    m.reject(p("complex.npy"), "npy", None, "Unsupported")
    np.save(p("record.npy"), np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]))
    m.reject(p("record.npy"), "npy", None, "Unsupported")

    # --- .mat (v5) ---
    x = rng.standard_normal((3, 4, 2))
    k = np.arange(-12, 12, dtype=np.int16).reshape(4, 6)
    vars_ = {
        "note": "hello",
        "flag": np.array([[True, False, True]]),
        "z": np.array([1 + 2j, 3 - 1j]),
        "k": k,
        "x": x,
        "s": x.astype(np.float32),
        "cellv": np.array([[np.ones(2)]], dtype=object),
        "e": np.zeros((0, 3)),
    }
    for comp in (False, True):
        name = p(f"multi_{'z' if comp else 'plain'}.mat")
        scipy.io.savemat(name, vars_, do_compression=comp, oned_as="row")
        m.add(name, "mat", None)  # first real numeric: k
        m.add(name, "mat", "x")
        m.add(name, "mat", "s")
        m.add(name, "mat", "flag")
        m.add(name, "mat", "e")
        m.reject(name, "mat", "nope", "NoSuchArray")
        m.reject(name, "mat", "note", "Unsupported")
        m.reject(name, "mat", "z", "Unsupported")
    only_text = p("only_text.mat")
    scipy.io.savemat(only_text, {"note": "no numbers here"})
    m.reject(only_text, "mat", None, "NoSuchArray")
    big = p("single_4d.mat")
    scipy.io.savemat(big, {"r": rng.standard_normal((5, 4, 3, 2)).astype(np.float32)}, do_compression=True)
    m.add(big, "any")

    # A v7.3 MAT-file: an HDF5 file with a 512-byte user block holding the MATLAB header.
    v73 = p("v73.mat")
    with h5py.File(v73, "w", userblock_size=512) as f:
        f["r"] = np.ones((2, 2))
    hdr = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    hdr = hdr.ljust(116, b" ") + b"\0" * 8 + (0x0200).to_bytes(2, "little") + b"IM"
    with open(v73, "r+b") as f:
        f.write(hdr)
    m.reject(v73, "mat", None, "MatV73")
    m.add(v73, "h5", "r")  # the HDF5 inside, after its user block

    # --- .h5 ---
    def make(name, fill, **kw):
        path = p(name)
        with h5py.File(path, "w", **kw) as f:
            fill(f)
        return path

    v64 = rng.standard_normal((3, 5, 4))
    m.add(make("h5py_f64.h5", lambda f: f.create_dataset("v", data=v64), libver=("earliest", "v110")), "any")
    m.add(make("f32_4d.h5", lambda f: f.create_dataset("v", data=v64[None].astype(np.float32))), "any")
    m.add(make("latest.h5", lambda f: f.create_dataset("v", data=v64), libver="latest"), "any")
    m.add(make("be_f4.hdf5", lambda f: f.create_dataset("v", data=v64.astype(">f4"))), "any")
    m.add(make("int.h5", lambda f: f.create_dataset("v", data=np.arange(-5, 7, dtype=np.int32).reshape(3, 4))), "any")
    m.add(
        make("chunked_gzip.h5", lambda f: f.create_dataset("v", data=v64, chunks=(1, 5, 2), compression="gzip", shuffle=True)),
        "any",
    )

    def compact(f):
        arr = np.arange(12, dtype="<f4").reshape(3, 4)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        space = h5py.h5s.create_simple(arr.shape)
        ds = h5py.h5d.create(f.id, b"v", h5py.h5t.IEEE_F32LE, space, dcpl=dcpl)
        ds.write(h5py.h5s.ALL, h5py.h5s.ALL, arr)

    m.add(make("compact.h5", compact), "any")

    def nested(f):
        f.create_dataset("g/inner", data=v64[0])
        f.attrs["note"] = "nested"

    nest = make("nested.h5", nested)
    m.add(nest, "h5", "g/inner")
    m.reject(nest, "h5", "g/missing", "NoSuchArray")
    m.reject(nest, "any", None, "NoSuchArray")
    only = make("only_w.h5", lambda f: f.create_dataset("w", data=v64[1]))
    m.add(only, "any")
    m.reject(only, "h5", "v", "NoSuchArray")

    def two(f):
        f["a"] = np.ones(3)
        f["b"] = np.zeros(3)

    two_p = make("two_no_v.h5", two)
    m.reject(two_p, "any", None, "NoSuchArray")
    m.add(two_p, "h5", "b")
    m.add(make("empty_ds.h5", lambda f: f.create_dataset("v", data=np.zeros((0, 4)))), "any")
    strs = make("strings.h5", lambda f: f.create_dataset("v", data=np.array([b"ab", b"cd"])))
    m.reject(strs, "any", None, "Unsupported")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", help="dump every .npy/.mat/.h5/.hdf5 under this folder")
    ap.add_argument("--fixtures", action="store_true", help="make and dump synthetic files")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    m = Manifest(args.out)
    if args.root:
        for path in sorted(walk(args.root)):
            m.add(path, "any")
    if args.fixtures:
        make_fixtures(args.out, m)
    m.write()
    print(f"dump_arrays: {len(m.entries)} entries in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
