//! Root-only tests: the plugin on real loop devices, mkfs and mount(2).
//! They fail (never skip) when not run as root; `tests/run.sh` runs as root.

mod support;

use std::io::Write;
use std::os::unix::fs::MetadataExt;

use serde_json::Value;
use support::{err, fake_docker, loops_under, mounts_at, ok, real_plugin, KernelCleanup};
use vmdk_agent::service::Caller;

fn canonical_tmp(p: &support::Plugin) -> std::path::PathBuf {
    std::fs::canonicalize(p.dir.path()).unwrap()
}

#[tokio::test]
async fn ext4_and_xfs_volumes_format_once_mount_and_keep_data() {
    let p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    for (name, opts) in [
        ("ext", r#"{"size":"200mb"}"#),
        ("xfsvol", r#"{"size":"300mb","fstype":"xfs"}"#),
    ] {
        ok(
            &p.app,
            "VolumeDriver.Create",
            &format!(r#"{{"Name":"{name}","Opts":{opts}}}"#),
        )
        .await;
        let v = ok(
            &p.app,
            "VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"m1"}}"#),
        )
        .await;
        let data = std::path::PathBuf::from(v["Mountpoint"].as_str().unwrap());
        let dir = p.mount_root().join(format!("{name}@local"));
        assert_eq!(data, dir.join("data"));
        let m = mounts_at(&dir);
        assert_eq!(m.len(), 1, "{name}: {m:?}");
        assert!(m[0].source.starts_with("/dev/loop"), "{m:?}");
        assert_eq!(m[0].fstype, if name == "ext" { "ext4" } else { "xfs" });
        assert!(!m[0].read_only);
        // The data dir is empty on a fresh volume (no lost+found), so
        // Docker's copy-up works.
        assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);
        std::fs::File::create(data.join("note.txt"))
            .unwrap()
            .write_all(b"persist me")
            .unwrap();
        ok(
            &p.app,
            "VolumeDriver.Unmount",
            &format!(r#"{{"Name":"{name}","ID":"m1"}}"#),
        )
        .await;
        assert!(mounts_at(&dir).is_empty(), "{name} still mounted");
        assert!(loops_under(&canonical_tmp(&p)).is_empty(), "loop device leaked");
        // Mount again: same filesystem (not reformatted), same data.
        ok(
            &p.app,
            "VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"m2"}}"#),
        )
        .await;
        assert_eq!(std::fs::read_to_string(data.join("note.txt")).unwrap(), "persist me");
        ok(
            &p.app,
            "VolumeDriver.Unmount",
            &format!(r#"{{"Name":"{name}","ID":"m2"}}"#),
        )
        .await;
        ok(&p.app, "VolumeDriver.Remove", &format!(r#"{{"Name":"{name}"}}"#)).await;
    }
    assert!(loops_under(&canonical_tmp(&p)).is_empty());
}

#[tokio::test]
async fn a_read_only_volume_refuses_writes_with_erofs() {
    let p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    ok(
        &p.app,
        "VolumeDriver.Create",
        r#"{"Name":"rovol","Opts":{"access":"read-only"}}"#,
    )
    .await;
    let v = ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"rovol","ID":"r"}"#).await;
    let data = std::path::PathBuf::from(v["Mountpoint"].as_str().unwrap());
    assert!(data.is_dir());
    let e = std::fs::File::create(data.join("x")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert!(mounts_at(&p.mount_root().join("rovol@local"))[0].read_only);
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"rovol","ID":"r"}"#).await;
}

#[tokio::test]
async fn thick_volumes_stay_thick_after_mkfs() {
    let p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    ok(
        &p.app,
        "VolumeDriver.Create",
        r#"{"Name":"thick","Opts":{"size":"64mb","diskformat":"zeroedthick"}}"#,
    )
    .await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"thick","ID":"t"}"#).await;
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"thick","ID":"t"}"#).await;
    let flat = p.datastore().join("dockvols/_DEFAULT/thick-flat.vmdk");
    let allocated = std::fs::metadata(&flat).unwrap().blocks() * 512;
    assert!(
        allocated >= 64 << 20,
        "mkfs discarded a thick extent: {allocated} bytes allocated"
    );
}

#[tokio::test]
async fn plugin_restart_with_a_volume_mounted_keeps_it_for_the_running_container() {
    let mut p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"keep"}"#).await;
    let v = ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"keep","ID":"ctr-mount"}"#).await;
    let data = std::path::PathBuf::from(v["Mountpoint"].as_str().unwrap());
    std::fs::write(data.join("f"), "before the crash").unwrap();
    // Docker says one running container uses the volume.
    let docker = fake_docker(&p.docker_socket(), vec![("c1", vec![data.display().to_string()])]).await;
    // "kill -9": the old manager is dropped without unmounting anything.
    p.restart().await;
    let st = p.manager.snapshot();
    let rec = &st.mounts["keep@local"];
    assert!(rec.ids.contains_key("ctr-mount"), "{st:?}");
    assert_eq!(
        mounts_at(&p.mount_root().join("keep@local")).len(),
        1,
        "mounted twice or not at all"
    );
    assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "before the crash");
    let status = ok(&p.app, "VolumeDriver.Get", r#"{"Name":"keep"}"#).await["Volume"]["Status"].clone();
    assert_eq!(status["mounts"], 1);
    assert_eq!(status["attached to VM"], "vm-test");
    // Removing is still refused; the container's Unmount releases it.
    err(&p.app, "VolumeDriver.Remove", r#"{"Name":"keep"}"#).await;
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"keep","ID":"ctr-mount"}"#).await;
    assert!(mounts_at(&p.mount_root().join("keep@local")).is_empty());
    assert!(loops_under(&canonical_tmp(&p)).is_empty());
    docker.abort();
}

#[tokio::test]
async fn recovery_releases_volumes_no_running_container_uses() {
    let mut p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"orphan"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"orphan","ID":"gone"}"#).await;
    // Docker restarted meanwhile; no container uses the volume any more.
    let docker = fake_docker(&p.docker_socket(), vec![]).await;
    p.restart().await;
    assert!(p.manager.snapshot().mounts.is_empty());
    assert!(mounts_at(&p.mount_root().join("orphan@local")).is_empty());
    assert!(loops_under(&canonical_tmp(&p)).is_empty());
    let v: Value = ok(&p.app, "VolumeDriver.Get", r#"{"Name":"orphan"}"#).await;
    assert_eq!(v["Volume"]["Status"]["attached to VM"], "detached");
    ok(&p.app, "VolumeDriver.Remove", r#"{"Name":"orphan"}"#).await;
    docker.abort();
}

#[tokio::test]
async fn recovery_adopts_a_mount_whose_state_was_lost_and_detaches_strays() {
    let mut p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"adopt"}"#).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"stray"}"#).await;
    let v = ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"adopt","ID":"lost-id"}"#).await;
    let source = v["Mountpoint"].as_str().unwrap().to_owned();
    // An attach that crashed before the plugin recorded anything.
    p.svc.attach(&Caller::vm("vm-test").unwrap(), "stray").await.unwrap();
    std::fs::remove_file(p.state_dir().join("mounts.json")).unwrap();
    let docker = fake_docker(&p.docker_socket(), vec![("c9", vec![source])]).await;
    p.restart().await;
    let st = p.manager.snapshot();
    assert_eq!(st.mounts.len(), 1, "{st:?}");
    assert!(st.mounts["adopt@local"].ids.contains_key("recovered:c9"), "{st:?}");
    assert_eq!(
        p.svc.get(&Caller::Admin, "stray").await.unwrap().attached_to,
        None,
        "stray attachment kept"
    );
    // Once the container is gone, the reconcile pass releases the volume.
    docker.abort();
    let _ = std::fs::remove_file(p.docker_socket());
    let docker = fake_docker(&p.docker_socket(), vec![]).await;
    p.manager.reconcile().await;
    assert!(p.manager.snapshot().mounts.is_empty());
    assert!(mounts_at(&p.mount_root().join("adopt@local")).is_empty());
    assert!(loops_under(&canonical_tmp(&p)).is_empty());
    docker.abort();
}

#[tokio::test]
async fn recovery_remounts_a_volume_in_use_whose_mount_vanished() {
    let mut p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"reboot"}"#).await;
    let v = ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"reboot","ID":"rid"}"#).await;
    let data = std::path::PathBuf::from(v["Mountpoint"].as_str().unwrap());
    std::fs::write(data.join("f"), "x").unwrap();
    // The mount and the attachment disappear behind the plugin's back.
    nix::mount::umount(&p.mount_root().join("reboot@local")).unwrap();
    p.svc.detach(&Caller::vm("vm-test").unwrap(), "reboot").await.unwrap();
    let docker = fake_docker(&p.docker_socket(), vec![("c1", vec![data.display().to_string()])]).await;
    p.restart().await;
    assert_eq!(mounts_at(&p.mount_root().join("reboot@local")).len(), 1);
    assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "x");
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"reboot","ID":"rid"}"#).await;
    assert!(loops_under(&canonical_tmp(&p)).is_empty());
    docker.abort();
}

/// Listing bound loop devices must not fail while another process binds
/// and releases devices (the kernel answers ENODEV/ENXIO for a device in
/// teardown). CI once failed an Unmount this way.
#[test]
fn listing_loop_devices_tolerates_devices_coming_and_going() {
    use vmdk_agent::backend::loopdev::{LinuxLoops, LoopDevices};
    let dir = tempfile::tempdir().unwrap();
    let _c = KernelCleanup(std::fs::canonicalize(dir.path()).unwrap());
    let file = std::fs::canonicalize(dir.path()).unwrap().join("churn.img");
    std::fs::File::create(&file).unwrap().set_len(1 << 20).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (file, stop) = (file.clone(), stop.clone());
        std::thread::spawn(move || {
            let loops = LinuxLoops::default();
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
            let id = vmdk_common::store::FileId::of(&f).unwrap();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 50 {
                let dev = loops.attach(&f, &file).unwrap();
                loops.detach(&dev, id).unwrap();
                n += 1;
            }
            n
        })
    };
    let loops = LinuxLoops::default();
    for _ in 0..2000 {
        if let Err(e) = loops.list() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            churn.join().unwrap();
            panic!("list failed while devices churn: {e}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(churn.join().unwrap() >= 50);
    assert!(loops_under(dir.path()).is_empty());
}

/// Containers that start together send concurrent Mounts (dockerd does not
/// serialize them). On the real kernel: twelve Mounts of three fresh
/// volumes at once format each volume once, mount each once, and twelve
/// concurrent Unmounts release everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mounts_format_and_mount_each_volume_once() {
    let p = real_plugin().await;
    let root = canonical_tmp(&p);
    let _c = KernelCleanup(root.clone());
    let vols = ["par0", "par1", "par2"];
    for v in vols {
        ok(
            &p.app,
            "VolumeDriver.Create",
            &format!(r#"{{"Name":"{v}","Opts":{{"size":"64mb"}}}}"#),
        )
        .await;
    }
    let calls: Vec<(String, String)> = vols
        .iter()
        .flat_map(|v| (0..4).map(move |i| (v.to_string(), format!("{v}-id{i}"))))
        .collect();
    let fire = |endpoint: &'static str| {
        let app = p.app.clone();
        let calls = calls.clone();
        async move {
            let tasks: Vec<_> = calls
                .into_iter()
                .map(|(v, id)| {
                    let app = app.clone();
                    tokio::spawn(async move {
                        support::docker_call(&app, endpoint, Some(&format!(r#"{{"Name":"{v}","ID":"{id}"}}"#))).await
                    })
                })
                .collect();
            for t in tasks {
                let (status, body) = t.await.unwrap();
                assert_eq!(status, axum::http::StatusCode::OK, "{endpoint}: {body}");
            }
        }
    };
    fire("VolumeDriver.Mount").await;
    let mut uuids = Vec::new();
    for v in vols {
        let dir = p.mount_root().join(format!("{v}@local"));
        let m = mounts_at(&dir);
        assert_eq!(m.len(), 1, "{v}: {m:?}");
        let flat = root.join(format!("ds/dockvols/_DEFAULT/{v}-flat.vmdk"));
        let bound: Vec<_> = loops_under(&root).into_iter().filter(|(_, b)| *b == flat).collect();
        assert_eq!(bound.len(), 1, "{v}: {bound:?}");
        assert_eq!(bound[0].0.display().to_string(), m[0].source);
        assert_eq!(
            ok(&p.app, "VolumeDriver.Get", &format!(r#"{{"Name":"{v}"}}"#)).await["Volume"]["Status"]["mounts"],
            4
        );
        std::fs::write(dir.join("data/mark"), v).unwrap();
        uuids.push(fs_uuid(&m[0].source));
    }
    fire("VolumeDriver.Unmount").await;
    assert!(loops_under(&root).is_empty(), "{:?}", loops_under(&root));
    for (v, uuid) in vols.iter().zip(uuids) {
        assert!(mounts_at(&p.mount_root().join(format!("{v}@local"))).is_empty());
        // Mounted again: the same filesystem (formatted once), same data.
        let mp = ok(
            &p.app,
            "VolumeDriver.Mount",
            &format!(r#"{{"Name":"{v}","ID":"again"}}"#),
        )
        .await;
        let data = std::path::PathBuf::from(mp["Mountpoint"].as_str().unwrap());
        assert_eq!(std::fs::read_to_string(data.join("mark")).unwrap(), *v);
        let m = mounts_at(&p.mount_root().join(format!("{v}@local")));
        assert_eq!(fs_uuid(&m[0].source), uuid, "{v} was formatted again");
        ok(
            &p.app,
            "VolumeDriver.Unmount",
            &format!(r#"{{"Name":"{v}","ID":"again"}}"#),
        )
        .await;
    }
}

/// The filesystem UUID of a block device, as blkid reports it.
fn fs_uuid(device: &str) -> String {
    let out = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "UUID", device])
        .output()
        .unwrap();
    let uuid = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(!uuid.is_empty(), "no filesystem UUID on {device}");
    uuid
}

/// What a format would change of an extent file: its first 4 MiB (every
/// mkfs writes its superblock and metadata there), its size and its
/// allocated blocks. Equal before and after shows a refused Mount changed
/// nothing.
fn disk_fingerprint(path: &std::path::Path) -> (Vec<u8>, u64, u64) {
    let head = vmdk_plugin::sys::read_head(path, 4 << 20).unwrap();
    let meta = std::fs::metadata(path).unwrap();
    (head, meta.len(), meta.blocks())
}

fn run_tool(program: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// Issue 7, finding 2: zeroing only the primary superblock of a volume
/// with data made the next Mount format it. Now the Mount is refused with
/// the recovery steps, nothing on the disk changes, and following those
/// steps (ext4: `mke2fs -n` for the backups, `e2fsck -b`; xfs:
/// `xfs_repair`) brings the data back.
#[tokio::test]
async fn a_damaged_superblock_is_refused_and_the_data_survives_fsck() {
    let p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    // (volume, create options, where the primary superblock is)
    for (name, opts, superblock) in [
        ("sb", "{}", 1024..2048u64),
        ("sbxfs", r#"{"size":"300mb","fstype":"xfs"}"#, 0..512),
    ] {
        let call = |id: &str| format!(r#"{{"Name":"{name}","ID":"{id}"}}"#);
        ok(
            &p.app,
            "VolumeDriver.Create",
            &format!(r#"{{"Name":"{name}","Opts":{opts}}}"#),
        )
        .await;
        let v = ok(&p.app, "VolumeDriver.Mount", &call("a")).await;
        let data = std::path::PathBuf::from(v["Mountpoint"].as_str().unwrap());
        std::fs::write(data.join("file"), "survives").unwrap();
        ok(&p.app, "VolumeDriver.Unmount", &call("a")).await;
        let flat = p.datastore().join(format!("dockvols/_DEFAULT/{name}-flat.vmdk"));
        let f = std::fs::OpenOptions::new().write(true).open(&flat).unwrap();
        let zeros = vec![0u8; (superblock.end - superblock.start) as usize];
        std::os::unix::fs::FileExt::write_all_at(&f, &zeros, superblock.start).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let before = disk_fingerprint(&flat);

        let e = err(&p.app, "VolumeDriver.Mount", &call("b")).await;
        let fstype = if name == "sb" { "ext4" } else { "xfs" };
        let repair = if name == "sb" {
            "e2fsck -b 32768 DISK"
        } else {
            "xfs_repair DISK"
        };
        for want in [
            &format!("volume {name}@local is recorded as formatted with {fstype} on ")[..],
            "(by VM vm-test), but its disk /dev/loop",
            "shows no filesystem signature",
            "nothing was changed",
            repair,
        ] {
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
        assert!(mounts_at(&p.mount_root().join(format!("{name}@local"))).is_empty());
        assert!(
            loops_under(&canonical_tmp(&p)).is_empty(),
            "the refused Mount left the disk attached"
        );
        assert!(disk_fingerprint(&flat) == before, "the refused Mount changed the disk");

        // The recovery the error describes, on the extent file.
        if name == "sb" {
            let out = run_tool("mke2fs", &["-n".as_ref(), flat.as_os_str()]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let backup: u64 = text
                .split("Superblock backups stored on blocks:")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty()))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no backup superblocks in mke2fs -n output: {text}"));
            let b = backup.to_string();
            let out = run_tool("e2fsck", &["-fy".as_ref(), "-b".as_ref(), b.as_ref(), flat.as_os_str()]);
            assert!(matches!(out.status.code(), Some(0 | 1)), "e2fsck: {out:?}");
        } else {
            let out = run_tool("xfs_repair", &["-f".as_ref(), flat.as_os_str()]);
            assert!(out.status.success(), "xfs_repair: {out:?}");
        }
        let v = ok(&p.app, "VolumeDriver.Mount", &call("c")).await;
        let data = std::path::PathBuf::from(v["Mountpoint"].as_str().unwrap());
        assert_eq!(std::fs::read_to_string(data.join("file")).unwrap(), "survives");
        ok(&p.app, "VolumeDriver.Unmount", &call("c")).await;
    }
    assert!(loops_under(&canonical_tmp(&p)).is_empty());
}

/// A never-formatted volume whose disk carries something only beyond its
/// first MiB is not formatted: a VMFS signature at 1 MiB (which `blkid`
/// finds) and a backup GPT header in the last sector (which `blkid` does
/// not report without its primary) both refuse the Mount and leave the
/// disk as it was, the second as unknown data at the disk's end.
#[tokio::test]
async fn a_never_formatted_disk_with_data_only_beyond_its_first_mib_is_not_formatted() {
    let p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    let size = 64u64 << 20;
    for (name, offset, bytes, want) in [
        ("vmfs", 1u64 << 20, &b"\x0d\xd0\x01\xc0"[..], "mount"),
        (
            "gptend",
            size - 512,
            &b"EFI PART"[..],
            "its last MiB, where backup partition tables (GPT) and RAID and ZFS labels sit, is not blank",
        ),
    ] {
        ok(
            &p.app,
            "VolumeDriver.Create",
            &format!(r#"{{"Name":"{name}","Opts":{{"size":"64mb"}}}}"#),
        )
        .await;
        let flat = p.datastore().join(format!("dockvols/_DEFAULT/{name}-flat.vmdk"));
        let f = std::fs::OpenOptions::new().write(true).open(&flat).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, offset).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let before = (
            disk_fingerprint(&flat),
            vmdk_plugin::sys::read_tail(&flat, 1 << 20).unwrap(),
        );
        let e = err(
            &p.app,
            "VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"a"}}"#),
        )
        .await;
        assert!(e.contains(&format!("volume {name}@local")) && e.contains(want), "{e}");
        assert!(mounts_at(&p.mount_root().join(format!("{name}@local"))).is_empty());
        assert!(
            loops_under(&canonical_tmp(&p)).is_empty(),
            "the refused Mount left the disk attached"
        );
        let after = (
            disk_fingerprint(&flat),
            vmdk_plugin::sys::read_tail(&flat, 1 << 20).unwrap(),
        );
        assert!(after == before, "the refused Mount changed the disk");
        assert_eq!(p.svc.get(&Caller::Admin, name).await.unwrap().formatted, None);
    }
}

/// A thin volume never mounted before is formatted at its first Mount,
/// and that is recorded with the agent before the Mount answers; it is
/// never formatted again.
#[tokio::test]
async fn a_thin_never_mounted_volume_is_formatted_once_and_recorded() {
    let p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    ok(
        &p.app,
        "VolumeDriver.Create",
        r#"{"Name":"thin1","Opts":{"size":"200mb"}}"#,
    )
    .await;
    assert_eq!(p.svc.get(&Caller::Admin, "thin1").await.unwrap().formatted, None);
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"thin1","ID":"a"}"#).await;
    let rec = p
        .svc
        .get(&Caller::Admin, "thin1")
        .await
        .unwrap()
        .formatted
        .expect("first format not recorded");
    assert_eq!((rec.fstype.as_str(), rec.by.as_str()), ("ext4", "vm-test"));
    let dir = p.mount_root().join("thin1@local");
    let uuid = fs_uuid(&mounts_at(&dir)[0].source);
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"thin1","ID":"a"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"thin1","ID":"b"}"#).await;
    assert_eq!(fs_uuid(&mounts_at(&dir)[0].source), uuid, "formatted again");
    assert_eq!(p.svc.get(&Caller::Admin, "thin1").await.unwrap().formatted, Some(rec));
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"thin1","ID":"b"}"#).await;
}

/// Issue 7, finding 4: a volume whose filesystem holds `data -> /etc`
/// made the Mountpoint handed to Docker resolve to the host's /etc. Now
/// the Mount is refused and rolled back.
#[tokio::test]
async fn a_data_symlink_on_the_volume_is_refused_and_rolled_back() {
    let p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"crafted"}"#).await;
    let v = ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"crafted","ID":"a"}"#).await;
    let data = std::path::PathBuf::from(v["Mountpoint"].as_str().unwrap());
    // Craft the filesystem: data is a symlink to a host directory.
    std::fs::remove_dir(&data).unwrap();
    std::os::unix::fs::symlink("/etc", &data).unwrap();
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"crafted","ID":"a"}"#).await;

    let e = err(&p.app, "VolumeDriver.Mount", r#"{"Name":"crafted","ID":"b"}"#).await;
    assert!(
        e.contains(&format!(
            "volume crafted@local: {} cannot be handed to Docker: it is a symbolic link (to \"/etc\")",
            data.display()
        )),
        "{e}"
    );
    assert!(
        mounts_at(&p.mount_root().join("crafted@local")).is_empty(),
        "not unmounted"
    );
    assert!(loops_under(&canonical_tmp(&p)).is_empty(), "not detached");
    assert!(p.manager.snapshot().mounts.is_empty());
    assert_eq!(p.svc.get(&Caller::Admin, "crafted").await.unwrap().attached_to, None);
}

/// Setuid binaries and device nodes on a datastore's disk must not work on
/// this host: volumes are mounted nosuid,nodev, also after the read-write
/// remount that makes a read-only volume's data directory.
#[tokio::test]
async fn volumes_are_mounted_nosuid_and_nodev() {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    for (name, opts) in [("rwflags", "{}"), ("roflags", r#"{"access":"read-only"}"#)] {
        ok(
            &p.app,
            "VolumeDriver.Create",
            &format!(r#"{{"Name":"{name}","Opts":{opts}}}"#),
        )
        .await;
        let v = ok(
            &p.app,
            "VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"a"}}"#),
        )
        .await;
        let flags = statvfs(v["Mountpoint"].as_str().unwrap()).unwrap().flags();
        assert!(
            flags.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV),
            "{name}: {flags:?}"
        );
        assert_eq!(
            flags.contains(FsFlags::ST_RDONLY),
            name == "roflags",
            "{name}: {flags:?}"
        );
        ok(
            &p.app,
            "VolumeDriver.Unmount",
            &format!(r#"{{"Name":"{name}","ID":"a"}}"#),
        )
        .await;
    }
}

/// Issue 7, finding 8, on the real kernel: after an unclean reboot
/// (nothing mounted, no loop device, state listing the volume) with Docker
/// not answering, a Mount returns a path that is mounted, with the data.
#[tokio::test]
async fn after_an_unclean_reboot_a_mount_returns_a_mounted_path_with_the_data() {
    use vmdk_agent::backend::loopdev::{LinuxLoops, LoopDevices};
    let mut p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"boot"}"#).await;
    let v = ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"boot","ID":"before"}"#).await;
    let data = std::path::PathBuf::from(v["Mountpoint"].as_str().unwrap());
    std::fs::write(data.join("f"), "kept").unwrap();
    let dir = p.mount_root().join("boot@local");
    nix::mount::umount(&dir).unwrap();
    for (dev, _) in loops_under(&canonical_tmp(&p)) {
        let loops = LinuxLoops::default();
        let id = loops.backing(&dev).unwrap().expect("bound");
        loops.detach(&dev, id).unwrap();
    }
    assert!(!p.docker_socket().exists());
    p.restart().await;
    let v = ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"boot","ID":"after"}"#).await;
    assert_eq!(v["Mountpoint"], data.display().to_string());
    assert_eq!(mounts_at(&dir).len(), 1, "Mount returned a path that is not mounted");
    assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "kept");
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"boot","ID":"after"}"#).await;
    assert!(mounts_at(&dir).is_empty());
    assert!(loops_under(&canonical_tmp(&p)).is_empty());
}

/// Issue 7, finding 16: a mount adopted at recovery is written to the
/// state file, so `vmdk-plugin status` shows no "mounted but not recorded".
#[tokio::test]
async fn status_shows_no_problem_after_recovery_adopted_a_mount() {
    let mut p = real_plugin().await;
    let _c = KernelCleanup(canonical_tmp(&p));
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"adopted"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"adopted","ID":"a"}"#).await;
    std::fs::remove_file(p.state_dir().join("mounts.json")).unwrap();
    p.restart().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmdk-plugin"))
        .args(["status", "--format", "json", "--socket"])
        .arg(p.dir.path().join("nobody.sock"))
        .arg("--mount-root")
        .arg(p.mount_root())
        .arg("--state-dir")
        .arg(p.state_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["volumes"][0]["volume"], "adopted@local");
    assert_eq!(v["volumes"][0]["mounted"], true);
    let problems: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("the plugin is not running"), "{problems:?}");
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"adopted","ID":"a"}"#).await;
}
