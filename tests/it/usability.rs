//! What the user sees: progress that moves per attack step, libtorch errors without their C++
//! backtrace, and ε-like flags that all take fractions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use brittle::attack::plan::Plan;
use brittle::attack::AttackKind;
use brittle::cli::{Cli, Command as Sub};
use brittle::data::DataSpec;
use brittle::margins::{run_with_progress, MarginsOptions, Output};
use brittle::model::{load_classifier, DeviceChoice, ModelSpec};
use brittle::norm::Norm;
use brittle::util::{Check, Progress};
use clap::Parser;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/attack")
        .join(name)
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Length(u64),
    Inc(u64),
    Message(String),
}

/// A progress sink that keeps every call in order.
#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl Progress for Recorder {
    fn set_length(&self, units: u64) {
        self.0.lock().unwrap().push(Event::Length(units));
    }
    fn inc(&self, units: u64) {
        self.0.lock().unwrap().push(Event::Inc(units));
    }
    fn set_message(&self, msg: String) {
        self.0.lock().unwrap().push(Event::Message(msg));
    }
}

/// The margins job advances its progress at every attack step, long before the first chunk
/// (the old unit of progress) is done, and ends exactly at the length it announced.
#[test]
fn margins_progress_moves_per_attack_step() {
    let steps = 30;
    let data = DataSpec {
        path: fixture("tiny.bin"),
        limit: Some(8),
        ..Default::default()
    }
    .load()
    .unwrap();
    let spec = ModelSpec::new(fixture("tiny_cnn.pt"), DeviceChoice::Cpu.resolve().unwrap());
    let model = load_classifier(&spec, data.input_shape()).unwrap();
    let options = MarginsOptions {
        steps: Some(steps),
        seed: 5,
        batch_size: 4,
        chunk: 4,
        ..MarginsOptions::new(Norm::Linf, AttackKind::Fmn)
    }
    .check()
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::default();
    let summary = run_with_progress(
        model.as_ref(),
        &data,
        &options,
        Output {
            margins: &dir.path().join("m.csv"),
            save_adv: None,
            restart_stale: false,
        },
        &rec,
    )
    .unwrap();
    assert_eq!(summary.rows.len(), 8);

    let plan = Plan::new(AttackKind::Fmn, Norm::Linf, Some(steps), 9, 10, 1).unwrap();
    let units: usize = plan.passes.iter().map(|p| p.budget().steps).sum::<usize>() + plan.refine;
    assert!(units >= steps);
    let events = rec.0.into_inner().unwrap();
    let length = events.iter().find_map(|e| match e {
        Event::Length(n) => Some(*n),
        _ => None,
    });
    assert_eq!(length, Some((8 * units) as u64));
    let incs = |evs: &[Event]| -> Vec<u64> {
        evs.iter()
            .filter_map(|e| match e {
                Event::Inc(n) => Some(*n),
                _ => None,
            })
            .collect()
    };
    assert_eq!(incs(&events).iter().sum::<u64>(), (8 * units) as u64);
    let first_chunk_done = events
        .iter()
        .position(|e| *e == Event::Message("4/8 samples".into()))
        .expect("a message when the first chunk is done");
    let before = incs(&events[..first_chunk_done]);
    // FMN's patience is its budget: every sample takes every step, one report each.
    assert!(
        before.len() >= steps,
        "{} progress reports before the first chunk was done, fewer than its {steps} steps",
        before.len()
    );
    assert!(before.iter().sum::<u64>() >= (4 * steps) as u64);
}

/// Copies a TorchScript archive, leaving out its `data.pkl` member.
fn without_data_pkl(from: &Path, to: &Path) {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(from).unwrap()).unwrap();
    let mut out = zip::ZipWriter::new(std::fs::File::create(to).unwrap());
    for i in 0..archive.len() {
        let member = archive.by_index(i).unwrap();
        if !member.name().ends_with("/data.pkl") {
            out.raw_copy_file(member).unwrap();
        }
    }
    out.finish().unwrap();
}

fn brittle(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_brittle"))
        .args(args)
        .env("BRITTLE_NO_PROGRESS", "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

/// libtorch errors (a corrupt TorchScript file: a C++ backtrace; a model fed images of the wrong
/// shape: a TorchScript traceback) come out as a few lines naming the cause; `-v` shows it all.
#[test]
fn libtorch_errors_are_short_unless_verbose() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.pt");
    // A well-formed archive without its `data.pkl`: it passes brittle's own archive checks, and
    // libtorch's loader throws (with C++ frames) when it looks for the member.
    without_data_pkl(&fixture("tiny_cnn.pt"), &corrupt);
    let mnist =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/mnist-test-1000-images-idx3-ubyte.gz");
    let tiny = fixture("tiny.bin");
    let cnn = fixture("tiny_cnn.pt");
    let cases = [
        (
            corrupt.to_str().unwrap(),
            tiny.to_str().unwrap(),
            "data.pkl",
        ),
        (
            cnn.to_str().unwrap(),
            mnist.to_str().unwrap(),
            "to have 3 channels, but got 1 channels instead",
        ),
    ];
    for (model, data, cause) in cases {
        let args = [
            "score", "--model", model, "--data", data, "--limit", "4", "--device", "cpu",
        ];
        let out = brittle(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(cause), "{err}");
        assert!(!err.contains("frame #"), "{err}");
        assert!(!err.contains("Traceback of TorchScript"), "{err}");
        assert!(err.lines().count() <= 3, "{err}");
        let mut verbose = args.to_vec();
        verbose.push("-v");
        let out = brittle(&verbose);
        let full = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(full.contains(cause), "{full}");
        assert!(
            full.contains("frame #") || full.contains("Traceback of TorchScript"),
            "{full}"
        );
        assert!(full.lines().count() > 10, "{full}");
    }
}

/// Every ε-like flag (radii, step sizes, lists of radii) takes `a/b` and decimals through one
/// parser, and rejects what it cannot read at parse time.
#[test]
fn every_eps_like_flag_takes_fractions() {
    let parse =
        |args: &[&str]| Cli::try_parse_from(std::iter::once("brittle").chain(args.iter().copied()));
    let common = ["--data", "d.bin"];
    for cmd in ["train", "eval-pgd"] {
        let mut args = vec![cmd, "--eps", "8/255", "--step-size", "2/255"];
        if cmd == "eval-pgd" {
            args.extend(["--model", "m.pt"]);
        }
        args.extend(common);
        let cli = parse(&args).unwrap_or_else(|e| panic!("{cmd}: {e}"));
        let attack = match cli.command {
            Sub::Train(a) => a.attack,
            Sub::EvalPgd(a) => a.attack,
            _ => unreachable!(),
        };
        assert_eq!(attack.eps, 8.0 / 255.0);
        assert_eq!(attack.step_size, 2.0 / 255.0);
        let mut decimal = vec![cmd, "--step-size", "0.25"];
        decimal.extend(&args[5..]);
        assert!(parse(&decimal).is_ok(), "{cmd} --step-size 0.25");
        let mut bad = vec![cmd, "--step-size", "2/0"];
        bad.extend(&args[5..]);
        assert!(parse(&bad).is_err(), "{cmd} --step-size 2/0");
    }
    let cli = parse(&[
        "fit", "m.csv", "--eps", "8/255", "--model", "m.pt", "--data", "d.bin",
    ])
    .unwrap();
    let Sub::Fit(a) = cli.command else {
        unreachable!()
    };
    assert_eq!(a.eps, 8.0 / 255.0);
    let cli = parse(&["analyze", "m.csv", "--eps", "2/255,4/255", "--eps", "0.5"]).unwrap();
    let Sub::Analyze(a) = cli.command else {
        unreachable!()
    };
    assert_eq!(a.eps, ["2/255", "4/255", "0.5"]);
    assert!(parse(&["analyze", "m.csv", "--eps", "2/255,x"]).is_err());
    let cli = parse(&["demo", "--eps", "8/255"]).unwrap();
    let Sub::Demo(a) = cli.command else {
        unreachable!()
    };
    assert_eq!(a.eps, "8/255");
    assert!(parse(&["demo", "--eps", "eight"]).is_err());
}

/// The environment of process `pid` once it holds `key` (a re-exec replaces it), within 20 s.
#[cfg(target_os = "linux")]
fn env_of(pid: u32, key: &str) -> Option<String> {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(20) {
        if let Ok(raw) = std::fs::read(format!("/proc/{pid}/environ")) {
            let found = raw.split(|&b| b == 0).find_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.strip_prefix(&format!("{key}=")).map(str::to_owned)
            });
            if found.is_some() {
                return found;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

/// brittle runs its OpenMP threads passive (they sleep instead of spinning while they wait:
/// with spinning, a competing load made `margins` 6-12x slower, bench/README.md), unless the
/// user chose a policy. The process is observed while it blocks opening a FIFO as its data.
#[cfg(target_os = "linux")]
#[test]
fn openmp_threads_wait_passively_unless_told_otherwise() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("data.bin");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo touches nothing else.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (given, expected) in [(None, "PASSIVE"), (Some("ACTIVE"), "ACTIVE")] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_brittle"));
        cmd.args(["score", "--device", "cpu", "--model"])
            .arg(fixture("tiny_cnn.pt"))
            .arg("--data")
            .arg(&fifo)
            .env_remove("OMP_WAIT_POLICY")
            .env_remove("GOMP_SPINCOUNT")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(v) = given {
            cmd.env("OMP_WAIT_POLICY", v);
        }
        let mut child = cmd.spawn().unwrap();
        let seen = env_of(child.id(), "OMP_WAIT_POLICY");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(seen.as_deref(), Some(expected), "given {given:?}");
    }
}

/// The string literals inside the error-producing calls (`bail!`, `ensure!`, `anyhow!`,
/// `.context(`, `.with_context(`, and the `format!`s inside them) of a Rust source, with
/// their line numbers. Test modules (from `#[cfg(test)]` on) are left out.
fn error_literals(src: &str) -> Vec<(usize, String)> {
    const CALLS: [&str; 5] = [
        "bail!(",
        "ensure!(",
        "anyhow!(",
        ".context(",
        ".with_context(",
    ];
    let src = src.split("#[cfg(test)]").next().unwrap_or("");
    let b = src.as_bytes();
    let line_of = |at: usize| src[..at].matches('\n').count() + 1;
    let mut found = Vec::new();
    let mut i = 0;
    while i < b.len() {
        // Skip comments (doc comments mention flags to explain them).
        if b[i..].starts_with(b"//") {
            i += src[i..].find('\n').unwrap_or(b.len() - i);
            continue;
        }
        let Some(call) = CALLS.iter().find(|c| b[i..].starts_with(c.as_bytes())) else {
            i += 1;
            continue;
        };
        // Walk the call's balanced parentheses, collecting string literals.
        let mut j = i + call.len();
        let mut depth = 1;
        while j < b.len() && depth > 0 {
            match b[j] {
                b'(' => depth += 1,
                b')' => depth -= 1,
                b'\'' if j + 2 < b.len() && (b[j + 2] == b'\'' || b[j + 1] == b'\\') => {
                    // a char literal such as '(' or '\n'
                    j += src[j + 1..].find('\'').unwrap_or(0) + 1;
                }
                b'"' => {
                    let start = j;
                    j += 1;
                    while j < b.len() && b[j] != b'"' {
                        j += if b[j] == b'\\' { 2 } else { 1 };
                    }
                    found.push((line_of(start), src[start + 1..j.min(b.len())].to_string()));
                }
                _ => {}
            }
            j += 1;
        }
        i += call.len();
    }
    found
}

/// A `--` followed by a letter: a command-line flag.
fn names_a_flag(text: &str) -> bool {
    text.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'-' && w[1] == b'-' && w[2].is_ascii_alphabetic())
}

#[test]
fn the_error_scan_finds_flags_in_error_calls_only() {
    let src = r#"
        // bail!("--comment")
        bail!("{}: pass --labels", p);
        x.with_context(|| format!("reading {} (see --data)", f))?;
        let s = "--not-an-error";
        ensure!(a > 0, "a must be positive -- or zero");
        #[cfg(test)]
        bail!("--in-a-test");
    "#;
    let hits: Vec<(usize, String)> = error_literals(src)
        .into_iter()
        .filter(|(_, t)| names_a_flag(t))
        .collect();
    assert_eq!(
        hits,
        [
            (3, "{}: pass --labels".to_string()),
            (4, "reading {} (see --data)".to_string())
        ]
    );
}

/// The library never names a command-line flag in an error: `src/cli/` adds the hints.
#[test]
fn library_errors_name_no_flag() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut hits: Vec<(String, usize, String)> = Vec::new();
    for f in files {
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if rel.starts_with("cli/") || rel == "main.rs" {
            continue;
        }
        for (line, text) in error_literals(&std::fs::read_to_string(&f).unwrap()) {
            if names_a_flag(&text) {
                hits.push((rel.clone(), line, text));
            }
        }
    }
    hits.sort();
    let listed: Vec<String> = hits
        .iter()
        .map(|(f, line, text)| format!("src/{f}:{line}: {text:?}"))
        .collect();
    assert!(
        hits.is_empty(),
        "library errors naming a flag:\n{}",
        listed.join("\n")
    );
}

/// The library names the option; the command line still tells which flag sets it.
#[test]
fn cli_errors_name_the_flag_of_the_library_option() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = dir.path().join("images.dat");
    std::fs::write(&unknown, [0u8; 16]).unwrap();
    let tiny = fixture("tiny.bin");
    let cnn = fixture("tiny_cnn.pt");
    let mnist =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/mnist-test-1000-images-idx3-ubyte.gz");
    let margins = dir.path().join("m.csv");
    let (tiny, cnn, mnist, unknown, margins) = (
        tiny.to_str().unwrap(),
        cnn.to_str().unwrap(),
        mnist.to_str().unwrap(),
        unknown.to_str().unwrap(),
        margins.to_str().unwrap(),
    );
    let model = ["--model", cnn, "--device", "cpu", "--allow-low-accuracy"];
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["score", "--data", unknown],
            "--data-format",
            "cannot tell the data format from the file name",
        ),
        (
            vec!["score", "--data", tiny, "--offset", "100000"],
            "--offset",
            "offset 100000 is past the end",
        ),
        (
            vec![
                "margins", "--data", tiny, "--attack", "ddn", "--norm", "linf", "--out", margins,
            ],
            "--norm",
            "ddn is an l2 attack",
        ),
        (
            vec![
                "margins", "--data", tiny, "--attack", "fmn", "--effort", "2", "--out", margins,
            ],
            "--effort",
            "fmn has one pass: give it more steps instead",
        ),
        (
            vec!["score", "--data", tiny, "--batch-size", "0"],
            "--batch-size",
            "the batch size must be positive",
        ),
        (
            vec!["train", "--data", mnist, "--limit", "8", "--epochs", "0"],
            "--epochs",
            "the epoch count must be positive",
        ),
        (
            vec!["train", "--data", mnist, "--limit", "8", "--eps", "8"],
            "--eps",
            "did you mean 8/255?",
        ),
    ];
    for (mut args, flag, cause) in cases {
        if args[0] == "score" || args[0] == "margins" {
            args.extend(model);
        } else {
            args.extend(["--device", "cpu"]);
        }
        let out = brittle(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(&format!("error: {flag}: ")), "{args:?}: {err}");
        assert!(err.contains(cause), "{args:?}: {err}");
    }
}
