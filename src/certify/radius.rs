//! The certified radius of each sample: the largest ε (to a relative tolerance) at which every
//! margin's lower bound is positive, by bisection over ε, all samples of a batch together (each
//! with its own ε) until each one's bracket is narrow enough.
//!
//! The search starts at a hint (an attack's margin, when known: a sound bound can never
//! certify it) or at 0.4% of the largest distance in the box, doubles ε while it certifies,
//! then halves the bracket `[certified, not certified]`.

use std::time::Instant;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::graph::BoundGraph;
use super::{margin_lower_bounds, Method};
use crate::norm::Norm;

/// A sample's certified radius and what it cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Radius {
    /// The largest ε certified (0 when none was).
    pub radius: f64,
    /// Bound computations (one per ε tried).
    pub passes: usize,
    /// Wall time, each batch pass's time shared among the samples in it.
    pub seconds: f64,
}

/// How the radius is searched.
#[derive(Debug, Clone, Copy)]
pub struct Search {
    pub norm: Norm,
    pub method: Method,
    /// Stop when `hi - lo ≤ rel_tol · hi`.
    pub rel_tol: f64,
    /// At most this many passes per sample.
    pub max_passes: usize,
}

impl Search {
    pub fn new(norm: Norm, method: Method) -> Self {
        Search {
            norm,
            method,
            rel_tol: 0.01,
            max_passes: 40,
        }
    }
}

struct State {
    lo: f64,
    hi: f64,
    eps: f64,
    passes: usize,
    seconds: f64,
    done: bool,
}

/// Certified radii of the samples `x` `[N, C, H, W]` (on the graph's device) around their
/// predicted classes `pred`; `hints` are starting points (non-finite or 0: none).
pub fn certified_radii(
    graph: &BoundGraph,
    x: &Tensor,
    pred: &[i64],
    hints: Option<&[f64]>,
    search: Search,
) -> Result<Vec<Radius>> {
    let s = x.size();
    let max = search.norm.max_distance([s[1], s[2], s[3]]);
    let start = 0.004 * max;
    let mut states: Vec<State> = (0..pred.len())
        .map(|i| {
            let h = hints.and_then(|h| h.get(i).copied()).unwrap_or(0.0);
            State {
                lo: 0.0,
                hi: f64::INFINITY,
                eps: if h.is_finite() && h > 0.0 {
                    h.min(max)
                } else {
                    start
                },
                passes: 0,
                seconds: 0.0,
                done: false,
            }
        })
        .collect();
    let device = x.device();
    loop {
        let active: Vec<i64> = (0..states.len())
            .filter(|i| !states[*i].done)
            .map(|i| i as i64)
            .collect();
        if active.is_empty() {
            break;
        }
        let t0 = Instant::now();
        let idx = Tensor::from_slice(&active).to_device(device);
        let xa = x.f_index_select(0, &idx)?;
        let pa: Vec<i64> = active.iter().map(|&i| pred[i as usize]).collect();
        let pa = Tensor::from_slice(&pa).to_device(device);
        let ea: Vec<f64> = active.iter().map(|&i| states[i as usize].eps).collect();
        let ea = Tensor::from_slice(&ea)
            .to_kind(Kind::Float)
            .to_device(device);
        let lb = margin_lower_bounds(graph, &xa, &pa, &ea, search.norm, search.method)?;
        let certified: Vec<bool> = Vec::<f64>::try_from(
            lb.f_amin([1].as_slice(), false)?
                .f_to_kind(Kind::Double)?
                .f_to_device(tch::Device::Cpu)?,
        )?
        .into_iter()
        .map(|m| m > 0.0)
        .collect();
        let share = t0.elapsed().as_secs_f64() / active.len() as f64;
        for (&i, ok) in active.iter().zip(certified) {
            let st = &mut states[i as usize];
            st.passes += 1;
            st.seconds += share;
            if ok {
                st.lo = st.eps;
            } else {
                st.hi = st.eps;
            }
            if st.hi.is_infinite() {
                st.done = st.lo >= max;
                st.eps = (2.0 * st.lo).min(max);
            } else {
                st.done = st.hi - st.lo <= search.rel_tol * st.hi || st.hi < 1e-9;
                st.eps = 0.5 * (st.lo + st.hi);
            }
            st.done |= st.passes >= search.max_passes;
        }
    }
    Ok(states
        .into_iter()
        .map(|s| Radius {
            radius: s.lo,
            passes: s.passes,
            seconds: s.seconds,
        })
        .collect())
}
