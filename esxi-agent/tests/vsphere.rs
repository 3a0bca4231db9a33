//! The agent with the `vsphere` backend against govmomi's simulator, in the
//! vCenter (VPX) and the standalone-host (ESX) models: every operation of
//! the volume service, with its effect checked independently through
//! pyvmomi (tests/vcsim/inspect.py) and the simulator's datastore files.

#[path = "../../tests/support/vcsim.rs"]
mod vcsim;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;
use vcsim::{Model, Sim};
use vmdk_agent::config::AgentConfig;
use vmdk_agent::service::Caller;
use vmdk_agent::{AgentError, VolumeService};
use vmdk_protocol::{CreateRequest, DiskLocation, ErrorCode};

struct Env {
    sim: Sim,
    _dir: tempfile::TempDir,
    config: PathBuf,
}

impl Env {
    fn new(model: Model, extra: &[&str]) -> Self {
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
                "backend = \"vsphere\"\n[vsphere]\nurl = {:?}\ncredentials = {:?}\nthumbprint = {:?}\n",
                sim.url(),
                creds.display().to_string(),
                sim.info["thumbprint_sha256"].as_str().unwrap()
            ),
        )
        .unwrap();
        Env { sim, _dir: dir, config }
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
