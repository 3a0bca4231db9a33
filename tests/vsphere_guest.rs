//! vSphere disks seen by a real guest kernel: the vSphere simulator
//! (`tests/vcsim/main.go`, govmomi 0.24.2 with ESXi-like disks) is driven
//! with `vmdk_vsphere::Client` as the agent's `vsphere` backend drives
//! vSphere, and the test hypervisor bridge (`tests/support/bridge.rs`)
//! mirrors each simulator VM's disks into a QEMU guest running Debian's
//! kernel with VMware's PVSCSI driver (`tests/support/guest.rs`). In the
//! guest, the locator example (`examples/locate.rs`) finds each disk from
//! what the agent would send for the simulator: the controller's bus, the
//! unit and the disk UUID, without a PCI address.
//!
//! Root: `tests/guest/build.sh` installs QEMU and builds the guest image,
//! `tests/vcsim/build.sh` installs Go and govmomi and builds the
//! simulator; `tests/run.sh` builds the locator example first.
#[path = "support/bridge.rs"]
mod bridge;
#[path = "support/guest.rs"]
mod guest;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use bridge::{boot_spec_for, runtime, wwn_of, Bridge, BridgeError, SimInfo, Simulator};
use guest::{Guest, GuestSpec};
use vmdk_protocol::DiskLocation;
use vmdk_vsphere::{
    AdapterType, Client, Datacenter, DatastorePath, DeviceChange, DiskMode, DiskSpec, DiskType, Moref,
    ScsiControllerKind, VirtualDisk,
};

/// The locator example (`target/debug/examples/locate`), which `cargo
/// test` builds only in test mode: `tests/run.sh` builds it first with
/// `cargo build --example locate`. It must be newer than its sources.
fn locate_program() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let prog = exe.parent().unwrap().parent().unwrap().join("examples/locate");
    let how = "build it first: `cargo build --example locate` (tests/run.sh does)";
    let built = std::fs::metadata(&prog)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{} is missing ({e}): {how}", prog.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for source in [
        "src/locate.rs",
        "examples/locate.rs",
        "esxi-agent/protocol/src/agent.rs",
    ] {
        let changed = std::fs::metadata(root.join(source)).unwrap().modified().unwrap();
        assert!(built >= changed, "{} is older than {source}: {how}", prog.display());
    }
    prog
}

fn base(name: &str) -> GuestSpec {
    GuestSpec {
        name: name.into(),
        programs: vec![locate_program()],
        ..Default::default()
    }
}

/// Where the agent tells the guest to look for a disk on the simulator:
/// no PCI address (the simulator reports no slot for controllers).
fn scsi(bus: i32, unit: i32, disk_uuid: &str) -> DiskLocation {
    DiskLocation::Scsi {
        controller_bus: bus as u32,
        pci_address: None,
        unit: unit as u32,
        disk_uuid: Some(disk_uuid.into()),
    }
}

/// Runs the locator in the guest: the device, or the error text.
fn locate(g: &mut Guest, loc: &DiskLocation) -> Result<String, String> {
    let json = serde_json::to_string(loc).unwrap();
    let (status, out) = g.sh(&format!("locate '{json}' 10"));
    match status {
        0 => Ok(out.trim().to_owned()),
        _ => Err(out),
    }
}

/// `(wwid, SCSI device path)` of `/dev/sdX` in the guest's sysfs.
fn sysfs_of(g: &mut Guest, dev: &str) -> (String, String) {
    let name = dev.strip_prefix("/dev/").unwrap_or_else(|| panic!("{dev:?}"));
    let out = g.sh_ok(&format!(
        "test -b {dev} && cat /sys/block/{name}/device/wwid && readlink -f /sys/block/{name}/device"
    ));
    let mut lines = out.lines().map(str::to_owned);
    (lines.next().unwrap_or_default(), lines.next().unwrap_or_default())
}

/// Waits (bounded, 10 s) in the guest until `/dev/sdX` is gone.
fn wait_gone(g: &mut Guest, dev: &str) {
    let name = &dev["/dev/".len()..];
    g.sh_ok(&format!(
        "i=0; while [ -e /sys/block/{name} ] || [ -e {dev} ]; do i=$((i+1)); \
         [ $i -gt 200 ] && echo {dev} still there && exit 1; sleep 0.05; done"
    ));
}

fn mkfs_and_write(g: &mut Guest, dev: &str, unmount: bool) -> String {
    let out = g.sh_ok(&format!(
        "mkfs.ext4 -q -F {dev} && mkdir -p /mnt/v && mount -t ext4 {dev} /mnt/v && \
         dd if=/dev/urandom of=/mnt/v/data bs=64k count=32 2>/dev/null && sync && sha256sum /mnt/v/data{}",
        if unmount { " && umount /mnt/v" } else { "" }
    ));
    out.split_whitespace().next().unwrap().to_owned()
}

fn checksum(g: &mut Guest, dev: &str) -> String {
    let out = g.sh_ok(&format!(
        "mkdir -p /mnt/v && mount -t ext4 {dev} /mnt/v && sha256sum /mnt/v/data && umount /mnt/v"
    ));
    out.split_whitespace().next().unwrap().to_owned()
}

/// A phase timer that prints what took how long.
struct Timer(Instant, &'static str);

impl Timer {
    fn lap(&mut self, what: &str) {
        eprintln!("{}: {what} in {:.2}s", self.1, self.0.elapsed().as_secs_f64());
        self.0 = Instant::now();
    }
}

/// The simulator side of a test: a client, the datacenter and a folder.
struct Vsphere {
    client: Client,
    dc: Datacenter,
    folder: DatastorePath,
}

impl Vsphere {
    async fn new(sim: &SimInfo) -> Vsphere {
        let client = sim.client().await.unwrap();
        let dc = client.datacenter(None).await.unwrap();
        let folder = DatastorePath::new(&sim.datastores[0].name, "dockvols/_DEFAULT").unwrap();
        client.make_directory(&dc, &folder, true).await.unwrap();
        Vsphere { client, dc, folder }
    }

    async fn vm(&self, uuid: &str) -> Moref {
        self.client
            .find_vm_by_bios_uuid(Some(&self.dc), &uuid.parse().unwrap())
            .await
            .unwrap()
    }

    async fn create(&self, name: &str, ty: DiskType, mib: u64) -> DatastorePath {
        let path = self.folder.join(name).unwrap();
        let spec = DiskSpec {
            disk_type: ty,
            adapter_type: AdapterType::LsiLogic,
            capacity_kb: mib * 1024,
            profile: None,
        };
        self.client.create_virtual_disk(&self.dc, &path, &spec).await.unwrap();
        path
    }

    /// The key of the VM's PVSCSI controller on `bus`.
    async fn controller_key(&self, vm: &Moref, bus: i32) -> i32 {
        let info = self.client.vm_info(vm).await.unwrap();
        info.controllers
            .iter()
            .find(|c| c.bus_number == bus && c.kind == ScsiControllerKind::ParaVirtual)
            .unwrap_or_else(|| panic!("no PVSCSI controller on bus {bus}: {:?}", info.controllers))
            .key
    }

    async fn attach(&self, vm: &Moref, controller_key: i32, unit: i32, file: &DatastorePath) {
        self.client
            .reconfigure_vm(
                vm,
                &[DeviceChange::AttachDisk {
                    temp_key: -1,
                    controller_key,
                    unit_number: unit,
                    file: file.clone(),
                    disk_mode: DiskMode::IndependentPersistent,
                    profile: None,
                }],
                &[],
            )
            .await
            .unwrap();
    }

    /// The VM's device for `file`, as the simulator reports it.
    async fn disk(&self, vm: &Moref, file: &DatastorePath) -> Option<VirtualDisk> {
        let info = self.client.vm_info(vm).await.unwrap();
        info.disks
            .into_iter()
            .find(|d| d.file_name.as_deref() == Some(file.to_string().as_str()))
    }

    async fn detach(&self, vm: &Moref, file: &DatastorePath) {
        let disk = self.disk(vm, file).await.expect("the disk is attached");
        self.client
            .reconfigure_vm(vm, &[DeviceChange::RemoveDisk(disk)], &[])
            .await
            .unwrap();
    }
}

/// `ddb.uuid` of a descriptor on the host.
fn ddb_uuid(descriptor: &Path) -> String {
    let text = std::fs::read_to_string(descriptor).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("ddb.uuid = \""))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no ddb.uuid in {}:\n{text}", descriptor.display()))
        .to_owned()
}

/// `qemu-img info` of a descriptor: (virtual size, create type).
fn qemu_img_info(descriptor: &Path) -> (u64, String) {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(descriptor)
        .output()
        .expect("running qemu-img (Debian's qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img cannot read {}: {}",
        descriptor.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format"], "vmdk", "{v}");
    (
        v["virtual-size"].as_u64().unwrap(),
        v["format-specific"]["data"]["create-type"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

// ---------------------------------------------------------------------------
// The simulator's disks are ESXi's

async fn simulator_disks_are_esxi_disks(model: &[&str]) {
    let sim = Simulator::start(model);
    let vs = Vsphere::new(&sim.info).await;
    let dir = sim.info.datastores[0].path.join("dockvols/_DEFAULT");

    let thin = vs.create("thin.vmdk", DiskType::Thin, 64).await;
    let thick = vs.create("thick.vmdk", DiskType::EagerZeroedThick, 16).await;
    for (name, mib, is_thin) in [("thin", 64u64, true), ("thick", 16, false)] {
        let desc = dir.join(format!("{name}.vmdk"));
        let text = std::fs::read_to_string(&desc).unwrap();
        assert!(text.starts_with("# Disk DescriptorFile\nversion=1\n"), "{text}");
        assert!(text.contains("createType=\"vmfs\""), "{text}");
        assert!(
            text.contains(&format!("\nRW {} VMFS \"{name}-flat.vmdk\"\n", mib * 2048)),
            "{text}"
        );
        assert_eq!(text.contains("ddb.thinProvisioned = \"1\""), is_thin, "{text}");
        // The very text the agent's local backend writes for such a disk.
        let parsed = vmdk_agent::vmdk::Descriptor::parse(&text).unwrap();
        assert_eq!(parsed.render(), text);
        assert_eq!(parsed.capacity_bytes(), mib << 20);
        assert_eq!(parsed.is_thin(), is_thin);
        let uuid = ddb_uuid(&desc);
        assert_eq!(parsed.uuid(), Some(uuid.as_str()));
        assert!(uuid.starts_with("60 00 c2 9"), "{uuid}");
        assert_eq!(uuid.len(), 47, "{uuid}");
        assert_eq!((qemu_img_info(&desc)), (mib << 20, "vmfs".to_owned()));
        // The extent has the capacity, and nothing is allocated.
        let flat = std::fs::metadata(dir.join(format!("{name}-flat.vmdk"))).unwrap();
        assert_eq!(flat.len(), mib << 20);
        assert!(std::os::unix::fs::MetadataExt::blocks(&flat) < 64, "{flat:?}");
    }
    // Two disks never share a UUID.
    assert_ne!(ddb_uuid(&dir.join("thin.vmdk")), ddb_uuid(&dir.join("thick.vmdk")));

    // Creating it again is refused as ESXi refuses it, and changes nothing.
    let before = std::fs::read(dir.join("thin.vmdk")).unwrap();
    let spec = DiskSpec {
        disk_type: DiskType::Thin,
        adapter_type: AdapterType::LsiLogic,
        capacity_kb: 1024,
        profile: None,
    };
    let e = vs.client.create_virtual_disk(&vs.dc, &thin, &spec).await.unwrap_err();
    assert_eq!(e.fault_type(), Some("FileAlreadyExists"), "{e}");
    assert!(e.to_string().contains("thin.vmdk"), "{e}");
    assert_eq!(std::fs::read(dir.join("thin.vmdk")).unwrap(), before);
    assert_eq!(std::fs::metadata(dir.join("thin-flat.vmdk")).unwrap().len(), 64 << 20);

    // A copy has its own extent and UUID, and the data.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("thin-flat.vmdk"))
            .unwrap();
        f.write_all_at(b"written before the copy", 5 << 20).unwrap();
    }
    let copy = vs.folder.join("copy.vmdk").unwrap();
    vs.client.copy_virtual_disk(&vs.dc, &thin, &copy, false).await.unwrap();
    let text = std::fs::read_to_string(dir.join("copy.vmdk")).unwrap();
    assert!(
        text.contains(&format!("\nRW {} VMFS \"copy-flat.vmdk\"\n", 64 * 2048)),
        "{text}"
    );
    assert!(text.contains("ddb.thinProvisioned = \"1\""), "{text}");
    assert_ne!(ddb_uuid(&dir.join("copy.vmdk")), ddb_uuid(&dir.join("thin.vmdk")));
    let data = std::fs::read(dir.join("copy-flat.vmdk")).unwrap();
    assert_eq!(data.len(), 64 << 20);
    assert_eq!(&data[5 << 20..(5 << 20) + 23], b"written before the copy");
    assert_eq!(qemu_img_info(&dir.join("copy.vmdk")).0, 64 << 20);

    // Attached, the disk reports ESXi's backing uuid and its capacity.
    let vm = vs.vm(&sim.info.vms[0].uuid).await;
    let key = vs.controller_key(&vm, 0).await;
    vs.attach(&vm, key, 3, &thick).await;
    let disk = vs.disk(&vm, &thick).await.unwrap();
    let hex: String = ddb_uuid(&dir.join("thick.vmdk")).replace([' ', '-'], "");
    let want = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    assert_eq!(disk.uuid.as_deref(), Some(want.as_str()));
    assert_eq!(disk.capacity_kb, Some(16 * 1024));
}

#[test]
fn esx_simulator_disks_are_esxi_disks() {
    let t = Instant::now();
    runtime().block_on(simulator_disks_are_esxi_disks(&["-esx", "-vms", "1"]));
    eprintln!("esx_simulator_disks_are_esxi_disks: {:.2}s", t.elapsed().as_secs_f64());
}

#[test]
fn vpx_simulator_disks_are_esxi_disks() {
    let t = Instant::now();
    runtime().block_on(simulator_disks_are_esxi_disks(&["-vms", "1"]));
    eprintln!("vpx_simulator_disks_are_esxi_disks: {:.2}s", t.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------
// A real guest

#[test]
fn a_disk_attached_in_the_simulator_is_found_in_the_guest_detached_and_found_again_at_another_unit() {
    let t0 = Instant::now();
    let mut t = Timer(Instant::now(), "attach test");
    let sim = Simulator::start(&["-esx", "-vms", "1"]);
    let rt = runtime();
    let uuid = sim.info.vms[0].uuid.clone();
    let vs = rt.block_on(Vsphere::new(&sim.info));
    let vm = rt.block_on(vs.vm(&uuid));
    let spec = rt.block_on(boot_spec_for(&sim.info, &uuid, base("esx-vm0"))).unwrap();
    // The simulator VM's own PVSCSI controller; its disk1.vmdk is empty.
    assert_eq!(spec.controllers.len(), 1, "{spec:?}");
    assert!(spec.disks.is_empty(), "{spec:?}");
    let mut g = Guest::boot(spec.clone()).unwrap();
    assert_eq!(g.sh_ok("cat /sys/class/dmi/id/product_uuid").trim(), uuid);
    let b = rt.block_on(Bridge::start(&sim.info, &uuid, &g, &spec)).unwrap();
    assert_eq!(rt.block_on(b.settled()).unwrap(), vec![]);
    t.lap("simulator up, guest booted, bridge settled");

    // Created and attached on bus 0, unit 1: the guest finds it.
    let vol = rt.block_on(vs.create("vol1.vmdk", DiskType::Thin, 64));
    let key0 = rt.block_on(vs.controller_key(&vm, 0));
    rt.block_on(vs.attach(&vm, key0, 1, &vol));
    let disk_uuid = rt
        .block_on(vs.disk(&vm, &vol))
        .unwrap()
        .uuid
        .expect("the simulator reports the disk's uuid");
    let mirrored = rt.block_on(b.settled()).unwrap();
    assert_eq!(mirrored.len(), 1, "{mirrored:?}");
    assert_eq!((mirrored[0].bus, mirrored[0].unit), (0, 1));
    assert_eq!(mirrored[0].file, vol.to_string());
    assert!(
        mirrored[0].flat.ends_with("dockvols/_DEFAULT/vol1-flat.vmdk"),
        "{mirrored:?}"
    );
    t.lap("created, attached and mirrored");
    let dev = locate(&mut g, &scsi(0, 1, &disk_uuid)).unwrap();
    let (wwid, sdev) = sysfs_of(&mut g, &dev);
    assert_eq!(wwid, format!("naa.{:016x}", wwn_of(&disk_uuid).unwrap()));
    assert!(wwid.starts_with("naa.6000c29"), "{wwid}");
    assert!(
        sdev.contains(&format!("/{}/host", bridge::guest_pci_address(0))) && sdev.ends_with(":0:1:0"),
        "{sdev}"
    );
    let sum = mkfs_and_write(&mut g, &dev, true);
    t.lap("found by the locator, formatted and written");

    // Detached: gone from the guest.
    rt.block_on(vs.detach(&vm, &vol));
    assert_eq!(rt.block_on(b.settled()).unwrap(), vec![]);
    wait_gone(&mut g, &dev);
    t.lap("detached and gone from the guest");

    // Attached again at unit 4 of a new controller on bus 1: the bridge
    // hot-adds the controller, and the locator finds the disk there.
    rt.block_on(vs.client.reconfigure_vm(
        &vm,
        &[
            DeviceChange::AddPvscsiController {
                temp_key: -10,
                bus_number: 1,
            },
            DeviceChange::AttachDisk {
                temp_key: -11,
                controller_key: -10,
                unit_number: 4,
                file: vol.clone(),
                disk_mode: DiskMode::IndependentPersistent,
                profile: None,
            },
        ],
        &[],
    ))
    .unwrap();
    let mirrored = rt.block_on(b.settled()).unwrap();
    assert_eq!(mirrored.len(), 1, "{mirrored:?}");
    assert_eq!((mirrored[0].bus, mirrored[0].unit), (1, 4));
    let dev = locate(&mut g, &scsi(1, 4, &disk_uuid)).unwrap();
    let (_, sdev) = sysfs_of(&mut g, &dev);
    assert!(
        sdev.contains(&format!("/{}/host", bridge::guest_pci_address(1))) && sdev.ends_with(":0:4:0"),
        "{sdev}"
    );
    assert_eq!(checksum(&mut g, &dev), sum);
    t.lap("attached on a new controller, found, data intact");

    // A disk whose extent is a link out of the datastore: the simulator
    // attaches it, the bridge refuses to hand the outside file to QEMU.
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, vec![b's'; 1 << 20]).unwrap();
    let dir = sim.info.datastores[0].path.join("dockvols/_DEFAULT");
    let text = std::fs::read_to_string(dir.join("vol1.vmdk")).unwrap();
    std::fs::write(dir.join("evil.vmdk"), text.replace("vol1-flat.vmdk", "evil-flat.vmdk")).unwrap();
    std::os::unix::fs::symlink(&secret, dir.join("evil-flat.vmdk")).unwrap();
    let evil = vs.folder.join("evil.vmdk").unwrap();
    rt.block_on(vs.attach(&vm, key0, 5, &evil));
    match rt.block_on(b.settled()) {
        Err(BridgeError::Unmirrored(f)) => {
            assert_eq!(f.len(), 1, "{f:?}");
            assert_eq!(
                (f[0].bus, f[0].unit, f[0].file.as_str()),
                (0, 5, evil.to_string().as_str())
            );
            assert!(f[0].error.contains("outside datastore LocalDS_0"), "{}", f[0].error);
        }
        other => panic!("a link out of the datastore was given to the guest: {other:?}"),
    }
    let (status, out) = g.sh(&format!(
        "ls -d /sys/bus/pci/devices/{}/host*/target*:0:5",
        bridge::guest_pci_address(0)
    ));
    assert_ne!(status, 0, "the guest has a disk at unit 5: {out}");
    rt.block_on(vs.detach(&vm, &evil));
    assert_eq!(rt.block_on(b.settled()).unwrap().len(), 1);
    t.lap("a link out of the datastore refused");

    rt.block_on(b.stop()).unwrap();
    eprintln!(
        "attach test: boot {:.1}s, whole test {:.1}s",
        g.boot_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn after_the_host_dies_the_vm_boots_with_its_disk_and_another_vm_gets_it_once_released() {
    let t0 = Instant::now();
    let mut t = Timer(Instant::now(), "HA test");
    let sim = Simulator::start(&["-vms", "1"]);
    let rt = runtime();
    assert!(sim.info.vms.len() >= 2, "{:?}", sim.info.vms);
    let (uuid_a, uuid_b) = (sim.info.vms[0].uuid.clone(), sim.info.vms[1].uuid.clone());
    let vs = rt.block_on(Vsphere::new(&sim.info));
    let (vm_a, vm_b) = (rt.block_on(vs.vm(&uuid_a)), rt.block_on(vs.vm(&uuid_b)));

    let spec = rt.block_on(boot_spec_for(&sim.info, &uuid_a, base("vm-a"))).unwrap();
    let mut a = Guest::boot(spec.clone()).unwrap();
    let bridge_a = rt.block_on(Bridge::start(&sim.info, &uuid_a, &a, &spec)).unwrap();
    let vol = rt.block_on(vs.create("ha.vmdk", DiskType::Thin, 64));
    let key = rt.block_on(vs.controller_key(&vm_a, 0));
    rt.block_on(vs.attach(&vm_a, key, 2, &vol));
    let disk_uuid = rt.block_on(vs.disk(&vm_a, &vol)).unwrap().uuid.unwrap();
    assert_eq!(rt.block_on(bridge_a.settled()).unwrap().len(), 1);
    let dev = locate(&mut a, &scsi(0, 2, &disk_uuid)).unwrap();
    // Left mounted: the host dies under it.
    let sum = mkfs_and_write(&mut a, &dev, false);
    t.lap("VM A booted, disk attached, formatted and written");

    // The host dies: QEMU is SIGKILLed. In the simulator the VM's
    // configuration still lists the disk.
    let pid = a.pid().unwrap();
    a.kill();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "QEMU {pid} is gone");
    rt.block_on(bridge_a.stop()).unwrap();
    assert!(rt.block_on(vs.disk(&vm_a, &vol)).is_some());

    // HA powers the VM on elsewhere with the disks its configuration lists.
    let spec = rt
        .block_on(boot_spec_for(&sim.info, &uuid_a, base("vm-a-restarted")))
        .unwrap();
    assert_eq!(spec.disks.len(), 1, "{spec:?}");
    assert_eq!(
        (spec.disks[0].controller.as_str(), spec.disks[0].scsi_id),
        ("pvscsi0", 2)
    );
    let mut a2 = Guest::boot(spec.clone()).unwrap();
    assert_eq!(a2.sh_ok("cat /sys/class/dmi/id/product_uuid").trim(), uuid_a);
    let bridge_a2 = rt.block_on(Bridge::start(&sim.info, &uuid_a, &a2, &spec)).unwrap();
    // The bridge takes the boot disk as the simulator's: nothing re-added.
    let mirrored = rt.block_on(bridge_a2.settled()).unwrap();
    assert_eq!(mirrored.len(), 1, "{mirrored:?}");
    assert_eq!(mirrored[0].qemu_id, GuestSpec::disk_id(0));
    assert_eq!(mirrored[0].disk_uuid.as_deref(), Some(disk_uuid.as_str()));
    let dev = locate(&mut a2, &scsi(0, 2, &disk_uuid)).unwrap();
    assert_eq!(checksum(&mut a2, &dev), sum);
    t.lap("VM A restarted with its disk, data intact");

    // A second VM with its own guest. The disk attached to it while VM A
    // still holds it: the simulator takes it (it has no disk locks), QEMU's
    // image lock refuses it, and the bridge says so.
    let spec_b = rt.block_on(boot_spec_for(&sim.info, &uuid_b, base("vm-b"))).unwrap();
    let mut b = Guest::boot(spec_b.clone()).unwrap();
    let bridge_b = rt.block_on(Bridge::start(&sim.info, &uuid_b, &b, &spec_b)).unwrap();
    let key_b = rt.block_on(vs.controller_key(&vm_b, 0));
    rt.block_on(vs.attach(&vm_b, key_b, 1, &vol));
    match rt.block_on(bridge_b.settled()) {
        Err(BridgeError::Unmirrored(f)) => {
            assert_eq!(f.len(), 1, "{f:?}");
            assert_eq!(
                (f[0].bus, f[0].unit, f[0].file.as_str()),
                (0, 1, vol.to_string().as_str())
            );
            assert!(f[0].error.contains("lock"), "{}", f[0].error);
        }
        other => panic!("VM B's guest opened a disk VM A's guest holds: {other:?}"),
    }
    assert_eq!(bridge_b.failures().len(), 1);
    // The refused attachment is undone (as a refused reconfiguration
    // leaves nothing), and the disk released by VM A.
    rt.block_on(vs.detach(&vm_b, &vol));
    assert_eq!(rt.block_on(bridge_b.settled()).unwrap(), vec![]);
    rt.block_on(vs.detach(&vm_a, &vol));
    assert_eq!(rt.block_on(bridge_a2.settled()).unwrap(), vec![]);
    wait_gone(&mut a2, &dev);
    t.lap("VM B booted, the lock conflict reported, VM A released the disk");

    // Now VM B gets it, with the data.
    rt.block_on(vs.attach(&vm_b, key_b, 1, &vol));
    let mirrored = rt.block_on(bridge_b.settled()).unwrap();
    assert_eq!(mirrored.len(), 1, "{mirrored:?}");
    let dev = locate(&mut b, &scsi(0, 1, &disk_uuid)).unwrap();
    assert_eq!(checksum(&mut b, &dev), sum);
    assert_eq!(bridge_b.failures().len(), 1, "no failure since");
    t.lap("VM B attached the released disk, data intact");

    rt.block_on(bridge_a2.stop()).unwrap();
    rt.block_on(bridge_b.stop()).unwrap();
    eprintln!(
        "HA test: boots {:.1}s, {:.1}s and {:.1}s, whole test {:.1}s",
        a.boot_time.as_secs_f64(),
        a2.boot_time.as_secs_f64(),
        b.boot_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
