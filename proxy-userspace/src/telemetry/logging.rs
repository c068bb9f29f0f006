//! Log output for the binaries: `RUST_LOG` filters (default `info`), on stderr.

/// Installs the global subscriber. Escape codes only for a terminal: log files and
/// `kubectl logs` stay greppable.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
