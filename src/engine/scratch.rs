//! Per-thread scratch buffers and the shared output pointer of parallel kernels.

use std::cell::RefCell;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer of at least `len` floats (contents unspecified).
///
/// The buffer is kept between calls, so kernels do not pay a fresh allocation (and its page
/// faults) per task. Re-entrant calls get a buffer of their own.
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let taken = SCRATCH.with(|s| s.try_borrow_mut().map(|mut v| std::mem::take(&mut *v)).ok());
    let mut buf = taken.unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    SCRATCH.with(|s| {
        if let Ok(mut v) = s.try_borrow_mut()
            && v.capacity() < buf.capacity()
        {
            *v = buf;
        }
    });
    r
}

/// A zero-filled vector of `n` floats, filled in parallel: an output tensor's first touch of
/// its pages is spread over the pool instead of running on the calling thread.
pub fn zeroed(n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const SERIAL: usize = 1 << 16;
    if n < SERIAL {
        return vec![0.0; n];
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(SERIAL)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the first `n` elements were just initialised.
    unsafe { v.set_len(n) };
    v
}

/// A buffer that parallel tasks write in disjoint parts.
#[derive(Clone, Copy)]
pub struct SyncPtr {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the pointer is only dereferenced through `slice`/`at`, whose callers guarantee
// that concurrent tasks touch disjoint elements.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// Wraps `buf` (which must outlive every use).
    pub fn new(buf: &mut [f32]) -> Self {
        SyncPtr {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// `buf[start..start + len]`.
    ///
    /// # Safety
    /// No other live reference or concurrent task may touch these elements.
    pub unsafe fn slice<'a>(&self, start: usize, len: usize) -> &'a mut [f32] {
        assert!(start + len <= self.len, "scratch: slice out of bounds");
        // SAFETY: in bounds (checked); exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }

    /// A raw pointer to `buf[start]` whose writes stay below `start + extent`.
    ///
    /// # Safety
    /// As [`SyncPtr::slice`], for every element written through the pointer.
    pub unsafe fn at(&self, start: usize, extent: usize) -> *mut f32 {
        assert!(start + extent <= self.len, "scratch: pointer out of bounds");
        // SAFETY: in bounds (checked).
        unsafe { self.ptr.add(start) }
    }
}
