use clap::Parser;

fn main() {
    brittle::model::device::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("BRITTLE_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = brittle::cli::Cli::parse();
    if let Err(e) = brittle::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
