//! A hostile datastore, on the real kernel (root only): for every kind of
//! entry an attacker with write access to a datastore can plant, in place
//! of each of a volume's files, every operation runs, and then:
//!
//! * nothing outside the datastore was read, written or created (inotify
//!   watches the attacker's targets; their content is compared too);
//! * no loop device is bound to, and no filesystem mounted from, a file
//!   outside the datastore;
//! * every error names the volume, and none carries the content or path
//!   of a file outside;
//! * a bystander volume on the same datastore keeps working (get, mount,
//!   write, unmount);
//! * no operation hangs.

mod support;

use std::ffi::CString;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::StatusCode;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::Value;
use support::{docker_call, loops_under, real_plugin, KernelCleanup, Plugin};
use vmdk_agent::service::Caller;

/// What is planted in place of one of the victim's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Garbage,
    Oversized,
    LinkInside,
    LinkOutside,
    Dangling,
    Fifo,
    Device,
    Directory,
}

const KINDS: [Kind; 8] = [
    Kind::Garbage,
    Kind::Oversized,
    Kind::LinkInside,
    Kind::LinkOutside,
    Kind::Dangling,
    Kind::Fifo,
    Kind::Device,
    Kind::Directory,
];

/// The victim's files an attacker can replace or plant (suffixes).
const FILES: [&str; 8] = [
    ".vmdk",
    "-flat.vmdk",
    ".vmfd",
    ".lck",
    ".creating",
    ".removing",
    ".vmdk.tmp",
    ".vmfd.tmp",
];

const SIZE: u64 = 16 << 20;
const SECRET: &str = "TOP-SECRET-LINE-FROM-OUTSIDE";

/// The attacker's side: files outside the datastore, watched.
struct Outside {
    dir: tempfile::TempDir,
    inotify: Inotify,
}

impl Outside {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // A secret the size of a volume (so no size check hides a follow),
        // and one line of text a descriptor read would echo.
        let mut secret = format!("{SECRET}\n").into_bytes();
        secret.resize(SIZE as usize, b'S');
        std::fs::write(dir.path().join("secret"), &secret).unwrap();
        std::fs::create_dir(dir.path().join("subdir")).unwrap();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
        let all = AddWatchFlags::IN_ALL_EVENTS;
        for p in [
            dir.path().to_owned(),
            dir.path().join("secret"),
            dir.path().join("subdir"),
        ] {
            inotify.add_watch(&p, all).unwrap();
        }
        Self { dir, inotify }
    }

    fn secret(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    /// Every event on the attacker's files since the last call.
    fn events(&self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(evs) = self.inotify.read_events() {
            if evs.is_empty() {
                break;
            }
            out.extend(evs.into_iter().map(|e| format!("{:?} {:?}", e.mask, e.name)));
        }
        out
    }

    fn untouched(&self) -> bool {
        let s = std::fs::read(self.secret()).unwrap();
        s.starts_with(SECRET.as_bytes()) && s.len() as u64 == SIZE && self.dir.path().read_dir().unwrap().count() == 2
    }
}

fn plant(dir: &Path, name: &str, kind: Kind, outside: &Outside, inside_twin: &str) {
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    let _ = std::fs::remove_dir_all(&p);
    match kind {
        Kind::Garbage => std::fs::write(&p, b"\x00\xffgarbage{\n[not json or vmdk]\x07").unwrap(),
        Kind::Oversized => {
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(1 << 30).unwrap();
        }
        Kind::LinkInside => symlink(inside_twin, &p).unwrap(),
        Kind::LinkOutside => symlink(outside.secret(), &p).unwrap(),
        Kind::Dangling => symlink(outside.dir.path().join("created-by-root"), &p).unwrap(),
        Kind::Fifo => nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap(),
        Kind::Device => {
            let c = CString::new(p.to_str().unwrap()).unwrap();
            // SAFETY: a valid C string; creates a character device node
            // (1:3, /dev/null's numbers).
            let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
            assert_eq!(rc, 0, "mknod {}", p.display());
        }
        Kind::Directory => {
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("inner"), "x").unwrap();
        }
    }
}

/// Runs an agent call with a deadline; a hang fails the case instead of
/// the whole test run.
async fn within<T>(what: &str, step: &str, f: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .map_err(|_| format!("{what}: {step} hung"))
}

async fn call(p: &Plugin, endpoint: &str, body: &str, what: &str) -> (StatusCode, Value) {
    match tokio::time::timeout(Duration::from_secs(60), docker_call(&p.app, endpoint, Some(body))).await {
        Ok(r) => r,
        Err(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            serde_json::json!({ "Err": format!("{what}: {endpoint} {body} hung for 60 s") }),
        ),
    }
}

/// Runs one case; returns what went wrong (empty: nothing).
async fn case(file: &str, kind: Kind) -> Vec<String> {
    let what = format!("victim{file} as {kind:?}");
    let outside = Outside::new();
    let p = real_plugin().await;
    let _c = KernelCleanup(std::fs::canonicalize(p.dir.path()).unwrap());
    let ds = std::fs::canonicalize(p.datastore()).unwrap();
    let mut problems = Vec::new();
    for v in ["victim", "bystander"] {
        let (s, b) = call(
            &p,
            "VolumeDriver.Create",
            &format!(r#"{{"Name":"{v}","Opts":{{"size":"16mb"}}}}"#),
            &what,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{what}: setup create {v}: {b}");
    }
    let dir = ds.join("dockvols/_DEFAULT");
    plant(
        &dir,
        &format!("victim{file}"),
        kind,
        &outside,
        &format!("bystander{file}"),
    );
    let _ = outside.events();

    let mut errors = Vec::new();
    let mut note = |step: &str, (s, b): (StatusCode, Value)| {
        if s != StatusCode::OK {
            errors.push((step.to_owned(), b["Err"].as_str().unwrap_or_default().to_owned()));
        }
        b
    };
    // Every operation, on the victim.
    match within(&what, "admin ls", p.svc.inventory()).await {
        Ok(Ok(list)) if list.iter().any(|v| v.volume == "bystander") => {}
        Ok(other) => problems.push(format!("admin ls lost the bystander: {other:?}")),
        Err(hung) => {
            problems.push(hung);
            return problems;
        }
    }
    let list = note("list", call(&p, "VolumeDriver.List", "{}", &what).await);
    if !list["Volumes"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v["Name"] == "bystander"))
    {
        problems.push(format!("List lost the bystander: {list}"));
    }
    let get = note("get", call(&p, "VolumeDriver.Get", r#"{"Name":"victim"}"#, &what).await);
    if get.to_string().contains(SECRET) {
        problems.push(format!("Get echoed the outside secret: {get}"));
    }
    note(
        "clone",
        call(
            &p,
            "VolumeDriver.Create",
            r#"{"Name":"copy","Opts":{"clone-from":"victim"}}"#,
            &what,
        )
        .await,
    );
    let (ms, mb) = call(&p, "VolumeDriver.Mount", r#"{"Name":"victim","ID":"m1"}"#, &what).await;
    if ms == StatusCode::OK {
        let mp = PathBuf::from(mb["Mountpoint"].as_str().unwrap());
        if std::fs::write(mp.join("hello"), "x").is_err() {
            problems.push(format!("Mount returned {} but it is not writable", mp.display()));
        }
        note(
            "unmount",
            call(&p, "VolumeDriver.Unmount", r#"{"Name":"victim","ID":"m1"}"#, &what).await,
        );
    } else {
        note("mount", (ms, mb));
    }
    note(
        "remove",
        call(&p, "VolumeDriver.Remove", r#"{"Name":"victim"}"#, &what).await,
    );
    note(
        "create",
        call(
            &p,
            "VolumeDriver.Create",
            r#"{"Name":"victim","Opts":{"size":"16mb"}}"#,
            &what,
        )
        .await,
    );
    if let Err(hung) = within(&what, "agent start-up recovery", p.svc.recover_on_start()).await {
        problems.push(hung);
        return problems;
    }

    // The bystander keeps working.
    let (s, b) = call(&p, "VolumeDriver.Get", r#"{"Name":"bystander"}"#, &what).await;
    if s != StatusCode::OK || b["Volume"]["Status"].get("error").is_some() {
        problems.push(format!("bystander Get: {s} {b}"));
    }
    let (s, b) = call(&p, "VolumeDriver.Mount", r#"{"Name":"bystander","ID":"b1"}"#, &what).await;
    if s == StatusCode::OK {
        let mp = PathBuf::from(b["Mountpoint"].as_str().unwrap());
        if let Err(e) = std::fs::write(mp.join("f"), "bystander data") {
            problems.push(format!("bystander not writable: {e}"));
        }
        let (s, b) = call(&p, "VolumeDriver.Unmount", r#"{"Name":"bystander","ID":"b1"}"#, &what).await;
        if s != StatusCode::OK {
            problems.push(format!("bystander Unmount: {b}"));
        }
    } else {
        problems.push(format!("bystander Mount: {b}"));
    }

    // Nothing outside was touched.
    let events = outside.events();
    if !events.is_empty() {
        problems.push(format!("files outside the datastore were accessed: {events:?}"));
    }
    if !outside.untouched() {
        problems.push("files outside the datastore changed".into());
    }
    for (dev, backing) in support::loops_under(Path::new("/")) {
        if !backing.starts_with(&ds) && backing.starts_with(outside.dir.path()) {
            problems.push(format!("{} is bound to {}", dev.display(), backing.display()));
        }
    }
    let outside_real = std::fs::canonicalize(outside.dir.path()).unwrap();
    for (dev, backing) in loops_under(&outside_real) {
        problems.push(format!(
            "{} is bound to a file outside: {}",
            dev.display(),
            backing.display()
        ));
    }
    for (step, e) in &errors {
        if e.contains(SECRET) || e.contains(outside.dir.path().to_str().unwrap()) {
            problems.push(format!("{step} error leaks the outside: {e}"));
        }
        if !e.contains("victim") && !e.contains("copy") {
            problems.push(format!("{step} error does not name the volume: {e}"));
        }
    }
    problems.into_iter().map(|p| format!("{what}: {p}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_entry_in_place_of_every_volume_file() {
    support::require_root();
    let mut problems = Vec::new();
    for file in FILES {
        for kind in KINDS {
            problems.extend(case(file, kind).await);
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Finding 1: a Mount of a volume whose extent was swapped for a link to a
/// file outside the datastore (after Create, before Mount) binds nothing
/// to that file and formats nothing.
#[tokio::test]
async fn mount_never_binds_or_formats_a_file_outside_the_datastore() {
    let outside = Outside::new();
    let p = real_plugin().await;
    let _c = KernelCleanup(std::fs::canonicalize(p.dir.path()).unwrap());
    support::ok(&p.app, "VolumeDriver.Create", r#"{"Name":"v","Opts":{"size":"16mb"}}"#).await;
    let dir = p.datastore().join("dockvols/_DEFAULT");
    plant(&dir, "v-flat.vmdk", Kind::LinkOutside, &outside, "");
    let _ = outside.events();
    let e = support::err(&p.app, "VolumeDriver.Mount", r#"{"Name":"v","ID":"a"}"#).await;
    assert!(e.contains("v-flat.vmdk is a symbolic link"), "{e}");
    assert!(outside.events().is_empty(), "{:?}", outside.events());
    assert!(outside.untouched());
    let real = std::fs::canonicalize(outside.dir.path()).unwrap();
    assert!(loops_under(&real).is_empty(), "a loop device is bound outside");
}

/// Finding 6, on the real kernel: a detach while the volume's loop device
/// is mounted fails `in_use`, the device stays bound and the volume
/// recorded as attached, and another VM gets no device at all. Once the
/// filesystem is unmounted, the detach releases the device.
#[tokio::test]
async fn a_mounted_loop_device_is_never_detached_or_handed_to_another_vm() {
    let p = real_plugin().await;
    let root = std::fs::canonicalize(p.dir.path()).unwrap();
    let _c = KernelCleanup(root.clone());
    support::ok(&p.app, "VolumeDriver.Create", r#"{"Name":"v","Opts":{"size":"16mb"}}"#).await;
    let att = p.svc.attach(&Caller::vm("vm1").unwrap(), "v").await.unwrap();
    let dev = att.device.unwrap();
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", &dev])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mnt = root.join("vm1-mount");
    std::fs::create_dir(&mnt).unwrap();
    nix::mount::mount(
        Some(dev.as_str()),
        &mnt,
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let e = p.svc.detach(&Caller::vm("vm1").unwrap(), "v").await.unwrap_err();
    assert_eq!(e.code(), vmdk_protocol::ErrorCode::InUse, "{}", e.to_body().message);
    assert_eq!(loops_under(&root).len(), 1, "the device was released under a mount");
    let autoclear = std::fs::read_to_string(format!(
        "/sys/block/{}/loop/autoclear",
        Path::new(&dev).file_name().unwrap().to_str().unwrap()
    ))
    .unwrap();
    assert_eq!(
        autoclear.trim(),
        "0",
        "the refused detach left a deferred release behind"
    );
    assert_eq!(
        p.svc.get(&Caller::Admin, "v").await.unwrap().attached_to.as_deref(),
        Some("vm1")
    );
    let e = p.svc.attach(&Caller::vm("vm2").unwrap(), "v").await.unwrap_err();
    assert_eq!(e.code(), vmdk_protocol::ErrorCode::AttachedElsewhere);
    nix::mount::umount(&mnt).unwrap();
    p.svc.detach(&Caller::vm("vm1").unwrap(), "v").await.unwrap();
    assert!(loops_under(&root).is_empty());
    assert!(p
        .svc
        .attach(&Caller::vm("vm2").unwrap(), "v")
        .await
        .unwrap()
        .device
        .is_some());
    p.svc.detach(&Caller::vm("vm2").unwrap(), "v").await.unwrap();
}

/// Finding 12: on a full datastore an Unmount reports what really happened
/// (unmounted and detached, recorded as detached), another volume still
/// mounts, a volume can be removed to free space, a create fails cleanly,
/// and no temp file is left behind.
#[tokio::test]
async fn a_full_datastore_still_lets_volumes_go_and_leaves_nothing_behind() {
    let p = real_plugin().await;
    let root = std::fs::canonicalize(p.dir.path()).unwrap();
    let _c = KernelCleanup(root.clone());
    let ds = p.datastore();
    // A small file system as the datastore.
    nix::mount::mount(
        Some("tmpfs"),
        &ds,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=96m,mode=0700"),
    )
    .unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _u = Unmount(ds.clone());
    p.svc.recover_on_start().await;
    for v in ["a", "b", "c"] {
        support::ok(
            &p.app,
            "VolumeDriver.Create",
            &format!(r#"{{"Name":"{v}","Opts":{{"size":"16mb"}}}}"#),
        )
        .await;
    }
    // b is formatted while there is room; a is mounted and in use.
    support::ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"b","ID":"1"}"#).await;
    support::ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"b","ID":"1"}"#).await;
    let v = support::ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"a","ID":"2"}"#).await;
    let data = PathBuf::from(v["Mountpoint"].as_str().unwrap());
    std::fs::write(data.join("f"), "data").unwrap();
    // Something else fills the datastore to the last byte.
    let filler = ds.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x5au8; 1 << 16];
        while f.write_all(&chunk).is_ok() {}
        let mut small = [0u8; 512];
        small.fill(1);
        while f.write_all(&small).is_ok() {}
    }
    let (free, _) = vmdk_common::store::Dir::open_trusted(&ds, vmdk_common::store::DsPath::new("local", ""))
        .unwrap()
        .space()
        .unwrap();
    assert!(free < 4096, "the datastore is not full: {free} bytes free");

    support::ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"a","ID":"2"}"#).await;
    assert_eq!(
        p.svc.get(&Caller::Admin, "a").await.unwrap().status,
        vmdk_protocol::AttachStatus::Detached
    );
    assert!(loops_under(&root).is_empty());
    let v = support::ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"b","ID":"3"}"#).await;
    assert!(PathBuf::from(v["Mountpoint"].as_str().unwrap()).is_dir());
    support::ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"b","ID":"3"}"#).await;
    assert_eq!(
        p.svc.get(&Caller::Admin, "b").await.unwrap().status,
        vmdk_protocol::AttachStatus::Detached
    );
    support::ok(&p.app, "VolumeDriver.Remove", r#"{"Name":"c"}"#).await;
    support::ok(&p.app, "VolumeDriver.Remove", r#"{"Name":"a"}"#).await;
    // Creating needs room: a clean error, nothing left.
    let e = support::err(
        &p.app,
        "VolumeDriver.Create",
        r#"{"Name":"d","Opts":{"diskformat":"zeroedthick","size":"64mb"}}"#,
    )
    .await;
    assert!(e.contains("No space left on device"), "{e}");
    let left: Vec<String> = std::fs::read_dir(ds.join("dockvols/_DEFAULT"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with("b.") && !n.starts_with("b-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
