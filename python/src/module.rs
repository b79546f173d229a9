//! A `torch.nn.Module` as a brittle [`Classifier`], and the Ctrl-C check every model gets.
//!
//! The module is called back under the GIL with the very tensor the attack holds (one libtorch,
//! shared through pyo3-tch), so autograd flows from the module's output back to the attack's
//! input, and `tch::no_grad` is the module's `torch.no_grad` too.

use anyhow::{anyhow, bail, Result};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3_tch::PyTensor;
use tch::{Device, Tensor};

use crate::api::{Classifier, ModelInfo};

/// A Python callable `module(x) -> logits [N, K]`.
pub struct PyModuleClassifier {
    module: Py<PyAny>,
    device: Device,
    info: ModelInfo,
}

impl PyModuleClassifier {
    /// Wraps `module` and probes it on `probe` (a few samples of the data) for the class count.
    pub fn new(
        module: Py<PyAny>,
        device: Device,
        name: String,
        fingerprint: String,
        probe: &Tensor,
    ) -> Result<Self> {
        let shape = probe.size();
        anyhow::ensure!(
            shape.len() == 4,
            "the probe batch must be [N, C, H, W], got {shape:?}"
        );
        let mut me = PyModuleClassifier {
            module,
            device,
            info: ModelInfo {
                name,
                format: "python:nn.Module".into(),
                fingerprint,
                num_classes: 0,
                input_shape: [shape[1], shape[2], shape[3]],
                has_features: false,
            },
        };
        let logits = tch::no_grad(|| me.call(probe))?;
        me.info.num_classes = logits.size()[1];
        Ok(me)
    }

    fn call(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.size().first().copied().unwrap_or(0);
        Python::with_gil(|py| {
            let arg = PyTensor(x.shallow_clone()).into_pyobject(py)?;
            let out = self.module.bind(py).call1((arg,))?;
            let what = |t: &str| {
                format!(
                    "model {} returned {t}; brittle needs forward(x) to return the logits tensor [N, K] \
                     (wrap the module so that it returns only the logits)",
                    self.info.name
                )
            };
            if let Ok(tuple) = out.downcast::<PyTuple>() {
                bail!(what(&format!("a tuple of {} items", tuple.len())));
            }
            let logits: PyTensor = out.extract().map_err(|_| {
                let ty = out
                    .get_type()
                    .name()
                    .map_or_else(|_| "?".to_string(), |s| s.to_string());
                anyhow!(what(&format!("a {ty}")))
            })?;
            let size = logits.size();
            if size.len() != 2 || size[0] != n || size[1] < 2 {
                bail!(
                    "model {} returned shape {size:?} for a batch of {n}; expected logits [{n}, K] with K >= 2",
                    self.info.name
                );
            }
            Ok(logits.0)
        })
    }
}

impl Classifier for PyModuleClassifier {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.call(x)
    }

    fn device(&self) -> Device {
        self.device
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}

/// Any classifier, with Python's pending signals (Ctrl-C) checked before each forward pass: a
/// KeyboardInterrupt then ends the job within one attack step, as the error the job returns.
pub struct Interruptible(pub Box<dyn Classifier>);

fn check_signals() -> Result<()> {
    Python::with_gil(|py| py.check_signals()).map_err(Into::into)
}

impl Classifier for Interruptible {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        check_signals()?;
        self.0.logits(x)
    }

    fn features_and_logits(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        check_signals()?;
        self.0.features_and_logits(x)
    }

    fn last_linear(&self) -> Option<(Tensor, Tensor)> {
        self.0.last_linear()
    }

    fn device(&self) -> Device {
        self.0.device()
    }

    fn info(&self) -> &ModelInfo {
        self.0.info()
    }
}
