//! `loadgen`: parses the command line, sets up logging and signals, and
//! hands over to [`corecast_loadgen::run`].

use std::{
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc},
};

use clap::Parser as _;
use corecast_loadgen::Cli;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let plan = match cli.command.validate() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    // First Ctrl-C (or SIGTERM): end the run early, closing cleanly. A second
    // one exits at once.
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let registered =
            signal_hook::flag::register_conditional_shutdown(sig, 130, interrupted.clone())
                .and_then(|_| signal_hook::flag::register(sig, interrupted.clone()));
        if let Err(e) = registered {
            eprintln!("error: cannot install the signal handler: {e}");
            return ExitCode::from(1);
        }
    }
    match corecast_loadgen::run(plan, interrupted) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
