//! The agent on a hostile datastore (issue 7's findings on the agent
//! side), through the volume service with fake loop devices. Every file is
//! real; what an attacker plants outside the datastore is checked to be
//! untouched. The root-only counterparts (real loop devices, mounts, a full
//! datastore) are in the root crate's `tests/hostile_datastore.rs`.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmdk_agent::backend::local::LocalBackend;
use vmdk_agent::backend::loopdev::{FakeLoops, LoopDevices};
use vmdk_agent::config::AgentConfig;
use vmdk_agent::service::Caller;
use vmdk_agent::{AgentError, VolumeService};
use vmdk_protocol::{CreateRequest, ErrorCode};

const SECRET: &str = "TOP-SECRET-LINE-FROM-OUTSIDE";

struct Env {
    _dir: tempfile::TempDir,
    outside: tempfile::TempDir,
    ds: PathBuf,
    loops: Arc<FakeLoops>,
    svc: Arc<VolumeService>,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ds");
        std::fs::create_dir_all(&ds).unwrap();
        let mut cfg = AgentConfig::default();
        cfg.add_datastore_flag(&format!("local={}", ds.display())).unwrap();
        let loops = Arc::new(FakeLoops::default());
        let svc = Arc::new(VolumeService::new(&cfg, Arc::new(LocalBackend::new(loops.clone()))).unwrap());
        let outside = tempfile::tempdir().unwrap();
        Self {
            _dir: dir,
            outside,
            ds,
            loops,
            svc,
        }
    }

    fn folder(&self) -> PathBuf {
        self.ds.join("dockvols/_DEFAULT")
    }

    async fn create(&self, name: &str, opts: &[(&str, &str)]) -> Result<vmdk_protocol::VolumeInfo, AgentError> {
        self.svc
            .create(
                &Caller::vm("vmA").unwrap(),
                &CreateRequest {
                    name: name.into(),
                    opts: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                },
            )
            .await
    }

    /// A file outside the datastore with `content`, mode 0600.
    fn outside_file(&self, name: &str, content: &[u8]) -> PathBuf {
        let p = self.outside.path().join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    fn plant_link(&self, name: &str, target: &Path) {
        let p = self.folder().join(name);
        let _ = std::fs::remove_file(&p);
        symlink(target, p).unwrap();
    }
}

fn message(e: &AgentError) -> String {
    e.to_body().message
}

/// Finding 3: planted temp-file and marker links never redirect a write;
/// a planted link is refused with a message naming it, and the file it
/// points at is untouched.
#[tokio::test]
async fn planted_temp_and_marker_links_never_redirect_a_write() {
    let env = Env::new();
    env.create("seed", &[]).await.unwrap();
    let a = env.outside_file("a", b"keep a\n");
    let b = env.outside_file("b", b"keep b\n");
    env.plant_link("v.vmdk.tmp", &a);
    env.plant_link("v.vmfd.tmp", &b);
    env.create("v", &[("size", "10mb")]).await.unwrap();
    env.svc.recover_on_start().await;

    let c = env.outside_file("c", b"keep c\n");
    env.plant_link("w.creating", &c);
    let e = env.create("w", &[]).await.unwrap_err();
    assert!(
        message(&e).contains("[local] dockvols/_DEFAULT/w.creating is a symbolic link"),
        "{}",
        message(&e)
    );

    env.create("x", &[]).await.unwrap();
    let d = env.outside_file("d", b"keep d\n");
    env.plant_link("x.removing", &d);
    let e = env.svc.remove(&Caller::vm("vmA").unwrap(), "x").await.unwrap_err();
    assert!(message(&e).contains("x.removing is a symbolic link"), "{}", message(&e));
    env.svc
        .get(&Caller::Admin, "x")
        .await
        .expect("a refused remove leaves the volume");

    for (p, want) in [(a, "keep a\n"), (b, "keep b\n"), (c, "keep c\n"), (d, "keep d\n")] {
        assert_eq!(std::fs::read_to_string(&p).unwrap(), want, "{}", p.display());
    }
}

/// Finding 3: a dangling `.lck` link makes root create nothing anywhere.
#[tokio::test]
async fn a_dangling_lock_link_creates_nothing_outside() {
    let env = Env::new();
    env.create("v", &[]).await.unwrap();
    let target = env.outside.path().join("nologin");
    env.plant_link("v.lck", &target);
    for (what, res) in [
        (
            "attach",
            env.svc.attach(&Caller::vm("vmA").unwrap(), "v").await.map(|_| ()),
        ),
        ("detach", env.svc.detach(&Caller::vm("vmA").unwrap(), "v").await),
        ("remove", env.svc.remove(&Caller::vm("vmA").unwrap(), "v").await),
    ] {
        let e = res.expect_err(what);
        assert!(
            message(&e).contains("v.lck is a symbolic link"),
            "{what}: {}",
            message(&e)
        );
    }
    let e = env.create("w", &[("clone-from", "v")]).await.unwrap_err();
    assert!(message(&e).contains("v.lck"), "{}", message(&e));
    assert!(!target.exists(), "root created a file through a dangling link");
}

/// Finding 3: clone-from a source whose extent is a link to a secret
/// copies nothing, and every extent vmdk writes is private.
#[tokio::test]
async fn clone_from_a_linked_extent_copies_nothing() {
    let env = Env::new();
    env.create("src", &[("size", "1mb")]).await.unwrap();
    let mut secret = format!("{SECRET}\n").into_bytes();
    secret.resize(1 << 20, b'S');
    let s = env.outside_file("secret", &secret);
    env.plant_link("src-flat.vmdk", &s);
    let e = env.create("copy", &[("clone-from", "src")]).await.unwrap_err();
    assert!(
        message(&e).contains("src-flat.vmdk is a symbolic link"),
        "{}",
        message(&e)
    );
    assert!(!env.folder().join("copy-flat.vmdk").exists());
    assert!(!env.folder().join("copy.vmfd").exists());
}

/// Finding 3: Get never echoes a line of a file outside the datastore.
#[tokio::test]
async fn get_never_echoes_an_outside_file() {
    let env = Env::new();
    env.create("v", &[]).await.unwrap();
    let s = env.outside_file("secret.txt", format!("RW 1 VMFS \"{SECRET}\n").as_bytes());
    env.plant_link("v.vmdk", &s);
    let e = env.svc.get(&Caller::Admin, "v").await.unwrap_err();
    assert!(!message(&e).contains(SECRET), "{}", message(&e));
    assert!(message(&e).contains("v.vmdk is a symbolic link"), "{}", message(&e));
}

/// Finding 5: folders 0700, files 0600; an extent an older version wrote
/// 0644 is made private at its next attach.
#[tokio::test]
async fn files_and_folders_are_private() {
    let env = Env::new();
    env.create("v", &[]).await.unwrap();
    env.svc.recover_on_start().await;
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.ds.join("dockvols")), 0o700);
    assert_eq!(mode(&env.folder()), 0o700);
    for f in ["v.vmdk", "v-flat.vmdk", "v.vmfd"] {
        assert_eq!(mode(&env.folder().join(f)), 0o600, "{f}");
    }
    let flat = env.folder().join("v-flat.vmdk");
    std::fs::set_permissions(&flat, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.svc.attach(&Caller::vm("vmA").unwrap(), "v").await.unwrap();
    assert_eq!(mode(&flat), 0o600);
    // Looser folders left by an older version are tightened at start.
    std::fs::set_permissions(env.folder(), std::fs::Permissions::from_mode(0o755)).unwrap();
    env.svc.recover_on_start().await;
    assert_eq!(mode(&env.folder()), 0o700);
}

/// Awaits `f` with a deadline; a hang fails the test instead of hanging it.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// Findings 9 and 10: FIFOs and endless files in place of a sidecar or
/// descriptor are refused without blocking or reading without bound, and
/// only their volume reports an error.
#[tokio::test]
async fn fifos_and_endless_files_never_hang_or_exhaust() {
    let env = Env::new();
    for v in ["fifo1", "fifo2", "zero1", "zero2", "huge", "good"] {
        env.create(v, &[]).await.unwrap();
    }
    let dir = env.folder();
    let fifo = |n: &str| {
        std::fs::remove_file(dir.join(n)).unwrap();
        nix::unistd::mkfifo(&dir.join(n), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    };
    fifo("fifo1.vmfd");
    fifo("fifo2.vmdk");
    env.plant_link("zero1.vmfd", Path::new("/dev/zero"));
    env.plant_link("zero2.vmdk", Path::new("/dev/zero"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("huge.vmfd"))
        .unwrap()
        .set_len(1 << 32)
        .unwrap();
    let admin = Caller::Admin;
    let list = within("List", env.svc.list(&admin)).await.unwrap();
    let names: Vec<&str> = list.iter().map(|v| v.volume.as_str()).collect();
    assert_eq!(names, ["good"], "only the healthy volume lists");
    for (v, what) in [
        ("fifo1", "fifo1.vmfd is a FIFO"),
        ("fifo2", "fifo2.vmdk is a FIFO"),
        ("zero1", "zero1.vmfd is a symbolic link"),
        ("zero2", "zero2.vmdk is a symbolic link"),
        ("huge", "huge.vmfd is larger than 65536 bytes"),
    ] {
        let e = within(v, env.svc.get(&admin, v)).await.unwrap_err();
        assert!(message(&e).contains(what), "{v}: {}", message(&e));
        within(v, env.svc.attach(&Caller::vm("vmA").unwrap(), v))
            .await
            .unwrap_err();
    }
    within("inventory", env.svc.inventory()).await.unwrap();
    within("start-up", env.svc.recover_on_start()).await;
    env.svc.get(&Caller::Admin, "good").await.unwrap();
}

/// Finding 13: a descriptor whose size overflows, or is zero, is an error
/// for Get, attach and clone, never a 0-byte disk.
#[tokio::test]
async fn absurd_descriptor_sizes_are_errors() {
    let env = Env::new();
    env.create("v", &[("size", "1mb")]).await.unwrap();
    let p = env.folder().join("v.vmdk");
    let text = std::fs::read_to_string(&p).unwrap();
    for sectors in [1u64 << 55, 0] {
        let crafted = text.replace("RW 2048 VMFS", &format!("RW {sectors} VMFS"));
        assert_ne!(crafted, text);
        std::fs::write(&p, &crafted).unwrap();
        let e = env.svc.get(&Caller::Admin, "v").await.unwrap_err();
        assert!(
            message(&e).contains(&format!("declare {sectors} sectors")),
            "{}",
            message(&e)
        );
        let e = env.create("copy", &[("clone-from", "v")]).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::Backend, "{}", message(&e));
        assert!(!env.folder().join("copy-flat.vmdk").exists());
        env.svc.attach(&Caller::vm("vmA").unwrap(), "v").await.unwrap_err();
        assert!(env.loops.list().unwrap().is_empty(), "a device was bound");
    }
}

/// Finding 15: a volume whose extent is gone is not healthy.
#[tokio::test]
async fn a_missing_extent_is_an_error_not_a_healthy_volume() {
    let env = Env::new();
    env.create("v", &[]).await.unwrap();
    std::fs::remove_file(env.folder().join("v-flat.vmdk")).unwrap();
    let e = env.svc.get(&Caller::Admin, "v").await.unwrap_err();
    assert!(
        message(&e).contains("[local] dockvols/_DEFAULT/v-flat.vmdk is missing"),
        "{}",
        message(&e)
    );
    env.svc.attach(&Caller::vm("vmA").unwrap(), "v").await.unwrap_err();
}

/// Finding 6: a detach of a device that is still open fails `in_use`,
/// the volume stays recorded as attached, and another VM is not handed
/// the live device.
#[tokio::test]
async fn a_busy_device_is_never_detached_or_handed_out() {
    let env = Env::new();
    env.create("v", &[]).await.unwrap();
    let att = env.svc.attach(&Caller::vm("vmA").unwrap(), "v").await.unwrap();
    let dev = PathBuf::from(att.device.unwrap());
    env.loops.hold(&dev, true);
    let e = env.svc.detach(&Caller::vm("vmA").unwrap(), "v").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InUse, "{}", message(&e));
    assert!(message(&e).contains("still in use"), "{}", message(&e));
    let info = env.svc.get(&Caller::Admin, "v").await.unwrap();
    assert_eq!(info.attached_to.as_deref(), Some("vmA"));
    let e = env.svc.attach(&Caller::vm("vmB").unwrap(), "v").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::AttachedElsewhere, "{}", message(&e));
    env.loops.hold(&dev, false);
    env.svc.detach(&Caller::vm("vmA").unwrap(), "v").await.unwrap();
    assert!(env.loops.list().unwrap().is_empty());
    env.svc.attach(&Caller::vm("vmB").unwrap(), "v").await.unwrap();
}

/// Errors name datastore files in ESXi form, never by host path.
#[tokio::test]
async fn errors_name_files_in_datastore_form() {
    let env = Env::new();
    env.create("v", &[]).await.unwrap();
    std::fs::write(env.folder().join("v.vmfd"), "{broken").unwrap();
    let root = env.ds.display().to_string();
    for e in [
        env.svc.get(&Caller::Admin, "v").await.unwrap_err(),
        env.svc.get(&Caller::Admin, "missing").await.unwrap_err(),
        env.svc.attach(&Caller::vm("vmA").unwrap(), "v").await.unwrap_err(),
    ] {
        assert!(!message(&e).contains(&root), "{}", message(&e));
        assert!(message(&e).contains("[local] dockvols/_DEFAULT/"), "{}", message(&e));
    }
}
