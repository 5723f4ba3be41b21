//! Direct depthwise convolution (one filter per channel) on one `h × w` plane, forward and
//! input gradient, for any kernel, stride, padding and dilation.
//!
//! Planes up to 64 wide (both directions) take a *flat* correlation. At stride 1 the plane is
//! copied into a zero-padded
//! plane of width `Wp`, and every filter tap becomes one long multiply-add over the whole
//! output plane laid out with row pitch `Wp` (`out[j] += w · padded[j + dy·Wp + dx]`), so short
//! rows cost no more per element than long ones; at other strides the padded plane is split
//! into `sy·sx` phase planes of a common pitch first (the input gradient: one correlation per
//! phase of the input over the padded output gradient). Wider planes split each row into `s`
//! phases (`x[i·s + φ]`), so every tap becomes a contiguous multiply-add over a row:
//! `acc[ox] += w · phase[ox + shift]`.

use multiversion::multiversion;

use super::elementwise::axpy;
use super::geom::ConvGeom;

/// Offsets of one horizontal tap: phase, shift within the phase, and the `ox` range it covers.
#[derive(Debug, Clone, Copy)]
struct Tap {
    phase: usize,
    shift: isize,
    lo: usize,
    hi: usize,
}

fn phase_len(w: usize, s: usize, phase: usize) -> usize {
    if phase >= w {
        0
    } else {
        (w - phase).div_ceil(s)
    }
}

fn taps(g: &ConvGeom) -> Vec<Tap> {
    let s = g.stride[1];
    (0..g.kw)
        .map(|kx| {
            let off = (kx * g.dilation[1]) as isize - g.pad[1] as isize;
            let phase = off.rem_euclid(s as isize) as usize;
            let shift = (off - phase as isize) / s as isize;
            let len = phase_len(g.w, s, phase) as isize;
            let lo = (-shift).max(0) as usize;
            let hi = (len - shift).clamp(0, g.wo as isize) as usize;
            Tap {
                phase,
                shift,
                lo: lo.min(hi),
                hi,
            }
        })
        .collect()
}

/// Input row `iy` for output row `oy` and vertical tap `ky`, if inside the plane.
fn in_row(g: &ConvGeom, oy: usize, ky: usize) -> Option<usize> {
    let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pad[0] as isize;
    (iy >= 0 && (iy as usize) < g.h).then_some(iy as usize)
}

/// Phase-major copy of a plane: `out[φ][iy][i] = x[iy][i·s + φ]`, phases back to back.
fn deinterleave(x: &[f32], h: usize, w: usize, s: usize, out: &mut [f32]) -> [usize; 8] {
    let mut starts = [0usize; 8];
    let mut at = 0;
    for (phase, start) in starts.iter_mut().enumerate().take(s) {
        *start = at;
        let len = phase_len(w, s, phase);
        for iy in 0..h {
            let row = &x[iy * w..(iy + 1) * w];
            let dst = &mut out[at + iy * len..at + (iy + 1) * len];
            for (i, d) in dst.iter_mut().enumerate() {
                *d = row[i * s + phase];
            }
        }
        at += len * h;
    }
    starts
}

/// A stride-1 correlation over a zero-padded plane (see the module docs).
#[derive(Debug, Clone, Copy)]
struct Flat {
    /// Source plane `sh × sw`, placed at `(top, left)` in the padded plane.
    sh: usize,
    sw: usize,
    top: usize,
    left: usize,
    /// Output `ho × wo`.
    ho: usize,
    wo: usize,
    /// Largest tap offsets.
    max_dy: usize,
    max_dx: usize,
}

impl Flat {
    fn pitch(&self) -> usize {
        (self.wo + self.max_dx).max(self.left + self.sw)
    }

    fn rows(&self) -> usize {
        (self.ho + self.max_dy + 1).max(self.top + self.sh)
    }

    fn scratch(&self) -> usize {
        self.pitch() * (self.rows() + self.ho)
    }
}

/// Widest plane the flat form takes: beyond it rows are long enough on their own, and the
/// padded copy costs more than it saves (measured with `examples/dw_bench.rs`).
const FLAT_MAX_WIDTH: usize = 64;

/// The flat form of the forward pass at stride 1.
fn flat_forward(g: &ConvGeom) -> Option<Flat> {
    (g.stride == [1, 1] && g.w <= FLAT_MAX_WIDTH).then(|| Flat {
        sh: g.h,
        sw: g.w,
        top: g.pad[0],
        left: g.pad[1],
        ho: g.ho,
        wo: g.wo,
        max_dy: (g.kh - 1) * g.dilation[0],
        max_dx: (g.kw - 1) * g.dilation[1],
    })
}

/// The flat form of the input gradient at stride 1: a correlation of the output gradient with
/// the flipped filter, padded by `(k − 1)·d − p` (when that is not negative).
fn flat_backward(g: &ConvGeom) -> Option<Flat> {
    let (ry, rx) = ((g.kh - 1) * g.dilation[0], (g.kw - 1) * g.dilation[1]);
    (g.stride == [1, 1] && g.w <= FLAT_MAX_WIDTH && g.pad[0] <= ry && g.pad[1] <= rx).then(|| {
        Flat {
            sh: g.ho,
            sw: g.wo,
            top: ry - g.pad[0],
            left: rx - g.pad[1],
            ho: g.h,
            wo: g.w,
            max_dy: ry,
            max_dx: rx,
        }
    })
}

/// Sizes of the strided flat form: phase planes (forward) or the padded output gradient
/// (backward), with their common row pitch.
#[derive(Debug, Clone, Copy)]
struct Strided {
    /// Rows and pitch of each forward phase plane.
    rows: usize,
    pitch: usize,
    /// Backward: margins of the padded output gradient, its rows and pitch, and the rows and
    /// columns of the largest input phase.
    my: usize,
    mx: usize,
    g_rows: usize,
    g_pitch: usize,
    a_max: usize,
}

fn strided(g: &ConvGeom) -> Option<Strided> {
    if g.stride == [1, 1] || g.w > FLAT_MAX_WIDTH {
        return None;
    }
    let (sy, sx) = (g.stride[0], g.stride[1]);
    let (ry, rx) = ((g.kh - 1) * g.dilation[0], (g.kw - 1) * g.dilation[1]);
    let (my, mx) = (ry.div_ceil(sy), rx.div_ceil(sx));
    let a_max = (g.pad[0] + g.h).div_ceil(sy);
    let b_max = (g.pad[1] + g.w).div_ceil(sx);
    let g_pitch = b_max.max(g.wo) + mx + 1;
    Some(Strided {
        rows: g.ho + ry / sy + 1,
        pitch: g.wo + rx / sx,
        my,
        mx,
        g_rows: a_max.max(g.ho) + my + 1,
        g_pitch,
        a_max,
    })
}

/// Floats of scratch the plane kernels need for `g`.
pub fn scratch_len(g: &ConvGeom) -> usize {
    let a = flat_forward(g).map_or(g.h * g.w, |f| f.scratch());
    let b = flat_backward(g).map_or(g.h * g.w, |f| f.scratch());
    let c = strided(g).map_or(0, |t| {
        let fwd = g.stride[0] * g.stride[1] * t.rows * t.pitch + g.ho * t.pitch;
        let bwd = (t.g_rows + t.a_max) * t.g_pitch;
        fwd.max(bwd)
    });
    a.max(b).max(c)
}

/// Forward pass of a strided plane: the padded input split into `sy·sx` phase planes of a
/// common pitch, one flat multiply-add per tap over the output plane.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn strided_forward(
    g: &ConvGeom,
    t: &Strided,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let (sy, sx) = (g.stride[0], g.stride[1]);
    let (pt, pl) = (g.pad[0] as isize, g.pad[1] as isize);
    let plane = t.rows * t.pitch;
    let (phases, acc) = scratch.split_at_mut(sy * sx * plane);
    for py in 0..sy {
        for px in 0..sx {
            let ph = &mut phases[(py * sx + px) * plane..(py * sx + px + 1) * plane];
            for r in 0..t.rows {
                let y = (r * sy + py) as isize - pt;
                let row = &mut ph[r * t.pitch..(r + 1) * t.pitch];
                if y < 0 || y as usize >= g.h {
                    row.fill(0.0);
                    continue;
                }
                let src = &x[y as usize * g.w..(y as usize + 1) * g.w];
                for (c, d) in row.iter_mut().enumerate() {
                    let xi = (c * sx + px) as isize - pl;
                    *d = if xi >= 0 && (xi as usize) < g.w {
                        src[xi as usize]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
    let n = g.ho * t.pitch;
    let acc = &mut acc[..n];
    acc.fill(0.0);
    for ky in 0..g.kh {
        let oy = ky * g.dilation[0];
        for kx in 0..g.kw {
            let ox = kx * g.dilation[1];
            let at = ((oy % sy) * sx + ox % sx) * plane + (oy / sy) * t.pitch + ox / sx;
            axpy(acc, w[ky * g.kw + kx], &phases[at..at + n]);
        }
    }
    for oy in 0..g.ho {
        out[oy * g.wo..(oy + 1) * g.wo].copy_from_slice(&acc[oy * t.pitch..oy * t.pitch + g.wo]);
    }
}

/// Input gradient of a strided plane: for each phase of the padded input, the taps that reach
/// it, one flat multiply-add each over the padded output gradient; then the phases interleaved.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn strided_backward(
    g: &ConvGeom,
    t: &Strided,
    gz: &[f32],
    w: &[f32],
    dx: &mut [f32],
    scratch: &mut [f32],
) {
    let (sy, sx) = (g.stride[0], g.stride[1]);
    let (pt, pl) = (g.pad[0], g.pad[1]);
    let (gp, acc) = scratch.split_at_mut(t.g_rows * t.g_pitch);
    gp.fill(0.0);
    for oy in 0..g.ho {
        let at = (oy + t.my) * t.g_pitch + t.mx;
        gp[at..at + g.wo].copy_from_slice(&gz[oy * g.wo..(oy + 1) * g.wo]);
    }
    let n = t.a_max * t.g_pitch;
    let acc = &mut acc[..n];
    for py in 0..sy {
        for px in 0..sx {
            acc.fill(0.0);
            for ky in 0..g.kh {
                let qy = py as isize - (ky * g.dilation[0]) as isize;
                if qy.rem_euclid(sy as isize) != 0 {
                    continue;
                }
                let dy = (qy / sy as isize + t.my as isize) as usize;
                for kx in 0..g.kw {
                    let qx = px as isize - (kx * g.dilation[1]) as isize;
                    if qx.rem_euclid(sx as isize) != 0 {
                        continue;
                    }
                    let ddx = (qx / sx as isize + t.mx as isize) as usize;
                    let at = dy * t.g_pitch + ddx;
                    axpy(acc, w[ky * g.kw + kx], &gp[at..at + n]);
                }
            }
            // Input rows iy = a·sy + py − pt and columns ix = b·sx + px − pl.
            let a0 = pt.saturating_sub(py).div_ceil(sy);
            let b0 = pl.saturating_sub(px).div_ceil(sx);
            let mut a = a0;
            while a * sy + py < pt + g.h {
                let iy = a * sy + py - pt;
                let drow = &mut dx[iy * g.w..(iy + 1) * g.w];
                let arow = &acc[a * t.g_pitch..(a + 1) * t.g_pitch];
                let mut b = b0;
                while b * sx + px < pl + g.w {
                    drow[b * sx + px - pl] = arow[b];
                    b += 1;
                }
                a += 1;
            }
        }
    }
}

/// `out[oy][ox] = Σ_t w_t · src[oy + dy_t − top][ox + dx_t − left]` (zero outside `src`).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn flat_correlate(
    f: &Flat,
    src: &[f32],
    taps: &[(usize, usize, f32)],
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let (pitch, rows) = (f.pitch(), f.rows());
    let (padded, acc) = scratch.split_at_mut(pitch * rows);
    let acc = &mut acc[..f.ho * pitch];
    padded.fill(0.0);
    for r in 0..f.sh {
        let at = (r + f.top) * pitch + f.left;
        padded[at..at + f.sw].copy_from_slice(&src[r * f.sw..(r + 1) * f.sw]);
    }
    acc.fill(0.0);
    let n = acc.len();
    for &(dy, dx, w) in taps {
        let at = dy * pitch + dx;
        axpy(acc, w, &padded[at..at + n]);
    }
    for oy in 0..f.ho {
        out[oy * f.wo..(oy + 1) * f.wo].copy_from_slice(&acc[oy * pitch..oy * pitch + f.wo]);
    }
}

/// The accumulator of one plane: `acc[oy][ox] = Σ w · x` (no bias, no activation).
///
/// `scratch` must hold at least [`scratch_len`] floats.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn forward_plane(g: &ConvGeom, x: &[f32], w: &[f32], acc: &mut [f32], scratch: &mut [f32]) {
    if let Some(f) = flat_forward(g) {
        let mut taps = Vec::with_capacity(g.kh * g.kw);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                taps.push((ky * g.dilation[0], kx * g.dilation[1], w[ky * g.kw + kx]));
            }
        }
        return flat_correlate(&f, x, &taps, acc, scratch);
    }
    if let Some(t) = strided(g) {
        return strided_forward(g, &t, x, w, acc, scratch);
    }
    let s = g.stride[1];
    let taps = taps(g);
    let (src, starts): (&[f32], [usize; 8]) = if s == 1 {
        (x, [0; 8])
    } else {
        let st = deinterleave(x, g.h, g.w, s, scratch);
        (&scratch[..g.h * g.w], st)
    };
    acc[..g.ho * g.wo].fill(0.0);
    for oy in 0..g.ho {
        let row = &mut acc[oy * g.wo..(oy + 1) * g.wo];
        for ky in 0..g.kh {
            let Some(iy) = in_row(g, oy, ky) else {
                continue;
            };
            for (kx, t) in taps.iter().enumerate() {
                if t.lo >= t.hi {
                    continue;
                }
                let len = if s == 1 {
                    g.w
                } else {
                    phase_len(g.w, s, t.phase)
                };
                let base = starts[t.phase] + iy * len;
                let from = (base as isize + t.lo as isize + t.shift) as usize;
                axpy(
                    &mut row[t.lo..t.hi],
                    w[ky * g.kw + kx],
                    &src[from..from + (t.hi - t.lo)],
                );
            }
        }
    }
}

/// The input gradient of one plane: `dx = Σ w · gz` scattered back through the taps
/// (`dx` is overwritten). `scratch` must hold at least [`scratch_len`] floats.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn backward_plane(g: &ConvGeom, gz: &[f32], w: &[f32], dx: &mut [f32], scratch: &mut [f32]) {
    if let Some(f) = flat_backward(g) {
        let mut taps = Vec::with_capacity(g.kh * g.kw);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let (fy, fx) = (g.kh - 1 - ky, g.kw - 1 - kx);
                taps.push((ky * g.dilation[0], kx * g.dilation[1], w[fy * g.kw + fx]));
            }
        }
        return flat_correlate(&f, gz, &taps, dx, scratch);
    }
    if let Some(t) = strided(g) {
        return strided_backward(g, &t, gz, w, dx, scratch);
    }
    let s = g.stride[1];
    let taps = taps(g);
    let dst: &mut [f32] = if s == 1 {
        &mut dx[..g.h * g.w]
    } else {
        &mut scratch[..g.h * g.w]
    };
    dst.fill(0.0);
    let mut starts = [0usize; 8];
    let mut at = 0;
    for (phase, start) in starts.iter_mut().enumerate().take(s) {
        *start = at;
        at += phase_len(g.w, s, phase) * g.h;
    }
    for oy in 0..g.ho {
        let grow = &gz[oy * g.wo..(oy + 1) * g.wo];
        for ky in 0..g.kh {
            let Some(iy) = in_row(g, oy, ky) else {
                continue;
            };
            for (kx, t) in taps.iter().enumerate() {
                if t.lo >= t.hi {
                    continue;
                }
                let len = if s == 1 {
                    g.w
                } else {
                    phase_len(g.w, s, t.phase)
                };
                let base = starts[t.phase] + iy * len;
                let from = (base as isize + t.lo as isize + t.shift) as usize;
                axpy(
                    &mut dst[from..from + (t.hi - t.lo)],
                    w[ky * g.kw + kx],
                    &grow[t.lo..t.hi],
                );
            }
        }
    }
    if s != 1 {
        for phase in 0..s {
            let len = phase_len(g.w, s, phase);
            for iy in 0..g.h {
                let src = &scratch[starts[phase] + iy * len..starts[phase] + (iy + 1) * len];
                let row = &mut dx[iy * g.w..(iy + 1) * g.w];
                for (i, &v) in src.iter().enumerate() {
                    row[i * s + phase] = v;
                }
            }
        }
    }
}
