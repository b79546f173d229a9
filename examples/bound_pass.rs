//! One bound pass of `brittle certify` at a fixed ε, timed as `bench/certify.py` times
//! auto_LiRPA's `compute_bounds`: the first N images of a data file in one batch, the best of
//! three calls after an untimed one. A radius's passes (what `brittle certify` reports) run at
//! the ε of the bisection, whose first ones are wider and cost more; this is the like-for-like
//! figure. Prints one JSON object.
//!
//! cargo run --release --example bound_pass -- --model M.onnx [--mean a,b,c --std a,b,c]
//!     --data D [--n 16] [--eps 0.00392] [--method crown] [--norm linf] [--threads 1]

use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use brittle::certify::{bound_graph, margin_lower_bounds, Method};
use brittle::data::DataSpec;
use brittle::model::normalize::parse_channel_values;
use brittle::model::{load_classifier, ModelSpec};
use brittle::norm::Norm;
use tch::{Device, Kind, Tensor};

fn arg(args: &[String], name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str, default: &str| arg(&args, name).unwrap_or_else(|| default.to_owned());
    let n: usize = get("--n", "16").parse().context("--n")?;
    let eps: f64 = get("--eps", &(1.0 / 255.0).to_string())
        .parse()
        .context("--eps")?;
    let method: Method = get("--method", "crown")
        .parse()
        .map_err(|e| anyhow!("--method: {e}"))?;
    let norm: Norm = get("--norm", "linf").parse().context("--norm")?;
    tch::set_num_threads(get("--threads", "1").parse().context("--threads")?);
    let mut spec = ModelSpec::new(
        arg(&args, "--model").context("--model is required")?,
        Device::Cpu,
    );
    let channels = |flag| arg(&args, flag).map(|s| parse_channel_values(&s).context(flag));
    spec.mean = channels("--mean").transpose()?;
    spec.std = channels("--std").transpose()?;
    let data = DataSpec {
        path: arg(&args, "--data").context("--data is required")?.into(),
        limit: Some(n),
        ..Default::default()
    }
    .load()?;
    let model = load_classifier(&spec, data.input_shape())?;
    let graph = bound_graph(model.as_ref())?;
    let (x, _) = data.batch(0, data.len());
    let pred = model.logits(&x)?.argmax(1, false);
    let e = Tensor::full([data.len() as i64], eps, (Kind::Float, Device::Cpu));
    let pass = || margin_lower_bounds(&graph, &x, &pred, &e, norm, method);
    // An untimed call first (allocator and oneDNN warm-up).
    let _ = pass()?;
    let (mut best, mut certified) = (f64::INFINITY, 0);
    for _ in 0..3 {
        let t0 = Instant::now();
        let lb = pass()?;
        best = best.min(t0.elapsed().as_secs_f64());
        certified = lb
            .amin([1].as_slice(), false)
            .gt(0.0)
            .sum(Kind::Int64)
            .int64_value(&[]);
    }
    let json = serde_json::json!({
        "n": data.len(),
        "eps": eps,
        "method": method.as_ref(),
        "s_per_call": best,
        "s_per_sample_pass": best / data.len() as f64,
        "certified": certified,
    });
    println!("{json}");
    Ok(())
}
