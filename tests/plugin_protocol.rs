//! Docker's volume plugin protocol against the plugin, with requests shaped
//! exactly like the engine's, an embedded agent on a temp datastore, and a
//! recording fake of the kernel (no root needed; `privileged.rs` repeats the
//! important paths on real loop devices and mounts).

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};
use support::{docker_call, err, fake_plugin, ok, FakeSys, SysCall};

fn datastore_entries(p: &support::Plugin) -> Vec<PathBuf> {
    fn walk(d: &std::path::Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                out.push(e.path());
                if e.path().is_dir() {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&p.datastore(), &mut out);
    out
}

#[tokio::test]
async fn handshake_and_capabilities() {
    let p = fake_plugin(Arc::new(FakeSys::default())).await;
    let (s, v) = docker_call(&p.app, "Plugin.Activate", None).await;
    assert_eq!(s, 200);
    assert_eq!(v, json!({"Implements": ["VolumeDriver"]}));
    let v = ok(&p.app, "VolumeDriver.Capabilities", "{}").await;
    assert_eq!(v, json!({"Capabilities": {"Scope": "global"}}));
    let (s, v) = docker_call(&p.app, "VolumeDriver.Snapshot", Some("{}")).await;
    assert_eq!(s, 404);
    assert!(v["Err"]
        .as_str()
        .unwrap()
        .contains("not a Docker volume plugin endpoint"));
}

#[tokio::test]
async fn create_get_list_path_remove_as_docker_sends_them() {
    let p = fake_plugin(Arc::new(FakeSys::default())).await;
    ok(
        &p.app,
        "VolumeDriver.Create",
        r#"{"Name":"vsanvol1","Opts":{"size":"50gb"}}"#,
    )
    .await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"plain","Opts":null}"#).await;
    // Docker retries: a create of an existing name succeeds and changes nothing.
    ok(
        &p.app,
        "VolumeDriver.Create",
        r#"{"Name":"vsanvol1","Opts":{"size":"1gb"}}"#,
    )
    .await;

    let v = ok(&p.app, "VolumeDriver.Get", r#"{"Name":"vsanvol1"}"#).await;
    let vol = &v["Volume"];
    assert_eq!(vol["Name"], "vsanvol1", "Get must echo the requested name");
    let mp = p.mount_root().join("vsanvol1@local/data");
    assert_eq!(vol["Mountpoint"], mp.display().to_string());
    let st = &vol["Status"];
    assert_eq!(st["datastore"], "local");
    assert_eq!(st["capacity"]["size"], "50GB");
    assert_eq!(st["capacity"]["allocated"], "0B");
    assert_eq!(st["diskformat"], "thin");
    assert_eq!(st["fstype"], "ext4");
    assert_eq!(st["access"], "read-write");
    assert_eq!(st["attach-as"], "independent_persistent");
    assert_eq!(st["attached to VM"], "detached");
    assert_eq!(st["created by VM"], "vm-test");
    assert_eq!(st["vsan-policy-name"], "[VSAN default]");
    // CreatedAt is RFC 3339, which Docker decodes as a Go time.Time.
    let created = vol["CreatedAt"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");

    // The long name works too, and is echoed as asked.
    let v = ok(&p.app, "VolumeDriver.Get", r#"{"Name":"vsanvol1@local"}"#).await;
    assert_eq!(v["Volume"]["Name"], "vsanvol1@local");

    let list = || async {
        let v = ok(&p.app, "VolumeDriver.List", "{}").await;
        v["Volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["Name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(list().await, ["plain", "vsanvol1"]);
    // The answer is kept while the names hold (see
    // VolumeManager::list_answer), and changes with them.
    assert_eq!(list().await, ["plain", "vsanvol1"]);
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"third","Opts":null}"#).await;
    assert_eq!(list().await, ["plain", "third", "vsanvol1"]);
    ok(&p.app, "VolumeDriver.Remove", r#"{"Name":"third"}"#).await;
    assert_eq!(list().await, ["plain", "vsanvol1"]);

    let v = ok(&p.app, "VolumeDriver.Path", r#"{"Name":"vsanvol1"}"#).await;
    assert_eq!(v["Mountpoint"], mp.display().to_string());

    ok(&p.app, "VolumeDriver.Remove", r#"{"Name":"vsanvol1"}"#).await;
    let v = ok(&p.app, "VolumeDriver.Get", r#"{"Name":"vsanvol1"}"#).await;
    assert_eq!(v["Volume"], Value::Null);
    assert_eq!(list().await, ["plain"]);
    // Remove is idempotent.
    ok(&p.app, "VolumeDriver.Remove", r#"{"Name":"vsanvol1"}"#).await;
}

#[tokio::test]
async fn get_of_missing_or_invalid_names_is_null_not_an_error() {
    let p = fake_plugin(Arc::new(FakeSys::default())).await;
    for body in [
        r#"{"Name":"nope"}"#,
        r#"{"Name":""}"#,
        r#"{"Name":"../x"}"#,
        r#"{"Name":"v@nods"}"#,
        "{}",
    ] {
        let v = ok(&p.app, "VolumeDriver.Get", body).await;
        assert_eq!(v["Volume"], Value::Null, "{body}");
    }
    let (s, v) = docker_call(&p.app, "VolumeDriver.Get", None).await;
    assert_eq!((s.as_u16(), &v["Volume"]), (200, &Value::Null));
}

#[tokio::test]
async fn every_kind_of_bad_input_is_refused_and_nothing_is_created() {
    let sys = Arc::new(FakeSys {
        no_xfs: true,
        ..Default::default()
    });
    let p = fake_plugin(sys.clone()).await;
    let cases = [
        (r#"{"Name":"../x"}"#, "illegal characters"),
        (r#"{"Name":"a/b"}"#, "illegal characters"),
        (r#"{"Name":"a\\b"}"#, "illegal characters"),
        (r#"{"Name":"a\u0000b"}"#, "illegal characters"),
        (r#"{"Name":".."}"#, "reserved"),
        (r#"{"Name":"Volume-123456"}"#, "-NNNNNN"),
        (r#"{"Name":"x-flat"}"#, "-flat"),
        (
            r#"{"Name":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#,
            "too long (max len is 100)",
        ),
        (r#"{"Name":"v@"}"#, "Invalid datastore name"),
        (
            r#"{"Name":"v@nosuch"}"#,
            "Invalid datastore 'nosuch'.\nKnown datastores: local.",
        ),
        (r#"{"Name":"v","Opts":{"size":"100mbb"}}"#, "Invalid format for size"),
        (r#"{"Name":"v","Opts":{"size":"-5gb"}}"#, "Invalid format for size"),
        (r#"{"Name":"v","Opts":{"size":"0gb"}}"#, "Invalid volume size"),
        (r#"{"Name":"v","Opts":{"sizes":"10gb"}}"#, "Invalid options: ['sizes']"),
        (
            r#"{"Name":"v","Opts":{"diskformat":"zeroedthickk"}}"#,
            "Disk Allocation Format 'zeroedthickk'",
        ),
        (
            r#"{"Name":"v","Opts":{"access":"write-only"}}"#,
            "Access type 'write-only'",
        ),
        (r#"{"Name":"v","Opts":{"attach-as":"shared"}}"#, "Attach type 'shared'"),
        (
            r#"{"Name":"v","Opts":{"fstype":"xfs_ext"}}"#,
            "Filesystem type 'xfs_ext'",
        ),
        (
            r#"{"Name":"v","Opts":{"fstype":"xfs","size":"1gb"}}"#,
            "Not found mkfs for xfs",
        ),
        (
            r#"{"Name":"v","Opts":{"clone-from":"IDontExist"}}"#,
            "Could not find volume for cloning",
        ),
        (
            r#"{"Name":"v","Opts":{"clone-from":"a","size":"1gb"}}"#,
            "Cannot define the size for a clone",
        ),
        // Once a panic in the request handler (the unit split a character).
        (r#"{"Name":"v","Opts":{"size":"1€"}}"#, "Invalid format for size"),
        // Once silently the last value.
        (
            r#"{"Name":"v","Opts":{"size":"1gb","size":"100gb"}}"#,
            "option \"size\" is given more than once",
        ),
        (r#"{"Name":"v","Opts":{"size":5}}"#, "malformed request body"),
        (r#"{"Name":"v","Opts":"#, "malformed request body"),
        (r#"{"Opts":{}}"#, "no volume name"),
        ("", "no volume name"),
    ];
    for (body, want) in cases {
        let e = err(&p.app, "VolumeDriver.Create", body).await;
        assert!(e.contains(want), "{body:?}: {e:?} lacks {want:?}");
    }
    // Every mutating endpoint refuses an empty body (a retried request whose
    // body was already consumed) instead of guessing.
    for ep in ["VolumeDriver.Remove", "VolumeDriver.Mount", "VolumeDriver.Unmount"] {
        let (s, v) = docker_call(&p.app, ep, None).await;
        assert_eq!(s, 500, "{ep}: {v}");
        assert!(v["Err"].as_str().unwrap().contains("no volume name"), "{ep}: {v}");
    }
    let e = err(&p.app, "VolumeDriver.Mount", r#"{"Name":"ghost","ID":"abc"}"#).await;
    assert!(e.contains("ghost"), "{e}");
    assert_eq!(
        datastore_entries(&p),
        Vec::<PathBuf>::new(),
        "bad input changed the datastore"
    );
    assert!(
        sys.calls().is_empty(),
        "bad input reached the kernel: {:?}",
        sys.calls()
    );
    assert_eq!(p.manager.snapshot().mounts.len(), 0);
}

#[tokio::test]
async fn mount_formats_once_refcounts_ids_and_unmount_detaches_at_zero() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"vol","Opts":{"size":"1gb"}}"#).await;
    let mp = p.mount_root().join("vol@local/data").display().to_string();

    let v = ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"vol","ID":"id-one"}"#).await;
    assert_eq!(v["Mountpoint"], mp);
    assert!(
        std::fs::read_dir(&mp).unwrap().next().is_none(),
        "data dir of a fresh volume must be empty"
    );
    // Same ID again (Docker does this for `docker cp` into a running
    // container): counted, no second mount, and owed its own Unmount.
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"vol","ID":"id-one"}"#).await;
    let v = ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"vol@local","ID":"id-two"}"#).await;
    assert_eq!(v["Mountpoint"], mp);
    assert_eq!(sys.count(|c| matches!(c, SysCall::Mkfs { .. })), 1);
    assert_eq!(sys.count(|c| matches!(c, SysCall::Mount { .. })), 1);
    let st = ok(&p.app, "VolumeDriver.Get", r#"{"Name":"vol"}"#).await["Volume"]["Status"].clone();
    assert_eq!(st["attached to VM"], "vm-test");
    assert_eq!(st["mounts"], 2);
    // The label is the volume name.
    assert!(sys
        .calls()
        .iter()
        .any(|c| matches!(c, SysCall::Mkfs { label, fstype: vmdk_protocol::FsType::Ext4, .. } if label == "vol")));

    // Removing a mounted volume is refused with the original's text.
    let e = err(&p.app, "VolumeDriver.Remove", r#"{"Name":"vol"}"#).await;
    assert_eq!(
        e,
        "Remove failure - volume is still mounted.  volume=vol@local, refcount=2"
    );

    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"vol","ID":"id-one"}"#).await;
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"vol","ID":"id-one"}"#).await;
    assert_eq!(
        sys.count(|c| matches!(c, SysCall::Unmount { .. })),
        0,
        "still used by id-two"
    );
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"vol","ID":"never-mounted"}"#).await;
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"vol","ID":"id-two"}"#).await;
    assert_eq!(sys.count(|c| matches!(c, SysCall::Unmount { .. })), 1);
    let st = ok(&p.app, "VolumeDriver.Get", r#"{"Name":"vol"}"#).await["Volume"]["Status"].clone();
    assert_eq!(st["attached to VM"], "detached");
    assert!(p.loops.list().unwrap().is_empty(), "loop device leaked");
    assert!(!p.mount_root().join("vol@local").exists(), "mount dir left behind");

    // A second use finds the filesystem and does not format again.
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"vol","ID":"id-three"}"#).await;
    assert_eq!(sys.count(|c| matches!(c, SysCall::Mkfs { .. })), 1);
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"vol","ID":"id-three"}"#).await;
    ok(&p.app, "VolumeDriver.Remove", r#"{"Name":"vol"}"#).await;
}

#[tokio::test]
async fn concurrent_mounts_of_one_volume_attach_once() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"busy"}"#).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let app = p.app.clone();
        tasks.push(tokio::spawn(async move {
            ok(
                &app,
                "VolumeDriver.Mount",
                &format!(r#"{{"Name":"busy","ID":"id{i}"}}"#),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(sys.count(|c| matches!(c, SysCall::Mount { .. })), 1);
    assert_eq!(p.manager.snapshot().mounts["busy@local"].ids.len(), 16);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let app = p.app.clone();
        tasks.push(tokio::spawn(async move {
            ok(
                &app,
                "VolumeDriver.Unmount",
                &format!(r#"{{"Name":"busy","ID":"id{i}"}}"#),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(sys.count(|c| matches!(c, SysCall::Unmount { .. })), 1);
    assert!(p.manager.snapshot().mounts.is_empty());
    assert!(p.loops.list().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_mount_rolls_back_because_docker_sends_no_unmount() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"fragile"}"#).await;
    *sys.fail_mkfs.lock().unwrap() = true;
    let e = err(&p.app, "VolumeDriver.Mount", r#"{"Name":"fragile","ID":"x"}"#).await;
    assert!(
        e.contains("make filesystem failed") && e.contains("scripted failure"),
        "{e}"
    );
    assert!(p.loops.list().unwrap().is_empty(), "attachment leaked");
    assert!(p.manager.snapshot().mounts.is_empty());
    let st = ok(&p.app, "VolumeDriver.Get", r#"{"Name":"fragile"}"#).await["Volume"]["Status"].clone();
    assert_eq!(st["attached to VM"], "detached");
    *sys.fail_mkfs.lock().unwrap() = false;
    *sys.fail_mount.lock().unwrap() = true;
    let e = err(&p.app, "VolumeDriver.Mount", r#"{"Name":"fragile","ID":"x"}"#).await;
    assert!(e.contains("mount failed"), "{e}");
    assert!(p.loops.list().unwrap().is_empty(), "attachment leaked");
    assert!(!p.mount_root().join("fragile@local").exists());
    *sys.fail_mount.lock().unwrap() = false;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"fragile","ID":"x"}"#).await;
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"fragile","ID":"x"}"#).await;
}

#[tokio::test]
async fn read_only_volumes_mount_read_only_with_a_data_dir() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(
        &p.app,
        "VolumeDriver.Create",
        r#"{"Name":"ro","Opts":{"access":"read-only"}}"#,
    )
    .await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"ro","ID":"a"}"#).await;
    let calls = sys.calls();
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, SysCall::Mount { read_only: true, .. })),
        "{calls:?}"
    );
    // The fresh filesystem got its data dir through a brief read-write remount.
    assert!(calls.contains(&SysCall::Remount {
        target: p.mount_root().join("ro@local"),
        read_only: true
    }));
    assert!(p.mount_root().join("ro@local/data").is_dir());
    assert!(p.manager.snapshot().mounts["ro@local"].read_only);
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"ro","ID":"a"}"#).await;
}

#[tokio::test]
async fn mount_state_survives_a_plugin_restart() {
    let sys = Arc::new(FakeSys::default());
    let mut p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"keep"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"keep","ID":"live-id"}"#).await;
    let state: Value = serde_json::from_slice(&std::fs::read(p.state_dir().join("mounts.json")).unwrap()).unwrap();
    assert_eq!(state["version"], 1);
    assert!(state["mounts"]["keep@local"]["ids"]["live-id"].is_u64(), "{state}");
    // Restart with Docker unreachable: nothing is released.
    p.restart().await;
    assert!(p.manager.snapshot().mounts["keep@local"].ids.contains_key("live-id"));
    assert_eq!(sys.count(|c| matches!(c, SysCall::Unmount { .. })), 0);
    // The later Unmount with the old ID (live-restore) releases the volume.
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"keep","ID":"live-id"}"#).await;
    assert_eq!(sys.count(|c| matches!(c, SysCall::Unmount { .. })), 1);
    assert!(p.loops.list().unwrap().is_empty());
}

#[tokio::test]
async fn a_remote_agent_over_http_behaves_like_the_embedded_one() {
    use vmdk_plugin::agent_client::AgentClient;
    use vmdk_plugin::http1::Endpoint;
    use vmdk_plugin::volume::{ManagerConfig, VolumeManager};

    let dir = tempfile::tempdir().unwrap();
    let (svc, loops) = support::fake_agent(dir.path(), "shared");
    // One kernel fake for both VMs, resolving devices to the shared
    // datastore's extents: what VM A formats, VM B finds.
    let sys = Arc::new(FakeSys::default());
    *sys.loops.lock().unwrap() = Some(loops);
    let sock = dir.path().join("agent.sock");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vmdk_agent::server::serve(
        svc,
        vmdk_agent::server::Listeners {
            socket: sock.clone(),
            tcp: None,
            limits: Default::default(),
            admin: vmdk_common::admin::AdminListen::Off,
        },
        async move {
            let _ = rx.await;
        },
    ));
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600,
        "agent socket must be root-only"
    );
    let managers: Vec<_> = ["vm-a", "vm-b"]
        .iter()
        .map(|vm| {
            let m = VolumeManager::new(
                AgentClient::Http(Endpoint::Unix(sock.clone())),
                sys.clone(),
                ManagerConfig {
                    vm_id: vm.to_string(),
                    mount_root: dir.path().join(format!("mnt-{vm}")),
                    state_dir: dir.path().join(format!("state-{vm}")),
                    docker_socket: dir.path().join("no-docker.sock"),
                    detach_grace: std::time::Duration::ZERO,
                },
            )
            .unwrap();
            vmdk_plugin::plugin::router(m)
        })
        .collect();
    let (a, b) = (&managers[0], &managers[1]);
    ok(a, "VolumeDriver.Create", r#"{"Name":"db","Opts":{"size":"10gb"}}"#).await;
    ok(a, "VolumeDriver.Create", r#"{"Name":"db","Opts":null}"#).await;
    let e = err(a, "VolumeDriver.Create", r#"{"Name":"x@elsewhere"}"#).await;
    assert!(e.contains("Known datastores: shared"), "{e}");
    let v = ok(b, "VolumeDriver.Get", r#"{"Name":"db"}"#).await;
    assert_eq!(v["Volume"]["Status"]["created by VM"], "vm-a");
    let names = ok(b, "VolumeDriver.List", "{}").await;
    assert_eq!(names["Volumes"][0]["Name"], "db");
    ok(a, "VolumeDriver.Mount", r#"{"Name":"db","ID":"1"}"#).await;
    // VM B cannot use a volume VM A holds, and is told who holds it.
    let e = err(b, "VolumeDriver.Mount", r#"{"Name":"db","ID":"2"}"#).await;
    assert!(e.contains("attached to VM vm-a"), "{e}");
    let e = err(b, "VolumeDriver.Remove", r#"{"Name":"db"}"#).await;
    assert_eq!(e, "Failed to remove volume db@shared, in use by VM = vm-a.");
    ok(a, "VolumeDriver.Unmount", r#"{"Name":"db","ID":"1"}"#).await;
    ok(b, "VolumeDriver.Mount", r#"{"Name":"db","ID":"2"}"#).await;
    assert_eq!(
        sys.count(|c| matches!(c, SysCall::Mkfs { .. })),
        1,
        "VM B formatted what VM A had formatted"
    );
    ok(b, "VolumeDriver.Unmount", r#"{"Name":"db","ID":"2"}"#).await;
    ok(b, "VolumeDriver.Remove", r#"{"Name":"db"}"#).await;
    let _ = tx.send(());
    server.await.unwrap().unwrap();
    assert!(!sock.exists(), "socket left behind after shutdown");
}

#[tokio::test]
async fn get_reports_a_mounted_volume_even_when_the_agent_is_unreachable() {
    use vmdk_plugin::agent_client::AgentClient;
    use vmdk_plugin::http1::Endpoint;
    use vmdk_plugin::volume::{ManagerConfig, VolumeManager};

    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"vital"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"vital@local","ID":"1"}"#).await;
    // Same state dir, but the agent is gone.
    let m = VolumeManager::new(
        AgentClient::Http(Endpoint::Unix(p.dir.path().join("nobody-listens.sock"))),
        sys,
        ManagerConfig {
            vm_id: "vm-test".into(),
            mount_root: p.mount_root(),
            state_dir: p.state_dir(),
            docker_socket: p.docker_socket(),
            detach_grace: std::time::Duration::ZERO,
        },
    )
    .unwrap();
    m.recover().await;
    let app = vmdk_plugin::plugin::router(m);
    // Docker would drop its record of a volume whose Get fails.
    let v = ok(&app, "VolumeDriver.Get", r#"{"Name":"vital@local"}"#).await;
    assert_eq!(v["Volume"]["Name"], "vital@local");
    assert_eq!(v["Volume"]["Status"]["health"], "degraded");
    assert!(v["Volume"]["Status"]["error"]
        .as_str()
        .unwrap()
        .contains("cannot reach vmdk agent"));
    // Without the agent, an unknown volume is an error, not "does not exist".
    let e = err(&app, "VolumeDriver.Get", r#"{"Name":"other"}"#).await;
    assert!(e.contains("cannot reach vmdk agent"), "{e}");
}

/// Reads one HTTP/1.1 response (status line, headers, Content-Length body)
/// from a stream that stays open for the next request.
async fn read_response(r: &mut tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>) -> (String, Vec<String>, String) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut status = String::new();
    r.read_line(&mut status).await.unwrap();
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        headers.push(line);
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.unwrap();
    (status.trim_end().to_owned(), headers, String::from_utf8(body).unwrap())
}

/// The served socket, spoken to with the bytes Docker's Go plugin client
/// writes (moby pkg/plugins/client.go): POST, no Content-Type, `Accept`
/// of the plugin API, `Content-Length: 0` for Activate, a JSON body with a
/// trailing newline otherwise, and one keep-alive connection for all calls.
#[tokio::test]
async fn the_served_socket_answers_dockers_exact_bytes_on_one_connection() {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncWriteExt;
    use vmdk_plugin::agent_client::AgentClient;

    let dir = tempfile::tempdir().unwrap();
    let (svc, loops) = support::fake_agent(dir.path(), "local");
    let sys = Arc::new(FakeSys::default());
    *sys.loops.lock().unwrap() = Some(loops);
    // Docker looks in /run/docker/plugins; the folder may not exist yet.
    let sock = dir.path().join("run/docker/plugins/vmdk.sock");
    let cfg = vmdk_plugin::config::ServeConfig {
        agent_config: None,
        vm_id_source: vmdk_plugin::config::VmIdSource::Flag,
        socket: sock.clone(),
        agent: None,
        datastores: Vec::new(),
        vm_id: "vm-1".into(),
        mount_root: dir.path().join("mnt"),
        state_dir: dir.path().join("state"),
        docker_socket: dir.path().join("no-docker.sock"),
        reconcile_interval: 0,
        detach_grace: 0,
        limits: Default::default(),
        admin_listen: vmdk_common::admin::AdminListen::Off,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vmdk_plugin::serve::run_with(
        cfg,
        AgentClient::Embedded(svc),
        sys,
        async move {
            let _ = rx.await;
        },
    ));
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o660);

    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let mut call = async |endpoint: &str, body: &str| {
        let req = format!(
            "POST /{endpoint} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nUser-Agent: Go-http-client/1.1\r\n\
             Content-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nAccept-Encoding: gzip\r\n\r\n{body}",
            body.len()
        );
        wr.write_all(req.as_bytes()).await.unwrap();
        let (status, headers, body) = read_response(&mut rd).await;
        let json: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{endpoint}: not JSON ({e}): {body:?}"));
        (status, headers, json)
    };

    let (status, headers, v) = call("Plugin.Activate", "").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case("content-type: application/vnd.docker.plugins.v1.1+json")),
        "{headers:?}"
    );
    assert_eq!(v, serde_json::json!({"Implements": ["VolumeDriver"]}));
    let (status, _, v) = call("VolumeDriver.Get", "{\"Name\":\"web\"}\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(v["Volume"], Value::Null);
    let (status, _, v) = call(
        "VolumeDriver.Create",
        "{\"Name\":\"web\",\"Opts\":{\"size\":\"1gb\"}}\n",
    )
    .await;
    assert_eq!(
        (status.as_str(), &v["Err"]),
        ("HTTP/1.1 200 OK", &Value::String(String::new()))
    );
    let (_, _, v) = call("VolumeDriver.Get", "{\"Name\":\"web\"}\n").await;
    assert_eq!(v["Volume"]["Name"], "web");
    assert_eq!(v["Volume"]["Status"]["capacity"]["size"], "1GB");
    let (_, _, v) = call("VolumeDriver.Mount", "{\"Name\":\"web\",\"ID\":\"5f1c\"}\n").await;
    let mountpoint = dir.path().join("mnt/web@local/data");
    assert_eq!(v["Mountpoint"], mountpoint.display().to_string());
    // An error is a 500 whose JSON `Err` carries the cause: it is all the
    // user sees.
    let (status, _, v) = call("VolumeDriver.Create", "{\"Name\":\"../x\",\"Opts\":null}\n").await;
    assert_eq!(status, "HTTP/1.1 500 Internal Server Error");
    assert!(v["Err"].as_str().unwrap().contains("../x"), "{v}");
    let (_, _, v) = call("VolumeDriver.Unmount", "{\"Name\":\"web\",\"ID\":\"5f1c\"}\n").await;
    assert_eq!(v["Err"], "");
    let (_, _, v) = call("VolumeDriver.Capabilities", "").await;
    assert_eq!(v["Capabilities"]["Scope"], "global");
    drop((rd, wr));

    let _ = tx.send(());
    server.await.unwrap().unwrap();
    assert!(!sock.exists(), "socket left behind after shutdown");
}

/// Unmount names its volume: an ID that two volumes hold (a caller that
/// reuses IDs) releases the named one only, and an ID the named volume
/// does not hold releases nothing, even when another volume holds it.
#[tokio::test]
async fn unmount_releases_the_named_volume_only() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    for v in ["a", "b"] {
        ok(&p.app, "VolumeDriver.Create", &format!(r#"{{"Name":"{v}"}}"#)).await;
        ok(
            &p.app,
            "VolumeDriver.Mount",
            &format!(r#"{{"Name":"{v}","ID":"same"}}"#),
        )
        .await;
    }
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"b","ID":"b-only"}"#).await;
    let mounts = async |v: &str| ok(&p.app, "VolumeDriver.Get", &format!(r#"{{"Name":"{v}"}}"#)).await;
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"a","ID":"b-only"}"#).await;
    assert_eq!(mounts("b").await["Volume"]["Status"]["mounts"], 2);
    assert_eq!(mounts("a").await["Volume"]["Status"]["mounts"], 1);
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"a","ID":"same"}"#).await;
    assert_eq!(mounts("a").await["Volume"]["Status"]["status"], "detached");
    assert_eq!(mounts("b").await["Volume"]["Status"]["mounts"], 2);
    assert_eq!(sys.count(|c| matches!(c, SysCall::Unmount { .. })), 1);
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"b@local","ID":"same"}"#).await;
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"b","ID":"b-only"}"#).await;
    assert_eq!(mounts("b").await["Volume"]["Status"]["status"], "detached");
}

/// With `--detach-grace`, the last Unmount leaves the volume mounted and
/// attached for the grace period: Docker's Mount/Unmount/Mount (copy-up,
/// `docker cp`) reuses it without a second attach, and it is released
/// once the grace runs out. Remove in the grace releases it at once.
#[tokio::test]
async fn detach_grace_keeps_a_volume_briefly_after_its_last_unmount() {
    let sys = Arc::new(FakeSys::default());
    let mut p = fake_plugin(sys.clone()).await;
    let grace = std::time::Duration::from_millis(400);
    p.restart_with_grace(grace).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"db"}"#).await;
    let status = async |app: &axum::Router| {
        ok(app, "VolumeDriver.Get", r#"{"Name":"db"}"#).await["Volume"]["Status"]["status"].clone()
    };
    let mounts = |sys: &FakeSys| sys.count(|c| matches!(c, SysCall::Mount { .. }));
    let unmounts = |sys: &FakeSys| sys.count(|c| matches!(c, SysCall::Unmount { .. }));

    // populateVolume's pair, then the container's own Mount.
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"db","ID":"copy-up"}"#).await;
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"db","ID":"copy-up"}"#).await;
    assert_eq!((mounts(&sys), unmounts(&sys)), (1, 0));
    assert_eq!(status(&p.app).await, "attached");
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"db","ID":"container"}"#).await;
    assert_eq!(
        (mounts(&sys), unmounts(&sys)),
        (1, 0),
        "the second Mount reused the first"
    );

    // The grace of the copy-up's Unmount must not release the container's mount.
    tokio::time::sleep(grace * 2).await;
    assert_eq!(unmounts(&sys), 0);
    assert_eq!(status(&p.app).await, "attached");

    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"db","ID":"container"}"#).await;
    assert_eq!(unmounts(&sys), 0);
    let mut released = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if unmounts(&sys) == 1 && status(&p.app).await == "detached" {
            released = true;
            break;
        }
    }
    assert!(released, "not released after the grace period");
    assert!(p.loops.list().unwrap().is_empty());

    // Remove during the grace: released at once, then removed.
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"db","ID":"again"}"#).await;
    ok(&p.app, "VolumeDriver.Unmount", r#"{"Name":"db","ID":"again"}"#).await;
    ok(&p.app, "VolumeDriver.Remove", r#"{"Name":"db"}"#).await;
    assert_eq!(unmounts(&sys), 2);
    assert!(p.loops.list().unwrap().is_empty());
    assert_eq!(
        ok(&p.app, "VolumeDriver.Get", r#"{"Name":"db"}"#).await["Volume"],
        Value::Null
    );
    // The pending release finds nothing to do.
    tokio::time::sleep(grace * 2).await;
    assert_eq!(unmounts(&sys), 2);
}

/// `vmdk-plugin status` reads the state the daemon left and checks it
/// against the live mounts, as JSON for scripts and as a table.
#[tokio::test]
async fn status_command_shows_what_the_plugin_holds() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys.clone()).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"db"}"#).await;
    ok(&p.app, "VolumeDriver.Mount", r#"{"Name":"db","ID":"c1"}"#).await;
    let run = |format: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmdk-plugin"))
            .args(["status", "--format", format, "--socket"])
            .arg(p.dir.path().join("nobody.sock"))
            .arg("--mount-root")
            .arg(p.mount_root())
            .arg("--state-dir")
            .arg(p.state_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // The fake kernel mounted nothing really: the status says so.
    let v: Value = serde_json::from_str(&run("json")).unwrap();
    assert_eq!(v["serving"], false);
    assert_eq!(v["volumes"][0]["volume"], "db@local");
    assert_eq!(v["volumes"][0]["ids"], json!(["c1"]));
    assert_eq!(v["volumes"][0]["mounted"], false);
    let problems = v["problems"].to_string();
    assert!(problems.contains("db@local is recorded but not mounted"), "{problems}");
    assert!(problems.contains("the plugin is not running"), "{problems}");
    let table = run("table");
    assert!(table.contains("db@local  /dev/fakeloop0"), "{table}");
    assert!(table.contains("Problems"), "{table}");
}

/// A volume whose sidecar is damaged still exists: Get reports it with the
/// cause in its Status (an error would make Docker forget the volume),
/// while Mount fails with that cause.
#[tokio::test]
async fn get_reports_a_damaged_volume_instead_of_an_error() {
    let sys = Arc::new(FakeSys::default());
    let p = fake_plugin(sys).await;
    ok(&p.app, "VolumeDriver.Create", r#"{"Name":"dmg"}"#).await;
    let sidecar = p.datastore().join("dockvols/_DEFAULT/dmg.vmfd");
    std::fs::write(&sidecar, "{").unwrap();
    let v = ok(&p.app, "VolumeDriver.Get", r#"{"Name":"dmg"}"#).await;
    assert_eq!(v["Volume"]["Name"], "dmg");
    assert_eq!(v["Volume"]["Status"]["health"], "degraded");
    assert_eq!(v["Volume"]["Status"]["mounts"], 0);
    let why = v["Volume"]["Status"]["error"].as_str().unwrap();
    assert!(why.contains("dmg.vmfd"), "{why}");
    let e = err(&p.app, "VolumeDriver.Mount", r#"{"Name":"dmg","ID":"x"}"#).await;
    assert!(e.contains("dmg.vmfd"), "{e}");
    // A name with no files at all is still "no such volume".
    assert_eq!(
        ok(&p.app, "VolumeDriver.Get", r#"{"Name":"nothing"}"#).await["Volume"],
        Value::Null
    );
}

/// Loop devices whose listing (the embedded agent's first start-up check)
/// waits until the test opens the gate.
#[derive(Debug, Default)]
struct GatedLoops {
    inner: vmdk_agent::backend::loopdev::FakeLoops,
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    /// Told when a listing waits at the closed gate.
    waiting: tokio::sync::Notify,
}

impl GatedLoops {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl vmdk_agent::backend::loopdev::LoopDevices for GatedLoops {
    fn attach(&self, file: &std::fs::File, name: &std::path::Path) -> std::io::Result<PathBuf> {
        self.inner.attach(file, name)
    }
    fn backing(&self, device: &std::path::Path) -> std::io::Result<Option<vmdk_agent::store::FileId>> {
        self.inner.backing(device)
    }
    fn detach(&self, device: &std::path::Path, backing: vmdk_agent::store::FileId) -> std::io::Result<()> {
        self.inner.detach(device, backing)
    }
    fn list(&self) -> std::io::Result<Vec<(PathBuf, PathBuf)>> {
        let mut open = self.open.lock().unwrap();
        if !*open {
            self.waiting.notify_one();
        }
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        self.inner.list()
    }
}

/// `vmdk-plugin serve` serves its socket before the embedded agent's
/// start-up checks are done: Activate, Capabilities, Get, List and Path
/// answer meanwhile, and a Create waits for the checks (and the plugin's
/// recovery after them), then succeeds, as does a Mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_answers_reads_while_the_agents_start_up_checks_run() {
    use vmdk_agent::backend::local::LocalBackend;
    use vmdk_agent::config::AgentConfig;
    use vmdk_agent::service::Caller;
    use vmdk_plugin::agent_client::AgentClient;
    use vmdk_plugin::http1::{self, Endpoint};

    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let mut acfg = AgentConfig::default();
    acfg.add_datastore_flag(&format!("local={}", ds.display())).unwrap();
    let loops = Arc::new(GatedLoops::default());
    let svc = Arc::new(vmdk_agent::VolumeService::new(&acfg, Arc::new(LocalBackend::new(loops.clone()))).unwrap());
    let req = vmdk_protocol::CreateRequest {
        name: "old".into(),
        opts: Default::default(),
    };
    svc.create(&Caller::vm("vm-1").unwrap(), &req).await.unwrap();
    let sys = Arc::new(FakeSys::default());
    *sys.loops.lock().unwrap() = Some(loops.clone());
    let sock = dir.path().join("vmdk.sock");
    let cfg = vmdk_plugin::config::ServeConfig {
        agent_config: None,
        vm_id_source: vmdk_plugin::config::VmIdSource::Flag,
        socket: sock.clone(),
        agent: None,
        datastores: Vec::new(),
        vm_id: "vm-1".into(),
        mount_root: dir.path().join("mnt"),
        state_dir: dir.path().join("state"),
        docker_socket: dir.path().join("no-docker.sock"),
        reconcile_interval: 0,
        detach_grace: 0,
        limits: Default::default(),
        admin_listen: vmdk_common::admin::AdminListen::Off,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let waiting = loops.waiting.notified();
    let server = tokio::spawn(vmdk_plugin::serve::run_with(
        cfg,
        AgentClient::Embedded(svc),
        sys,
        async move {
            let _ = rx.await;
        },
    ));
    // The agent's checks are under way, held at the gate.
    waiting.await;
    let ep = Endpoint::Unix(sock.clone());
    let call = |endpoint: &'static str, body: &'static str| {
        let ep = ep.clone();
        async move {
            let (status, bytes) = http1::request(
                &ep,
                hyper::Method::POST,
                &format!("/{endpoint}"),
                &[],
                Some(body.as_bytes().to_vec()),
                std::time::Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            assert!(status.is_success(), "{endpoint} {body}: {status} {v}");
            v
        }
    };
    let v = call("Plugin.Activate", "").await;
    assert_eq!(v, json!({"Implements": ["VolumeDriver"]}));
    let v = call("VolumeDriver.Capabilities", "").await;
    assert_eq!(v["Capabilities"]["Scope"], "global");
    let v = call("VolumeDriver.Get", r#"{"Name":"old"}"#).await;
    assert_eq!(v["Volume"]["Name"], "old", "{v}");
    let v = call("VolumeDriver.List", "").await;
    assert_eq!(v["Volumes"][0]["Name"], "old", "{v}");
    let v = call("VolumeDriver.Path", r#"{"Name":"old"}"#).await;
    assert_eq!(
        v["Mountpoint"],
        dir.path().join("mnt/old@local/data").display().to_string()
    );
    // A Create waits for the checks: the volume is not made meanwhile.
    let create = tokio::spawn(call("VolumeDriver.Create", r#"{"Name":"new"}"#));
    let v = call("VolumeDriver.Get", r#"{"Name":"new"}"#).await;
    assert_eq!(v["Volume"], Value::Null, "{v}");
    assert!(!create.is_finished());
    loops.open();
    assert_eq!(create.await.unwrap()["Err"], "");
    let v = call("VolumeDriver.Get", r#"{"Name":"new"}"#).await;
    assert_eq!(v["Volume"]["Name"], "new", "{v}");
    let v = call("VolumeDriver.Mount", r#"{"Name":"old","ID":"c1"}"#).await;
    assert_eq!(v["Err"], "", "{v}");
    call("VolumeDriver.Unmount", r#"{"Name":"old","ID":"c1"}"#).await;
    let _ = tx.send(());
    server.await.unwrap().unwrap();
}
