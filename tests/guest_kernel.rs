//! The guest's SCSI device locator (`vmdk_plugin::locate::ScsiLocator`)
//! in a real Linux kernel: Debian 12's cloud kernel under QEMU (TCG) with
//! VMware's PVSCSI driver (`vmw_pvscsi`), disks hot-added and removed over
//! QMP as vSphere's reconfigure does, and a VM restarted by "HA" after its
//! host died. The locator runs in the guest as `examples/locate.rs`.
//!
//! Root: `tests/guest/build.sh` installs qemu-system-x86 and friends and
//! builds the guest image (see `tests/support/guest.rs`). The example is
//! built by `tests/run.sh` (`cargo build --example locate`) before the
//! tests run.
#[path = "support/guest.rs"]
mod guest;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest::{Controller, DiskSpec, Guest, GuestSpec};
use vmdk_protocol::DiskLocation;

/// The locator example (`target/debug/examples/locate`). `cargo test`
/// builds examples only in test mode, so `tests/run.sh` builds it first
/// with `cargo build --example locate`; here it must exist and be newer
/// than the sources it is made of.
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

fn spec(name: &str, uuid: &str, controllers: Vec<Controller>) -> GuestSpec {
    GuestSpec {
        name: name.into(),
        uuid: uuid.into(),
        controllers,
        programs: vec![locate_program()],
        ..Default::default()
    }
}

/// A sparse raw disk image.
fn disk_file(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(mib << 20).unwrap();
    p
}

/// The 64-bit WWN QEMU can give a disk with this VMware disk UUID: its
/// first 16 hex digits.
fn qemu_wwn(disk_uuid: &str) -> u64 {
    let hex: String = disk_uuid.chars().filter(|c| *c != '-').collect();
    u64::from_str_radix(&hex[..16], 16).unwrap()
}

fn scsi(pci_address: Option<&str>, unit: u32, disk_uuid: Option<&str>) -> DiskLocation {
    DiskLocation::Scsi {
        controller_bus: 0,
        pci_address: pci_address.map(Into::into),
        unit,
        disk_uuid: disk_uuid.map(Into::into),
    }
}

/// Runs the locator in the guest: the device, or the error text.
fn locate(g: &mut Guest, loc: &DiskLocation, timeout_s: f64) -> Result<String, String> {
    let json = serde_json::to_string(loc).unwrap();
    let (status, out) = g.sh(&format!("locate '{json}' {timeout_s}"));
    match status {
        0 => Ok(out.trim().to_owned()),
        _ => Err(out),
    }
}

/// What the guest's sysfs says about `/dev/<name>`, independently of the
/// locator: `(wwid, SCSI device path)`.
fn sysfs_of(g: &mut Guest, dev: &str) -> (String, String) {
    let name = dev
        .strip_prefix("/dev/")
        .unwrap_or_else(|| panic!("{dev:?} is not under /dev"));
    assert!(name.starts_with("sd"), "{dev}");
    let out = g.sh_ok(&format!(
        "test -b {dev} && cat /sys/block/{name}/device/wwid && readlink -f /sys/block/{name}/device"
    ));
    let mut lines = out.lines();
    (
        lines.next().unwrap_or_default().to_owned(),
        lines.next().unwrap_or_default().to_owned(),
    )
}

/// The SCSI device path of `/dev/<name>` in the guest's sysfs.
fn readlink_ok(g: &mut Guest, dev: &str) -> String {
    let name = &dev["/dev/".len()..];
    g.sh_ok(&format!("test -b {dev} && readlink -f /sys/block/{name}/device"))
        .trim()
        .to_owned()
}

fn sha256_of_data(g: &mut Guest, dev: &str, fstype: &str) -> String {
    let out = g.sh_ok(&format!(
        "mkdir -p /mnt/v && mount -t {fstype} {dev} /mnt/v && sha256sum /mnt/v/data && umount /mnt/v"
    ));
    out.split_whitespace().next().unwrap().to_owned()
}

const CTRL: &str = "0000:00:10.0";

#[test]
fn a_hot_added_disk_is_found_formatted_removed_and_found_again_at_another_unit() {
    let t0 = Instant::now();
    let uuid = "4211c0de-0001-4000-8000-000000000001";
    let disk_uuid = "6000C295-1a2b-3c4d-5e6f-0123456789ab";
    let dir = tempfile::tempdir().unwrap();
    let file = disk_file(dir.path(), "vol1-flat.vmdk", 64);
    let mut g = Guest::boot(spec("hotadd", uuid, vec![Controller::pvscsi("pvscsi0", Some("0x10"))])).unwrap();
    assert_eq!(g.sh_ok("cat /sys/class/dmi/id/product_uuid").trim(), uuid);

    let id = g
        .add_disk(&DiskSpec::new(&file, "pvscsi0", 3).wwn(qemu_wwn(disk_uuid)))
        .unwrap();
    let dev = locate(&mut g, &scsi(Some(CTRL), 3, Some(disk_uuid)), 10.0).unwrap();
    let (wwid, sdev) = sysfs_of(&mut g, &dev);
    assert_eq!(wwid, "naa.6000c2951a2b3c4d");
    assert!(
        sdev.contains("/0000:00:10.0/host") && sdev.ends_with(":0:3:0"),
        "{sdev}"
    );

    let sum = g.sh_ok(&format!(
        "mkfs.ext4 -q -F {dev} && mkdir -p /mnt/v && mount -t ext4 {dev} /mnt/v && \
         dd if=/dev/urandom of=/mnt/v/data bs=64k count=32 2>/dev/null && sha256sum /mnt/v/data && umount /mnt/v"
    ));
    let sum = sum.split_whitespace().next().unwrap().to_owned();

    // Detach: gone from the guest.
    g.remove_disk(&id).unwrap();
    let name = &dev["/dev/".len()..];
    g.sh_ok(&format!(
        "while [ -e /sys/block/{name} ] || [ -e {dev} ]; do sleep 0.05; done"
    ));

    // Waiting for it now times out, naming what it waited for.
    let start = Instant::now();
    let e = locate(&mut g, &scsi(Some(CTRL), 3, Some(disk_uuid)), 1.5).unwrap_err();
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "waited the whole timeout"
    );
    for part in [
        "timed out after 1.5s",
        "unit 3",
        "PCI address 0000:00:10.0",
        "naa.6000c2951a2b3c4d5e6f0123456789ab",
        "naa.6000c2951a2b3c4d)",
        "target0:0:3",
        "rescanned host0",
    ] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }

    // Attached again at another unit: found there, the data intact.
    g.add_disk(&DiskSpec::new(&file, "pvscsi0", 5).wwn(qemu_wwn(disk_uuid)))
        .unwrap();
    let dev2 = locate(&mut g, &scsi(Some(CTRL), 5, Some(disk_uuid)), 10.0).unwrap();
    let (_, sdev) = sysfs_of(&mut g, &dev2);
    assert!(sdev.ends_with(":0:5:0"), "{sdev}");
    assert_eq!(sha256_of_data(&mut g, &dev2, "ext4"), sum);

    // Another disk at the unit the agent names: its WWN contradicts the
    // disk UUID, and it is not used.
    let other = disk_file(dir.path(), "other-flat.vmdk", 16);
    g.add_disk(&DiskSpec::new(&other, "pvscsi0", 3).wwn(0x6000c29000000001))
        .unwrap();
    let e = locate(&mut g, &scsi(Some(CTRL), 3, Some(disk_uuid)), 10.0).unwrap_err();
    assert!(e.contains("reports WWN naa.6000c29000000001, which contradicts"), "{e}");
    assert!(e.contains("is not used"), "{e}");
    eprintln!(
        "hot-add test: boot {:.1}s, whole test {:.1}s",
        g.boot_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn a_disk_on_a_controller_without_hotplug_messages_is_found_by_rescan_and_by_wwn_alone() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let silent = Controller {
        use_msg: false,
        ..Controller::pvscsi("pvscsi1", Some("0x11"))
    };
    let mut g = Guest::boot(spec(
        "rescan",
        "4211c0de-0002-4000-8000-000000000002",
        vec![Controller::pvscsi("pvscsi0", Some("0x10")), silent],
    ))
    .unwrap();
    let (a, b, c, d, e) = (
        "6000C29a-0000-0000-0000-00000000000a",
        "6000C29b-0000-0000-0000-00000000000b",
        "6000C29c-0000-0000-0000-00000000000c",
        "6000C29d-0000-0000-0000-00000000000d",
        "6000C29e-0000-0000-0000-00000000000e",
    );
    // One disk on each controller. Once the announced one is in the
    // guest, the silent controller's has still not been seen.
    g.add_disk(&DiskSpec::new(disk_file(dir.path(), "a", 16), "pvscsi1", 2).wwn(qemu_wwn(a)))
        .unwrap();
    g.add_disk(&DiskSpec::new(disk_file(dir.path(), "b", 16), "pvscsi0", 0).wwn(qemu_wwn(b)))
        .unwrap();
    g.sh_ok("until ls /sys/bus/pci/devices/0000:00:10.0/host*/target*:0:0/*:0:0:0/block >/dev/null 2>&1; do sleep 0.05; done");
    let (status, out) = g.sh("ls -d /sys/bus/pci/devices/0000:00:11.0/host*/target*:0:2");
    assert_ne!(
        status, 0,
        "the silent controller's disk appeared without a rescan: {out}"
    );

    // The locator rescans and finds it.
    let dev = locate(&mut g, &scsi(Some("0000:00:11.0"), 2, Some(a)), 10.0).unwrap();
    let (wwid, sdev) = sysfs_of(&mut g, &dev);
    assert_eq!(wwid, "naa.6000c29a00000000");
    assert!(
        sdev.contains("/0000:00:11.0/host") && sdev.ends_with(":0:2:0"),
        "{sdev}"
    );

    // Without the PCI address: found by WWN among all disks, after a
    // rescan of every PVSCSI host.
    g.add_disk(&DiskSpec::new(disk_file(dir.path(), "c", 16), "pvscsi1", 4).wwn(qemu_wwn(c)))
        .unwrap();
    let dev = locate(&mut g, &scsi(None, 4, Some(c)), 10.0).unwrap();
    let (wwid, sdev) = sysfs_of(&mut g, &dev);
    assert_eq!(wwid, "naa.6000c29c00000000");
    assert!(
        sdev.contains("/0000:00:11.0/host") && sdev.ends_with(":0:4:0"),
        "{sdev}"
    );

    // A disk reporting no WWN (reading its `wwid` fails with ENXIO) is
    // taken on its address, and does not disturb a search by WWN.
    g.add_disk(&DiskSpec::new(disk_file(dir.path(), "e", 16), "pvscsi0", 6))
        .unwrap();
    let dev = locate(&mut g, &scsi(Some(CTRL), 6, Some(e)), 10.0).unwrap();
    let (status, out) = g.sh(&format!("cat /sys/block/{}/device/wwid", &dev["/dev/".len()..]));
    assert_ne!(status, 0, "{dev} reports a WWN: {out}");
    assert!(readlink_ok(&mut g, &dev).ends_with(":0:6:0"));
    assert!(locate(&mut g, &scsi(None, 4, Some(c)), 10.0).is_ok());

    // A controller hot-added (as vSphere adds one when all are full),
    // with a disk on it at once: the locator waits for the controller.
    g.add_controller(&Controller::pvscsi("pvscsi2", Some("0x12"))).unwrap();
    g.add_disk(&DiskSpec::new(disk_file(dir.path(), "d", 16), "pvscsi2", 1).wwn(qemu_wwn(d)))
        .unwrap();
    let dev = locate(&mut g, &scsi(Some("0000:00:12.0"), 1, Some(d)), 10.0).unwrap();
    let (wwid, sdev) = sysfs_of(&mut g, &dev);
    assert_eq!(wwid, "naa.6000c29d00000000");
    assert!(
        sdev.contains("/0000:00:12.0/host") && sdev.ends_with(":0:1:0"),
        "{sdev}"
    );
    eprintln!(
        "rescan test: boot {:.1}s, whole test {:.1}s",
        g.boot_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn after_the_host_dies_the_vm_boots_elsewhere_with_its_disk_and_finds_the_data() {
    let t0 = Instant::now();
    let uuid = "4211c0de-0003-4000-8000-000000000003";
    let disk_uuid = "6000C29e-9f8e-7d6c-5b4a-39281706f5e4";
    let dir = tempfile::tempdir().unwrap();
    // xfs wants 300 MB at least.
    let file = disk_file(dir.path(), "ha-flat.vmdk", 320);
    let ctrl = || vec![Controller::pvscsi("pvscsi0", Some("0x10"))];
    let mut a = Guest::boot(spec("ha-first", uuid, ctrl())).unwrap();
    let disk = DiskSpec::new(&file, "pvscsi0", 0).wwn(qemu_wwn(disk_uuid));
    a.add_disk(&disk).unwrap();
    let dev = locate(&mut a, &scsi(Some(CTRL), 0, Some(disk_uuid)), 10.0).unwrap();
    let sum = a.sh_ok(&format!(
        "mkfs.xfs -q -f {dev} && mkdir -p /mnt/v && mount -t xfs {dev} /mnt/v && \
         dd if=/dev/urandom of=/mnt/v/data bs=64k count=32 2>/dev/null && sync && sha256sum /mnt/v/data"
    ));
    let sum = sum.split_whitespace().next().unwrap().to_owned();

    // While the first VM runs, its disk is locked (as VMware locks it).
    let mut second = spec("ha-second", uuid, ctrl());
    second.disks = vec![disk.clone()];
    let e = Guest::boot(second.clone()).unwrap_err().to_string();
    assert!(e.contains("lock"), "{e}");

    // The host dies with the volume mounted.
    let pid = a.pid().unwrap();
    a.kill();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "QEMU {pid} is gone");

    // HA boots the VM again with the disks its configuration lists.
    let mut b = Guest::boot(second).unwrap();
    assert_eq!(b.sh_ok("cat /sys/class/dmi/id/product_uuid").trim(), uuid);
    let dev = locate(&mut b, &scsi(Some(CTRL), 0, Some(disk_uuid)), 10.0).unwrap();
    assert_eq!(sha256_of_data(&mut b, &dev, "xfs"), sum);
    eprintln!(
        "HA test: boots {:.1}s and {:.1}s, whole test {:.1}s",
        a.boot_time.as_secs_f64(),
        b.boot_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// The `socat`s serving `sock` (QEMU starts one per guest connection).
fn socats_for(sock: &Path) -> Vec<u32> {
    let want = format!("UNIX-CONNECT:{}", sock.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            (args.first()?.ends_with(b"socat") && args.contains(&want.as_bytes())).then_some(pid)
        })
        .collect()
}

#[test]
fn the_guest_reaches_a_host_socket_through_its_forward_and_nothing_is_left_behind() {
    use std::io::{Read, Write};
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("host.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // A tiny HTTP server on the host socket; one thread per connection,
    // since one guest connection is held open below.
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "hello from the host";
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
    let mut g = Guest::boot(GuestSpec {
        name: "forward".into(),
        forwards: vec![("10.0.2.100:7981".into(), sock.clone())],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        g.sh_ok("wget -q -O - http://10.0.2.100:7981/ping"),
        "hello from the host"
    );
    // Nothing else is reachable: not the host through QEMU's gateway.
    let (status, out) = g.sh("wget -q -T 3 -O - http://10.0.2.2:7981/ping");
    assert_ne!(status, 0, "{out}");

    // A connection left open has its socat; killing the guest ends it.
    g.sh_ok("(printf 'GET /held HTTP/1.1\\r\\n'; sleep 600) | nc 10.0.2.100 7981 >/dev/null 2>&1 &");
    let deadline = Instant::now() + Duration::from_secs(30);
    while socats_for(&sock).is_empty() {
        assert!(Instant::now() < deadline, "no socat appeared for the held connection");
        std::thread::sleep(Duration::from_millis(20));
    }
    let qemu = g.pid().unwrap();
    drop(g);
    assert!(!Path::new(&format!("/proc/{qemu}")).exists(), "QEMU {qemu} is gone");
    assert_eq!(socats_for(&sock), Vec::<u32>::new(), "socats left behind");
    eprintln!("forward test: whole test {:.1}s", t0.elapsed().as_secs_f64());
}
