//! Conversions between burn tensors and the flex backend's primitives that the engine's
//! operations share: dense f32 views, new tensors, owned storage, the activation mask.

use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Bytes, DType, Shape, Tensor};
use rayon::prelude::*;

use super::elementwise::{Act, mask_grad};
use super::scratch::zeroed;

pub(super) type Ad = Autodiff<Flex>;
pub(super) type AdTensor = <Ad as burn::backend::BackendTypes>::FloatTensorPrimitive;

/// A contiguous f32 copy-free view of a flex tensor (copies only if strided).
pub(super) fn dense(t: FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "sfr's engine runs on f32 tensors");
    if t.as_slice::<f32>()
        .is_some_and(|s| s.len() == t.layout().num_elements())
    {
        t
    } else {
        t.to_contiguous()
    }
}

pub(super) fn data(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("dense tensor")
}

pub(super) fn tensor(v: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(v),
        Layout::contiguous(Shape::from(shape.to_vec())),
        DType::F32,
    )
}

pub(super) fn dims(t: &FlexTensor) -> [usize; 4] {
    let s = t.layout().shape();
    [s[0], s[1], s[2], s[3]]
}

/// Owned, writable f32 storage of `t` (in place when nothing else holds it and it spans its
/// whole storage; otherwise a copy made in parallel). A view into part of a buffer (a batch
/// slice: `cat`'s backward hands each part such a view) is copied: [`mut_data`] reaches the
/// whole buffer.
pub(super) fn owned(t: FlexTensor) -> FlexTensor {
    let t = dense(t);
    let whole = t.layout().contiguous_offsets() == Some((0, t.bytes().len() / 4));
    if t.is_unique() && whole {
        return t;
    }
    let src = data(&t);
    let mut v = zeroed(src.len());
    v.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(d, s)| d.copy_from_slice(s));
    FlexTensor::new(
        Bytes::from_elems(v),
        Layout::contiguous(t.layout().shape().clone()),
        DType::F32,
    )
}

pub(super) fn mut_data(t: &mut FlexTensor) -> &mut [f32] {
    t.try_storage_mut::<f32>().expect("owned tensor")
}

/// A tensor on the flex device, as a primitive (`None`: another backend).
pub(super) fn as_flex(x: &Tensor<4>) -> Option<FlexTensor> {
    x.clone().try_into_primitive::<Flex>().ok()
}

pub(super) fn as_ad(x: &Tensor<4>) -> Option<AdTensor> {
    x.clone().try_into_primitive::<Ad>().ok()
}

/// `gy · act'(y)` per element, in parallel, reusing `gy`'s storage when it can.
pub(super) fn masked(gy: FlexTensor, y: &FlexTensor, act: Act) -> FlexTensor {
    if act == Act::None {
        return dense(gy);
    }
    let mut g = owned(gy);
    let y = data(y);
    mut_data(&mut g)
        .par_chunks_mut(1 << 14)
        .zip(y.par_chunks(1 << 14))
        .for_each(|(g, y)| mask_grad(g, y, act));
    g
}

pub(super) fn vec_tensor(v: Vec<f32>) -> FlexTensor {
    let n = v.len();
    FlexTensor::new(
        Bytes::from_elems(v),
        Layout::contiguous(Shape::from(vec![n])),
        DType::F32,
    )
}

pub(super) fn vec1(t: &FlexTensor) -> Vec<f32> {
    dense(t.clone()).as_slice::<f32>().expect("dense").to_vec()
}

pub(super) trait TransposeOpt<T> {
    /// `None` → `Some(None)`; `Some(Some(v))` → `Some(Some(v))`; `Some(None)` → `None`.
    fn transpose_opt(self) -> Option<Option<T>>;
}

impl<T> TransposeOpt<T> for Option<Option<T>> {
    fn transpose_opt(self) -> Option<Option<T>> {
        match self {
            None => Some(None),
            Some(Some(v)) => Some(Some(v)),
            Some(None) => None,
        }
    }
}

#[cfg(test)]
pub(super) mod test_util {
    use burn::tensor::Tensor;

    /// `a` and `b` agree within `tol` of `b`'s largest magnitude (at least 1).
    pub fn close(a: Tensor<4>, b: Tensor<4>, tol: f32) {
        let a = a.into_data().try_into_vec::<f32>().unwrap();
        let b = b.into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol * scale, "{x} vs {y}");
        }
    }
}
