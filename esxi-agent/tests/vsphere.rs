//! The agent with the `vsphere` backend against govmomi's simulator, in the
//! vCenter (VPX) and the standalone-host (ESX) models: every operation of
//! the volume service, with its effect checked independently through
//! pyvmomi (tests/vcsim/inspect.py) and the simulator's datastore files.

#[path = "../../tests/support/vcsim.rs"]
mod vcsim;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use vcsim::{Model, Sim};
use vmdk_agent::backend::vsphere::profile_identity;
use vmdk_agent::config::AgentConfig;
use vmdk_agent::policy::PolicyExpr;
use vmdk_agent::service::Caller;
use vmdk_agent::{AgentError, VolumeService};
use vmdk_protocol::{CreateRequest, DiskLocation, ErrorCode};

struct Env {
    sim: Sim,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Env {
    fn new(model: Model, extra: &[&str]) -> Self {
        Self::with_config(model, extra, "")
    }

    /// A simulator started with `extra` flags and an agent configuration
    /// for it, with `toml` appended (e.g. `[[datastore]]` entries).
    fn with_config(model: Model, extra: &[&str], toml: &str) -> Self {
        let sim = Sim::start(model, extra);
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("vsphere.toml");
        std::fs::write(
            &creds,
            format!("user = {:?}\npassword = {:?}\n", sim.user(), sim.password()),
        )
        .unwrap();
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "backend = \"vsphere\"\n{toml}\n[vsphere]\nurl = {:?}\ncredentials = {:?}\nthumbprint = {:?}\n",
                sim.url(),
                creds.display().to_string(),
                sim.info["thumbprint_sha256"].as_str().unwrap()
            ),
        )
        .unwrap();
        Env { sim, dir, config }
    }

    fn agent_config(&self) -> AgentConfig {
        AgentConfig::from_file(&self.config).unwrap()
    }

    async fn service(&self) -> VolumeService {
        VolumeService::from_config(&self.agent_config())
            .await
            .expect("the agent connects to the simulator")
    }

    fn vm(&self, i: usize) -> Caller {
        Caller::vm(self.sim.vm(i)["uuid"].as_str().unwrap()).unwrap()
    }

    fn vm_uuid(&self, i: usize) -> &str {
        self.sim.vm(i)["uuid"].as_str().unwrap()
    }

    fn ds(&self) -> &str {
        self.sim.datastore()["name"].as_str().unwrap()
    }

    /// The simulator's files of the default vmgroup folder, as pyvmomi
    /// lists them.
    fn files(&self) -> Vec<String> {
        self.sim.files("dockvols/_DEFAULT")
    }

    /// The disks pyvmomi sees on VM `i`: (controller bus, unit, file).
    fn disks(&self, i: usize) -> Vec<(i64, i64, String)> {
        let devices = self.sim.devices(self.vm_uuid(i));
        let controllers = devices["controllers"].as_array().unwrap().clone();
        devices["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let ctl = controllers
                    .iter()
                    .find(|c| c["key"] == d["controllerKey"])
                    .unwrap_or_else(|| panic!("disk on an unknown controller: {d}"));
                (
                    ctl["busNumber"].as_i64().unwrap(),
                    d["unitNumber"].as_i64().unwrap(),
                    d["fileName"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

fn req(name: &str, opts: &[(&str, &str)]) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        opts: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

fn message(e: &AgentError) -> String {
    e.to_body().message
}

async fn every_operation(model: Model) {
    let started = Instant::now();
    let env = Env::new(model, &[]);
    let svc = env.service().await;
    let (a, b) = (env.vm(0), env.vm(1));
    let ds = env.ds().to_owned();
    assert_eq!(svc.version().backend, "vsphere");
    // Short names go to the datastore holding the VM.
    assert_eq!(svc.version_for(&a).await.home_datastore.as_deref(), Some(ds.as_str()));

    // Create: a VMDK in [ds] dockvols/_DEFAULT, with its sidecar beside it.
    let info = svc.create(&a, &req("v1", &[("size", "10mb")])).await.unwrap();
    assert_eq!(info.name, format!("v1@{ds}"));
    assert_eq!(info.capacity_bytes, 10 << 20);
    let files = env.files();
    for f in ["v1.vmdk", "v1-flat.vmdk", "v1.vmfd"] {
        assert!(files.contains(&f.to_owned()), "{f} missing: {files:?}");
    }
    let e = svc.create(&a, &req("v1", &[])).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::AlreadyExists, "{}", message(&e));
    assert_eq!(svc.get(&Caller::Admin, "v1").await.unwrap().disk_uuid, info.disk_uuid);
    let listed: Vec<String> = svc
        .list(&Caller::Admin)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.volume)
        .collect();
    assert_eq!(listed, ["v1"]);

    // Attach: a disk on a PVSCSI controller of VM a, never unit 7; again:
    // the same slot.
    let att = svc.attach(&a, "v1").await.unwrap();
    let Some(DiskLocation::Scsi {
        controller_bus,
        unit,
        disk_uuid,
        ..
    }) = att.location.clone()
    else {
        panic!("not a SCSI location: {att:?}")
    };
    assert_ne!(unit, 7);
    let want_uuid: String = info.disk_uuid.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    assert_eq!(disk_uuid.as_deref(), Some(want_uuid.to_lowercase().as_str()));
    let file = format!("[{ds}] dockvols/_DEFAULT/v1.vmdk");
    assert!(
        env.disks(0)
            .contains(&(controller_bus as i64, unit as i64, file.clone())),
        "pyvmomi does not see {file} at {controller_bus}:{unit}: {:?}",
        env.disks(0)
    );
    assert_eq!(svc.attach(&a, "v1").await.unwrap().location, att.location);
    assert_eq!(
        svc.get(&Caller::Admin, "v1").await.unwrap().attached_to.as_deref(),
        Some(env.vm_uuid(0))
    );

    // Exclusive: VM b is refused, naming VM a; remove and clone are refused.
    let e = svc.attach(&b, "v1").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::AttachedElsewhere, "{}", message(&e));
    assert!(message(&e).contains(env.vm_uuid(0)), "{}", message(&e));
    let e = svc.remove(&a, "v1").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InUse, "{}", message(&e));
    let e = svc.create(&a, &req("copy", &[("clone-from", "v1")])).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InUse, "{}", message(&e));

    // Detach removes the device, never the file.
    svc.detach(&a, "v1").await.unwrap();
    assert!(!env.disks(0).iter().any(|d| d.2 == file), "{:?}", env.disks(0));
    assert!(env.files().contains(&"v1-flat.vmdk".to_owned()));
    svc.detach(&a, "v1").await.unwrap();

    // Now VM b may have it.
    svc.attach(&b, "v1").await.unwrap();
    assert!(env.disks(1).iter().any(|d| d.2 == file));
    svc.detach(&b, "v1").await.unwrap();

    // Clone with CopyVirtualDisk_Task.
    let copy = svc.create(&a, &req("copy", &[("clone-from", "v1")])).await.unwrap();
    assert_eq!(copy.capacity_bytes, 10 << 20);
    assert_eq!(copy.clone_from.as_deref(), Some(format!("v1@{ds}").as_str()));
    assert_ne!(copy.disk_uuid, info.disk_uuid);

    // Remove with DeleteVirtualDisk_Task: files gone.
    svc.remove(&a, "copy").await.unwrap();
    svc.remove(&a, "v1").await.unwrap();
    let left = env.files();
    assert!(
        left.iter().all(|f| !f.starts_with("v1") && !f.starts_with("copy")),
        "{left:?}"
    );
    let e = svc.get(&Caller::Admin, "v1").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound);

    // An unknown VM is an error naming it; nothing is attached.
    svc.create(&a, &req("v2", &[])).await.unwrap();
    let stranger = Caller::vm("11111111-2222-3333-4444-555555555555").unwrap();
    let e = svc.attach(&stranger, "v2").await.unwrap_err();
    assert!(
        message(&e).contains("11111111-2222-3333-4444-555555555555"),
        "{}",
        message(&e)
    );
    assert_eq!(svc.get(&Caller::Admin, "v2").await.unwrap().attached_to, None);
    // It cannot create volumes it could never attach either.
    let e = svc.create(&stranger, &req("v4", &[])).await.unwrap_err();
    assert!(
        message(&e).contains("11111111-2222-3333-4444-555555555555"),
        "{}",
        message(&e)
    );
    assert_eq!(
        svc.get(&Caller::Admin, "v4").await.unwrap_err().code(),
        ErrorCode::NotFound
    );
    // A datastore that does not exist.
    let e = svc.create(&a, &req("v3@nowhere", &[])).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::UnknownDatastore, "{}", message(&e));
    eprintln!("{model:?}: every operation in {:?}", started.elapsed());
}

#[tokio::test]
async fn vpx_every_operation() {
    every_operation(Model::Vpx).await;
}

#[tokio::test]
async fn esx_every_operation() {
    every_operation(Model::Esx).await;
}

/// Four PVSCSI controllers full: the allocator never uses unit 7, adds
/// controllers up to four, and the next attach is the original's
/// "maximum number of supported volumes".
#[tokio::test]
async fn a_vm_holds_at_most_four_full_controllers() {
    let started = Instant::now();
    let env = Env::new(Model::Vpx, &[]);
    let svc = env.service().await;
    let a = env.vm(0);
    let before = env.disks(0).len();
    let mut attached = 0;
    let refused = loop {
        let name = format!("d{attached:02}");
        svc.create(&a, &req(&name, &[("size", "1mb")])).await.unwrap();
        match svc.attach(&a, &name).await {
            Ok(_) => attached += 1,
            Err(e) => break e,
        }
        assert!(attached <= 60, "more than 60 disks attached");
    };
    assert_eq!(refused.code(), ErrorCode::NoFreeSlot, "{}", message(&refused));
    assert!(
        message(&refused).contains("maximum number of supported volumes"),
        "{}",
        message(&refused)
    );
    let disks = env.disks(0);
    let devices = env.sim.devices(env.vm_uuid(0));
    let pvscsi: Vec<&Value> = devices["controllers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["type"].as_str().unwrap_or_default().contains("ParaVirtual"))
        .collect();
    assert_eq!(pvscsi.len(), 4, "{devices}");
    assert!(disks.iter().all(|(_, unit, _)| *unit != 7 && *unit < 16), "{disks:?}");
    for bus in 0..4 {
        assert!(disks.iter().filter(|(b, _, _)| *b == bus).count() <= 15);
    }
    assert_eq!(disks.len(), before + attached);
    eprintln!(
        "{attached} volumes attached to one VM, then refused, in {:?}",
        started.elapsed()
    );
}

/// Connection errors are clear and name what was wrong.
#[tokio::test]
async fn wrong_password_and_wrong_certificate() {
    let env = Env::new(Model::Vpx, &["-username", "vmdk", "-password", "right"]);
    let mut cfg = env.agent_config();
    let creds = cfg.vsphere.as_ref().unwrap().credentials.clone();
    std::fs::write(&creds, "user = \"vmdk\"\npassword = \"wrong-pw\"\n").unwrap();
    let e = VolumeService::from_config(&cfg).await.unwrap_err();
    let m = message(&e);
    assert!(m.contains("vmdk") && !m.contains("wrong-pw"), "{m}");
    std::fs::write(&creds, "user = \"vmdk\"\npassword = \"right\"\n").unwrap();
    VolumeService::from_config(&cfg).await.unwrap();
    cfg.vsphere.as_mut().unwrap().thumbprint =
        Some("00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF".into());
    let e = VolumeService::from_config(&cfg).await.unwrap_err();
    assert!(message(&e).contains("fingerprint"), "{}", message(&e));
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = VolumeService::from_config(&env.agent_config()).await.unwrap_err();
    assert!(message(&e).contains("chmod 600"), "{}", message(&e));
}

// ---------------------------------------------------------------------------
// Through the agent's API (the router `vmdk-agent serve` runs) and its admin
// CLI, with the effects read back by pyvmomi and from the simulator's
// datastore directories.

/// The agent's HTTP API in-process.
#[derive(Clone)]
struct Api {
    app: axum::Router,
}

impl Api {
    fn new(svc: VolumeService) -> Self {
        Api {
            app: vmdk_agent::api::router(Arc::new(svc)),
        }
    }

    async fn call(&self, method: Method, path: &str, vm: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(vm) = vm {
            req = req.header("VM-Id", vm);
        }
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
        let resp = self.app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
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

    async fn create(&self, vm: &str, name: &str, opts: Value) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            "/v1/volumes",
            Some(vm),
            Some(json!({"name": name, "opts": opts})),
        )
        .await
    }

    async fn get(&self, name: &str) -> (StatusCode, Value) {
        self.call(Method::GET, &format!("/v1/volumes/{name}"), Some("admin-check"), None)
            .await
    }

    async fn attach(&self, vm: &str, name: &str) -> (StatusCode, Value) {
        self.call(Method::POST, &format!("/v1/volumes/{name}/attach"), Some(vm), None)
            .await
    }
}

impl Env {
    /// Runs the `vmdk-agent` binary with this agent configuration.
    fn agent(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vmdk-agent"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("VMDK_LOG", "warn")
            .output()
            .unwrap()
    }

    fn agent_ok(&self, args: &[&str]) -> String {
        let out = self.agent(args);
        assert!(
            out.status.success(),
            "vmdk-agent {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Datastore `i`'s directory on this host (the simulator's files).
    fn ds_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(self.sim.info["datastores"][i]["path"].as_str().unwrap())
    }

    /// A volume's sidecar as the datastore holds it, read directly.
    fn sidecar(&self, ds: usize, volume: &str) -> Option<Value> {
        let file = self.ds_dir(ds).join(format!("dockvols/_DEFAULT/{volume}.vmfd"));
        let bytes = std::fs::read(file).ok()?;
        Some(serde_json::from_slice(&bytes).unwrap())
    }

    /// The storage profiles pyvmomi reads through PBM.
    fn profiles(&self) -> Vec<Value> {
        self.sim.inspect(&["profiles"]).as_array().unwrap().clone()
    }

    /// The profile ids pyvmomi reads through PBM for the disk of VM `i`
    /// backed by `file`; `None` when the VM has no such disk.
    fn disk_profiles(&self, i: usize, file: &str) -> Option<Vec<String>> {
        let disks = self.sim.inspect(&["disk-profiles", "--vm-uuid", self.vm_uuid(i)]);
        disks
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["fileName"] == file)
            .map(|d| {
                d["profiles"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap().to_owned())
                    .collect()
            })
    }

    fn power(&self, i: usize, on: bool) {
        let v = self
            .sim
            .inspect(&[if on { "power-on" } else { "power-off" }, "--vm-uuid", self.vm_uuid(i)]);
        let want = if on { "poweredOn" } else { "poweredOff" };
        assert_eq!(v["powerState"], want, "{v}");
    }

    fn has_disk(&self, i: usize, file: &str) -> bool {
        self.disks(i).iter().any(|d| d.2 == file)
    }

    fn ds_name(&self, i: usize) -> &str {
        self.sim.info["datastores"][i]["name"].as_str().unwrap()
    }

    /// `[ds] dockvols/_DEFAULT/<volume>.vmdk` on datastore `i`.
    fn disk_file(&self, i: usize, volume: &str) -> String {
        format!("[{}] dockvols/_DEFAULT/{volume}.vmdk", self.ds_name(i))
    }
}

const SW2: &str = r#"(("stripeWidth" i2))"#;
const SW3: &str = r#"(("stripeWidth" i3))"#;

fn profile_name(policy: &str, content: &str) -> String {
    profile_identity(policy, &PolicyExpr::parse(content).unwrap()).0
}

/// On vCenter a VSAN policy becomes an SPBM profile that vmdk creates once,
/// owns and never changes: the disk gets it when it is created and when it
/// is attached; a policy update makes a new profile, which an attached disk
/// gets at once and a detached one at its next attach. A profile vmdk did
/// not create is never used, and a non-VSAN datastore refuses policies.
#[tokio::test]
async fn vpx_policy_becomes_a_storage_profile_vmdk_owns() {
    let started = Instant::now();
    let env = Env::new(Model::Vpx, &["-ds", "2", "-vsan", "1"]);
    let (a, b) = (env.vm_uuid(0).to_owned(), env.vm_uuid(1).to_owned());
    let vsan = env.ds_name(0).to_owned();
    let plain = env.ds_name(1).to_owned();
    assert_eq!(env.sim.inspect(&["datastores"])[0]["type"], "vsan");

    // The admin CLI keeps the policy on the VSAN datastore, through vSphere.
    let out = env.agent_ok(&["policy", "create", "--name", "SW=2", "--content", SW2]);
    assert!(out.contains("Successfully created policy: SW=2"), "{out}");
    assert_eq!(
        std::fs::read_to_string(env.ds_dir(0).join("dockvols/policies/SW=2")).unwrap(),
        format!("{SW2}\n")
    );
    let listed = env.agent_ok(&["policy", "ls"]);
    assert!(listed.contains("SW=2") && listed.contains("Unused"), "{listed}");

    let api = Api::new(env.service().await);
    let before = env.profiles();
    let sw2 = profile_name("SW=2", SW2);

    // Create: the profile is made and given to the disk.
    let (st, v) = api
        .create(&a, "p1", json!({"size": "10mb", "vsan-policy-name": "SW=2"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["vsan_policy"], "SW=2");
    assert_eq!(v["vsan_policy_state"]["state"], "applied", "{v}");
    assert_eq!(v["vsan_policy_state"]["profile"], sw2.as_str());
    let id = v["vsan_policy_state"]["profile_id"].as_str().unwrap().to_owned();
    let after = env.profiles();
    assert_eq!(after.len(), before.len() + 1, "{after:#?}");
    let ours = after
        .iter()
        .find(|p| p["name"] == sw2.as_str())
        .expect("pyvmomi lists the profile");
    assert_eq!(ours["id"], id.as_str());
    assert_eq!(
        ours["rules"],
        json!([{"namespace": "VSAN", "id": "stripeWidth", "property": "stripeWidth", "value": 2}])
    );
    assert!(ours["description"].as_str().unwrap().contains("vmdk"), "{ours}");
    for p in &before {
        assert!(after.contains(p), "a profile vmdk did not create changed: {p}");
    }
    let meta = env.sidecar(0, "p1").unwrap();
    assert_eq!(meta["volOpts"]["vsan-policy-name"], "SW=2");
    assert_eq!(meta["vsanPolicyState"]["profile_id"], id.as_str());

    // Another volume with the policy uses the same profile (the simulator,
    // like vCenter, refuses a second profile of that name).
    let (st, v) = api
        .create(&a, "p2", json!({"size": "10mb", "vsan-policy-name": "SW=2"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["vsan_policy_state"]["profile_id"], id.as_str());
    assert_eq!(env.profiles().len(), after.len());

    // The disk carries it, as PBM reports it for the VM's disk.
    let (st, v) = api.attach(&a, "p1").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(env.disk_profiles(0, &env.disk_file(0, "p1")), Some(vec![id.clone()]));

    // A datastore that is not VSAN refuses a policy; nothing is left.
    let (st, v) = api
        .create(&a, &format!("p3@{plain}"), json!({"vsan-policy-name": "SW=2"}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["code"], "invalid_policy");
    assert!(v["message"].as_str().unwrap().contains("non-VSAN"), "{v}");
    assert!(!env.ds_dir(1).join("dockvols/_DEFAULT/p3.vmdk").exists());

    // A profile of someone else under the name vmdk would use: not used,
    // not changed, and the create leaves nothing.
    env.agent_ok(&["policy", "create", "--name", "gold", "--content", SW3]);
    let gold = profile_name("gold", SW3);
    let theirs = env.sim.inspect(&[
        "profile-create",
        "--name",
        &gold,
        "--description",
        "made by someone else",
    ]);
    let (st, v) = api.create(&a, "p4", json!({"vsan-policy-name": "gold"})).await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    let m = v["message"].as_str().unwrap();
    assert!(m.contains(&gold) && m.contains("did not create"), "{m}");
    let kept = env.profiles().into_iter().find(|p| p["name"] == gold.as_str()).unwrap();
    assert_eq!(kept["id"], theirs["id"]);
    assert_eq!(kept["description"], "made by someone else");
    assert_eq!(kept["rules"][0]["value"], 1);
    let left: Vec<String> = env.files().into_iter().filter(|f| f.starts_with("p4")).collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(env.sidecar(0, "p4").is_none());

    // A policy update makes a new profile: the attached p1 gets it now, the
    // detached p2 at its next attach; the old profile is left as it was.
    let out = env.agent_ok(&["policy", "update", "--name", "SW=2", "--content", SW3]);
    assert!(out.contains("Successfully updated policy SW=2"), "{out}");
    let sw3 = profile_name("SW=2", SW3);
    let profiles = env.profiles();
    let new_id = profiles.iter().find(|p| p["name"] == sw3.as_str()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(profiles
        .iter()
        .any(|p| p["id"] == id.as_str() && p["rules"][0]["value"] == 2));
    assert_eq!(
        env.disk_profiles(0, &env.disk_file(0, "p1")),
        Some(vec![new_id.clone()])
    );
    let (_, v) = api.get(&format!("p1@{vsan}")).await;
    assert_eq!(v["vsan_policy_state"]["state"], "applied", "{v}");
    assert_eq!(v["vsan_policy_state"]["profile_id"], new_id.as_str());
    let (_, v) = api.get(&format!("p2@{vsan}")).await;
    assert_eq!(v["vsan_policy_state"]["state"], "pending", "{v}");
    let ls = env.agent_ok(&["ls"]);
    assert!(ls.contains("SW=2 (applied at next attach)"), "{ls}");
    let (st, v) = api.attach(&b, "p2").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        env.disk_profiles(1, &env.disk_file(0, "p2")),
        Some(vec![new_id.clone()])
    );
    let (_, v) = api.get(&format!("p2@{vsan}")).await;
    assert_eq!(v["vsan_policy_state"]["state"], "applied", "{v}");

    // A clone gets the profile at its first attach (vSphere copies a disk
    // without one).
    let (st, v) = api.call(Method::POST, "/v1/volumes/p2/detach", Some(&b), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let (st, v) = api
        .create(&a, "p5", json!({"clone-from": "p2", "vsan-policy-name": "SW=2"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["vsan_policy_state"]["state"], "pending", "{v}");
    assert_eq!(api.attach(&b, "p5").await.0, StatusCode::OK);
    assert_eq!(
        env.disk_profiles(1, &env.disk_file(0, "p5")),
        Some(vec![new_id.clone()])
    );
    let (_, v) = api.get(&format!("p5@{vsan}")).await;
    assert_eq!(v["vsan_policy_state"]["state"], "applied", "{v}");
    eprintln!("policies on vCenter in {:?}", started.elapsed());
}

/// Log lines, captured for a test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Without vCenter there are no storage profiles: a create with a policy
/// succeeds, the policy is recorded, and the agent says plainly, in its log,
/// its answer and `vmdk-agent ls`, that it was not applied.
#[tokio::test]
async fn esx_policy_is_recorded_and_said_not_applied() {
    let env = Env::new(Model::Esx, &["-vsan", "1"]);
    let a = env.vm_uuid(0).to_owned();
    env.agent_ok(&["policy", "create", "--name", "SW=2", "--content", SW2]);
    let logs = Logs::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );
    let api = Api::new(env.service().await);
    let (st, v) = api
        .create(&a, "r1", json!({"size": "10mb", "vsan-policy-name": "SW=2"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["vsan_policy"], "SW=2");
    assert_eq!(v["vsan_policy_state"]["state"], "recorded", "{v}");
    assert!(
        v["vsan_policy_state"]["reason"].as_str().unwrap().contains("vCenter"),
        "{v}"
    );
    let log = logs.text();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("NOT applied") && l.contains("r1@")),
        "{log}"
    );
    let meta = env.sidecar(0, "r1").unwrap();
    assert_eq!(meta["volOpts"]["vsan-policy-name"], "SW=2");
    assert_eq!(meta["vsanPolicyState"]["state"], "recorded");
    let ls = env.agent_ok(&["ls"]);
    assert!(ls.contains("SW=2 (recorded, not applied)"), "{ls}");
    // Attach and get keep working, and keep saying it.
    let (st, v) = api.attach(&a, "r1").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["volume"]["vsan_policy_state"]["state"], "recorded");
}

/// A VM that is powered off releases its volumes when the records are next
/// used, so another VM can attach them: at that VM's attach, at a get and at
/// a list. A running VM never loses a volume; the file always stays.
async fn powered_off_vm_releases_its_volumes(model: Model) {
    let started = Instant::now();
    let env = Env::new(model, &[]);
    let api = Api::new(env.service().await);
    let (a, b) = (env.vm_uuid(0).to_owned(), env.vm_uuid(1).to_owned());
    let ds = env.ds().to_owned();
    for v in ["v1", "v2", "v3"] {
        let (st, body) = api.create(&a, v, json!({"size": "1mb"})).await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
    }
    let file = |v: &str| env.disk_file(0, v);

    // At another VM's attach.
    assert_eq!(api.attach(&a, "v1").await.0, StatusCode::OK);
    env.power(0, false);
    let (st, v) = api.attach(&b, "v1").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(!env.has_disk(0, &file("v1")) && env.has_disk(1, &file("v1")));
    assert!(env.files().contains(&"v1-flat.vmdk".to_owned()));
    assert_eq!(env.sidecar(0, "v1").unwrap()["attachedVMUuid"], b.as_str());

    // Never from a running VM.
    env.power(0, true);
    assert_eq!(api.attach(&a, "v2").await.0, StatusCode::OK);
    let (st, v) = api.attach(&b, "v2").await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["code"], "attached_elsewhere");
    assert!(v["message"].as_str().unwrap().contains(&a), "{v}");
    assert!(env.has_disk(0, &file("v2")));
    let (_, v) = api.get(&format!("v2@{ds}")).await;
    assert_eq!(v["attached_to"], a.as_str());

    // At a get.
    env.power(0, false);
    let (_, v) = api.get(&format!("v2@{ds}")).await;
    assert_eq!(v["status"], "detached", "{v}");
    assert!(!env.has_disk(0, &file("v2")));
    assert_eq!(env.sidecar(0, "v2").unwrap()["status"], "detached");

    // At a list.
    env.power(0, true);
    assert_eq!(api.attach(&a, "v3").await.0, StatusCode::OK);
    env.power(0, false);
    let (_, list) = api.call(Method::GET, "/v1/volumes", Some(&a), None).await;
    let v3 = list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["volume"] == "v3")
        .unwrap()
        .clone();
    assert_eq!(v3["status"], "detached", "{list}");
    assert!(!env.has_disk(0, &file("v3")));

    // Powered on again, the VM does not get them back; nothing was deleted.
    env.power(0, true);
    for v in ["v1", "v2", "v3"] {
        assert!(!env.has_disk(0, &file(v)), "{v}");
        assert!(env.files().contains(&format!("{v}-flat.vmdk")));
    }
    let (_, v) = api.get(&format!("v1@{ds}")).await;
    assert_eq!(v["attached_to"], b.as_str());
    eprintln!("{model:?}: powered-off release in {:?}", started.elapsed());
}

#[tokio::test]
async fn vpx_powered_off_vm_releases_its_volumes() {
    powered_off_vm_releases_its_volumes(Model::Vpx).await;
}

#[tokio::test]
async fn esx_powered_off_vm_releases_its_volumes() {
    powered_off_vm_releases_its_volumes(Model::Esx).await;
}

/// A VM-Id the inventory lacks: the error names it and nothing changes.
#[tokio::test]
async fn api_unknown_vm_is_named_and_nothing_changes() {
    let env = Env::new(Model::Vpx, &[]);
    let api = Api::new(env.service().await);
    let a = env.vm_uuid(0).to_owned();
    let (st, v) = api.create(&a, "u1", json!({"size": "1mb"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let before = env.sidecar(0, "u1").unwrap();
    let stranger = "11111111-2222-3333-4444-555555555555";
    let (st, v) = api.attach(stranger, "u1").await;
    assert!(!st.is_success(), "{v}");
    assert_eq!(v["code"], "backend", "{v}");
    assert!(v["message"].as_str().unwrap().contains(stranger), "{v}");
    assert_eq!(env.sidecar(0, "u1").unwrap(), before);
    let file = env.disk_file(0, "u1");
    for i in 0..2 {
        assert!(!env.has_disk(i, &file));
    }
    // Its detach has nothing to do.
    let (st, v) = api
        .call(Method::POST, "/v1/volumes/u1/detach", Some(stranger), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(env.sidecar(0, "u1").unwrap(), before);
    // Not a BIOS UUID at all.
    let (_, v) = api.attach("vm-1", "u1").await;
    assert!(v["message"].as_str().unwrap().contains("\"vm-1\""), "{v}");
    assert_eq!(env.sidecar(0, "u1").unwrap(), before);
}

/// A configured datastore that vSphere does not have stops the agent at
/// start, naming it and the datastores there are; a volume name with a
/// datastore the agent does not serve is refused naming those it does.
#[tokio::test]
async fn missing_datastore_is_named_with_those_that_exist() {
    let env = Env::with_config(Model::Vpx, &[], "[[datastore]]\nname = \"nope\"\n");
    let socket = env.dir.path().join("agent.sock");
    let out = env.agent(&["serve", "--admin-listen", "off", "--socket", socket.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"nope\"") && err.contains(env.ds()), "{err}");
    assert!(!socket.exists());
    assert!(!env.ds_dir(0).join("dockvols").exists());

    let env = Env::new(Model::Vpx, &[]);
    let api = Api::new(env.service().await);
    let (st, v) = api.create(env.vm_uuid(0), "m1@nope", json!({})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["code"], "unknown_datastore");
    let m = v["message"].as_str().unwrap();
    assert!(m.contains("nope") && m.contains(env.ds()), "{m}");
}

/// The simulator killed while a call is in flight: the agent answers a
/// typed error at once and records nothing half-done; once the simulator is
/// back (the same address, certificate and files), the same call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_killed_mid_operation() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_owned();
    // CreateVirtualDisk_Task's answer is held back after the disk is made,
    // so the simulator dies while the agent does not know it yet.
    let mut env = Env::new(
        Model::Vpx,
        &[
            "-state-dir",
            &state_dir,
            "-response-delay",
            "CreateVirtualDisk_Task:5000",
        ],
    );
    let port = url_port(env.sim.url());
    let thumbprint = env.sim.info["thumbprint_sha256"].clone();
    let api = Api::new(env.service().await);
    let a = env.vm_uuid(0).to_owned();
    let dir = env.ds_dir(0).join("dockvols/_DEFAULT");
    let restart = |env: &mut Env, extra: &[&str]| {
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["-listen", &listen, "-state-dir", &state_dir];
        args.extend_from_slice(extra);
        env.sim = Sim::start(Model::Vpx, &args);
        assert_eq!(env.sim.info["thumbprint_sha256"], thumbprint);
    };

    // Create, killed after CreateVirtualDisk_Task made the disk, before it
    // answered.
    let call = {
        let (api, a) = (api.clone(), a.clone());
        tokio::spawn(async move { api.create(&a, "k1", json!({"size": "10mb"})).await })
    };
    env.sim.wait_stderr("executed CreateVirtualDisk_Task");
    let killed = Instant::now();
    env.sim.kill();
    let (st, v) = call.await.unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(20),
        "answered after {:?}",
        killed.elapsed()
    );
    assert!(!st.is_success(), "{v}");
    assert!(v["code"] == "backend" || v["code"] == "timeout", "{v}");
    assert!(v["message"].as_str().unwrap().contains("Unreachable"), "{v}");
    assert!(
        dir.join("k1-flat.vmdk").exists(),
        "the disk was to be made before the kill"
    );
    assert!(
        !dir.join("k1.vmfd").exists(),
        "a sidecar was written for a create that failed"
    );
    // While it is down, a read fails the same way, at once.
    let t = Instant::now();
    let (st, v) = api.get("k1").await;
    assert!(!st.is_success() && t.elapsed() < Duration::from_secs(20), "{v}");

    // Back: the same call succeeds, once.
    restart(
        &mut env,
        &["-method-delay", "ReconfigVM_Task:3000", "-announce", "ReconfigVM_Task"],
    );
    let (st, v) = api.create(&a, "k1", json!({"size": "10mb"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["capacity_bytes"], 10 << 20);
    assert!(dir.join("k1.vmfd").exists() && dir.join("k1-flat.vmdk").exists());
    assert!(!dir.join("k1.creating").exists());
    assert_eq!(env.sidecar(0, "k1").unwrap()["status"], "detached");
    let (st, v) = api.create(&a, "k1", json!({"size": "10mb"})).await;
    assert_eq!(
        (st, v["code"].clone()),
        (StatusCode::CONFLICT, json!("already_exists")),
        "{v}"
    );

    // Attach, killed during ReconfigVM_Task.
    let call = {
        let (api, a) = (api.clone(), a.clone());
        tokio::spawn(async move { api.attach(&a, "k1").await })
    };
    env.sim.wait_stderr("received ReconfigVM_Task");
    let killed = Instant::now();
    env.sim.kill();
    let (st, v) = call.await.unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(20),
        "answered after {:?}",
        killed.elapsed()
    );
    assert!(!st.is_success(), "{v}");
    assert!(v["message"].as_str().unwrap().contains("Unreachable"), "{v}");

    // Back: the records say what vSphere has, and the same attach succeeds.
    restart(&mut env, &[]);
    let file = env.disk_file(0, "k1");
    assert!(!env.has_disk(0, &file));
    let (_, v) = api.get("k1").await;
    assert_eq!(v["status"], "detached", "{v}");
    let (st, v) = api.attach(&a, "k1").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(env.has_disk(0, &file));
    assert_eq!(env.sidecar(0, "k1").unwrap()["attachedVMUuid"], a.as_str());
}

fn url_port(url: &str) -> u16 {
    let rest = url.strip_prefix("https://127.0.0.1:").unwrap();
    rest.split('/').next().unwrap().parse().unwrap()
}
