//! The bound graph: a network as a DAG of layers that each have a linear relaxation, built
//! from the ONNX interpreter's graph or from a native architecture's layers (through
//! [`crate::model::Classifier::append_bound_graph`]), with the normalisation in front.
//!
//! Nodes are in topological order (every input has a smaller id), node 0 is the pixel input
//! `[C, H, W]` and the last node is the logits `[K]`. Shapes are per sample (no batch axis);
//! every layer is checked when pushed by running it on a zero sample, so the propagation code
//! never meets a shape error.

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// Index of a node in a [`BoundGraph`].
pub type NodeId = usize;

/// A 2-D convolution (also average pooling, as a depthwise convolution with constant weights).
#[derive(Debug)]
pub struct Conv {
    /// `[C_out, C_in / groups, kH, kW]`
    pub weight: Tensor,
    /// `[C_out]`
    pub bias: Option<Tensor>,
    pub stride: [i64; 2],
    pub padding: [i64; 2],
    pub dilation: [i64; 2],
    pub groups: i64,
}

impl Conv {
    /// The convolution of `x` `[N, C, H, W]` with `weight` (the layer's or, for interval
    /// radii, its absolute value), with or without the bias.
    pub fn apply_with(&self, x: &Tensor, weight: &Tensor, with_bias: bool) -> Result<Tensor> {
        let bias = if with_bias { self.bias.as_ref() } else { None };
        Ok(x.f_conv2d(
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )?)
    }
}

/// What a node computes.
#[derive(Debug)]
pub enum Layer {
    /// The pixels, in `[0, 1]` (node 0 only).
    Input,
    /// `y = W x + b` on vectors: `weight [O, I]`, `bias [O]`.
    Linear {
        weight: Tensor,
        bias: Tensor,
    },
    Conv(Conv),
    /// Elementwise `y = x · scale + shift`, both of the node's shape: normalisation, BatchNorm
    /// in eval mode, arithmetic with constants.
    Affine {
        scale: Tensor,
        shift: Tensor,
    },
    /// The same values in the node's shape (Flatten, Reshape).
    Reshape,
    Relu,
    /// Max pooling over non-overlapping windows (kernel = stride, no padding).
    MaxPool {
        kernel: [i64; 2],
    },
    /// The sum of two nodes of one shape (residual connections).
    Add,
}

impl Layer {
    /// The operator name in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Layer::Input => "Input",
            Layer::Linear { .. } => "Linear",
            Layer::Conv(_) => "Conv",
            Layer::Affine { .. } => "Affine",
            Layer::Reshape => "Reshape",
            Layer::Relu => "Relu",
            Layer::MaxPool { .. } => "MaxPool",
            Layer::Add => "Add",
        }
    }

    /// Whether the node is an activation, whose relaxation needs bounds on its input.
    pub fn is_activation(&self) -> bool {
        matches!(self, Layer::Relu | Layer::MaxPool { .. })
    }
}

#[derive(Debug)]
pub struct Node {
    pub layer: Layer,
    pub inputs: Vec<NodeId>,
    /// Per-sample shape of the output.
    pub shape: Vec<i64>,
    /// Where the node came from (ONNX node name, native layer), for messages.
    pub label: String,
}

impl Node {
    /// Number of values per sample.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct BoundGraph {
    nodes: Vec<Node>,
    device: Device,
}

impl BoundGraph {
    /// A graph holding only the input node, for images `[C, H, W]` on `device`.
    pub fn new(input_shape: [i64; 3], device: Device) -> Self {
        BoundGraph {
            nodes: vec![Node {
                layer: Layer::Input,
                inputs: Vec::new(),
                shape: input_shape.to_vec(),
                label: "input".into(),
            }],
            device,
        }
    }

    pub const INPUT: NodeId = 0;

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The last node (the logits).
    pub fn output(&self) -> NodeId {
        self.nodes.len() - 1
    }

    /// Appends a layer reading `inputs`; checks it on a zero sample and records its shape.
    pub fn push(&mut self, layer: Layer, inputs: &[NodeId], label: &str) -> Result<NodeId> {
        let id = self.nodes.len();
        let arity = match layer {
            Layer::Input => bail!("{label}: only node 0 is an input"),
            Layer::Add => 2,
            _ => 1,
        };
        ensure!(
            inputs.len() == arity && inputs.iter().all(|i| *i < id),
            "{label}: {} needs {arity} earlier node(s), got {inputs:?}",
            layer.name()
        );
        if let Layer::Linear { .. } = layer {
            ensure!(
                self.nodes[inputs[0]].shape.len() == 1,
                "{label}: Linear needs vectors, its input has shape {:?} (flatten it first)",
                self.nodes[inputs[0]].shape
            );
        }
        let shape = match &layer {
            Layer::Reshape => bail!("{label}: use BoundGraph::reshape"),
            _ => {
                let zeros: Vec<Tensor> = inputs
                    .iter()
                    .map(|i| self.zeros(*i))
                    .collect::<Result<_>>()?;
                let refs: Vec<&Tensor> = zeros.iter().collect();
                let y = tch::no_grad(|| apply(&layer, &[], &refs))
                    .with_context(|| format!("{label}: {} on the graph's shapes", layer.name()))?;
                y.size()[1..].to_vec()
            }
        };
        if let Layer::Affine { scale, shift } = &layer {
            ensure!(
                scale.size() == shape && shift.size() == shape,
                "{label}: affine constants of shapes {:?}, {:?} for values of shape {shape:?}",
                scale.size(),
                shift.size()
            );
        }
        self.nodes.push(Node {
            layer,
            inputs: inputs.to_vec(),
            shape,
            label: label.to_owned(),
        });
        Ok(id)
    }

    /// Appends the values of `x` reshaped to `shape` (per sample).
    pub fn reshape(&mut self, x: NodeId, shape: &[i64], label: &str) -> Result<NodeId> {
        let from = self.nodes[x].numel();
        ensure!(
            shape.iter().product::<i64>() == from,
            "{label}: cannot reshape {:?} to {shape:?}",
            self.nodes[x].shape
        );
        self.nodes.push(Node {
            layer: Layer::Reshape,
            inputs: vec![x],
            shape: shape.to_vec(),
            label: label.to_owned(),
        });
        Ok(self.nodes.len() - 1)
    }

    /// Appends `x · scale + shift` with constants broadcastable to the shape of `x`.
    pub fn affine(
        &mut self,
        x: NodeId,
        scale: &Tensor,
        shift: &Tensor,
        label: &str,
    ) -> Result<NodeId> {
        let shape = self.nodes[x].shape.clone();
        let full = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_to_kind(Kind::Float)?
                .f_to_device(self.device)?
                .f_broadcast_to(shape.as_slice())
                .with_context(|| {
                    format!("{label}: constant of shape {:?} for {shape:?}", t.size())
                })?
                .f_contiguous()?)
        };
        let layer = Layer::Affine {
            scale: full(scale)?,
            shift: full(shift)?,
        };
        self.push(layer, &[x], label)
    }

    /// Appends eval-mode BatchNorm (see [`batch_norm_affine`]).
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm(
        &mut self,
        x: NodeId,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        mean: &Tensor,
        var: &Tensor,
        eps: f64,
        label: &str,
    ) -> Result<NodeId> {
        let rank = self.nodes[x].shape.len();
        let (scale, shift) = batch_norm_affine(gamma, beta, mean, var, eps, rank)?;
        self.affine(x, &scale, &shift, label)
    }

    /// Appends average pooling (see [`avg_pool_conv`]).
    pub fn avg_pool(
        &mut self,
        x: NodeId,
        kernel: [i64; 2],
        stride: [i64; 2],
        padding: [i64; 2],
        label: &str,
    ) -> Result<NodeId> {
        let c = self.nodes[x].shape[0];
        let conv = avg_pool_conv(c, kernel, stride, padding, self.device)?;
        self.push(Layer::Conv(conv), &[x], label)
    }

    /// A zero batch of one sample of node `id`'s shape.
    fn zeros(&self, id: NodeId) -> Result<Tensor> {
        let mut shape = vec![1];
        shape.extend(&self.nodes[id].shape);
        Ok(Tensor::f_zeros(
            shape.as_slice(),
            (Kind::Float, self.device),
        )?)
    }

    /// The logits of `x` `[N, C, H, W]`, computed through the graph (to check a graph against
    /// its model).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut vals: Vec<Tensor> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let ins: Vec<&Tensor> = node.inputs.iter().map(|i| &vals[*i]).collect();
            let mut batch_shape = vec![x.size()[0]];
            batch_shape.extend(&node.shape);
            let y = match node.layer {
                Layer::Input => x.shallow_clone(),
                _ => apply(&node.layer, &batch_shape, &ins)
                    .with_context(|| format!("node {} ({})", node.label, node.layer.name()))?,
            };
            vals.push(y);
        }
        vals.pop().context("the bound graph is empty")
    }
}

/// Eval-mode BatchNorm `(x - mean) / sqrt(var + eps) · gamma + beta` as per-channel scale
/// and shift, shaped `[C, 1, ...]` for values of per-sample rank `rank` (channels first).
pub fn batch_norm_affine(
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    rank: usize,
) -> Result<(Tensor, Tensor)> {
    let c = mean.numel() as i64;
    let mut view = vec![c];
    view.extend(std::iter::repeat_n(1, rank.saturating_sub(1)));
    let f = |t: &Tensor| t.f_to_kind(Kind::Float);
    let inv = f(var)?.f_add_scalar(eps)?.f_rsqrt()?;
    let scale = match gamma {
        Some(g) => inv.f_mul(&f(g)?)?,
        None => inv,
    };
    let shift = f(mean)?.f_mul(&scale)?.f_neg()?;
    let shift = match beta {
        Some(b) => shift.f_add(&f(b)?)?,
        None => shift,
    };
    Ok((
        scale.f_view(view.as_slice())?,
        shift.f_view(view.as_slice())?,
    ))
}

/// Average pooling over `channels` (padding counted as zeros) as a depthwise convolution.
pub fn avg_pool_conv(
    channels: i64,
    kernel: [i64; 2],
    stride: [i64; 2],
    padding: [i64; 2],
    device: Device,
) -> Result<Conv> {
    let weight = Tensor::f_full(
        [channels, 1, kernel[0], kernel[1]],
        1.0 / (kernel[0] * kernel[1]) as f64,
        (Kind::Float, device),
    )?;
    Ok(Conv {
        weight,
        bias: None,
        stride,
        padding,
        dilation: [1, 1],
        groups: channels,
    })
}

/// The layer's function on batches `ins` (`out_shape`: the batch shape of its output, used
/// by Reshape only).
pub fn apply(layer: &Layer, out_shape: &[i64], ins: &[&Tensor]) -> Result<Tensor> {
    Ok(match layer {
        Layer::Input => bail!("the input node has no function"),
        Layer::Linear { weight, bias } => ins[0].f_linear(weight, Some(bias))?,
        Layer::Conv(c) => c.apply_with(ins[0], &c.weight, true)?,
        Layer::Affine { scale, shift } => ins[0].f_mul(scale)?.f_add(shift)?,
        Layer::Reshape => ins[0].f_reshape(out_shape)?,
        Layer::Relu => ins[0].f_relu()?,
        Layer::MaxPool { kernel } => {
            ins[0].f_max_pool2d(*kernel, *kernel, [0, 0], [1, 1], false)?
        }
        Layer::Add => ins[0].f_add(ins[1])?,
    })
}
