//! One safe door to the `gemm` crate (the GEMM burn's flex backend uses, with its AVX-512
//! kernels enabled): single-precision `C (+)= A · B` on strided row-major views, run on the
//! calling thread (the engine parallelises over its own tasks).

/// A strided matrix view: element `(i, j)` lives at `offset + i·rs + j·cs` of its slice.
#[derive(Debug, Clone, Copy)]
pub struct View {
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl View {
    /// Row-major with `cols` elements per row.
    pub const fn rows(cols: usize) -> Self {
        View { rs: cols, cs: 1 }
    }

    /// The transpose of a row-major matrix with `cols` elements per row.
    pub const fn transposed(cols: usize) -> Self {
        View { rs: 1, cs: cols }
    }

    /// One past the last element an `r × c` matrix touches.
    pub fn extent(&self, r: usize, c: usize) -> usize {
        if r == 0 || c == 0 {
            0
        } else {
            (r - 1) * self.rs + (c - 1) * self.cs + 1
        }
    }
}

/// `c[m×n] = a[m×k] · b[k×n]`, or `c += a · b` when `accumulate`.
///
/// Panics if a view reaches past its slice (a bug in the caller, never user input).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    vc: View,
    accumulate: bool,
    a: &[f32],
    va: View,
    b: &[f32],
    vb: View,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(vc.extent(m, n) <= c.len(), "gemm: C view out of bounds");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * vc.rs + j * vc.cs] = 0.0;
                }
            }
        }
        return;
    }
    assert!(va.extent(m, k) <= a.len(), "gemm: A view out of bounds");
    assert!(vb.extent(k, n) <= b.len(), "gemm: B view out of bounds");
    // SAFETY: every element the three views address lies inside its slice (checked above), `c`
    // is borrowed mutably and cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            vc.cs as isize,
            vc.rs as isize,
            accumulate,
            a.as_ptr(),
            va.cs as isize,
            va.rs as isize,
            b.as_ptr(),
            vb.cs as isize,
            vb.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// [`sgemm`] writing through a raw pointer, for tasks that fill interleaved parts of one
/// buffer at the same time.
///
/// # Safety
/// `c` must be valid for reads and writes at every element of the `m × n` view `vc`, and no
/// other thread may touch those elements during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_ptr(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    vc: View,
    accumulate: bool,
    a: &[f32],
    va: View,
    b: &[f32],
    vb: View,
) {
    if m == 0 || n == 0 || k == 0 {
        assert!(k > 0 || accumulate, "gemm: empty inner dimension");
        return;
    }
    assert!(va.extent(m, k) <= a.len(), "gemm: A view out of bounds");
    assert!(vb.extent(k, n) <= b.len(), "gemm: B view out of bounds");
    // SAFETY: the caller guarantees `c`; `a` and `b` are checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            vc.cs as isize,
            vc.rs as isize,
            accumulate,
            a.as_ptr(),
            va.cs as isize,
            va.rs as isize,
            b.as_ptr(),
            vb.cs as isize,
            vb.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], va: View, b: &[f32], vb: View) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    s += (a[i * va.rs + p * va.cs] * b[p * vb.rs + j * vb.cs]) as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn strided_products_match_a_naive_loop() {
        let (m, n, k) = (37, 29, 53);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
            .collect();
        for (va, vb) in [
            (View::rows(k), View::rows(n)),
            (View::transposed(m), View::rows(n)),
            (View::rows(k), View::transposed(k)),
        ] {
            let want = naive(m, n, k, &a, va, &b, vb);
            let mut c = vec![1.0; m * n];
            sgemm(m, n, k, &mut c, View::rows(n), false, &a, va, &b, vb);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-3, "{x} vs {y}");
            }
            sgemm(m, n, k, &mut c, View::rows(n), true, &a, va, &b, vb);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - 2.0 * y).abs() < 2e-3);
            }
        }
    }
}
