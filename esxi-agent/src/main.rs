//! `vmdk-agent`: serve the agent API, or run an admin command.
//!
//! The admin commands (`ls`, `set`, `policy`, `status`) work on the
//! datastores of `--config` / `--datastore` directly, whether the service
//! runs or not, taking the same per-volume file locks it takes. See
//! `docs/admin-cli.md`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use vmdk_agent::admin::{self, probe};
use vmdk_agent::config::{AgentConfig, ConfigSource, DEFAULT_CONFIG, DEFAULT_SOCKET};
use vmdk_agent::error::error_chain;
use vmdk_agent::policy::PolicyExpr;
use vmdk_agent::server::{raise_fd_limit, serve, Listeners, ServeLimits};
use vmdk_agent::{AgentError, VolumeService};

/// Host agent of vmdk: VMDK volumes for Docker on vSphere datastores.
///
/// `serve` runs the agent API; the other commands administer volumes and
/// VSAN policies on the configured datastores, whether the service runs or
/// not. Exit status: 0 on success, 2 on failure.
#[derive(Debug, Parser)]
#[command(
    name = "vmdk-agent",
    version,
    about,
    long_about,
    subcommand_required = true,
    arg_required_else_help = true
)]
struct Cli {
    /// TOML configuration file (see docs/configuration.md). Default:
    /// /etc/vmdk/agent.toml when it exists (the file the plugin's embedded
    /// agent reads too), else built-in settings.
    #[arg(long, global = true, env = "VMDK_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// A datastore as NAME=DIR, or NAME=DIR,vsan for a VSAN datastore;
    /// repeatable. Added after those in --config.
    #[arg(long = "datastore", value_name = "NAME=DIR[,vsan]", global = true)]
    datastores: Vec<String>,
    /// Where logs go: auto (the systemd journal when systemd started the
    /// agent, else text on stderr), text, json (one object per line on
    /// stderr) or journald. The filter is VMDK_LOG.
    #[arg(
        long,
        global = true,
        env = "VMDK_LOG_FORMAT",
        default_value = "auto",
        value_name = "FORMAT"
    )]
    log_format: vmdk_common::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the agent API.
    Serve {
        /// Unix socket to listen on (mode 0600).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Also listen on TCP, on a loopback address such as
        /// 127.0.0.1:7981 (the API has no authentication yet, so other
        /// addresses are refused).
        #[arg(long)]
        tcp: Option<std::net::SocketAddr>,
        /// Limits of each listener as KEY=VALUE,...: header-timeout,
        /// body-timeout, send-timeout (durations), max-connections,
        /// max-requests, max-body-bytes. Default:
        /// header-timeout=10s,body-timeout=10s,send-timeout=30s,max-connections=256,max-requests=64,max-body-bytes=65536.
        #[arg(long, env = "VMDK_SERVE_LIMITS", value_name = "KEY=VALUE,...")]
        limits: Option<ServeLimits>,
        /// Local HTTP listener for /healthz, /readyz and /metrics
        /// (Prometheus), apart from the API sockets; "off" disables it.
        /// Port 0 picks a free port, logged at start.
        #[arg(long, env = "VMDK_ADMIN_LISTEN", default_value = vmdk_common::admin::AGENT_ADMIN_DEFAULT, value_name = "ADDR|off", value_parser = |v: &str| vmdk_common::admin::AdminListen::parse_or(v, vmdk_common::admin::AGENT_ADMIN_DEFAULT))]
        admin_listen: vmdk_common::admin::AdminListen,
    },
    /// List volumes on every configured datastore.
    Ls(LsArgs),
    /// Change a volume's access or attach-as; applies at its next attach.
    Set(SetArgs),
    /// Manage VSAN storage policies (kept in dockvols/policies on the VSAN
    /// datastore).
    #[command(subcommand, arg_required_else_help = true)]
    Policy(PolicyCommand),
    /// Show version, service state, datastores and policies.
    Status(StatusArgs),
}

/// Output format of the listing commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Aligned columns, for people.
    Table,
    /// JSON, for scripts.
    Json,
}

#[derive(Debug, Args)]
struct LsArgs {
    /// Columns to show, comma-separated: volume, datastore, vmgroup,
    /// capacity, used, fstype, policy, disk-format, attached-to, access,
    /// attach-as, created-by, created. Default: all.
    #[arg(short = 'c', long = "columns", value_name = "COL1,COL2")]
    columns: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Read every volume's files even when a running agent (`vmdk-agent
    /// serve`, or a plugin running its agent embedded) serves the same
    /// datastores; by default `ls` asks that agent, which answers from its
    /// catalog.
    #[arg(long)]
    direct: bool,
    /// The socket of `vmdk-agent serve` (default: the configuration's
    /// `socket`, else /run/vmdk/agent.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The plugin's socket, asked when no `vmdk-agent serve` answers.
    #[arg(long, default_value = vmdk_protocol::DEFAULT_PLUGIN_SOCKET, env = "VMDK_PLUGIN_SOCKET")]
    plugin_socket: PathBuf,
}

#[derive(Debug, Args)]
struct SetArgs {
    /// The volume, as vol@datastore (vol alone means the first datastore).
    #[arg(long, value_name = "VOL@DS")]
    volume: String,
    /// Settings as key=value[,key=value]: access=read-write|read-only,
    /// attach-as=independent_persistent|persistent.
    #[arg(long, value_name = "K=V[,K=V]")]
    options: String,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Create a policy.
    Create {
        /// Policy name, e.g. SW=2 (becomes a file name: no '/', not '.').
        #[arg(long)]
        name: String,
        /// VSAN policy expression, e.g. '(("stripeWidth" i2))'.
        #[arg(long)]
        content: String,
    },
    /// Remove a policy; refused while a volume uses it.
    Rm {
        /// Policy name.
        #[arg(long)]
        name: String,
    },
    /// List policies with the volumes using them.
    Ls {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Change a policy's content and re-apply it to every volume using it.
    Update {
        /// Policy name.
        #[arg(long)]
        name: String,
        /// New VSAN policy expression.
        #[arg(long)]
        content: String,
    },
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The service's socket. Default: `socket` in --config, else
    /// /run/vmdk/agent.sock.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The plugin's socket, asked when no `vmdk-agent serve` answers: a
    /// plugin running its agent embedded reports it there.
    #[arg(long, default_value = vmdk_protocol::DEFAULT_PLUGIN_SOCKET, env = "VMDK_PLUGIN_SOCKET")]
    plugin_socket: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

fn load_config(
    config: Option<&PathBuf>,
    datastores: &[String],
    tcp: Option<std::net::SocketAddr>,
) -> anyhow::Result<(AgentConfig, ConfigSource)> {
    let (mut cfg, source) = AgentConfig::load(config.map(PathBuf::as_path), Path::new(DEFAULT_CONFIG), datastores)?;
    if let Some(addr) = tcp {
        cfg.set_tcp_flag(addr);
        cfg.validate()?;
    }
    Ok((cfg, source))
}

async fn service(cfg: &AgentConfig) -> anyhow::Result<Arc<VolumeService>> {
    Ok(Arc::new(
        VolumeService::from_config(cfg)
            .await
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?,
    ))
}

/// An agent error with its whole cause chain, for anyhow.
fn chain(e: AgentError) -> anyhow::Error {
    anyhow::anyhow!(error_chain(&e))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

fn main() -> ExitCode {
    // Before any thread starts: few malloc arenas (docs/performance.md).
    vmdk_common::memory::tune();
    // Before any thread starts: takes systemd's sockets, clears its variables.
    let activation = vmdk_common::systemd::init_from_env();
    let cli = Cli::parse();
    // The service logs at info; admin commands print their own results and
    // log only warnings, so their output stays clean.
    let serving = matches!(cli.command, Command::Serve { .. });
    vmdk_common::logging::init(&vmdk_common::logging::LogOptions {
        format: cli.log_format,
        default_filter: if serving { "info" } else { "warn" }.into(),
        command: !serving,
        identifier: "vmdk-agent",
    });
    vmdk_common::systemd::log_activation(&activation);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ERROR: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The runtime an admin command runs the (async) service on.
fn admin_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = || load_config(cli.config.as_ref(), &cli.datastores, None).map(|(c, _)| c);
    match cli.command {
        Command::Serve {
            socket,
            tcp,
            limits,
            admin_listen,
        } => {
            let (cfg, source) = load_config(cli.config.as_ref(), &cli.datastores, tcp)?;
            tracing::info!(config = %source, "configuration");
            let rt = tokio::runtime::Runtime::new().context("start runtime")?;
            let svc = rt.block_on(service(&cfg))?;
            match raise_fd_limit() {
                Ok((before, after)) if after > before => {
                    tracing::info!(before, after, "raised the open-file limit")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
            }
            let listeners = Listeners {
                socket: socket
                    .or(cfg.socket.clone())
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
                tcp: cfg.tcp,
                limits: limits.unwrap_or_default(),
                admin: admin_listen,
            };
            rt.block_on(serve(svc, listeners, shutdown_signal()))
                .context("serve agent API")
        }
        Command::Ls(args) => {
            let cfg = cfg()?;
            admin_runtime()?.block_on(async { ls(&*service(&cfg).await?, cfg.socket.clone(), &args).await })
        }
        Command::Set(args) => admin_runtime()?.block_on(async { set(&*service(&cfg()?).await?, &args).await }),
        Command::Policy(cmd) => admin_runtime()?.block_on(async { policy(&*service(&cfg()?).await?, cmd).await }),
        Command::Status(args) => admin_runtime()?.block_on(status(cfg(), &args)),
    }
}

async fn ls(svc: &VolumeService, socket: Option<PathBuf>, args: &LsArgs) -> anyhow::Result<()> {
    let cols = match &args.columns {
        Some(list) => admin::parse_columns(list)?,
        None => admin::all_columns(),
    };
    let served = match args.direct {
        true => None,
        false => {
            let sockets = [
                args.socket
                    .clone()
                    .or(socket)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
                args.plugin_socket.clone(),
            ];
            let svc = svc.clone();
            vmdk_common::runtime::spawn_blocking(move || served_volumes(&svc, &sockets))
                .await
                .context("ask the running agent")?
        }
    };
    let volumes = match served {
        Some(v) => v,
        None => svc.inventory().await.map_err(chain)?,
    };
    let out = match args.format {
        Format::Table => admin::volume_table(&volumes, &cols, |name| {
            svc.datastores().iter().any(|d| d.name == name && d.vsan)
        }),
        Format::Json => format!("{:#}\n", admin::volume_json(&volumes, &cols)),
    };
    print_out(&out)
}

/// The volumes as the agent answering on the first of `sockets` that
/// serves exactly `svc`'s datastores (same names, same directories: see
/// `VersionInfo::datastore_ids`) lists them from its catalog; `None` when
/// none does, or its answer fails (then `ls` reads the files itself).
fn served_volumes(svc: &VolumeService, sockets: &[PathBuf]) -> Option<Vec<vmdk_protocol::VolumeInfo>> {
    let ids = svc.datastore_ids().filter(|ids| !ids.is_empty())?;
    let names: Vec<String> = svc.datastores().iter().map(|d| d.name.clone()).collect();
    let timeout = Duration::from_secs(5);
    for socket in sockets {
        let probe::ServiceState::Running(v) = probe::probe(socket, timeout) else {
            continue;
        };
        if v.datastores != names || v.datastore_ids != ids {
            tracing::debug!(socket = %socket.display(), "the agent there serves other datastores");
            continue;
        }
        match probe::list_volumes(socket, timeout) {
            Ok(vols) => return Some(vols),
            Err(e) => {
                tracing::warn!(socket = %socket.display(), error = %e, "the running agent did not list its volumes; reading them directly");
                return None;
            }
        }
    }
    None
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("write output"),
    }
}

async fn set(svc: &VolumeService, args: &SetArgs) -> anyhow::Result<()> {
    let failed = || format!("Failed to update {} for {}", args.options, args.volume);
    let opts = admin::parse_options_arg(&args.options).with_context(failed)?;
    let res = svc.set_options(&args.volume, &opts).await;
    vmdk_agent::obs::audit(&vmdk_agent::service::Caller::Admin, "set", &args.volume, &res);
    let info = res.map_err(chain).with_context(failed)?;
    println!("Successfully updated settings for {}", info.name);
    Ok(())
}

/// Warns about capabilities vmdk does not check (typos, newer vSAN ones).
fn warn_unknown(expr: &PolicyExpr) {
    for (cap, suggestion) in expr.unknown_capabilities() {
        let hint = match suggestion {
            Some(s) => format!("; did you mean \"{s}\"?"),
            None => String::new(),
        };
        eprintln!("warning: \"{cap}\" is not a capability vmdk-agent checks; it is stored as given{hint}");
    }
}

async fn policy(svc: &VolumeService, cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Create { name, content } => {
            let res = svc.policy_create(&name, &content).await;
            vmdk_agent::obs::audit(&vmdk_agent::service::Caller::Admin, "policy create", &name, &res);
            let expr = res.map_err(chain)?;
            warn_unknown(&expr);
            println!("Successfully created policy: {name}");
        }
        PolicyCommand::Rm { name } => {
            let res = svc.policy_remove(&name).await;
            vmdk_agent::obs::audit(&vmdk_agent::service::Caller::Admin, "policy rm", &name, &res);
            res.map_err(chain)?;
            println!("Successfully removed policy: {name}");
        }
        PolicyCommand::Update { name, content } => {
            let res = svc.policy_update(&name, &content).await;
            vmdk_agent::obs::audit(&vmdk_agent::service::Caller::Admin, "policy update", &name, &res);
            let (expr, report) = res.map_err(chain)?;
            warn_unknown(&expr);
            let total = report.updated.len() + report.failed.len();
            let volumes = |n: usize| if n == 1 { "volume" } else { "volumes" };
            if report.retried {
                println!(
                    "Policy {name} is unchanged; retried the {total} {} its last update failed on.",
                    volumes(total)
                );
                println!("Re-applied to {} of {total} {}.", report.updated.len(), volumes(total));
            } else {
                println!("Successfully updated policy {name}");
                if total > 0 {
                    println!(
                        "Re-applied to {} of {total} {} using it.",
                        report.updated.len(),
                        volumes(total)
                    );
                }
            }
            if !report.failed.is_empty() {
                for (vol, why) in &report.failed {
                    eprintln!("Failed to update {vol}: {why}");
                }
                anyhow::bail!(
                    "policy {name} could not be re-applied to {} of {total} volumes (run the same update again to retry them): {}",
                    report.failed.len(),
                    report
                        .failed
                        .iter()
                        .map(|(v, _)| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        PolicyCommand::Ls { format } => {
            let policies = svc.policies().await.map_err(chain)?;
            match format {
                Format::Json => print_out(&format!("{:#}\n", json!(policies)))?,
                Format::Table => {
                    let rows: Vec<Vec<String>> = policies
                        .iter()
                        .map(|p| {
                            let mut active = match p.volumes.len() {
                                0 => "Unused".to_owned(),
                                1 => "In use by 1 volume".to_owned(),
                                n => format!("In use by {n} volumes"),
                            };
                            if !p.failed_updates.is_empty() {
                                active.push_str(&format!(" ({} not updated)", p.failed_updates.len()));
                            }
                            vec![p.name.clone(), p.content.clone(), active, volume_summary(&p.volumes)]
                        })
                        .collect();
                    print_out(&admin::render_table(
                        &["Policy Name", "Policy Content", "Active", "Volumes"],
                        &rows,
                    ))?;
                }
            }
        }
    }
    Ok(())
}

/// `a@ds, b@ds, c@ds and 7 more` (the JSON output has them all).
fn volume_summary(volumes: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut s = volumes.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if volumes.len() > SHOWN {
        s.push_str(&format!(" and {} more", volumes.len() - SHOWN));
    }
    s
}

async fn status(cfg: anyhow::Result<AgentConfig>, args: &StatusArgs) -> anyhow::Result<()> {
    let socket = args
        .socket
        .clone()
        .or_else(|| cfg.as_ref().ok().and_then(|c| c.socket.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let mut state = probe::probe(&socket, Duration::from_secs(5));
    let mut socket = socket;
    if let probe::ServiceState::Stopped { reason } = &state {
        // No agent service: a plugin may be running its agent embedded.
        match probe::probe(&args.plugin_socket, Duration::from_secs(5)) {
            embedded @ probe::ServiceState::Running(_) => {
                state = embedded;
                socket = args.plugin_socket.clone();
            }
            _ => {
                state = probe::ServiceState::Stopped {
                    reason: format!(
                        "{reason}; no plugin with an embedded agent at {}",
                        args.plugin_socket.display()
                    ),
                }
            }
        }
    }
    // Without datastores there is still a service to report on.
    let svc = match cfg {
        Ok(c) => service(&c).await,
        Err(e) => Err(e),
    };
    let (usage, policies) = match &svc {
        Ok(svc) => (
            Ok(svc.datastore_usage()),
            match svc.policy_store() {
                Ok(_) => svc.policies().await.map(Some).map_err(|e| error_chain(&e)),
                Err(_) => Ok(None),
            },
        ),
        Err(e) => (Err(format!("{e:#}")), Ok(None)),
    };
    if args.format == Format::Json {
        let service = match &state {
            probe::ServiceState::Running(v) => json!({"status": "running", "socket": socket, "agent": v}),
            probe::ServiceState::Stopped { reason } => {
                json!({"status": "stopped", "socket": socket, "reason": reason})
            }
            probe::ServiceState::NotResponding { reason } => {
                json!({"status": "not responding", "socket": socket, "reason": reason})
            }
        };
        let doc = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "service": service,
            "datastores": usage.as_ref().ok(),
            "datastores_error": usage.as_ref().err(),
            "policies": policies.as_ref().ok().and_then(Option::as_ref),
            "policies_error": policies.as_ref().err(),
        });
        return print_out(&format!("{doc:#}\n"));
    }
    let mut out = String::new();
    out.push_str("=== Service:\n");
    out.push_str(&format!("Version: {}\n", env!("CARGO_PKG_VERSION")));
    out.push_str(&format!("Status: {}\n", state.label()));
    out.push_str(&format!("Socket: {}\n", socket.display()));
    match &state {
        probe::ServiceState::Running(v) => {
            if let Some(host) = &v.embedded_in {
                out.push_str(&format!("Serving: embedded in {host}\n"));
            }
            out.push_str(&format!("Service version: {} (API {})\n", v.version, v.api));
            out.push_str(&format!("Backend: {}\n", v.backend));
            out.push_str(&format!("Serving datastores: {}\n", v.datastores.join(", ")));
        }
        probe::ServiceState::Stopped { reason } | probe::ServiceState::NotResponding { reason } => {
            out.push_str(&format!("Reason: {reason}\n"));
        }
    }
    out.push_str("=== Datastores:\n");
    match &usage {
        Ok(usage) => {
            let rows: Vec<Vec<String>> = usage
                .iter()
                .map(|d| {
                    vec![
                        d.name.clone(),
                        d.path
                            .as_ref()
                            .map_or_else(|| "(vSphere)".to_owned(), |p| p.display().to_string()),
                        if d.vsan { "yes" } else { "no" }.to_owned(),
                        d.volumes.to_string(),
                        d.free_bytes.map_or("N/A".into(), admin::human_size),
                        d.total_bytes.map_or("N/A".into(), admin::human_size),
                    ]
                })
                .collect();
            out.push_str(&admin::render_table(
                &["Datastore", "Path", "VSAN", "Volumes", "Free", "Size"],
                &rows,
            ));
        }
        Err(e) => out.push_str(&format!("N/A: {e}\n")),
    }
    out.push_str("=== Policies:\n");
    match &policies {
        Ok(Some(list)) if list.is_empty() => out.push_str("None\n"),
        Ok(Some(list)) => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|p| vec![p.name.clone(), p.content.clone(), p.volumes.len().to_string()])
                .collect();
            out.push_str(&admin::render_table(
                &["Policy Name", "Policy Content", "Volumes"],
                &rows,
            ));
        }
        Ok(None) => out.push_str("N/A (no VSAN datastore configured)\n"),
        Err(e) => out.push_str(&format!("N/A: {e}\n")),
    }
    print_out(&out)
}
