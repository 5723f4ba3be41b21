//! Perturbed pixels, `clip(x + v, 0, 255)`, as one parallel operation with its backward (the
//! first operation of every attack step).

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::elementwise::{add_clip, clip_mask};
use super::flex::*;
use super::scratch::zeroed;

// ---------------------------------------------------------------------------------------------
// Perturbed pixels: x + v, clipped to [0, 255]

/// Images per task of the perturbation sum.
fn perturb_flex(x: &FlexTensor, v: &FlexTensor, clip: bool) -> FlexTensor {
    let d = dims(x);
    let per = d[1] * d[2] * d[3];
    let (xs, vs) = (data(x), data(v));
    let broadcast = vs.len() == per;
    let mut y = zeroed(xs.len());
    y.par_chunks_mut(per).enumerate().for_each(|(i, out)| {
        let xv = &xs[i * per..(i + 1) * per];
        let vv = if broadcast {
            vs
        } else {
            &vs[i * per..(i + 1) * per]
        };
        add_clip(out, xv, vv, clip);
    });
    tensor(y, d)
}

#[derive(Debug)]
struct PerturbBackward;

impl Backward<Flex, 2> for PerturbBackward {
    /// Pixels, perturbation, clip.
    type State = (FlexTensor, FlexTensor, bool);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_v] = ops.parents;
        let (x, v, clip) = ops.state;
        let g = dense(grads.consume::<Flex>(&ops.node));
        let d = dims(&x);
        let per = d[1] * d[2] * d[3];
        let vd = dims(&v);
        let broadcast = vd[0] == 1 && d[0] != 1;
        // g where x + v lies in [0, 255] (PyTorch's clamp passes the gradient at the bounds).
        let masked = if clip {
            let (xs, vs) = (data(&x), data(&v));
            let mut m = owned(g);
            mut_data(&mut m)
                .par_chunks_mut(per)
                .enumerate()
                .for_each(|(i, gi)| {
                    let xv = &xs[i * per..(i + 1) * per];
                    let vv = if vs.len() == per {
                        vs
                    } else {
                        &vs[i * per..(i + 1) * per]
                    };
                    clip_mask(gi, xv, vv);
                });
            m
        } else {
            g
        };
        if let Some(node) = node_v {
            let gv = if broadcast {
                let ms = data(&masked);
                let n = d[0];
                // Σ over the batch, in image order (deterministic), parallel over pixels.
                let mut acc = zeroed(per);
                acc.par_chunks_mut(1 << 12).enumerate().for_each(|(j, a)| {
                    let at = j << 12;
                    for i in 0..n {
                        let src = &ms[i * per + at..i * per + at + a.len()];
                        for (o, &s) in a.iter_mut().zip(src) {
                            *o += s;
                        }
                    }
                });
                tensor(acc, vd)
            } else {
                masked.clone()
            };
            grads.register::<Flex>(node.id, gv);
        }
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, masked);
        }
    }
}

/// `pixels + v` (`v` of the same shape or one image broadcast over the batch), clipped to
/// [0, 255] when `clip`, with gradients for both.
pub fn perturb(pixels: Tensor<4>, v: Tensor<4>, clip: bool) -> Tensor<4> {
    let [n, c, h, w] = pixels.dims();
    let vd = v.dims();
    let fits = vd == [n, c, h, w] || vd == [1, c, h, w];
    let burn_way = |x: Tensor<4>, v: Tensor<4>| {
        let y = x + v;
        if clip { y.clamp(0.0, 255.0) } else { y }
    };
    if !fits {
        // Leave shape errors to burn's broadcasting rules (and their messages).
        return burn_way(pixels, v);
    }
    if pixels.is_autodiff() || v.is_autodiff() {
        let (x, v) = (pixels.autodiff(), v.autodiff());
        let (Some(xa), Some(va)) = (as_ad(&x), as_ad(&v)) else {
            return burn_way(x, v);
        };
        let out = match PerturbBackward
            .prepare::<NoCheckpointing>([xa.node(), va.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (xp, vp) = (dense(xa.into_primitive()), dense(va.into_primitive()));
                let y = perturb_flex(&xp, &vp, clip);
                prep.finish((xp, vp, clip), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(perturb_flex(
                &dense(xa.into_primitive()),
                &dense(va.into_primitive()),
                clip,
            )),
        };
        return Tensor::from_primitive::<Ad>(out);
    }
    match (as_flex(&pixels), as_flex(&v)) {
        (Some(xf), Some(vf)) => {
            Tensor::from_primitive::<Flex>(perturb_flex(&dense(xf), &dense(vf), clip))
        }
        _ => burn_way(pixels, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::flex::test_util::close;
    use burn::tensor::{Device, Distribution};

    /// Half a batch perturbed and joined back to the clean half (`--method uat`'s batches):
    /// `cat`'s backward hands the perturbation a view into part of the gradient's buffer, which
    /// the backward must not treat as the whole buffer.
    #[test]
    fn perturb_of_half_a_batch_joined_by_cat_has_the_gradient_of_add_and_clamp() {
        let dev = Device::flex();
        let x: Tensor<4> = Tensor::random([4, 3, 4, 5], Distribution::Uniform(0.0, 255.0), &dev);
        let v: Tensor<4> = Tensor::random([1, 3, 4, 5], Distribution::Uniform(-10.0, 10.0), &dev);
        let gy: Tensor<4> = Tensor::random([4, 3, 4, 5], Distribution::Normal(0.0, 1.0), &dev);
        let run = |fast: bool| {
            let va = v.clone().autodiff().require_grad();
            let clean = x.clone().narrow(0, 0, 2).autodiff();
            let half = x.clone().narrow(0, 2, 2).autodiff();
            let pert = if fast {
                perturb(half, va.clone(), true)
            } else {
                (half + va.clone()).clamp(0.0, 255.0)
            };
            let y = Tensor::cat(vec![clean, pert], 0);
            let g = (y.clone() * gy.clone().autodiff()).sum().backward();
            (y.inner(), va.grad(&g).unwrap())
        };
        let (a, av) = run(true);
        let (b, bv) = run(false);
        close(a, b, 0.0);
        close(av, bv, 1e-6);
    }

    #[test]
    fn perturb_matches_add_and_clamp() {
        let dev = Device::flex();
        // Pixels on the bounds and beyond them after the perturbation.
        let x: Tensor<4> = Tensor::random([3, 3, 4, 5], Distribution::Uniform(-20.0, 275.0), &dev)
            .clamp(0.0, 255.0);
        for (vn, clip) in [(1, true), (3, true), (1, false)] {
            let v: Tensor<4> =
                Tensor::random([vn, 3, 4, 5], Distribution::Uniform(-10.0, 10.0), &dev);
            let gy: Tensor<4> = Tensor::random([3, 3, 4, 5], Distribution::Normal(0.0, 1.0), &dev);
            let run = |fast: bool| {
                let xa = x.clone().autodiff().require_grad();
                let va = v.clone().autodiff().require_grad();
                let y = if fast {
                    perturb(xa.clone(), va.clone(), clip)
                } else {
                    let y = xa.clone() + va.clone();
                    if clip { y.clamp(0.0, 255.0) } else { y }
                };
                let g = (y.clone() * gy.clone().autodiff()).sum().backward();
                (y.inner(), xa.grad(&g).unwrap(), va.grad(&g).unwrap())
            };
            let (a, ax, av) = run(true);
            let (b, bx, bv) = run(false);
            close(a, b, 0.0);
            close(ax, bx, 0.0);
            close(av, bv, 1e-6);
        }
    }
}
