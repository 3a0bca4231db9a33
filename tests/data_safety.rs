//! Data safety against hostile or damaged input (issue 7, the guest
//! plugin's part), on the recording kernel fake: never format what has been
//! formatted, prove a recorded mount before joining it, never release or
//! hand out a path of another volume, private files, and answers while a
//! slow create runs. `privileged.rs` repeats the disk-level cases on real
//! loop devices, mkfs and mount.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::Value;
use support::{err, fake_plugin, ok, proxied_plugin, FakeSys, ProxyAction, ProxyHook, SysCall};
use vmdk_agent::service::Caller;
use vmdk_plugin::sys::System;

/// Liveness bound for answers that must not wait for anything slow.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

fn extent(p: &support::Plugin, vol: &str) -> PathBuf {
    p.datastore().join(format!("dockvols/_DEFAULT/{vol}-flat.vmdk"))
}

/// The blank-check reads, as (which end, length).
fn reads(sys: &FakeSys) -> Vec<(&'static str, usize)> {
    sys.calls()
        .iter()
        .filter_map(|c| match c {
            SysCall::ReadHead { len, .. } => Some(("head", *len)),
            SysCall::ReadTail { len, .. } => Some(("tail", *len)),
            _ => None,
        })
        .collect()
}

fn mkfs_count(sys: &FakeSys) -> usize {
    sys.count(|c| matches!(c, SysCall::Mkfs { .. }))
}

/// Whether the fake kernel has something mounted at `dir`.
fn mounted(sys: &FakeSys, dir: &Path) -> bool {
    sys.mounts().unwrap().iter().any(|m| m.target == dir)
}

// ----- finding 2: never format what has been formatted --------------------

#[tokio::test]
async fn the_first_mount_formats_once_and_records_it_before_answering() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"fresh"}"#).await;
    let st = ok(&p.app, "VolumeDriver.Get", r#"{"Name":"fresh"}"#).await["Volume"]["Status"].clone();
    assert_eq!(st["formatted"], "not yet (formatted at the first mount)");
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"fresh","ID":"a"}"#).await;
    let rec = p
        .svc
        .get(&Caller::Admin, "fresh")
        .await
        .unwrap()
        .formatted
        .expect("format not recorded");
    assert_eq!((rec.fstype.as_str(), rec.by.as_str()), ("ext4", "vm-test"));
    // The agent bound a disk whose extent held no data (a thin volume never
    // written): it reads all zeros, so nothing was read to prove it.
    assert_eq!(reads(&sys), []);
    let st = ok(&p.app, "VolumeDriver.Get", r#"{"Name":"fresh"}"#).await["Volume"]["Status"].clone();
    assert!(st["formatted"].as_str().unwrap().starts_with("ext4 on "), "{st}");
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"fresh","ID":"a"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"fresh","ID":"b"}"#).await;
    assert_eq!(mkfs_count(&sys), 1);
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"fresh","ID":"b"}"#).await;
}

#[tokio::test]
async fn a_formatted_volume_whose_signature_is_gone_is_refused_never_formatted() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"used"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"used","ID":"a"}"#).await;
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"used","ID":"a"}"#).await;
    // The superblock is damaged: the disk shows no signature any more.
    sys.filesystems.lock().unwrap().clear();
    let e = err(&p.app, "VolumeDriver.Mount", r#"{"Name":"used","ID":"b"}"#).await;
    for want in [
        "volume used@local is recorded as formatted with ext4 on ",
        "(by VM vm-test)",
        "its disk /dev/fakeloop",
        "shows no filesystem signature",
        "nothing was changed",
        "e2fsck -b 32768 DISK",
        "mke2fs -n DISK",
        "<datastore>/dockvols/_DEFAULT/used-flat.vmdk",
    ] {
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }
    assert_eq!(mkfs_count(&sys), 1, "formatted again");
    assert!(
        p.loops.list().unwrap().is_empty(),
        "the refused Mount left the disk attached"
    );
    assert!(p.manager.snapshot().mounts.is_empty());
    assert!(!p.mount_root().join("used@local").exists());
}

#[tokio::test]
async fn a_never_formatted_disk_that_holds_data_is_not_formatted() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"odd"}"#).await;
    // Data without a signature (another tool's disk, a damaged volume of an
    // older version that recorded nothing).
    let f = std::fs::OpenOptions::new().write(true).open(extent(&p, "odd")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"precious", 70_000).unwrap();
    let before = std::fs::read(extent(&p, "odd")).unwrap();
    let e = err(&p.app, "VolumeDriver.Mount", r#"{"Name":"odd","ID":"a"}"#).await;
    for want in [
        "volume odd@local: its disk /dev/fakeloop",
        "holds data but no filesystem signature (the first non-zero byte is at offset 70000)",
        "vmdk will not format over unknown data",
        "nothing was changed",
    ] {
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }
    assert_eq!(mkfs_count(&sys), 0);
    assert_eq!(std::fs::read(extent(&p, "odd")).unwrap(), before);
    assert!(p.loops.list().unwrap().is_empty());
    assert_eq!(p.svc.get(&Caller::Admin, "odd").await.unwrap().formatted, None);
}

/// Backup GPT headers, md RAID 1.0 superblocks and ZFS labels sit at the
/// end of a disk, beyond the first MiB the blank check reads first.
#[tokio::test]
async fn a_never_formatted_disk_with_data_only_near_its_end_is_not_formatted() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(
        &p.app,
        "VolumeDriver.Create",
        r#"{"Name":"tail","Opts":{"size":"100mb"}}"#,
    )
    .await;
    let size = 100u64 << 20;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(extent(&p, "tail"))
        .unwrap();
    // Where a backup GPT header sits: the last sector.
    std::os::unix::fs::FileExt::write_all_at(&f, b"EFI PART", size - 512).unwrap();
    let before = std::fs::read(extent(&p, "tail")).unwrap();
    let r = p.app.clone();
    let _ = &r;
    let e = err(&p.app, "VolumeDriver.Mount", r#"{"Name":"tail","ID":"a"}"#).await;
    for want in [
        "volume tail@local: its disk /dev/fakeloop",
        "its last MiB, where backup partition tables (GPT) and RAID and ZFS labels sit, is not blank",
        &format!("(a non-zero byte at offset {} of {size} bytes)", size - 512)[..],
        "vmdk will not format over unknown data",
        "nothing was changed",
    ] {
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }
    assert_eq!(reads(&sys), [("head", 1 << 20), ("tail", 1 << 20)]);
    assert_eq!(mkfs_count(&sys), 0);
    assert_eq!(std::fs::read(extent(&p, "tail")).unwrap(), before);
    assert!(p.loops.list().unwrap().is_empty());
    assert_eq!(p.svc.get(&Caller::Admin, "tail").await.unwrap().formatted, None);
}

#[tokio::test]
async fn a_filesystem_found_on_an_unrecorded_disk_is_adopted_and_recorded() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(
        &p.app,
        "VolumeDriver.Create",
        r#"{"Name":"old","Opts":{"fstype":"xfs","size":"1gb"}}"#,
    )
    .await;
    // Formatted by a version that kept no record: its superblock is on
    // the disk.
    sys.filesystems.lock().unwrap().insert(extent(&p, "old"), "xfs".into());
    let f = std::fs::OpenOptions::new().write(true).open(extent(&p, "old")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"XFSB", 0).unwrap();
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"old","ID":"a"}"#).await;
    assert_eq!(mkfs_count(&sys), 0);
    let rec = p
        .svc
        .get(&Caller::Admin, "old")
        .await
        .unwrap()
        .formatted
        .expect("not adopted");
    assert_eq!(rec.fstype, "xfs");
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"old","ID":"a"}"#).await;
}

#[tokio::test]
async fn a_mount_whose_format_cannot_be_recorded_fails_and_rolls_back() {
    let hook: ProxyHook = Arc::new(|m: &Method, path: &str| {
        if m == Method::POST && path.ends_with("/formatted") {
            ProxyAction::Fail(StatusCode::INTERNAL_SERVER_ERROR, "io", "datastore is read-only")
        } else {
            ProxyAction::Pass
        }
    });
    let (p, sys, _server) = proxied_plugin(hook).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"unsure"}"#).await;
    let e = err(&p.app, "VolumeDriver.Mount", r#"{"Name":"unsure","ID":"a"}"#).await;
    assert!(
        e.contains("volume unsure@local: cannot record that its disk holds ext4; the Mount was rolled back")
            && e.contains("datastore is read-only"),
        "{e}"
    );
    assert_eq!(
        sys.count(|c| matches!(c, SysCall::Mount { .. })),
        0,
        "mounted before recording"
    );
    assert!(p.loops.list().unwrap().is_empty());
    assert!(p.manager.snapshot().mounts.is_empty());
}

// ----- finding 4: the Mountpoint is on the volume -------------------------

#[tokio::test]
async fn a_mount_that_joins_refuses_a_data_symlink_and_keeps_the_mount() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"link"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"link","ID":"a"}"#).await;
    let data = p.mount_root().join("link@local/data");
    std::fs::remove_dir(&data).unwrap();
    std::os::unix::fs::symlink("/etc", &data).unwrap();
    let e = err(&p.app, "VolumeDriver.Mount", r#"{"Name":"link","ID":"b"}"#).await;
    assert!(
        e.contains(&format!(
            "{} cannot be handed to Docker: it is a symbolic link (to \"/etc\")",
            data.display()
        )),
        "{e}"
    );
    // The holder of the first mount keeps it.
    assert_eq!(p.manager.snapshot().mounts["link@local"].ids.len(), 1);
    assert_eq!(sys.count(|c| matches!(c, SysCall::Unmount { .. })), 0);
}

// ----- finding 5: private by default --------------------------------------

#[tokio::test]
async fn mount_root_state_dir_and_state_file_are_private() {
    let sys = Arc::new(FakeSys::default());
    let mut p = fake_plugin(sys.clone()).await;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&p.mount_root()), 0o700);
    assert_eq!(mode(&p.state_dir()), 0o700);
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"priv"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"priv","ID":"a"}"#).await;
    assert_eq!(mode(&p.state_dir().join("mounts.json")), 0o600);
    // Looser modes left by an older version are tightened at start.
    for d in [p.mount_root(), p.state_dir()] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        p.state_dir().join("mounts.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    p.restart().await;
    assert_eq!(mode(&p.mount_root()), 0o700);
    assert_eq!(mode(&p.state_dir()), 0o700);
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"priv","ID":"a"}"#).await;
    assert_eq!(mode(&p.state_dir().join("mounts.json")), 0o600);
}

// ----- finding 8: mount state is proved, not assumed ----------------------

/// The VM rebooted: nothing is mounted, no loop device is bound, the state
/// file still lists the volume, and Docker does not answer yet when the
/// plugin starts. The next Mount must return a mounted path.
#[tokio::test]
async fn after_an_unclean_reboot_without_docker_a_mount_really_mounts() {
    let sys = Arc::new(FakeSys::default());
    let mut p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"boot"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"boot","ID":"before"}"#).await;
    let dir = p.mount_root().join("boot@local");
    // The reboot.
    sys.mounted.lock().unwrap().clear();
    for (dev, _) in p.loops.list().unwrap() {
        let id = p.loops.backing(&dev).unwrap().expect("bound");
        p.loops.detach(&dev, id).unwrap();
    }
    assert!(!p.docker_socket().exists());
    p.restart().await;
    assert!(
        p.manager.snapshot().mounts.is_empty(),
        "a record that mountinfo contradicts was kept"
    );
    let v = ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"boot","ID":"after"}"#).await;
    assert_eq!(v["Mountpoint"], dir.join("data").display().to_string());
    assert!(mounted(&sys, &dir), "Mount returned a path that is not mounted");
    assert!(dir.join("data").is_dir());
    assert_eq!(mkfs_count(&sys), 1);
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"boot","ID":"after"}"#).await;
    assert!(p.loops.list().unwrap().is_empty());
}

/// The plugin was SIGKILLed in an Unmount after the unmount and detach but
/// before it saved the state: the record says mounted, nothing is.
#[tokio::test]
async fn a_record_whose_mount_is_gone_is_mounted_again_not_joined() {
    let sys = Arc::new(FakeSys::default());
    let mut p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"half"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"half","ID":"c1"}"#).await;
    let dir = p.mount_root().join("half@local");
    let unmount_half = async |p: &support::Plugin| {
        sys.unmount(&dir).unwrap();
        p.svc.detach(&Caller::vm("vm-test").unwrap(), "half").await.unwrap();
    };
    // Without a restart: a Mount that would join proves the record first.
    unmount_half(&p).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"half","ID":"c2"}"#).await;
    assert!(mounted(&sys, &dir), "joined a record whose mount is gone");
    let rec = &p.manager.snapshot().mounts["half@local"];
    assert_eq!(
        rec.ids.keys().collect::<Vec<_>>(),
        ["c1", "c2"],
        "the record's IDs were not kept"
    );
    assert_eq!(
        p.svc.get(&Caller::Admin, "half").await.unwrap().attached_to.as_deref(),
        Some("vm-test")
    );
    // With a restart, Docker not answering.
    unmount_half(&p).await;
    p.restart().await;
    let v = ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"half","ID":"c3"}"#).await;
    assert_eq!(v["Mountpoint"], dir.join("data").display().to_string());
    assert!(mounted(&sys, &dir));
    assert_eq!(mkfs_count(&sys), 1);
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"half","ID":"c3"}"#).await;
    assert!(p.loops.list().unwrap().is_empty());
    assert!(!mounted(&sys, &dir));
}

// ----- finding 14: Unmount names its volume -------------------------------

#[tokio::test]
async fn unmount_of_a_volume_that_is_not_mounted_never_releases_another() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    for v in ["v", "w"] {
        ok(&p.app, "VolumeDriver.Create", &format!(r#"{{"Name":"{v}"}}"#)).await;
    }
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"v","ID":"shared-id"}"#).await;
    // w exists but is not mounted; ghost does not exist at all.
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"w","ID":"shared-id"}"#).await;
    ok(
        &p.app,
        "VolumeDriver.Unmount",
        r#"{"Name":"ghost@local","ID":"shared-id"}"#,
    )
    .await;
    assert_eq!(sys.count(|c| matches!(c, SysCall::Unmount { .. })), 0, "v was released");
    assert!(p.manager.snapshot().mounts["v@local"].ids.contains_key("shared-id"));
    assert!(mounted(&sys, &p.mount_root().join("v@local")));
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"v","ID":"shared-id"}"#).await;
    assert_eq!(sys.count(|c| matches!(c, SysCall::Unmount { .. })), 1);
}

// ----- finding 16: adopted mounts are saved -------------------------------

#[tokio::test]
async fn mounts_adopted_at_recovery_are_saved_and_status_agrees() {
    let sys = Arc::new(FakeSys::default());
    let mut p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"kept"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"kept","ID":"a"}"#).await;
    std::fs::remove_file(p.state_dir().join("mounts.json")).unwrap();
    p.restart().await;
    let saved: Value = serde_json::from_slice(&std::fs::read(p.state_dir().join("mounts.json")).unwrap()).unwrap();
    assert!(saved["mounts"]["kept@local"].is_object(), "{saved}");
    let r = vmdk_plugin::status::report(
        &p.dir.path().join("p.sock"),
        true,
        &p.mount_root(),
        &p.state_dir(),
        &sys.mounts().unwrap(),
    );
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.volumes.len(), 1);
    assert!(r.volumes[0].mounted);
}

// ----- finding 17: names become paths only when valid ---------------------

#[tokio::test]
async fn path_and_every_endpoint_validate_the_name_and_stay_below_the_mount_root() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    for name in [
        "/etc/cron.d/x@local",
        "../../etc@local",
        "x@..",
        "..",
        "a/b",
        "x@a/b",
        "x\u{0}y",
    ] {
        let body = serde_json::json!({"Name": name, "ID": "i"}).to_string();
        let e = err(&p.app, "VolumeDriver.Path", &body).await;
        assert!(
            e.contains("illegal characters") || e.contains("reserved") || e.contains("Invalid datastore name"),
            "{name:?}: {e}"
        );
        for ep in [
            "VolumeDriver.Mount",
            "VolumeDriver.Unmount",
            "VolumeDriver.Remove",
            "VolumeDriver.Create",
        ] {
            err(&p.app, ep, &body).await;
        }
        let v = ok(&p.app, "VolumeDriver.Get", &body).await;
        assert_eq!(v["Volume"], Value::Null, "{name:?}");
    }
    let v = ok(&p.app, "VolumeDriver.Path", r#"{"Name":"fine"}"#).await;
    assert_eq!(
        v["Mountpoint"],
        p.mount_root().join("fine@local/data").display().to_string()
    );
    assert!(sys.calls().is_empty(), "{:?}", sys.calls());
}

#[tokio::test]
async fn names_from_the_agent_are_validated_before_they_become_paths() {
    // A hostile (or broken) remote agent answers with another name.
    let hook: ProxyHook = Arc::new(|m: &Method, _path: &str| {
        if m == Method::GET {
            ProxyAction::Rewrite {
                from: r#""name":"evil@local""#.into(),
                to: r#""name":"../../etc@local""#.into(),
            }
        } else {
            ProxyAction::Pass
        }
    });
    let (p, sys, _server) = proxied_plugin(hook).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"evil"}"#).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"good"}"#).await;
    let e = err(&p.app, "VolumeDriver.Get", r#"{"Name":"evil"}"#).await;
    assert!(
        e.contains(r#"the agent answered for volume "../../etc@local" when asked about "evil""#),
        "{e}"
    );
    let e = err(&p.app, "VolumeDriver.Mount", r#"{"Name":"evil","ID":"a"}"#).await;
    assert!(e.contains("the agent answered for volume"), "{e}");
    let v = ok(&p.app, "VolumeDriver.List", "{}").await;
    let names: Vec<&str> = v["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["good"], "an invalid name from the agent was listed");
    assert!(sys.calls().is_empty(), "{:?}", sys.calls());
}

#[tokio::test]
async fn an_option_given_twice_is_refused_by_plugin_and_agent() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys).await;
    let e = err(
        &p.app,
        "VolumeDriver.Create",
        r#"{"Name":"dup","Opts":{"size":"1gb","size":"1tb"}}"#,
    )
    .await;
    assert!(
        e.contains(r#"option "size" is given more than once; give each option once"#),
        "{e}"
    );
    assert_eq!(
        ok(&p.app, "VolumeDriver.Get", r#"{"Name":"dup"}"#).await["Volume"],
        Value::Null
    );

    // The agent's own API refuses it too (a guest is not trusted).
    let sock = p.dir.path().join("agent.sock");
    let _server = support::agent_proxy(p.svc.clone(), &sock, Arc::new(|_: &Method, _: &str| ProxyAction::Pass)).await;
    let body = r#"{"name":"dup","opts":{"access":"read-only","access":"read-write"}}"#;
    let (status, resp) = vmdk_plugin::http1::request(
        &vmdk_plugin::http1::Endpoint::Unix(sock),
        Method::POST,
        "/v1/volumes",
        &[("VM-Id", "vm-test")],
        Some(body.as_bytes().to_vec()),
        ANSWER_WITHIN,
    )
    .await
    .unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
    assert!(resp.contains(r#"option \"access\" is given more than once"#), "{resp}");
    assert!(p.svc.get(&Caller::Admin, "dup").await.is_err());
}

// ----- finding 18: reads do not wait behind writes; status and pipes ------

/// A create that takes long (an eagerzeroedthick disk of many GB) holds no
/// lock a Get, List or Path of the same name waits for. The slowness is
/// stood in for by holding the create at the agent until the reads have
/// answered (the disk itself is small).
#[tokio::test]
async fn get_list_and_path_answer_while_a_slow_create_of_the_same_name_runs() {
    let arrived = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let hook: ProxyHook = {
        let (arrived, release) = (arrived.clone(), release.clone());
        Arc::new(move |m: &Method, path: &str| {
            if m == Method::POST && path == "/v1/volumes" {
                ProxyAction::Hold {
                    arrived: arrived.clone(),
                    release: release.clone(),
                }
            } else {
                ProxyAction::Pass
            }
        })
    };
    let (p, _sys, _server) = proxied_plugin(hook).await;
    let create = {
        let app = p.app.clone();
        tokio::spawn(async move {
            support::docker_call(
                &app,
                "VolumeDriver.Create",
                Some(r#"{"Name":"big","Opts":{"size":"8mb","diskformat":"eagerzeroedthick"}}"#),
            )
            .await
        })
    };
    tokio::time::timeout(ANSWER_WITHIN, arrived.notified())
        .await
        .expect("the create never reached the agent");
    let read = async |ep: &str, body: &str| {
        tokio::time::timeout(ANSWER_WITHIN, ok(&p.app, ep, body))
            .await
            .unwrap_or_else(|_| panic!("{ep} waited behind the create"))
    };
    assert_eq!(
        read("VolumeDriver.Get", r#"{"Name":"big"}"#).await["Volume"],
        Value::Null
    );
    assert_eq!(read("VolumeDriver.List", "{}").await["Volumes"], serde_json::json!([]));
    assert_eq!(
        read("VolumeDriver.Path", r#"{"Name":"big"}"#).await["Mountpoint"],
        p.mount_root().join("big@local/data").display().to_string()
    );
    assert!(!create.is_finished());
    release.notify_one();
    let (status, v) = tokio::time::timeout(ANSWER_WITHIN, create).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        ok(&p.app, "VolumeDriver.Get", r#"{"Name":"big"}"#).await["Volume"]["Name"],
        "big"
    );
}

/// `vmdk-plugin status | head -1`: a reader that goes away is not an error
/// (exit 0, nothing on stderr), never a panic.
#[test]
fn status_into_a_closed_pipe_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    for format in ["json", "table"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmdk-plugin"))
            .args(["status", "--format", format, "--socket"])
            .arg(dir.path().join("nobody.sock"))
            .arg("--mount-root")
            .arg(dir.path().join("mnt"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader closes before reading anything: every write fails
        // with EPIPE.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{format}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{format}: {stderr}");
    }
}
