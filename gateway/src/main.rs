//! The `gateway` binary: parse the configuration, set up logging, run; or
//! mint a development token (`gateway token`).

use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use corecast_gateway::{auth, shutdown, Config};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "corecast: thread-per-core WebSocket gateway",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Print an HS256 access token for /ws, signed with --jwt-secret.
    Token(TokenArgs),
    /// Check a configuration file, or print a commented example of one.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE as `gateway --config FILE` would (flags and CORECAST_*
    /// variables in the environment apply on top, as they would).
    Check { file: std::path::PathBuf },
    /// Print every key, with its help and default, commented out.
    Example,
}

/// Parses the command line with the `--config` file as its defaults.
fn parse() -> Result<Cli, String> {
    let cli = Cli::parse();
    let Some(path) = cli.config.node.config.clone() else {
        return Ok(cli);
    };
    let cmd =
        corecast_gateway::config::with_file(Cli::command(), &path).map_err(|e| e.to_string())?;
    Cli::from_arg_matches(&cmd.get_matches()).map_err(|e| e.to_string())
}

fn config_command(c: ConfigCommand) -> ExitCode {
    match c {
        ConfigCommand::Example => {
            print!("{}", corecast_gateway::config::example(&Config::command()));
            ExitCode::SUCCESS
        }
        ConfigCommand::Check { file } => {
            let checked = corecast_gateway::config::with_file(Config::command(), &file)
                .and_then(|cmd| {
                    let m = cmd
                        .try_get_matches_from(["gateway"])
                        .map_err(|e| corecast_gateway::config::ConfigError(e.to_string()))?;
                    let mut config = Config::from_arg_matches(&m)
                        .map_err(|e| corecast_gateway::config::ConfigError(e.to_string()))?;
                    // Its namespaces are read from the file too.
                    config.node.config = Some(file.clone());
                    Ok(config)
                })
                .and_then(|config| config.validate().map(|_| ()));
            match checked {
                Ok(()) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gateway config check: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[derive(Args)]
struct TokenArgs {
    /// The user id (`sub` claim).
    #[arg(long)]
    sub: String,
    /// Lifetime in seconds (`exp` = now + this).
    #[arg(long, default_value_t = 3600)]
    ttl_s: u64,
    /// Rooms the user may join (names or prefixes ending in `*`), comma
    /// separated. Default: any room.
    #[arg(long, value_delimiter = ',')]
    rooms: Option<Vec<String>>,
    /// Rooms the user may publish to. Default: the same as --rooms.
    #[arg(long, value_delimiter = ',')]
    publish: Option<Vec<String>>,
    /// The secret the gateway verifies tokens with.
    #[arg(long, env = "CORECAST_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
}

fn mint(args: TokenArgs) -> ExitCode {
    if args.jwt_secret.len() < auth::MIN_SECRET_BYTES {
        eprintln!(
            "gateway token: --jwt-secret must be at least {} bytes (e.g. `openssl rand -hex 32`)",
            auth::MIN_SECRET_BYTES
        );
        return ExitCode::FAILURE;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = auth::Claims {
        sub: args.sub,
        exp: Some(now + args.ttl_s),
        iat: Some(now),
        rooms: args.rooms,
        publish: args.publish,
        ..Default::default()
    };
    println!("{}", auth::mint(args.jwt_secret.as_bytes(), &claims));
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Token(args)) => return mint(args),
        Some(Command::Config(c)) => return config_command(c),
        None => {}
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let tls_interval = cli.config.tls.tls_reload_interval_s;
    let server = match corecast_gateway::Server::bind(cli.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    let key_files = server.key_files();
    let namespace_file = server.namespace_file();
    let tls = server.tls();
    if let (Some(tls), true) = (tls.clone(), tls_interval > 0) {
        watch_certificate(tls, std::time::Duration::from_secs(tls_interval));
    }
    let (trigger, fired) = shutdown::channel();
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
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
                if sig == SIGHUP {
                    match key_files.as_ref().map(|k| k.reload()) {
                        Some(Ok(n)) => log::info!("SIGHUP: token keys reloaded ({n} keys)"),
                        Some(Err(e)) => log::error!("SIGHUP: {e}; the old token keys stay in use"),
                        None => log::info!("SIGHUP: no --jwt-public-key or --jwt-jwks to reload"),
                    }
                    if let Some(tls) = &tls {
                        reload_certificate(tls, "SIGHUP");
                    }
                    if let Some(path) = namespace_file.path() {
                        match namespace_file.reload() {
                            Ok(n) => log::info!(
                                "SIGHUP: {n} room namespaces re-read from {}",
                                path.display()
                            ),
                            Err(e) => log::error!("SIGHUP: {e}; the old namespaces stay in use"),
                        }
                    }
                    continue;
                }
                if trigger.is_fired() {
                    log::warn!("second signal {sig}: exiting without waiting for the drain");
                    std::process::exit(1);
                }
                log::info!("signal {sig}: draining (send it again to exit at once)");
                trigger.fire();
            }
        })
        .expect("spawning the signal thread");
    match server.run(fired) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the certificate and key again; new handshakes get them, open
/// connections keep theirs. A broken file leaves the old certificate.
fn reload_certificate(tls: &corecast_gateway::tls::Tls, why: &str) {
    match tls.reload() {
        Ok(loaded) => log::info!(
            "{why}: TLS certificate reloaded: {}",
            corecast_gateway::tls::Tls::describe(&loaded)
        ),
        Err(e) => log::error!("{why}: {e}; the old TLS certificate stays in use"),
    }
}

/// `--tls-reload-interval-s`: looks at the files' modification times and
/// reloads when either changed (a renewal by certbot or a secret mount).
fn watch_certificate(tls: corecast_gateway::tls::Tls, every: std::time::Duration) {
    let spawned = std::thread::Builder::new()
        .name("tls-reload".into())
        .spawn(move || {
            let mut seen = tls.files_changed_at();
            loop {
                std::thread::sleep(every);
                let now = tls.files_changed_at();
                if now != seen {
                    seen = now;
                    reload_certificate(&tls, "certificate files changed");
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the TLS reload thread: {e}; SIGHUP still reloads");
    }
}
