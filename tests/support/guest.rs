//! A real Linux guest under QEMU for tests: Debian 12's cloud kernel, a
//! busybox initramfs (`tests/guest/build.sh`), VMware's PVSCSI controller,
//! disks hot-added and removed over QMP, a shell on the serial console, and
//! optionally host unix sockets or host TCP listeners reachable from the
//! guest at fixed addresses. See `/work/shared/reference/qemu-guest.md` for the facts it
//! rests on and `docs/testing.md` for its use.
//!
//! ```ignore
//! #[path = "support/guest.rs"]
//! mod guest;
//! let mut g = guest::Guest::boot(guest::GuestSpec {
//!     uuid: "4211c0de-0000-4000-8000-000000000001".into(),
//!     controllers: vec![guest::Controller::pvscsi("pvscsi0", Some("0x10"))],
//!     ..Default::default()
//! })?;
//! let id = g.add_disk(&guest::DiskSpec::new(&file, "pvscsi0", 3).wwn(0x6000c29abcdef012))?;
//! let (status, out) = g.sh("ls /sys/block");
//! ```
//!
//! - TCG only (`-accel tcg`): this machine's KVM is PVM and cannot run a
//!   stock kernel.
//! - The guest's console is a unix socket this process listens on (QEMU
//!   connects to it), and so is QMP. Nothing is left behind: dropping a
//!   [`Guest`] SIGKILLs its QEMU and the `socat`s it started, and QEMU is
//!   started with `PR_SET_PDEATHSIG` from a thread that lives as long as
//!   the `Guest`, so it dies with this process too.
//! - Controllers can be hot-added ([`Guest::add_controller`]): the `pc`
//!   machine's ACPI PCI hot-plug works with Debian's kernel
//!   (`CONFIG_HOTPLUG_PCI_ACPI=y`).
//! - [`Guest::hotplug`] gives a [`Hotplug`] handle on QMP that another
//!   thread can use while this one runs a shell command in the guest (the
//!   test hypervisor bridge, `tests/support/bridge.rs`, does).
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a boot may take to reach the guest's shell (a liveness bound:
/// a boot takes 3-6 s here).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// The default liveness bound of [`Guest::sh`].
pub const SH_TIMEOUT: Duration = Duration::from_secs(120);
/// The liveness bound of one QMP command.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(60);

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// A name for logs and messages.
    pub name: String,
    /// The VM's BIOS UUID (`-uuid`), which the guest reads from
    /// `/sys/class/dmi/id/product_uuid`.
    pub uuid: String,
    /// PVSCSI controllers present at boot.
    pub controllers: Vec<Controller>,
    /// Disks attached at boot, as a VM's configuration lists them.
    pub disks: Vec<DiskSpec>,
    /// `(guest address, host unix socket)`: a TCP connection from the
    /// guest to the address (in 10.0.2.0/24, e.g. `10.0.2.100:7981`) is
    /// carried by a `socat` to the socket. The guest's eth0 is
    /// 10.0.2.15/24 and can reach nothing else (`restrict=on`).
    pub forwards: Vec<(String, PathBuf)>,
    /// `(guest address, host TCP address)`: like `forwards`, to a TCP
    /// listener of this host (e.g. the vSphere simulator's
    /// `127.0.0.1:<port>`) instead of a unix socket.
    pub tcp_forwards: Vec<(String, std::net::SocketAddr)>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Programs to put in the guest's `/bin` (with their libraries), e.g.
    /// `env!("CARGO_BIN_EXE_vmdk-plugin")`.
    pub programs: Vec<PathBuf>,
}

impl GuestSpec {
    /// The QEMU id of `disks[index]` once booted, for
    /// [`Guest::remove_disk`] and [`Hotplug::remove_disk`].
    pub fn disk_id(index: usize) -> String {
        format!("disk{index}")
    }
}

impl Default for GuestSpec {
    fn default() -> Self {
        Self {
            name: "guest".into(),
            uuid: "4211c0de-0000-4000-8000-000000000000".into(),
            controllers: Vec::new(),
            disks: Vec::new(),
            forwards: Vec::new(),
            tcp_forwards: Vec::new(),
            memory_mib: 256,
            programs: Vec::new(),
        }
    }
}

/// A VMware paravirtual SCSI controller (QEMU's `pvscsi`).
#[derive(Debug, Clone)]
pub struct Controller {
    /// The QEMU device id; its SCSI bus is `<id>.0`.
    pub id: String,
    /// Its PCI slot on the root bus (`0x10`); the guest sees
    /// `0000:00:10.0`. QEMU picks one when `None`.
    pub pci_addr: Option<String>,
    /// Whether it tells the guest about hot-added disks (`use_msg`). Off,
    /// the guest sees a new disk only after a SCSI rescan.
    pub use_msg: bool,
}

impl Controller {
    /// A controller that sends hot-plug messages.
    pub fn pvscsi(id: &str, pci_addr: Option<&str>) -> Self {
        Self {
            id: id.into(),
            pci_addr: pci_addr.map(Into::into),
            use_msg: true,
        }
    }

    /// The guest's PCI address of a controller at slot `pci_addr`
    /// (`0x10` gives `0000:00:10.0`).
    pub fn guest_pci_address(&self) -> Option<String> {
        let slot = self.pci_addr.as_deref()?;
        let slot = u8::from_str_radix(slot.trim_start_matches("0x"), 16).ok()?;
        Some(format!("0000:00:{slot:02x}.0"))
    }

    fn props(&self) -> Value {
        let mut v = json!({"driver": "pvscsi", "id": self.id, "use_msg": u8::from(self.use_msg)});
        if let Some(a) = &self.pci_addr {
            v["addr"] = json!(a);
        }
        v
    }
}

/// A raw disk image attached as a `scsi-hd`.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// The image file (raw).
    pub file: PathBuf,
    /// The controller's id.
    pub controller: String,
    /// The SCSI target (unit); LUN 0.
    pub scsi_id: u32,
    /// The disk's WWN (QEMU's is 64 bits), shown as `naa.<hex>`.
    pub wwn: Option<u64>,
}

impl DiskSpec {
    /// A disk without a WWN.
    pub fn new(file: impl Into<PathBuf>, controller: &str, scsi_id: u32) -> Self {
        Self {
            file: file.into(),
            controller: controller.into(),
            scsi_id,
            wwn: None,
        }
    }

    /// With a WWN.
    pub fn wwn(mut self, wwn: u64) -> Self {
        self.wwn = Some(wwn);
        self
    }

    fn blockdevs(&self, id: &str) -> [Value; 2] {
        [
            json!({"driver": "file", "filename": self.file, "node-name": format!("{id}-file")}),
            json!({"driver": "raw", "file": format!("{id}-file"), "node-name": format!("{id}-raw")}),
        ]
    }

    fn device(&self, id: &str) -> Value {
        let mut v = json!({
            "driver": "scsi-hd", "id": id, "bus": format!("{}.0", self.controller),
            "scsi-id": self.scsi_id, "lun": 0, "drive": format!("{id}-raw"),
        });
        if let Some(w) = self.wwn {
            v["wwn"] = json!(w);
        }
        v
    }
}

/// A failure of the harness or of QEMU.
#[derive(Debug)]
pub enum GuestError {
    /// Building the image failed.
    Build(String),
    /// QEMU did not start, or exited.
    Qemu(String),
    /// A command did not finish in time.
    Timeout {
        /// The guest command (or QMP command, or boot).
        what: String,
        /// How long it was waited for.
        waited: Duration,
        /// The end of the console output.
        console: String,
    },
    /// QMP answered with an error.
    Qmp {
        /// The command.
        command: String,
        /// QEMU's error text.
        desc: String,
    },
    /// Talking to QEMU failed.
    Io(String, io::Error),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::Build(s) => write!(f, "building the guest image: {s}"),
            GuestError::Qemu(s) => write!(f, "QEMU: {s}"),
            GuestError::Timeout { what, waited, console } => write!(
                f,
                "timed out after {:.1}s waiting for {what}; the console last showed:\n{console}",
                waited.as_secs_f64()
            ),
            GuestError::Qmp { command, desc } => write!(f, "QMP {command}: {desc}"),
            GuestError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for GuestError {}

/// The kernel and initramfs for a set of extra programs.
#[derive(Debug, Clone)]
struct Image {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Runs `tests/guest/build.sh` once per set of programs in this process
/// (the script caches across processes).
fn image(programs: &[PathBuf]) -> Result<Image, GuestError> {
    static CACHE: OnceLock<Mutex<HashMap<Vec<PathBuf>, Image>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = cache.get(programs) {
        return Ok(i.clone());
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guest/build.sh");
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(script)
        .args(programs)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| GuestError::Build(format!("running {script}: {e}")))?;
    if !out.status.success() {
        return Err(GuestError::Build(format!(
            "{script} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(PathBuf::from)
            .ok_or_else(|| GuestError::Build(format!("{script} printed no {k} line: {text}")))
    };
    let image = Image {
        kernel: field("KERNEL=")?,
        initrd: field("INITRD=")?,
    };
    eprintln!("guest image ready in {:.1}s", start.elapsed().as_secs_f64());
    cache.insert(programs.to_vec(), image.clone());
    Ok(image)
}

/// The console output, filled by a reader thread.
#[derive(Default)]
struct ConsoleBuf {
    data: Vec<u8>,
    /// Everything before this offset belongs to earlier commands.
    consumed: usize,
    closed: bool,
}

type Shared = Arc<(Mutex<ConsoleBuf>, Condvar)>;

/// A running guest. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Guest {
    name: String,
    qemu: Option<Child>,
    /// Dropped (closed) after QEMU is dead, to let its parent thread go.
    parent: Option<mpsc::Sender<()>>,
    dir: tempfile::TempDir,
    console: UnixStream,
    shared: SharedDebug,
    hotplug: Hotplug,
    /// The `-lp<name>` argument (log name) of this guest's `socat`s, which
    /// tells them from other guests' forwards to the same address; `None`
    /// without forwards.
    socat_tag: Option<String>,
    next_cmd: u64,
    /// How long the boot took, to the guest's shell.
    pub boot_time: Duration,
}

struct SharedDebug(Shared);

impl fmt::Debug for SharedDebug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConsoleBuf")
    }
}

impl Guest {
    /// Builds the image if needed, starts QEMU and waits for the guest's
    /// shell. Prints the boot time.
    pub fn boot(spec: GuestSpec) -> Result<Guest, GuestError> {
        let image = image(&spec.programs)?;
        let start = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("vmdk-guest-")
            .tempdir()
            .map_err(|e| GuestError::Io("creating a temporary directory".into(), e))?;
        let con_path = dir.path().join("console.sock");
        let qmp_path = dir.path().join("qmp.sock");
        let bind = |p: &Path| UnixListener::bind(p).map_err(|e| GuestError::Io(format!("binding {}", p.display()), e));
        let con_l = bind(&con_path)?;
        let qmp_l = bind(&qmp_path)?;

        let mut args: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-no-reboot".into(),
            "-display".into(),
            "none".into(),
            "-accel".into(),
            "tcg".into(),
            "-cpu".into(),
            "max".into(),
            "-smp".into(),
            "1".into(),
            "-m".into(),
            spec.memory_mib.to_string(),
            "-name".into(),
            spec.name.clone(),
            "-uuid".into(),
            spec.uuid.clone(),
            "-kernel".into(),
            image.kernel.display().to_string(),
            "-initrd".into(),
            image.initrd.display().to_string(),
            "-append".into(),
            "console=ttyS0 loglevel=1 panic=-1".into(),
            "-chardev".into(),
            format!("socket,id=con,path={},server=off", opt_path(&con_path)?),
            "-serial".into(),
            "chardev:con".into(),
            "-chardev".into(),
            format!("socket,id=qmp,path={},server=off", opt_path(&qmp_path)?),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ];
        for c in &spec.controllers {
            args.extend(["-device".into(), c.props().to_string()]);
        }
        for (i, d) in spec.disks.iter().enumerate() {
            let id = GuestSpec::disk_id(i);
            for b in d.blockdevs(&id) {
                args.extend(["-blockdev".into(), b.to_string()]);
            }
            args.extend(["-device".into(), d.device(&id).to_string()]);
        }
        let mut socat_tag = None;
        if !spec.forwards.is_empty() || !spec.tcp_forwards.is_empty() {
            // The temporary directory's name is unique and plain
            // (`vmdk-guest-` and alphanumerics).
            let tag = format!("-lp{}", dir.path().file_name().unwrap_or_default().to_string_lossy());
            let mut netdev = "user,id=n0,restrict=on,ipv6=off".to_owned();
            let targets = spec
                .forwards
                .iter()
                .map(|(addr, sock)| {
                    let s = sock.display().to_string();
                    if s.is_empty() || s.contains(|c: char| c == ',' || c == '\'' || c == ':' || c.is_whitespace()) {
                        return Err(GuestError::Qemu(format!(
                            "forwarded socket path {s:?} must not contain commas, quotes, colons or spaces"
                        )));
                    }
                    Ok((addr, format!("UNIX-CONNECT:{s}")))
                })
                .chain(
                    spec.tcp_forwards
                        .iter()
                        .map(|(addr, host)| Ok((addr, format!("TCP:{host}")))),
                );
            for target in targets {
                let (addr, target) = target?;
                // `,,` is one comma inside -netdev: socat's shut-down
                // option, without which socat holds every answer open for
                // its 0.5 s timeout.
                netdev.push_str(&format!(",guestfwd=tcp:{addr}-cmd:socat {tag} -,,shut-down {target}"));
            }
            socat_tag = Some(tag);
            args.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                "virtio-net-pci,netdev=n0".into(),
            ]);
        }

        let log_path = dir.path().join("qemu.log");
        let log =
            fs::File::create(&log_path).map_err(|e| GuestError::Io(format!("creating {}", log_path.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| GuestError::Io("duplicating the log file".into(), e))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        let (child, parent) = spawn_tied(cmd)?;
        let mut qemu = child;
        let qemu_log = || fs::read_to_string(&log_path).unwrap_or_default();

        // QEMU connects to both sockets as it starts.
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let accept = |l: &UnixListener, what: &str, qemu: &mut Child| -> Result<UnixStream, GuestError> {
            loop {
                if poll_readable(l.as_raw_fd(), 100) {
                    return l
                        .accept()
                        .map(|(s, _)| s)
                        .map_err(|e| GuestError::Io(format!("accepting {what}"), e));
                }
                if let Ok(Some(status)) = qemu.try_wait() {
                    return Err(GuestError::Qemu(format!(
                        "exited with {status} at start-up: {}",
                        qemu_log()
                    )));
                }
                if Instant::now() > deadline {
                    return Err(GuestError::Qemu(format!("did not connect its {what}: {}", qemu_log())));
                }
            }
        };
        let started = (|| {
            let console = accept(&con_l, "console", &mut qemu)?;
            let qmp = accept(&qmp_l, "QMP socket", &mut qemu)?;
            Ok::<_, GuestError>((console, qmp))
        })();
        let (console, qmp) = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                return Err(e);
            }
        };

        let shared: Shared = Default::default();
        {
            let mut reader = console
                .try_clone()
                .map_err(|e| GuestError::Io("cloning the console socket".into(), e))?;
            let shared = shared.clone();
            let mut log = fs::File::create(dir.path().join("console.log")).ok();
            std::thread::Builder::new()
                .name(format!("{}-console", spec.name))
                .spawn(move || {
                    let mut buf = [0u8; 8192];
                    loop {
                        let n = reader.read(&mut buf).unwrap_or(0);
                        let (lock, cv) = &*shared;
                        let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
                        if n == 0 {
                            c.closed = true;
                            cv.notify_all();
                            return;
                        }
                        c.data.extend_from_slice(&buf[..n]);
                        if let Some(l) = log.as_mut() {
                            let _ = l.write_all(&buf[..n]);
                        }
                        cv.notify_all();
                    }
                })
                .map_err(|e| GuestError::Io("starting the console reader".into(), e))?;
        }

        let mut guest = Guest {
            name: spec.name.clone(),
            qemu: Some(qemu),
            parent: Some(parent),
            dir,
            console,
            shared: SharedDebug(shared),
            hotplug: Hotplug {
                qmp: Arc::new(Mutex::new(Qmp::new(qmp)?)),
                next_disk: Arc::new(AtomicU32::new(spec.disks.len() as u32)),
            },
            socat_tag,
            next_cmd: 0,
            boot_time: Duration::ZERO,
        };
        let handshake = guest.hotplug.lock().handshake();
        let ready = match handshake {
            Ok(()) => guest.wait_console("VMDK-GUEST-READY", "the guest's shell (boot)", BOOT_TIMEOUT),
            Err(e) => Err(e),
        };
        if let Err(e) = ready {
            guest.kill();
            let log = fs::read_to_string(guest.dir().join("qemu.log")).unwrap_or_default();
            return Err(GuestError::Qemu(format!("{e}; QEMU's output: {log}")));
        }
        guest.boot_time = start.elapsed();
        eprintln!("guest {}: booted in {:.1}s", guest.name, guest.boot_time.as_secs_f64());
        Ok(guest)
    }

    /// The PID of the QEMU process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.qemu.as_ref().map(Child::id)
    }

    /// Runs `cmd` with `sh` in the guest, stdin from `/dev/null`, stderr
    /// into stdout; returns its exit status and output. Panics (naming the
    /// command) on a timeout or a dead guest.
    pub fn sh(&mut self, cmd: &str) -> (i32, String) {
        self.try_sh(cmd, SH_TIMEOUT)
            .unwrap_or_else(|e| panic!("guest {}: {e}", self.name))
    }

    /// [`Guest::sh`] that must succeed; returns the output.
    pub fn sh_ok(&mut self, cmd: &str) -> String {
        let (status, out) = self.sh(cmd);
        assert_eq!(status, 0, "guest {}: `{cmd}` exited with {status}:\n{out}", self.name);
        out
    }

    /// Runs `cmd` in the guest (see [`Guest::sh`]) within `timeout`.
    pub fn try_sh(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String), GuestError> {
        self.next_cmd += 1;
        let tag = format!("{:x}{:x}", std::process::id(), self.next_cmd);
        let file = format!("/tmp/.cmd{}", self.next_cmd);
        // The command travels base64-encoded, so no quoting or line
        // length matters; the markers carry a tag it cannot contain.
        let mut script = format!("rm -f {file}.b64\n");
        for chunk in base64(cmd.as_bytes()).as_bytes().chunks(2048) {
            script.push_str(&format!(
                "printf %s '{}' >>{file}.b64\n",
                std::str::from_utf8(chunk).unwrap()
            ));
        }
        script.push_str(&format!(
            "base64 -d <{file}.b64 >{file}; rm -f {file}.b64; echo @@B:{tag}; sh {file} </dev/null 2>&1; \
             s=$?; rm -f {file}; echo @@E:{tag}:$s\n"
        ));
        // The emulated UART's receive timeout never fires: bytes below
        // the FIFO's trigger level sit unread until more arrive. Blank
        // lines (empty commands to the shell) push the command through.
        script.push_str(&"\n".repeat(16));
        self.console
            .write_all(script.as_bytes())
            .map_err(|e| GuestError::Io(format!("sending `{cmd}` to the guest console"), e))?;
        let what = format!("`{cmd}`");
        let text = self.wait_console_line(&format!("@@E:{tag}:"), &what, timeout)?;
        let begin = format!("@@B:{tag}\n");
        let end = format!("@@E:{tag}:");
        let text = text.replace('\r', "");
        let from = text.find(&begin).map(|i| i + begin.len()).unwrap_or(0);
        let to = text.rfind(&end).unwrap_or(text.len());
        let status = text[to + end.len()..].trim().parse::<i32>().unwrap_or(-1);
        Ok((status, text[from..to].to_owned()))
    }

    /// Waits for `marker` on the console (and the rest of its line);
    /// returns the console text since the previous wait, up to there.
    fn wait_console_line(&mut self, marker: &str, what: &str, timeout: Duration) -> Result<String, GuestError> {
        let start = Instant::now();
        let (lock, cv) = &*self.shared.0;
        let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let fresh = &c.data[c.consumed..];
            if let Some(i) = find(fresh, marker.as_bytes()) {
                if let Some(j) = fresh[i..].iter().position(|&b| b == b'\n') {
                    let end = c.consumed + i + j + 1;
                    let text = String::from_utf8_lossy(&c.data[c.consumed..end]).into_owned();
                    c.consumed = end;
                    return Ok(text);
                }
            }
            if c.closed {
                return Err(GuestError::Qemu(format!(
                    "the guest's console closed (QEMU exited) while waiting for {what}; it last showed:\n{}",
                    tail(&c.data)
                )));
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(GuestError::Timeout {
                    what: what.to_owned(),
                    waited: start.elapsed(),
                    console: tail(&c.data),
                });
            }
            c = cv.wait_timeout(c, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn wait_console(&mut self, marker: &str, what: &str, timeout: Duration) -> Result<(), GuestError> {
        self.wait_console_line(marker, what, timeout).map(drop)
    }

    /// Hot-adds a disk; returns its id for [`Guest::remove_disk`]. QEMU
    /// refuses an image another QEMU has open (`Failed to get "write"
    /// lock`).
    pub fn add_disk(&mut self, disk: &DiskSpec) -> Result<String, GuestError> {
        self.hotplug.add_disk(disk)
    }

    /// Hot-removes a disk (attached at boot or by [`Guest::add_disk`]) and
    /// closes its image, so another QEMU may open it.
    pub fn remove_disk(&mut self, id: &str) -> Result<(), GuestError> {
        self.hotplug.remove_disk(id)
    }

    /// Hot-adds a PVSCSI controller (ACPI PCI hot-plug on the root bus;
    /// the guest binds it in a fraction of a second).
    pub fn add_controller(&mut self, c: &Controller) -> Result<(), GuestError> {
        self.hotplug.add_controller(c)
    }

    /// Runs any QMP command.
    pub fn qmp(&mut self, command: &str, arguments: Value) -> Result<Value, GuestError> {
        self.hotplug.qmp(command, arguments)
    }

    /// A handle on this guest's QMP, usable from other threads while this
    /// one runs [`Guest::sh`]. Disk ids stay unique across handles. After
    /// QEMU is gone its calls fail.
    pub fn hotplug(&self) -> Hotplug {
        self.hotplug.clone()
    }

    /// SIGKILLs QEMU, as when the host dies, and waits for it; the
    /// `socat`s of the forwards go too. Later commands fail.
    pub fn kill(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        self.parent.take();
        if let Some(tag) = &self.socat_tag {
            kill_socats(tag);
        }
    }

    /// Where the console log, QEMU's log and the sockets are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Hot-plugging through a guest's QMP connection, shared with its
/// [`Guest`]: one QMP command sequence at a time.
#[derive(Debug, Clone)]
pub struct Hotplug {
    qmp: Arc<Mutex<Qmp>>,
    /// The number of the next disk id (`disk<N>`).
    next_disk: Arc<AtomicU32>,
}

impl Hotplug {
    fn lock(&self) -> std::sync::MutexGuard<'_, Qmp> {
        self.qmp.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`Guest::add_disk`].
    pub fn add_disk(&self, disk: &DiskSpec) -> Result<String, GuestError> {
        let id = GuestSpec::disk_id(self.next_disk.fetch_add(1, Ordering::Relaxed) as usize);
        let mut qmp = self.lock();
        let [file, raw] = disk.blockdevs(&id);
        qmp.execute("blockdev-add", file)?;
        if let Err(e) = qmp.execute("blockdev-add", raw) {
            let _ = qmp.execute("blockdev-del", json!({"node-name": format!("{id}-file")}));
            return Err(e);
        }
        if let Err(e) = qmp.execute("device_add", disk.device(&id)) {
            let _ = qmp.execute("blockdev-del", json!({"node-name": format!("{id}-raw")}));
            let _ = qmp.execute("blockdev-del", json!({"node-name": format!("{id}-file")}));
            return Err(e);
        }
        Ok(id)
    }

    /// See [`Guest::remove_disk`].
    pub fn remove_disk(&self, id: &str) -> Result<(), GuestError> {
        let mut qmp = self.lock();
        qmp.execute("device_del", json!({"id": id}))?;
        qmp.wait_event("DEVICE_DELETED", |d| d["device"] == id, QMP_TIMEOUT)?;
        qmp.execute("blockdev-del", json!({"node-name": format!("{id}-raw")}))?;
        qmp.execute("blockdev-del", json!({"node-name": format!("{id}-file")}))?;
        Ok(())
    }

    /// See [`Guest::add_controller`].
    pub fn add_controller(&self, c: &Controller) -> Result<(), GuestError> {
        self.lock().execute("device_add", c.props()).map(drop)
    }

    /// See [`Guest::qmp`].
    pub fn qmp(&self, command: &str, arguments: Value) -> Result<Value, GuestError> {
        self.lock().execute(command, arguments)
    }
}

/// Starts `cmd` from a thread that lives until the returned sender is
/// dropped, with `PR_SET_PDEATHSIG` = SIGKILL: the child dies with that
/// thread, and so with this process, even when no destructor runs.
fn spawn_tied(mut cmd: Command) -> Result<(Child, mpsc::Sender<()>), GuestError> {
    // SAFETY: prctl and getppid are async-signal-safe and touch no memory
    // of the parent; nothing else runs between fork and exec.
    unsafe {
        let parent = libc::getpid();
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent already gone before prctl: die now.
            if libc::getppid() != parent {
                return Err(io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
    let (child_tx, child_rx) = mpsc::channel();
    let (hold_tx, hold_rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("qemu-parent".into())
        .spawn(move || {
            let _ = child_tx.send(cmd.spawn());
            // Until the Guest lets go: a closed channel ends the wait.
            let _ = hold_rx.recv();
        })
        .map_err(|e| GuestError::Io("starting QEMU's parent thread".into(), e))?;
    let child = child_rx
        .recv()
        .map_err(|_| GuestError::Qemu("its parent thread died".into()))?
        .map_err(|e| GuestError::Io("starting qemu-system-x86_64 (is qemu-system-x86 installed?)".into(), e))?;
    Ok((child, hold_tx))
}

/// SIGKILLs every `socat` started with the argument `tag` (a guest's
/// `-lp<name>`).
fn kill_socats(tag: &str) {
    let Ok(procs) = fs::read_dir("/proc") else { return };
    let mut killed = Vec::new();
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_socat = args.first().is_some_and(|a| a.ends_with("socat"));
        let ours = args.iter().any(|a| a == tag);
        if is_socat && ours {
            // SAFETY: kill(2) with a PID read from /proc; no memory involved.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            killed.push(pid);
        }
    }
    // SIGKILL is delivered asynchronously: wait until each one has died
    // (its /proc entry is gone, or it is a zombie with an empty command
    // line), so callers see no socat of this guest afterwards.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while killed
        .iter()
        .any(|pid| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A path for a QEMU `-chardev` option (commas doubled).
fn opt_path(p: &Path) -> Result<String, GuestError> {
    let s = p
        .to_str()
        .ok_or_else(|| GuestError::Qemu(format!("non-UTF-8 path {}", p.display())))?;
    Ok(s.replace(',', ",,"))
}

fn poll_readable(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn tail(data: &[u8]) -> String {
    let from = data.len().saturating_sub(3000);
    String::from_utf8_lossy(&data[from..]).replace('\r', "")
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            s.push(if i <= c.len() {
                A[(n >> shift) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    s
}

/// A QMP connection: commands answered in order, events kept for
/// [`Qmp::wait_event`].
#[derive(Debug)]
struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Value>,
    next_id: u64,
}

impl Qmp {
    fn new(stream: UnixStream) -> Result<Self, GuestError> {
        let reader = stream
            .try_clone()
            .map_err(|e| GuestError::Io("cloning the QMP socket".into(), e))?;
        Ok(Self {
            writer: stream,
            reader: BufReader::new(reader),
            events: Vec::new(),
            next_id: 0,
        })
    }

    fn read(&mut self, what: &str, deadline: Instant) -> Result<Value, GuestError> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let _ = self.reader.get_ref().set_read_timeout(Some(left));
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(GuestError::Qemu(format!("QMP closed (QEMU exited) during {what}"))),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| GuestError::Qemu(format!("QMP sent {line:?} during {what}: {e}"))),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Err(GuestError::Timeout {
                    what: format!("QMP {what}"),
                    waited: QMP_TIMEOUT,
                    console: String::new(),
                })
            }
            Err(e) => Err(GuestError::Io(format!("reading QMP during {what}"), e)),
        }
    }

    fn handshake(&mut self) -> Result<(), GuestError> {
        let deadline = Instant::now() + QMP_TIMEOUT;
        let greeting = self.read("the greeting", deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(GuestError::Qemu(format!("unexpected QMP greeting {greeting}")));
        }
        self.execute("qmp_capabilities", json!({})).map(drop)
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, GuestError> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"execute": command, "arguments": arguments, "id": id});
        let what = format!("{command} {arguments}");
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .map_err(|e| GuestError::Io(format!("sending QMP {what}"), e))?;
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            let v = self.read(&what, deadline)?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if v["id"] != id {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(GuestError::Qmp {
                    command: what,
                    desc: e["desc"].as_str().unwrap_or_default().to_owned(),
                });
            }
            return Ok(v["return"].clone());
        }
    }

    fn wait_event(
        &mut self,
        name: &str,
        data: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name && data(&e["data"])) {
                return Ok(self.events.remove(i));
            }
            let v = self.read(&format!("event {name}"), deadline)?;
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}
