use clap::Parser;

fn main() {
    passive_openmp();
    brittle::model::device::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("BRITTLE_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = brittle::cli::Cli::parse();
    let verbose = cli.verbose || backtrace_requested();
    if let Err(e) = brittle::cli::run(cli) {
        let full = format!("{e:#}");
        let (short, dropped) = brittle::util::condense_torch_error(&full);
        if verbose || !dropped {
            eprintln!("error: {full}");
        } else {
            eprintln!("error: {short}\n(libtorch's backtrace left out: rerun with -v to see it)");
        }
        std::process::exit(1);
    }
}

/// Runs the process with OpenMP threads that sleep, not spin, while they wait for work.
///
/// libtorch's OpenMP runtime (libgomp) spins at every barrier by default. Any other load on the
/// machine then takes the core a spinning thread waits on: `brittle margins` on a loaded 2-core
/// machine ran 6-12x slower with two threads than with one, and PyTorch itself does the same
/// (bench/README.md). Passive threads cost up to 1.9x on an idle machine; a user's own
/// OMP_WAIT_POLICY or GOMP_SPINCOUNT (ACTIVE for a dedicated machine) is left alone. libgomp
/// reads them once, when it is loaded, before `main`: setting the variable here changed nothing
/// (measured), so the process executes itself again with it set.
fn passive_openmp() {
    #[cfg(unix)]
    if std::env::var_os("OMP_WAIT_POLICY").is_none() && std::env::var_os("GOMP_SPINCOUNT").is_none()
    {
        use std::os::unix::process::CommandExt;
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_default();
        if let Ok(exe) = std::env::current_exe() {
            // exec returns only when it failed: then run on, spinning.
            let _ = std::process::Command::new(exe)
                .arg0(arg0)
                .args(args)
                .env("OMP_WAIT_POLICY", "PASSIVE")
                .exec();
        }
    }
}

/// RUST_BACKTRACE set to anything but 0: the user wants the full story.
fn backtrace_requested() -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0")
}
