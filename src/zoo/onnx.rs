//! Any ImageNet-style CNN as an ONNX file (`torch.onnx.export`, tf2onnx, timm), interpreted at
//! run time on burn tensors with the same taps, sites and fused operations as the built-in
//! architectures.
//!
//! The file is parsed by `onnx-ir` (the burn-onnx project's parser: typed nodes, shape
//! inference, constants lifted and folded). Every `Conv` is a site, named after the module path
//! the exporter recorded (`/layer1/layer1.0/conv1/Conv` → `layer1.0.conv1`, so `features.0.0`
//! stays `features.0.0`), or after its weight initializer, or onnx-ir's own name. A conv with a
//! batch norm, activation or residual add right after it runs as one fused operation unless a
//! tap wants its site. Exporters usually fold batch norm into the conv already: such a site is
//! the conv's output after the folded normalisation.
//!
//! The shape arithmetic exporters emit around `Reshape` (Shape → Gather → Unsqueeze → Concat)
//! runs on integer vectors at run time, so a dynamic batch dimension works.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use burn::tensor::module::{adaptive_avg_pool2d, avg_pool2d, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, MaxPoolOptions};
use burn::tensor::{DType, Device, Tensor, TensorData};
use onnx_ir::node::padding::{AutoPad, PaddingConfig2d};
use onnx_ir::{Argument, Node, OnnxGraphBuilder, TensorDataExt};
use serde::Serialize;

use super::layers::{Conv, Tap, lrn};
use super::{ArchSpec, ChannelOrder, Network, Preprocess, ResizeMode, TORCHVISION};
use crate::engine::{Act, Affine, BnParams, FrozenConv, Join, Padding};
use crate::error::{Result, SfrError};

/// Preprocessing for an ONNX model, each field overriding the file beside the model and the
/// default (torchvision's: resize 256, centre crop, ImageNet mean/std, RGB).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct OnnxPreprocess {
    /// Centre-crop size (required when the graph's input size is dynamic).
    pub input_size: Option<usize>,
    /// Resize target before the crop (default: input size / 0.875, 256 for 224).
    pub resize: Option<usize>,
    /// `shorter_side` (default) or `squash`.
    pub resize_mode: Option<ResizeMode>,
    /// Per-channel mean on the 0–255 scale, R, G, B.
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviation on the 0–255 scale, R, G, B.
    pub std: Option<[f32; 3]>,
    /// Feed the network BGR instead of RGB.
    pub bgr: Option<bool>,
}

impl OnnxPreprocess {
    /// `other`'s fields where `self` has none.
    pub fn or(self, other: OnnxPreprocess) -> OnnxPreprocess {
        OnnxPreprocess {
            input_size: self.input_size.or(other.input_size),
            resize: self.resize.or(other.resize),
            resize_mode: self.resize_mode.or(other.resize_mode),
            mean: self.mean.or(other.mean),
            std: self.std.or(other.std),
            bgr: self.bgr.or(other.bgr),
        }
    }
}

/// The JSON file whose preprocessing applies to `model` when there is one: `MODEL.json` beside
/// `MODEL.onnx`.
pub fn sidecar(model: &Path) -> std::path::PathBuf {
    model.with_extension("json")
}

/// What [`load`] found out about the graph besides the model (for `sfr models FILE.onnx`).
#[derive(Debug, Clone, Serialize)]
pub struct GraphInfo {
    /// The input's name and static shape (`None`: dynamic).
    pub input: (String, Vec<Option<usize>>),
    /// The output's name and static shape.
    pub output: (String, Vec<Option<usize>>),
    /// Nodes after onnx-ir's simplification.
    pub nodes: usize,
    /// Notes about choices made (defaults taken, the preprocessing's source).
    pub notes: Vec<String>,
}

fn onnx_err(path: &Path, message: impl Into<String>) -> SfrError {
    SfrError::param(
        "--model",
        format!("ONNX model {}: {}", path.display(), message.into()),
    )
}

/// Operators this interpreter runs (besides the shape arithmetic on integer vectors).
pub const SUPPORTED: &str = "Conv, BatchNormalization, Relu, Clip, Sigmoid, HardSigmoid, HardSwish, Add, Sub, Mul, Div, GlobalAveragePool, AveragePool, MaxPool, Gemm, MatMul, Flatten, Reshape, Concat, Split, Transpose, Pad, Squeeze, Unsqueeze, ReduceMean, Softmax, LRN, Dropout, Identity, Constant, Shape, Gather (of shapes), Slice (of shapes), Cast";

/// Loads an ONNX classifier: the network and the facts to use it (`spec`), plus what was found.
pub fn load(
    path: &Path,
    pre: &OnnxPreprocess,
    device: &Device,
) -> Result<(ArchSpec, Box<dyn Network>, GraphInfo)> {
    let bytes = std::fs::read(path).map_err(|e| SfrError::io(path, e))?;
    if bytes.is_empty() {
        return Err(onnx_err(path, "the file is empty; expected an ONNX model"));
    }
    let names = conv_names(&bytes).map_err(|e| {
        onnx_err(
            path,
            format!("not a readable ONNX protobuf ({e}); expected a .onnx model file"),
        )
    })?;
    let graph = OnnxGraphBuilder::new()
        .parse_bytes(&bytes)
        .map_err(|e| onnx_err(path, format!("cannot parse it: {e}")))?;
    let mut notes = Vec::new();
    let [input] = graph.inputs.as_slice() else {
        return Err(onnx_err(
            path,
            format!(
                "the graph has {} inputs; expected one image input [batch, 3, height, width]",
                graph.inputs.len()
            ),
        ));
    };
    let [output] = graph.outputs.as_slice() else {
        return Err(onnx_err(
            path,
            format!(
                "the graph has {} outputs; expected one logits output [batch, classes]",
                graph.outputs.len()
            ),
        ));
    };
    let in_shape = input.ty.static_shape().cloned().unwrap_or_default();
    if in_shape.len() != 4 || in_shape[1].is_some_and(|c| c != 3) {
        return Err(onnx_err(
            path,
            format!(
                "the input `{}` has shape {:?}; expected [batch, 3, height, width]",
                input.name, in_shape
            ),
        ));
    }
    let size = match (in_shape[2], in_shape[3], pre.input_size) {
        (Some(h), Some(w), given) => {
            if h != w {
                return Err(onnx_err(
                    path,
                    format!("the input is {h}×{w}; sfr feeds square crops, export it square"),
                ));
            }
            if let Some(g) = given
                && g != h
            {
                return Err(onnx_err(
                    path,
                    format!("--input-size {g} differs from the graph's fixed input size {h}"),
                ));
            }
            h
        }
        (_, _, Some(g)) => g,
        _ => {
            return Err(onnx_err(
                path,
                "the input's height and width are dynamic; give --input-size (or input_size in the JSON beside the model)",
            ));
        }
    };
    let out_shape = output.ty.static_shape().cloned().unwrap_or_default();
    let info_input = (input.name.clone(), in_shape.clone());
    let info_output = (output.name.clone(), out_shape);
    let net = Interpreter::build(path, &graph.nodes, input, output, &names, device)?;
    if net.convs.is_empty() {
        return Err(onnx_err(
            path,
            "the graph has no Conv node; sfr's sites are convolution outputs",
        ));
    }
    let preprocess = match (pre.mean, pre.std) {
        (None, None) => {
            notes.push(
                "preprocessing: torchvision's ImageNet mean/std (no --mean/--std or JSON beside the model)"
                    .into(),
            );
            TORCHVISION
        }
        (m, s) => Preprocess {
            order: ChannelOrder::Rgb,
            mean_rgb: m.unwrap_or(TORCHVISION.mean_rgb),
            std_rgb: s.unwrap_or(TORCHVISION.std_rgb),
        },
    };
    let preprocess = Preprocess {
        order: if pre.bgr.unwrap_or(false) {
            ChannelOrder::Bgr
        } else {
            ChannelOrder::Rgb
        },
        ..preprocess
    };
    let resize = pre
        .resize
        .unwrap_or_else(|| ((size as f64) / 0.875).round() as usize);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "onnx".into());
    let spec = ArchSpec {
        name: stem.into(),
        description: format!("ONNX graph {}", path.display()).into(),
        input_size: size,
        resize,
        resize_mode: pre.resize_mode.unwrap_or(ResizeMode::ShorterSide),
        preprocess,
        weights: format!("the initializers of {}", path.display()).into(),
        fetch: None,
        measured: &[],
    };
    let info = GraphInfo {
        input: info_input,
        output: info_output,
        nodes: graph.nodes.len(),
        notes,
    };
    Ok((spec, Box::new(net), info))
}

// ---------------------------------------------------------------------------------------------
// The exporter's names

/// For every `Conv` node of the raw graph in order: the module path its name records, else its
/// weight initializer's name without `.weight` (when that is not an anonymous `onnx::…`), else
/// `None`. onnx-ir renames nodes and drops initializer names, so these three string fields are
/// read from the protobuf with the `protobuf` crate's wire decoder.
fn conv_names(bytes: &[u8]) -> std::result::Result<Vec<Option<String>>, String> {
    use protobuf::CodedInputStream;
    fn fields<'a>(
        s: &mut CodedInputStream<'a>,
        mut f: impl FnMut(u32, &mut CodedInputStream<'a>) -> protobuf::Result<bool>,
    ) -> protobuf::Result<()> {
        while let Some(tag) = s.read_raw_tag_or_eof()? {
            let (field, wire) = (tag >> 3, tag & 7);
            if !f(field, s)? {
                let wt = protobuf::rt::WireType::new(wire)
                    .ok_or_else(|| protobuf::Error::from(std::io::Error::other("bad wire type")))?;
                s.skip_field(wt)?;
            }
        }
        Ok(())
    }
    let mut graph: Option<Vec<u8>> = None;
    let mut s = CodedInputStream::from_bytes(bytes);
    fields(&mut s, |field, s| {
        if field == 7 {
            graph = Some(s.read_bytes()?);
            return Ok(true);
        }
        Ok(false)
    })
    .map_err(|e| e.to_string())?;
    let graph = graph.ok_or("no graph in the model")?;
    let mut out = Vec::new();
    let mut s = CodedInputStream::from_bytes(&graph);
    fields(&mut s, |field, s| {
        if field != 1 {
            return Ok(false);
        }
        let node = s.read_bytes()?;
        let (mut inputs, mut name, mut op) = (Vec::new(), String::new(), String::new());
        let mut n = CodedInputStream::from_bytes(&node);
        fields(&mut n, |f, n| {
            match f {
                1 => inputs.push(n.read_string()?),
                3 => name = n.read_string()?,
                4 => op = n.read_string()?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        if op == "Conv" {
            let from_scope = module_path(&name);
            let from_weight = inputs
                .get(1)
                .filter(|w| !w.starts_with("onnx::") && !w.is_empty())
                .map(|w| w.trim_end_matches(".weight").to_string());
            out.push(from_scope.or(from_weight));
        }
        Ok(true)
    })
    .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The module path in a PyTorch exporter's node name: `/layer2/layer2.0/downsample/
/// downsample.0/Conv` → `layer2.0.downsample.0` (a scope that extends the one before it by
/// `.index` names a child of a container; any other scope names an attribute).
fn module_path(node_name: &str) -> Option<String> {
    let segs: Vec<&str> = node_name.split('/').filter(|s| !s.is_empty()).collect();
    if segs.len() < 2 {
        return None;
    }
    let mut path = String::new();
    let mut prev: Option<&str> = None;
    for seg in &segs[..segs.len() - 1] {
        match prev {
            Some(p) if seg.starts_with(p) && seg[p.len()..].starts_with('.') => {
                path.push_str(&seg[p.len()..]);
            }
            _ => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(seg);
            }
        }
        prev = Some(seg);
    }
    (!path.is_empty()).then_some(path)
}

// ---------------------------------------------------------------------------------------------
// Values

/// A value while the graph runs: a float tensor (stored front-padded to rank 5, with its own
/// dims) or an integer vector (shapes and indices).
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // one value per graph edge, read and replaced, never stored in bulk
enum Val {
    F(Tensor<5>, Vec<usize>),
    I(Vec<i64>),
}

fn pad5(d: &[usize]) -> [usize; 5] {
    let mut out = [1; 5];
    out[5 - d.len()..].copy_from_slice(d);
    out
}

impl Val {
    fn f(t: Tensor<5>, dims: Vec<usize>) -> Val {
        Val::F(t, dims)
    }

    fn from4(t: Tensor<4>) -> Val {
        let d = t.dims().to_vec();
        let t = t.reshape(pad5(&d));
        Val::F(t, d)
    }

    fn from2(t: Tensor<2>) -> Val {
        let d = t.dims().to_vec();
        let t = t.reshape(pad5(&d));
        Val::F(t, d)
    }

    fn dims(&self) -> Vec<usize> {
        match self {
            Val::F(_, d) => d.clone(),
            Val::I(v) => vec![v.len()],
        }
    }

    fn float(self, what: &str) -> std::result::Result<(Tensor<5>, Vec<usize>), String> {
        match self {
            Val::F(t, d) => Ok((t, d)),
            Val::I(_) => Err(format!("{what}: expected a float tensor, got integers")),
        }
    }

    fn ints(self, what: &str) -> std::result::Result<Vec<i64>, String> {
        match self {
            Val::I(v) => Ok(v),
            Val::F(..) => Err(format!(
                "{what}: expected integers (a shape), got a float tensor"
            )),
        }
    }

    fn t4(self, what: &str) -> std::result::Result<Tensor<4>, String> {
        let (t, d) = self.float(what)?;
        if d.len() != 4 {
            return Err(format!("{what}: expected a 4-D tensor, got {d:?}"));
        }
        Ok(t.reshape([d[0], d[1], d[2], d[3]]))
    }

    fn t2(self, what: &str) -> std::result::Result<Tensor<2>, String> {
        let (t, d) = self.float(what)?;
        if d.len() != 2 {
            return Err(format!("{what}: expected a 2-D tensor, got {d:?}"));
        }
        Ok(t.reshape([d[0], d[1]]))
    }

    fn reshaped(self, dims: Vec<usize>) -> std::result::Result<Val, String> {
        match self {
            Val::F(t, d) => {
                if dims.iter().product::<usize>() != d.iter().product::<usize>() || dims.len() > 5 {
                    return Err(format!("cannot reshape {d:?} to {dims:?}"));
                }
                Ok(Val::F(t.reshape(pad5(&dims)), dims))
            }
            Val::I(v) => Ok(Val::I(v)),
        }
    }
}

/// Where an operand comes from: a value computed by the graph, or a constant.
#[derive(Debug, Clone, Copy)]
enum Ref {
    Var(usize),
    Const(usize),
}

// ---------------------------------------------------------------------------------------------
// The plan

/// What follows a conv and runs fused with it.
#[derive(Debug, Clone, Copy)]
enum After {
    Act(Act),
    Add(usize),
}

struct Unit {
    conv: Conv,
    /// A batch norm right after the conv (not folded by the exporter).
    bn: Option<Arc<Affine>>,
    /// The conv with the batch norm folded in (the fused path's weights).
    folded: Arc<FrozenConv>,
    chain: Vec<After>,
    x: usize,
    out: usize,
}

#[derive(Debug, Clone, Copy)]
enum Unary {
    Relu,
    Sigmoid,
    Clip(f32, f32),
    HardSigmoid(f32, f32),
    HardSwish,
}

#[derive(Debug, Clone, Copy)]
enum Bin {
    Add,
    Sub,
    Mul,
    Div,
}

enum Op {
    Unit(Box<Unit>),
    Affine(Ref, Arc<Affine>, usize),
    Unary(Ref, Unary, usize),
    Binary(Ref, Ref, Bin, usize),
    GlobalAvgPool(Ref, usize),
    AvgPool(Ref, AvgPoolOptions<2>, usize),
    MaxPool(Ref, MaxPoolOptions<2>, usize),
    /// `alpha·a·b (+ beta·c)`, `b` given as `[k, n]`.
    Gemm {
        a: Ref,
        b: Ref,
        trans_b: bool,
        c: Option<Ref>,
        alpha: f32,
        beta: f32,
        out: usize,
    },
    Flatten(Ref, usize, usize),
    Reshape(Ref, ReshapeTo, usize),
    Concat(Vec<Ref>, usize, usize),
    Split(Ref, usize, Vec<usize>, Vec<usize>),
    Transpose(Ref, Vec<usize>, usize),
    Pad(Ref, Vec<(usize, usize)>, f32, usize),
    Squeeze(Ref, Option<Vec<i64>>, usize),
    Unsqueeze(Ref, Vec<i64>, usize),
    ReduceMean(Ref, Vec<usize>, bool, usize),
    Softmax(Ref, usize, usize),
    Lrn(Ref, usize, f64, f64, f64, usize),
    Pass(Ref, usize),
    Shape(Ref, usize, usize, usize),
    Gather(Ref, Ref, usize),
    Slice(Ref, Bounds, usize),
}

impl Op {
    /// Every value this op reads, once per read (a value read twice counts twice).
    fn reads(&self, f: &mut impl FnMut(Ref)) {
        let ints = |a: &IntsArg, f: &mut dyn FnMut(Ref)| {
            if let IntsArg::Runtime(r) = a {
                f(*r)
            }
        };
        match self {
            Op::Unit(u) => {
                f(Ref::Var(u.x));
                for s in &u.chain {
                    if let After::Add(skip) = s {
                        f(Ref::Var(*skip));
                    }
                }
            }
            Op::Affine(x, ..)
            | Op::Unary(x, ..)
            | Op::GlobalAvgPool(x, _)
            | Op::AvgPool(x, ..)
            | Op::MaxPool(x, ..)
            | Op::Flatten(x, ..)
            | Op::Split(x, ..)
            | Op::Transpose(x, ..)
            | Op::Pad(x, ..)
            | Op::Squeeze(x, ..)
            | Op::Unsqueeze(x, ..)
            | Op::ReduceMean(x, ..)
            | Op::Softmax(x, ..)
            | Op::Lrn(x, ..)
            | Op::Pass(x, _)
            | Op::Shape(x, ..) => f(*x),
            Op::Binary(a, b, ..) | Op::Gather(a, b, _) => {
                f(*a);
                f(*b);
            }
            Op::Gemm { a, b, c, .. } => {
                f(*a);
                f(*b);
                if let Some(c) = c {
                    f(*c);
                }
            }
            Op::Reshape(x, to, _) => {
                f(*x);
                if let ReshapeTo::Runtime(r) = to {
                    f(*r);
                }
            }
            Op::Concat(xs, ..) => xs.iter().for_each(|x| f(*x)),
            Op::Slice(x, b, _) => {
                f(*x);
                ints(&b.starts, f);
                ints(&b.ends, f);
                if let Some(a) = &b.axes {
                    ints(a, f);
                }
                if let Some(st) = &b.steps {
                    ints(st, f);
                }
            }
        }
    }
}

/// A slice's starts, ends, axes and steps, each fixed or computed by the graph.
struct Bounds {
    starts: IntsArg,
    ends: IntsArg,
    axes: Option<IntsArg>,
    steps: Option<IntsArg>,
}

enum IntsArg {
    Static(Vec<i64>),
    Runtime(Ref),
}

enum ReshapeTo {
    Static(Vec<i64>),
    Runtime(Ref),
}

/// The interpreted graph.
struct Interpreter {
    ops: Vec<Op>,
    consts: Vec<Val>,
    convs: Vec<Conv>,
    /// Slot of the graph's input and output.
    input: usize,
    output: usize,
    slots: usize,
    /// How many times each slot is read (the output once more): a run drops a value at its
    /// last read, so activations do not outlive their use and the last reader may reuse them.
    reads: Vec<u32>,
}

fn float_data(d: &TensorData, what: &str) -> std::result::Result<Vec<f32>, String> {
    d.to_f32_vec()
        .map_err(|e| format!("{what}: cannot read the values: {e:?}"))
}

impl Interpreter {
    fn build(
        path: &Path,
        nodes: &[Node],
        input: &Argument,
        output: &Argument,
        names: &[Option<String>],
        device: &Device,
    ) -> Result<Interpreter> {
        let mut b = Builder {
            slot: HashMap::new(),
            consts: Vec::new(),
            device: device.clone(),
            uses: HashMap::new(),
            producer: HashMap::new(),
        };
        for (i, n) in nodes.iter().enumerate() {
            for a in n.inputs() {
                if a.value().is_none() && !a.name.is_empty() {
                    *b.uses.entry(a.name.clone()).or_default() += 1;
                }
            }
            for o in n.outputs() {
                b.producer.insert(o.name.clone(), i);
            }
        }
        *b.uses.entry(output.name.clone()).or_default() += 1;
        let input_slot = b.var(&input.name);
        let mut ops = Vec::new();
        let mut convs = Vec::new();
        let mut fused: HashSet<usize> = HashSet::new();
        let mut conv_index = 0;
        let mut used_names: HashSet<String> = HashSet::new();
        for (i, node) in nodes.iter().enumerate() {
            if fused.contains(&i) {
                continue;
            }
            let err = |m: String| onnx_err(path, format!("node `{}`: {m}", node.name()));
            let op = match node {
                Node::Conv2d(c) => {
                    let site = names
                        .get(conv_index)
                        .cloned()
                        .flatten()
                        .filter(|s| !used_names.contains(s))
                        .unwrap_or_else(|| c.name.clone());
                    used_names.insert(site.clone());
                    conv_index += 1;
                    let unit = b.conv_unit(i, nodes, c, site, &mut fused).map_err(err)?;
                    convs.push(unit.conv.clone());
                    Op::Unit(Box::new(unit))
                }
                other => b.op(other).map_err(|m| {
                    if m.starts_with("unsupported") {
                        onnx_err(
                            path,
                            format!(
                                "node `{}` is {}, which sfr does not run; supported: {SUPPORTED}",
                                other.name(),
                                node_kind(other)
                            ),
                        )
                    } else {
                        err(m)
                    }
                })?,
            };
            ops.push(op);
        }
        let output_slot = *b.slot.get(&output.name).ok_or_else(|| {
            onnx_err(
                path,
                format!("the output `{}` is never computed", output.name),
            )
        })?;
        let mut reads = vec![0u32; b.slot.len()];
        reads[output_slot] += 1;
        for op in &ops {
            op.reads(&mut |r| {
                if let Ref::Var(s) = r {
                    reads[s] += 1;
                }
            });
        }
        Ok(Interpreter {
            ops,
            consts: b.consts,
            convs,
            input: input_slot,
            output: output_slot,
            slots: b.slot.len(),
            reads,
        })
    }
}

fn node_kind(n: &Node) -> String {
    let s = format!("{n:?}");
    s.split('(').next().unwrap_or("?").to_string()
}

struct Builder {
    slot: HashMap<String, usize>,
    consts: Vec<Val>,
    device: Device,
    /// How many nodes (and the graph output) read each value.
    uses: HashMap<String, usize>,
    producer: HashMap<String, usize>,
}

type R<T> = std::result::Result<T, String>;

impl Builder {
    fn var(&mut self, name: &str) -> usize {
        let n = self.slot.len();
        *self.slot.entry(name.to_string()).or_insert(n)
    }

    fn constant(&mut self, d: TensorData, what: &str) -> R<Ref> {
        let dims = d.shape().to_vec();
        let v = match d.dtype() {
            DType::F32 | DType::F64 | DType::F16 | DType::BF16 => {
                let vals = float_data(&d, what)?;
                if dims.len() > 5 {
                    return Err(format!(
                        "{what}: a constant of rank {} (at most 5)",
                        dims.len()
                    ));
                }
                let t = Tensor::<5>::from_data(TensorData::new(vals, pad5(&dims)), &self.device);
                Val::f(t, dims)
            }
            _ => Val::I(
                d.to_i64_vec()
                    .map_err(|e| format!("{what}: cannot read integers: {e:?}"))?,
            ),
        };
        self.consts.push(v);
        Ok(Ref::Const(self.consts.len() - 1))
    }

    fn input(&mut self, a: &Argument, what: &str) -> R<Ref> {
        match a.value() {
            Some(d) => self.constant(d, what),
            None => self
                .slot
                .get(&a.name)
                .map(|&s| Ref::Var(s))
                .ok_or_else(|| format!("{what}: `{}` is used before it is computed", a.name)),
        }
    }

    fn out(&mut self, node: &Node, k: usize) -> R<usize> {
        let o = node
            .outputs()
            .get(k)
            .ok_or_else(|| format!("output {k} missing"))?;
        Ok(self.var(&o.name))
    }

    fn static_f32(&self, a: &Argument, what: &str) -> R<Vec<f32>> {
        let d = a
            .value()
            .ok_or_else(|| format!("{what} must be a constant"))?;
        float_data(&d, what)
    }

    /// The single node reading `value` (when exactly one does and it is not the output).
    fn sole_consumer<'n>(
        &self,
        nodes: &'n [Node],
        after: usize,
        value: &str,
    ) -> Option<(usize, &'n Node)> {
        if self.uses.get(value).copied() != Some(1) {
            return None;
        }
        nodes.iter().enumerate().skip(after + 1).find(|(_, n)| {
            n.inputs()
                .iter()
                .any(|a| a.name == value && a.value().is_none())
        })
    }

    fn conv_unit(
        &mut self,
        i: usize,
        nodes: &[Node],
        c: &onnx_ir::node::conv2d::Conv2dNode,
        site: String,
        fused: &mut HashSet<usize>,
    ) -> R<Unit> {
        let x = match self.input(&c.inputs[0], "the conv's input")? {
            Ref::Var(s) => s,
            Ref::Const(_) => return Err("a conv of a constant".into()),
        };
        let wd = c.inputs[1]
            .value()
            .ok_or("the conv's weight must be a constant initializer")?;
        let shape = wd.shape().to_vec();
        if shape.len() != 4 {
            return Err(format!("conv weight of shape {shape:?}; expected 4-D"));
        }
        let weight = float_data(&wd, "conv weight")?;
        let bias = match c.inputs.get(2) {
            Some(a) if !a.name.is_empty() || a.value().is_some() => {
                Some(self.static_f32(a, "conv bias")?)
            }
            _ => None,
        };
        let cfg = &c.config;
        let padding = match (&cfg.auto_pad, &cfg.padding) {
            (AutoPad::SameUpper, _) => Padding::TfSame,
            (AutoPad::SameLower, _) => return Err("auto_pad SAME_LOWER is not supported".into()),
            (_, PaddingConfig2d::Valid) => Padding::Explicit([(0, 0), (0, 0)]),
            (_, PaddingConfig2d::Explicit(t, l, b, r)) => Padding::Explicit([(*t, *b), (*l, *r)]),
        };
        let (cout, cin_g) = (shape[0], shape[1]);
        let groups = cfg.groups.max(1);
        let op = Arc::new(FrozenConv {
            weight: Arc::new(weight.clone()),
            bias: Arc::new(bias.clone().unwrap_or_else(|| vec![0.0; cout])),
            cout,
            cin: cin_g * groups,
            kernel: [shape[2], shape[3]],
            stride: cfg.stride,
            padding,
            dilation: cfg.dilation,
            groups,
            act: Act::None,
        });
        let conv = Conv {
            name: site,
            weight: Tensor::from_data(
                TensorData::new(weight, [shape[0], shape[1], shape[2], shape[3]]),
                &self.device,
            ),
            bias: bias.map(|b| Tensor::from_data(TensorData::new(b, [cout]), &self.device)),
            stride: cfg.stride,
            padding,
            groups,
            op: op.clone(),
        };
        // What follows: a batch norm, then at most an add and an activation.
        let mut last = c.outputs[0].name.clone();
        let mut at = i;
        let mut bn = None;
        let mut folded = op.clone();
        if let Some((j, Node::BatchNormalization(n))) = self.sole_consumer(nodes, at, &last) {
            let get = |k: usize, what: &str| -> R<Vec<f32>> { self.static_f32(&n.inputs[k], what) };
            let (gamma, beta, mean, var) = (
                get(1, "bn scale")?,
                get(2, "bn bias")?,
                get(3, "bn mean")?,
                get(4, "bn variance")?,
            );
            let eps = match &n.config {
                onnx_ir::node::batch_norm::BatchNormConfig::Static(s) => s.epsilon,
                onnx_ir::node::batch_norm::BatchNormConfig::Runtime(r) => r.epsilon,
            };
            let p = BnParams {
                gamma: &gamma,
                beta: &beta,
                mean: &mean,
                var: &var,
                eps,
            };
            let (scale, shift) = p.scale_shift();
            folded = Arc::new(op.fold(&p, Act::None));
            bn = Some(Arc::new(Affine {
                scale: Arc::new(scale),
                shift: Arc::new(shift),
                act: Act::None,
            }));
            fused.insert(j);
            at = j;
            last = n.outputs[0].name.clone();
        }
        let mut chain = Vec::new();
        for _ in 0..2 {
            let Some((j, next)) = self.sole_consumer(nodes, at, &last) else {
                break;
            };
            let step = match next {
                Node::Relu(_) => Some(After::Act(Act::Relu)),
                Node::Clip(n) => match (&n.config.min, &n.config.max) {
                    (
                        Some(onnx_ir::node::clip::ClipInput::Static(lo)),
                        Some(onnx_ir::node::clip::ClipInput::Static(hi)),
                    ) if *lo == 0.0 && *hi == 6.0 => Some(After::Act(Act::Relu6)),
                    _ => None,
                },
                Node::Add(n) if chain.iter().all(|s| !matches!(s, After::Add(_))) => {
                    // The skip must exist already: computed before the conv.
                    let other = n.inputs.iter().find(|a| a.name != last);
                    match other {
                        Some(a)
                            if a.value().is_none()
                                && self.producer.get(&a.name).is_none_or(|&p| p < i) =>
                        {
                            self.slot.get(&a.name).map(|&s| After::Add(s))
                        }
                        _ => None,
                    }
                }
                _ => None,
            };
            let Some(step) = step else { break };
            if matches!(step, After::Act(_)) && chain.iter().any(|s| matches!(s, After::Act(_))) {
                break;
            }
            chain.push(step);
            fused.insert(j);
            at = j;
            last = next.outputs()[0].name.clone();
        }
        let out = self.var(&last);
        Ok(Unit {
            conv,
            bn,
            folded,
            chain,
            x,
            out,
        })
    }

    fn op(&mut self, node: &Node) -> R<Op> {
        let ins = node.inputs();
        let arg = |b: &mut Builder, k: usize| -> R<Ref> {
            let a = ins.get(k).ok_or_else(|| format!("input {k} missing"))?;
            b.input(a, "input")
        };
        Ok(match node {
            Node::BatchNormalization(n) => {
                let x = arg(self, 0)?;
                let get =
                    |b: &Builder, k: usize| b.static_f32(&n.inputs[k], "batch norm parameter");
                let (gamma, beta, mean, var) =
                    (get(self, 1)?, get(self, 2)?, get(self, 3)?, get(self, 4)?);
                let eps = match &n.config {
                    onnx_ir::node::batch_norm::BatchNormConfig::Static(s) => s.epsilon,
                    onnx_ir::node::batch_norm::BatchNormConfig::Runtime(r) => r.epsilon,
                };
                let (scale, shift) = BnParams {
                    gamma: &gamma,
                    beta: &beta,
                    mean: &mean,
                    var: &var,
                    eps,
                }
                .scale_shift();
                let a = Arc::new(Affine {
                    scale: Arc::new(scale),
                    shift: Arc::new(shift),
                    act: Act::None,
                });
                Op::Affine(x, a, self.out(node, 0)?)
            }
            Node::Relu(_) => Op::Unary(arg(self, 0)?, Unary::Relu, self.out(node, 0)?),
            Node::Sigmoid(_) => Op::Unary(arg(self, 0)?, Unary::Sigmoid, self.out(node, 0)?),
            Node::HardSwish(_) => Op::Unary(arg(self, 0)?, Unary::HardSwish, self.out(node, 0)?),
            Node::HardSigmoid(n) => Op::Unary(
                arg(self, 0)?,
                Unary::HardSigmoid(n.config.alpha as f32, n.config.beta as f32),
                self.out(node, 0)?,
            ),
            Node::Clip(n) => {
                let bound = |b: &Builder,
                             c: &Option<onnx_ir::node::clip::ClipInput>,
                             dflt: f32|
                 -> R<f32> {
                    match c {
                        None => Ok(dflt),
                        Some(onnx_ir::node::clip::ClipInput::Static(v)) => Ok(*v as f32),
                        Some(onnx_ir::node::clip::ClipInput::Runtime(r)) => b
                            .static_f32(&n.inputs[r.input_index], "clip bound")
                            .map(|v| v.first().copied().unwrap_or(dflt)),
                    }
                };
                let lo = bound(self, &n.config.min, f32::NEG_INFINITY)?;
                let hi = bound(self, &n.config.max, f32::INFINITY)?;
                Op::Unary(arg(self, 0)?, Unary::Clip(lo, hi), self.out(node, 0)?)
            }
            Node::Add(_) | Node::Sub(_) | Node::Mul(_) | Node::Div(_) => {
                let f = match node {
                    Node::Add(_) => Bin::Add,
                    Node::Sub(_) => Bin::Sub,
                    Node::Mul(_) => Bin::Mul,
                    _ => Bin::Div,
                };
                Op::Binary(arg(self, 0)?, arg(self, 1)?, f, self.out(node, 0)?)
            }
            Node::GlobalAveragePool(_) => Op::GlobalAvgPool(arg(self, 0)?, self.out(node, 0)?),
            Node::AveragePool2d(n) => {
                let c = &n.config;
                let (t, l, b, r) = pads(&c.padding);
                let o = AvgPoolOptions::new(c.kernel_size)
                    .with_stride(c.strides)
                    .with_padding_pairs([(t, b), (l, r)])
                    .with_count_include_pad(c.count_include_pad)
                    .with_ceil_mode(c.ceil_mode);
                Op::AvgPool(arg(self, 0)?, o, self.out(node, 0)?)
            }
            Node::MaxPool2d(n) => {
                let c = &n.config;
                let (t, l, b, r) = pads(&c.padding);
                let o = MaxPoolOptions::new(c.kernel_size)
                    .with_stride(c.strides)
                    .with_padding_pairs([(t, b), (l, r)])
                    .with_dilation(c.dilation)
                    .with_ceil_mode(c.ceil_mode);
                Op::MaxPool(arg(self, 0)?, o, self.out(node, 0)?)
            }
            Node::Gemm(n) => {
                if n.config.trans_a != 0 {
                    return Err("Gemm with transA is not supported".into());
                }
                let c = if ins.len() > 2 && (ins[2].value().is_some() || !ins[2].name.is_empty()) {
                    Some(arg(self, 2)?)
                } else {
                    None
                };
                Op::Gemm {
                    a: arg(self, 0)?,
                    b: arg(self, 1)?,
                    trans_b: n.config.trans_b != 0,
                    c,
                    alpha: n.config.alpha,
                    beta: n.config.beta,
                    out: self.out(node, 0)?,
                }
            }
            Node::MatMul(_) => Op::Gemm {
                a: arg(self, 0)?,
                b: arg(self, 1)?,
                trans_b: false,
                c: None,
                alpha: 1.0,
                beta: 0.0,
                out: self.out(node, 0)?,
            },
            Node::Flatten(n) => Op::Flatten(arg(self, 0)?, n.config.axis, self.out(node, 0)?),
            Node::Reshape(n) => {
                let to = match &n.config.shape {
                    onnx_ir::node::reshape::ReshapeInput::Static(v) => ReshapeTo::Static(v.clone()),
                    onnx_ir::node::reshape::ReshapeInput::Runtime(r) => {
                        ReshapeTo::Runtime(arg(self, r.input_index)?)
                    }
                };
                Op::Reshape(arg(self, 0)?, to, self.out(node, 0)?)
            }
            Node::Concat(n) => {
                let xs = (0..ins.len())
                    .map(|k| arg(self, k))
                    .collect::<R<Vec<_>>>()?;
                Op::Concat(xs, n.config.axis, self.out(node, 0)?)
            }
            Node::Split(n) => {
                let outs = (0..node.outputs().len())
                    .map(|k| self.out(node, k))
                    .collect::<R<Vec<_>>>()?;
                let sizes = match &n.config.split_sizes {
                    Some(onnx_ir::node::split::SplitSizesInput::Static(v)) => v.clone(),
                    Some(onnx_ir::node::split::SplitSizesInput::Runtime(r)) => {
                        let d = n.inputs[r.input_index]
                            .value()
                            .ok_or("split sizes must be constant")?;
                        d.to_i64_vec()
                            .map_err(|e| format!("split sizes: {e:?}"))?
                            .into_iter()
                            .map(|v| v as usize)
                            .collect()
                    }
                    None => Vec::new(),
                };
                let _ = n.config.split_size;
                Op::Split(arg(self, 0)?, n.config.axis, sizes, outs)
            }
            Node::Transpose(n) => {
                let perm = n.config.perm.iter().map(|&p| p as usize).collect();
                Op::Transpose(arg(self, 0)?, perm, self.out(node, 0)?)
            }
            Node::Pad(n) => {
                use onnx_ir::node::pad::{ConstantValueInput, PadInput, PadMode};
                if !matches!(n.config.mode, PadMode::Constant) {
                    return Err(format!(
                        "Pad mode {:?} is not supported (constant only)",
                        n.config.mode
                    ));
                }
                let PadInput::Static(p) = &n.config.pads else {
                    return Err("Pad with runtime pads is not supported".into());
                };
                let v = match n.config.constant_value {
                    ConstantValueInput::Static(v) => v,
                    ConstantValueInput::Runtime(_) => {
                        return Err("Pad with a runtime value is not supported".into());
                    }
                };
                Op::Pad(arg(self, 0)?, p.clone(), v, self.out(node, 0)?)
            }
            Node::Squeeze(n) => {
                let axes = match &n.config.axes {
                    None => None,
                    Some(onnx_ir::node::squeeze::SqueezeInput::Static(v)) => Some(v.clone()),
                    Some(onnx_ir::node::squeeze::SqueezeInput::Runtime(r)) => Some(
                        n.inputs[r.input_index]
                            .value()
                            .ok_or("squeeze axes must be constant")?
                            .to_i64_vec()
                            .map_err(|e| format!("{e:?}"))?,
                    ),
                };
                Op::Squeeze(arg(self, 0)?, axes, self.out(node, 0)?)
            }
            Node::Unsqueeze(n) => {
                let axes = match &n.config {
                    onnx_ir::node::unsqueeze::UnsqueezeConfig::Static(v) => v.clone(),
                    onnx_ir::node::unsqueeze::UnsqueezeConfig::Runtime(r) => n.inputs
                        [r.input_index]
                        .value()
                        .ok_or("unsqueeze axes must be constant")?
                        .to_i64_vec()
                        .map_err(|e| format!("{e:?}"))?,
                };
                Op::Unsqueeze(arg(self, 0)?, axes, self.out(node, 0)?)
            }
            Node::ReduceMean(n) => {
                let axes = match &n.config.axes {
                    onnx_ir::node::reduce::ReduceAxes::Static(v) => v.clone(),
                    onnx_ir::node::reduce::ReduceAxes::Runtime(_) => {
                        return Err("ReduceMean with runtime axes is not supported".into());
                    }
                };
                Op::ReduceMean(arg(self, 0)?, axes, n.config.keepdims, self.out(node, 0)?)
            }
            Node::Softmax(n) => Op::Softmax(arg(self, 0)?, n.config.axis, self.out(node, 0)?),
            Node::Lrn(n) => Op::Lrn(
                arg(self, 0)?,
                n.config.size as usize,
                n.config.alpha as f64,
                n.config.beta as f64,
                n.config.bias as f64,
                self.out(node, 0)?,
            ),
            Node::Dropout(_) | Node::Identity(_) => Op::Pass(arg(self, 0)?, self.out(node, 0)?),
            Node::Cast(_) => Op::Pass(arg(self, 0)?, self.out(node, 0)?),
            Node::Constant(n) => {
                let v = n
                    .outputs
                    .first()
                    .and_then(|o| o.value())
                    .or_else(|| n.inputs.first().and_then(|a| a.value()));
                let r = self.constant(v.ok_or("a Constant without a value")?, "constant")?;
                Op::Pass(r, self.out(node, 0)?)
            }
            Node::Shape(n) => Op::Shape(
                arg(self, 0)?,
                n.config.start,
                n.config.end,
                self.out(node, 0)?,
            ),
            Node::Gather(n) => {
                if n.config.axis != 0 {
                    return Err("Gather is supported on shapes only (axis 0)".into());
                }
                Op::Gather(arg(self, 0)?, arg(self, 1)?, self.out(node, 0)?)
            }
            Node::Slice(n) => {
                use onnx_ir::node::slice::SliceInput;
                let get = |b: &mut Builder, s: &SliceInput| -> R<IntsArg> {
                    Ok(match s {
                        SliceInput::Static(v) => IntsArg::Static(v.clone()),
                        SliceInput::Runtime(r) => {
                            IntsArg::Runtime(b.input(&n.inputs[r.input_index], "slice bound")?)
                        }
                    })
                };
                let bounds = Bounds {
                    starts: get(self, &n.config.starts)?,
                    ends: get(self, &n.config.ends)?,
                    axes: n.config.axes.as_ref().map(|a| get(self, a)).transpose()?,
                    steps: n.config.steps.as_ref().map(|a| get(self, a)).transpose()?,
                };
                Op::Slice(arg(self, 0)?, bounds, self.out(node, 0)?)
            }
            Node::Linear(n) => {
                let c = if ins.len() > 2 && (ins[2].value().is_some() || !ins[2].name.is_empty()) {
                    Some(arg(self, 2)?)
                } else {
                    None
                };
                Op::Gemm {
                    a: arg(self, 0)?,
                    b: arg(self, 1)?,
                    trans_b: n.config.transpose_weight,
                    c,
                    alpha: 1.0,
                    beta: 1.0,
                    out: self.out(node, 0)?,
                }
            }
            _ => return Err("unsupported".into()),
        })
    }
}

fn pads(p: &PaddingConfig2d) -> (usize, usize, usize, usize) {
    match p {
        PaddingConfig2d::Valid => (0, 0, 0, 0),
        PaddingConfig2d::Explicit(t, l, b, r) => (*t, *l, *b, *r),
    }
}

// ---------------------------------------------------------------------------------------------
// Running it

fn unary(t: Tensor<5>, f: Unary) -> Tensor<5> {
    match f {
        Unary::Relu => burn::tensor::activation::relu(t),
        Unary::Sigmoid => burn::tensor::activation::sigmoid(t),
        Unary::Clip(lo, hi) => t.clamp(lo, hi),
        Unary::HardSigmoid(a, b) => t.mul_scalar(a).add_scalar(b).clamp(0.0, 1.0),
        Unary::HardSwish => t.clone() * t.add_scalar(3.0).clamp(0.0, 6.0).div_scalar(6.0),
    }
}

fn broadcast(a: &[usize], b: &[usize]) -> R<Vec<usize>> {
    let n = a.len().max(b.len());
    let get = |d: &[usize], i: usize| {
        if i + d.len() >= n {
            d[i + d.len() - n]
        } else {
            1
        }
    };
    (0..n)
        .map(|i| {
            let (x, y) = (get(a, i), get(b, i));
            if x == y || y == 1 {
                Ok(x)
            } else if x == 1 {
                Ok(y)
            } else {
                Err(format!("shapes {a:?} and {b:?} do not broadcast"))
            }
        })
        .collect()
}

fn axis5(axis: usize, rank: usize) -> usize {
    axis + 5 - rank
}

/// Resolves a reshape target against `dims` (0: keep, -1: infer).
fn resolve_shape(target: &[i64], dims: &[usize]) -> R<Vec<usize>> {
    let total: usize = dims.iter().product();
    let mut out: Vec<usize> = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            0 => out.push(*dims.get(i).ok_or("reshape: 0 beyond the input's rank")?),
            -1 => {
                infer = Some(i);
                out.push(1);
            }
            t if t > 0 => out.push(t as usize),
            t => return Err(format!("reshape: invalid dimension {t}")),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {dims:?} to {target:?}"));
        }
        out[i] = total / known;
    }
    Ok(out)
}

impl Interpreter {
    fn get(&self, vals: &mut [Option<Val>], left: &mut [u32], r: Ref) -> R<Val> {
        match r {
            Ref::Var(s) => {
                left[s] = left[s].saturating_sub(1);
                let v = if left[s] == 0 {
                    vals[s].take()
                } else {
                    vals[s].clone()
                };
                v.ok_or_else(|| "a value is used before it is computed".into())
            }
            Ref::Const(c) => Ok(self.consts[c].clone()),
        }
    }

    fn run(&self, x: Tensor<4>, tap: &mut dyn Tap) -> R<Tensor<2>> {
        let mut vals: Vec<Option<Val>> = vec![None; self.slots];
        let mut left = self.reads.clone();
        vals[self.input] = Some(Val::from4(x));
        for op in &self.ops {
            match op {
                Op::Unit(u) => {
                    let x = self
                        .get(&mut vals, &mut left, Ref::Var(u.x))?
                        .t4("conv input")?;
                    let y = if tap.wants(&u.conv.name) {
                        let mut z = tap.conv(&u.conv, x);
                        if let Some(bn) = &u.bn {
                            z = bn.forward(z, None);
                        }
                        for s in &u.chain {
                            z = match *s {
                                After::Act(Act::Relu) => burn::tensor::activation::relu(z),
                                After::Act(Act::Relu6) => z.clamp(0.0, 6.0),
                                After::Act(Act::None) => z,
                                After::Add(skip) => {
                                    z + self
                                        .get(&mut vals, &mut left, Ref::Var(skip))?
                                        .t4("skip")?
                                }
                            };
                        }
                        z
                    } else {
                        let (act, residual) = match u.chain.as_slice() {
                            [] => (Act::None, None),
                            [After::Act(a)] => (*a, None),
                            [After::Add(s)] => (Act::None, Some((*s, Join::AfterAct))),
                            [After::Add(s), After::Act(a)] => (*a, Some((*s, Join::BeforeAct))),
                            [After::Act(a), After::Add(s)] => (*a, Some((*s, Join::AfterAct))),
                            _ => return Err("a fused chain longer than two steps".into()),
                        };
                        let op = Arc::new(FrozenConv {
                            act,
                            ..(*u.folded).clone()
                        });
                        let r = match residual {
                            Some((s, j)) => {
                                Some((self.get(&mut vals, &mut left, Ref::Var(s))?.t4("skip")?, j))
                            }
                            None => None,
                        };
                        op.forward(x, r)
                    };
                    vals[u.out] = Some(Val::from4(y));
                }
                Op::Affine(x, a, out) => {
                    let x = self.get(&mut vals, &mut left, *x)?.t4("batch norm input")?;
                    vals[*out] = Some(Val::from4(a.forward(x, None)));
                }
                Op::Unary(x, f, out) => {
                    let (t, d) = self.get(&mut vals, &mut left, *x)?.float("activation")?;
                    vals[*out] = Some(Val::f(unary(t, *f), d));
                }
                Op::Binary(a, b, f, out) => {
                    let (va, vb) = (
                        self.get(&mut vals, &mut left, *a)?,
                        self.get(&mut vals, &mut left, *b)?,
                    );
                    vals[*out] = Some(match (va, vb) {
                        (Val::I(x), Val::I(y)) => {
                            let n = x.len().max(y.len());
                            let at = |v: &[i64], i: usize| v[if v.len() == 1 { 0 } else { i }];
                            Val::I(
                                (0..n)
                                    .map(|i| match f {
                                        Bin::Add => at(&x, i) + at(&y, i),
                                        Bin::Sub => at(&x, i) - at(&y, i),
                                        Bin::Mul => at(&x, i) * at(&y, i),
                                        Bin::Div => {
                                            if at(&y, i) == 0 {
                                                0
                                            } else {
                                                at(&x, i) / at(&y, i)
                                            }
                                        }
                                    })
                                    .collect(),
                            )
                        }
                        (Val::F(x, dx), Val::F(y, dy)) => {
                            let d = broadcast(&dx, &dy)?;
                            let t = match f {
                                Bin::Add => x + y,
                                Bin::Sub => x - y,
                                Bin::Mul => x * y,
                                Bin::Div => x / y,
                            };
                            Val::f(t, d)
                        }
                        _ => return Err("arithmetic between a shape and a float tensor".into()),
                    });
                }
                Op::GlobalAvgPool(x, out) => {
                    let x = self
                        .get(&mut vals, &mut left, *x)?
                        .t4("global average pool")?;
                    vals[*out] = Some(Val::from4(adaptive_avg_pool2d(x, [1, 1])));
                }
                Op::AvgPool(x, o, out) => {
                    let x = self.get(&mut vals, &mut left, *x)?.t4("average pool")?;
                    vals[*out] = Some(Val::from4(avg_pool2d(x, o.clone())));
                }
                Op::MaxPool(x, o, out) => {
                    let x = self.get(&mut vals, &mut left, *x)?.t4("max pool")?;
                    vals[*out] = Some(Val::from4(max_pool2d(x, o.clone())));
                }
                Op::Gemm {
                    a,
                    b,
                    trans_b,
                    c,
                    alpha,
                    beta,
                    out,
                } => {
                    let a = self.get(&mut vals, &mut left, *a)?.t2("Gemm A")?;
                    let b = self.get(&mut vals, &mut left, *b)?.t2("Gemm B")?;
                    let b = if *trans_b { b.transpose() } else { b };
                    let mut y = a.matmul(b);
                    if *alpha != 1.0 {
                        y = y.mul_scalar(*alpha);
                    }
                    if let Some(c) = c {
                        let (ct, cd) = self.get(&mut vals, &mut left, *c)?.float("Gemm C")?;
                        let [m, n] = y.dims();
                        broadcast(&[m, n], &cd)?;
                        let ct = ct.reshape(pad5(&cd));
                        let y5 = y.reshape([1, 1, 1, m, n]) + ct.mul_scalar(*beta);
                        y = y5.reshape([m, n]);
                    }
                    vals[*out] = Some(Val::from2(y));
                }
                Op::Flatten(x, axis, out) => {
                    let v = self.get(&mut vals, &mut left, *x)?;
                    let d = v.dims();
                    let a: usize = d[..*axis].iter().product();
                    let b: usize = d[*axis..].iter().product();
                    vals[*out] = Some(v.reshaped(vec![a, b])?);
                }
                Op::Reshape(x, to, out) => {
                    let v = self.get(&mut vals, &mut left, *x)?;
                    let target = match to {
                        ReshapeTo::Static(t) => t.clone(),
                        ReshapeTo::Runtime(r) => {
                            self.get(&mut vals, &mut left, *r)?.ints("reshape target")?
                        }
                    };
                    let dims = resolve_shape(&target, &v.dims())?;
                    vals[*out] = Some(v.reshaped(dims)?);
                }
                Op::Concat(xs, axis, out) => {
                    let vs = xs
                        .iter()
                        .map(|r| self.get(&mut vals, &mut left, *r))
                        .collect::<R<Vec<_>>>()?;
                    vals[*out] = Some(if vs.iter().all(|v| matches!(v, Val::I(_))) {
                        Val::I(
                            vs.into_iter()
                                .flat_map(|v| v.ints("concat").unwrap_or_default())
                                .collect(),
                        )
                    } else {
                        let mut ts = Vec::new();
                        let mut dims = None;
                        let mut sum = 0;
                        for v in vs {
                            let (t, d) = v.float("concat")?;
                            sum += d[*axis];
                            dims.get_or_insert(d.clone());
                            ts.push(t);
                        }
                        let mut d = dims.ok_or("concat of nothing")?;
                        let a5 = axis5(*axis, d.len());
                        d[*axis] = sum;
                        Val::f(Tensor::cat(ts, a5), d)
                    });
                }
                Op::Split(x, axis, sizes, outs) => {
                    let (t, d) = self.get(&mut vals, &mut left, *x)?.float("split")?;
                    let n = outs.len();
                    let sizes: Vec<usize> = if sizes.is_empty() {
                        let per = d[*axis].div_ceil(n);
                        (0..n)
                            .map(|i| per.min(d[*axis].saturating_sub(i * per)))
                            .collect()
                    } else {
                        sizes.clone()
                    };
                    let a5 = axis5(*axis, d.len());
                    let mut start = 0;
                    for (k, &s) in sizes.iter().enumerate() {
                        let part = t.clone().narrow(a5, start, s);
                        let mut dk = d.clone();
                        dk[*axis] = s;
                        vals[outs[k]] = Some(Val::f(part, dk));
                        start += s;
                    }
                }
                Op::Transpose(x, perm, out) => {
                    let (t, d) = self.get(&mut vals, &mut left, *x)?.float("transpose")?;
                    let r = d.len();
                    let off = 5 - r;
                    let mut p5 = [0, 1, 2, 3, 4];
                    for (i, &p) in perm.iter().enumerate() {
                        p5[off + i] = off + p;
                    }
                    let nd: Vec<usize> = perm.iter().map(|&p| d[p]).collect();
                    vals[*out] = Some(Val::f(t.permute(p5), nd));
                }
                Op::Pad(x, p, value, out) => {
                    let (mut t, mut d) = self.get(&mut vals, &mut left, *x)?.float("pad")?;
                    let off = 5 - d.len();
                    for (axis, &(lo, hi)) in p.iter().enumerate() {
                        for (n, front) in [(lo, true), (hi, false)] {
                            if n == 0 {
                                continue;
                            }
                            let mut shape = pad5(&d);
                            shape[off + axis] = n;
                            let fill = Tensor::<5>::full(shape, *value, &t.device());
                            t = if front {
                                Tensor::cat(vec![fill, t], off + axis)
                            } else {
                                Tensor::cat(vec![t, fill], off + axis)
                            };
                            d[axis] += n;
                        }
                    }
                    vals[*out] = Some(Val::f(t, d));
                }
                Op::Squeeze(x, axes, out) => {
                    let v = self.get(&mut vals, &mut left, *x)?;
                    let d = v.dims();
                    let r = d.len() as i64;
                    let drop: Vec<usize> = match axes {
                        Some(a) => a
                            .iter()
                            .map(|&a| (if a < 0 { a + r } else { a }) as usize)
                            .collect(),
                        None => (0..d.len()).filter(|&i| d[i] == 1).collect(),
                    };
                    let nd: Vec<usize> = (0..d.len())
                        .filter(|i| !drop.contains(i))
                        .map(|i| d[i])
                        .collect();
                    vals[*out] = Some(match v {
                        Val::I(iv) => Val::I(iv),
                        f => f.reshaped(nd)?,
                    });
                }
                Op::Unsqueeze(x, axes, out) => {
                    let v = self.get(&mut vals, &mut left, *x)?;
                    vals[*out] = Some(match v {
                        Val::I(iv) => Val::I(iv),
                        f => {
                            let mut d = f.dims();
                            let r = (d.len() + axes.len()) as i64;
                            let mut ax: Vec<usize> = axes
                                .iter()
                                .map(|&a| (if a < 0 { a + r } else { a }) as usize)
                                .collect();
                            ax.sort_unstable();
                            for a in ax {
                                d.insert(a.min(d.len()), 1);
                            }
                            f.reshaped(d)?
                        }
                    });
                }
                Op::ReduceMean(x, axes, keep, out) => {
                    let (mut t, d) = self.get(&mut vals, &mut left, *x)?.float("reduce mean")?;
                    for &a in axes {
                        t = t.mean_dim(axis5(a, d.len()));
                    }
                    let mut kd = d.clone();
                    for &a in axes {
                        kd[a] = 1;
                    }
                    let v = Val::f(t, kd.clone());
                    vals[*out] = Some(if *keep {
                        v
                    } else {
                        let nd: Vec<usize> = (0..d.len())
                            .filter(|i| !axes.contains(i))
                            .map(|i| kd[i])
                            .collect();
                        v.reshaped(nd)?
                    });
                }
                Op::Softmax(x, axis, out) => {
                    let (t, d) = self.get(&mut vals, &mut left, *x)?.float("softmax")?;
                    let a5 = axis5(*axis, d.len());
                    vals[*out] = Some(Val::f(burn::tensor::activation::softmax(t, a5), d));
                }
                Op::Lrn(x, size, alpha, beta, k, out) => {
                    let x = self.get(&mut vals, &mut left, *x)?.t4("LRN")?;
                    vals[*out] = Some(Val::from4(lrn(x, *size, *alpha, *beta, *k)));
                }
                Op::Pass(x, out) => {
                    vals[*out] = Some(self.get(&mut vals, &mut left, *x)?);
                }
                Op::Shape(x, start, end, out) => {
                    let d = self.get(&mut vals, &mut left, *x)?.dims();
                    let e = (*end).min(d.len());
                    vals[*out] = Some(Val::I(
                        d[(*start).min(e)..e].iter().map(|&v| v as i64).collect(),
                    ));
                }
                Op::Gather(x, idx, out) => {
                    let v = self.get(&mut vals, &mut left, *x)?.ints("gather")?;
                    let ix = self
                        .get(&mut vals, &mut left, *idx)?
                        .ints("gather indices")?;
                    let n = v.len() as i64;
                    vals[*out] = Some(Val::I(
                        ix.iter()
                            .map(|&i| {
                                v.get((if i < 0 { i + n } else { i }) as usize)
                                    .copied()
                                    .ok_or("gather index out of range")
                            })
                            .collect::<std::result::Result<Vec<_>, _>>()?,
                    ));
                }
                Op::Slice(x, b, out) => {
                    let mut ints = |a: &IntsArg| -> R<Vec<i64>> {
                        match a {
                            IntsArg::Static(v) => Ok(v.clone()),
                            IntsArg::Runtime(r) => {
                                self.get(&mut vals, &mut left, *r)?.ints("slice bound")
                            }
                        }
                    };
                    let (starts, ends) = (ints(&b.starts)?, ints(&b.ends)?);
                    let axes = match &b.axes {
                        Some(a) => ints(a)?,
                        None => (0..starts.len() as i64).collect(),
                    };
                    if let Some(st) = &b.steps
                        && ints(st)?.iter().any(|&s| s != 1)
                    {
                        return Err("Slice with steps other than 1 is not supported".into());
                    }
                    let v = self.get(&mut vals, &mut left, *x)?;
                    vals[*out] = Some(match v {
                        Val::I(iv) => {
                            let n = iv.len() as i64;
                            let clamp =
                                |i: i64| (if i < 0 { i + n } else { i }).clamp(0, n) as usize;
                            let (s0, e0) = (clamp(starts[0]), clamp(ends[0]));
                            Val::I(iv[s0..e0.max(s0)].to_vec())
                        }
                        Val::F(mut t, mut d) => {
                            let r = d.len() as i64;
                            for ((&s0, &e0), &a) in starts.iter().zip(&ends).zip(&axes) {
                                let a = (if a < 0 { a + r } else { a }) as usize;
                                let n = d[a] as i64;
                                let clamp =
                                    |i: i64| (if i < 0 { i + n } else { i }).clamp(0, n) as usize;
                                let (lo, hi) = (clamp(s0), clamp(e0).max(clamp(s0)));
                                t = t.narrow(axis5(a, d.len()), lo, hi - lo);
                                d[a] = hi - lo;
                            }
                            Val::f(t, d)
                        }
                    });
                }
            }
        }
        let out = self.get(&mut vals, &mut left, Ref::Var(self.output))?;
        out.t2("the graph's output")
    }
}

impl Network for Interpreter {
    fn forward(&self, x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<2> {
        // The graph was checked at load; an error here is a shape the checks did not foresee.
        self.run(x, tap)
            .unwrap_or_else(|e| panic!("running the ONNX graph failed: {e}"))
    }

    fn convs(&self) -> Vec<&Conv> {
        self.convs.iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_from_exporter_scopes() {
        assert_eq!(module_path("/conv1/Conv").as_deref(), Some("conv1"));
        assert_eq!(
            module_path("/layer1/layer1.0/conv1/Conv").as_deref(),
            Some("layer1.0.conv1")
        );
        assert_eq!(
            module_path("/layer2/layer2.0/downsample/downsample.0/Conv").as_deref(),
            Some("layer2.0.downsample.0")
        );
        assert_eq!(
            module_path("/features/features.0/features.0.0/Conv").as_deref(),
            Some("features.0.0")
        );
        assert_eq!(
            module_path("/trunk_output/block1/block1-0/proj/proj.0/Conv").as_deref(),
            Some("trunk_output.block1.block1-0.proj.0")
        );
        assert_eq!(module_path("Conv_0"), None);
    }

    #[test]
    fn reshape_targets_resolve_zero_and_minus_one() {
        assert_eq!(
            resolve_shape(&[0, 2, -1, 4], &[3, 4, 4, 4]).unwrap(),
            vec![3, 2, 8, 4]
        );
        assert!(resolve_shape(&[-1, 5], &[3, 4]).is_err());
    }
}
