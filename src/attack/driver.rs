//! The one driver every attack runs in.
//!
//! A [`Chunk`] is a fixed group of samples (in dataset order). [`Chunk::run`] passes an
//! [`AttackStep`] over it with at most `batch_size` samples active: a sample leaves when it
//! reaches the attack's step budget or its best distance stops improving, and the batch is
//! refilled from the chunk's queue. Because CPU kernels give slightly different floating-point
//! results for different batch compositions, the composition must be a function of the chunk
//! alone for runs to be reproducible bit for bit: chunks (not samples) are therefore the unit of
//! resumption and sharding ([`super::job`]).

use std::time::Instant;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::{
    beyond_boundary, norm64, per_sample, AttackStep, BatchView, Ctx, GAP_RTOL, SEARCH_GAP_RTOL,
};
use crate::model::Classifier;
use crate::norm::Norm;
use crate::util::{to_vec_f64, NoProgress, Progress};

/// Relative improvement of the best distance that resets a sample's patience.
const MIN_IMPROVEMENT: f64 = 1e-3;

/// A group of samples attacked together, with the best point found so far for each.
pub struct Chunk {
    /// Clean inputs `[N, C, H, W]` on the model's device.
    pub x0: Tensor,
    /// Attacked labels `[N]`.
    pub label: Tensor,
    pub seeds: Vec<u64>,
    /// Best distance `[N]` float64 (`inf`: nothing found yet, 0: already misclassified).
    pub best: Tensor,
    pub best_adv: Tensor,
    pub forwards: Vec<u64>,
    pub backwards: Vec<u64>,
    pub seconds: Vec<f64>,
    /// The attack that found `best`.
    pub winner: Vec<&'static str>,
}

/// A sample's verified result.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// Recomputed distance of the adversarial point (`inf` when there is none).
    pub distance: f64,
    pub success: bool,
}

/// The active rows of a pass.
struct Active {
    pos: Vec<usize>,
    x0: Tensor,
    label: Tensor,
    best: Tensor,
    best_adv: Tensor,
    state: Vec<Tensor>,
    steps: Vec<usize>,
    stall: Vec<usize>,
    seconds: Vec<f64>,
}

/// Where the final bisection looks past a point the search left only weakly adversarial (a gap
/// within rounding of the boundary): 1.0001, 1.001, 1.01 and 1.1 times its segment.
const OVERSHOOTS: &[f64] = &[1.0001, 1.001, 1.01, 1.1];

fn keep(t: &Tensor, rows: &Tensor) -> Tensor {
    t.index_select(0, rows)
}

fn index_tensor(v: &[usize], device: tch::Device) -> Tensor {
    Tensor::from_slice(&v.iter().map(|&p| p as i64).collect::<Vec<_>>()).to_device(device)
}

impl Chunk {
    /// A chunk of clean inputs whose attacked labels are `label`; already-misclassified samples
    /// start (and stay) at distance 0 with the clean input as their adversarial point.
    pub fn new(x0: Tensor, label: Tensor, seeds: Vec<u64>, already: &[bool]) -> Self {
        let n = seeds.len();
        let zero = Tensor::from_slice(already).to_device(x0.device());
        let best = Tensor::full([n as i64], f64::INFINITY, (Kind::Double, x0.device()))
            .masked_fill(&zero, 0.0);
        Chunk {
            best_adv: x0.copy(),
            x0,
            label,
            seeds,
            best,
            forwards: vec![0; n],
            backwards: vec![0; n],
            seconds: vec![0.0; n],
            winner: vec!["none"; n],
        }
    }

    pub fn len(&self) -> usize {
        self.seeds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seeds.is_empty()
    }

    /// Passes one attack over the chunk, keeping per sample the smallest distance.
    pub fn run(
        &mut self,
        model: &dyn Classifier,
        norm: Norm,
        attack: &dyn AttackStep,
        batch_size: usize,
    ) -> Result<()> {
        self.run_with(model, norm, attack, batch_size, &NoProgress)
    }

    /// [`Chunk::run`] reporting every step: each sample counts `budget.steps` units, one per
    /// step it takes, the rest when it leaves early (or at once when it is already adversarial).
    pub fn run_with(
        &mut self,
        model: &dyn Classifier,
        norm: Norm,
        attack: &dyn AttackStep,
        batch_size: usize,
        progress: &dyn Progress,
    ) -> Result<()> {
        let device = model.device();
        let budget = attack.budget();
        let best0 = to_vec_f64(&self.best)?;
        // Samples at distance 0 are already adversarial: nothing to attack.
        let skipped = best0.iter().filter(|&&b| b <= 0.0).count();
        progress.inc((skipped * budget.steps) as u64);
        let mut queue = (0..self.len()).filter(|&i| best0[i] > 0.0);
        let mut ctx = Ctx::new(model, norm);
        let mut act: Option<Active> = None;
        loop {
            let room = batch_size.saturating_sub(act.as_ref().map_or(0, |a| a.pos.len()));
            let new: Vec<usize> = queue.by_ref().take(room).collect();
            if !new.is_empty() {
                let mut sub = Ctx::new(model, norm);
                sub.forwards = vec![0; new.len()];
                sub.backwards = vec![0; new.len()];
                let idx = index_tensor(&new, device);
                let seeds: Vec<u64> = new.iter().map(|&p| self.seeds[p]).collect();
                let x0 = keep(&self.x0, &idx);
                let label = keep(&self.label, &idx);
                let best = keep(&self.best, &idx);
                let best_adv = keep(&self.best_adv, &idx);
                let step = Tensor::zeros([new.len() as i64], (Kind::Double, device));
                let t0 = Instant::now();
                let state = attack.init(
                    &mut sub,
                    &BatchView {
                        x0: &x0,
                        label: &label,
                        step: &step,
                        best: &best,
                        best_adv: &best_adv,
                        seeds: &seeds,
                    },
                )?;
                let per = t0.elapsed().as_secs_f64() / new.len() as f64;
                let fresh = Active {
                    steps: vec![0; new.len()],
                    stall: vec![0; new.len()],
                    seconds: vec![per; new.len()],
                    pos: new,
                    x0,
                    label,
                    best,
                    best_adv,
                    state,
                };
                act = Some(match act.take() {
                    None => {
                        ctx.forwards = sub.forwards;
                        ctx.backwards = sub.backwards;
                        fresh
                    }
                    Some(a) => {
                        ctx.forwards.extend(sub.forwards);
                        ctx.backwards.extend(sub.backwards);
                        merge(a, fresh)
                    }
                });
            }
            let Some(a) = act.as_mut() else { break };
            let t0 = Instant::now();
            let step = Tensor::from_slice(&a.steps.iter().map(|&s| s as f64).collect::<Vec<_>>())
                .to_device(device);
            let cand = attack.step(
                &mut ctx,
                &BatchView {
                    x0: &a.x0,
                    label: &a.label,
                    step: &step,
                    best: &a.best,
                    best_adv: &a.best_adv,
                    seeds: &[],
                },
                &mut a.state,
            )?;
            let dist = norm64(norm, &(&cand.x - &a.x0));
            let better = cand.is_adv.logical_and(&dist.lt_tensor(&a.best));
            let big = better.logical_and(&dist.lt_tensor(&(&a.best * (1.0 - MIN_IMPROVEMENT))));
            a.best = dist.where_self(&better, &a.best);
            a.best_adv = cand.x.where_self(&per_sample(&better, &a.x0), &a.best_adv);
            let big = Vec::<bool>::try_from(big.to_device(tch::Device::Cpu))?;
            let found = Vec::<bool>::try_from(a.best.isfinite().to_device(tch::Device::Cpu))?;
            let per = t0.elapsed().as_secs_f64() / a.pos.len() as f64;
            let mut done = Vec::new();
            for i in 0..a.pos.len() {
                a.steps[i] += 1;
                a.seconds[i] += per;
                if big[i] {
                    a.stall[i] = 0;
                } else if found[i] {
                    a.stall[i] += 1;
                }
                done.push(a.steps[i] >= budget.steps || a.stall[i] >= budget.patience);
            }
            let left_early: usize = (0..done.len())
                .filter(|&i| done[i])
                .map(|i| budget.steps.saturating_sub(a.steps[i]))
                .sum();
            progress.inc((a.pos.len() + left_early) as u64);
            if done.iter().any(|&d| d) {
                let (fin, stay): (Vec<usize>, Vec<usize>) = (0..done.len()).partition(|&i| done[i]);
                self.write_back(a, &fin, &ctx, budget.name, &best0)?;
                if stay.is_empty() {
                    act = None;
                    ctx.forwards.clear();
                    ctx.backwards.clear();
                } else {
                    let rows = index_tensor(&stay, device);
                    a.x0 = keep(&a.x0, &rows);
                    a.label = keep(&a.label, &rows);
                    a.best = keep(&a.best, &rows);
                    a.best_adv = keep(&a.best_adv, &rows);
                    a.state = a.state.iter().map(|t| keep(t, &rows)).collect();
                    let pick = |v: &[usize]| stay.iter().map(|&i| v[i]).collect::<Vec<_>>();
                    a.pos = pick(&a.pos);
                    a.steps = pick(&a.steps);
                    a.stall = pick(&a.stall);
                    a.seconds = stay.iter().map(|&i| a.seconds[i]).collect();
                    ctx.forwards = stay.iter().map(|&i| ctx.forwards[i]).collect();
                    ctx.backwards = stay.iter().map(|&i| ctx.backwards[i]).collect();
                }
            }
        }
        Ok(())
    }

    fn write_back(
        &mut self,
        a: &Active,
        rows: &[usize],
        ctx: &Ctx,
        name: &'static str,
        best0: &[f64],
    ) -> Result<()> {
        let device = self.x0.device();
        let src = index_tensor(rows, device);
        let pos: Vec<usize> = rows.iter().map(|&i| a.pos[i]).collect();
        let dst = index_tensor(&pos, device);
        let _ = self.best.index_copy_(0, &dst, &keep(&a.best, &src));
        let _ = self.best_adv.index_copy_(0, &dst, &keep(&a.best_adv, &src));
        let best = to_vec_f64(&keep(&a.best, &src))?;
        for (k, (&i, &p)) in rows.iter().zip(&pos).enumerate() {
            self.forwards[p] += ctx.forwards[i];
            self.backwards[p] += ctx.backwards[i];
            self.seconds[p] += a.seconds[i];
            if best[k] < best0[p] {
                self.winner[p] = name;
            }
        }
        Ok(())
    }

    /// Shrinks every adversarial point towards its clean input by bisection on the segment
    /// (forward passes only), keeping the closest point that is strictly adversarial
    /// ([`beyond_boundary`] at [`SEARCH_GAP_RTOL`], so the result passes [`Chunk::verify`]). A
    /// point the search left only weakly adversarial is first pushed outwards along its segment
    /// ([`OVERSHOOTS`]); with `steps` 0 that push is all it does.
    pub fn refine(
        &mut self,
        model: &dyn Classifier,
        norm: Norm,
        steps: usize,
        batch_size: usize,
    ) -> Result<()> {
        self.refine_with(model, norm, steps, batch_size, &NoProgress)
    }

    /// [`Chunk::refine`] reporting `steps` units per sample, one per bisection step.
    pub fn refine_with(
        &mut self,
        model: &dyn Classifier,
        norm: Norm,
        steps: usize,
        batch_size: usize,
        progress: &dyn Progress,
    ) -> Result<()> {
        let best = to_vec_f64(&self.best)?;
        let todo: Vec<usize> = (0..self.len())
            .filter(|&i| best[i].is_finite() && best[i] > 0.0)
            .collect();
        progress.inc(((self.len() - todo.len()) * steps) as u64);
        let device = self.x0.device();
        for part in todo.chunks(batch_size.max(1)) {
            let t0 = Instant::now();
            let idx = index_tensor(part, device);
            let x0 = keep(&self.x0, &idx);
            let adv = keep(&self.best_adv, &idx);
            let label = keep(&self.label, &idx);
            let dir = &adv - &x0;
            let mut ctx = Ctx::new(model, norm);
            ctx.forwards = vec![0; part.len()];
            let mut lo = Tensor::zeros([part.len() as i64], (Kind::Float, device));
            let mut hi = Tensor::ones([part.len() as i64], (Kind::Float, device));
            // The point at fraction `t` of each segment, and whether it is strictly adversarial.
            let at = |t: &Tensor| (&x0 + per_sample(t, &x0) * &dir).clamp(0.0, 1.0);
            let strict = |ctx: &mut Ctx, t: &Tensor| -> Result<Tensor> {
                Ok(beyond_boundary(
                    &ctx.forward(&at(t))?,
                    &label,
                    SEARCH_GAP_RTOL,
                ))
            };
            let mut ok = strict(&mut ctx, &hi)?;
            for &t in OVERSHOOTS {
                if bool::try_from(ok.all())? {
                    break;
                }
                let further = hi.where_self(&ok, &hi.full_like(t));
                let now = strict(&mut ctx, &further)?;
                hi = further.where_self(&now, &hi);
                ok = ok.logical_or(&now);
            }
            for _ in 0..steps {
                let mid = (&lo + &hi) * 0.5;
                let wrong = strict(&mut ctx, &mid)?;
                hi = mid.where_self(&wrong, &hi);
                lo = lo.where_self(&wrong, &mid);
                progress.inc(part.len() as u64);
            }
            let x = at(&hi);
            let dist = norm64(norm, &(&x - &x0));
            let _ = self.best_adv.index_copy_(0, &idx, &x);
            let _ = self.best.index_copy_(0, &idx, &dist);
            let per = t0.elapsed().as_secs_f64() / part.len() as f64;
            for (k, &p) in part.iter().enumerate() {
                self.forwards[p] += ctx.forwards[k];
                self.seconds[p] += per;
            }
        }
        Ok(())
    }

    /// Re-checks every adversarial point with a forward pass and recomputes its distance; a point
    /// whose logit gap does not exceed [`GAP_RTOL`] of the logit scale (a tie, or one that
    /// rounding could flip back) is reported as a failure (`inf`), never as a margin. A sample
    /// already misclassified (distance 0, the clean input) stays a success at 0.
    pub fn verify(
        &mut self,
        model: &dyn Classifier,
        norm: Norm,
        batch_size: usize,
    ) -> Result<Vec<Verified>> {
        let mut out = Vec::with_capacity(self.len());
        let device = self.x0.device();
        let all: Vec<usize> = (0..self.len()).collect();
        for part in all.chunks(batch_size.max(1)) {
            let t0 = Instant::now();
            let idx = index_tensor(part, device);
            let adv = keep(&self.best_adv, &idx);
            let mut ctx = Ctx::new(model, norm);
            ctx.forwards = vec![0; part.len()];
            let wrong = Vec::<bool>::try_from(
                beyond_boundary(&ctx.forward(&adv)?, &keep(&self.label, &idx), GAP_RTOL)
                    .to_device(tch::Device::Cpu),
            )?;
            let dist = to_vec_f64(&norm64(norm, &(&adv - keep(&self.x0, &idx))))?;
            let claimed = to_vec_f64(&keep(&self.best, &idx))?;
            let per = t0.elapsed().as_secs_f64() / part.len() as f64;
            for (k, &p) in part.iter().enumerate() {
                self.forwards[p] += ctx.forwards[k];
                self.seconds[p] += per;
                let success = claimed[k].is_finite() && (wrong[k] || claimed[k] == 0.0);
                out.push(Verified {
                    distance: if success { dist[k] } else { f64::INFINITY },
                    success,
                });
            }
        }
        Ok(out)
    }
}

fn merge(a: Active, b: Active) -> Active {
    let cat = |x: &Tensor, y: &Tensor| Tensor::cat(&[x, y], 0);
    let join = |mut x: Vec<usize>, y: Vec<usize>| {
        x.extend(y);
        x
    };
    let mut seconds = a.seconds;
    seconds.extend(b.seconds);
    Active {
        x0: cat(&a.x0, &b.x0),
        label: cat(&a.label, &b.label),
        best: cat(&a.best, &b.best),
        best_adv: cat(&a.best_adv, &b.best_adv),
        state: a
            .state
            .iter()
            .zip(&b.state)
            .map(|(x, y)| cat(x, y))
            .collect(),
        pos: join(a.pos, b.pos),
        steps: join(a.steps, b.steps),
        stall: join(a.stall, b.stall),
        seconds,
    }
}
