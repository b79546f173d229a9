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

use super::rows::{Pick, Rows};
use super::toolkit::{norm64, per_sample};
use super::{beyond_boundary, AttackStep, BatchView, Ctx, GAP_RTOL, SEARCH_GAP_RTOL};
use crate::model::Classifier;
use crate::norm::Norm;
use crate::rows;
use crate::util::{to_vec_f64, NoProgress, Progress};

/// Relative improvement of the best distance that resets a sample's patience.
const MIN_IMPROVEMENT: f64 = 1e-3;

/// An attack as a [`super::plan::Plan`] holds it: any [`AttackStep`], its state type erased.
pub trait Pass: std::fmt::Debug {
    fn budget(&self) -> super::Budget;
    /// Passes the attack over `chunk` ([`Chunk::run_with`]).
    fn run_on(
        &self,
        chunk: &mut Chunk,
        model: &dyn Classifier,
        norm: Norm,
        batch_size: usize,
        progress: &dyn Progress,
    ) -> Result<()>;
}

impl<A: AttackStep> Pass for A {
    fn budget(&self) -> super::Budget {
        AttackStep::budget(self)
    }

    fn run_on(
        &self,
        chunk: &mut Chunk,
        model: &dyn Classifier,
        norm: Norm,
        batch_size: usize,
        progress: &dyn Progress,
    ) -> Result<()> {
        chunk.drive(model, norm, self, batch_size, progress)
    }
}

/// A group of samples attacked together, with the best point found so far for each.
pub struct Chunk {
    /// Clean inputs `[N, C, H, W]` on the model's device.
    pub x0: Tensor,
    /// Attacked labels `[N]`.
    pub label: Tensor,
    pub seeds: Vec<u64>,
    /// Best distance `[N]` float64 of a strictly adversarial point ([`Candidate`]): the result
    /// (`inf`: nothing found yet, 0: already misclassified).
    pub best: Tensor,
    pub best_adv: Tensor,
    /// The closest misclassified point, strict or not: the point the passes follow (their step
    /// rules were tuned on argmax flips), and where the final bisection starts when it can be
    /// pushed past the boundary closer than `best`. `lead <= best`.
    pub lead: Tensor,
    pub lead_adv: Tensor,
    pub forwards: Vec<u64>,
    pub backwards: Vec<u64>,
    pub seconds: Vec<f64>,
    /// The attack that found `best`, and the one that found `lead`.
    pub winner: Vec<&'static str>,
    pub lead_winner: Vec<&'static str>,
}

/// A sample's verified result.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// Recomputed distance of the adversarial point (`inf` when there is none).
    pub distance: f64,
    pub success: bool,
}

/// A chunk's per-sample rows that an attack reads: clean input, label, best and lead points.
struct SampleRows {
    x0: Tensor,
    label: Tensor,
    best: Tensor,
    best_adv: Tensor,
    lead: Tensor,
    lead_adv: Tensor,
}
rows!(SampleRows {
    x0,
    label,
    best,
    best_adv,
    lead,
    lead_adv
});

impl SampleRows {
    /// What a pass sees: the lead (see [`Chunk::lead`]).
    fn view<'a>(&'a self, step: &'a Tensor, seeds: &'a [u64]) -> BatchView<'a> {
        BatchView {
            x0: &self.x0,
            label: &self.label,
            step,
            best: &self.lead,
            best_adv: &self.lead_adv,
            seeds,
        }
    }
}

/// The driver's rows of the samples an attack works on.
struct Active<'m, S> {
    /// Where each row's sample sits in the chunk.
    pos: Vec<usize>,
    rows: SampleRows,
    state: S,
    /// Evaluation counters.
    ctx: Ctx<'m>,
    steps: Vec<usize>,
    stall: Vec<usize>,
    seconds: Vec<f64>,
}

impl<S: Rows> Rows for Active<'_, S> {
    fn select_rows(&self, pick: &Pick) -> Self {
        Active {
            pos: self.pos.select_rows(pick),
            rows: self.rows.select_rows(pick),
            state: self.state.select_rows(pick),
            ctx: self.ctx.select_rows(pick),
            steps: self.steps.select_rows(pick),
            stall: self.stall.select_rows(pick),
            seconds: self.seconds.select_rows(pick),
        }
    }

    fn append_rows(self, o: Self) -> Self {
        Active {
            pos: self.pos.append_rows(o.pos),
            rows: self.rows.append_rows(o.rows),
            state: self.state.append_rows(o.state),
            ctx: self.ctx.append_rows(o.ctx),
            steps: self.steps.append_rows(o.steps),
            stall: self.stall.append_rows(o.stall),
            seconds: self.seconds.append_rows(o.seconds),
        }
    }
}

/// Where the final bisection looks past a point that is only weakly adversarial (a gap within
/// rounding of the boundary), in multiples of its segment. The large ones are for near-ties: a
/// sample whose clean logit gap is itself within a few [`SEARCH_GAP_RTOL`]s of the logits'
/// scale must go well past the argmax boundary the passes converge to (resnet_2b pool image
/// 497, clean gap 1.6e-4: about 1.4 times).
pub const OVERSHOOTS: &[f64] = &[1.0, 1.0001, 1.001, 1.01, 1.1, 1.5, 2.0, 4.0];

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
            lead_adv: x0.copy(),
            lead: best.copy(),
            x0,
            label,
            seeds,
            best,
            forwards: vec![0; n],
            backwards: vec![0; n],
            seconds: vec![0.0; n],
            winner: vec!["none"; n],
            lead_winner: vec!["none"; n],
        }
    }

    pub fn len(&self) -> usize {
        self.seeds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seeds.is_empty()
    }

    /// The chunk's rows for the samples in `pick`.
    fn rows(&self, pick: &Pick) -> SampleRows {
        SampleRows {
            x0: self.x0.shallow_clone(),
            label: self.label.shallow_clone(),
            best: self.best.shallow_clone(),
            best_adv: self.best_adv.shallow_clone(),
            lead: self.lead.shallow_clone(),
            lead_adv: self.lead_adv.shallow_clone(),
        }
        .select_rows(pick)
    }

    /// Passes one attack over the chunk, keeping per sample the smallest distance.
    pub fn run(
        &mut self,
        model: &dyn Classifier,
        norm: Norm,
        attack: &dyn Pass,
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
        attack: &dyn Pass,
        batch_size: usize,
        progress: &dyn Progress,
    ) -> Result<()> {
        attack.run_on(self, model, norm, batch_size, progress)
    }

    /// The one driver loop, for any attack: admit samples from the queue up to `batch_size`,
    /// step them all, retire those out of steps or patience.
    fn drive<A: AttackStep + ?Sized>(
        &mut self,
        model: &dyn Classifier,
        norm: Norm,
        attack: &A,
        batch_size: usize,
        progress: &dyn Progress,
    ) -> Result<()> {
        let device = model.device();
        let budget = attack.budget();
        let best0 = (to_vec_f64(&self.best)?, to_vec_f64(&self.lead)?);
        // Samples at distance 0 are already adversarial: nothing to attack.
        let skipped = best0.0.iter().filter(|&&b| b <= 0.0).count();
        progress.inc((skipped * budget.steps) as u64);
        let mut queue = (0..self.len()).filter(|&i| best0.0[i] > 0.0);
        let mut act: Option<Active<A::State>> = None;
        loop {
            let room = batch_size.saturating_sub(act.as_ref().map_or(0, |a| a.pos.len()));
            let new: Vec<usize> = queue.by_ref().take(room).collect();
            if !new.is_empty() {
                let fresh = self.admit(model, norm, attack, new)?;
                act = Some(match act.take() {
                    None => fresh,
                    Some(a) => a.append_rows(fresh),
                });
            }
            let Some(a) = act.as_mut() else { break };
            let t0 = Instant::now();
            let step = Tensor::from_slice(&a.steps.iter().map(|&s| s as f64).collect::<Vec<_>>())
                .to_device(device);
            let cand = attack.step(&mut a.ctx, &a.rows.view(&step, &[]), &mut a.state)?;
            let r = &mut a.rows;
            let dist = norm64(norm, &(&cand.x - &r.x0));
            let closer = cand.is_adv.logical_and(&dist.lt_tensor(&r.lead));
            let big = closer.logical_and(&dist.lt_tensor(&(&r.lead * (1.0 - MIN_IMPROVEMENT))));
            r.lead = dist.where_self(&closer, &r.lead);
            r.lead_adv = cand.x.where_self(&per_sample(&closer, &r.x0), &r.lead_adv);
            let better = cand.strict.logical_and(&dist.lt_tensor(&r.best));
            r.best = dist.where_self(&better, &r.best);
            r.best_adv = cand.x.where_self(&per_sample(&better, &r.x0), &r.best_adv);
            let big = Vec::<bool>::try_from(big.to_device(tch::Device::Cpu))?;
            let found = Vec::<bool>::try_from(r.lead.isfinite().to_device(tch::Device::Cpu))?;
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
                done.push(
                    a.steps[i] >= budget.steps
                        || a.stall[i] >= budget.patience
                        || (found[i] && a.steps[i] >= budget.once_found),
                );
            }
            let left_early: usize = (0..done.len())
                .filter(|&i| done[i])
                .map(|i| budget.steps.saturating_sub(a.steps[i]))
                .sum();
            progress.inc((a.pos.len() + left_early) as u64);
            if done.iter().any(|&d| d) {
                let (fin, stay): (Vec<usize>, Vec<usize>) = (0..done.len()).partition(|&i| done[i]);
                self.write_back(&a.select_rows(&Pick::new(fin, device)), budget.name, &best0)?;
                act = if stay.is_empty() {
                    None
                } else {
                    Some(a.select_rows(&Pick::new(stay, device)))
                };
            }
        }
        Ok(())
    }

    /// The rows of newly admitted samples (chunk positions `new`), their attack state initialised.
    fn admit<'m, A: AttackStep + ?Sized>(
        &self,
        model: &'m dyn Classifier,
        norm: Norm,
        attack: &A,
        new: Vec<usize>,
    ) -> Result<Active<'m, A::State>> {
        let n = new.len();
        let pick = Pick::new(new, model.device());
        let rows = self.rows(&pick);
        let seeds = self.seeds.select_rows(&pick);
        let step = Tensor::zeros([n as i64], (Kind::Double, model.device()));
        let mut ctx = Ctx::for_samples(model, norm, n);
        let t0 = Instant::now();
        let state = attack.init(&mut ctx, &rows.view(&step, &seeds))?;
        let per = t0.elapsed().as_secs_f64() / n as f64;
        Ok(Active {
            pos: pick.rows,
            rows,
            state,
            ctx,
            steps: vec![0; n],
            stall: vec![0; n],
            seconds: vec![per; n],
        })
    }

    /// Folds finished rows into the chunk: best and lead points, costs and the winning attack.
    /// `before` holds every sample's best and lead distances before the pass.
    fn write_back<S>(
        &mut self,
        a: &Active<S>,
        name: &'static str,
        before: &(Vec<f64>, Vec<f64>),
    ) -> Result<()> {
        let dst = Pick::new(a.pos.clone(), self.x0.device());
        let r = &a.rows;
        for (to, from) in [
            (&mut self.best, &r.best),
            (&mut self.best_adv, &r.best_adv),
            (&mut self.lead, &r.lead),
            (&mut self.lead_adv, &r.lead_adv),
        ] {
            let _ = to.index_copy_(0, &dst.index, from);
        }
        let (best, lead) = (to_vec_f64(&r.best)?, to_vec_f64(&r.lead)?);
        for (k, &p) in a.pos.iter().enumerate() {
            self.forwards[p] += a.ctx.forwards[k];
            self.backwards[p] += a.ctx.backwards[k];
            self.seconds[p] += a.seconds[k];
            if best[k] < before.0[p] {
                self.winner[p] = name;
            }
            if lead[k] < before.1[p] {
                self.lead_winner[p] = name;
            }
        }
        Ok(())
    }

    /// Shrinks every adversarial point towards its clean input by bisection on the segment
    /// (forward passes only), keeping the closest point that is strictly adversarial
    /// ([`beyond_boundary`] at [`SEARCH_GAP_RTOL`], so the result passes [`Chunk::verify`]). The
    /// segment ends at the lead pushed outwards along its segment ([`OVERSHOOTS`]) until strictly
    /// adversarial, where that is closer than the best point, else at the best point (pushed
    /// likewise if this batch's kernels leave it weakly adversarial); with `steps` 0 that push is
    /// all it does.
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
        let closest = to_vec_f64(&self.lead.minimum(&self.best))?;
        let todo: Vec<usize> = (0..self.len())
            .filter(|&i| closest[i].is_finite() && closest[i] > 0.0)
            .collect();
        progress.inc(((self.len() - todo.len()) * steps) as u64);
        let device = self.x0.device();
        for part in todo.chunks(batch_size.max(1)) {
            let t0 = Instant::now();
            let pick = Pick::new(part.to_vec(), device);
            let r = self.rows(&pick);
            let x0 = &r.x0;
            let mut ctx = Ctx::for_samples(model, norm, part.len());
            // The point at fraction `t` of each segment, and whether it is strictly adversarial.
            let at =
                |end: &Tensor, t: &Tensor| (x0 + per_sample(t, x0) * (end - x0)).clamp(0.0, 1.0);
            let strict = |ctx: &mut Ctx, x: &Tensor| -> Result<Tensor> {
                Ok(beyond_boundary(&ctx.forward(x)?, &r.label, SEARCH_GAP_RTOL))
            };
            // Push each end out until strictly adversarial: `(t, ok)`, the smallest overshoot
            // (`t` 1 where none works).
            let push = |ctx: &mut Ctx, end: &Tensor, want: &Tensor| -> Result<(Tensor, Tensor)> {
                let mut t = want.ones_like().to_kind(Kind::Float);
                let mut ok = want.zeros_like();
                for &f in OVERSHOOTS {
                    let open = want.logical_and(&ok.logical_not());
                    if !bool::try_from(open.any())? {
                        break;
                    }
                    let now = strict(ctx, &at(end, &t.full_like(f)))?.logical_and(&open);
                    t = t.full_like(f).where_self(&now, &t);
                    ok = ok.logical_or(&now);
                }
                Ok((t, ok))
            };
            let (t_lead, from_lead) = push(&mut ctx, &r.lead_adv, &r.lead.lt_tensor(&r.best))?;
            let pushed_lead = at(&r.lead_adv, &t_lead);
            let closer = norm64(norm, &(&pushed_lead - x0)).lt_tensor(&r.best);
            let from_lead = from_lead.logical_and(&closer);
            // Only rows with a strict best point to fall back on: elsewhere the best point is
            // the clean input, which no push makes adversarial.
            let fall_back = from_lead.logical_not().logical_and(&r.best.isfinite());
            let (t_best, _) = push(&mut ctx, &r.best_adv, &fall_back)?;
            let end =
                pushed_lead.where_self(&per_sample(&from_lead, x0), &at(&r.best_adv, &t_best));
            let mut lo = Tensor::zeros([part.len() as i64], (Kind::Float, device));
            let mut hi = Tensor::ones([part.len() as i64], (Kind::Float, device));
            for _ in 0..steps {
                let mid = (&lo + &hi) * 0.5;
                let wrong = strict(&mut ctx, &at(&end, &mid))?;
                hi = mid.where_self(&wrong, &hi);
                lo = lo.where_self(&wrong, &mid);
                progress.inc(part.len() as u64);
            }
            // A sample with neither a strict best point nor a lead that could be pushed past the
            // boundary keeps none: `verify` reports it as a failure.
            let x = at(&end, &hi);
            let found = from_lead.logical_or(&r.best.isfinite());
            let dist = norm64(norm, &(&x - x0)).masked_fill(&found.logical_not(), f64::INFINITY);
            let _ = self.best_adv.index_copy_(0, &pick.index, &x);
            let _ = self.best.index_copy_(0, &pick.index, &dist);
            let from_lead = Vec::<bool>::try_from(from_lead.to_device(tch::Device::Cpu))?;
            let per = t0.elapsed().as_secs_f64() / part.len() as f64;
            for (k, &p) in part.iter().enumerate() {
                self.forwards[p] += ctx.forwards[k];
                self.seconds[p] += per;
                if from_lead[k] {
                    self.winner[p] = self.lead_winner[p];
                }
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
            let r = self.rows(&Pick::new(part.to_vec(), device));
            let mut ctx = Ctx::for_samples(model, norm, part.len());
            let wrong = Vec::<bool>::try_from(
                beyond_boundary(&ctx.forward(&r.best_adv)?, &r.label, GAP_RTOL)
                    .to_device(tch::Device::Cpu),
            )?;
            let dist = to_vec_f64(&norm64(norm, &(&r.best_adv - &r.x0)))?;
            let claimed = to_vec_f64(&r.best)?;
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
