//! The `gateway` binary: parse the configuration, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use corecast_gateway::{shutdown, Config};
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = Config::parse();
    let (trigger, fired) = shutdown::channel();
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gateway: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if trigger.is_fired() {
                    log::warn!("second signal {sig}: exiting without waiting for the drain");
                    std::process::exit(1);
                }
                log::info!("signal {sig}: draining (send it again to exit at once)");
                trigger.fire();
            }
        })
        .expect("spawning the signal thread");
    match corecast_gateway::run(config, fired) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
