//! `vmdk-plugin`: the vmdk Docker volume plugin daemon.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vmdk_plugin::config::{self, ServeConfig};

/// Docker volume plugin `vmdk`: VMDK disks for containers.
#[derive(Debug, Parser)]
#[command(name = "vmdk-plugin", version, about)]
struct Cli {
    /// Where logs go: auto (the systemd journal when systemd started the
    /// plugin, else text on stderr), text, json (one object per line on
    /// stderr) or journald. The filter is VMDK_LOG (default info).
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

// Parsed once at start; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Docker volume plugin API.
    Serve {
        /// Plugin socket; its file name is the driver name.
        #[arg(long, default_value = config::DEFAULT_SOCKET, env = "VMDK_PLUGIN_SOCKET")]
        socket: PathBuf,
        /// Agent URL (unix:///path or http://host:port). Without it the
        /// agent runs in this process on the --datastore directories.
        #[arg(long, env = "VMDK_AGENT_URL")]
        agent: Option<String>,
        /// The embedded agent's configuration file (the agent's TOML, e.g.
        /// backend = "vsphere" to talk to vCenter or ESXi directly; see
        /// docs/vsphere.md). Default: /etc/vmdk/agent.toml when it exists
        /// (the file `vmdk-agent` reads too), else built-in settings.
        #[arg(long, env = "VMDK_AGENT_CONFIG", value_name = "FILE")]
        agent_config: Option<PathBuf>,
        /// Embedded-agent datastore as NAME=DIR, or NAME=DIR,vsan for a VSAN
        /// datastore; repeatable; added after the configuration file's
        /// (the directory is created if missing). With no datastore
        /// anywhere: the built-in local=/var/lib/vmdk/datastores/local.
        #[arg(long = "datastore", value_name = "NAME=DIR[,vsan]")]
        datastores: Vec<String>,
        /// This VM's id. Default: /sys/class/dmi/id/product_uuid, else
        /// /etc/machine-id.
        #[arg(long, env = "VMDK_VM_ID")]
        vm_id: Option<String>,
        /// Where volumes are mounted.
        #[arg(long, default_value = config::DEFAULT_MOUNT_ROOT)]
        mount_root: PathBuf,
        /// Where mount state is kept.
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Docker API socket, used to reconcile mounts after a restart.
        #[arg(long, default_value = vmdk_plugin::docker_api::DOCKER_SOCKET)]
        docker_socket: PathBuf,
        /// Seconds between reconcile passes against Docker (0: only at start).
        #[arg(long, default_value_t = 60)]
        reconcile_interval: u64,
        /// Seconds a volume stays mounted and attached after its last
        /// Unmount, so a quick Mount again (Docker's copy-up, `docker cp`,
        /// a restart) reuses it (0: release at once).
        #[arg(long, env = "VMDK_DETACH_GRACE", default_value_t = 0)]
        detach_grace: u64,
        /// Limits of the plugin socket as KEY=VALUE,...: header-timeout,
        /// body-timeout, send-timeout (durations), max-connections,
        /// max-requests, max-body-bytes. Default:
        /// header-timeout=10s,body-timeout=10s,send-timeout=30s,max-connections=256,max-requests=64,max-body-bytes=65536.
        #[arg(long, env = "VMDK_SERVE_LIMITS", value_name = "KEY=VALUE,...")]
        limits: Option<vmdk_common::server::ServeLimits>,
        /// Local HTTP listener for /healthz, /readyz and /metrics
        /// (Prometheus), apart from the plugin socket; "off" disables it.
        /// Port 0 picks a free port, logged at start.
        #[arg(long, env = "VMDK_ADMIN_LISTEN", default_value = vmdk_common::admin::PLUGIN_ADMIN_DEFAULT, value_name = "ADDR|off", value_parser = |v: &str| vmdk_common::admin::AdminListen::parse_or(v, vmdk_common::admin::PLUGIN_ADMIN_DEFAULT))]
        admin_listen: vmdk_common::admin::AdminListen,
    },
    /// Check what the plugin needs on this VM (socket directory, mount
    /// propagation, agent, mkfs tools, Docker API, configuration) and say
    /// what to do about each problem. Changes nothing. Exit status 1 when
    /// a check fails.
    Doctor(DoctorArgs),
    /// Show what the plugin on this VM holds (volumes, devices, Docker
    /// mount IDs), checked against the live mounts. Changes nothing.
    Status {
        /// Plugin socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET, env = "VMDK_PLUGIN_SOCKET")]
        socket: PathBuf,
        /// Where volumes are mounted.
        #[arg(long, default_value = config::DEFAULT_MOUNT_ROOT)]
        mount_root: PathBuf,
        /// Where mount state is kept.
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Debug, clap::Args)]
struct DoctorArgs {
    /// Plugin socket.
    #[arg(long, default_value = config::DEFAULT_SOCKET, env = "VMDK_PLUGIN_SOCKET")]
    socket: PathBuf,
    /// Where volumes are mounted.
    #[arg(long, default_value = config::DEFAULT_MOUNT_ROOT)]
    mount_root: PathBuf,
    /// The separate agent the plugin uses, if any (unix:///path or
    /// http://host:port).
    #[arg(long, env = "VMDK_AGENT_URL")]
    agent: Option<String>,
    /// The embedded agent's configuration file.
    #[arg(long, env = "VMDK_AGENT_CONFIG", value_name = "FILE")]
    agent_config: Option<PathBuf>,
    /// The embedded agent's datastores, as given to `serve`.
    #[arg(long = "datastore", value_name = "NAME=DIR[,vsan]")]
    datastores: Vec<String>,
    /// Docker API socket. Default: DOCKER_HOST when it is unix://PATH,
    /// else /var/run/docker.sock.
    #[arg(long)]
    docker_socket: Option<PathBuf>,
    /// Directories searched for mkfs.ext4, mkfs.xfs and blkid, ':'-separated
    /// (the plugin's own search path by default).
    #[arg(long, value_name = "DIR:DIR")]
    tool_path: Option<String>,
}

/// How `status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// A table for people.
    Table,
    /// JSON for scripts.
    Json,
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down; mounts stay in place for running containers");
}

fn main() -> std::process::ExitCode {
    // Before any thread starts: few malloc arenas (docs/performance.md).
    vmdk_common::memory::tune();
    // Before any thread starts: takes systemd's sockets, clears its variables.
    let activation = vmdk_common::systemd::init_from_env();
    let cli = Cli::parse();
    vmdk_common::logging::init(&vmdk_common::logging::LogOptions {
        format: cli.log_format,
        default_filter: if matches!(cli.command, Command::Doctor(_)) {
            "warn"
        } else {
            "info"
        }
        .into(),
        command: !matches!(cli.command, Command::Serve { .. }),
        identifier: "vmdk-plugin",
    });
    vmdk_common::systemd::log_activation(&activation);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ERROR: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            socket,
            agent,
            agent_config,
            datastores,
            vm_id,
            mount_root,
            state_dir,
            docker_socket,
            reconcile_interval,
            detach_grace,
            limits,
            admin_listen,
        } => {
            // An empty value (an unset setting of the managed plugin, an
            // empty line in an environment file) means "not given".
            let given = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
            let agent = given(agent);
            let vm_id = given(vm_id);
            let agent_config = agent_config.filter(|p| !p.as_os_str().is_empty());
            if agent.is_some() && (!datastores.is_empty() || agent_config.is_some()) {
                anyhow::bail!(
                    "--datastore and --agent-config configure the embedded agent; they cannot be combined with --agent"
                );
            }
            let (vm_id, vm_id_source) = match vm_id {
                Some(v) => (v, config::VmIdSource::Flag),
                None => config::detect_vm_id().map_err(anyhow::Error::msg)?,
            };
            vmdk_agent::service::validate_vm_id(&vm_id).map_err(|e| anyhow::anyhow!("--vm-id: {e}"))?;
            let cfg = ServeConfig {
                socket,
                agent,
                agent_config,
                vm_id_source,
                datastores,
                vm_id,
                mount_root,
                state_dir,
                docker_socket,
                reconcile_interval,
                detach_grace,
                limits: limits.unwrap_or_default(),
                admin_listen,
            };
            match vmdk_common::server::raise_fd_limit() {
                Ok((before, after)) if after > before => {
                    tracing::info!(before, after, "raised the open-file limit")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
            }
            // Blocking threads: the requests that may run at once, plus 16
            // for background work, instead of tokio's 512. A first scan of
            // 10,000 volumes otherwise leaves hundreds of threads, each with
            // its touched stack (docs/performance.md). A blocking task that
            // waits (a volume's flock) belongs to a request or to background
            // work, so a thread is always left for the lock's holder.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(cfg.limits.max_requests.saturating_add(16))
                .build()?;
            rt.block_on(vmdk_plugin::serve::run(cfg, shutdown_signal()))
                .map_err(|e| anyhow::anyhow!(vmdk_plugin::error_chain(&e)))
        }
        Command::Status {
            socket,
            mount_root,
            state_dir,
            format,
        } => status(&socket, &mount_root, &state_dir, format),
        Command::Doctor(args) => doctor(args),
    }
}

fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let given = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let docker_socket = args.docker_socket.unwrap_or_else(|| {
        std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(vmdk_plugin::docker_api::DOCKER_SOCKET))
    });
    let tool_path = match args.tool_path {
        Some(p) => std::env::split_paths(&p).collect(),
        None => vmdk_plugin::sys::SEARCH_PATH.iter().map(PathBuf::from).collect(),
    };
    let cfg = vmdk_plugin::doctor::DoctorConfig {
        socket: args.socket,
        mount_root: args.mount_root,
        agent: given(args.agent),
        agent_config: args.agent_config.filter(|p| !p.as_os_str().is_empty()),
        datastores: args.datastores,
        docker_socket,
        tool_path,
        default_config: PathBuf::from(vmdk_agent::config::DEFAULT_CONFIG),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let checks = rt.block_on(vmdk_plugin::doctor::run(&cfg));
    emit(&vmdk_plugin::doctor::render(&checks))?;
    if checks.iter().any(|c| c.status == vmdk_plugin::doctor::Status::Fail) {
        std::process::exit(1);
    }
    Ok(())
}

/// Writes `text` to stdout. A reader that went away (`status | head`)
/// is not an error: the output is simply not wanted any more, so the
/// command ends quietly with status 0 instead of panicking on EPIPE.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow::anyhow!("cannot write to stdout: {e}")),
        _ => Ok(()),
    }
}

fn status(
    socket: &std::path::Path,
    mount_root: &std::path::Path,
    state_dir: &std::path::Path,
    format: Format,
) -> anyhow::Result<()> {
    use std::fmt::Write;
    use vmdk_plugin::sys::System;
    let mounts = vmdk_plugin::sys::LinuxSystem
        .mounts()
        .map_err(|e| anyhow::anyhow!(vmdk_plugin::error_chain(&e)))?;
    // The daemon mounts below the canonical path, as mountinfo shows it.
    let mount_root = std::fs::canonicalize(mount_root).unwrap_or_else(|_| mount_root.to_owned());
    let serving = std::os::unix::net::UnixStream::connect(socket).is_ok();
    let r = vmdk_plugin::status::report(socket, serving, &mount_root, state_dir, &mounts);
    if format == Format::Json {
        return emit(&format!("{}\n", serde_json::to_string_pretty(&r)?));
    }
    let mut out = String::new();
    writeln!(
        out,
        "Plugin socket: {} ({})",
        r.socket.display(),
        if r.serving { "serving" } else { "not running" }
    )?;
    writeln!(out, "State file:    {}", r.state_file.display())?;
    let rows: Vec<Vec<String>> = r
        .volumes
        .iter()
        .map(|v| {
            vec![
                v.volume.clone(),
                v.device.clone(),
                v.fstype.clone(),
                if v.read_only { "ro" } else { "rw" }.to_owned(),
                if v.mounted { "yes" } else { "NO" }.to_owned(),
                match v.ids.len() {
                    0 => "none (releasing)".to_owned(),
                    n => n.to_string(),
                },
            ]
        })
        .collect();
    writeln!(out)?;
    out.push_str(&vmdk_common::table::render_table(
        &["Volume", "Device", "Filesystem", "Access", "Mounted", "Mount IDs"],
        &rows,
    ));
    if !r.problems.is_empty() {
        writeln!(out)?;
        writeln!(out, "Problems (the plugin's recovery fixes these at its next start):")?;
        for p in &r.problems {
            writeln!(out, "  - {p}")?;
        }
    }
    emit(&out)
}
