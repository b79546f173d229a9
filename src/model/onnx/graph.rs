//! The ONNX graph as a list of validated tch operations over numbered value slots, with
//! weights on the device and constant subgraphs folded once at load.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::ModelProto;
use tch::{Device, Kind, Tensor};

use super::ops::{self, LinearRole, Op};
use super::proto::{declared_dims, tensor_from_proto, Attrs};
use crate::util::to_vec_i64;

/// Opsets of the default domain brittle reads (the operator semantics of 9 to 21 are covered).
pub(super) const OPSETS: std::ops::RangeInclusive<i64> = 9..=21;

pub(super) struct Node {
    /// Node name, or its position and output when unnamed, for error messages.
    pub label: String,
    pub op_type: String,
    pub op: Op,
    /// Value slots of the inputs; `None` for an absent optional input.
    pub inputs: Vec<Option<usize>>,
    pub output: usize,
}

impl Node {
    /// This node's inputs from the value slots `vals` (`None` for an absent optional input); a
    /// slot without a value is an error whose message ends with `missing`.
    pub(super) fn input_values<'a>(
        &self,
        vals: &'a [Option<Tensor>],
        missing: &str,
    ) -> Result<Vec<Option<&'a Tensor>>> {
        self.inputs
            .iter()
            .map(|s| match s {
                None => Ok(None),
                Some(s) => vals[*s]
                    .as_ref()
                    .map(Some)
                    .ok_or_else(|| anyhow!("value slot {s} {missing}")),
            })
            .collect()
    }
}

/// `logits = features W^T + b` read off a graph that ends in Gemm or MatMul (+ Add).
pub(super) struct LinearHead {
    pub features: usize,
    /// `[K, D]`
    pub weight: Tensor,
    /// `[K]`
    pub bias: Tensor,
}

pub(super) struct Graph {
    pub opset: i64,
    pub nodes: Vec<Node>,
    /// One entry per value slot: the tensor of constants (initializers, folded nodes).
    pub constants: Vec<Option<Tensor>>,
    pub input: usize,
    pub input_name: String,
    /// Declared shape of the input (`None` entries: symbolic or unknown).
    pub input_dims: Option<Vec<Option<i64>>>,
    pub output: usize,
    pub head: Option<LinearHead>,
    /// Slots no later node reads, dropped after each node to bound memory.
    free_after: Vec<Vec<usize>>,
}

/// Floating tensors go to the model's device; integer ones (shape arithmetic) stay on the CPU.
fn place(t: Tensor, device: Device) -> Result<Tensor> {
    Ok(if t.is_floating_point() {
        t.f_to_device(device)?
    } else {
        t
    })
}

impl Graph {
    /// Reads and validates the whole graph: every unsupported operator or attribute is reported
    /// (node, operator, opset) before anything runs.
    pub(super) fn build(model: &ModelProto, device: Device) -> Result<Graph> {
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .ok_or_else(|| anyhow!("the model imports no opset of the default ONNX domain"))?;
        if !OPSETS.contains(&opset) {
            bail!(
                "opset {opset} is not supported (brittle reads opsets {} to {})",
                OPSETS.start(),
                OPSETS.end()
            );
        }
        let g = model
            .graph
            .as_ref()
            .ok_or_else(|| anyhow!("the model has no graph"))?;
        if !g.sparse_initializer.is_empty() {
            bail!("sparse initializers are not supported");
        }
        let mut slots: HashMap<String, usize> = HashMap::new();
        let mut constants: Vec<Option<Tensor>> = Vec::new();
        for init in &g.initializer {
            let t =
                tensor_from_proto(init).with_context(|| format!("initializer {:?}", init.name))?;
            slots.insert(init.name.clone(), constants.len());
            constants.push(Some(place(t, device)?));
        }
        let inputs: Vec<_> = g
            .input
            .iter()
            .filter(|i| !slots.contains_key(&i.name))
            .collect();
        let [input] = inputs.as_slice() else {
            bail!(
                "the graph must have exactly one input besides its weights, it has {:?}",
                inputs.iter().map(|i| &i.name).collect::<Vec<_>>()
            );
        };
        let input_slot = constants.len();
        slots.insert(input.name.clone(), input_slot);
        constants.push(None);

        // Extra outputs (Dropout mask, MaxPool indices, BatchNormalization training statistics)
        // are not computed: a node that reads one is an error.
        let mut not_computed: HashMap<&str, String> = HashMap::new();
        let mut nodes = Vec::with_capacity(g.node.len());
        let mut errors = Vec::new();
        for (i, n) in g.node.iter().enumerate() {
            let label = if n.name.is_empty() {
                format!(
                    "#{i} (output {:?})",
                    n.output.first().map_or("", |s| s.as_str())
                )
            } else {
                format!("{:?}", n.name)
            };
            let parsed = (|| -> Result<Node> {
                if !(n.domain.is_empty() || n.domain == "ai.onnx") {
                    bail!("operators of domain {:?} are not supported", n.domain);
                }
                let mut attrs = Attrs::new(&n.attribute);
                let op = ops::parse(&n.op_type, &mut attrs, opset, n.input.len())?;
                attrs.finish()?;
                let inputs = n
                    .input
                    .iter()
                    .map(|name| {
                        if name.is_empty() {
                            return Ok(None);
                        }
                        if let Some(s) = slots.get(name) {
                            return Ok(Some(*s));
                        }
                        match not_computed.get(name.as_str()) {
                            Some(by) => bail!("reads {name:?}, an extra output of node {by}, which brittle does not compute"),
                            None => bail!("reads {name:?}, which no earlier node produces"),
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let out = n
                    .output
                    .first()
                    .filter(|o| !o.is_empty())
                    .ok_or_else(|| anyhow!("has no output"))?;
                Ok(Node {
                    label: label.clone(),
                    op_type: n.op_type.clone(),
                    op,
                    inputs,
                    output: 0,
                })
                .map(|mut node| {
                    node.output = constants.len();
                    slots.insert(out.clone(), node.output);
                    constants.push(None);
                    node
                })
            })();
            for extra in n.output.iter().skip(1).filter(|o| !o.is_empty()) {
                not_computed.insert(extra, format!("{label} ({})", n.op_type));
            }
            match parsed {
                Ok(node) => nodes.push(node),
                Err(e) => errors.push(format!(
                    "node {label}: operator {} (opset {opset}): {e:#}",
                    n.op_type
                )),
            }
        }
        if !errors.is_empty() {
            bail!(
                "{} node(s) cannot be run:\n  {}",
                errors.len(),
                errors.join("\n  ")
            );
        }
        let out_name = &g
            .output
            .first()
            .ok_or_else(|| anyhow!("the graph has no output"))?
            .name;
        let output = *slots
            .get(out_name)
            .ok_or_else(|| anyhow!("graph output {out_name:?} is not produced by any node"))?;

        let mut graph = Graph {
            opset,
            nodes: Vec::new(),
            constants,
            input: input_slot,
            input_name: input.name.clone(),
            input_dims: declared_dims(input),
            output,
            head: None,
            free_after: Vec::new(),
        };
        graph.fold_constants(nodes, device)?;
        graph.head = graph.linear_head();
        graph.plan_frees();
        Ok(graph)
    }

    /// Evaluates once, at load, every node whose inputs are all constants.
    fn fold_constants(&mut self, nodes: Vec<Node>, device: Device) -> Result<()> {
        for node in nodes {
            let constant = node.op.is_constant()
                || (!node.inputs.is_empty()
                    && node
                        .inputs
                        .iter()
                        .flatten()
                        .all(|s| self.constants[*s].is_some()));
            if constant {
                let ins: Vec<Option<&Tensor>> = node
                    .inputs
                    .iter()
                    .map(|s| s.and_then(|s| self.constants[s].as_ref()))
                    .collect();
                let t = tch::no_grad(|| node.op.run(&ins))
                    .with_context(|| format!("node {} ({})", node.label, node.op_type))?;
                self.constants[node.output] = Some(place(t, device)?);
            } else {
                self.nodes.push(node);
            }
        }
        Ok(())
    }

    fn constant(&self, slot: Option<usize>) -> Option<&Tensor> {
        self.constants.get(slot?)?.as_ref()
    }

    /// The last linear layer, when the output is `Gemm(f, W, b)`, `MatMul(f, W)` or
    /// `Add(MatMul(f, W), b)` with constant `W`, `b`.
    fn linear_head(&self) -> Option<LinearHead> {
        let producer = |slot: usize| self.nodes.iter().find(|n| n.output == slot);
        let last = producer(self.output)?;
        let matmul_weight = |n: &Node| -> Option<(usize, Tensor)> {
            if n.op.linear_role() != Some(LinearRole::MatMul) {
                return None;
            }
            let w = self.constant(*n.inputs.get(1)?)?;
            if w.dim() != 2 {
                return None;
            }
            Some((n.inputs[0]?, w.f_transpose(0, 1).ok()?))
        };
        let (features, weight, bias) = match last.op.linear_role()? {
            LinearRole::Gemm {
                alpha,
                beta,
                trans_a: false,
                trans_b,
            } => {
                let b = self.constant(last.inputs[1])?;
                let w = if trans_b {
                    b.shallow_clone()
                } else {
                    b.f_transpose(0, 1).ok()?
                };
                let c = match last.inputs.get(2).copied().flatten() {
                    Some(s) => Some(self.constant(Some(s))?.f_mul_scalar(beta).ok()?),
                    None => None,
                };
                (last.inputs[0]?, w.f_mul_scalar(alpha).ok()?, c)
            }
            LinearRole::MatMul => {
                let (f, w) = matmul_weight(last)?;
                (f, w, None)
            }
            LinearRole::Add => {
                let (a, b) = (last.inputs[0]?, last.inputs[1]?);
                let (mm, c) = match (self.constant(Some(a)), self.constant(Some(b))) {
                    (None, Some(c)) => (a, c),
                    (Some(c), None) => (b, c),
                    _ => return None,
                };
                let (f, w) = matmul_weight(producer(mm)?)?;
                (f, w, Some(c.shallow_clone()))
            }
            _ => return None,
        };
        let k = weight.size()[0];
        let bias = match bias {
            None => Tensor::f_zeros([k], (Kind::Float, weight.device())).ok()?,
            Some(c) if c.numel() as i64 == k => c.f_reshape([k]).ok()?,
            Some(c) if c.numel() == 1 => c.f_reshape([1]).ok()?.f_expand([k], false).ok()?,
            Some(_) => return None,
        };
        Some(LinearHead {
            features,
            weight: weight.f_to_kind(Kind::Float).ok()?,
            bias: bias.f_to_kind(Kind::Float).ok()?,
        })
    }

    /// After each node, the slots that no later node needs (never the output or features).
    fn plan_frees(&mut self) {
        let mut last_use: HashMap<usize, usize> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for s in n.inputs.iter().flatten() {
                if self.constants[*s].is_none() {
                    last_use.insert(*s, i);
                }
            }
        }
        let keep = [Some(self.output), self.head.as_ref().map(|h| h.features)];
        self.free_after = vec![Vec::new(); self.nodes.len()];
        for (slot, i) in last_use {
            if !keep.contains(&Some(slot)) {
                self.free_after[i].push(slot);
            }
        }
    }

    /// Turns on (or off) the batch rewrite of every Reshape to a constant shape `[1, ...]` of a
    /// computed tensor; returns how many there are.
    pub(super) fn set_batch_rewrite(&mut self, on: bool) -> usize {
        let mut count = 0;
        for n in &mut self.nodes {
            let shape = n
                .inputs
                .get(1)
                .copied()
                .flatten()
                .and_then(|s| self.constants[s].as_ref())
                .and_then(|t| to_vec_i64(t).ok());
            if shape.as_deref().and_then(<[i64]>::first) == Some(&1) && n.op.set_batch_rewrite(on) {
                count += 1;
            }
        }
        count
    }

    /// The value slots before the first node: the constants, and `x` in the input's slot.
    pub(super) fn values_with_input(&self, x: &Tensor) -> Vec<Option<Tensor>> {
        let mut vals: Vec<Option<Tensor>> = self
            .constants
            .iter()
            .map(|c| c.as_ref().map(Tensor::shallow_clone))
            .collect();
        vals[self.input] = Some(x.shallow_clone());
        vals
    }

    /// Runs the graph on `x` (already normalised and in the graph's layout); returns the output
    /// and, when asked and known, the features of [`Graph::head`].
    pub(super) fn run(&self, x: &Tensor, want_features: bool) -> Result<(Tensor, Option<Tensor>)> {
        let mut vals = self.values_with_input(x);
        for (node, frees) in self.nodes.iter().zip(&self.free_after) {
            let y = {
                let ins = node.input_values(&vals, "was released too early")?;
                node.op
                    .run(&ins)
                    .with_context(|| format!("node {} ({})", node.label, node.op_type))?
            };
            vals[node.output] = Some(y);
            for s in frees {
                vals[*s] = None;
            }
        }
        let out = vals[self.output]
            .take()
            .ok_or_else(|| anyhow!("the graph output was not computed"))?;
        let features = match (&self.head, want_features) {
            (Some(h), true) => vals[h.features].take(),
            _ => None,
        };
        Ok((out, features))
    }
}
