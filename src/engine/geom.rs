//! The geometry of one convolution on a batch: shapes, stride, padding, dilation, groups, and
//! which kernel computes it.

/// Shape and hyper-parameters of one convolution on a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    /// Images.
    pub n: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride `[vertical, horizontal]`.
    pub stride: [usize; 2],
    /// Padding before the first row and column `[top, left]` (the end padding follows from the
    /// output size).
    pub pad: [usize; 2],
    /// Dilation `[vertical, horizontal]`.
    pub dilation: [usize; 2],
    /// Groups.
    pub groups: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
}

impl ConvGeom {
    /// The geometry of a convolution with `(begin, end)` padding per axis; `None` if the
    /// parameters are inconsistent (zero sizes, channels not divisible by the groups, a kernel
    /// larger than the padded input).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        [n, cin, h, w]: [usize; 4],
        cout: usize,
        [kh, kw]: [usize; 2],
        stride: [usize; 2],
        pads: [(usize, usize); 2],
        dilation: [usize; 2],
        groups: usize,
    ) -> Option<Self> {
        if groups == 0 || !cin.is_multiple_of(groups) || !cout.is_multiple_of(groups) || cout == 0 {
            return None;
        }
        if stride.contains(&0) || dilation.contains(&0) || kh == 0 || kw == 0 {
            return None;
        }
        let span = |k: usize, d: usize| (k - 1) * d + 1;
        let hp = h + pads[0].0 + pads[0].1;
        let wp = w + pads[1].0 + pads[1].1;
        if hp < span(kh, dilation[0]) || wp < span(kw, dilation[1]) {
            return None;
        }
        Some(ConvGeom {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            stride,
            pad: [pads[0].0, pads[1].0],
            dilation,
            groups,
            ho: (hp - span(kh, dilation[0])) / stride[0] + 1,
            wo: (wp - span(kw, dilation[1])) / stride[1] + 1,
        })
    }

    /// Input elements of one image.
    pub fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    /// Output positions of one image.
    pub fn out_plane(&self) -> usize {
        self.ho * self.wo
    }

    /// Output elements of one image.
    pub fn out_len(&self) -> usize {
        self.cout * self.out_plane()
    }

    /// Weight elements.
    pub fn weight_len(&self) -> usize {
        self.cout * self.cin / self.groups * self.kh * self.kw
    }

    pub(super) fn cin_g(&self) -> usize {
        self.cin / self.groups
    }

    pub(super) fn cout_g(&self) -> usize {
        self.cout / self.groups
    }

    /// Rows of the im2col matrix of one group.
    pub(super) fn k(&self) -> usize {
        self.cin_g() * self.kh * self.kw
    }

    /// One filter per channel, computed by the direct kernel.
    pub fn is_depthwise(&self) -> bool {
        self.groups == self.cin && self.cout == self.cin && self.stride[1] <= 8
    }

    /// 1×1, stride 1, no padding: the input is the im2col matrix.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.stride == [1, 1]
            && self.pad == [0, 0]
            && self.ho == self.h
            && self.wo == self.w
    }
}
