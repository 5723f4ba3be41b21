//! Direct depthwise convolution (one filter per channel) on one `h × w` plane, forward and
//! input gradient, for any kernel, stride, padding and dilation.
//!
//! A stride-`s` row is split into `s` phases (`x[i·s + φ]`), so every filter tap becomes a
//! contiguous multiply-add over a row: `acc[ox] += w · phase[ox + shift]`. Stride 1 reads the
//! rows in place; other strides deinterleave the plane once.

use multiversion::multiversion;

use super::conv::ConvGeom;
use super::elementwise::axpy;

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

/// The accumulator of one plane: `acc[oy][ox] = Σ w · x` (no bias, no activation).
///
/// `scratch` must hold at least `h·w` floats when the stride is not 1.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn forward_plane(g: &ConvGeom, x: &[f32], w: &[f32], acc: &mut [f32], scratch: &mut [f32]) {
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
/// (`dx` is overwritten). `scratch` must hold at least `h·w` floats when the stride is not 1.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn backward_plane(g: &ConvGeom, gz: &[f32], w: &[f32], dx: &mut [f32], scratch: &mut [f32]) {
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
