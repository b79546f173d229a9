//! Convolution, pooling, BatchNormalization and Pad, with the ONNX padding rules they share.

use anyhow::{anyhow, bail, ensure, Result};
use tch::Tensor;

use tch::Kind;

use super::{arity, first_computed_only, input, norm_axis, opt_input, NodeInfo, Operator, Relaxed};
use crate::certify::graph as bound;
use crate::certify::Layer;
use crate::model::onnx::proto::Attrs;
use crate::util::to_vec_i64;

#[derive(Debug, Clone, Copy, PartialEq)]
enum AutoPad {
    NotSet,
    Valid,
    SameUpper,
    SameLower,
}

/// `pads`/`auto_pad` of Conv and the pools, resolved against the input size at run time.
#[derive(Debug)]
struct Padding {
    auto: AutoPad,
    /// ONNX order: all begins, then all ends.
    pads: Option<Vec<i64>>,
}

impl Padding {
    fn parse(a: &mut Attrs) -> Result<Padding> {
        let auto = match a.string("auto_pad")?.as_deref() {
            None | Some("NOTSET") => AutoPad::NotSet,
            Some("VALID") => AutoPad::Valid,
            Some("SAME_UPPER") => AutoPad::SameUpper,
            Some("SAME_LOWER") => AutoPad::SameLower,
            Some(other) => bail!("auto_pad {other:?} is not supported"),
        };
        let pads = a.ints("pads")?;
        if let Some(p) = &pads {
            ensure!(p.len() % 2 == 0, "pads {p:?} must have an even length");
            ensure!(p.iter().all(|v| *v >= 0), "negative pads {p:?}");
        }
        Ok(Padding { auto, pads })
    }

    /// ONNX leaves SAME padding with dilations ambiguous (onnxruntime refuses it): so do we.
    fn check_dilations(&self, dilations: Option<&[i64]>) -> Result<()> {
        let dilated = dilations.is_some_and(|d| d.iter().any(|d| *d != 1));
        ensure!(
            !(dilated && matches!(self.auto, AutoPad::SameUpper | AutoPad::SameLower)),
            "auto_pad SAME_UPPER/SAME_LOWER with dilations is not supported"
        );
        Ok(())
    }

    /// Begin and end pads of every spatial dimension of `x`.
    fn resolve(
        &self,
        x: &Tensor,
        kernel: &[i64],
        strides: &[i64],
        dil: &[i64],
    ) -> Result<(Vec<i64>, Vec<i64>)> {
        let k = kernel.len();
        ensure!(
            strides.len() == k && dil.len() == k,
            "strides {strides:?} / dilations {dil:?} do not match kernel {kernel:?}"
        );
        let size = x.size();
        let spatial = &size[size.len().saturating_sub(k)..];
        Ok(match self.auto {
            AutoPad::NotSet => match &self.pads {
                Some(p) => {
                    ensure!(
                        p.len() == 2 * k,
                        "pads {p:?} do not match kernel {kernel:?}"
                    );
                    (p[..k].to_vec(), p[k..].to_vec())
                }
                None => (vec![0; k], vec![0; k]),
            },
            AutoPad::Valid => (vec![0; k], vec![0; k]),
            AutoPad::SameUpper | AutoPad::SameLower => {
                let mut b = Vec::with_capacity(k);
                let mut e = Vec::with_capacity(k);
                for i in 0..k {
                    let out = (spatial[i] + strides[i] - 1) / strides[i];
                    let need = (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial[i];
                    let total = need.max(0);
                    let (small, big) = (total / 2, total - total / 2);
                    if self.auto == AutoPad::SameUpper {
                        b.push(small);
                        e.push(big);
                    } else {
                        b.push(big);
                        e.push(small);
                    }
                }
                (b, e)
            }
        })
    }

    /// The input and the symmetric padding to hand to libtorch: pads that libtorch cannot
    /// express (asymmetric, or more than half the window) are applied first with `pad_fn`.
    fn apply(
        &self,
        x: &Tensor,
        kernel: &[i64],
        strides: &[i64],
        dil: &[i64],
        pad_fn: impl Fn(&Tensor, &[i64]) -> Result<Tensor, tch::TchError>,
    ) -> Result<(Tensor, Vec<i64>)> {
        let (begin, end) = self.resolve(x, kernel, strides, dil)?;
        if begin == end && fits_torch_padding(&begin, kernel) {
            Ok((x.shallow_clone(), begin))
        } else {
            Ok((pad_fn(x, &torch_pads(&begin, &end))?, vec![0; kernel.len()]))
        }
    }
}

/// libtorch pools accept a padding of at most half the kernel.
fn fits_torch_padding(pads: &[i64], kernel: &[i64]) -> bool {
    pads.iter().zip(kernel).all(|(p, k)| 2 * p <= *k)
}

/// ONNX pads (begins, then ends; first dimension first) in libtorch's order (last dimension
/// first, begin and end pairs).
fn torch_pads(begin: &[i64], end: &[i64]) -> Vec<i64> {
    begin
        .iter()
        .zip(end)
        .rev()
        .flat_map(|(b, e)| [*b, *e])
        .collect()
}

/// `Conv`: 1-D to 3-D, grouped, dilated; the kernel shape comes from the weight.
#[derive(Debug)]
pub(super) struct Conv {
    strides: Option<Vec<i64>>,
    pads: Padding,
    dilations: Option<Vec<i64>>,
    group: i64,
}

impl Conv {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 2, 3)?;
        a.ignore("kernel_shape"); // taken from the weight's shape
        let pads = Padding::parse(a)?;
        let dilations = a.ints("dilations")?;
        pads.check_dilations(dilations.as_deref())?;
        Ok(Conv {
            pads,
            strides: a.ints("strides")?,
            dilations,
            group: a.int("group", 1)?,
        })
    }
}

impl Operator for Conv {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let (x, w) = (input(inp, 0)?, input(inp, 1)?);
        ensure!(
            x.dim() == w.dim() && w.dim() >= 3,
            "input {:?} and weight {:?} do not make a convolution",
            x.size(),
            w.size()
        );
        let k = w.dim() - 2;
        let kernel = &w.size()[2..];
        let strides = self.strides.clone().unwrap_or_else(|| vec![1; k]);
        let dil = self.dilations.clone().unwrap_or_else(|| vec![1; k]);
        let (x, padding) = self
            .pads
            .apply(x, kernel, &strides, &dil, |x, p| x.f_constant_pad_nd(p))?;
        Ok(x.f_convolution(
            w,
            opt_input(inp, 2),
            &strides,
            &padding,
            &dil,
            false,
            vec![0; k],
            self.group,
        )?)
    }

    fn relax(&self, ins: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        let (x, w) = (input(ins, 0)?, input(ins, 1)?);
        ensure!(w.dim() == 4, "only 2-D convolutions have a relaxation");
        let kernel = &w.size()[2..];
        let strides = self.strides.clone().unwrap_or_else(|| vec![1; 2]);
        let dil = self.dilations.clone().unwrap_or_else(|| vec![1; 2]);
        let padding = symmetric(self.pads.resolve(x, kernel, &strides, &dil)?)?;
        Ok(Relaxed::Layer(Layer::Conv(bound::Conv {
            weight: w.f_to_kind(Kind::Float)?,
            bias: opt_input(ins, 2).map(|b| b.to_kind(Kind::Float)),
            stride: pair(&strides)?,
            padding,
            dilation: pair(&dil)?,
            groups: self.group,
        })))
    }
}

/// A 2-D attribute as an array.
fn pair(v: &[i64]) -> Result<[i64; 2]> {
    match v {
        [a, b] => Ok([*a, *b]),
        _ => bail!("{v:?} is not 2-D"),
    }
}

/// Begin and end pads that are equal, as the symmetric 2-D padding of a relaxation.
fn symmetric((begin, end): (Vec<i64>, Vec<i64>)) -> Result<[i64; 2]> {
    ensure!(
        begin == end,
        "asymmetric padding (begin {begin:?}, end {end:?}) has no relaxation"
    );
    pair(&begin)
}

/// Window attributes shared by MaxPool and AveragePool.
#[derive(Debug)]
struct Pool {
    kernel: Vec<i64>,
    strides: Option<Vec<i64>>,
    pads: Padding,
    dilations: Option<Vec<i64>>,
    ceil_mode: bool,
}

impl Pool {
    /// `dilations_from`: the first opset with a `dilations` attribute for this pool.
    fn parse(a: &mut Attrs, opset: i64, dilations_from: i64) -> Result<Pool> {
        let kernel = a
            .ints("kernel_shape")?
            .ok_or_else(|| anyhow!("kernel_shape is required"))?;
        ensure!(
            (1..=3).contains(&kernel.len()),
            "{}-D pooling is not supported",
            kernel.len()
        );
        let pads = Padding::parse(a)?;
        if let Some(p) = &pads.pads {
            ensure!(
                p.len() == 2 * kernel.len(),
                "pads {p:?} do not match kernel_shape {kernel:?}"
            );
        }
        let strides = a.ints("strides")?;
        let dilations = if opset >= dilations_from {
            a.ints("dilations")?
        } else {
            None
        };
        let ceil_mode = if opset >= 10 {
            a.int("ceil_mode", 0)? != 0
        } else {
            false
        };
        pads.check_dilations(dilations.as_deref())?;
        for (what, v) in [("strides", &strides), ("dilations", &dilations)] {
            if let Some(v) = v {
                ensure!(
                    v.len() == kernel.len(),
                    "{what} {v:?} do not match kernel_shape {kernel:?}"
                );
            }
        }
        Ok(Pool {
            kernel,
            strides,
            pads,
            dilations,
            ceil_mode,
        })
    }

    /// Strides and dilations with their defaults, after checking the input's rank.
    fn strides_dilations(&self, x: &Tensor) -> Result<(Vec<i64>, Vec<i64>)> {
        let k = self.kernel.len();
        ensure!(
            x.dim() == k + 2,
            "input {:?} does not match kernel_shape {:?}",
            x.size(),
            self.kernel
        );
        Ok((
            self.strides.clone().unwrap_or_else(|| vec![1; k]),
            self.dilations.clone().unwrap_or_else(|| vec![1; k]),
        ))
    }
}

/// `MaxPool` (the Indices output is refused by the graph).
#[derive(Debug)]
pub(super) struct MaxPool(Pool);

impl MaxPool {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 1, 1)?;
        a.ignore("storage_order"); // only changes the Indices output, which is refused
        Ok(MaxPool(Pool::parse(a, n.opset, 10)?))
    }
}

impl Operator for MaxPool {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let p = &self.0;
        let x = input(inp, 0)?;
        let (strides, dil) = p.strides_dilations(x)?;
        let (x, padding) = p.pads.apply(x, &p.kernel, &strides, &dil, |x, pad| {
            x.f_pad(pad, "constant", f64::NEG_INFINITY)
        })?;
        Ok(match p.kernel.len() {
            1 => x.f_max_pool1d(&p.kernel, &strides, &padding, &dil, p.ceil_mode)?,
            2 => x.f_max_pool2d(&p.kernel, &strides, &padding, &dil, p.ceil_mode)?,
            _ => x.f_max_pool3d(&p.kernel, &strides, &padding, &dil, p.ceil_mode)?,
        })
    }

    fn relax(&self, ins: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        let p = &self.0;
        let x = input(ins, 0)?;
        let (strides, dil) = p.strides_dilations(x)?;
        let padding = symmetric(p.pads.resolve(x, &p.kernel, &strides, &dil)?)?;
        ensure!(
            strides == p.kernel && padding == [0, 0] && dil == [1, 1] && !p.ceil_mode,
            "only 2-D max pooling over non-overlapping windows (strides = kernel, no padding, \
             dilation or ceil_mode) has a relaxation"
        );
        Ok(Relaxed::Layer(Layer::MaxPool {
            kernel: pair(&p.kernel)?,
        }))
    }
}

/// `AveragePool`, with or without the padding in the divisor.
#[derive(Debug)]
pub(super) struct AveragePool {
    pool: Pool,
    count_include_pad: bool,
}

impl AveragePool {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 1, 1)?;
        let pool = Pool::parse(a, n.opset, 19)?;
        if let Some(d) = &pool.dilations {
            ensure!(
                d.iter().all(|d| *d == 1),
                "AveragePool dilations {d:?} are not supported"
            );
        }
        Ok(AveragePool {
            pool,
            count_include_pad: a.int("count_include_pad", 0)? != 0,
        })
    }
}

impl Operator for AveragePool {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let (p, count_include_pad) = (&self.pool, self.count_include_pad);
        let x = input(inp, 0)?;
        let (strides, dil) = p.strides_dilations(x)?;
        let (begin, end) = p.pads.resolve(x, &p.kernel, &strides, &dil)?;
        let avg = |t: &Tensor, pad: &[i64], include: bool| -> Result<Tensor> {
            let (k, s, c) = (&p.kernel, &strides, p.ceil_mode);
            // explicit divisor_override None: the divisor is the window (or its valid part)
            Ok(match k.len() {
                1 => t.f_avg_pool1d(k, s, pad, c, include)?,
                2 => t.f_avg_pool2d(k, s, pad, c, include, None)?,
                _ => t.f_avg_pool3d(k, s, pad, c, include, None)?,
            })
        };
        Ok(if begin == end && fits_torch_padding(&begin, &p.kernel) {
            avg(x, &begin, count_include_pad)?
        } else {
            // libtorch takes symmetric pads of at most half the window: pad explicitly.
            let tp = torch_pads(&begin, &end);
            let zeros = vec![0; p.kernel.len()];
            let sum = avg(&x.f_constant_pad_nd(&tp)?, &zeros, true)?;
            if count_include_pad {
                sum
            } else {
                // Same divisor on a padded mask of ones: the ratio counts real pixels only.
                let mut ones = vec![1i64; 2];
                ones.extend_from_slice(&x.size()[2..]);
                let mask = Tensor::f_ones(&ones, (x.kind(), x.device()))?;
                sum.f_div(&avg(&mask.f_constant_pad_nd(&tp)?, &zeros, true)?)?
            }
        })
    }

    fn relax(&self, ins: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        let p = &self.pool;
        let x = input(ins, 0)?;
        let (strides, dil) = p.strides_dilations(x)?;
        let padding = symmetric(p.pads.resolve(x, &p.kernel, &strides, &dil)?)?;
        ensure!(
            !p.ceil_mode && (self.count_include_pad || padding == [0, 0]),
            "average pooling has a relaxation only without ceil_mode and with the padding counted"
        );
        let conv = bound::avg_pool_conv(
            x.size()[1],
            pair(&p.kernel)?,
            pair(&strides)?,
            padding,
            x.device(),
        )?;
        Ok(Relaxed::Layer(Layer::Conv(conv)))
    }
}

/// `GlobalAveragePool` and `GlobalMaxPool`: over every spatial dimension.
#[derive(Debug)]
pub(super) struct GlobalPool {
    max: bool,
}

impl GlobalPool {
    pub(super) fn parse(n: &NodeInfo, max: bool) -> Result<Self> {
        arity(n.n_in, 1, 1)?;
        Ok(GlobalPool { max })
    }
}

impl Operator for GlobalPool {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let x = input(inp, 0)?;
        ensure!(
            x.dim() >= 3,
            "input {:?} has no spatial dimensions",
            x.size()
        );
        let dims: Vec<i64> = (2..x.dim() as i64).collect();
        Ok(if !self.max {
            x.f_mean_dim(dims.as_slice(), true, x.kind())?
        } else {
            x.f_amax(dims.as_slice(), true)?
        })
    }

    fn relax(&self, ins: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        let x = input(ins, 0)?;
        ensure!(
            !self.max && x.dim() == 4,
            "only 2-D global average pooling has a relaxation"
        );
        let s = x.size();
        let conv = bound::avg_pool_conv(s[1], [s[2], s[3]], [1, 1], [0, 0], x.device())?;
        Ok(Relaxed::Layer(Layer::Conv(conv)))
    }
}

/// `BatchNormalization` at inference (running statistics).
#[derive(Debug)]
pub(super) struct BatchNorm {
    eps: f64,
}

impl BatchNorm {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 5, 5)?;
        a.ignore("momentum"); // running statistics are not updated at inference
        if n.opset >= 14 {
            ensure!(
                a.int("training_mode", 0)? == 0,
                "training_mode=1 is not supported (inference only)"
            );
        }
        Ok(BatchNorm {
            eps: a.float("epsilon", 1e-5)?,
        })
    }
}

impl Operator for BatchNorm {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        Ok(input(inp, 0)?.f_batch_norm(
            Some(input(inp, 1)?),
            Some(input(inp, 2)?),
            Some(input(inp, 3)?),
            Some(input(inp, 4)?),
            false,
            0.0,
            self.eps,
            true,
        )?)
    }

    fn relax(&self, ins: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        let rank = input(ins, 0)?.dim() - 1;
        let (scale, shift) = bound::batch_norm_affine(
            Some(input(ins, 1)?),
            Some(input(ins, 2)?),
            input(ins, 3)?,
            input(ins, 4)?,
            self.eps,
            rank,
        )?;
        Ok(Relaxed::Affine(scale, shift))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PadMode {
    Constant,
    Reflect,
    Edge,
}

/// `Pad`: constant, reflect or edge.
#[derive(Debug)]
pub(super) struct Pad {
    mode: PadMode,
    /// Pads and value from attributes (opset < 11), else from inputs.
    legacy: Option<(Vec<i64>, f64)>,
}

impl Pad {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        let mode = match a.string("mode")?.as_deref() {
            None | Some("constant") => PadMode::Constant,
            Some("reflect") => PadMode::Reflect,
            Some("edge") => PadMode::Edge,
            Some(other) => bail!("mode {other:?} is not supported"),
        };
        let legacy = if n.opset < 11 {
            arity(n.n_in, 1, 1)?;
            let pads = a.ints("pads")?.ok_or_else(|| anyhow!("pads is required"))?;
            Some((pads, a.float("value", 0.0)?))
        } else {
            arity(n.n_in, 2, if n.opset >= 18 { 4 } else { 3 })?;
            None
        };
        Ok(Pad { mode, legacy })
    }
}

impl Operator for Pad {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let x = input(inp, 0)?;
        let r = x.dim();
        let (mut pads, value) = match &self.legacy {
            Some((p, v)) => (p.clone(), *v),
            None => (
                to_vec_i64(input(inp, 1)?)?,
                match opt_input(inp, 2) {
                    Some(v) => v.f_double_value(&[])?,
                    None => 0.0,
                },
            ),
        };
        if let Some(axes) = opt_input(inp, 3) {
            let axes = to_vec_i64(axes)?;
            ensure!(
                pads.len() == 2 * axes.len(),
                "pads {pads:?} do not match axes {axes:?}"
            );
            let mut full = vec![0; 2 * r];
            for (j, a) in axes.iter().enumerate() {
                let a = norm_axis(*a, r, "axes")?;
                full[a] = pads[j];
                full[a + r] = pads[j + axes.len()];
            }
            pads = full;
        }
        ensure!(
            pads.len() == 2 * r,
            "pads {pads:?} do not match an input of rank {r}"
        );
        let mut tp = torch_pads(&pads[..r], &pads[r..]);
        // libtorch's reflect/replicate only pad trailing dimensions: drop the leading zero pairs.
        while tp.len() >= 2 && tp[tp.len() - 2..] == [0, 0] {
            tp.truncate(tp.len() - 2);
        }
        if tp.is_empty() {
            return Ok(x.shallow_clone());
        }
        Ok(match self.mode {
            PadMode::Constant => x.f_pad(&tp, "constant", value)?,
            PadMode::Reflect => x.f_pad(&tp, "reflect", None)?,
            PadMode::Edge => x.f_pad(&tp, "replicate", None)?,
        })
    }
}
