use clap::Parser;

fn main() {
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

/// RUST_BACKTRACE set to anything but 0: the user wants the full story.
fn backtrace_requested() -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0")
}
