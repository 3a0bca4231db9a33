//! `vmdk-plugin` inside a real guest kernel, driven as Docker drives it,
//! with the `vsphere` backend against govmomi's simulator, in both
//! deployments of docs/vsphere.md:
//!
//! - **embedded**: `vmdk-plugin serve --agent-config /etc/vmdk/agent.toml`
//!   in the guest, the agent TOML with `backend = "vsphere"`, `[vsphere]
//!   url = "https://10.0.2.100/sdk"` (forwarded to the simulator's TCP
//!   port), the simulator's certificate `thumbprint` and a 0600
//!   credentials file; the VM's identity is the guest's own BIOS UUID;
//! - **central**: `vmdk-agent serve` on this host with the `vsphere`
//!   backend on a unix socket, forwarded into the guest, and `vmdk-plugin
//!   serve --agent http://10.0.2.100:7981` in the guest.
//!
//! The guest reaches the simulator or the agent only through the forward
//! the test gives it (QEMU user networking with `restrict=on`,
//! `tests/support/guest.rs`). The test hypervisor bridge
//! (`tests/support/bridge.rs`) mirrors every disk the agent adds to or
//! removes from the simulator VM into the guest over QMP, so the plugin's
//! locator meets Linux's real PVSCSI driver. In the guest,
//! `examples/docker_call.rs` sends Docker Engine's own bytes to the
//! plugin's socket (`tests/plugin_protocol.rs` pins them).
//!
//! Each test tells one story with one deployment on VM 1 and the other on
//! VM 2: Create, Get, Mount (attach, find the PVSCSI disk, mkfs once,
//! mount), data with a checksum, Unmount (detach: the disk leaves the
//! guest), Mount again (same filesystem, same data); then VM 1's host
//! dies with the volume mounted, the VM boots again with the disks its
//! configuration lists, and Docker's Mount with the same ID brings the
//! volume back, once with the plugin's state directory kept and once with
//! it lost; then VM 2 is refused the volume while VM 1 holds it (the error
//! names VM 1), gets it once VM 1 lets go, and finally removes it.
//!
//! Root: `tests/guest/build.sh` installs QEMU and builds the guest image,
//! `tests/vcsim/build.sh` installs Go and govmomi and builds the
//! simulator; `tests/run.sh` builds `examples/docker_call.rs` first
//! (`cargo test` builds examples only in test mode), and `cargo test
//! --workspace` builds `vmdk-agent`.
#[path = "support/bridge.rs"]
mod bridge;
#[path = "support/guest.rs"]
mod guest;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bridge::{boot_spec_for, runtime, Bridge, MirroredDisk, SimInfo, Simulator};
use guest::{Guest, GuestSpec};
use serde_json::{json, Value};
use vmdk_vsphere::{Client, Moref};

/// The plugin's socket in the guest (Docker's would be
/// `/run/docker/plugins/vmdk.sock`; the name does not matter here).
const SOCKET: &str = "/run/vmdk.sock";
/// The plugin's default mount root and state directory.
const MOUNT_ROOT: &str = "/mnt/vmdk";
const STATE_DIR: &str = "/var/lib/vmdk-plugin";
/// The plugin's log in the guest.
const PLUGIN_LOG: &str = "/tmp/vmdk-plugin.log";
/// Where the embedded agent in the guest reaches the simulator.
const SIM_IN_GUEST: &str = "10.0.2.100:443";
/// Where the plugin in the guest reaches the central agent.
const AGENT_IN_GUEST: &str = "10.0.2.100:7981";
/// The liveness bound of one Docker call in the guest (a Mount attaches,
/// formats and mounts under TCG).
const CALL_TIMEOUT: Duration = Duration::from_secs(240);
/// Docker's mount IDs: one per container, 64 hex digits.
const ID1: &str = "5f0c2f1e9a6b4d3c8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d";
const ID2: &str = "0d1c2b3a49586776a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0a1b2";
/// The volume of the story, and where the guest mounts it.
const VOLUME: &str = "web";

// ---------------------------------------------------------------------------
// Programs

/// A binary built by cargo, refused when older than one of `sources`
/// (relative to the repository, directories searched recursively).
fn fresh_binary(path: PathBuf, how: &str, sources: &[&str]) -> PathBuf {
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{} is missing ({e}): {how}", path.display()));
    fn newest(p: &Path) -> SystemTime {
        let meta = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if !meta.is_dir() {
            return meta.modified().unwrap();
        }
        std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| newest(&e.path()))
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for source in sources {
        assert!(
            built >= newest(&root.join(source)),
            "{} is older than {source}: {how}",
            path.display()
        );
    }
    path
}

/// `examples/docker_call.rs`, which stands in for Docker in the guest.
fn docker_call_program() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    fresh_binary(
        exe.parent().unwrap().parent().unwrap().join("examples/docker_call"),
        "build it first: `cargo build --example docker_call` (tests/run.sh does)",
        &["examples/docker_call.rs"],
    )
}

/// `vmdk-agent`, the central agent.
fn agent_program() -> PathBuf {
    fresh_binary(
        PathBuf::from(env!("CARGO_BIN_EXE_vmdk-plugin")).with_file_name("vmdk-agent"),
        "build it first: `cargo build -p vmdk-agent` (`cargo test --workspace` does)",
        &[
            "esxi-agent/src",
            "esxi-agent/vsphere/src",
            "esxi-agent/protocol/src",
            "esxi-agent/common/src",
        ],
    )
}

/// Starts `cmd` so that it dies with this thread (`PR_SET_PDEATHSIG`):
/// nothing is left behind even when the test process is killed.
fn spawn_tied(cmd: &mut Command) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe and touches no memory of the
    // parent; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

// ---------------------------------------------------------------------------
// The central agent on this host

/// `vmdk-agent --config FILE serve --socket SOCK` with the `vsphere`
/// backend pointed at the simulator. Dropping it kills it; its
/// configuration, credentials, socket and log go with its directory.
struct HostAgent {
    child: Child,
    dir: tempfile::TempDir,
}

impl HostAgent {
    fn start(sim: &SimInfo) -> HostAgent {
        let dir = tempfile::Builder::new().prefix("vmdk-agent-").tempdir().unwrap();
        let creds = dir.path().join("vsphere-credentials.toml");
        std::fs::write(
            &creds,
            format!("user = {:?}\npassword = {:?}\n", sim.username, sim.password),
        )
        .unwrap();
        std::fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "backend = \"vsphere\"\n\n[vsphere]\nurl = {:?}\ncredentials = {:?}\nthumbprint = {:?}\n",
                sim.url, creds, sim.thumbprint_sha256
            ),
        )
        .unwrap();
        let socket = dir.path().join("agent.sock");
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = spawn_tied(
            Command::new(agent_program())
                .arg("--config")
                .arg(&config)
                .args(["serve", "--socket"])
                .arg(&socket)
                .env("VMDK_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        )
        .expect("starting vmdk-agent");
        let mut agent = HostAgent { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("vmdk-agent exited with {status}:\n{}", agent.log());
            }
            assert!(
                Instant::now() < deadline,
                "vmdk-agent did not listen on {} within 60 s:\n{}",
                socket.display(),
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// A VM: a simulator VM, its guest, its bridge and the plugin in it

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deployment {
    /// The plugin embeds the agent, which talks to the simulator.
    Embedded,
    /// The plugin calls the central agent on this host.
    Central,
}

impl Deployment {
    fn other(self) -> Deployment {
        match self {
            Deployment::Embedded => Deployment::Central,
            Deployment::Central => Deployment::Embedded,
        }
    }
}

/// The simulator's `127.0.0.1:<port>` from its URL.
fn sim_addr(sim: &SimInfo) -> std::net::SocketAddr {
    sim.url
        .strip_prefix("https://")
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the simulator's URL {:?} is not https://<ip:port>/sdk", sim.url))
}

/// What the world around the VMs is: the simulator, the central agent, a
/// runtime for the bridges and a session to read the simulator back.
struct World {
    sim: Simulator,
    agent: HostAgent,
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl World {
    fn new() -> World {
        // vCenter: several hosts, each with a VM.
        let sim = Simulator::start(&["-vms", "1"]);
        assert!(sim.info.vms.len() >= 2, "{:?}", sim.info.vms);
        let agent = HostAgent::start(&sim.info);
        let rt = runtime();
        let client = rt.block_on(sim.info.client()).unwrap();
        World { sim, agent, rt, client }
    }

    fn vm_moref(&self, uuid: &str) -> Moref {
        self.rt
            .block_on(self.client.find_vm_by_bios_uuid(None, &uuid.parse().unwrap()))
            .unwrap()
    }

    /// The backing files of the `dockvols` disks simulator VM `vm` lists.
    fn volumes_of(&self, vm: &Moref) -> Vec<String> {
        let info = self.rt.block_on(self.client.vm_info(vm)).unwrap();
        info.disks
            .into_iter()
            .filter_map(|d| d.file_name)
            .filter(|f| f.contains("] dockvols/"))
            .collect()
    }

    /// `[LocalDS_0] dockvols/_DEFAULT/<volume>.vmdk`.
    fn disk_file(&self, volume: &str) -> String {
        format!("[{}] dockvols/_DEFAULT/{volume}.vmdk", self.sim.info.datastores[0].name)
    }

    /// The host directory of the volumes' folder.
    fn folder(&self) -> PathBuf {
        self.sim.info.datastores[0].path.join("dockvols/_DEFAULT")
    }

    /// `<volume>@<datastore>`.
    fn full(&self, volume: &str) -> String {
        format!("{volume}@{}", self.sim.info.datastores[0].name)
    }
}

/// A simulator VM powered on: its guest, the bridge mirroring its disks,
/// and the plugin in the guest.
struct Vm {
    label: String,
    moref: Moref,
    deployment: Deployment,
    guest: Guest,
    bridge: Option<Bridge>,
    /// The disks it booted with.
    boot_disks: usize,
}

impl Vm {
    /// Boots simulator VM `uuid` as a host powering it on would: with the
    /// PVSCSI controllers and the disks its configuration lists.
    fn boot(w: &World, label: &str, uuid: &str, deployment: Deployment) -> Vm {
        let mut base = GuestSpec {
            name: label.into(),
            memory_mib: 512,
            programs: vec![PathBuf::from(env!("CARGO_BIN_EXE_vmdk-plugin")), docker_call_program()],
            ..Default::default()
        };
        match deployment {
            Deployment::Embedded => base.tcp_forwards = vec![(SIM_IN_GUEST.into(), sim_addr(&w.sim.info))],
            Deployment::Central => base.forwards = vec![(AGENT_IN_GUEST.into(), w.agent.socket())],
        }
        let spec = w.rt.block_on(boot_spec_for(&w.sim.info, uuid, base)).unwrap();
        let mut guest = Guest::boot(spec.clone()).unwrap();
        assert_eq!(guest.sh_ok("cat /sys/class/dmi/id/product_uuid").trim(), uuid);
        let bridge = w.rt.block_on(Bridge::start(&w.sim.info, uuid, &guest, &spec)).unwrap();
        Vm {
            label: label.into(),
            moref: w.vm_moref(uuid),
            deployment,
            guest,
            bridge: Some(bridge),
            boot_disks: spec.disks.len(),
        }
    }

    fn bridge(&self) -> &Bridge {
        self.bridge.as_ref().expect("the VM runs")
    }

    /// Waits until the guest has the disks the simulator VM lists now.
    fn settle(&self, w: &World) -> Vec<MirroredDisk> {
        w.rt.block_on(self.bridge().settled())
            .unwrap_or_else(|e| panic!("{}: {e}", self.label))
    }

    /// Writes what the VM's persistent root disk would hold: for the
    /// embedded agent, `/etc/vmdk/agent.toml` and the 0600 credentials.
    fn configure(&mut self, w: &World) {
        if self.deployment != Deployment::Embedded {
            return;
        }
        let sim = &w.sim.info;
        let host = SIM_IN_GUEST.strip_suffix(":443").unwrap();
        self.guest.sh_ok(&format!(
            "mkdir -p /etc/vmdk && (umask 077 && printf 'user = \"%s\"\\npassword = \"%s\"\\n' '{user}' '{password}' \
             >/etc/vmdk/vsphere-credentials.toml) && chmod 600 /etc/vmdk/vsphere-credentials.toml && \
             cat >/etc/vmdk/agent.toml <<'EOF'\n\
             backend = \"vsphere\"\n\n\
             [vsphere]\n\
             url = \"https://{host}/sdk\"\n\
             credentials = \"/etc/vmdk/vsphere-credentials.toml\"\n\
             thumbprint = \"{thumbprint}\"\n\
             EOF\n",
            user = sim.username,
            password = sim.password,
            thumbprint = sim.thumbprint_sha256,
        ));
    }

    /// Starts `vmdk-plugin serve` in the guest, in the background, and
    /// waits for its socket.
    fn start_plugin(&mut self) {
        let agent = match self.deployment {
            Deployment::Embedded => "--agent-config /etc/vmdk/agent.toml".to_owned(),
            Deployment::Central => format!("--agent http://{AGENT_IN_GUEST}"),
        };
        let (status, out) = self.guest.sh(&format!(
            "VMDK_LOG=info vmdk-plugin serve --socket {SOCKET} --reconcile-interval 0 {agent} \
             >>{PLUGIN_LOG} 2>&1 </dev/null & pid=$!; i=0; \
             while [ ! -S {SOCKET} ]; do i=$((i+1)); \
               if ! kill -0 $pid 2>/dev/null || [ $i -gt 1200 ]; then echo 'no plugin socket'; cat {PLUGIN_LOG}; exit 1; fi; \
               sleep 0.05; done"
        ));
        assert_eq!(status, 0, "{}: the plugin did not start:\n{out}", self.label);
    }

    /// Waits for the plugin's start-up recovery to finish, then for the
    /// bridge to mirror what it did: on ESXi a detach task ends once the
    /// guest has let go of the disk, and the bridge mirrors
    /// asynchronously.
    fn wait_recovery(&mut self, w: &World) {
        let (status, out) = self.guest.sh(&format!(
            "i=0; until grep -q 'recovery finished' {PLUGIN_LOG}; do i=$((i+1)); \
             if [ $i -gt 1200 ]; then cat {PLUGIN_LOG}; exit 1; fi; sleep 0.05; done"
        ));
        assert_eq!(
            status, 0,
            "{}: the plugin's recovery did not finish:\n{out}",
            self.label
        );
        self.settle(w);
    }

    fn plugin_log(&mut self) -> String {
        self.guest.sh(&format!("cat {PLUGIN_LOG}")).1
    }

    /// One Docker call: `(HTTP status line, body)`.
    fn call(&mut self, endpoint: &str, body: &Value) -> (String, Value) {
        let start = Instant::now();
        let cmd = format!("docker_call {SOCKET} {endpoint} '{body}'");
        let (status, out) = self
            .guest
            .try_sh(&cmd, CALL_TIMEOUT)
            .unwrap_or_else(|e| panic!("{}: {e}", self.label));
        if status == 2 || out.lines().count() < 2 {
            let log = self.plugin_log();
            panic!(
                "{}: `{cmd}` failed ({status}):\n{out}\nthe plugin's log:\n{log}",
                self.label
            );
        }
        let (line, json) = out.split_once('\n').unwrap();
        let v: Value = serde_json::from_str(json.trim())
            .unwrap_or_else(|e| panic!("{}: {endpoint} answered no JSON ({e}): {out}", self.label));
        eprintln!(
            "{}: {endpoint} {} answered in {:.2}s",
            self.label,
            body["Name"].as_str().unwrap_or_default(),
            start.elapsed().as_secs_f64()
        );
        (line.trim().to_owned(), v)
    }

    /// A call Docker takes as a success: 200 and an empty `Err`.
    fn ok(&mut self, endpoint: &str, body: Value) -> Value {
        let (status, v) = self.call(endpoint, &body);
        if status != "HTTP/1.1 200 OK" || v["Err"].as_str().is_some_and(|e| !e.is_empty()) {
            let log = self.plugin_log();
            panic!(
                "{}: {endpoint} {body} failed: {status} {v}\nthe plugin's log:\n{log}",
                self.label
            );
        }
        v
    }

    /// A call Docker takes as a failure; returns the text Docker shows.
    fn refused(&mut self, endpoint: &str, body: Value) -> String {
        let (status, v) = self.call(endpoint, &body);
        let err = v["Err"].as_str().unwrap_or_default().to_owned();
        assert!(
            !err.is_empty(),
            "{}: {endpoint} {body} was not refused: {status} {v}",
            self.label
        );
        err
    }

    fn mount(&mut self, w: &World, id: &str) -> String {
        let v = self.ok("VolumeDriver.Mount", json!({"Name": VOLUME, "ID": id}));
        let mp = v["Mountpoint"].as_str().unwrap().to_owned();
        assert_eq!(mp, format!("{MOUNT_ROOT}/{}/data", w.full(VOLUME)));
        mp
    }

    fn unmount(&mut self, id: &str) {
        self.ok("VolumeDriver.Unmount", json!({"Name": VOLUME, "ID": id}));
    }

    fn get(&mut self) -> Value {
        self.ok("VolumeDriver.Get", json!({"Name": VOLUME}))["Volume"].clone()
    }

    /// The device mounted at the volume's mount directory in the guest.
    fn mounted_device(&mut self, w: &World) -> Option<String> {
        let dir = format!("{MOUNT_ROOT}/{}", w.full(VOLUME));
        let out = self
            .guest
            .sh_ok(&format!("awk -v d='{dir}' '$2 == d {{print $1}}' /proc/mounts"));
        out.lines().last().map(str::to_owned)
    }

    /// The filesystem UUID on `dev`.
    fn fs_uuid(&mut self, dev: &str) -> String {
        let out = self.guest.sh_ok(&format!("blkid -p -o value -s UUID {dev}"));
        let uuid = out.trim().to_owned();
        assert_eq!(uuid.len(), 36, "{}: blkid found no UUID on {dev}: {out}", self.label);
        uuid
    }

    /// Writes 2 MiB of random data to the volume; returns its SHA-256.
    fn write_payload(&mut self, mountpoint: &str) -> String {
        let out = self.guest.sh_ok(&format!(
            "dd if=/dev/urandom of={mountpoint}/payload bs=64k count=32 2>/dev/null && sync && \
             sha256sum {mountpoint}/payload"
        ));
        out.split_whitespace().next().unwrap().to_owned()
    }

    fn payload_sum(&mut self, mountpoint: &str) -> String {
        let out = self.guest.sh_ok(&format!("sha256sum {mountpoint}/payload"));
        out.split_whitespace().next().unwrap().to_owned()
    }

    /// How often the plugin formatted a disk since the guest booted.
    fn formats(&mut self) -> usize {
        let out = self
            .guest
            .sh(&format!("grep -c 'formatting on first use' {PLUGIN_LOG}"))
            .1;
        out.trim().parse().unwrap()
    }

    /// Waits (bounded, 10 s) until `/dev/sdX` has left the guest.
    fn wait_gone(&mut self, dev: &str) {
        let name = dev.strip_prefix("/dev/").unwrap();
        self.guest.sh_ok(&format!(
            "i=0; while [ -e /sys/block/{name} ] || [ -e {dev} ]; do i=$((i+1)); \
             [ $i -gt 200 ] && echo {dev} still there && exit 1; sleep 0.05; done"
        ));
    }

    /// The plugin's state directory, as a base64 tar.
    fn save_state(&mut self) -> String {
        let out = self
            .guest
            .sh_ok(&format!("tar -C {STATE_DIR} -cf - . | base64 | tr -d '\\n'"));
        out.trim().to_owned()
    }

    fn restore_state(&mut self, saved: &str) {
        self.guest.sh_ok(&format!(
            "mkdir -p {STATE_DIR} && chmod 700 {STATE_DIR} && echo '{saved}' | base64 -d | tar -C {STATE_DIR} -xf -"
        ));
    }

    /// SIGKILLs the guest's QEMU, as when its host dies, and stops its
    /// bridge.
    fn host_dies(&mut self, w: &World) {
        let pid = self.guest.pid().unwrap();
        self.guest.kill();
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "QEMU {pid} is gone");
        if let Some(b) = self.bridge.take() {
            w.rt.block_on(b.stop()).unwrap();
        }
    }
}

/// The PIDs of `socat`s with the address argument `target`
/// (`TCP:127.0.0.1:<port>`, `UNIX-CONNECT:<path>`).
fn socats_to(target: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let socat = args.first()?.ends_with(b"socat");
            (socat && args.contains(&target.as_bytes())).then_some(pid)
        })
        .collect()
}

/// Where a guest's forward of `deployment` leads, as `socat` names it.
fn forward_target(w: &World, deployment: Deployment) -> String {
    match deployment {
        Deployment::Embedded => format!("TCP:{}", sim_addr(&w.sim.info)),
        Deployment::Central => format!("UNIX-CONNECT:{}", w.agent.socket().display()),
    }
}

/// A phase timer that prints what took how long.
struct Timer {
    at: Instant,
    test: &'static str,
}

impl Timer {
    fn lap(&mut self, what: &str) {
        eprintln!("{}: {what} in {:.2}s", self.test, self.at.elapsed().as_secs_f64());
        self.at = Instant::now();
    }
}

// ---------------------------------------------------------------------------
// The story

/// The volume's data as one VM left it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Payload {
    sum: String,
    fs_uuid: String,
}

/// Docker's Mount of `id` on `vm`; checks that the filesystem and data
/// are `want`'s, and that the plugin has formatted `formats` disks since
/// the guest booted (the one of a first Mount, or none).
fn mount_and_check(w: &World, vm: &mut Vm, id: &str, want: &Payload, formats: usize) {
    let mp = vm.mount(w, id);
    let dev = vm
        .mounted_device(w)
        .unwrap_or_else(|| panic!("{}: the Mount answered, nothing is mounted", vm.label));
    assert_eq!(
        vm.fs_uuid(&dev),
        want.fs_uuid,
        "{}: the filesystem was made anew",
        vm.label
    );
    assert_eq!(vm.payload_sum(&mp), want.sum, "{}: the data changed", vm.label);
    assert_eq!(
        vm.formats(),
        formats,
        "{}: the plugin formatted the disk again",
        vm.label
    );
    assert_eq!(w.volumes_of(&vm.moref), vec![w.disk_file(VOLUME)], "{}", vm.label);
}

fn story(test: &'static str, first: Deployment) {
    let t0 = Instant::now();
    let mut t = Timer { at: t0, test };
    let w = World::new();
    let (uuid1, uuid2) = (w.sim.info.vms[0].uuid.clone(), w.sim.info.vms[1].uuid.clone());
    let full = w.full(VOLUME);
    let file = w.disk_file(VOLUME);
    t.lap("simulator and central agent started");

    // --- VM 1: first use ---------------------------------------------------
    let mut vm1 = Vm::boot(&w, &format!("vm1-{first:?}"), &uuid1, first);
    vm1.configure(&w);
    vm1.start_plugin();
    t.lap(&format!("VM 1 ({first:?}) booted, plugin serving"));

    vm1.ok("VolumeDriver.Create", json!({"Name": VOLUME, "Opts": {"size": "64mb"}}));
    let v = vm1.get();
    assert_eq!(v["Name"], VOLUME, "{v}");
    let st = &v["Status"];
    assert_eq!(st["datastore"], w.sim.info.datastores[0].name.as_str(), "{v}");
    assert_eq!(st["capacity"]["size"], "64MB", "{v}");
    assert_eq!(st["attached to VM"], "detached", "{v}");
    assert_eq!(st["created by VM"], uuid1.as_str(), "{v}");
    assert_eq!(
        std::fs::metadata(w.folder().join(format!("{VOLUME}-flat.vmdk")))
            .unwrap()
            .len(),
        64 << 20
    );
    assert!(w.folder().join(format!("{VOLUME}.vmdk")).is_file());

    let mp = vm1.mount(&w, ID1);
    let dev = vm1.mounted_device(&w).expect("the volume is mounted");
    assert!(dev.starts_with("/dev/sd"), "{dev}");
    assert_eq!(w.volumes_of(&vm1.moref), vec![file.clone()]);
    let wwid = vm1
        .guest
        .sh_ok(&format!("cat /sys/block/{}/device/wwid", &dev["/dev/".len()..]));
    assert!(wwid.trim().starts_with("naa.6000c29"), "{dev}: {wwid}");
    let payload = Payload {
        fs_uuid: vm1.fs_uuid(&dev),
        sum: vm1.write_payload(&mp),
    };
    assert_eq!(vm1.formats(), 1);
    let v = vm1.get();
    assert_eq!(v["Status"]["attached to VM"], uuid1.as_str(), "{v}");
    let formatted = v["Status"]["formatted"].as_str().unwrap().to_owned();
    assert!(
        formatted.starts_with("ext4 on ") && formatted.ends_with(&format!("by VM {uuid1}")),
        "{formatted}"
    );
    t.lap("Create, Get, Mount (attach, find, mkfs, mount), data written");

    vm1.unmount(ID1);
    assert_eq!(vm1.mounted_device(&w), None);
    assert!(w.volumes_of(&vm1.moref).is_empty(), "the Unmount detached the disk");
    assert!(vm1.settle(&w).is_empty());
    vm1.wait_gone(&dev);
    assert_eq!(vm1.get()["Status"]["attached to VM"], "detached");
    t.lap("Unmount: unmounted, detached, gone from the guest");

    mount_and_check(&w, &mut vm1, ID1, &payload, 1);
    let v = vm1.get();
    assert_eq!(v["Status"]["formatted"], formatted.as_str(), "{v}");
    t.lap("Mount again: same filesystem, data intact");

    // --- VM 1's host dies, twice -------------------------------------------
    // The plugin's state as VM 1's persistent root disk would hold it
    // after that Mount answered: the guest's root here is an initramfs
    // (tmpfs), so a copy taken now stands in for /var/lib/vmdk-plugin on
    // a real VM's root disk.
    let state = vm1.save_state();
    for restored in [true, false] {
        vm1.host_dies(&w);
        // The connections the guest had through its forward died with it
        // (no other guest uses that forward now).
        let target = forward_target(&w, first);
        assert_eq!(
            socats_to(&target),
            Vec::<i32>::new(),
            "socats to {target} outlived their guest"
        );
        // vSphere still lists the disk in the VM's configuration.
        assert_eq!(w.volumes_of(&vm1.moref), vec![file.clone()]);
        let what = if restored { "state kept" } else { "state lost" };
        let label = format!("vm1-{first:?}-restarted-{}", if restored { "kept" } else { "lost" });
        vm1 = Vm::boot(&w, &label, &uuid1, first);
        assert_eq!(vm1.boot_disks, 1, "VM 1 boots with its disk");
        vm1.configure(&w);
        if restored {
            vm1.restore_state(&state);
            let json = vm1.guest.sh_ok(&format!("cat {STATE_DIR}/mounts.json"));
            assert!(json.contains(&full) && json.contains(ID1), "{json}");
        }
        vm1.start_plugin();
        vm1.wait_recovery(&w);
        eprintln!(
            "{test}: after the restart ({what}) the plugin's recovery {} the disk the VM booted with",
            if w.volumes_of(&vm1.moref).is_empty() {
                "detached (nothing held it)"
            } else {
                "kept"
            }
        );
        t.lap(&format!(
            "VM 1's host died; VM 1 booted again with its disk ({what}), plugin recovered"
        ));
        // Docker restarts the container: Mount with the same ID.
        mount_and_check(&w, &mut vm1, ID1, &payload, 0);
        t.lap(&format!(
            "Docker's Mount with the same ID: volume back, data intact ({what})"
        ));
    }

    // --- VM 2, the other deployment -----------------------------------------
    let second = first.other();
    let mut vm2 = Vm::boot(&w, &format!("vm2-{second:?}"), &uuid2, second);
    vm2.configure(&w);
    vm2.start_plugin();
    vm2.wait_recovery(&w);
    t.lap(&format!("VM 2 ({second:?}) booted, plugin serving"));

    // Docker on VM 2 creates the volume it is told to use: it exists.
    vm2.ok("VolumeDriver.Create", json!({"Name": VOLUME, "Opts": {}}));
    let v = vm2.get();
    assert_eq!(v["Status"]["attached to VM"], uuid1.as_str(), "{v}");
    let err = vm2.refused("VolumeDriver.Mount", json!({"Name": VOLUME, "ID": ID2}));
    assert!(
        err.contains(&format!("attached to VM {uuid1}")) && err.contains(&full),
        "VM 2's refusal does not name the holder: {err}"
    );
    assert_eq!(vm2.mounted_device(&w), None);
    assert!(w.volumes_of(&vm2.moref).is_empty(), "VM 2 got the disk");
    assert!(vm2.settle(&w).is_empty());
    let err = vm2.refused("VolumeDriver.Remove", json!({"Name": VOLUME}));
    assert!(err.contains(&uuid1), "{err}");
    assert!(w.folder().join(format!("{VOLUME}-flat.vmdk")).is_file());
    // VM 1 still has it, untouched.
    assert_eq!(vm1.payload_sum(&mp), payload.sum);
    t.lap("VM 2 refused the volume VM 1 holds (Mount and Remove)");

    vm1.unmount(ID1);
    assert!(w.volumes_of(&vm1.moref).is_empty());
    // On ESXi the detach task ends once the guest has let go of the disk.
    assert!(vm1.settle(&w).is_empty());
    mount_and_check(&w, &mut vm2, ID2, &payload, 0);
    assert_eq!(vm2.get()["Status"]["attached to VM"], uuid2.as_str());
    t.lap("VM 1 let go; VM 2 mounted the volume, data intact");

    vm2.unmount(ID2);
    assert!(w.volumes_of(&vm2.moref).is_empty());
    assert!(vm2.settle(&w).is_empty());
    mount_and_check(&w, &mut vm2, ID2, &payload, 0);
    vm2.unmount(ID2);
    assert!(vm2.settle(&w).is_empty());
    vm2.ok("VolumeDriver.Remove", json!({"Name": VOLUME}));
    assert_eq!(vm2.get(), Value::Null);
    for f in [".vmdk", "-flat.vmdk", ".vmfd"] {
        let p = w.folder().join(format!("{VOLUME}{f}"));
        assert!(!p.exists(), "{} is left", p.display());
    }
    t.lap("VM 2: Unmount, Mount again, Unmount, Remove");

    for vm in [&mut vm1, &mut vm2] {
        let b = vm.bridge.take().unwrap();
        assert_eq!(b.failures(), vec![], "{}: disks the bridge could not mirror", vm.label);
        w.rt.block_on(b.stop()).unwrap();
    }
    eprintln!("{test}: whole test {:.1}s", t0.elapsed().as_secs_f64());
}

#[test]
fn embedded_agent_vm_mounts_outlives_its_host_and_hands_the_volume_to_a_central_agent_vm() {
    story("embedded plugin (VM 1), central agent (VM 2)", Deployment::Embedded);
}

#[test]
fn central_agent_vm_mounts_outlives_its_host_and_hands_the_volume_to_an_embedded_agent_vm() {
    story("central agent (VM 1), embedded plugin (VM 2)", Deployment::Central);
}
