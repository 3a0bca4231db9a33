//! The agent HTTP API v1, driven in-process through its router with the
//! local backend on a temp datastore. Loop devices are faked here (the
//! root-only tests in the root crate use real ones); every file the agent
//! writes is real and is checked with `qemu-img` as an independent reader.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use vmdk_agent::backend::local::LocalBackend;
use vmdk_agent::backend::loopdev::FakeLoops;
use vmdk_agent::config::AgentConfig;
use vmdk_agent::VolumeService;

struct Fixture {
    _dir: tempfile::TempDir,
    loops: Arc<FakeLoops>,
    svc: Arc<VolumeService>,
    ds: PathBuf,
    other: PathBuf,
    app: axum::Router,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("local");
    let other = dir.path().join("nfs1");
    std::fs::create_dir_all(&ds).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let mut cfg = AgentConfig::default();
    cfg.add_datastore_flag(&format!("local={}", ds.display())).unwrap();
    cfg.add_datastore_flag(&format!("nfs1={}", other.display())).unwrap();
    let loops = Arc::new(FakeLoops::default());
    let backend = Arc::new(LocalBackend::new(loops.clone()));
    let svc = Arc::new(VolumeService::new(&cfg, backend).unwrap());
    Fixture {
        app: vmdk_agent::api::router(svc.clone()),
        loops,
        svc,
        ds,
        other,
        _dir: dir,
    }
}

/// Binds a fake loop device to `path`, as a crashed agent would have.
fn bind(loops: &dyn vmdk_agent::backend::loopdev::LoopDevices, path: &Path) -> PathBuf {
    let real = std::fs::canonicalize(path).unwrap();
    let file = std::fs::File::open(&real).unwrap();
    loops.attach(&file, &real).unwrap()
}

async fn call(
    app: &axum::Router,
    method: Method,
    path: &str,
    vm: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(vm) = vm {
        req = req.header("VM-Id", vm);
    }
    let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("non-JSON body: {:?}", String::from_utf8_lossy(&bytes)))
    };
    (status, v)
}

async fn create(app: &axum::Router, name: &str, opts: Value) -> (StatusCode, Value) {
    call(
        app,
        Method::POST,
        "/v1/volumes",
        Some("vmA"),
        Some(json!({"name": name, "opts": opts})),
    )
    .await
}

fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push(e.strip_prefix(dir).unwrap().display().to_string());
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if !p.ends_with("dockvols/.vmdk-datastore") {
                // The datastore's type record, written with dockvols/, is
                // the datastore's, not a volume's.
                out.push(p);
            }
        }
    }
    out
}

fn qemu_info(path: &Path) -> Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn version_names_the_backend_and_datastores() {
    let f = fixture();
    let (s, v) = call(&f.app, Method::GET, "/v1/version", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["api"], "v1");
    assert_eq!(v["backend"], "local");
    assert_eq!(v["datastores"], json!(["local", "nfs1"]));
}

#[tokio::test]
async fn create_writes_esxi_layout_that_qemu_reads_for_every_format() {
    let f = fixture();
    for (name, fmt, size, bytes) in [
        ("thin1", "thin", "50gb", 50u64 << 30),
        ("zt", "zeroedthick", "64mb", 64 << 20),
        ("ezt", "eagerzeroedthick", "32mb", 32 << 20),
    ] {
        let (s, v) = create(&f.app, name, json!({"size": size, "diskformat": fmt})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["name"], format!("{name}@local"));
        assert_eq!(v["capacity_bytes"], bytes);
        assert_eq!(v["disk_format"], fmt);
        assert_eq!(v["created_by"], "vmA");
        assert_eq!(v["status"], "detached");
        let uuid = v["disk_uuid"].as_str().unwrap();
        assert!(uuid.starts_with("60 00 c2 9"), "{uuid}");
        let dir = f.ds.join("dockvols/_DEFAULT");
        let desc = dir.join(format!("{name}.vmdk"));
        let info = qemu_info(&desc);
        assert_eq!(info["virtual-size"], bytes, "{info}");
        assert_eq!(info["format-specific"]["data"]["create-type"], "vmfs");
        let text = std::fs::read_to_string(&desc).unwrap();
        assert!(
            text.contains(&format!("RW {} VMFS \"{name}-flat.vmdk\"", bytes / 512)),
            "{text}"
        );
        assert_eq!(text.contains("ddb.thinProvisioned = \"1\""), fmt == "thin");
        let allocated = v["allocated_bytes"].as_u64().unwrap();
        if fmt == "thin" {
            assert!(allocated < 1 << 20, "thin extent allocated {allocated} bytes");
        } else {
            assert!(allocated >= bytes, "{fmt} extent allocated only {allocated} of {bytes}");
        }
        let meta: Value = serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.vmfd"))).unwrap()).unwrap();
        assert_eq!(meta["version"], 1);
        assert_eq!(meta["status"], "detached");
        assert_eq!(meta["volOpts"]["diskformat"], fmt);
        assert_eq!(meta["created-by"], "vmA");
    }
    let (_, list) = call(&f.app, Method::GET, "/v1/volumes", None, None).await;
    let names: Vec<&str> = list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ezt@local", "thin1@local", "zt@local"]);
}

#[tokio::test]
async fn bad_input_is_refused_with_a_code_and_nothing_is_written() {
    let f = fixture();
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({"name": "../x"}), "invalid_name", "illegal characters"),
        (json!({"name": "a/b"}), "invalid_name", "illegal characters"),
        (json!({"name": "vol-123456"}), "invalid_name", "-NNNNNN"),
        (json!({"name": "..", "opts": {}}), "invalid_name", "reserved"),
        (json!({"name": "x".repeat(101)}), "invalid_name", "too long"),
        (
            json!({"name": "v@nosuchds"}),
            "unknown_datastore",
            "Known datastores: local, nfs1",
        ),
        (
            json!({"name": "v", "opts": {"size": "10"}}),
            "invalid_option",
            "Invalid format for size",
        ),
        (
            json!({"name": "v", "opts": {"sizes": "1gb"}}),
            "invalid_option",
            "Invalid options: ['sizes']",
        ),
        (
            json!({"name": "v", "opts": {"diskformat": "thick"}}),
            "invalid_option",
            "Disk Allocation Format",
        ),
        (
            json!({"name": "v", "opts": {"fstype": "ntfs"}}),
            "invalid_option",
            "ext4",
        ),
        (
            json!({"name": "v", "opts": {"clone-from": "nope"}}),
            "invalid_option",
            "Could not find volume for cloning",
        ),
    ];
    for (body, code, text) in cases {
        let (s, v) = call(&f.app, Method::POST, "/v1/volumes", Some("vmA"), Some(body.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {v}");
        assert_eq!(v["code"], code, "{body} -> {v}");
        assert!(v["message"].as_str().unwrap().contains(text), "{body} -> {v}");
    }
    // Malformed JSON and a missing VM-Id.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/volumes")
        .header("VM-Id", "vmA")
        .body(Body::from("{\"name\": "))
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (s, v) = call(&f.app, Method::POST, "/v1/volumes", None, Some(json!({"name": "v"}))).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("missing_vm_id"))
    );
    // Unknown routes answer JSON too.
    let (s, v) = call(&f.app, Method::GET, "/v2/volumes", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["code"], "unknown_route");
    // Lookups of missing volumes leave no lock files behind.
    for path in [
        "/v1/volumes/ghost",
        "/v1/volumes/ghost/attach",
        "/v1/volumes/ghost/detach",
    ] {
        let m = if path.ends_with("ghost") {
            Method::GET
        } else {
            Method::POST
        };
        let (s, v) = call(&f.app, m, path, Some("vmA"), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
        assert_eq!(v["code"], "not_found");
    }
    for ds in [&f.ds, &f.other] {
        let left: Vec<_> = std::fs::read_dir(ds).unwrap().flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "bad input changed the datastore: {left:?}");
    }
}

#[tokio::test]
async fn names_split_at_the_last_at_and_stay_in_their_folder() {
    let f = fixture();
    let (s, v) = create(&f.app, "abc@@nfs1", json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["volume"], "abc@");
    assert_eq!(v["datastore"], "nfs1");
    assert!(f.other.join("dockvols/_DEFAULT/abc@.vmdk").exists());
    // Percent-encoded names in the path work, and case-insensitive datastores.
    let (s, v) = call(&f.app, Method::GET, "/v1/volumes/abc%40%40NFS1", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = create(&f.app, "Volume Space-你好", json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    for p in walk(&f.ds).into_iter().chain(walk(&f.other)) {
        assert!(
            p.parent().unwrap().ends_with("dockvols/_DEFAULT"),
            "{} escaped",
            p.display()
        );
    }
}

#[tokio::test]
async fn create_is_not_silently_repeated() {
    let f = fixture();
    assert_eq!(
        create(&f.app, "dup", json!({"size": "1gb"})).await.0,
        StatusCode::CREATED
    );
    let (s, v) = create(&f.app, "dup", json!({"size": "2gb"})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["code"], "already_exists");
    let (_, v) = call(&f.app, Method::GET, "/v1/volumes/dup", None, None).await;
    assert_eq!(v["capacity_bytes"], 1u64 << 30, "second create changed the volume");
}

#[tokio::test]
async fn attach_is_exclusive_idempotent_and_blocks_remove() {
    let f = fixture();
    create(&f.app, "shared", json!({})).await;
    let (s, a1) = call(&f.app, Method::POST, "/v1/volumes/shared/attach", Some("vmA"), None).await;
    assert_eq!(s, StatusCode::OK, "{a1}");
    let dev = a1["device"].as_str().unwrap().to_owned();
    assert_eq!(a1["volume"]["attached_to"], "vmA");
    assert_eq!(a1["disk_uuid"], a1["volume"]["disk_uuid"]);
    // A thin disk never written, bound just now: it reads all zeros.
    assert_eq!(a1["blank"], true, "{a1}");
    let (_, a2) = call(&f.app, Method::POST, "/v1/volumes/shared/attach", Some("vmA"), None).await;
    assert_eq!(
        a2["device"], dev,
        "re-attach from the same VM must return the same device"
    );
    // Bound before: what was written through the device is unknown.
    assert_eq!(a2["blank"], Value::Null, "{a2}");
    let (s, v) = call(&f.app, Method::POST, "/v1/volumes/shared/attach", Some("vmB"), None).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["code"], "attached_elsewhere");
    assert!(v["message"].as_str().unwrap().contains("vmA"), "{v}");
    let (s, v) = call(&f.app, Method::DELETE, "/v1/volumes/shared", Some("vmA"), None).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(
        v["message"],
        "Failed to remove volume shared@local, in use by VM = vmA."
    );
    // Clone of an attached volume is refused.
    let (s, v) = create(&f.app, "copy", json!({"clone-from": "shared"})).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::CONFLICT, Some("in_use")), "{v}");
    // Detach from another VM leaves the holder alone.
    let (s, _) = call(&f.app, Method::POST, "/v1/volumes/shared/detach", Some("vmB"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, v) = call(&f.app, Method::GET, "/v1/volumes/shared", None, None).await;
    assert_eq!(v["attached_to"], "vmA");
    for _ in 0..2 {
        let (s, _) = call(&f.app, Method::POST, "/v1/volumes/shared/detach", Some("vmA"), None).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "detach must be idempotent");
    }
    let (_, v) = call(&f.app, Method::GET, "/v1/volumes/shared", None, None).await;
    assert_eq!(v["status"], "detached");
    assert_eq!(v["attached_to"], Value::Null);
    // One byte anywhere (here past the first MiB) is data.
    let extent = f.ds.join("dockvols/_DEFAULT/shared-flat.vmdk");
    let file = std::fs::OpenOptions::new().write(true).open(&extent).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"x", 3 << 20).unwrap();
    drop(file);
    let (s, v) = call(&f.app, Method::POST, "/v1/volumes/shared/attach", Some("vmB"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["blank"], Value::Null, "a disk holding data was called blank: {v}");
    call(&f.app, Method::POST, "/v1/volumes/shared/detach", Some("vmB"), None).await;
    let (s, _) = call(&f.app, Method::DELETE, "/v1/volumes/shared", Some("vmA"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(files(&f.ds), Vec::<String>::new(), "remove left files behind");
}

#[tokio::test]
async fn clone_copies_data_and_inherits_size_and_fstype() {
    let f = fixture();
    create(
        &f.app,
        "src",
        json!({"size": "300mb", "fstype": "xfs", "access": "read-only"}),
    )
    .await;
    let flat = f.ds.join("dockvols/_DEFAULT/src-flat.vmdk");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut fh = std::fs::OpenOptions::new().write(true).open(&flat).unwrap();
        fh.seek(SeekFrom::Start(100 << 20)).unwrap();
        fh.write_all(b"payload-in-the-middle").unwrap();
    }
    let (s, v) = create(
        &f.app,
        "dst@nfs1",
        json!({"clone-from": "src@local", "diskformat": "zeroedthick"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["capacity_bytes"], 300u64 << 20);
    assert_eq!(v["fstype"], "xfs");
    assert_eq!(v["access"], "read-write", "access is not inherited");
    assert_eq!(v["clone_from"], "src@local");
    assert_eq!(v["disk_format"], "zeroedthick");
    assert_ne!(v["disk_uuid"], Value::Null);
    let copy = std::fs::read(f.other.join("dockvols/_DEFAULT/dst-flat.vmdk")).unwrap();
    assert_eq!(&copy[100 << 20..(100 << 20) + 21], b"payload-in-the-middle");
    let info = qemu_info(&f.other.join("dockvols/_DEFAULT/dst.vmdk"));
    assert_eq!(info["virtual-size"], 300u64 << 20);
    let (_, src) = call(&f.app, Method::GET, "/v1/volumes/src", None, None).await;
    assert_ne!(src["disk_uuid"], v["disk_uuid"], "a clone gets its own disk uuid");
}

#[tokio::test]
async fn a_create_that_crashed_before_its_metadata_is_not_a_volume() {
    let f = fixture();
    let dir = f.ds.join("dockvols/_DEFAULT");
    std::fs::create_dir_all(&dir).unwrap();
    // What a create killed before its sidecar leaves: its marker first.
    std::fs::write(dir.join("half.creating"), "create\n").unwrap();
    std::fs::write(dir.join("half-flat.vmdk"), vec![1u8; 4096]).unwrap();
    std::fs::write(
        dir.join("half.vmdk"),
        "# Disk DescriptorFile\nRW 8 VMFS \"half-flat.vmdk\"\n",
    )
    .unwrap();
    let (s, _) = call(&f.app, Method::GET, "/v1/volumes/half", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, l) = call(&f.app, Method::GET, "/v1/volumes", None, None).await;
    assert_eq!(l["volumes"], json!([]));
    let (s, v) = create(&f.app, "half", json!({"size": "10mb"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(std::fs::metadata(dir.join("half-flat.vmdk")).unwrap().len(), 10 << 20);
    assert!(!dir.join("half.creating").exists(), "marker left after a create");
}

/// A disk that is not a vmdk volume (no metadata, no marker of ours: a
/// vDVS volume with its DiskLib sidecar, or one an administrator copied
/// in) is never overwritten, deleted or detached.
#[tokio::test]
async fn foreign_disks_in_the_folder_are_never_touched() {
    use vmdk_agent::backend::loopdev::LoopDevices;
    let f = fixture();
    let dir = f.ds.join("dockvols/_DEFAULT");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("legacy-flat.vmdk"), vec![7u8; 4096]).unwrap();
    std::fs::write(dir.join("legacy.vmdk"), "# Disk DescriptorFile\n").unwrap();
    std::fs::write(dir.join("legacy-1234abcd.vmfd"), "{\"status\": \"detached\"}").unwrap();
    bind(&*f.loops, &dir.join("legacy-flat.vmdk"));
    let before = files(&dir);
    let (s, v) = create(&f.app, "legacy", json!({"size": "10mb"})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["code"], "already_exists");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("legacy.vmdk exists but is not a vmdk volume"),
        "{v}"
    );
    let report = f.svc.recover_on_start().await;
    assert!(report.collected.is_empty() && report.released.is_empty(), "{report:?}");
    assert_eq!(files(&dir), before);
    assert_eq!(std::fs::read(dir.join("legacy-flat.vmdk")).unwrap(), vec![7u8; 4096]);
    assert_eq!(f.loops.list().unwrap().len(), 1, "a foreign device was released");
}

/// What cut-off creates and removes leave (files marked as ours without a
/// sidecar, lone lock files, temp files, markers of intact volumes) is
/// deleted when the agent starts; volumes, unmarked files and names whose
/// lock another process holds are left alone.
#[tokio::test]
async fn start_up_collects_what_cut_off_creates_and_removes_left() {
    let f = fixture();
    let (s, v) = create(&f.app, "keep", json!({"size": "10mb"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let dir = f.ds.join("dockvols/_DEFAULT");
    let before: BTreeSet<String> = files(&dir).into_iter().collect();
    // A create killed before its sidecar; a remove killed after it.
    std::fs::write(dir.join("half.creating"), "create\n").unwrap();
    std::fs::write(dir.join("half-flat.vmdk"), vec![1u8; 4096]).unwrap();
    std::fs::write(dir.join("half.vmdk"), "# Disk DescriptorFile\n").unwrap();
    std::fs::write(dir.join("half.lck"), "").unwrap();
    std::fs::write(dir.join("gone.removing"), "remove\n").unwrap();
    std::fs::write(dir.join("gone.vmdk"), "# Disk DescriptorFile\n").unwrap();
    std::fs::write(dir.join("lonely.lck"), "").unwrap();
    std::fs::write(dir.join("keep.vmfd.tmp"), "{").unwrap();
    std::fs::write(dir.join("keep.vmdk.tmp"), "# Disk").unwrap();
    // A remove of `keep` killed before it deleted anything.
    std::fs::write(dir.join("keep.removing"), "remove\n").unwrap();
    // Not ours: no marker.
    std::fs::write(dir.join("theirs.vmdk"), "# Disk DescriptorFile\n").unwrap();
    // Another process is creating `busy` right now: hands off.
    std::fs::write(dir.join("busy.creating"), "create\n").unwrap();
    std::fs::write(dir.join("busy-flat.vmdk"), "").unwrap();
    let busy = vmdk_agent::lock::VolumeLock::acquire(&dir.join("busy.lck")).unwrap();

    let report = f.svc.recover_on_start().await;
    assert_eq!(report.collected, vec!["gone@local".to_owned(), "half@local".to_owned()]);
    assert!(report.released.is_empty());
    let mut expected = before.clone();
    for f in ["busy.creating", "busy-flat.vmdk", "busy.lck", "theirs.vmdk"] {
        expected.insert(f.into());
    }
    assert_eq!(files(&dir).into_iter().collect::<BTreeSet<_>>(), expected);
    drop(busy);
    let report = f.svc.recover_on_start().await;
    assert_eq!(report.collected, vec!["busy@local".to_owned()]);
    expected.retain(|f| !f.starts_with("busy"));
    assert_eq!(files(&dir).into_iter().collect::<BTreeSet<_>>(), expected);
    let (s, _) = call(&f.app, Method::GET, "/v1/volumes/keep", None, None).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let f = fixture();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let app = f.app.clone();
        tasks.push(tokio::spawn(async move {
            create(&app, "race", json!({"size": format!("{}mb", 10 + i)})).await.0
        }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(created, 1);
}

#[tokio::test]
async fn start_up_releases_devices_no_metadata_records() {
    use vmdk_agent::backend::loopdev::LoopDevices;
    let f = fixture();
    create(&f.app, "recorded", json!({})).await;
    create(&f.app, "crashed", json!({})).await;
    call(&f.app, Method::POST, "/v1/volumes/recorded/attach", Some("vmA"), None).await;
    // An agent killed after binding the device but before writing metadata.
    let dir = f.ds.join("dockvols/_DEFAULT");
    bind(&*f.loops, &dir.join("crashed-flat.vmdk"));
    // And a device bound to the extent of a remove that was cut off.
    std::fs::write(dir.join("gone.removing"), b"remove\n").unwrap();
    std::fs::write(dir.join("gone-flat.vmdk"), b"").unwrap();
    bind(&*f.loops, &dir.join("gone-flat.vmdk"));
    let mut released = f.svc.release_unrecorded_attachments().await;
    released.sort();
    assert_eq!(released, ["crashed@local", "gone@local"]);
    let bound: Vec<String> = f
        .loops
        .list()
        .unwrap()
        .iter()
        .map(|(_, b)| b.display().to_string())
        .collect();
    assert_eq!(bound.len(), 1, "{bound:?}");
    assert!(bound[0].ends_with("recorded-flat.vmdk"), "{bound:?}");
    assert!(!dir.join("gone.lck").exists(), "the check left a lock file behind");
}

/// `GET /v1/volumes?attached=self` (what a restarted plugin checks for
/// stray attachments) lists the volumes attached to the calling VM on every
/// datastore, and nothing else: not another VM's, not a detached one, not
/// one whose sidecar claims an attachment no device backs (a host reboot),
/// and not a device bound to a file that is no volume.
#[tokio::test]
async fn attached_self_lists_only_what_is_attached_to_the_caller() {
    use vmdk_agent::backend::loopdev::LoopDevices;
    let f = fixture();
    for name in ["mine", "theirs", "idle", "claim", "mine@nfs1"] {
        let (s, v) = create(&f.app, name, json!({"size": "10mb"})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let attach = |name: &'static str, vm: &'static str| {
        let app = f.app.clone();
        async move {
            let path = format!("/v1/volumes/{name}/attach");
            let (s, v) = call(&app, Method::POST, &path, Some(vm), None).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["device"].as_str().unwrap().to_owned()
        }
    };
    attach("mine", "vmA").await;
    attach("mine@nfs1", "vmA").await;
    attach("theirs", "vmB").await;
    let claim = attach("claim", "vmA").await;
    // The host rebooted under `claim`: its loop device is gone.
    let extent = std::fs::canonicalize(f.ds.join("dockvols/_DEFAULT/claim-flat.vmdk")).unwrap();
    let id = f.loops.backing(Path::new(&claim)).unwrap().unwrap();
    f.loops.detach(Path::new(&claim), id).unwrap();
    assert!(f.loops.list().unwrap().iter().all(|(_, b)| *b != extent));
    // A device bound to a file that is not a volume.
    let foreign = f.ds.join("dockvols/_DEFAULT/stranger-flat.vmdk");
    std::fs::write(&foreign, vec![0u8; 4096]).unwrap();
    bind(&*f.loops, &foreign);

    let names = |v: &Value| -> Vec<String> {
        v["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (s, v) = call(&f.app, Method::GET, "/v1/volumes?attached=self", Some("vmA"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(names(&v), ["mine@local", "mine@nfs1"], "{v}");
    for vol in v["volumes"].as_array().unwrap() {
        assert_eq!(
            (vol["status"].as_str(), vol["attached_to"].as_str()),
            (Some("attached"), Some("vmA"))
        );
    }
    let (s, v) = call(&f.app, Method::GET, "/v1/volumes?attached=self", Some("vmB"), None).await;
    assert_eq!((s, names(&v)), (StatusCode::OK, vec!["theirs@local".to_owned()]), "{v}");
    let (s, v) = call(&f.app, Method::GET, "/v1/volumes?attached=self", None, None).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("missing_vm_id")),
        "{v}"
    );
    // Without the query: every volume, as before.
    let (s, v) = call(&f.app, Method::GET, "/v1/volumes", Some("vmA"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(names(&v).len(), 5, "{v}");
}
