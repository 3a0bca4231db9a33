//! The agent's volume catalog (see `service::catalog`): List and Get answer
//! from memory, and still see what other processes on the same datastore
//! did: a create by a second agent, a `vmdk-agent set`, a remove, a
//! damaged file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmdk_agent::backend::local::LocalBackend;
use vmdk_agent::backend::loopdev::FakeLoops;
use vmdk_agent::config::AgentConfig;
use vmdk_agent::service::Caller;
use vmdk_agent::VolumeService;
use vmdk_protocol::{AccessMode, CreateRequest};

const BIN: &str = env!("CARGO_BIN_EXE_vmdk-agent");

fn service(ds: &Path) -> VolumeService {
    let mut cfg = AgentConfig::default();
    cfg.add_datastore_flag(&format!("local={}", ds.display())).unwrap();
    VolumeService::new(&cfg, Arc::new(LocalBackend::new(Arc::new(FakeLoops::default()))))
        .unwrap()
        // This test's file system keeps nanosecond times; the default
        // window is for the coarsest clocks.
        .with_catalog_window(Duration::from_millis(100))
}

/// A `local` datastore directory in a scratch directory (kept while the
/// first value lives).
fn datastore() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("local");
    std::fs::create_dir_all(&ds).unwrap();
    (dir, ds)
}

/// `vmdk-agent set --options=access=read-only` on `volume`, as an
/// administrator runs it beside the service.
fn set_read_only(ds: &Path, volume: &str) {
    let out = Command::new(BIN)
        .args(["--datastore", &format!("local={}", ds.display())])
        .args(["set", &format!("--volume={volume}"), "--options=access=read-only"])
        .env_remove("VMDK_AGENT_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn vm() -> Caller {
    Caller::vm("vm-1").unwrap()
}

async fn create(svc: &VolumeService, name: &str) {
    svc.create(
        &vm(),
        &CreateRequest {
            name: name.into(),
            opts: [("size".to_string(), "10mb".to_string())].into(),
        },
    )
    .await
    .unwrap();
}

async fn names(svc: &VolumeService) -> Vec<String> {
    svc.list(&vm()).await.unwrap().into_iter().map(|v| v.name).collect()
}

/// Docker's List: names only, from the catalog when nothing changed.
async fn names_only(svc: &VolumeService) -> Vec<String> {
    svc.list_names(&vm())
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _, _)| n)
        .collect()
}

/// Lists until the catalog is complete and trusted (its files' change
/// times are older than its window): from then on a List reads no volume
/// file unless the folder changes. A liveness bound, not a timing claim.
async fn settle(svc: &VolumeService) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        names(svc).await;
        if svc.catalog_settled() {
            return;
        }
        assert!(Instant::now() < deadline, "the catalog never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn folder(ds: &Path) -> PathBuf {
    ds.join("dockvols/_DEFAULT")
}

#[tokio::test]
async fn list_and_get_see_what_other_processes_did() {
    let (_dir, ds) = datastore();
    let a = service(&ds);
    create(&a, "one").await;
    settle(&a).await;
    assert_eq!(names(&a).await, ["one@local"]);

    // A second agent on the same datastore creates a volume.
    let b = service(&ds);
    create(&b, "two").await;
    assert_eq!(names_only(&a).await, ["one@local", "two@local"]);
    assert_eq!(names(&a).await, ["one@local", "two@local"]);
    settle(&a).await;
    assert_eq!(names_only(&a).await, ["one@local", "two@local"]);

    // The admin CLI changes a setting: Get and List show it.
    settle(&a).await;
    assert_eq!(a.get(&vm(), "one").await.unwrap().access, AccessMode::ReadWrite);
    set_read_only(&ds, "one");
    assert_eq!(a.get(&vm(), "one").await.unwrap().access, AccessMode::ReadOnly);
    let listed = a.list(&vm()).await.unwrap();
    assert_eq!(listed[0].access, AccessMode::ReadOnly);

    // Another agent removes one.
    settle(&a).await;
    b.remove(&vm(), "two").await.unwrap();
    assert_eq!(names_only(&a).await, ["one@local"]);
    assert_eq!(names(&a).await, ["one@local"]);
    assert!(a.get(&vm(), "two").await.is_err());

    // Another agent attaches it: List shows the holder, and its detach.
    b.attach(&vm(), "one").await.unwrap();
    let holder = |v: Vec<vmdk_protocol::VolumeInfo>| {
        v.into_iter()
            .find(|v| v.name == "one@local")
            .and_then(|v| v.attached_to)
    };
    assert_eq!(holder(a.list(&vm()).await.unwrap()).as_deref(), Some("vm-1"));
    settle(&a).await;
    assert_eq!(holder(a.list(&vm()).await.unwrap()).as_deref(), Some("vm-1"));
    b.detach(&vm(), "one").await.unwrap();
    assert_eq!(holder(a.list(&vm()).await.unwrap()), None);

    // A sidecar replaced in place (no rename, so the folder does not
    // change) is seen by Get, which stats the volume's files.
    settle(&a).await;
    assert!(a.get(&vm(), "one").await.is_ok());
    std::fs::write(folder(&ds).join("one.vmfd"), b"{not json").unwrap();
    let e = a.get(&vm(), "one").await.unwrap_err();
    let why = vmdk_agent::error::error_chain(&e);
    assert!(why.contains("one.vmfd"), "{why}");
    // A deleted extent changes the folder: List skips the volume.
    std::fs::remove_file(folder(&ds).join("one-flat.vmdk")).unwrap();
    assert!(names(&a).await.is_empty());
}

/// Get's answer from the catalog carries the extent's current allocation.
#[tokio::test]
async fn get_shows_the_current_allocation() {
    let (_dir, ds) = datastore();
    let a = service(&ds);
    create(&a, "v").await;
    settle(&a).await;
    assert_eq!(a.get(&vm(), "v").await.unwrap().allocated_bytes, 0);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(folder(&ds).join("v-flat.vmdk"))
        .unwrap();
    f.write_all_at(&[1u8; 1 << 20], 0).unwrap();
    f.sync_all().unwrap();
    assert!(a.get(&vm(), "v").await.unwrap().allocated_bytes >= 1 << 20);
}

/// The agent's own writes update the catalog in place: List shows each
/// attach and detach at once, however often the folder changes. A volume
/// another agent creates meanwhile shows up in List within the catalog's
/// verification time (a liveness bound here, not a timing claim), and Get
/// sees it at once.
#[tokio::test]
async fn own_writes_show_at_once_and_foreign_ones_are_still_seen() {
    let (_dir, ds) = datastore();
    let a = service(&ds);
    for v in ["one", "busy"] {
        create(&a, v).await;
    }
    settle(&a).await;
    let holder = |vols: &[vmdk_protocol::VolumeInfo], name: &str| {
        vols.iter()
            .find(|v| v.name == name)
            .map(|v| v.attached_to.clone())
            .unwrap_or_else(|| panic!("{name} not listed in {vols:?}"))
    };
    let b = service(&ds);
    let mut created_two = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        a.attach(&vm(), "busy").await.unwrap();
        let listed = a.list(&vm()).await.unwrap();
        assert_eq!(holder(&listed, "busy@local").as_deref(), Some("vm-1"));
        assert_eq!(names_only(&a).await.len(), listed.len());
        a.detach(&vm(), "busy").await.unwrap();
        let listed = a.list(&vm()).await.unwrap();
        assert_eq!(holder(&listed, "busy@local"), None);
        if !created_two {
            create(&b, "two").await;
            created_two = true;
            // Get looks at the volume's own files.
            assert_eq!(a.get(&vm(), "two").await.unwrap().name, "two@local");
        }
        if listed.iter().any(|v| v.name == "two@local") && names_only(&a).await.contains(&"two@local".to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a volume another agent created never showed in List"
        );
    }
    // Another agent removes a volume while this one is busy: once Get has
    // found it gone (Docker asks Get), List does not bring it back.
    a.attach(&vm(), "busy").await.unwrap();
    b.remove(&vm(), "two").await.unwrap();
    assert!(a.get(&vm(), "two").await.is_err());
    assert!(!names_only(&a).await.contains(&"two@local".to_string()));
    a.detach(&vm(), "busy").await.unwrap();
    // And a remove by this agent is gone from List at once.
    a.remove(&vm(), "busy").await.unwrap();
    assert_eq!(names(&a).await, ["one@local"]);
    assert_eq!(names_only(&a).await, ["one@local"]);
}

/// Docker's List answer is kept by the plugin while the names it came
/// from hold (`list_names_since` answers `None`). Attaches, detaches and
/// setting changes keep the names; a create or remove, by this agent or
/// another, and a volume damaged out of band change them.
#[tokio::test]
async fn a_kept_list_answer_lasts_exactly_as_long_as_the_names() {
    let (_dir, ds) = datastore();
    let a = service(&ds);
    create(&a, "one").await;
    settle(&a).await;
    let since = |known: Option<vmdk_agent::service::NamesKey>| {
        let a = &a;
        async move { a.list_names_since(&vm(), known.as_ref()).await.unwrap() }
    };
    let listed = |l: &vmdk_agent::service::NameList| l.names.iter().map(|(n, _, _)| n.clone()).collect::<Vec<_>>();
    // Another process's change shows in List within the catalog's
    // verification time while this agent is changing the folder too (a
    // liveness bound here, not a timing claim).
    let changed = |known: vmdk_agent::service::NamesKey| {
        let since = &since;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(l) = since(Some(known.clone())).await {
                    return l;
                }
                assert!(
                    Instant::now() < deadline,
                    "another process's change never showed in List"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let first = since(None).await.expect("a list");
    assert_eq!(listed(&first), ["one@local"]);
    let key = first.key.clone().expect("a catalog list has a key");
    assert_eq!(since(Some(key.clone())).await, None, "nothing changed");

    // This agent's attach and detach, and the admin CLI's `set`, change a
    // volume but not the names.
    a.attach(&vm(), "one").await.unwrap();
    assert_eq!(since(Some(key.clone())).await, None);
    a.detach(&vm(), "one").await.unwrap();
    set_read_only(&ds, "one");
    settle(&a).await;
    assert_eq!(since(Some(key.clone())).await, None);

    // Another agent's create.
    let b = service(&ds);
    create(&b, "two").await;
    let after = changed(key.clone()).await;
    assert_eq!(listed(&after), ["one@local", "two@local"]);
    let key2 = after.key.clone().expect("a key");
    assert_ne!(key2, key);
    assert_eq!(since(Some(key2.clone())).await, None);

    // This agent's remove, then its create.
    a.remove(&vm(), "two").await.unwrap();
    let after = since(Some(key2.clone())).await.expect("the names changed");
    assert_eq!(listed(&after), ["one@local"]);
    let key3 = after.key.clone().expect("a key");
    create(&a, "three").await;
    let after = since(Some(key3.clone())).await.expect("the names changed");
    assert_eq!(listed(&after), ["one@local", "three@local"]);
    let key4 = after.key.clone().expect("a key");

    // A volume damaged out of band (its extent deleted) leaves the list.
    settle(&a).await;
    assert_eq!(since(Some(key4.clone())).await, None);
    std::fs::remove_file(folder(&ds).join("three-flat.vmdk")).unwrap();
    let after = changed(key4).await;
    assert_eq!(listed(&after), ["one@local"]);
}
