//! Adam (Kingma & Ba) whose moment estimates can be saved and restored, so that a resumed run
//! continues exactly where it stopped (tch's optimizers do not expose their state).

use std::collections::HashMap;

use anyhow::{Context, Result};
use tch::Tensor;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// Adam over named parameters (sorted by name, so the order is reproducible).
pub struct Adam {
    names: Vec<String>,
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates done so far (bias correction uses it).
    pub step: i64,
}

impl Adam {
    pub fn new(params: HashMap<String, Tensor>) -> Self {
        let mut named: Vec<(String, Tensor)> = params.into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (names, params): (Vec<_>, Vec<_>) = named.into_iter().unzip();
        let zeros = |p: &Tensor| p.zeros_like().detach();
        Adam {
            m: params.iter().map(zeros).collect(),
            v: params.iter().map(zeros).collect(),
            names,
            params,
            step: 0,
        }
    }

    /// Gradients of `loss` with respect to the parameters, then one update with rate `lr`.
    pub fn backward_step(&mut self, loss: &Tensor, lr: f64) -> Result<()> {
        let refs: Vec<&Tensor> = self.params.iter().collect();
        let grads = Tensor::f_run_backward(&[loss], &refs, false, false)?;
        self.step += 1;
        let c1 = 1.0 - BETA1.powi(self.step as i32);
        let c2 = 1.0 - BETA2.powi(self.step as i32);
        tch::no_grad(|| -> Result<()> {
            for (((p, m), v), g) in self
                .params
                .iter_mut()
                .zip(&mut self.m)
                .zip(&mut self.v)
                .zip(&grads)
            {
                let _ = m.f_mul_scalar_(BETA1)?.f_add_(&(g * (1.0 - BETA1)))?;
                let _ = v
                    .f_mul_scalar_(BETA2)?
                    .f_add_(&(g.square() * (1.0 - BETA2)))?;
                let update = (&*m / c1) / ((&*v / c2).sqrt() + EPS) * lr;
                let _ = p.f_sub_(&update)?;
            }
            Ok(())
        })
    }

    /// The moments as named tensors (`adam.m.<param>`, `adam.v.<param>`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for (n, (m, v)) in self.names.iter().zip(self.m.iter().zip(&self.v)) {
            out.push((format!("adam.m.{n}"), m.shallow_clone()));
            out.push((format!("adam.v.{n}"), v.shallow_clone()));
        }
        out
    }

    /// Restores the moments written by [`Adam::state`] and the step count.
    pub fn restore(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        step: i64,
        source: &str,
    ) -> Result<()> {
        for (n, (m, v)) in self.names.iter().zip(self.m.iter_mut().zip(&mut self.v)) {
            for (kind, dst) in [("m", m), ("v", v)] {
                let key = format!("adam.{kind}.{n}");
                let src = tensors
                    .get(&key)
                    .with_context(|| format!("{source}: missing optimizer tensor {key:?}"))?;
                anyhow::ensure!(
                    src.size() == dst.size(),
                    "{source}: optimizer tensor {key:?} has shape {:?}, expected {:?}",
                    src.size(),
                    dst.size()
                );
                dst.f_copy_(src)?;
            }
        }
        self.step = step;
        Ok(())
    }
}
