//! The test hypervisor bridge: what is done to a VM of govmomi's vSphere
//! simulator (`tests/vcsim/main.go`) happens to a real guest kernel under
//! QEMU (`tests/support/guest.rs`).
//!
//! ```ignore
//! #[path = "support/guest.rs"]
//! mod guest; // the bridge uses `crate::guest`
//! #[path = "support/bridge.rs"]
//! mod bridge;
//!
//! let sim = bridge::Simulator::start(&["-esx"]);
//! let rt = bridge::runtime();
//! let uuid = sim.info.vms[0].uuid.clone();
//! // The VM's PVSCSI controllers and the disks its configuration lists.
//! let spec = rt.block_on(bridge::boot_spec_for(&sim.info, &uuid, GuestSpec::default()))?;
//! let mut g = Guest::boot(spec.clone())?;
//! let b = rt.block_on(bridge::Bridge::start(&sim.info, &uuid, &g, &spec))?;
//! // ... reconfigure the simulator VM with vmdk_vsphere::Client ...
//! let disks = rt.block_on(b.settled())?; // the guest now has them
//! ```
//!
//! - **Watching.** A tokio task reads the VM's devices with its own
//!   `vmdk_vsphere::Client` session (`vm_info`) every [`POLL_INTERVAL`]
//!   and reconciles the guest with them through QMP ([`Hotplug`], usable
//!   while the test runs a shell command in the guest).
//! - **Controllers.** The simulator VM's ParaVirtual SCSI controller on
//!   bus N is the guest's `pvscsi<N>` at PCI slot `0x10 + N` (guest address
//!   `0000:00:1N.0`, see [`guest_controller`]); the bridge hot-adds it when
//!   the simulator VM gains it. Controller removal is not mirrored (the
//!   agent never removes one).
//! - **Disks.** A `VirtualDisk` on such a controller at unit U is a
//!   `scsi-hd` on `pvscsi<N>.0` with `scsi-id=U`, backed (raw) by the
//!   disk's extent in the simulator's datastore directory: the extent the
//!   descriptor names (`RW <n> VMFS "v-flat.vmdk"`), or `<name>-flat.vmdk`
//!   when the descriptor names none. Anything that leaves the datastore
//!   directory (after resolving symlinks) is refused. Its 64-bit WWN is the
//!   first 16 hex digits of the disk's UUID: the backing `uuid` when the
//!   simulator reports one, else the descriptor's `ddb.uuid` (QEMU's WWN is
//!   64 bits where VMware's is 128). A disk whose extent is missing or
//!   empty, such as the simulator VM's own `<vm>/disk1.vmdk`, is left out.
//!   A disk that leaves the simulator's list is `device_del`ed and its
//!   image closed, so another QEMU may open it.
//! - **Errors.** A disk that cannot be mirrored (QEMU's image lock refusing
//!   a file another guest holds, a path outside the datastore, ...) is a
//!   [`Failure`]; [`Bridge::settled`] returns the current ones as
//!   [`BridgeError::Unmirrored`] and [`Bridge::failures`] keeps every one
//!   reported. A failed disk is not tried again until it leaves the
//!   simulator's list (its device key names one attempt), as a refused
//!   vSphere reconfiguration would leave nothing behind either.
//! - **Settling.** [`Bridge::settled`] waits, without sleeping blindly,
//!   for a poll that began after the call to finish: the guest then
//!   reflects the simulator's device list as it was when the call was made.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use vmdk_vsphere::{
    BiosUuid, Client, Config, DatastorePath, Moref, Password, ScsiControllerKind, Thumbprint, TlsTrust, VmInfo,
};

use crate::guest::{Controller, DiskSpec, Guest, GuestSpec, Hotplug};

/// How often the bridge reads the VM's devices.
pub const POLL_INTERVAL: Duration = Duration::from_millis(75);
/// The liveness bound of [`Bridge::settled`].
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest descriptor the bridge reads.
const MAX_DESCRIPTOR: u64 = 64 << 10;

// ---------------------------------------------------------------------------
// The simulator

/// A datastore of the simulator: a directory of this host.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SimDatastore {
    pub name: String,
    pub moref: String,
    /// The directory holding its files.
    pub path: PathBuf,
}

/// A VM of the simulator.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SimVm {
    pub name: String,
    pub moref: String,
    /// Its BIOS UUID (`config.uuid`), QEMU's `-uuid` for its guest.
    pub uuid: String,
    pub host: String,
}

/// The one JSON line `tests/vcsim/main.go` prints at start-up.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SimInfo {
    pub url: String,
    /// `VPX` (vCenter) or `ESX` (a standalone host).
    pub model: String,
    pub username: String,
    pub password: String,
    pub thumbprint_sha256: String,
    pub datacenter: String,
    pub datastores: Vec<SimDatastore>,
    pub vms: Vec<SimVm>,
    pub pid: u32,
}

impl SimInfo {
    /// A client configuration pinning the simulator's certificate.
    pub fn config(&self) -> Result<Config, BridgeError> {
        let thumbprint: Thumbprint = self
            .thumbprint_sha256
            .parse()
            .map_err(|e| BridgeError::simulator("the simulator's thumbprint", e))?;
        let mut c = Config::new(
            &self.url,
            &self.username,
            Password::new(&self.password),
            TlsTrust::Thumbprint(thumbprint),
        );
        c.request_timeout = Duration::from_secs(30);
        c.task_timeout = Duration::from_secs(60);
        Ok(c)
    }

    /// A new session with the simulator.
    pub async fn client(&self) -> Result<Client, BridgeError> {
        Client::connect(self.config()?)
            .await
            .map_err(|e| BridgeError::simulator(format!("logging in to {}", self.url), e))
    }

    /// The directory of datastore `name`.
    pub fn datastore_dir(&self, name: &str) -> Option<&Path> {
        self.datastores
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.path.as_path())
    }

    /// The VM named `name`; panics naming the VMs there are.
    pub fn vm(&self, name: &str) -> &SimVm {
        self.vms.iter().find(|v| v.name == name).unwrap_or_else(|| {
            let names: Vec<&str> = self.vms.iter().map(|v| v.name.as_str()).collect();
            panic!("the simulator has no VM {name:?} (it has {names:?})")
        })
    }

    /// The host file behind `[ds] path`, refusing anything that leaves the
    /// datastore's directory lexically (no `..`, not absolute).
    pub fn host_path(&self, file: &DatastorePath) -> Result<PathBuf, String> {
        let dir = self
            .datastore_dir(file.datastore())
            .ok_or_else(|| format!("the simulator has no datastore {:?}", file.datastore()))?;
        let rel = Path::new(file.path());
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!("{file} leaves datastore {}", file.datastore()));
        }
        Ok(dir.join(rel))
    }
}

/// Builds the simulator (`tests/vcsim/build.sh`, which installs Go and
/// govmomi from Debian when missing) once per test binary.
pub fn vcsim_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vcsim/build.sh");
        let out = Command::new("bash")
            .arg(script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {script}: {e}"));
        assert!(
            out.status.success(),
            "the vSphere simulator could not be built: {script} needs Debian's golang-go and \
             golang-github-vmware-govmomi-dev (it installs them when run as root); see its output above"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(text.trim().lines().last().unwrap_or_default())
    })
    .clone()
}

/// A running simulator. Dropping it asks it to exit (closing its stdin),
/// which removes its temporary datastores, and kills it if it does not.
#[derive(Debug)]
pub struct Simulator {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Its inventory.
    pub info: SimInfo,
}

impl Simulator {
    /// Starts `vcsim -listen 127.0.0.1:0 <args>` (`-esx` for a standalone
    /// host, `-vms N` ...) and reads its inventory line. Panics with the
    /// reason when it cannot.
    pub fn start(args: &[&str]) -> Simulator {
        let bin = vcsim_binary();
        let mut child = Command::new(&bin)
            .args(["-listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let stdin = child.stdin.take();
        let err = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[vcsim] {line}");
            }
        });
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the simulator printed no inventory line within 60 s");
        let info: SimInfo = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the simulator's first line is not its inventory ({e}): {line:?}"));
        Simulator { child, stdin, info }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for ds in &self.info.datastores {
            if ds.path.starts_with("/tmp") && ds.path.to_string_lossy().contains("govcsim-") {
                let _ = std::fs::remove_dir_all(&ds.path);
            }
        }
    }
}

/// A multi-threaded tokio runtime for a synchronous test: the bridge's
/// task runs on its workers while the test thread blocks in the guest's
/// shell.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

// ---------------------------------------------------------------------------
// Errors

/// A disk the bridge could not mirror into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The controller's bus number in the simulator VM.
    pub bus: i32,
    /// The SCSI unit.
    pub unit: i32,
    /// The backing's file name (`[LocalDS_0] dockvols/_DEFAULT/v.vmdk`).
    pub file: String,
    /// What went wrong (QEMU's text for a QMP error).
    pub error: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at bus {} unit {}: {}",
            self.file, self.bus, self.unit, self.error
        )
    }
}

/// A failure of the bridge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    /// Talking to the simulator failed.
    #[error("{what}: {message}")]
    Simulator { what: String, message: String },
    /// Disks the guest does not have although the simulator VM lists them.
    #[error("{} disk(s) not mirrored into the guest: {}", .0.len(), list(.0))]
    Unmirrored(Vec<Failure>),
    /// Waiting did not end in time.
    #[error("{what} did not happen within {after:?}")]
    Timeout { what: String, after: Duration },
    /// The bridge's task is gone.
    #[error("the bridge for VM {vm} has stopped")]
    Stopped { vm: String },
}

impl BridgeError {
    fn simulator(what: impl Into<String>, e: impl fmt::Display) -> Self {
        BridgeError::Simulator {
            what: what.into(),
            message: e.to_string(),
        }
    }
}

fn list(failures: &[Failure]) -> String {
    failures.iter().map(Failure::to_string).collect::<Vec<_>>().join("; ")
}

// ---------------------------------------------------------------------------
// What the guest should have

/// The guest controller for the simulator VM's PVSCSI controller on `bus`:
/// `pvscsi<bus>` at PCI slot `0x10 + bus`.
pub fn guest_controller(bus: i32) -> Controller {
    Controller::pvscsi(&format!("pvscsi{bus}"), Some(&format!("0x{:x}", 0x10 + bus)))
}

/// The guest's PCI address of that controller (`0000:00:10.0` for bus 0).
pub fn guest_pci_address(bus: i32) -> String {
    format!("0000:00:{:02x}.0", 0x10 + bus)
}

/// The bus of a guest controller named by [`guest_controller`].
fn bus_of(controller_id: &str) -> Option<i32> {
    controller_id.strip_prefix("pvscsi")?.parse().ok()
}

/// A disk as the guest has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirroredDisk {
    /// The controller's bus number in the simulator VM.
    pub bus: i32,
    /// The SCSI unit (QEMU's `scsi-id`).
    pub unit: i32,
    /// The backing's file name, as the simulator reports it.
    pub file: String,
    /// The extent QEMU opened (raw).
    pub flat: PathBuf,
    /// The disk's UUID (backing `uuid` or descriptor `ddb.uuid`).
    pub disk_uuid: Option<String>,
    /// The WWN the guest sees (`naa.<16 hex digits>`).
    pub wwn: Option<u64>,
    /// QEMU's device id.
    pub qemu_id: String,
}

impl MirroredDisk {
    /// Whether this is the same disk in the same place as `w`.
    fn same(&self, w: &Wanted) -> bool {
        self.bus == w.bus && self.unit == w.unit && self.flat == w.flat && self.wwn == w.wwn
    }
}

/// A disk the simulator VM lists that the guest should have.
#[derive(Debug, Clone)]
struct Wanted {
    key: i32,
    bus: i32,
    unit: i32,
    file: String,
    flat: PathBuf,
    disk_uuid: Option<String>,
    wwn: Option<u64>,
}

impl Wanted {
    fn disk_spec(&self) -> DiskSpec {
        let spec = DiskSpec::new(&self.flat, &format!("pvscsi{}", self.bus), self.unit as u32);
        match self.wwn {
            Some(w) => spec.wwn(w),
            None => spec,
        }
    }
}

/// One disk device of the simulator VM, as the bridge identifies an
/// attempt to mirror it: its device key, controller, unit and file.
type Attempt = (i32, i32, i32, String);

/// The simulator VM's devices, sorted out.
#[derive(Debug, Default)]
struct Desired {
    /// Buses of its ParaVirtual SCSI controllers.
    buses: Vec<i32>,
    disks: Vec<Wanted>,
    /// Disks that cannot be mirrored, with their attempt.
    refused: Vec<(Attempt, Failure)>,
}

/// Sorts the VM's devices into what the guest should have.
fn desired(info: &VmInfo, sim: &SimInfo) -> Desired {
    let mut out = Desired::default();
    let mut pvscsi = BTreeMap::new();
    for c in &info.controllers {
        if c.kind == ScsiControllerKind::ParaVirtual {
            pvscsi.insert(c.key, c.bus_number);
            out.buses.push(c.bus_number);
        }
    }
    out.buses.sort_unstable();
    for d in &info.disks {
        let (Some(ckey), Some(unit), Some(file)) = (d.controller_key, d.unit_number, d.file_name.as_ref()) else {
            continue;
        };
        let Some(&bus) = pvscsi.get(&ckey) else {
            continue; // IDE, LSI Logic...: not ours
        };
        let attempt = (d.key, bus, unit, file.clone());
        let fail = |error: String| {
            (
                attempt.clone(),
                Failure {
                    bus,
                    unit,
                    file: file.clone(),
                    error,
                },
            )
        };
        match resolve_disk(sim, file, d.uuid.as_deref()) {
            Ok(Some((flat, disk_uuid))) => {
                let wwn = disk_uuid.as_deref().and_then(wwn_of);
                out.disks.push(Wanted {
                    key: d.key,
                    bus,
                    unit,
                    file: file.clone(),
                    flat,
                    disk_uuid,
                    wwn,
                });
            }
            Ok(None) => {} // an empty disk of the simulator's own
            Err(e) => out.refused.push(fail(e)),
        }
    }
    out
}

/// The 64-bit WWN QEMU gives a disk with this UUID: its first 16 hex
/// digits.
pub fn wwn_of(disk_uuid: &str) -> Option<u64> {
    let hex: String = disk_uuid.chars().filter(char::is_ascii_hexdigit).collect();
    if hex.len() < 16 {
        return None;
    }
    u64::from_str_radix(&hex[..16], 16).ok()
}

/// The extent of disk `file` and its UUID, or `None` for a disk with no
/// data (the simulator's own empty files).
fn resolve_disk(
    sim: &SimInfo,
    file: &str,
    backing_uuid: Option<&str>,
) -> Result<Option<(PathBuf, Option<String>)>, String> {
    let path: DatastorePath = file.parse().map_err(|e| format!("not a datastore path: {e}"))?;
    let descriptor = sim.host_path(&path)?;
    let dir = sim
        .datastore_dir(path.datastore())
        .ok_or_else(|| format!("no datastore {:?}", path.datastore()))?;
    let root = dir
        .canonicalize()
        .map_err(|e| format!("resolving datastore directory {}: {e}", dir.display()))?;
    let inside = |p: &Path, what: &str| -> Result<PathBuf, String> {
        let real = p
            .canonicalize()
            .map_err(|e| format!("resolving {what} {}: {e}", p.display()))?;
        if real.starts_with(&root) {
            Ok(real)
        } else {
            Err(format!(
                "its {what} {} resolves to {}, outside datastore {} ({})",
                p.display(),
                real.display(),
                path.datastore(),
                root.display()
            ))
        }
    };
    let real_descriptor = inside(&descriptor, "descriptor")?;
    let text = read_bounded(&real_descriptor).map_err(|e| format!("reading {}: {e}", real_descriptor.display()))?;
    let (extent, ddb_uuid) = parse_descriptor(&text);
    let flat = match extent {
        Some(name) => {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(format!(
                    "its descriptor names the extent {name:?}, which is not a file next to it"
                ));
            }
            descriptor.with_file_name(name)
        }
        None => {
            let stem = path
                .path()
                .strip_suffix(".vmdk")
                .ok_or_else(|| format!("{file} does not end in .vmdk"))?;
            sim.host_path(
                &DatastorePath::new(path.datastore(), format!("{stem}-flat.vmdk")).map_err(|e| e.to_string())?,
            )?
        }
    };
    if flat.symlink_metadata().is_err() {
        return Ok(None); // no extent at all
    }
    let real = inside(&flat, "extent")?;
    let meta = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
    if !meta.is_file() {
        return Err(format!("its extent {} is not a regular file", real.display()));
    }
    if meta.len() == 0 {
        return Ok(None);
    }
    let uuid = backing_uuid.map(str::to_owned).filter(|u| !u.is_empty()).or(ddb_uuid);
    Ok(Some((real, uuid)))
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_DESCRIPTOR)
        .read_to_string(&mut text)
        .map(|_| text)
}

/// The first extent's file name and `ddb.uuid` of a descriptor (either
/// may be missing, as in the simulator's own empty descriptors).
fn parse_descriptor(text: &str) -> (Option<String>, Option<String>) {
    let mut extent = None;
    let mut uuid = None;
    for line in text.lines().map(str::trim) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if extent.is_none() && fields.len() >= 4 && matches!(fields[0], "RW" | "RDONLY") {
            if let (Some(a), Some(b)) = (line.find('"'), line.rfind('"')) {
                if b > a {
                    extent = Some(line[a + 1..b].to_owned());
                }
            }
        } else if let Some((k, v)) = line.split_once('=') {
            if k.trim() == "ddb.uuid" {
                uuid = Some(v.trim().trim_matches('"').to_owned());
            }
        }
    }
    (extent, uuid)
}

/// Finds the simulator VM with BIOS UUID `vm_uuid` and reads its devices.
async fn vm_devices(client: &Client, vm: &Moref) -> Result<VmInfo, BridgeError> {
    client
        .vm_info(vm)
        .await
        .map_err(|e| BridgeError::simulator(format!("reading the devices of VM {}", vm.value), e))
}

async fn find_vm(client: &Client, vm_uuid: &str) -> Result<Moref, BridgeError> {
    let uuid: BiosUuid = vm_uuid
        .parse()
        .map_err(|e| BridgeError::simulator(format!("BIOS UUID {vm_uuid:?}"), e))?;
    client
        .find_vm_by_bios_uuid(None, &uuid)
        .await
        .map_err(|e| BridgeError::simulator(format!("finding the VM with BIOS UUID {vm_uuid}"), e))
}

/// The guest to boot for simulator VM `vm_uuid` as its configuration
/// stands: `base` with the VM's BIOS UUID, a `pvscsi<N>` for each of its
/// PVSCSI controllers and every disk it lists attached at boot, as a host
/// powering the VM on (vSphere HA restarting it) would. Fails with
/// [`BridgeError::Unmirrored`] when a listed disk cannot be.
pub async fn boot_spec_for(sim: &SimInfo, vm_uuid: &str, base: GuestSpec) -> Result<GuestSpec, BridgeError> {
    let client = sim.client().await?;
    let vm = find_vm(&client, vm_uuid).await?;
    let info = vm_devices(&client, &vm).await?;
    let _ = client.logout().await;
    let want = desired(&info, sim);
    if !want.refused.is_empty() {
        return Err(BridgeError::Unmirrored(
            want.refused.into_iter().map(|(_, f)| f).collect(),
        ));
    }
    Ok(GuestSpec {
        uuid: vm_uuid.to_owned(),
        controllers: want.buses.iter().map(|&b| guest_controller(b)).collect(),
        disks: want.disks.iter().map(Wanted::disk_spec).collect(),
        ..base
    })
}

// ---------------------------------------------------------------------------
// The bridge

/// What the bridge's task publishes after each poll.
#[derive(Debug, Clone)]
struct Status {
    /// Polls begun.
    started: u64,
    /// Polls finished.
    done: u64,
    /// The last finished poll's result: the guest's disks, or why it does
    /// not reflect the simulator.
    outcome: Result<Vec<MirroredDisk>, BridgeError>,
    /// The task has ended.
    stopped: bool,
}

/// The guest side, owned by the bridge's task.
struct Mirror {
    vm: String,
    hotplug: Hotplug,
    /// Buses whose controller the guest has.
    buses: Vec<i32>,
    /// Disks the guest has, by (bus, unit).
    disks: BTreeMap<(i32, i32), MirroredDisk>,
    /// Attempts that failed and are not retried while the device stays.
    failed: BTreeMap<Attempt, Failure>,
    /// Every failure ever reported, for [`Bridge::failures`].
    reported: Arc<Mutex<Vec<Failure>>>,
}

/// Runs a blocking QMP call off the runtime's workers.
async fn qmp<T: Send + 'static>(
    hotplug: &Hotplug,
    f: impl FnOnce(&Hotplug) -> Result<T, crate::guest::GuestError> + Send + 'static,
) -> Result<T, String> {
    let h = hotplug.clone();
    match vmdk_common::runtime::spawn_blocking(move || f(&h)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the QMP call panicked: {e}")),
    }
}

impl Mirror {
    fn report(&mut self, attempt: Attempt, failure: Failure) {
        if !self.failed.contains_key(&attempt) {
            eprintln!("bridge {}: {failure}", self.vm);
            self.reported
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(failure.clone());
            self.failed.insert(attempt, failure);
        }
    }

    /// Makes the guest match `want`; returns its disks or the failures.
    async fn reconcile(&mut self, want: Desired) -> Result<Vec<MirroredDisk>, BridgeError> {
        // Attempts whose device has gone are forgotten.
        let live: Vec<Attempt> = want
            .disks
            .iter()
            .map(|w| (w.key, w.bus, w.unit, w.file.clone()))
            .chain(want.refused.iter().map(|(a, _)| a.clone()))
            .collect();
        self.failed.retain(|a, _| live.contains(a));
        for (attempt, failure) in want.refused {
            self.report(attempt, failure);
        }

        // Controllers the VM gained.
        let mut missing_bus = BTreeMap::new();
        for &bus in &want.buses {
            if self.buses.contains(&bus) {
                continue;
            }
            let c = guest_controller(bus);
            match qmp(&self.hotplug, move |h| h.add_controller(&c)).await {
                Ok(()) => self.buses.push(bus),
                Err(e) => {
                    missing_bus.insert(bus, format!("adding controller pvscsi{bus}: {e}"));
                }
            }
        }

        // Removals first: a disk moving to another unit must be closed
        // before QEMU opens it again (its own image lock).
        let gone: Vec<(i32, i32)> = self
            .disks
            .iter()
            .filter(|(_, m)| !want.disks.iter().any(|w| m.same(w)))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            let m = self.disks.remove(&k).expect("listed above");
            let id = m.qemu_id.clone();
            if let Err(e) = qmp(&self.hotplug, move |h| h.remove_disk(&id)).await {
                let attempt = (0, m.bus, m.unit, m.file.clone());
                self.report(
                    attempt,
                    Failure {
                        bus: m.bus,
                        unit: m.unit,
                        file: m.file.clone(),
                        error: format!("removing {} from the guest: {e}", m.qemu_id),
                    },
                );
            }
        }

        // Additions.
        for w in &want.disks {
            let attempt = (w.key, w.bus, w.unit, w.file.clone());
            if self.disks.get(&(w.bus, w.unit)).is_some_and(|m| m.same(w)) || self.failed.contains_key(&attempt) {
                continue;
            }
            let fail = |error: String| Failure {
                bus: w.bus,
                unit: w.unit,
                file: w.file.clone(),
                error,
            };
            if let Some(e) = missing_bus.get(&w.bus) {
                self.report(attempt, fail(e.clone()));
                continue;
            }
            if let Some(other) = self.disks.get(&(w.bus, w.unit)) {
                // Only when its removal above failed.
                let e = format!("unit taken in the guest by {}", other.qemu_id);
                self.report(attempt, fail(e));
                continue;
            }
            let spec = w.disk_spec();
            match qmp(&self.hotplug, move |h| h.add_disk(&spec)).await {
                Ok(id) => {
                    self.disks.insert(
                        (w.bus, w.unit),
                        MirroredDisk {
                            bus: w.bus,
                            unit: w.unit,
                            file: w.file.clone(),
                            flat: w.flat.clone(),
                            disk_uuid: w.disk_uuid.clone(),
                            wwn: w.wwn,
                            qemu_id: id,
                        },
                    );
                }
                Err(e) => self.report(attempt, fail(e)),
            }
        }

        // Disks the guest already had (at boot) learn their file and UUID.
        for w in &want.disks {
            if let Some(m) = self.disks.get_mut(&(w.bus, w.unit)).filter(|m| m.same(w)) {
                m.file = w.file.clone();
                m.disk_uuid = w.disk_uuid.clone();
            }
        }
        if self.failed.is_empty() {
            Ok(self.disks.values().cloned().collect())
        } else {
            Err(BridgeError::Unmirrored(self.failed.values().cloned().collect()))
        }
    }
}

/// A running bridge between one simulator VM and its guest. Dropping it
/// stops its task; [`Bridge::stop`] does so and waits.
#[derive(Debug)]
pub struct Bridge {
    vm: String,
    status: watch::Receiver<Status>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    reported: Arc<Mutex<Vec<Failure>>>,
}

impl Bridge {
    /// Starts mirroring simulator VM `vm_uuid` into `guest`, which was
    /// booted from `booted` (its `pvscsi<N>` controllers and disks are taken
    /// as already there: see [`boot_spec_for`]). Must be called within a
    /// tokio runtime ([`runtime`]); the bridge's task runs on it.
    pub async fn start(sim: &SimInfo, vm_uuid: &str, guest: &Guest, booted: &GuestSpec) -> Result<Bridge, BridgeError> {
        let client = sim.client().await?;
        let vm = find_vm(&client, vm_uuid).await?;
        let name = format!("{} ({})", booted.name, vm.value);
        let mut disks = BTreeMap::new();
        for (i, d) in booted.disks.iter().enumerate() {
            let Some(bus) = bus_of(&d.controller) else { continue };
            disks.insert(
                (bus, d.scsi_id as i32),
                MirroredDisk {
                    bus,
                    unit: d.scsi_id as i32,
                    file: String::new(),
                    flat: d.file.canonicalize().unwrap_or_else(|_| d.file.clone()),
                    disk_uuid: None,
                    wwn: d.wwn,
                    qemu_id: GuestSpec::disk_id(i),
                },
            );
        }
        let reported = Arc::new(Mutex::new(Vec::new()));
        let mut mirror = Mirror {
            vm: name.clone(),
            hotplug: guest.hotplug(),
            buses: booted.controllers.iter().filter_map(|c| bus_of(&c.id)).collect(),
            disks,
            failed: BTreeMap::new(),
            reported: reported.clone(),
        };
        let (status_tx, status) = watch::channel(Status {
            started: 0,
            done: 0,
            outcome: Ok(Vec::new()),
            stopped: false,
        });
        let (stop, mut stop_rx) = watch::channel(false);
        let sim = sim.clone();
        let task = tokio::spawn(async move {
            loop {
                status_tx.send_modify(|s| s.started += 1);
                let outcome = match vm_devices(&client, &vm).await {
                    Ok(info) => mirror.reconcile(desired(&info, &sim)).await,
                    Err(e) => Err(e),
                };
                status_tx.send_modify(|s| {
                    s.done = s.started;
                    s.outcome = outcome;
                });
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    _ = tokio::time::sleep(POLL_INTERVAL) => {}
                }
            }
            let _ = client.logout().await;
            status_tx.send_modify(|s| s.stopped = true);
        });
        Ok(Bridge {
            vm: name,
            status,
            stop,
            task: Some(task),
            reported,
        })
    }

    /// Waits until the guest reflects the simulator VM's devices as they
    /// are now (a poll that began after this call has finished), within
    /// [`SETTLE_TIMEOUT`]. Returns the guest's disks, or
    /// [`BridgeError::Unmirrored`] naming the disks it could not mirror.
    pub async fn settled(&self) -> Result<Vec<MirroredDisk>, BridgeError> {
        self.settled_within(SETTLE_TIMEOUT).await
    }

    /// [`Bridge::settled`] with another liveness bound.
    pub async fn settled_within(&self, timeout: Duration) -> Result<Vec<MirroredDisk>, BridgeError> {
        let mut rx = self.status.clone();
        let target = rx.borrow().started + 1;
        let waited = tokio::time::timeout(timeout, rx.wait_for(|s| s.done >= target || s.stopped)).await;
        let status = match waited {
            Err(_) => {
                return Err(BridgeError::Timeout {
                    what: format!("the guest of VM {} catching up with the simulator", self.vm),
                    after: timeout,
                })
            }
            Ok(Err(_)) => None,
            Ok(Ok(s)) => Some(s.clone()),
        };
        match status {
            Some(s) if s.done >= target => s.outcome,
            _ => Err(BridgeError::Stopped { vm: self.vm.clone() }),
        }
    }

    /// Every failure reported since the start, in order.
    pub fn failures(&self) -> Vec<Failure> {
        self.reported.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the task and waits for it (its session is logged out).
    pub async fn stop(mut self) -> Result<(), BridgeError> {
        let _ = self.stop.send(true);
        match self.task.take() {
            Some(t) => t.await.map_err(|e| BridgeError::Simulator {
                what: format!("the bridge task of VM {}", self.vm),
                message: e.to_string(),
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
