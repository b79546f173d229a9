//! Reshaping, indexing and constants: Flatten, Reshape, Transpose, Concat, Gather, Shape,
//! Unsqueeze, Squeeze, Constant. Integer tensors (shape arithmetic) live on the CPU.

use anyhow::{anyhow, bail, ensure, Result};
use tch::{Device, Kind, Tensor};

use super::{arity, first_computed_only, input, norm_axis, opt_input, NodeInfo, Operator, Relaxed};
use crate::model::onnx::proto::{tensor_from_proto, Attrs};
use crate::util::to_vec_i64;

/// `Flatten` to 2-D around `axis`.
#[derive(Debug)]
pub(super) struct Flatten {
    axis: i64,
}

impl Flatten {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 1, 1)?;
        Ok(Flatten {
            axis: a.int("axis", 1)?,
        })
    }
}

impl Operator for Flatten {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let axis = &self.axis;
        let x = input(inp, 0)?;
        let size = x.size();
        let r = size.len() as i64;
        ensure!(
            (-r..=r).contains(axis),
            "axis {axis} is out of range for rank {r}"
        );
        let axis = if *axis < 0 { axis + r } else { *axis } as usize;
        let outer: i64 = size[..axis].iter().product();
        let inner: i64 = size[axis..].iter().product();
        Ok(x.f_reshape([outer, inner])?)
    }

    fn relax(&self, _: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        ensure!(
            self.axis != 0,
            "Flatten with axis 0 mixes the samples of a batch"
        );
        Ok(Relaxed::Reshape)
    }
}

/// `Reshape` to the shape of the second input.
#[derive(Debug)]
pub(super) struct Reshape {
    allowzero: bool,
    /// The constant target shape starts with the exported batch of 1, which is replaced by
    /// the data's leading size when the graph runs batched (see the module docs of `onnx`).
    batch_rewrite: bool,
}

impl Reshape {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 2, 2)?;
        let allowzero = n.opset >= 14 && a.int("allowzero", 0)? != 0;
        Ok(Reshape {
            allowzero,
            batch_rewrite: false,
        })
    }
}

impl Operator for Reshape {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let x = input(inp, 0)?;
        let mut shape = to_vec_i64(input(inp, 1)?)?;
        if self.batch_rewrite && shape.first() == Some(&1) && x.dim() > 0 {
            shape[0] = x.size()[0];
        }
        if !self.allowzero {
            for (i, s) in shape.iter_mut().enumerate() {
                if *s == 0 {
                    *s = *x.size().get(i).ok_or_else(|| {
                        anyhow!(
                            "shape entry {i} is 0 (copy) but the input has rank {}",
                            x.dim()
                        )
                    })?;
                }
            }
        }
        Ok(x.f_reshape(&shape)?)
    }

    fn relax(&self, _: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        Ok(Relaxed::Reshape)
    }

    fn set_batch_rewrite(&mut self, on: bool) -> bool {
        self.batch_rewrite = on;
        true
    }
}

/// `Transpose` (default: reverse the dimensions).
#[derive(Debug)]
pub(super) struct Transpose {
    perm: Option<Vec<i64>>,
}

impl Transpose {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 1, 1)?;
        Ok(Transpose {
            perm: a.ints("perm")?,
        })
    }
}

impl Operator for Transpose {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let x = input(inp, 0)?;
        let perm = self
            .perm
            .clone()
            .unwrap_or_else(|| (0..x.dim() as i64).rev().collect());
        Ok(x.f_permute(&perm)?)
    }
}

/// `Concat` along `axis`, on the device of any non-CPU input.
#[derive(Debug)]
pub(super) struct Concat {
    axis: i64,
}

impl Concat {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        ensure!(n.n_in >= 1, "has no inputs");
        Ok(Concat {
            axis: a
                .opt_int("axis")?
                .ok_or_else(|| anyhow!("axis is required"))?,
        })
    }
}

impl Operator for Concat {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let ts: Vec<&Tensor> = inp.iter().flatten().copied().collect();
        let device = ts
            .iter()
            .map(|t| t.device())
            .find(|d| *d != Device::Cpu)
            .unwrap_or(Device::Cpu);
        let ts = ts
            .iter()
            .map(|t| t.f_to_device(device))
            .collect::<Result<Vec<_>, _>>()?;
        let rank = ts.first().map_or(0, |t| t.dim());
        Ok(Tensor::f_cat(
            &ts,
            norm_axis(self.axis, rank, "axis")? as i64,
        )?)
    }
}

/// `Gather` along `axis`; negative indices count from the end.
#[derive(Debug)]
pub(super) struct Gather {
    axis: i64,
}

impl Gather {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 2, 2)?;
        Ok(Gather {
            axis: a.int("axis", 0)?,
        })
    }
}

impl Operator for Gather {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let (data, idx) = (input(inp, 0)?, input(inp, 1)?);
        let axis = norm_axis(self.axis, data.dim(), "axis")?;
        let n = data.size()[axis];
        let idx = idx.f_to_kind(Kind::Int64)?.f_to_device(data.device())?;
        let idx = idx.f_where_self(&idx.f_ge(0)?, &idx.f_add_scalar(n)?)?;
        let mut shape = data.size()[..axis].to_vec();
        shape.extend(idx.size());
        shape.extend_from_slice(&data.size()[axis + 1..]);
        Ok(data
            .f_index_select(axis as i64, &idx.f_reshape([-1])?)?
            .f_reshape(&shape)?)
    }
}

/// `Shape`, optionally sliced (`start`/`end`, opset 15).
#[derive(Debug)]
pub(super) struct Shape {
    start: i64,
    end: Option<i64>,
}

impl Shape {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 1, 1)?;
        let (start, end) = if n.opset >= 15 {
            (a.int("start", 0)?, a.opt_int("end")?)
        } else {
            (0, None)
        };
        Ok(Shape { start, end })
    }
}

impl Operator for Shape {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let size = input(inp, 0)?.size();
        let r = size.len() as i64;
        let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let (s, e) = (clampi(self.start), clampi(self.end.unwrap_or(r)));
        Ok(Tensor::from_slice(&size[s..e.max(s)]))
    }

    fn relax(&self, _: &[Option<&Tensor>], _: &[bool]) -> Result<Relaxed> {
        Ok(Relaxed::Static)
    }
}

/// The axes of Unsqueeze and Squeeze: from the attribute (opset < 13), else the second input.
fn parse_axes(a: &mut Attrs, n: &NodeInfo) -> Result<Option<Vec<i64>>> {
    Ok(if n.opset < 13 {
        arity(n.n_in, 1, 1)?;
        let axes = a.ints("axes")?;
        ensure!(axes.is_some() || n.op_type == "Squeeze", "axes is required");
        axes
    } else {
        arity(n.n_in, if n.op_type == "Unsqueeze" { 2 } else { 1 }, 2)?;
        None
    })
}

/// `Unsqueeze`: inserts dimensions of size 1.
#[derive(Debug)]
pub(super) struct Unsqueeze {
    axes: Option<Vec<i64>>,
}

impl Unsqueeze {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        Ok(Unsqueeze {
            axes: parse_axes(a, n)?,
        })
    }
}

impl Operator for Unsqueeze {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let mut x = input(inp, 0)?.shallow_clone();
        let axes = match &self.axes {
            Some(a) => a.clone(),
            None => to_vec_i64(input(inp, 1)?)?,
        };
        let out_rank = x.dim() + axes.len();
        let mut axes = axes
            .iter()
            .map(|a| norm_axis(*a, out_rank, "axes"))
            .collect::<Result<Vec<_>>>()?;
        axes.sort_unstable();
        for a in axes {
            x = x.f_unsqueeze(a as i64)?;
        }
        Ok(x)
    }

    fn relax(&self, _: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        Ok(Relaxed::Reshape)
    }
}

/// `Squeeze`: removes the given dimensions of size 1 (all of them without axes).
#[derive(Debug)]
pub(super) struct Squeeze {
    axes: Option<Vec<i64>>,
}

impl Squeeze {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        Ok(Squeeze {
            axes: parse_axes(a, n)?,
        })
    }
}

impl Operator for Squeeze {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let x = input(inp, 0)?;
        let axes = match (&self.axes, opt_input(inp, 1)) {
            (Some(a), _) => a.clone(),
            (None, Some(t)) => to_vec_i64(t)?,
            (None, None) => return Ok(x.f_squeeze()?),
        };
        let mut axes = axes
            .iter()
            .map(|a| norm_axis(*a, x.dim(), "axes"))
            .collect::<Result<Vec<_>>>()?;
        axes.sort_unstable_by(|a, b| b.cmp(a));
        let mut y = x.shallow_clone();
        for a in axes {
            ensure!(
                x.size()[a] == 1,
                "cannot squeeze axis {a} of shape {:?}",
                x.size()
            );
            y = y.f_squeeze_dim(a as i64)?;
        }
        Ok(y)
    }

    fn relax(&self, _: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        Ok(Relaxed::Reshape)
    }
}

/// `Constant`: a fixed tensor, folded at load.
#[derive(Debug)]
pub(super) struct Constant(Tensor);

impl Constant {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 0, 0)?;
        let t = if let Some(t) = a.tensor("value")? {
            tensor_from_proto(t)?
        } else if let Some(v) = a.opt_float("value_float")? {
            Tensor::from(v as f32)
        } else if let Some(v) = a.floats("value_floats")? {
            Tensor::from_slice(&v)
        } else if let Some(v) = a.opt_int("value_int")? {
            Tensor::from(v)
        } else if let Some(v) = a.ints("value_ints")? {
            Tensor::from_slice(&v)
        } else {
            bail!("needs one of value, value_float(s), value_int(s)")
        };
        Ok(Constant(t))
    }
}

impl Operator for Constant {
    fn run(&self, _inp: &[Option<&Tensor>]) -> Result<Tensor> {
        Ok(self.0.shallow_clone())
    }

    fn is_constant(&self) -> bool {
        true
    }
}
