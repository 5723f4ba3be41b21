//! 2-D convolution on contiguous NCHW `f32` buffers: forward with a fused epilogue, the input
//! gradient, and the weight gradient, parallel over tasks on rayon's pool.
//!
//! Three kernels:
//! - *depthwise* (one filter per channel): direct, per plane ([`super::depthwise`]);
//! - *pointwise* (1×1, stride 1, no padding): one GEMM per chunk of columns, reading the input
//!   in place;
//! - everything else: im2col of a chunk of output positions, then one GEMM per group.
//!
//! How work is cut into tasks depends only on the geometry, never on the number of threads, so
//! results are bit-identical whatever the machine's core count.

use rayon::prelude::*;

use super::depthwise;
use super::elementwise::{Act, Join, epilogue_inplace, epilogue_row};
use super::gemm::{View, sgemm, sgemm_ptr};
pub use super::geom::ConvGeom;
use super::scratch::{SyncPtr, with_scratch};

/// What a forward pass adds after the convolution: per-channel bias, an optional residual, the
/// activation.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Per output channel, added to the accumulator.
    pub bias: &'a [f32],
    /// Activation.
    pub act: Act,
    /// A tensor of the output's shape, joined before or after the activation.
    pub residual: Option<(&'a [f32], Join)>,
}

/// A run of output columns of one or more images: columns `p0..p0 + len` of each image in
/// `n0..n0 + images` (several images only when one chunk holds whole images).
#[derive(Debug, Clone, Copy)]
struct Chunk {
    n0: usize,
    images: usize,
    p0: usize,
    len: usize,
}

impl Chunk {
    fn cols(&self) -> usize {
        self.images * self.len
    }
}

/// Floats of im2col columns and GEMM output one task aims to hold (8 MiB).
const CHUNK_BUDGET: usize = 1 << 21;

/// Columns per chunk for a GEMM with `k` rows of input and `m` rows of output.
fn chunk_target(k: usize, m: usize) -> usize {
    (CHUNK_BUDGET / (k + m)).clamp(256, 4096)
}

/// Chunks covering every output column of the batch; `whole_images` keeps each chunk inside
/// one image.
fn chunks(g: &ConvGeom, target: usize, whole_images: bool) -> Vec<Chunk> {
    let p = g.out_plane();
    let mut v = Vec::new();
    if p >= target || whole_images {
        let parts = p.div_ceil(target).max(1);
        let len = p.div_ceil(parts);
        for n in 0..g.n {
            let mut p0 = 0;
            while p0 < p {
                let l = len.min(p - p0);
                v.push(Chunk {
                    n0: n,
                    images: 1,
                    p0,
                    len: l,
                });
                p0 += l;
            }
        }
    } else {
        let per = (target / p).max(1);
        let mut n0 = 0;
        while n0 < g.n {
            let images = per.min(g.n - n0);
            v.push(Chunk {
                n0,
                images,
                p0: 0,
                len: p,
            });
            n0 += images;
        }
    }
    v
}

/// Splits of `rows` into at most `parts` ranges of at least `min` rows (for small batches,
/// where the columns alone give too few tasks).
fn row_splits(rows: usize, parts: usize, min: usize) -> Vec<(usize, usize)> {
    let parts = parts.min(rows.div_ceil(min.max(1))).max(1);
    let per = rows.div_ceil(parts);
    (0..parts)
        .map(|i| (i * per, ((i + 1) * per).min(rows)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// Every `(a, b, c)` below `(na, nb, nc)`, in order.
fn grid(na: usize, nb: usize, nc: usize) -> Vec<(usize, usize, usize)> {
    let mut v = Vec::with_capacity(na * nb * nc);
    for a in 0..na {
        for b in 0..nb {
            for c in 0..nc {
                v.push((a, b, c));
            }
        }
    }
    v
}

/// Tasks below which the output rows are split too.
const MIN_TASKS: usize = 8;

/// im2col of group `gi` for `chunk`: `col[r][j]` with `r = (ci, ky, kx)` and `j` the chunk's
/// columns image after image.
fn im2col(g: &ConvGeom, x: &[f32], gi: usize, chunk: &Chunk, col: &mut [f32]) {
    let ncols = chunk.cols();
    let cin_g = g.cin_g();
    for ci in 0..cin_g {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let r = (ci * g.kh + ky) * g.kw + kx;
                let dst_row = &mut col[r * ncols..(r + 1) * ncols];
                let off_x = (kx * g.dilation[1]) as isize - g.pad[1] as isize;
                // Valid ox: 0 <= ox*s + off_x < w.
                let s = g.stride[1] as isize;
                let lo = if off_x >= 0 {
                    0
                } else {
                    ((-off_x) + s - 1) / s
                };
                let hi = if (g.w as isize) <= off_x {
                    0
                } else {
                    (g.w as isize - off_x + s - 1) / s
                };
                let (lo, hi) = (lo.max(0) as usize, (hi.max(0) as usize).min(g.wo));
                for i in 0..chunk.images {
                    let n = chunk.n0 + i;
                    let plane = &x[(n * g.cin + gi * cin_g + ci) * g.h * g.w..][..g.h * g.w];
                    let dst = &mut dst_row[i * chunk.len..(i + 1) * chunk.len];
                    let mut p = chunk.p0;
                    let end = chunk.p0 + chunk.len;
                    let mut j = 0;
                    while p < end {
                        let oy = p / g.wo;
                        let ox0 = p % g.wo;
                        let ox1 = g.wo.min(ox0 + (end - p));
                        let run = &mut dst[j..j + (ox1 - ox0)];
                        let iy =
                            (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pad[0] as isize;
                        let a = ox0.max(lo).min(ox1);
                        let b = ox1.min(hi).max(a);
                        if iy < 0 || iy as usize >= g.h || a >= b {
                            run.fill(0.0);
                        } else {
                            let row = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                            run[..a - ox0].fill(0.0);
                            run[b - ox0..].fill(0.0);
                            let from = (a as isize * s + off_x) as usize;
                            let mid = &mut run[a - ox0..b - ox0];
                            if s == 1 {
                                mid.copy_from_slice(&row[from..from + (b - a)]);
                            } else {
                                let s = s as usize;
                                for (t, d) in mid.iter_mut().enumerate() {
                                    *d = row[from + t * s];
                                }
                            }
                        }
                        j += ox1 - ox0;
                        p += ox1 - ox0;
                    }
                }
            }
        }
    }
}

/// col2im of rows `ci0..ci1` (input channels of one group) for a one-image chunk: adds
/// `col[r][j]` into the input-gradient plane it came from; `dx` holds those channels' planes.
fn col2im(g: &ConvGeom, col: &[f32], ci0: usize, ci1: usize, chunk: &Chunk, dx: &mut [f32]) {
    let ncols = chunk.len;
    let s = g.stride[1] as isize;
    for ci in ci0..ci1 {
        let plane = &mut dx[(ci - ci0) * g.h * g.w..][..g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let r = ((ci - ci0) * g.kh + ky) * g.kw + kx;
                let src_row = &col[r * ncols..(r + 1) * ncols];
                let off_x = (kx * g.dilation[1]) as isize - g.pad[1] as isize;
                let lo = if off_x >= 0 {
                    0
                } else {
                    ((-off_x) + s - 1) / s
                };
                let hi = if (g.w as isize) <= off_x {
                    0
                } else {
                    (g.w as isize - off_x + s - 1) / s
                };
                let (lo, hi) = (lo.max(0) as usize, (hi.max(0) as usize).min(g.wo));
                let mut p = chunk.p0;
                let end = chunk.p0 + chunk.len;
                let mut j = 0;
                while p < end {
                    let oy = p / g.wo;
                    let ox0 = p % g.wo;
                    let ox1 = g.wo.min(ox0 + (end - p));
                    let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pad[0] as isize;
                    if iy >= 0 && (iy as usize) < g.h && lo < hi {
                        let row = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                        let a = ox0.max(lo);
                        let b = ox1.min(hi);
                        if s == 1 {
                            if a < b {
                                let from = (a as isize + off_x) as usize;
                                let src = &src_row[j + (a - ox0)..j + (b - ox0)];
                                for (d, &v) in row[from..from + (b - a)].iter_mut().zip(src) {
                                    *d += v;
                                }
                            }
                        } else {
                            for ox in a..b {
                                row[(ox as isize * s + off_x) as usize] += src_row[j + (ox - ox0)];
                            }
                        }
                    }
                    j += ox1 - ox0;
                    p += ox1 - ox0;
                }
            }
        }
    }
}

/// Forward pass: `y = epilogue(conv(x, w))` for the whole batch.
///
/// `x`: `[n, cin, h, w]`; `w`: `[cout, cin/groups, kh, kw]`; `y`: `[n, cout, ho, wo]`.
pub fn forward(g: &ConvGeom, x: &[f32], w: &[f32], ep: &Epilogue, y: &mut [f32]) {
    assert_eq!(x.len(), g.n * g.in_len(), "conv input size");
    assert_eq!(w.len(), g.weight_len(), "conv weight size");
    assert_eq!(y.len(), g.n * g.out_len(), "conv output size");
    assert_eq!(ep.bias.len(), g.cout, "conv bias size");
    if let Some((r, _)) = ep.residual {
        assert_eq!(r.len(), y.len(), "conv residual size");
    }
    if g.n == 0 {
        return;
    }
    if g.is_depthwise() {
        return depthwise_forward(g, x, w, ep, y);
    }
    let (k, m) = (g.k(), g.cout_g());
    let cs = chunks(g, chunk_target(k, m), false);
    let splits = if cs.len() * g.groups < MIN_TASKS {
        row_splits(m, MIN_TASKS.div_ceil(cs.len() * g.groups), 16)
    } else {
        vec![(0, m)]
    };
    let tasks = grid(cs.len(), g.groups, splits.len());
    let out = SyncPtr::new(y);
    let p = g.out_plane();
    let pointwise = g.is_pointwise();
    tasks.par_iter().for_each(|&(ci, gi, si)| {
        let chunk = &cs[ci];
        let (m0, m1) = splits[si];
        let ncols = chunk.cols();
        let need_col = !(pointwise && chunk.images == 1);
        let col_len = if need_col { k * ncols } else { 0 };
        with_scratch(col_len + (m1 - m0) * ncols, |buf| {
            let (col, tmp) = buf.split_at_mut(col_len);
            let wg = &w[(gi * m + m0) * k..(gi * m + m1) * k];
            if need_col {
                im2col(g, x, gi, chunk, col);
                sgemm(
                    m1 - m0,
                    ncols,
                    k,
                    tmp,
                    View::rows(ncols),
                    false,
                    wg,
                    View::rows(k),
                    col,
                    View::rows(ncols),
                );
            } else {
                let xs = &x[(chunk.n0 * g.cin + gi * k) * p + chunk.p0..];
                sgemm(
                    m1 - m0,
                    ncols,
                    k,
                    tmp,
                    View::rows(ncols),
                    false,
                    wg,
                    View::rows(k),
                    xs,
                    View::rows(p),
                );
            }
            for i in 0..chunk.images {
                let n = chunk.n0 + i;
                for oc in m0..m1 {
                    let c = gi * m + oc;
                    let at = (n * g.cout + c) * p + chunk.p0;
                    let src = &tmp[(oc - m0) * ncols + i * chunk.len..][..chunk.len];
                    // SAFETY: tasks cover disjoint (image, channel, column) ranges of `y`.
                    let dst = unsafe { out.slice(at, chunk.len) };
                    let res = ep.residual.map(|(r, j)| (&r[at..at + chunk.len], j));
                    epilogue_row(dst, src, 1.0, ep.bias[c], ep.act, res);
                }
            }
        });
    });
}

fn depthwise_forward(g: &ConvGeom, x: &[f32], w: &[f32], ep: &Epilogue, y: &mut [f32]) {
    let (hw, p, kk) = (g.h * g.w, g.out_plane(), g.kh * g.kw);
    let scratch = depthwise::scratch_len(g);
    y.par_chunks_mut(p).enumerate().for_each(|(i, out)| {
        let c = i % g.cout;
        with_scratch(scratch, |buf| {
            depthwise::forward_plane(
                g,
                &x[i * hw..(i + 1) * hw],
                &w[c * kk..(c + 1) * kk],
                out,
                buf,
            );
        });
        let res = ep.residual.map(|(r, j)| (&r[i * p..(i + 1) * p], j));
        epilogue_inplace(out, 1.0, ep.bias[c], ep.act, res);
    });
}

/// Input gradient: `dx = convᵀ(gz, w)` for the whole batch, where `gz` is the gradient at the
/// convolution's output (after the activation's mask). `dx` is overwritten.
pub fn backward_input(g: &ConvGeom, gz: &[f32], w: &[f32], dx: &mut [f32]) {
    assert_eq!(gz.len(), g.n * g.out_len(), "conv output-gradient size");
    assert_eq!(w.len(), g.weight_len(), "conv weight size");
    assert_eq!(dx.len(), g.n * g.in_len(), "conv input-gradient size");
    if g.n == 0 {
        return;
    }
    let (hw, p) = (g.h * g.w, g.out_plane());
    if g.is_depthwise() {
        let kk = g.kh * g.kw;
        let scratch = depthwise::scratch_len(g);
        dx.par_chunks_mut(hw).enumerate().for_each(|(i, plane)| {
            let c = i % g.cin;
            with_scratch(scratch, |buf| {
                depthwise::backward_plane(
                    g,
                    &gz[i * p..(i + 1) * p],
                    &w[c * kk..(c + 1) * kk],
                    plane,
                    buf,
                );
            });
        });
        return;
    }
    let (k, m, cin_g) = (g.k(), g.cout_g(), g.cin_g());
    let kk = g.kh * g.kw;
    let out = SyncPtr::new(dx);
    if g.is_pointwise() {
        // dx[ci][j] = Σ_c w[c][ci] · gz[c][j]: a GEMM per chunk, no overlap between columns.
        let cs = chunks(g, chunk_target(m, k), false);
        let splits = if cs.len() * g.groups < MIN_TASKS {
            row_splits(cin_g, MIN_TASKS.div_ceil(cs.len() * g.groups), 16)
        } else {
            vec![(0, cin_g)]
        };
        let tasks = grid(cs.len(), g.groups, splits.len());
        tasks.par_iter().for_each(|&(ci, gi, si)| {
            let chunk = &cs[ci];
            let (r0, r1) = splits[si];
            let ncols = chunk.cols();
            let wt = &w[gi * m * k + r0..];
            if chunk.images == 1 {
                let at = (chunk.n0 * g.cin + gi * cin_g + r0) * p + chunk.p0;
                let gs = &gz[(chunk.n0 * g.cout + gi * m) * p + chunk.p0..];
                let view = View::rows(p);
                // SAFETY: tasks write disjoint (image, channel, column) sets of `dx`; this one
                // writes columns p0..p0+ncols of channels r0..r1, inside the checked extent.
                unsafe {
                    let dst = out.at(at, view.extent(r1 - r0, ncols));
                    sgemm_ptr(
                        r1 - r0,
                        ncols,
                        m,
                        dst,
                        view,
                        false,
                        wt,
                        View::transposed(k),
                        gs,
                        View::rows(p),
                    );
                }
            } else {
                with_scratch(m * ncols + (r1 - r0) * ncols, |buf| {
                    let (gcol, tmp) = buf.split_at_mut(m * ncols);
                    for i in 0..chunk.images {
                        let n = chunk.n0 + i;
                        for c in 0..m {
                            let src = &gz[(n * g.cout + gi * m + c) * p..][..p];
                            gcol[c * ncols + i * p..][..p].copy_from_slice(src);
                        }
                    }
                    sgemm(
                        r1 - r0,
                        ncols,
                        m,
                        tmp,
                        View::rows(ncols),
                        false,
                        wt,
                        View::transposed(k),
                        gcol,
                        View::rows(ncols),
                    );
                    for i in 0..chunk.images {
                        let n = chunk.n0 + i;
                        for r in r0..r1 {
                            let at = (n * g.cin + gi * cin_g + r) * p;
                            // SAFETY: as above.
                            let dst = unsafe { out.slice(at, p) };
                            dst.copy_from_slice(&tmp[(r - r0) * ncols + i * p..][..p]);
                        }
                    }
                });
            }
        });
        return;
    }
    // General: per image (and input-channel range for small batches), chunks of columns in
    // order, col = wᵀ · gz, then scatter-add into dx.
    let cs = chunks(g, chunk_target(k, m), true);
    let per_image: Vec<Vec<Chunk>> = (0..g.n)
        .map(|n| cs.iter().copied().filter(|c| c.n0 == n).collect())
        .collect();
    let splits = if g.n * g.groups < MIN_TASKS {
        row_splits(cin_g, MIN_TASKS.div_ceil(g.n * g.groups), 1)
    } else {
        vec![(0, cin_g)]
    };
    let tasks = grid(g.n, g.groups, splits.len());
    tasks.par_iter().for_each(|&(n, gi, si)| {
        let (c0, c1) = splits[si];
        // SAFETY: each task owns channels c0..c1 of group gi of image n.
        let region = unsafe { out.slice((n * g.cin + gi * cin_g + c0) * hw, (c1 - c0) * hw) };
        region.fill(0.0);
        let rows = (c1 - c0) * kk;
        let wt = &w[gi * m * k + c0 * kk..];
        for chunk in &per_image[n] {
            let ncols = chunk.len;
            with_scratch(rows * ncols, |col| {
                let gs = &gz[(n * g.cout + gi * m) * p + chunk.p0..];
                sgemm(
                    rows,
                    ncols,
                    m,
                    col,
                    View::rows(ncols),
                    false,
                    wt,
                    View::transposed(k),
                    gs,
                    View::rows(p),
                );
                col2im(g, col, c0, c1, chunk, region);
            });
        }
    });
}

/// Weight gradient: `dw = Σ gz · im2col(x)ᵀ` over the batch (`dw` is overwritten).
///
/// The sum runs over a fixed number of partial sums in a fixed order, so it is deterministic.
pub fn backward_weight(g: &ConvGeom, x: &[f32], gz: &[f32], dw: &mut [f32]) {
    assert_eq!(x.len(), g.n * g.in_len(), "conv input size");
    assert_eq!(gz.len(), g.n * g.out_len(), "conv output-gradient size");
    assert_eq!(dw.len(), g.weight_len(), "conv weight-gradient size");
    dw.fill(0.0);
    if g.n == 0 {
        return;
    }
    let (k, m, p) = (g.k(), g.cout_g(), g.out_plane());
    let pointwise = g.is_pointwise();
    let cs = chunks(g, chunk_target(k, m), false);
    const PARTS: usize = 8;
    let per = cs.len().div_ceil(PARTS);
    let groups_of_chunks: Vec<&[Chunk]> = cs.chunks(per.max(1)).collect();
    let partials: Vec<Vec<f32>> = groups_of_chunks
        .par_iter()
        .map(|part| {
            let mut acc = vec![0.0f32; g.weight_len()];
            for chunk in part.iter() {
                let ncols = chunk.cols();
                let direct = pointwise && chunk.images == 1;
                let col_len = if direct { 0 } else { k * ncols };
                let g_len = if chunk.images == 1 { 0 } else { m * ncols };
                for gi in 0..g.groups {
                    with_scratch(col_len + g_len, |buf| {
                        let (col, gcol) = buf.split_at_mut(col_len);
                        let (bsrc, bview): (&[f32], View) = if direct {
                            (
                                &x[(chunk.n0 * g.cin + gi * k) * p + chunk.p0..],
                                View::transposed(p),
                            )
                        } else {
                            im2col(g, x, gi, chunk, col);
                            (col, View::transposed(ncols))
                        };
                        let (asrc, aview): (&[f32], View) = if chunk.images == 1 {
                            (
                                &gz[(chunk.n0 * g.cout + gi * m) * p + chunk.p0..],
                                View::rows(p),
                            )
                        } else {
                            for i in 0..chunk.images {
                                let n = chunk.n0 + i;
                                for c in 0..m {
                                    let src = &gz[(n * g.cout + gi * m + c) * p..][..p];
                                    gcol[c * ncols + i * p..][..p].copy_from_slice(src);
                                }
                            }
                            (gcol, View::rows(ncols))
                        };
                        let dst = &mut acc[gi * m * k..(gi + 1) * m * k];
                        sgemm(
                            m,
                            k,
                            ncols,
                            dst,
                            View::rows(k),
                            true,
                            asrc,
                            aview,
                            bsrc,
                            bview,
                        );
                    });
                }
            }
            acc
        })
        .collect();
    for part in &partials {
        for (d, &v) in dw.iter_mut().zip(part) {
            *d += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference convolution in f64: `y[n][co][oy][ox]`.
    fn naive(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f64> {
        let (cin_g, cout_g) = (g.cin / g.groups, g.cout / g.groups);
        let mut y = vec![0.0; g.n * g.out_len()];
        for n in 0..g.n {
            for co in 0..g.cout {
                let gi = co / cout_g;
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        let mut s = 0.0f64;
                        for ci in 0..cin_g {
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize
                                        - g.pad[0] as isize;
                                    let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize
                                        - g.pad[1] as isize;
                                    if iy < 0 || ix < 0 || iy as usize >= g.h || ix as usize >= g.w
                                    {
                                        continue;
                                    }
                                    let xv = x[((n * g.cin + gi * cin_g + ci) * g.h + iy as usize)
                                        * g.w
                                        + ix as usize];
                                    let wv = w[((co * cin_g + ci) * g.kh + ky) * g.kw + kx];
                                    s += xv as f64 * wv as f64;
                                }
                            }
                        }
                        y[((n * g.cout + co) * g.ho + oy) * g.wo + ox] = s;
                    }
                }
            }
        }
        y
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f64], tol: f64, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x as f64 - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// Every kernel against the naive loops, and the two gradients against the adjoint
    /// identity `<conv(x), gy> = <x, convᵀ(gy)>` and its weight analogue, computed in f64.
    fn check(
        shape: [usize; 4],
        cout: usize,
        k: [usize; 2],
        s: [usize; 2],
        pads: [(usize, usize); 2],
        d: [usize; 2],
        groups: usize,
    ) {
        let g = ConvGeom::new(shape, cout, k, s, pads, d, groups).expect("geometry");
        let x = data(g.n * g.in_len(), 1);
        let w = data(g.weight_len(), 2);
        let bias = data(g.cout, 3);
        let want = naive(&g, &x, &w);
        let mut y = vec![0.0; g.n * g.out_len()];
        let ep = Epilogue {
            bias: &bias,
            act: Act::None,
            residual: None,
        };
        forward(&g, &x, &w, &ep, &mut y);
        let with_bias: Vec<f64> = want
            .iter()
            .enumerate()
            .map(|(i, v)| v + bias[(i / g.out_plane()) % g.cout] as f64)
            .collect();
        close(&y, &with_bias, 1e-4, "forward");
        let gy = data(y.len(), 4);
        let mut dx = vec![7.0; x.len()];
        backward_input(&g, &gy, &w, &mut dx);
        // <conv(x'), gy> for x' = unit vectors is the column of convᵀ: check by the naive
        // forward of perturbed inputs on a sample of positions.
        for &i in [0, x.len() / 3, x.len() / 2, x.len() - 1].iter() {
            let mut e = vec![0.0f32; x.len()];
            e[i] = 1.0;
            let col = naive(&g, &e, &w);
            let want_i: f64 = col.iter().zip(&gy).map(|(a, &b)| a * b as f64).sum();
            assert!(
                (dx[i] as f64 - want_i).abs() < 1e-4 * (1.0 + want_i.abs()),
                "dx[{i}] {} vs {want_i}",
                dx[i]
            );
        }
        // Full adjoint identity.
        let lhs: f64 = want.iter().zip(&gy).map(|(a, &b)| a * b as f64).sum();
        let rhs: f64 = x.iter().zip(&dx).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!(
            (lhs - rhs).abs() < 1e-3 * (1.0 + lhs.abs()),
            "adjoint {lhs} vs {rhs}"
        );
        let mut dw = vec![5.0; w.len()];
        backward_weight(&g, &x, &gy, &mut dw);
        let rhs_w: f64 = w.iter().zip(&dw).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!(
            (lhs - rhs_w).abs() < 1e-3 * (1.0 + lhs.abs()),
            "weight adjoint {lhs} vs {rhs_w}"
        );
        for &i in [0, w.len() / 2, w.len() - 1].iter() {
            let mut e = vec![0.0f32; w.len()];
            e[i] = 1.0;
            let col = naive(&g, &x, &e);
            let want_i: f64 = col.iter().zip(&gy).map(|(a, &b)| a * b as f64).sum();
            assert!(
                (dw[i] as f64 - want_i).abs() < 1e-3 * (1.0 + want_i.abs()),
                "dw[{i}] {} vs {want_i}",
                dw[i]
            );
        }
    }

    #[test]
    fn pointwise() {
        check([3, 8, 5, 7], 6, [1, 1], [1, 1], [(0, 0), (0, 0)], [1, 1], 1);
        // Small planes: chunks hold several images.
        check(
            [5, 16, 2, 3],
            24,
            [1, 1],
            [1, 1],
            [(0, 0), (0, 0)],
            [1, 1],
            1,
        );
        check([2, 8, 4, 4], 8, [1, 1], [1, 1], [(0, 0), (0, 0)], [1, 1], 2);
    }

    #[test]
    fn strided_and_padded_1x1() {
        check([2, 6, 7, 7], 5, [1, 1], [2, 2], [(0, 0), (0, 0)], [1, 1], 1);
        check([2, 6, 5, 5], 5, [1, 1], [1, 1], [(1, 1), (1, 1)], [1, 1], 1);
    }

    #[test]
    fn general_kxk() {
        check(
            [2, 3, 9, 11],
            4,
            [3, 3],
            [2, 2],
            [(1, 1), (1, 1)],
            [1, 1],
            1,
        );
        check([1, 5, 8, 8], 6, [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1], 1);
        check(
            [3, 4, 10, 9],
            6,
            [5, 3],
            [2, 1],
            [(2, 1), (0, 2)],
            [1, 1],
            2,
        );
        check(
            [2, 3, 12, 12],
            4,
            [3, 3],
            [1, 1],
            [(2, 2), (2, 2)],
            [2, 2],
            1,
        );
        check(
            [1, 3, 23, 23],
            8,
            [11, 11],
            [4, 4],
            [(2, 2), (2, 2)],
            [1, 1],
            1,
        );
        // TF "same" at stride 2 on an even input: nothing before, one after.
        check([2, 3, 8, 8], 4, [3, 3], [2, 2], [(0, 1), (0, 1)], [1, 1], 1);
    }

    #[test]
    fn depthwise_kernels() {
        // Planes wider than the flat kernels take: the row kernels.
        check(
            [1, 2, 9, 70],
            2,
            [3, 3],
            [1, 1],
            [(1, 1), (1, 1)],
            [1, 1],
            2,
        );
        check(
            [2, 2, 8, 67],
            2,
            [3, 3],
            [2, 2],
            [(1, 1), (1, 1)],
            [1, 1],
            2,
        );
        check(
            [1, 2, 11, 80],
            2,
            [5, 5],
            [2, 2],
            [(1, 2), (1, 2)],
            [1, 1],
            2,
        );
        check(
            [1, 2, 9, 66],
            2,
            [3, 3],
            [1, 1],
            [(2, 2), (2, 2)],
            [2, 2],
            2,
        );
        check([2, 5, 9, 9], 5, [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1], 5);
        check(
            [2, 4, 10, 11],
            4,
            [3, 3],
            [2, 2],
            [(1, 1), (1, 1)],
            [1, 1],
            4,
        );
        check(
            [1, 3, 12, 12],
            3,
            [5, 5],
            [2, 2],
            [(1, 2), (1, 2)],
            [1, 1],
            3,
        );
        check([2, 3, 9, 9], 3, [3, 3], [1, 1], [(2, 2), (2, 2)], [2, 2], 3);
        check(
            [1, 2, 13, 14],
            2,
            [3, 5],
            [3, 3],
            [(1, 1), (2, 2)],
            [1, 1],
            2,
        );
    }

    #[test]
    fn epilogue_is_applied_per_channel() {
        let g =
            ConvGeom::new([2, 4, 5, 5], 4, [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1], 4).unwrap();
        let x = data(g.n * g.in_len(), 5);
        let w = data(g.weight_len(), 6);
        let bias = [0.5, -0.5, 1.0, 0.0];
        let r = data(g.n * g.out_len(), 7);
        let mut plain = vec![0.0; r.len()];
        forward(
            &g,
            &x,
            &w,
            &Epilogue {
                bias: &[0.0; 4],
                act: Act::None,
                residual: None,
            },
            &mut plain,
        );
        let mut y = vec![0.0; r.len()];
        forward(
            &g,
            &x,
            &w,
            &Epilogue {
                bias: &bias,
                act: Act::Relu6,
                residual: Some((&r, Join::BeforeAct)),
            },
            &mut y,
        );
        for i in 0..y.len() {
            let c = (i / g.out_plane()) % 4;
            let want = (plain[i] + bias[c] + r[i]).clamp(0.0, 6.0);
            assert!((y[i] - want).abs() < 1e-5);
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let g = ConvGeom::new(
            [1, 16, 20, 20],
            32,
            [3, 3],
            [1, 1],
            [(1, 1), (1, 1)],
            [1, 1],
            1,
        )
        .unwrap();
        let x = data(g.n * g.in_len(), 8);
        let w = data(g.weight_len(), 9);
        let gy = data(g.n * g.out_len(), 10);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut y = vec![0.0; g.n * g.out_len()];
                forward(
                    &g,
                    &x,
                    &w,
                    &Epilogue {
                        bias: &[0.0; 32],
                        act: Act::Relu,
                        residual: None,
                    },
                    &mut y,
                );
                let mut dx = vec![0.0; x.len()];
                backward_input(&g, &gy, &w, &mut dx);
                let mut dw = vec![0.0; w.len()];
                backward_weight(&g, &x, &gy, &mut dw);
                (y, dx, dw)
            })
        };
        assert_eq!(run(1), run(3));
    }
}
