//! Processes: the plugin and agent daemons, hand-run commands, the busy
//! writer, memory readings.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::http;

/// Runs a command that must succeed; returns its trimmed stdout.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("run {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A running `vmdk-plugin serve` or `vmdk-agent serve`.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    /// Time from spawn to the socket accepting connections.
    pub served_after: Duration,
}

impl Daemon {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Resident and peak resident memory in KiB (`VmRSS`, `VmHWM`).
    pub fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        rss_kib(self.pid())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `VmRSS` and `VmHWM` of `pid`, KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |k: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// Where a plugin keeps its things.
#[derive(Debug, Clone)]
pub struct PluginPaths {
    /// Plugin socket.
    pub socket: PathBuf,
    /// Datastore `local`.
    pub datastore: PathBuf,
    /// Mount root.
    pub mount_root: PathBuf,
    /// State dir.
    pub state_dir: PathBuf,
    /// Docker API socket (a missing one for the groups without Docker).
    pub docker_socket: PathBuf,
    /// Log file.
    pub log: PathBuf,
}

impl PluginPaths {
    /// Paths under `dir`, socket `dir/vmdk.sock`.
    pub fn under(dir: &Path) -> PluginPaths {
        PluginPaths {
            socket: dir.join("vmdk.sock"),
            datastore: dir.join("ds"),
            mount_root: dir.join("mnt"),
            state_dir: dir.join("state"),
            docker_socket: dir.join("no-docker.sock"),
            log: dir.join("plugin.log"),
        }
    }

    /// Mount point of volume `name` (the plugin's `<root>/<name>@local`).
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        self.mount_root.join(format!("{name}@local"))
    }
}

fn log_file(p: &Path) -> anyhow::Result<File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(p)?)
}

/// Starts `vmdk-plugin serve` with its agent embedded, as the packages run
/// it, and waits until its socket is served.
pub fn start_plugin(bin: &Path, p: &PluginPaths) -> anyhow::Result<Daemon> {
    std::fs::create_dir_all(&p.datastore)?;
    let _ = std::fs::remove_file(&p.socket);
    let log = log_file(&p.log)?;
    let start = Instant::now();
    let child = Command::new(bin)
        .arg("serve")
        .arg("--socket")
        .arg(&p.socket)
        .arg("--datastore")
        .arg(format!("local={}", p.datastore.display()))
        .args(["--vm-id", "bench-vm"])
        .arg("--mount-root")
        .arg(&p.mount_root)
        .arg("--state-dir")
        .arg(&p.state_dir)
        .arg("--docker-socket")
        .arg(&p.docker_socket)
        .args(["--reconcile-interval", "0"])
        .env("VMDK_LOG", "warn")
        .env_remove("VMDK_AGENT_CONFIG")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let mut d = Daemon {
        child: Some(child),
        served_after: Duration::ZERO,
    };
    d.served_after = http::wait_socket(&p.socket, start, Duration::from_secs(120))
        .with_context(|| format!("plugin log {}", p.log.display()))?;
    Ok(d)
}

/// Writes an agent configuration naming one datastore `local` at `ds` and
/// the socket `socket`; returns its path.
pub fn agent_config(dir: &Path, ds: &Path, socket: &Path) -> anyhow::Result<PathBuf> {
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "socket = \"{}\"\n[[datastore]]\nname = \"local\"\npath = \"{}\"\n",
            socket.display(),
            ds.display()
        ),
    )?;
    Ok(cfg)
}

/// Starts `vmdk-agent --config CFG serve`.
pub fn start_agent(bin: &Path, cfg: &Path, socket: &Path, log: &Path) -> anyhow::Result<Daemon> {
    let _ = std::fs::remove_file(socket);
    let log = log_file(log)?;
    let start = Instant::now();
    let child = Command::new(bin)
        .arg("--config")
        .arg(cfg)
        .arg("serve")
        .env("VMDK_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let mut d = Daemon {
        child: Some(child),
        served_after: Duration::ZERO,
    };
    d.served_after = http::wait_socket(socket, start, Duration::from_secs(120))?;
    Ok(d)
}

/// The same work as the plugin, by hand: the programs a person runs, with
/// the plugin's options (`mkfs.ext4 -q -E nodiscard -L <label>`, src/sys;
/// mounts `nosuid,nodev`).
#[derive(Debug)]
pub struct Hand {
    /// The raw disk file.
    pub file: PathBuf,
    /// The mount point.
    pub mnt: PathBuf,
    dev: Option<String>,
}

impl Hand {
    /// A disk file and mount point under `dir`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Hand> {
        let mnt = dir.join(format!("{name}.mnt"));
        std::fs::create_dir_all(&mnt)?;
        Ok(Hand {
            file: dir.join(format!("{name}.img")),
            mnt,
            dev: None,
        })
    }

    /// `truncate -s SIZE` (the hand-run "create" of a thin disk).
    pub fn create(&self, size: &str) -> anyhow::Result<Duration> {
        let t = Instant::now();
        run("truncate", &["-s", size, path(&self.file)])?;
        Ok(t.elapsed())
    }

    /// `losetup` + `mkfs.ext4` + `mount` + `mkdir data` (the plugin makes
    /// `data` too).
    pub fn fresh_mount(&mut self, label: &str) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let dev = run("losetup", &["-f", "--show", path(&self.file)])?;
        run("mkfs.ext4", &["-q", "-E", "nodiscard", "-L", label, &dev])?;
        run("mount", &["-o", "nosuid,nodev", &dev, path(&self.mnt)])?;
        std::fs::create_dir(self.mnt.join("data"))?;
        self.dev = Some(dev);
        Ok(t.elapsed())
    }

    /// `losetup` + `mount`.
    pub fn remount(&mut self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let dev = run("losetup", &["-f", "--show", path(&self.file)])?;
        run("mount", &["-o", "nosuid,nodev", &dev, path(&self.mnt)])?;
        self.dev = Some(dev);
        Ok(t.elapsed())
    }

    /// `umount` + `losetup -d`.
    pub fn unmount(&mut self) -> anyhow::Result<Duration> {
        let dev = self.dev.take().context("hand disk not attached")?;
        let t = Instant::now();
        run("umount", &[path(&self.mnt)])?;
        run("losetup", &["-d", &dev])?;
        Ok(t.elapsed())
    }

    /// Deletes the disk file.
    pub fn remove(&mut self) -> anyhow::Result<()> {
        if self.dev.is_some() {
            self.unmount()?;
        }
        std::fs::remove_file(&self.file)?;
        Ok(())
    }
}

impl Drop for Hand {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            let _ = run("umount", &[path(&self.mnt)]);
            let _ = run("losetup", &["-d", &dev]);
        }
    }
}

/// A path as &str (the bench's paths are ASCII).
pub fn path(p: &Path) -> &str {
    p.to_str().expect("bench paths are UTF-8")
}

/// Another process's work keeping the disk busy: a thread writing 256 KiB
/// and fsyncing, in a loop, on the filesystem that holds the datastore.
#[derive(Debug)]
pub struct BusyWriter {
    stop: Arc<AtomicBool>,
    fsyncs: Arc<AtomicU64>,
    started: Instant,
    thread: Option<JoinHandle<()>>,
}

impl BusyWriter {
    /// Starts writing to `file`.
    pub fn start(file: PathBuf) -> anyhow::Result<BusyWriter> {
        let stop = Arc::new(AtomicBool::new(false));
        let fsyncs = Arc::new(AtomicU64::new(0));
        let mut f = File::create(&file)?;
        let (s, n) = (stop.clone(), fsyncs.clone());
        let thread = std::thread::spawn(move || {
            let buf = vec![0xa5u8; 256 << 10];
            let mut written = 0u64;
            while !s.load(Ordering::Relaxed) {
                if f.write_all(&buf).is_err() || f.sync_data().is_err() {
                    break;
                }
                written += buf.len() as u64;
                if written > 256 << 20 {
                    // Keep the file bounded: start over.
                    let _ = f.set_len(0);
                    let _ = std::io::Seek::rewind(&mut f);
                    written = 0;
                }
                n.fetch_add(1, Ordering::Relaxed);
            }
            drop(f);
            let _ = std::fs::remove_file(&file);
        });
        Ok(BusyWriter {
            stop,
            fsyncs,
            started: Instant::now(),
            thread: Some(thread),
        })
    }

    /// Stops; returns fsyncs per second achieved.
    pub fn finish(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.fsyncs.load(Ordering::Relaxed) as f64 / self.started.elapsed().as_secs_f64()
    }
}

impl Drop for BusyWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Builds volumes `prefix{from..to}` straight into a datastore in the
/// agent's own on-disk format (`vmdk_agent::testkit::write_volume`: the
/// agent's descriptor and sidecar types, without the fsyncs of a create).
pub fn populate(ds: &Path, prefix: &str, from: usize, to: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    for i in from..to {
        vmdk_agent::testkit::write_volume(ds, &format!("{prefix}{i:06}"), 1 << 30, 0, &[])
            .with_context(|| format!("write volume {i} into {}", ds.display()))?;
    }
    Ok(t.elapsed())
}
