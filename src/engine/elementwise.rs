//! Element-wise pieces of the fused operations: the epilogue that turns a convolution's
//! accumulator into the unit's output (scale, shift, residual, activation) and the mask the
//! backward pass applies to an incoming gradient.

use multiversion::multiversion;
use serde::Serialize;

/// The nonlinearity after a conv (+ batch norm) unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Act {
    /// None (linear bottlenecks, residual branches before the sum).
    None,
    /// ReLU.
    Relu,
    /// ReLU6 (`min(max(x, 0), 6)`).
    Relu6,
}

/// Where a residual input joins a unit's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// `act(z + r)` (ResNet: the sum, then ReLU).
    BeforeAct,
    /// `act(z) + r` (MobileNetV2, EfficientNet: a linear bottleneck plus the skip).
    AfterAct,
}

#[inline(always)]
fn act_of(v: f32, act: Act) -> f32 {
    match act {
        Act::None => v,
        // `max`/`min` with NaN on the left return the other operand; keep NaN visible as
        // PyTorch does (`relu(NaN) = NaN`).
        Act::Relu => {
            if v > 0.0 || v.is_nan() {
                v
            } else {
                0.0
            }
        }
        Act::Relu6 => {
            if v.is_nan() {
                v
            } else {
                v.clamp(0.0, 6.0)
            }
        }
    }
}

/// `dst[i] = act(src[i]·scale + shift (+ r[i]))` or `act(src[i]·scale + shift) + r[i]`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn epilogue_row(
    dst: &mut [f32],
    src: &[f32],
    scale: f32,
    shift: f32,
    act: Act,
    residual: Option<(&[f32], Join)>,
) {
    let n = dst.len();
    let src = &src[..n];
    match residual {
        None => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = act_of(s.mul_add(scale, shift), act);
            }
        }
        Some((r, Join::BeforeAct)) => {
            let r = &r[..n];
            for ((d, &s), &r) in dst.iter_mut().zip(src).zip(r) {
                *d = act_of(s.mul_add(scale, shift) + r, act);
            }
        }
        Some((r, Join::AfterAct)) => {
            let r = &r[..n];
            for ((d, &s), &r) in dst.iter_mut().zip(src).zip(r) {
                *d = act_of(s.mul_add(scale, shift), act) + r;
            }
        }
    }
}

/// The same epilogue in place (`dst` holds the accumulator).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn epilogue_inplace(
    dst: &mut [f32],
    scale: f32,
    shift: f32,
    act: Act,
    residual: Option<(&[f32], Join)>,
) {
    let n = dst.len();
    match residual {
        None => {
            for d in dst.iter_mut() {
                *d = act_of(d.mul_add(scale, shift), act);
            }
        }
        Some((r, Join::BeforeAct)) => {
            for (d, &r) in dst.iter_mut().zip(&r[..n]) {
                *d = act_of(d.mul_add(scale, shift) + r, act);
            }
        }
        Some((r, Join::AfterAct)) => {
            for (d, &r) in dst.iter_mut().zip(&r[..n]) {
                *d = act_of(d.mul_add(scale, shift), act) + r;
            }
        }
    }
}

/// The gradient through the activation, read off the unit's output `y`:
/// `g · act'(z)` with ReLU's derivative 1 where `y > 0` and ReLU6's where `0 < y < 6`
/// (PyTorch's convention at the kinks: 0). With a residual joined after the activation the
/// output is `act(z) + r`, so the caller passes `act(z)` instead; [`Act::None`] leaves `g`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn mask_grad(g: &mut [f32], y: &[f32], act: Act) {
    let y = &y[..g.len()];
    match act {
        Act::None => {}
        Act::Relu => {
            for (g, &y) in g.iter_mut().zip(y) {
                if y <= 0.0 {
                    *g = 0.0;
                }
            }
        }
        Act::Relu6 => {
            for (g, &y) in g.iter_mut().zip(y) {
                if y <= 0.0 || y >= 6.0 {
                    *g = 0.0;
                }
            }
        }
    }
}

/// `g[i] *= s`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn scale_row(g: &mut [f32], s: f32) {
    for v in g.iter_mut() {
        *v *= s;
    }
}

/// `acc[i] += w · x[i]`.
#[inline(always)]
pub fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    let x = &x[..acc.len()];
    for (a, &x) in acc.iter_mut().zip(x) {
        *a = w.mul_add(x, *a);
    }
}

/// `y = x + v`, clipped to [0, 255] when `clip`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn add_clip(y: &mut [f32], x: &[f32], v: &[f32], clip: bool) {
    let n = y.len();
    for ((o, &a), &b) in y.iter_mut().zip(&x[..n]).zip(&v[..n]) {
        let s = a + b;
        *o = if clip && !s.is_nan() {
            s.clamp(0.0, 255.0)
        } else {
            s
        };
    }
}

/// Zeroes `g` where `x + v` lies outside [0, 255] (the bounds themselves pass, as in PyTorch's
/// and burn's `clamp`).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn clip_mask(g: &mut [f32], x: &[f32], v: &[f32]) {
    let n = g.len();
    for ((g, &a), &b) in g.iter_mut().zip(&x[..n]).zip(&v[..n]) {
        let s = a + b;
        if !(0.0..=255.0).contains(&s) {
            *g = 0.0;
        }
    }
}

/// Elements summed in f32 before the running total (in f64) takes them: vectorised, and
/// accurate to f64's order over whole planes.
const BLOCK: usize = 256;

/// `Σ x` (f64 total of f32 blocks).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn sum(x: &[f32]) -> f64 {
    x.chunks(BLOCK).map(|b| b.iter().sum::<f32>() as f64).sum()
}

/// `Σ (x − m)²`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn sum_sq_dev(x: &[f32], m: f32) -> f64 {
    x.chunks(BLOCK)
        .map(|b| b.iter().map(|&v| (v - m) * (v - m)).sum::<f32>() as f64)
        .sum()
}

/// `(Σ g', Σ g'·(x − m))` with `g' = g` where `y > 0`, else 0 (ReLU's mask read off its output).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn relu_grad_sums(g: &[f32], y: &[f32], x: &[f32], m: f32) -> (f64, f64) {
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for ((g, y), x) in g.chunks(BLOCK).zip(y.chunks(BLOCK)).zip(x.chunks(BLOCK)) {
        let (mut sa, mut sb) = (0.0f32, 0.0f32);
        for ((&g, &y), &x) in g.iter().zip(y).zip(x) {
            let g = if y > 0.0 { g } else { 0.0 };
            sa += g;
            sb = g.mul_add(x - m, sb);
        }
        a += sa as f64;
        b += sb as f64;
    }
    (a, b)
}

/// `dx = k·g' + c1·x + c0` with `g'` as in [`relu_grad_sums`].
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn relu_affine_grad(dx: &mut [f32], g: &[f32], y: &[f32], x: &[f32], k: f32, c1: f32, c0: f32) {
    let n = dx.len();
    for (((d, &g), &y), &x) in dx.iter_mut().zip(&g[..n]).zip(&y[..n]).zip(&x[..n]) {
        let g = if y > 0.0 { g } else { 0.0 };
        *d = k.mul_add(g, c1.mul_add(x, c0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epilogue_orders_residual_and_activation() {
        let src = [-2.0, 1.0, 5.0, 8.0];
        let r = [3.0, -3.0, 2.0, -1.0];
        let mut d = [0.0; 4];
        epilogue_row(
            &mut d,
            &src,
            1.0,
            0.0,
            Act::Relu6,
            Some((&r, Join::BeforeAct)),
        );
        assert_eq!(d, [1.0, 0.0, 6.0, 6.0]);
        epilogue_row(
            &mut d,
            &src,
            1.0,
            0.0,
            Act::Relu6,
            Some((&r, Join::AfterAct)),
        );
        assert_eq!(d, [3.0, -2.0, 7.0, 5.0]);
        epilogue_row(&mut d, &src, 2.0, 1.0, Act::None, None);
        assert_eq!(d, [-3.0, 3.0, 11.0, 17.0]);
        let mut e = src;
        epilogue_inplace(&mut e, 2.0, 1.0, Act::Relu, None);
        assert_eq!(e, [0.0, 3.0, 11.0, 17.0]);
    }

    #[test]
    fn nan_survives_the_activations() {
        let mut d = [0.0; 1];
        epilogue_row(&mut d, &[f32::NAN], 1.0, 0.0, Act::Relu, None);
        assert!(d[0].is_nan());
        epilogue_row(&mut d, &[f32::NAN], 1.0, 0.0, Act::Relu6, None);
        assert!(d[0].is_nan());
    }

    #[test]
    fn masks_follow_pytorch_at_the_kinks() {
        let y = [0.0, 0.5, 6.0, 7.0];
        let mut g = [1.0; 4];
        mask_grad(&mut g, &y, Act::Relu6);
        assert_eq!(g, [0.0, 1.0, 0.0, 0.0]);
        let mut g = [1.0; 4];
        mask_grad(&mut g, &y, Act::Relu);
        assert_eq!(g, [0.0, 1.0, 1.0, 1.0]);
    }
}
