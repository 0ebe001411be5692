//! `census`: the operator's command-line client for a Census collector.

use std::process::ExitCode;

use census_collector::cli::{self, Cli};
fn main() -> ExitCode {
    let cli: Cli = match cli::parse_args("census") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("census: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("census: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
