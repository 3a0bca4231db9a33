//! Harness for the tests that drive a real Docker Engine through the `vmdk`
//! plugin.
//!
//! A [`Harness`] is one scenario's world:
//! * it holds the cross-binary lock `/run/lock/vmdk-docker-tests.lock` (other
//!   test binaries use the same Docker Engine and plugin socket) and a
//!   process-wide mutex, so scenarios never overlap;
//! * it fails, never skips, when the Docker Engine is not reachable;
//! * it runs `vmdk-plugin` on `/run/docker/plugins/vmdk.sock`, with the agent
//!   embedded or as separate `vmdk-agent` processes ("hosts"), on a datastore,
//!   mount root and state dir under `/tmp/vmdk-e2e/`;
//! * it removes, before starting, whatever a crashed earlier run left behind,
//!   and on drop (also when the test fails) its containers, compose projects,
//!   volumes, images, processes, mounts and loop devices.
//!
//! Everything is done the way a user would: the `docker` and `docker-compose`
//! CLIs, `losetup`, `/proc/self/mountinfo`. Images come from
//! `tests/images/build-image.sh` and are kept between runs.
//!
//! `VMDK_E2E_DRIVER=NAME` runs everything under driver NAME (socket
//! `/run/docker/plugins/NAME.sock`), for hosts where an installed plugin
//! already serves `vmdk.sock`.

#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

/// The driver name, and so the plugin socket `/run/docker/plugins/vmdk.sock`.
///
/// `VMDK_E2E_DRIVER=NAME` runs the plugin as driver NAME on
/// `/run/docker/plugins/NAME.sock` instead, for running the suite on a host
/// where an installed vmdk plugin already serves `vmdk.sock`.
pub fn driver() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| match std::env::var("VMDK_E2E_DRIVER") {
        Ok(n) if !n.is_empty() => {
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                "VMDK_E2E_DRIVER must be lower-case letters and digits, not {n:?}"
            );
            n
        }
        _ => "vmdk".to_owned(),
    })
}

/// The plugin socket; its file name makes the driver name.
pub fn plugin_socket() -> String {
    format!("/run/docker/plugins/{}.sock", driver())
}
/// Held exclusively by every test binary while it uses Docker.
pub const LOCK_FILE: &str = "/run/lock/vmdk-docker-tests.lock";
/// Every run's files live in a directory below this one.
pub const RUN_BASE: &str = "/tmp/vmdk-e2e";
/// The datastore name of the embedded and the separate agents.
pub const DATASTORE: &str = "local";
/// A second datastore, not VSAN.
pub const PLAIN_DATASTORE: &str = "nfs1";
/// The VM id the plugin reports (the same VM across failover).
pub const VM_ID: &str = "e2e-vm";
/// Label on every container the tests start.
pub const LABEL: &str = "io.vmdk.e2e=1";
/// Prefix of every compose project the tests create.
pub const PROJECT_PREFIX: &str = "vmdke2e";
/// A container command that runs until stopped and exits at once on SIGTERM
/// (a shell as PID 1 otherwise ignores SIGTERM and `docker stop` waits 10 s).
pub const LOOP_CMD: &str = "trap 'exit 0' TERM; while :; do sleep 1; done";

/// Default limit for one `docker` command.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(180);
/// Generous limit for state the tests poll for.
pub const WAIT: Duration = Duration::from_secs(90);

// ----- running programs ------------------------------------------------------

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// stdout, or a panic that shows everything.
    pub fn ok(self) -> String {
        if !self.success() {
            panic!("{self}");
        }
        self.stdout
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; a command still running after `timeout` is
/// killed and the test fails (a hung Docker must not hang CI).
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let command = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(25)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
                let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
                panic!(
                    "`{command}` did not finish within {timeout:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
                );
            }
            Err(e) => panic!("waiting for `{command}`: {e}"),
        }
    };
    if start.elapsed() > Duration::from_secs(5) {
        eprintln!("`{command}` took {:.1?}", start.elapsed());
    }
    Output {
        command,
        status,
        stdout: String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned(),
    }
}

/// `docker <args>`, whatever its exit status.
pub fn docker(args: &[&str]) -> Output {
    run(Command::new("docker").args(args), DOCKER_TIMEOUT)
}

/// `docker <args>`; panics unless it succeeds. Returns stdout.
pub fn docker_ok(args: &[&str]) -> String {
    docker(args).ok()
}

/// `docker <args>`; panics if it succeeds. Returns the output.
pub fn docker_fails(args: &[&str]) -> Output {
    let out = docker(args);
    assert!(!out.success(), "expected failure but it succeeded:\n{out}");
    out
}

/// Polls `f` until it returns `Ok`, failing the test after `timeout` with
/// the last reason.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(why) if start.elapsed() >= timeout => {
                panic!("timed out after {timeout:?} waiting for {what}: {why}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Fails the test with a clear message unless the Docker Engine answers.
pub fn require_docker() {
    let out = run(
        Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
        Duration::from_secs(60),
    );
    if !out.success() || out.stdout.trim().is_empty() {
        panic!(
            "the Docker Engine is not reachable, so the Docker Engine tests cannot run (they fail rather than skip).\n\
             Start dockerd (tests/run.sh does) and run them again.\n{out}"
        );
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sends `sig` to `pid`.
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and touches no memory.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state is Z.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

// ----- exclusivity -------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// The process-wide mutex plus the cross-binary `flock`.
#[derive(Debug)]
struct Exclusive {
    _flock: Flock<File>,
    _serial: MutexGuard<'static, ()>,
}

fn exclusive(name: &str) -> Exclusive {
    let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(LOCK_FILE)
        .unwrap_or_else(|e| panic!("open {LOCK_FILE}: {e}"));
    let asked = Instant::now();
    let flock = Flock::lock(file, FlockArg::LockExclusive).unwrap_or_else(|(_, e)| panic!("flock {LOCK_FILE}: {e}"));
    if asked.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "{name}: waited {:.0?} for another test binary to release {LOCK_FILE}",
            asked.elapsed()
        );
    }
    Exclusive {
        _flock: flock,
        _serial: serial,
    }
}

// ----- binaries ------------------------------------------------------------------

/// The plugin binary cargo built for this test.
pub fn plugin_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmdk-plugin"))
}

/// The agent binary, built next to the plugin by `cargo test --workspace`.
pub fn agent_bin() -> PathBuf {
    let p = plugin_bin().with_file_name("vmdk-agent");
    assert!(
        p.is_file(),
        "{} is missing: the agent binary is built by `cargo test --workspace` \
         (or `cargo build -p vmdk-agent`); build it and run again",
        p.display()
    );
    p
}

/// A daemon the harness started; killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, program: &Path, args: &[String], log: &Path, pidfile: &Path) -> Daemon {
        let logf = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("VMDK_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf);
        // SAFETY: the closure runs in the child between fork and exec and only
        // calls prctl(2), which is async-signal-safe. If this test process
        // dies without unwinding, the kernel kills the daemon with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", describe(&cmd)));
        let _ = fs::write(pidfile, child.id().to_string());
        Daemon {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn check_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited with {st}; its log:\n{}", self.name, self.log_text());
        }
    }

    /// SIGKILL, as a crash would.
    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if it does not exit within 20 s.
    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        signal(self.child.id(), libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

// ----- what the host shows -----------------------------------------------------

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Mount point.
    pub target: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Device.
    pub source: String,
    /// Per-mount options (`rw`/`ro`, ...).
    pub options: String,
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Mounts at or below `root`, from `/proc/self/mountinfo`.
pub fn mounts_under(root: &Path) -> Vec<Mount> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some(Mount {
                target: PathBuf::from(unescape_mountinfo(pre.get(4)?)),
                options: pre.get(5)?.to_string(),
                fstype: post.first()?.to_string(),
                source: unescape_mountinfo(post.get(1)?),
            })
        })
        .filter(|m| m.target.starts_with(root))
        .collect()
}

/// Loop devices whose backing file is below `dir`, as `losetup` lists them:
/// `(device, backing file)`.
pub fn loops_under(dir: &Path) -> Vec<(String, String)> {
    let out = run(
        Command::new("losetup").args(["--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"]),
        Duration::from_secs(30),
    )
    .ok();
    let dir = dir.to_string_lossy();
    out.lines()
        .filter_map(|l| {
            let (dev, back) = l.trim().split_once(' ')?;
            let back = back.trim().trim_end_matches(" (deleted)");
            back.starts_with(dir.as_ref())
                .then(|| (dev.to_owned(), back.to_owned()))
        })
        .collect()
}

fn lazy_unmount(target: &Path) {
    let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
}

fn detach_loop(dev: &str) {
    let _ = run(Command::new("losetup").args(["-d", dev]), Duration::from_secs(30));
}

// ----- images --------------------------------------------------------------------

/// `tests/images/build-image.sh`.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/images/build-image.sh")
}

fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The image `kind` of `build-image.sh` (busybox, copyup, registry,
/// postgres), built on first use. Its tag carries a hash of the build
/// script, so a changed script builds anew and an unchanged one is reused
/// from earlier runs.
pub fn image(kind: &str) -> String {
    let script = build_script();
    let text = fs::read(&script).unwrap_or_else(|e| panic!("read {}: {e}", script.display()));
    let repo = format!("vmdk-e2e/{kind}");
    let tag = format!("{repo}:{:012x}", fnv64(&text) & 0xffff_ffff_ffff);
    if docker(&["image", "inspect", "--format", "{{.Id}}", &tag]).success() {
        return tag;
    }
    // Drop this kind's images built from older versions of the script.
    let old = docker_ok(&["images", &repo, "--format", "{{.Repository}}:{{.Tag}}"]);
    for t in old.lines().filter(|t| !t.is_empty() && *t != tag) {
        let _ = docker(&["rmi", t]);
    }
    let start = Instant::now();
    run(
        Command::new("bash").arg(&script).args([kind, &tag]),
        Duration::from_secs(300),
    )
    .ok();
    eprintln!("built image {tag} in {:.1?}", start.elapsed());
    tag
}

// ----- the harness ---------------------------------------------------------------

/// One scenario's plugin, agents, paths and the Docker objects to clean up.
#[derive(Debug)]
pub struct Harness {
    /// Scenario name.
    pub name: String,
    /// This run's directory.
    pub dir: PathBuf,
    /// Datastore `local` (marked VSAN).
    pub datastore: PathBuf,
    /// Datastore `nfs1` (not VSAN).
    pub plain_datastore: PathBuf,
    /// The plugin's mount root.
    pub mount_root: PathBuf,
    /// The plugin's state dir.
    pub state_dir: PathBuf,
    /// Extra `vmdk-plugin serve` flags for the next plugin start.
    pub plugin_args: Vec<String>,
    plugin: Option<Daemon>,
    agent: Option<Daemon>,
    agent_socket: Option<PathBuf>,
    starts: u32,
    volumes: Vec<String>,
    projects: Vec<Compose>,
    images: Vec<String>,
    restarted_dockerd: bool,
    started: Instant,
    // Dropped last: the lock is held until everything above is cleaned up.
    _exclusive: Exclusive,
}

impl Harness {
    /// Takes the locks, checks Docker, cleans up after crashed runs and
    /// starts the plugin with its agent embedded.
    pub fn new(name: &str) -> Harness {
        let exclusive = exclusive(name);
        require_docker();
        let dir = PathBuf::from(RUN_BASE).join(format!("{name}-{}-{}", std::process::id(), unix_now()));
        kill_leftover_daemons();
        for d in ["ds", "nfs1", "mnt", "state"] {
            fs::create_dir_all(dir.join(d)).unwrap_or_else(|e| panic!("create {}: {e}", dir.join(d).display()));
        }
        let mut h = Harness {
            name: name.to_owned(),
            datastore: dir.join("ds"),
            plain_datastore: dir.join("nfs1"),
            mount_root: dir.join("mnt"),
            state_dir: dir.join("state"),
            dir,
            plugin_args: Vec::new(),
            plugin: None,
            agent: None,
            agent_socket: None,
            starts: 0,
            volumes: Vec::new(),
            projects: Vec::new(),
            images: Vec::new(),
            restarted_dockerd: false,
            started: Instant::now(),
            _exclusive: exclusive,
        };
        h.start_plugin(None);
        remove_leftover_docker_objects();
        remove_leftover_host_state(&h.dir);
        h
    }

    /// Notes progress on stderr (shown for failed tests, or with
    /// `--nocapture`).
    pub fn step(&self, what: &str) {
        eprintln!("[{} +{:.1?}] {what}", self.name, self.started.elapsed());
    }

    fn next_log(&mut self, what: &str) -> PathBuf {
        self.starts += 1;
        self.dir.join(format!("{:02}-{what}.log", self.starts))
    }

    /// The `--datastore` flags of this run's datastores, for the plugin's
    /// embedded agent, `vmdk-agent serve` and admin commands alike.
    pub fn datastore_args(&self) -> Vec<String> {
        vec![
            "--datastore".to_owned(),
            format!("{DATASTORE}={},vsan", self.datastore.display()),
            "--datastore".to_owned(),
            format!("{PLAIN_DATASTORE}={}", self.plain_datastore.display()),
        ]
    }

    /// Runs a `vmdk-agent` admin command on this run's datastores.
    pub fn try_admin(&self, args: &[&str]) -> Output {
        run(Command::new(agent_bin()).args(self.datastore_args()).args(args), WAIT)
    }

    /// Runs a `vmdk-agent` admin command on this run's datastores (`local`
    /// is VSAN, as the seed's vsanDatastore) and asserts it succeeds.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = self.try_admin(args);
        assert!(
            out.status.success(),
            "vmdk-agent {args:?} failed: {}{}",
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// Starts a `vmdk-agent serve` "host" on this run's datastore; returns
    /// its socket.
    pub fn start_agent(&mut self, host: &str) -> PathBuf {
        assert!(self.agent.is_none(), "an agent is already running");
        let socket = self.dir.join(format!("{host}.sock"));
        let log = self.next_log(&format!("agent-{host}"));
        let mut args = vec!["serve".to_owned(), "--admin-listen".to_owned(), "off".to_owned()];
        args.extend(self.datastore_args());
        args.extend(["--socket".to_owned(), socket.display().to_string()]);
        let mut d = Daemon::spawn(
            &format!("vmdk-agent ({host})"),
            &agent_bin(),
            &args,
            &log,
            &self.dir.join("agent.pid"),
        );
        wait_for(&format!("the agent socket {}", socket.display()), WAIT, || {
            d.check_running();
            std::os::unix::net::UnixStream::connect(&socket)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        self.agent = Some(d);
        self.agent_socket = Some(socket.clone());
        socket
    }

    /// SIGKILLs the agent, as a host crash would.
    pub fn kill_agent(&mut self) {
        self.agent.take().expect("no agent running").kill9();
    }

    /// Starts `vmdk-plugin serve` on the plugin socket, with the agent
    /// embedded (`None`) or at `agent`, and waits until it answers and has
    /// finished its start-up recovery.
    pub fn start_plugin(&mut self, agent: Option<&Path>) {
        self.start_plugin_no_wait(agent);
        self.wait_plugin_recovered();
    }

    /// Starts the plugin and returns once its socket answers, possibly
    /// before recovery has finished.
    pub fn start_plugin_no_wait(&mut self, agent: Option<&Path>) {
        assert!(self.plugin.is_none(), "the plugin is already running");
        let socket = plugin_socket();
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            panic!(
                "{socket} is served by a process these tests did not start (a manually started \
                 vmdk-plugin?). The Docker Engine tests need that socket; stop that process and run again \
                 (or set VMDK_E2E_DRIVER to test under another driver name)."
            );
        }
        let log = self.next_log("plugin");
        let mut args = vec![
            "serve".to_owned(),
            "--admin-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--socket".to_owned(),
            socket.clone(),
            "--vm-id".to_owned(),
            VM_ID.to_owned(),
            "--mount-root".to_owned(),
            self.mount_root.display().to_string(),
            "--state-dir".to_owned(),
            self.state_dir.display().to_string(),
        ];
        match agent {
            Some(sock) => {
                args.push("--agent".to_owned());
                args.push(format!("unix://{}", sock.display()));
            }
            None => args.extend(self.datastore_args()),
        }
        args.extend(self.plugin_args.iter().cloned());
        let mut d = Daemon::spawn("vmdk-plugin", &plugin_bin(), &args, &log, &self.dir.join("plugin.pid"));
        wait_for("the plugin socket", WAIT, || {
            d.check_running();
            std::os::unix::net::UnixStream::connect(&socket)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        self.plugin = Some(d);
    }

    /// Waits until the running plugin logs the end of its start-up recovery.
    pub fn wait_plugin_recovered(&mut self) {
        let d = self.plugin.as_mut().expect("no plugin running");
        wait_for("the plugin's start-up recovery", WAIT, || {
            d.check_running();
            if d.log_text().contains("recovery finished") {
                Ok(())
            } else {
                Err("not logged yet".into())
            }
        });
    }

    /// Stops the plugin with SIGTERM (mounts stay for running containers).
    pub fn stop_plugin(&mut self) {
        self.plugin.take().expect("no plugin running").terminate();
    }

    /// SIGKILLs the plugin, as a crash would; its socket file stays behind.
    pub fn kill_plugin(&mut self) {
        self.plugin.take().expect("no plugin running").kill9();
    }

    /// The plugin's log so far (all its starts).
    pub fn plugin_logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = fs::read_dir(&self.dir) {
            let mut logs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            logs.sort();
            for p in logs.into_iter().filter(|p| p.extension().is_some_and(|e| e == "log")) {
                out.push_str(&format!("===== {} =====\n", p.display()));
                out.push_str(&fs::read_to_string(&p).unwrap_or_default());
            }
        }
        out
    }

    // ----- Docker objects ------------------------------------------------------

    /// Remembers a volume to remove at the end.
    pub fn track_volume(&mut self, name: &str) {
        if !self.volumes.iter().any(|v| v == name) {
            self.volumes.push(name.to_owned());
        }
    }

    /// Remembers an image to remove at the end.
    pub fn track_image(&mut self, tag: &str) {
        self.images.push(tag.to_owned());
    }

    /// `docker volume create --driver=vmdk --name=NAME -o OPT...`; returns
    /// what Docker printed.
    pub fn create_volume(&mut self, name: &str, opts: &[&str]) -> String {
        self.track_volume(name);
        let mut args = vec![
            "volume".to_owned(),
            "create".into(),
            format!("--driver={}", driver()),
            format!("--name={name}"),
        ];
        for o in opts {
            args.push("-o".into());
            args.push((*o).to_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&args).trim().to_owned()
    }

    /// An image holding `/marker` with `marker`, built now and removed at
    /// the end.
    pub fn app_image(&mut self, tag: &str, marker: &str) -> String {
        run(
            Command::new("bash").arg(build_script()).args(["app", tag, marker]),
            Duration::from_secs(120),
        )
        .ok();
        self.track_image(tag);
        tag.to_owned()
    }

    /// A compose project (removed with `down` at the end).
    pub fn compose(&mut self, project: &str, file: &Path, env: &[(&str, String)]) -> Compose {
        assert!(project.starts_with(PROJECT_PREFIX));
        let c = Compose {
            project: project.to_owned(),
            file: file.to_owned(),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
        };
        self.projects.push(c.clone());
        c
    }

    /// Restarts the Docker daemon the way this machine runs it (no
    /// systemd): SIGTERM to the pid in /var/run/docker.pid, wait for it to
    /// exit, `setsid /usr/sbin/dockerd`, wait for `docker info`.
    pub fn restart_dockerd(&mut self) {
        self.restarted_dockerd = true;
        let pid: u32 = fs::read_to_string("/var/run/docker.pid")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .expect("dockerd pid in /var/run/docker.pid");
        signal(pid, libc::SIGTERM);
        wait_for("dockerd to exit", Duration::from_secs(120), || {
            if alive(pid) {
                Err(format!("pid {pid} still running"))
            } else {
                Ok(())
            }
        });
        start_dockerd();
        wait_for("dockerd to answer again", Duration::from_secs(120), || {
            let out = run(
                Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
                Duration::from_secs(30),
            );
            if out.success() {
                Ok(())
            } else {
                Err(out.stderr)
            }
        });
    }

    // ----- what a user checks on the host ----------------------------------------

    /// `vol@local`.
    pub fn full(&self, vol: &str) -> String {
        format!("{vol}@{DATASTORE}")
    }

    /// The volume's extent file in the datastore.
    pub fn flat_file(&self, vol: &str) -> PathBuf {
        self.datastore.join(format!("dockvols/_DEFAULT/{vol}-flat.vmdk"))
    }

    /// The volume's descriptor in the datastore.
    pub fn descriptor(&self, vol: &str) -> PathBuf {
        self.datastore.join(format!("dockvols/_DEFAULT/{vol}.vmdk"))
    }

    /// Mounts below the mount root.
    pub fn mounts(&self) -> Vec<Mount> {
        mounts_under(&self.mount_root)
    }

    /// Loop devices backed by this run's datastore.
    pub fn loops(&self) -> Vec<(String, String)> {
        loops_under(&self.datastore)
    }

    fn volume_usage(&self, vol: &str) -> (Vec<Mount>, Vec<(String, String)>) {
        let dir = self.mount_root.join(self.full(vol));
        let flat = self.flat_file(vol).display().to_string();
        let mounts = self
            .mounts()
            .into_iter()
            .filter(|m| m.target.starts_with(&dir))
            .collect();
        let loops = self.loops().into_iter().filter(|(_, b)| *b == flat).collect();
        (mounts, loops)
    }

    /// Asserts the volume is mounted exactly once, on its one loop device.
    pub fn assert_mounted_once(&self, vol: &str) {
        let (mounts, loops) = self.volume_usage(vol);
        assert_eq!(
            mounts.len(),
            1,
            "{vol} should be mounted exactly once; mounts: {mounts:#?}"
        );
        assert_eq!(
            loops.len(),
            1,
            "{vol} should be attached exactly once; loops: {loops:?}"
        );
        assert_eq!(
            mounts[0].source, loops[0].0,
            "{vol} is mounted from {} but attached as {}",
            mounts[0].source, loops[0].0
        );
        assert_eq!(mounts[0].target, self.mount_root.join(self.full(vol)));
    }

    /// Waits until the volume is neither mounted nor attached, and
    /// `docker volume inspect` says detached.
    pub fn wait_released(&self, vol: &str) {
        wait_for(&format!("{vol} to be unmounted and detached"), WAIT, || {
            let (mounts, loops) = self.volume_usage(vol);
            if !mounts.is_empty() || !loops.is_empty() {
                return Err(format!("mounts {mounts:?}, loop devices {loops:?}"));
            }
            let st = inspect_volume(vol)["Status"]["status"].clone();
            if st != "detached" {
                return Err(format!("inspect says status {st}"));
            }
            Ok(())
        });
    }

    /// Waits until nothing is mounted below the mount root and no loop
    /// device is backed by the datastore.
    pub fn wait_nothing_left(&self) {
        wait_for("no vmdk mounts and no loop devices left", WAIT, || {
            let (m, l) = (self.mounts(), self.loops());
            if m.is_empty() && l.is_empty() {
                Ok(())
            } else {
                Err(format!("mounts {m:#?}, loop devices {l:?}"))
            }
        });
    }

    // ----- teardown --------------------------------------------------------------

    fn teardown(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} failed; plugin and agent logs -----\n{}",
                self.name,
                self.plugin_logs()
            );
        }
        if self.restarted_dockerd {
            ensure_dockerd();
        }
        // Docker calls Unmount while removing running containers; a plugin
        // that is down would make each call retry for 15 s.
        if self.plugin.is_none() {
            let agent = match (&mut self.agent, &self.agent_socket) {
                (Some(_), Some(s)) => Some(s.clone()),
                _ => None,
            };
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.start_plugin_no_wait(agent.as_deref())
            }));
            if started.is_err() {
                eprintln!("teardown: could not restart the plugin for cleanup");
            }
        }
        for c in std::mem::take(&mut self.projects) {
            let _ = c.run(&["down", "--volumes", "--remove-orphans", "--timeout", "5"]);
        }
        remove_labelled_containers();
        for v in std::mem::take(&mut self.volumes) {
            let _ = docker(&["volume", "rm", "-f", &v]);
        }
        for i in std::mem::take(&mut self.images) {
            let _ = docker(&["rmi", "-f", &i]);
        }
        if let Some(mut p) = self.plugin.take() {
            p.terminate();
        }
        if let Some(mut a) = self.agent.take() {
            a.terminate();
        }
        release_host_state(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
        self.step("cleaned up");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // A panic here would abort the whole test binary; report instead.
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.teardown())) {
            eprintln!("teardown of {} failed: {e:?}", self.name);
        }
    }
}

/// A docker-compose (v1) project.
#[derive(Debug, Clone)]
pub struct Compose {
    /// Project name (`-p`).
    pub project: String,
    /// Compose file (`-f`).
    pub file: PathBuf,
    /// Variables the file refers to.
    pub env: Vec<(String, String)>,
}

impl Compose {
    /// `docker-compose -p P -f F <args>`, whatever its exit status.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("--no-ansi")
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(&self.file)
            .args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        run(&mut cmd, Duration::from_secs(300))
    }

    /// Like [`Compose::run`]; panics unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        self.run(args).ok()
    }

    /// `docker-compose exec -T SERVICE CMD...` stdout; panics on failure.
    pub fn exec(&self, service: &str, cmd: &[&str]) -> String {
        let mut args = vec!["exec", "-T", service];
        args.extend_from_slice(cmd);
        self.ok(&args)
    }
}

/// `docker volume inspect NAME` as JSON (panics if Docker refuses).
pub fn inspect_volume(name: &str) -> serde_json::Value {
    let out = docker_ok(&["volume", "inspect", name]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspect {name}: {e}: {out}"));
    v[0].clone()
}

/// `docker volume ls` rows as `(driver, name)`.
pub fn volume_ls() -> Vec<(String, String)> {
    docker_ok(&["volume", "ls"])
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect()
}

/// `docker run --label io.vmdk.e2e=1 ARGS...`; panics unless it succeeds.
pub fn run_container(args: &[&str]) -> String {
    docker_ok(&container_args(args))
}

/// Like [`run_container`], whatever the exit status.
pub fn try_run_container(args: &[&str]) -> Output {
    docker(&container_args(args))
}

fn container_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["run", "--label", LABEL];
    v.extend_from_slice(args);
    v
}

/// `docker exec CONTAINER sh -c SCRIPT` stdout; panics on failure.
pub fn exec_sh(container: &str, script: &str) -> String {
    docker_ok(&["exec", container, "sh", "-c", script])
}

/// The `State.Running` of a container.
pub fn is_running(container: &str) -> bool {
    docker(&["inspect", "--format", "{{.State.Running}}", container])
        .stdout
        .trim()
        == "true"
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `GET path` on 127.0.0.1:port; the status code.
pub fn http_status(port: u16, path: &str) -> Result<u16, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost:{port}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    buf.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {buf:?}"))
}

// ----- leftovers -------------------------------------------------------------------

/// Starts dockerd as this machine does (no systemd), detached from the
/// test: its own session, not a child of this process, none of its
/// environment.
fn start_dockerd() {
    run(
        Command::new("sh")
            .args([
                "-c",
                "setsid /usr/sbin/dockerd >>/var/log/dockerd.log 2>&1 </dev/null &",
            ])
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir("/"),
        Duration::from_secs(30),
    )
    .ok();
}

/// Starts dockerd if a failed restart left it down.
fn ensure_dockerd() {
    let up = || {
        run(
            Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
            Duration::from_secs(30),
        )
        .success()
    };
    if up() {
        return;
    }
    let running = fs::read_to_string("/var/run/docker.pid")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .is_some_and(alive);
    if !running {
        start_dockerd();
    }
    let start = Instant::now();
    while !up() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn run_dirs() -> Vec<PathBuf> {
    fs::read_dir(RUN_BASE)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

/// Kills plugins and agents an earlier, crashed run of these tests started
/// (found by the pid files in its run directory, checked against the
/// process's command line).
fn kill_leftover_daemons() {
    for dir in run_dirs() {
        for f in ["plugin.pid", "agent.pid"] {
            let Some(pid) = fs::read_to_string(dir.join(f))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if alive(pid) && cmdline.contains(&*dir.to_string_lossy()) {
                eprintln!("killing leftover {f} process {pid} of {}", dir.display());
                signal(pid, libc::SIGKILL);
                let start = Instant::now();
                while alive(pid) && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

fn remove_labelled_containers() {
    let ids = docker(&["ps", "-aq", "--filter", &format!("label={LABEL}")]).stdout;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(ids);
        let _ = docker(&args);
    }
}

/// Names these tests give volumes, so records of a crashed run can go.
const KNOWN_VOLUMES: &[&str] = &["vsanvol1", "vsanvol2", "vsanvol3"];

/// Removes containers, compose networks and volume records a crashed run
/// left in Docker. Runs with this run's plugin up, so Docker's Unmount and
/// Get calls are answered at once. Only volumes of this driver are touched.
fn remove_leftover_docker_objects() {
    remove_labelled_containers();
    let nets = docker(&["network", "ls", "--format", "{{.Name}}"]).stdout;
    for n in nets.lines().filter(|n| n.starts_with(PROJECT_PREFIX)) {
        let _ = docker(&["network", "rm", n]);
    }
    let listed = docker(&["volume", "ls", "-q", "--filter", &format!("driver={}", driver())]).stdout;
    let mut names: Vec<&str> = listed
        .lines()
        .filter(|v| KNOWN_VOLUMES.contains(v) || v.starts_with("e2e-") || v.starts_with(PROJECT_PREFIX))
        .collect();
    // Records Docker keeps for volumes this run's plugin does not list.
    for v in KNOWN_VOLUMES {
        let d = docker(&["volume", "inspect", "--format", "{{.Driver}}", v]);
        if d.success() && d.stdout.trim() == driver() && !names.contains(v) {
            names.push(v);
        }
    }
    for v in names {
        let _ = docker(&["volume", "rm", "-f", v]);
    }
    // Per-run images (`build-image.sh app`), with all their tags.
    let ids = docker(&["images", "-q", "--filter", "label=io.vmdk.e2e.app"]).stdout;
    let mut ids: Vec<&str> = ids.split_whitespace().collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let _ = docker(&["rmi", "-f", id]);
    }
}

/// Unmounts what is mounted below `dir` and detaches loop devices backed
/// by files below it.
fn release_host_state(dir: &Path) {
    let mut ms = mounts_under(dir);
    // Deepest first.
    ms.sort_by_key(|m| std::cmp::Reverse(m.target.components().count()));
    for m in ms {
        lazy_unmount(&m.target);
    }
    for (dev, _) in loops_under(dir) {
        detach_loop(&dev);
    }
}

/// Cleans mounts, loop devices and directories of earlier runs.
fn remove_leftover_host_state(current: &Path) {
    for dir in run_dirs().into_iter().filter(|d| d != current) {
        eprintln!("removing leftovers of an earlier run in {}", dir.display());
        release_host_state(&dir);
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Parses `sha256sum` output: the first word of the first line.
pub fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_owned()
}
