//! ONNX graphs executed with libtorch operations, so that logits, penultimate features and
//! input gradients come from autograd, on the CPU or CUDA (no ONNX runtime can differentiate
//! with respect to the input).
//!
//! # Input
//! brittle always hands the model float32 NCHW pixels in `[0, 1]`. Before the graph, inside the
//! differentiable computation:
//! 1. the spec's mean and std normalise per channel ([`super::normalize::Normalized`], in
//!    front of every format; default: none; most exported classifiers, like the ones in
//!    `shared/models`, expect normalised input, so give the values they were trained with);
//! 2. input layout NHWC permutes for graphs exported from TensorFlow/Keras (default NCHW:
//!    passed as is). A graph whose input is 2-D (`[N, C*H*W]`, e.g. an MLP) is fed the
//!    flattened image.
//!
//! The declared input shape is checked against the data at load.
//!
//! # Graph
//! The whole graph is validated at load (the operators of `ops::REGISTRY`, default domain, opsets
//! `graph::OPSETS`): any unsupported operator, attribute or extra output is an error naming
//! the node, the operator and the opset, before any work starts. Weights are put on the device
//! once; nodes whose inputs are all constant (e.g. shape arithmetic on constants) are folded at
//! load; shape subgraphs of the input (`Shape -> Gather -> Unsqueeze -> Concat -> Reshape`) run
//! on the CPU with the actual batch.
//!
//! # Batches
//! Graphs exported with a fixed batch of 1 often reshape to a constant `[1, -1]`. When the
//! declared batch is 1, such Reshapes take the data's leading size instead of 1 ("rewritten"),
//! and at load a probe batch of two different inputs is run batched and compared with running
//! each sample alone: if they agree the model runs batched, otherwise (or if the batched graph
//! fails) it runs sample by sample ("per-sample", correct but slower). [`ModelInfo::format`] and
//! the log say which: `onnx (batch: native)`, `onnx (batch: rewritten N Reshape)`,
//! `onnx (batch: per-sample)`.
//!
//! # Features
//! When the output comes from `Gemm(f, W, b)`, `MatMul(f, W)` or `Add(MatMul(f, W), b)` with
//! constant weights, `f` is the penultimate feature vector and `(W, b)` (transposed per
//! `transB`, scaled by `alpha`/`beta`) the last linear layer, verified on the probe.

mod graph;
mod ops;
mod proto;
mod relax;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use self::graph::Graph;
use super::spec::{InputLayout, ModelSpec};
use super::{is_last_linear, rel_diff, Classifier, ModelInfo, PROBE_TOL};
use crate::certify::{BoundGraph, NodeId};
use crate::util::OptionError;

/// How the graph's input is produced from NCHW pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Feed {
    Nchw,
    Nhwc,
    /// `[N, C*H*W]`.
    Flat,
}

/// How batches run; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BatchMode {
    Native,
    Rewritten(usize),
    PerSample,
}

impl BatchMode {
    fn describe(self) -> String {
        match self {
            BatchMode::Native => "native".into(),
            BatchMode::Rewritten(n) => format!("rewritten {n} Reshape"),
            BatchMode::PerSample => "per-sample".into(),
        }
    }
}

pub struct OnnxClassifier {
    graph: Graph,
    feed: Feed,
    batch: BatchMode,
    device: Device,
    info: ModelInfo,
}

/// Reads an ONNX file and builds a classifier that runs it with tch, probed on `probe` (the
/// probe batch as the model sees it, normalised).
pub fn load(
    spec: &ModelSpec,
    probe: &Tensor,
    input_shape: [i64; 3],
    fingerprint: String,
) -> Result<OnnxClassifier> {
    let path = &spec.path;
    let model = proto::read_model(path)?;
    let graph = Graph::build(&model, spec.device)
        .with_context(|| format!("{}: reading the ONNX graph", path.display()))?;
    let feed = feed_for(&graph, input_shape, spec.input_layout)
        .with_context(|| format!("{}: graph input", path.display()))?;
    let mut me = OnnxClassifier {
        graph,
        feed,
        batch: BatchMode::PerSample,
        device: spec.device,
        info: ModelInfo::unprobed(path, "", fingerprint, input_shape),
    };
    tch::no_grad(|| me.probe(probe))
        .with_context(|| format!("{}: probing the graph", path.display()))?;
    me.info.format = format!("onnx (batch: {})", me.batch.describe());
    tracing::info!(
        "{}: ONNX opset {}, batch handling: {}, features: {}",
        path.display(),
        me.graph.opset,
        me.batch.describe(),
        me.info.has_features
    );
    Ok(me)
}

/// Checks the declared input shape against the data and the layout asked for.
fn feed_for(graph: &Graph, [c, h, w]: [i64; 3], layout: InputLayout) -> Result<Feed> {
    let name = &graph.input_name;
    let Some(dims) = &graph.input_dims else {
        return Ok(match layout {
            InputLayout::Nchw => Feed::Nchw,
            InputLayout::Nhwc => Feed::Nhwc,
        });
    };
    let fits = |want: &[i64]| {
        dims[1..]
            .iter()
            .zip(want)
            .all(|(d, w)| d.is_none_or(|d| d == *w))
    };
    let show = |d: &[Option<i64>]| {
        d.iter()
            .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (dims.len(), layout) {
        (2, InputLayout::Nchw) if fits(&[c * h * w]) => Ok(Feed::Flat),
        (4, InputLayout::Nchw) if fits(&[c, h, w]) => Ok(Feed::Nchw),
        (4, InputLayout::Nhwc) if fits(&[h, w, c]) => Ok(Feed::Nhwc),
        (4, InputLayout::Nchw) if fits(&[h, w, c]) => Err(OptionError::new(
            "input_layout",
            format!(
                "input {name:?} is [{}], NHWC for images [C, H, W] = [{c}, {h}, {w}]: the input layout must be nhwc",
                show(dims)
            ),
        )
        .into()),
        _ => Err(OptionError::new(
            "input_layout",
            format!(
                "input {name:?} has shape [{}], which does not fit images [C, H, W] = [{c}, {h}, {w}] with input layout {}",
                show(dims),
                layout.name()
            ),
        )
        .into()),
    }
}

impl OnnxClassifier {
    /// Decides the batch mode, the number of classes and the features on the two-sample probe.
    fn probe(&mut self, x: &Tensor) -> Result<()> {
        let [c, h, w] = self.info.input_shape;
        let rewrites = match &self.graph.input_dims {
            Some(d) if d.first() == Some(&Some(1)) => self.graph.set_batch_rewrite(false),
            _ => 0,
        };
        self.batch = BatchMode::PerSample;
        let (reference, ref_features) = self
            .forward(x, true)
            .with_context(|| format!("running the graph on a probe of shape [1, {c}, {h}, {w}]"))?;
        let num_classes = super::probe_classes(&reference)?;
        let agrees = |me: &Self| {
            me.forward(x, false)
                .ok()
                .and_then(|(y, _)| rel_diff(&y, &reference))
                .is_some_and(|d| d <= PROBE_TOL)
        };
        let mut modes = Vec::new();
        if rewrites > 0 {
            modes.push(BatchMode::Rewritten(rewrites));
        }
        modes.push(BatchMode::Native);
        for mode in modes {
            self.graph
                .set_batch_rewrite(matches!(mode, BatchMode::Rewritten(_)));
            self.batch = mode;
            if agrees(self) {
                break;
            }
            self.batch = BatchMode::PerSample;
        }
        if self.batch == BatchMode::PerSample {
            self.graph.set_batch_rewrite(false);
        }
        self.info.num_classes = num_classes;
        self.info.has_features = match (&self.graph.head, ref_features) {
            (Some(head), Some(f)) => is_last_linear(&f, &head.weight, &head.bias, &reference),
            _ => false,
        };
        if !self.info.has_features {
            self.graph.head = None;
        }
        Ok(())
    }

    /// The graph's input from NCHW pixels (normalised in front, when asked).
    fn feed(&self, x: &Tensor) -> Result<Tensor> {
        ensure!(
            x.dim() == 4,
            "expected images [N, C, H, W], got shape {:?}",
            x.size()
        );
        Ok(match self.feed {
            Feed::Nchw => x.shallow_clone(),
            Feed::Nhwc => x.f_permute([0, 2, 3, 1])?,
            Feed::Flat => x.f_flatten(1, -1)?,
        })
    }

    /// Logits and (when asked and known) features, batched or sample by sample.
    fn forward(&self, x: &Tensor, want_features: bool) -> Result<(Tensor, Option<Tensor>)> {
        let input = self.feed(x)?;
        if self.batch != BatchMode::PerSample {
            let (y, f) = self.graph.run(&input, want_features)?;
            return Ok((y, f.map(|f| f.flatten(1, -1))));
        }
        let mut ys = Vec::new();
        let mut fs = Vec::new();
        for xi in input.split(1, 0) {
            let (y, f) = self.graph.run(&xi, want_features)?;
            ys.push(y);
            fs.extend(f.map(|f| f.flatten(1, -1)));
        }
        let y = Tensor::f_cat(&ys, 0)?;
        let f = if fs.len() == ys.len() && !fs.is_empty() {
            Some(Tensor::f_cat(&fs, 0)?)
        } else {
            None
        };
        Ok((y, f))
    }
}

impl Classifier for OnnxClassifier {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward(x, false)?.0)
    }

    fn features_and_logits(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        if !self.info.has_features {
            return Ok(None);
        }
        let (y, f) = self.forward(x, true)?;
        Ok(f.map(|f| (f, y)))
    }

    fn last_linear(&self) -> Option<(Tensor, Tensor)> {
        self.graph
            .head
            .as_ref()
            .map(|h| (h.weight.shallow_clone(), h.bias.shallow_clone()))
    }

    fn append_bound_graph(&self, g: &mut BoundGraph, input: NodeId) -> Result<NodeId> {
        let [c, h, w] = self.info.input_shape;
        let (x, probe) = match self.feed {
            Feed::Nchw => (
                input,
                Tensor::f_zeros([1, c, h, w], (Kind::Float, self.device))?,
            ),
            Feed::Flat => (
                g.reshape(input, &[c * h * w], "flat input")?,
                Tensor::f_zeros([1, c * h * w], (Kind::Float, self.device))?,
            ),
            Feed::Nhwc => anyhow::bail!(
                "{}: the NHWC input permutation has no relaxation; certify an NCHW export",
                self.info.name
            ),
        };
        relax::append(&self.graph, g, x, &probe)
            .with_context(|| format!("{}: building the bound graph", self.info.name))
    }

    fn device(&self) -> Device {
        self.device
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}
