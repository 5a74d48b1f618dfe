//! The `callgate` command: parse the command line, load the config, dispatch.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};

use callgate::account::account_from_cli;
use callgate::config::{Config, LogFormat};
use callgate::token::Mode;
use callgate::{cli, logging, server};

/// jemalloc, whose background thread gives the memory of ended calls back to the system;
/// glibc's malloc kept a busy hour's peak resident (docs/PERFORMANCE.md, "Memory given back").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// callgate: WebRTC-to-SIP gateway with loginByToken.
#[derive(Parser)]
#[command(name = "callgate", version, about, propagate_version = true)]
struct Cli {
    /// Log format (overrides log.format in the config).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (with no --config: the built-in config, everything on 127.0.0.1).
    Run {
        /// Path to callgate.toml (its apps_file is read relative to it).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config (the built-in one if no path) and its apps file; exit 1 on problems.
    CheckConfig {
        /// Path to callgate.toml.
        path: Option<PathBuf>,
    },
    /// Mint or inspect loginByToken tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print a fresh random AES key (hex) for apps.toml.
    Keygen {
        /// Key size in bits: 128, 192 or 256.
        #[arg(long, default_value_t = 256)]
        bits: u16,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a token for an agent with the app's first key (what a CRM backend does).
    Mint(Box<MintArgs>),
    /// Decrypt and check a token with the configured keys; print its fields (password hidden).
    Inspect {
        /// The token (APP:HEX), or - to read it from standard input.
        token: String,
        /// Path to callgate.toml (default: the built-in config).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Args)]
struct MintArgs {
    /// App name (a table in apps.toml).
    #[arg(long)]
    app: String,
    /// SIP login (user part of the address of record).
    #[arg(long)]
    login: String,
    /// Digest user name, if different from the login.
    #[arg(long)]
    auth_name: Option<String>,
    /// SIP password (visible in `ps`; prefer --password-stdin).
    #[arg(
        long,
        required_unless_present = "password_stdin",
        conflicts_with = "password_stdin"
    )]
    password: Option<String>,
    /// Read the SIP password from the first line of standard input.
    #[arg(long)]
    password_stdin: bool,
    /// SIP domain.
    #[arg(long)]
    domain: String,
    /// Outbound proxy, host[:port].
    #[arg(long)]
    outbound_proxy: Option<String>,
    /// SIP port of the domain (default 5060, or what the domain's DNS SRV records say).
    #[arg(long)]
    port: Option<u16>,
    /// Display name.
    #[arg(long)]
    visible_name: Option<String>,
    /// The agent's group (decides which agent states it may use; apps.toml `states`).
    #[arg(long)]
    group: Option<String>,
    /// Lifetime: 90s, 10m, 8h, 7d.
    #[arg(long, default_value = "10m", conflicts_with = "no_expiry")]
    ttl: String,
    /// Mint without expiry (only for apps with require_expires = false).
    #[arg(long)]
    no_expiry: bool,
    /// Assert the app's mode (ctr or ctr-hmac); minting fails if the app is configured otherwise.
    #[arg(long, value_parser = ["ctr", "ctr-hmac"])]
    mode: Option<String>,
    /// Path to callgate.toml (default: the built-in config).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn load(path: Option<&Path>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p),
        None => Config::embedded(),
    }
    .map_err(|e| format!("configuration error:\n{e}"))
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn unix_now() -> i64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config.as_deref(), cli.log_format),
        Command::CheckConfig { path } => check_config(path.as_deref()),
        Command::Token(TokenCommand::Mint(args)) => mint(args),
        Command::Token(TokenCommand::Inspect { token, config }) => {
            inspect(&token, config.as_deref())
        }
        Command::Keygen { bits } => cli::keygen(bits).map(|k| {
            println!("{k}");
            ExitCode::SUCCESS
        }),
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("callgate: {msg}");
            ExitCode::from(2)
        }
    }
}

fn run(path: Option<&Path>, log_format: Option<LogFormat>) -> Result<ExitCode, String> {
    let config = load(path)?;
    logging::init(log_format.unwrap_or(config.log.format), &config.log.level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    match rt.block_on(server::run(config, server::shutdown_signal())) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn check_config(path: Option<&Path>) -> Result<ExitCode, String> {
    match load(path) {
        Ok(c) => {
            for w in c.warnings() {
                println!("warning: {w}");
            }
            println!("{}: OK ({} app(s))", c.source, c.apps.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn mint(args: Box<MintArgs>) -> Result<ExitCode, String> {
    let config = load(args.config.as_deref())?;
    let app = config
        .apps
        .get(&args.app)
        .ok_or_else(|| format!("unknown_app: no app {:?} in the apps file", args.app))?;
    if let Some(m) = &args.mode {
        if m != app.mode.as_str() {
            return Err(format!(
                "app {:?} is configured for mode {}; a {m} token would be refused",
                args.app,
                app.mode.as_str()
            ));
        }
    }
    let password = match (args.password, args.password_stdin) {
        (Some(p), _) => p,
        (None, _) => {
            let mut s = String::new();
            std::io::stdin()
                .take(4096)
                .read_to_string(&mut s)
                .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
            s.lines().next().unwrap_or_default().to_owned()
        }
    };
    let account = account_from_cli(
        &args.login,
        args.auth_name.as_deref(),
        password,
        &args.domain,
        args.outbound_proxy.as_deref(),
        args.port,
        args.visible_name.as_deref(),
    )
    .and_then(|a| a.with_group(args.group.as_deref()))
    .map_err(|e| e.to_string())?;
    let expires = if args.no_expiry {
        None
    } else {
        let ttl = cli::parse_ttl(&args.ttl).map_err(|e| format!("--ttl {e}"))?;
        Some(unix_now().saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)))
    };
    let iv = if app.mode == Mode::CtrHmac {
        cli::random_iv()?
    } else {
        [0; 16]
    };
    let token = config
        .keyring()
        .mint(&args.app, &account, expires, iv)
        .map_err(|e| e.to_string())?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

fn inspect(token: &str, config: Option<&Path>) -> Result<ExitCode, String> {
    let config = load(config)?;
    let token = if token == "-" {
        let mut s = String::new();
        std::io::stdin()
            .take(2 * 1024 * 1024)
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read the token from standard input: {e}"))?;
        s
    } else {
        token.to_owned()
    };
    match config.keyring().verify(&token, now()) {
        Ok(v) => {
            print!("{}", cli::inspect_report(&v, unix_now()));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("token refused: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
