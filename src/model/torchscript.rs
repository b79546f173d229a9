//! TorchScript modules (`torch.jit.trace` / `torch.jit.script` output): any architecture, exact
//! PyTorch numerics.
//!
//! Convention: `forward(x)` takes float NCHW in `[0, 1]` (normalisation baked in, or put in
//! front by [`super::normalize::Normalized`]) and returns logits `[N, K]`, or a tuple `(logits, features)`. A module may
//! instead export a method `features(x) -> [N, D]` (`@torch.jit.export`) returning the
//! penultimate features. When logits equal `W f + b` for a 2-D parameter `W` and bias `b` of
//! the module (checked numerically at load), the last layer is exposed for the feature margin.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tch::{CModule, Device, IValue, Kind, Tensor};

use super::{is_last_linear, Classifier, ModelInfo};
use crate::certify::{BoundGraph, NodeId};
use crate::data::bounded;

/// Deepest expression nesting accepted in one statement of a TorchScript code member, counted
/// by [`statement_nesting`]. libtorch's TorchScript parser and compiler recurse per bracket and
/// per operator of an expression: about 3 KiB of stack per `[` (2,000 levels load, 3,000
/// overflow an 8 MiB main stack and abort the process), and 20,000 unary `-` or `not` overflow
/// it too. TorchScript's serialized code is printed from the IR, one operation per statement:
/// the committed fixtures and the four shared CIFAR-10 models measure at most 4. 128 leaves a
/// wide margin for real code and needs under 0.5 MiB of stack, well within a 2 MiB thread stack.
const MAX_CODE_NESTING: usize = 128;

pub struct TorchScriptClassifier {
    module: CModule,
    device: Device,
    features: FeatureSource,
    last_linear: Option<(Tensor, Tensor)>,
    info: ModelInfo,
}

/// Where the penultimate features come from, found once at load.
#[derive(Debug, Clone, Copy, PartialEq)]
enum FeatureSource {
    None,
    /// `forward` returns `(logits, features)`.
    ForwardTuple,
    /// An exported `features` method.
    Method,
}

impl TorchScriptClassifier {
    /// Loads the module and probes it on `probe` (the probe batch as the module sees it).
    pub fn load(
        path: &Path,
        device: Device,
        probe: &Tensor,
        input_shape: [i64; 3],
        fingerprint: String,
    ) -> Result<Self> {
        check_archive(path)?;
        let mut module = CModule::load_on_device(path, device)
            .with_context(|| format!("loading TorchScript module {}", path.display()))?;
        module.set_eval();
        let mut me = TorchScriptClassifier {
            module,
            device,
            features: FeatureSource::None,
            last_linear: None,
            info: ModelInfo::unprobed(path, "torchscript", fingerprint, input_shape),
        };
        let out = tch::no_grad(|| me.forward_ivalue(probe)).with_context(|| {
            format!(
                "{}: probing with an input of shape [2, {input_shape:?}]",
                path.display()
            )
        })?;
        let (logits, tuple_features) =
            split_output(out).with_context(|| format!("{}: forward output", path.display()))?;
        me.info.num_classes = super::probe_classes(&logits)
            .with_context(|| format!("{}: forward output", path.display()))?;
        let features = match tuple_features {
            Some(f) => {
                me.features = FeatureSource::ForwardTuple;
                Some(f)
            }
            None => {
                match tch::no_grad(|| me.module.method_ts("features", &[probe.shallow_clone()])) {
                    Ok(f) => {
                        me.features = FeatureSource::Method;
                        Some(f)
                    }
                    Err(_) => None,
                }
            }
        };
        if let Some(f) = features {
            me.info.has_features = true;
            me.last_linear = find_last_linear(&me.module, &f.flatten(1, -1), &logits);
        }
        Ok(me)
    }

    fn forward_ivalue(&self, x: &Tensor) -> Result<IValue> {
        Ok(self
            .module
            .forward_is(&[IValue::Tensor(x.shallow_clone())])?)
    }
}

/// Checks a TorchScript archive before libtorch reads it, since libtorch aborts the process on
/// some hostile members instead of failing: every code member (`<root>/code/**.py`) must nest
/// expressions at most [`MAX_CODE_NESTING`] deep, and every pickle libtorch reads (`data.pkl` and
/// `constants.pkl` at load, `*.debug_pkl` for error tracebacks) must pass
/// [`check_pickle`](super::weights::check_pickle): nesting, memo and expansion bounds (a
/// million nested tuples in `data.pkl` overflowed libtorch's stack). Other members, such as
/// `traced_inputs.pkl`, libtorch does not read. Members are read only up to their declared
/// size, which must be one deflate can produce.
fn check_archive(path: &Path) -> Result<()> {
    let source = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("opening {source}"))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .with_context(|| format!("{source}: not a TorchScript archive (a zip file)"))?;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .with_context(|| format!("{source}: archive entry {i}"))?;
        let name = entry.name().to_owned();
        let code = name.contains("/code/") && name.ends_with(".py");
        let pickle = ["/data.pkl", "/constants.pkl", ".debug_pkl"]
            .iter()
            .any(|s| name.ends_with(s));
        if !code && !pickle {
            continue;
        }
        let what = format!("{source}: archive member {name}");
        let (size, packed) = (entry.size(), entry.compressed_size());
        if size > bounded::inflate_cap(packed) {
            bail!("{what} declares {size} bytes from {packed} compressed, more than deflate can produce (corrupt or hostile archive)");
        }
        let bytes = bounded::read_exact_declared(&mut entry, size, &what)?;
        if code {
            let depth = statement_nesting(&bytes);
            if depth > MAX_CODE_NESTING {
                bail!("{what}: code nests {depth} levels deep in one statement (brackets and operators; at most {MAX_CODE_NESTING} accepted; corrupt or hostile file)");
            }
        } else {
            super::weights::check_pickle(&bytes).with_context(|| what.clone())?;
        }
    }
    Ok(())
}

/// An upper bound on how deep libtorch's parser and compiler recurse for any statement of
/// `code`: the bracket depth plus every operator character and operator keyword seen so far in
/// the statement (a newline outside brackets, not after a `\\`, ends it). Every level of
/// recursion needs a bracket or an operator, so nesting of any kind (`[[[`, `- - -`, `not not`,
/// `a ** a ** a`, long `a + a + ...` chains) is counted. Strings and comments are not skipped:
/// the bound is far above real code, and a scan that quoting cannot fool is worth the
/// (unrealistic) false positive.
fn statement_nesting(code: &[u8]) -> usize {
    const KEYWORDS: &[&[u8]] = &[
        b"not", b"and", b"or", b"if", b"else", b"is", b"in", b"lambda",
    ];
    let (mut depth, mut ops, mut deepest) = (0usize, 0usize, 0usize);
    let mut word_start = None;
    let mut prev = b'\n';
    for (i, &c) in code.iter().enumerate() {
        let in_word = c.is_ascii_alphanumeric() || c == b'_';
        match (in_word, word_start) {
            (true, None) => word_start = Some(i),
            (false, Some(start)) => {
                ops += usize::from(KEYWORDS.contains(&&code[start..i]));
                word_start = None;
            }
            _ => {}
        }
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'\n' if depth == 0 && prev != b'\\' => ops = 0,
            b'-' | b'+' | b'*' | b'/' | b'%' | b'@' | b'&' | b'|' | b'^' | b'~' | b'<' | b'>'
            | b'=' | b'!' => ops += 1,
            _ => {}
        }
        if !c.is_ascii_whitespace() || c == b'\n' {
            prev = c;
        }
        deepest = deepest.max(depth + ops);
    }
    deepest
}

/// Splits a forward output into logits and, for a tuple output, features.
fn split_output(out: IValue) -> Result<(Tensor, Option<Tensor>)> {
    match out {
        IValue::Tensor(t) => Ok((t, None)),
        IValue::Tuple(mut v) if v.len() == 2 => {
            let f = v.pop();
            let l = v.pop();
            match (l, f) {
                (Some(IValue::Tensor(l)), Some(IValue::Tensor(f))) => {
                    Ok((l, Some(f.flatten(1, -1))))
                }
                _ => Err(anyhow!("a tuple output must be (logits, features) tensors")),
            }
        }
        other => Err(anyhow!(
            "unsupported forward output {other:?}: expected a tensor or (logits, features)"
        )),
    }
}

/// The module parameter pair `(W [K, D], b [K])` with `logits = f W^T + b`, verified on the probe.
fn find_last_linear(
    module: &CModule,
    features: &Tensor,
    logits: &Tensor,
) -> Option<(Tensor, Tensor)> {
    let (k, d) = (logits.size()[1], features.size()[1]);
    let params = module.named_parameters().ok()?;
    let weight = params.iter().rev().find(|(_, t)| t.size() == [k, d])?;
    let prefix = weight.0.strip_suffix("weight")?;
    let bias = params
        .iter()
        .find(|(n, t)| n == &format!("{prefix}bias") && t.size() == [k]);
    let w = weight.1.detach().to_kind(Kind::Float);
    let b = bias
        .map(|(_, t)| t.detach().to_kind(Kind::Float))
        .unwrap_or_else(|| Tensor::zeros([k], (Kind::Float, w.device())));
    is_last_linear(features, &w, &b, logits).then_some((w, b))
}

impl Classifier for TorchScriptClassifier {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(split_output(self.forward_ivalue(x)?)?.0)
    }

    fn features_and_logits(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        match self.features {
            FeatureSource::None => Ok(None),
            FeatureSource::ForwardTuple => {
                let (l, f) = split_output(self.forward_ivalue(x)?)?;
                Ok(f.map(|f| (f, l)))
            }
            FeatureSource::Method => {
                let f = self
                    .module
                    .method_ts("features", &[x.shallow_clone()])?
                    .flatten(1, -1);
                let l = self.module.forward_ts(&[x.shallow_clone()])?;
                Ok(Some((f, l)))
            }
        }
    }

    fn last_linear(&self) -> Option<(Tensor, Tensor)> {
        self.last_linear
            .as_ref()
            .map(|(w, b)| (w.shallow_clone(), b.shallow_clone()))
    }

    fn append_bound_graph(&self, _: &mut BoundGraph, _: NodeId) -> Result<NodeId> {
        anyhow::bail!(
            "model {}: a TorchScript module is a black box (brittle runs it but cannot see its \
             layers), so no bound can be computed; certify its ONNX export or a native \
             architecture with the same weights",
            self.info.name
        )
    }

    fn device(&self) -> Device {
        self.device
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_nesting_counts_brackets_and_operators() {
        let real = b"  def forward(self, x: Tensor) -> Tensor:\n    _0 = torch.view(x, [-1, 512])\n    return _0\n";
        assert_eq!(statement_nesting(real), 4);
        assert_eq!(statement_nesting(b"x = [[[1]]]\ny = 2\n"), 4);
        assert_eq!(statement_nesting(b"x = - - - not 1\n"), 5);
        // A continuation line does not end the statement; a newline inside brackets neither.
        assert_eq!(statement_nesting(b"x = 1 + \\\n 1 + (1 +\n 1)\n"), 5);
        assert_eq!(statement_nesting(b")))]]]"), 0);
    }
}
