//! A long create (eagerzeroedthick, clone) answers early and finishes in
//! the background, with its progress in Get, List and `vmdk-agent ls`, and
//! Attach, Remove and a retried Create doing the right thing meanwhile.
//!
//! The service runs on the local backend on a temp datastore. In the first
//! tests a gate in front of the backend holds the long part at 42% until the
//! test lets it go, so every state is observed for certain (the hypervisor
//! seam is the one place a fake belongs); the last test zeroes a real disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use vmdk_agent::backend::local::LocalBackend;
use vmdk_agent::backend::loopdev::FakeLoops;
use vmdk_agent::backend::{Attachment, BackendError, DiskBackend, DiskInfo, DiskRef, PolicySpec};
use vmdk_agent::config::AgentConfig;
use vmdk_agent::datastore::{Datastore, VolumeFolder};
use vmdk_agent::progress::Progress;
use vmdk_agent::service::Caller;
use vmdk_agent::store::StoreError;
use vmdk_agent::{AgentError, VolumeService};
use vmdk_protocol::{AttachAs, CreateRequest, DiskFormat, ErrorCode, PolicyState};

/// The local backend, whose eagerzeroedthick create reports 42% and then
/// waits for the test's word (`Ok` to finish, `Err` to fail) or for a
/// cancel.
#[derive(Debug)]
struct Gated {
    inner: LocalBackend,
    gate: Mutex<Option<oneshot::Receiver<Result<(), String>>>>,
}

impl Gated {
    fn new() -> (Arc<Self>, oneshot::Sender<Result<(), String>>) {
        let (tx, rx) = oneshot::channel();
        let me = Arc::new(Self {
            inner: LocalBackend::new(Arc::new(FakeLoops::default())),
            gate: Mutex::new(Some(rx)),
        });
        (me, tx)
    }
}

#[async_trait::async_trait]
impl DiskBackend for Gated {
    fn kind(&self) -> &'static str {
        "local"
    }
    async fn create_disk(
        &self,
        disk: &DiskRef<'_>,
        capacity: u64,
        format: DiskFormat,
        progress: &Progress,
    ) -> Result<DiskInfo, BackendError> {
        if format == DiskFormat::EagerZeroedThick {
            progress.start(100);
            progress.set_done(42).unwrap();
            let mut rx = self.gate.lock().unwrap().take().expect("one gated create per test");
            let word = loop {
                if progress.is_cancelled() {
                    break Err("cancelled".to_owned());
                }
                // Polls the cancel flag between checks of the gate.
                match tokio::time::timeout(Duration::from_millis(5), &mut rx).await {
                    Ok(w) => break w.unwrap_or(Err("gate dropped".into())),
                    Err(_) => continue,
                }
            };
            if let Err(why) = word {
                return Err(BackendError::Inconsistent {
                    file: disk.shown(&disk.files().flat),
                    what: why,
                });
            }
            progress.set_done(100).unwrap();
        }
        self.inner.create_disk(disk, capacity, DiskFormat::Thin, progress).await
    }
    async fn clone_disk(
        &self,
        s: &DiskRef<'_>,
        d: &DiskRef<'_>,
        f: DiskFormat,
        p: &Progress,
    ) -> Result<DiskInfo, BackendError> {
        self.inner.clone_disk(s, d, f, p).await
    }
    async fn delete_disk(&self, d: &DiskRef<'_>) -> Result<(), BackendError> {
        self.inner.delete_disk(d).await
    }
    async fn disk_info(&self, d: &DiskRef<'_>) -> Result<DiskInfo, BackendError> {
        self.inner.disk_info(d).await
    }
    async fn attach(
        &self,
        vm: &str,
        d: &DiskRef<'_>,
        a: AttachAs,
        p: Option<PolicySpec<'_>>,
    ) -> Result<Attachment, BackendError> {
        self.inner.attach(vm, d, a, p).await
    }
    async fn detach(&self, vm: &str, d: &DiskRef<'_>) -> Result<(), BackendError> {
        self.inner.detach(vm, d).await
    }
    async fn attachment(&self, d: &DiskRef<'_>, hint: Option<&str>) -> Result<Option<Attachment>, BackendError> {
        self.inner.attachment(d, hint).await
    }
    async fn folder(&self, ds: &Datastore, g: &str, c: bool) -> Result<Option<Box<dyn VolumeFolder>>, StoreError> {
        self.inner.folder(ds, g, c).await
    }
    async fn apply_policy(
        &self,
        d: &DiskRef<'_>,
        p: PolicySpec<'_>,
        holder: Option<&str>,
    ) -> Result<Option<PolicyState>, BackendError> {
        self.inner.apply_policy(d, p, holder).await
    }
    async fn attached_extents(&self) -> Result<Vec<(PathBuf, Attachment)>, BackendError> {
        self.inner.attached_extents().await
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    svc: VolumeService,
    gate: Option<oneshot::Sender<Result<(), String>>>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("local");
        std::fs::create_dir_all(&ds).unwrap();
        let mut cfg = AgentConfig::default();
        cfg.add_datastore_flag(&format!("local={}", ds.display())).unwrap();
        let (backend, gate) = Gated::new();
        let svc = VolumeService::new(&cfg, backend)
            .unwrap()
            .with_answer_within(Duration::ZERO);
        Fixture {
            dir,
            svc,
            gate: Some(gate),
        }
    }

    fn folder(&self) -> PathBuf {
        self.dir.path().join("local/dockvols/_DEFAULT")
    }

    fn release(&mut self, word: Result<(), String>) {
        self.gate.take().unwrap().send(word).unwrap();
    }
}

fn vm(id: &str) -> Caller {
    Caller::vm(id).unwrap()
}

fn req(name: &str, opts: &[(&str, &str)]) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        opts: opts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

const EAGER: &[(&str, &str)] = &[("size", "64mb"), ("diskformat", "eagerzeroedthick")];

/// Waits (a liveness bound, not a timing claim) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn a_long_create_answers_early_shows_progress_and_mount_waits_for_it() {
    let mut f = Fixture::new();
    let info = f.svc.create(&vm("vm-1"), &req("big", EAGER)).await.unwrap();
    let c = info.creating.clone().expect("answered while zeroing");
    assert_eq!((c.step.as_str(), c.percent, c.failed.as_deref()), ("zeroing", 42, None));
    assert_eq!((info.name.as_str(), info.capacity_bytes), ("big@local", 64 << 20));
    assert_eq!(info.disk_format, DiskFormat::EagerZeroedThick);

    // Get and List show it; a retry with the same options gets its state,
    // a create with other options is refused.
    let got = f.svc.get(&vm("vm-2"), "big").await.unwrap();
    assert_eq!(got.creating.unwrap().percent, 42);
    let list = f.svc.list(&vm("vm-1")).await.unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].creating.is_some());
    let again = f.svc.create(&vm("vm-1"), &req("big", EAGER)).await.unwrap();
    assert_eq!(again.creating.unwrap().step, "zeroing");
    let other = f
        .svc
        .create(&vm("vm-1"), &req("big", &[("size", "1gb")]))
        .await
        .unwrap_err();
    assert_eq!(other.code(), ErrorCode::InUse);
    assert!(
        other.to_string().contains("still being created (zeroing, 42% done)"),
        "{other}"
    );

    // The marker on the datastore carries the percentage for other
    // processes (`vmdk-agent ls`).
    let marker = f.folder().join("big.creating");
    until("the progress note", || {
        std::fs::read_to_string(&marker).is_ok_and(|t| t.contains("\"percent\":42"))
    })
    .await;
    let ls = std::process::Command::new(env!("CARGO_BIN_EXE_vmdk-agent"))
        .arg("--datastore")
        .arg(format!("local={}", f.dir.path().join("local").display()))
        .args(["ls", "-c", "volume,attached-to"])
        .env_remove("VMDK_AGENT_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ls.stdout);
    assert!(
        text.contains("big     creating: zeroing 42%"),
        "{text}{}",
        String::from_utf8_lossy(&ls.stderr)
    );

    // Attach waits for the create, then attaches the finished volume.
    let svc = f.svc.clone();
    let attach = tokio::spawn(async move { svc.attach(&vm("vm-1"), "big").await });
    tokio::task::yield_now().await;
    assert!(!attach.is_finished(), "attach must wait for the create");
    f.release(Ok(()));
    let att = attach.await.unwrap().unwrap();
    assert!(att.volume.creating.is_none());
    assert!(f.svc.get(&vm("vm-1"), "big").await.unwrap().creating.is_none());
    assert_eq!(files(&f.folder()), ["big-flat.vmdk", "big.lck", "big.vmdk", "big.vmfd"]);
}

#[tokio::test]
async fn remove_stops_a_long_create_and_leaves_nothing() {
    let f = Fixture::new();
    f.svc.create(&vm("vm-1"), &req("big", EAGER)).await.unwrap();
    f.svc.remove(&vm("vm-1"), "big").await.unwrap();
    let e = f.svc.get(&vm("vm-1"), "big").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
    assert!(files(&f.folder()).is_empty(), "{:?}", files(&f.folder()));
    // The name is free again.
    let again = f
        .svc
        .create(&vm("vm-1"), &req("big", &[("size", "10mb")]))
        .await
        .unwrap();
    assert!(again.creating.is_none());
}

#[tokio::test]
async fn a_failure_after_the_answer_is_shown_until_the_volume_is_removed() {
    let mut f = Fixture::new();
    f.svc.create(&vm("vm-1"), &req("big", EAGER)).await.unwrap();
    f.release(Err("the datastore went away".into()));
    let svc = f.svc.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = loop {
        let got = svc.get(&vm("vm-1"), "big").await.unwrap();
        if let Some(cause) = got.creating.and_then(|c| c.failed) {
            break cause;
        }
        assert!(Instant::now() < deadline, "the failure never showed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(failed.contains("the datastore went away"), "{failed}");
    let e = f.svc.attach(&vm("vm-1"), "big").await.unwrap_err();
    assert!(matches!(e, AgentError::CreateFailed { .. }), "{e}");
    assert!(e.to_string().contains("remove it and create it again"), "{e}");
    assert!(
        files(&f.folder()).iter().all(|n| n.ends_with(".lck")),
        "{:?}",
        files(&f.folder())
    );
    f.svc.remove(&vm("vm-1"), "big").await.unwrap();
    assert_eq!(
        f.svc.get(&vm("vm-1"), "big").await.unwrap_err().code(),
        ErrorCode::NotFound
    );
}

/// A real eagerzeroedthick create on the local backend: answered while
/// zeroing, progress only grows, and the finished disk is whole.
#[tokio::test]
async fn a_real_eagerzeroedthick_create_runs_on_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("local");
    std::fs::create_dir_all(&ds).unwrap();
    let mut cfg = AgentConfig::default();
    cfg.add_datastore_flag(&format!("local={}", ds.display())).unwrap();
    let backend = Arc::new(LocalBackend::new(Arc::new(FakeLoops::default())));
    let svc = VolumeService::new(&cfg, backend)
        .unwrap()
        .with_answer_within(Duration::ZERO);
    let info = svc
        .create(
            &vm("vm-1"),
            &req("zeroed", &[("size", "512mb"), ("diskformat", "eagerzeroedthick")]),
        )
        .await
        .unwrap();
    let mut last = 0;
    let mut seen = Vec::new();
    if let Some(c) = info.creating {
        seen.push(c.percent);
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let got = svc.get(&vm("vm-1"), "zeroed").await.unwrap();
            let Some(c) = got.creating else { break };
            assert!(c.failed.is_none(), "{c:?}");
            assert!(c.percent >= last, "progress went back: {last} -> {}", c.percent);
            last = c.percent;
            seen.push(c.percent);
            assert!(Instant::now() < deadline, "the create never finished");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("progress seen: {seen:?}");
    let got = svc.get(&vm("vm-1"), "zeroed").await.unwrap();
    assert_eq!(got.capacity_bytes, 512 << 20);
    let flat = ds.join("dockvols/_DEFAULT/zeroed-flat.vmdk");
    let meta = std::fs::metadata(&flat).unwrap();
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 >= 512 << 20,
        "every block written"
    );
    assert!(!ds.join("dockvols/_DEFAULT/zeroed.creating").exists());
}
