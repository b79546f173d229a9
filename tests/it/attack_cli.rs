//! `brittle margins` end to end on a tiny TorchScript CNN (tests/fixtures/attack, made by
//! scripts/fixtures/attack.py): verified adversarial examples, kill -9 and resume, shards and
//! merge. Files must match an uninterrupted run byte for byte except the `seconds` column.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tch::{CModule, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/attack")
        .join(name)
}

fn margins(out: &Path, extra: &[&str]) -> Command {
    margins_on(&fixture("tiny.bin"), out, extra)
}

fn margins_on(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_brittle"));
    c.args(["margins", "--model"])
        .arg(fixture("tiny_cnn.pt"))
        .arg("--data")
        .arg(data)
        .args([
            "--device",
            "cpu",
            "--threads",
            "1",
            "--seed",
            "5",
            "--batch-size",
            "4",
            "--chunk",
            "4",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .env("BRITTLE_NO_PROGRESS", "1")
        .stdout(Stdio::null());
    c
}

fn run_ok(mut c: Command) {
    let out = c.stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The file without its `seconds` column.
fn without_seconds(p: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(p).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let s = header.iter().position(|h| *h == "seconds").unwrap();
    text.lines()
        .map(|l| {
            l.split(',')
                .enumerate()
                .filter(|(i, _)| *i != s)
                .map(|(_, v)| v)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// Rewrites the attack pipeline recorded in a margins file's sidecar, as an older brittle with
/// other attack parameters would have written it.
fn record_other_plan(csv: &Path) {
    let meta = PathBuf::from(format!("{}.meta.json", csv.display()));
    let mut side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    assert!(
        side["plan"].as_str().unwrap().contains("; bisection "),
        "{side}"
    );
    side["plan"] = "Fmn { norm: Linf, steps: 150, alpha_init: 2.0 }; bisection 0".into();
    std::fs::write(&meta, side.to_string()).unwrap();
}

/// The adversarial examples of `--save-adv` as numpy reads them: float32 `[N, C, H, W]`
/// (written by npyz, whose `(N, C, H, W, )` shape `tch::Tensor::read_npy` cannot parse).
fn read_adv(p: &Path) -> Tensor {
    let npy = npyz::NpyFile::new(std::fs::File::open(p).unwrap()).unwrap();
    assert_eq!(npy.dtype(), npyz::DType::Plain("<f4".parse().unwrap()));
    let shape: Vec<i64> = npy.shape().iter().map(|&d| d as i64).collect();
    Tensor::from_slice(&npy.into_vec::<f32>().unwrap()).view(shape.as_slice())
}

fn data_rows(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|t| t.lines().count().saturating_sub(1))
        .unwrap_or(0)
}

#[test]
fn every_success_flips_the_prediction_at_the_reported_distance() {
    let dir = tempfile::tempdir().unwrap();
    let (out, adv) = (dir.path().join("m.csv"), dir.path().join("adv.npy"));
    run_ok({
        let mut c = margins(&out, &["--attack", "best", "--norm", "l2", "--save-adv"]);
        c.arg(&adv);
        c
    });
    let rows = brittle::margins::read_margins(&out).unwrap();
    assert_eq!(rows.len(), 48);
    let model = CModule::load(fixture("tiny_cnn.pt")).unwrap();
    let adv = read_adv(&adv);
    assert_eq!(adv.size(), [48, 3, 32, 32]);
    let mut data = std::fs::read(fixture("tiny.bin")).unwrap();
    let labels: Vec<u8> = data.chunks(3073).map(|r| r[0]).collect();
    data.retain({
        let mut i = 0usize;
        move |_| {
            i += 1;
            !(i - 1).is_multiple_of(3073)
        }
    });
    let x = Tensor::from_slice(&data)
        .to_kind(Kind::Float)
        .view([48, 3, 32, 32])
        / 255.0;
    let pred_x = model.forward_ts(&[&x]).unwrap().argmax(1, false);
    let pred_adv = model.forward_ts(&[&adv]).unwrap().argmax(1, false);
    let dist = (&adv - &x)
        .flatten(1, -1)
        .to_kind(Kind::Double)
        .norm_scalaropt_dim(2, [1].as_slice(), false);
    let mut successes = 0;
    for r in &rows {
        let i = r.index as i64;
        assert_eq!(r.label, labels[r.index] as i64);
        assert_eq!(r.pred, pred_x.int64_value(&[i]));
        if r.success == 1 {
            successes += 1;
            assert_ne!(
                pred_adv.int64_value(&[i]),
                r.pred,
                "sample {i}: not adversarial"
            );
            let d = dist.double_value(&[i]);
            assert!(
                (d - r.input_margin).abs() <= 1e-6 * d.max(1e-3),
                "sample {i}: {d} vs {}",
                r.input_margin
            );
            assert!(r.forwards > 0 && r.backwards > 0);
        } else {
            assert!(r.input_margin.is_infinite());
        }
    }
    assert!(successes >= 46, "{successes} successes");
}

#[test]
fn a_killed_run_resumes_to_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.csv");
    let args = ["--attack", "fmn", "--steps", "150"];
    run_ok(margins(&full, &args));
    let killed = dir.path().join("killed.csv");
    let mut child = margins(&killed, &args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while data_rows(&killed) < 8 && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = data_rows(&killed);
    assert!(
        (8..48).contains(&partial),
        "killed after {partial} rows: too late to test resumption"
    );
    run_ok(margins(&killed, &args));
    assert_eq!(without_seconds(&full), without_seconds(&killed));
    // Other settings are refused rather than mixed in.
    let out = margins(&killed, &["--attack", "fmn", "--steps", "151"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("other settings"));
    // So is a file made by another version of the attack, with the same settings.
    record_other_plan(&killed);
    let out = margins(&killed, &args).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another version of the attack"));
    // Unless asked to start it again.
    run_ok(margins(
        &killed,
        &[&args[..], &["--restart-stale"]].concat(),
    ));
    assert_eq!(without_seconds(&full), without_seconds(&killed));
}

#[test]
fn shards_merge_into_the_unsharded_file_and_gaps_or_duplicates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--attack", "fab", "--steps", "10", "--norm", "l2"];
    let full = dir.path().join("full.csv");
    run_ok(margins(&full, &args));
    let shards: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("s{i}.csv")))
        .collect();
    for (i, s) in shards.iter().enumerate() {
        let shard = format!("{i}/3");
        let mut a = args.to_vec();
        a.extend(["--shard", &shard]);
        run_ok(margins(s, &a));
        assert!(data_rows(s) < 48);
    }
    let merge = |inputs: &[&PathBuf], out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_brittle"))
            .arg("merge")
            .args(inputs)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let merged = dir.path().join("merged.csv");
    let ok = merge(&[&shards[0], &shards[1], &shards[2]], &merged);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(without_seconds(&full), without_seconds(&merged));
    let missing = merge(&[&shards[0], &shards[2]], &dir.path().join("x.csv"));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("missing"));
    let dup = merge(
        &[&shards[0], &shards[1], &shards[2], &shards[1]],
        &dir.path().join("y.csv"),
    );
    assert!(String::from_utf8_lossy(&dup.stderr).contains("appears in both"));
    // Shards made by different versions of the attack are not merged.
    let older = dir.path().join("older.csv");
    std::fs::copy(&shards[2], &older).unwrap();
    std::fs::copy(
        format!("{}.meta.json", shards[2].display()),
        format!("{}.meta.json", older.display()),
    )
    .unwrap();
    record_other_plan(&older);
    let mixed = merge(&[&shards[0], &shards[1], &older], &dir.path().join("z.csv"));
    assert!(String::from_utf8_lossy(&mixed.stderr).contains("attack versions"));
    // The shard index may come from a Kubernetes indexed job.
    let k8s = dir.path().join("k8s.csv");
    let mut a = args.to_vec();
    a.extend(["--shards", "3"]);
    run_ok({
        let mut c = margins(&k8s, &a);
        c.env("JOB_COMPLETION_INDEX", "1");
        c
    });
    assert_eq!(without_seconds(&k8s), without_seconds(&shards[1]));
}

/// Keeps the header and the first `n` rows, as a run killed after `n` samples leaves the file.
fn truncate_rows(p: &Path, n: usize) {
    let text = std::fs::read_to_string(p).unwrap();
    let kept: Vec<&str> = text.lines().take(n + 1).collect();
    std::fs::write(p, kept.join("\n") + "\n").unwrap();
}

/// `tiny.bin` with the pixels of samples `from..` inverted (labels kept): other images at the
/// same path.
fn write_tiny(p: &Path, invert_from: usize) {
    let mut bytes = std::fs::read(fixture("tiny.bin")).unwrap();
    for (k, record) in bytes.chunks_mut(3073).enumerate() {
        if k >= invert_from {
            record[1..].iter_mut().for_each(|b| *b = 255 - *b);
        }
    }
    std::fs::write(p, bytes).unwrap();
}

#[test]
fn resume_and_merge_check_the_images_not_only_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.bin");
    write_tiny(&data, 48);
    let args = ["--attack", "fmn", "--steps", "20", "--limit", "16"];
    let full = dir.path().join("full.csv");
    run_ok(margins_on(&data, &full, &args));
    let killed = dir.path().join("killed.csv");
    run_ok(margins_on(&data, &killed, &args));
    truncate_rows(&killed, 8);
    // Other images replace the file between the kill and the resume.
    write_tiny(&data, 8);
    let out = margins_on(&data, &killed, &args).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("made from other images than"), "{e}");
    assert_eq!(data_rows(&killed), 8, "the refused resume wrote nothing");
    // The original images resume to the uninterrupted file.
    write_tiny(&data, 48);
    run_ok(margins_on(&data, &killed, &args));
    assert_eq!(without_seconds(&full), without_seconds(&killed));

    // A file from a brittle that recorded no fingerprint cannot be checked: refused, unless
    // started again.
    let meta = PathBuf::from(format!("{}.meta.json", killed.display()));
    let mut side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    assert_eq!(side["data_sha256"].as_str().unwrap().len(), 64);
    side.as_object_mut().unwrap().remove("data_sha256");
    std::fs::write(&meta, side.to_string()).unwrap();
    let out = margins_on(&data, &killed, &args).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not record a fingerprint"));
    run_ok(margins_on(
        &data,
        &killed,
        &[&args[..], &["--restart-stale"]].concat(),
    ));
    assert_eq!(without_seconds(&full), without_seconds(&killed));

    // Shards attacked on different images are not merged.
    let shard = |i: usize, out: &Path| {
        let s = format!("{i}/2");
        run_ok(margins_on(
            &data,
            out,
            &[&args[..], &["--shard", &s]].concat(),
        ));
    };
    let (s0, s1) = (dir.path().join("s0.csv"), dir.path().join("s1.csv"));
    shard(0, &s0);
    write_tiny(&data, 12);
    shard(1, &s1);
    let out = Command::new(env!("CARGO_BIN_EXE_brittle"))
        .arg("merge")
        .args([&s0, &s1])
        .arg("--out")
        .arg(dir.path().join("merged.csv"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("were made from different images"), "{e}");
}

#[test]
fn save_adv_added_on_a_resume_gives_the_complete_file() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--attack", "fmn", "--steps", "20", "--limit", "16"];
    let (full, full_adv) = (dir.path().join("full.csv"), dir.path().join("full.npy"));
    run_ok({
        let mut c = margins(&full, &args);
        c.arg("--save-adv").arg(&full_adv);
        c
    });
    // Killed after 8 samples, without --save-adv; resumed with it.
    let (csv, adv) = (dir.path().join("m.csv"), dir.path().join("adv.npy"));
    run_ok(margins(&csv, &args));
    truncate_rows(&csv, 8);
    let resume = || {
        let mut c = margins(&csv, &args);
        c.arg("--save-adv").arg(&adv);
        c
    };
    run_ok(resume());
    assert_eq!(without_seconds(&full), without_seconds(&csv));
    let (a, b) = (read_adv(&full_adv), read_adv(&adv));
    assert_eq!(b.size(), [16, 3, 32, 32]);
    // The samples done before the resume have their examples too: the same as one run's.
    let same = a
        .isnan()
        .logical_and(&b.isnan())
        .logical_or(&a.eq_tensor(&b));
    assert!(
        same.all().int64_value(&[]) == 1,
        "adversarial examples differ"
    );
    let found = b.isnan().logical_not().flatten(1, -1).all_dim(1, false);
    let rows = brittle::margins::read_margins(&csv).unwrap();
    for r in &rows {
        assert_eq!(found.int64_value(&[r.index as i64]) == 1, r.success == 1);
    }
    assert!(!dir.path().join("adv.npy.part").exists());
    // Nothing is left in a state that fails: running it again succeeds (and rebuilds the .npy).
    run_ok(resume());
    assert_eq!(without_seconds(&full), without_seconds(&csv));
}
