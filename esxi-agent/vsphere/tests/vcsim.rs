//! The vSphere client against govmomi's simulator (vcsim 0.24.2 from
//! Debian's golang-github-vmware-govmomi-dev, built by tests/vcsim/build.sh),
//! in both models: vCenter (VPX) and a standalone ESX host.
//!
//! Every effect is checked with a second, independent client:
//! tests/vcsim/inspect.py, which reads the simulator through pyvmomi.

#[path = "../../../tests/support/vcsim.rs"]
mod vcsim;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vcsim::{Model, Sim};
use vmdk_vsphere::{
    AdapterType, ApiType, BiosUuid, Client, DatastorePath, DeviceChange, DiskMode, DiskSpec, DiskType, Error, Moref,
    Password, PowerState, RuleValue, ScsiControllerKind, Thumbprint, TlsFailure, TlsTrust, VsanRule,
};

fn ds_path(sim: &Sim, path: &str) -> DatastorePath {
    DatastorePath::new(sim.datastore()["name"].as_str().unwrap(), path).unwrap()
}

fn timed(name: &str) -> impl Drop {
    struct T(String, Instant);
    impl Drop for T {
        fn drop(&mut self) {
            eprintln!("{} took {:?}", self.0, self.1.elapsed());
        }
    }
    T(name.to_owned(), Instant::now())
}

fn fault_type(e: &Error) -> &str {
    e.fault_type().unwrap_or_else(|| panic!("not a fault: {e:?}"))
}

// ---------------------------------------------------------------------------
// Session and inventory

async fn session_and_inventory(model: Model) {
    let sim = Sim::start(model, &[]);
    let client = sim.client().await;

    let about = client.about();
    match model {
        Model::Vpx => assert_eq!(about.api_type, ApiType::VirtualCenter),
        Model::Esx => assert_eq!(about.api_type, ApiType::HostAgent),
    }
    assert_eq!(client.is_vcenter(), model == Model::Vpx);
    assert!(about.api_version.starts_with("6."), "{about:?}");

    // The datacenter and its datastores, as pyvmomi sees them.
    let dc = client.datacenter(None).await.unwrap();
    assert_eq!(dc.name, sim.info["datacenter"].as_str().unwrap());
    assert_eq!(dc.path, dc.name);
    let ours = client.datastores(&dc).await.unwrap();
    let theirs = sim.inspect(&["datastores"]);
    assert_eq!(ours.len(), theirs.as_array().unwrap().len());
    for (o, t) in ours.iter().zip(theirs.as_array().unwrap()) {
        assert_eq!(o.name, t["name"].as_str().unwrap());
        assert_eq!(o.moref.value, t["moref"].as_str().unwrap());
        assert_eq!(o.url, t["url"].as_str().unwrap());
        assert_eq!(o.kind, t["type"].as_str().unwrap());
        assert_eq!(o.capacity, t["capacity"].as_u64().unwrap());
        assert!(o.free_space > 0 && o.free_space <= o.capacity);
        assert!(o.accessible);
        assert!(!o.is_vsan());
    }
    assert_eq!(ours[0].url, sim.datastore()["path"].as_str().unwrap());
    let err = client.datastore(&dc, "NoSuchDS").await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { what } if what.contains("NoSuchDS")),
        "{err:?}"
    );

    // Every VM by its BIOS UUID, in both byte orders, and its properties.
    for vm in sim.info["vms"].as_array().unwrap() {
        let uuid: BiosUuid = vm["uuid"].as_str().unwrap().parse().unwrap();
        let found = client.find_vm_by_bios_uuid(Some(&dc), &uuid).await.unwrap();
        assert_eq!(found, Moref::new("VirtualMachine", vm["moref"].as_str().unwrap()));
        let swapped = client.find_vm_by_bios_uuid(None, &uuid.swapped()).await.unwrap();
        assert_eq!(swapped, found);

        let info = client.vm_info(&found).await.unwrap();
        let devices = sim.devices(&uuid.to_string());
        assert_eq!(info.name, devices["vm"].as_str().unwrap());
        assert_eq!(info.bios_uuid.as_deref(), Some(uuid.to_string().as_str()));
        let theirs = devices["controllers"].as_array().unwrap();
        assert_eq!(info.controllers.len(), theirs.len());
        for (c, t) in info.controllers.iter().zip(theirs) {
            assert_eq!(i64::from(c.key), t["key"].as_i64().unwrap());
            assert_eq!(i64::from(c.bus_number), t["busNumber"].as_i64().unwrap());
            assert_eq!(c.kind, ScsiControllerKind::ParaVirtual);
            assert_eq!(t["type"], "ParaVirtualSCSIController");
            assert_eq!(c.scsi_ctlr_unit_number, Some(7));
        }
        let theirs = devices["disks"].as_array().unwrap();
        assert_eq!(info.disks.len(), theirs.len());
        for (d, t) in info.disks.iter().zip(theirs) {
            assert_eq!(i64::from(d.key), t["key"].as_i64().unwrap());
            assert_eq!(d.controller_key.map(i64::from), t["controllerKey"].as_i64());
            assert_eq!(d.unit_number.map(i64::from), t["unitNumber"].as_i64());
            assert_eq!(d.file_name.as_deref(), t["fileName"].as_str());
            assert_eq!(d.disk_mode.as_ref().map(|m| m.as_str()), t["diskMode"].as_str());
            assert_eq!(d.uuid.as_deref(), t["uuid"].as_str());
        }
        // Other devices on the SCSI controllers (the simulator's CD-ROM) take units too.
        for cd in devices["cdroms"].as_array().unwrap() {
            assert!(
                info.other_devices
                    .iter()
                    .any(|d| i64::from(d.key) == cd["key"].as_i64().unwrap()
                        && d.controller_key.map(i64::from) == cd["controllerKey"].as_i64()
                        && d.unit_number.map(i64::from) == cd["unitNumber"].as_i64()),
                "{cd} not in {:?}",
                info.other_devices
            );
        }
        let power = sim.inspect(&["power", "--vm-uuid", &uuid.to_string()]);
        let expected = match power["powerState"].as_str().unwrap() {
            "poweredOn" => PowerState::PoweredOn,
            "poweredOff" => PowerState::PoweredOff,
            _ => PowerState::Suspended,
        };
        assert_eq!(info.power_state, expected);
        assert!(info.datastores.contains(&ours[0].moref), "{:?}", info.datastores);
        assert!(
            info.extra_config.iter().any(|(k, _)| k == "govcsim"),
            "{:?}",
            info.extra_config
        );
    }

    // An unknown VM is a NotFound naming both byte orders.
    let unknown: BiosUuid = "01020304-0506-0708-090a-0b0c0d0e0f10".parse().unwrap();
    let err = client.find_vm_by_bios_uuid(None, &unknown).await.unwrap_err();
    match &err {
        Error::NotFound { what } => {
            assert!(what.contains("01020304-0506-0708-090a-0b0c0d0e0f10"), "{what}");
            assert!(what.contains("04030201-0605-0807-090a-0b0c0d0e0f10"), "{what}");
        }
        other => panic!("{other:?}"),
    }
    let err = client
        .vm_info(&Moref::new("VirtualMachine", "vm-99999"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { what } if what.contains("vm-99999")),
        "{err:?}"
    );

    // Another client ends our session; the next calls log in again, once.
    let terminated = sim.inspect(&["terminate-others"]);
    assert_eq!(terminated["terminated"].as_array().unwrap().len(), 1, "{terminated}");
    assert_eq!(sim.inspect(&["sessions"])["sessions"].as_array().unwrap().len(), 1);
    // RetrieveProperties (the simulator answers it with NotAuthenticated per property)...
    assert_eq!(client.datastores(&dc).await.unwrap(), ours);
    assert_eq!(sim.inspect(&["sessions"])["sessions"].as_array().unwrap().len(), 2);
    // ...and a method that faults with NotAuthenticated.
    sim.inspect(&["terminate-others"]);
    client
        .make_directory(&dc, &ds_path(&sim, "after-relogin"), true)
        .await
        .unwrap();
    assert!(sim.files("").contains(&"after-relogin".to_string()));

    // After a logout the client logs in again too.
    client.logout().await.unwrap();
    assert_eq!(client.datacenter(None).await.unwrap(), dc);
}

#[tokio::test]
async fn vpx_session_inventory_and_relogin() {
    let _t = timed("vpx_session_inventory_and_relogin");
    session_and_inventory(Model::Vpx).await;
}

#[tokio::test]
async fn esx_session_inventory_and_relogin() {
    let _t = timed("esx_session_inventory_and_relogin");
    session_and_inventory(Model::Esx).await;
}

#[tokio::test]
async fn several_datacenters_need_a_name() {
    let _t = timed("several_datacenters_need_a_name");
    let sim = Sim::start(Model::Vpx, &["-dc", "2", "-vms", "1"]);
    let client = sim.client().await;
    let all = client.datacenters().await.unwrap();
    let mut names: Vec<_> = all.iter().map(|d| d.name.clone()).collect();
    names.sort();
    assert_eq!(Value::from(names.clone()), sim.info["datacenters"]);
    let err = client.datacenter(None).await.unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { reason, .. } if reason.contains("DC0") && reason.contains("DC1")),
        "{err:?}"
    );
    let dc1 = client.datacenter(Some("DC1")).await.unwrap();
    assert_eq!(dc1.name, "DC1");
    let err = client.datacenter(Some("DC9")).await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { what } if what.contains("DC9") && what.contains("DC0")),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------
// Files and disks

async fn files_and_disks(model: Model) {
    let sim = Sim::start(model, &[]);
    let client = sim.client().await;
    let dc = client.datacenter(None).await.unwrap();
    let folder = ds_path(&sim, "dockvols/_DEFAULT");

    client.make_directory(&dc, &folder, true).await.unwrap();
    assert_eq!(sim.files("dockvols"), vec!["_DEFAULT"]);
    // Without createParentDirectories an existing directory is a typed fault.
    let err = client.make_directory(&dc, &folder, false).await.unwrap_err();
    assert_eq!(fault_type(&err), "FileAlreadyExists", "{err}");

    // One disk of each type; the simulator makes the descriptor and the extent.
    for ty in [DiskType::Thin, DiskType::Preallocated, DiskType::EagerZeroedThick] {
        let path = folder.join(&format!("v-{}.vmdk", ty.as_str())).unwrap();
        let spec = DiskSpec {
            disk_type: ty,
            adapter_type: AdapterType::LsiLogic,
            capacity_kb: 100 * 1024,
            profile: None,
        };
        assert_eq!(client.create_virtual_disk(&dc, &path, &spec).await.unwrap(), path);
    }
    let files = sim.files("dockvols/_DEFAULT");
    for ty in ["thin", "preallocated", "eagerZeroedThick"] {
        assert!(files.contains(&format!("v-{ty}.vmdk")), "{files:?}");
        assert!(files.contains(&format!("v-{ty}-flat.vmdk")), "{files:?}");
    }
    let thin = folder.join("v-thin.vmdk").unwrap();
    let spec = DiskSpec {
        disk_type: DiskType::Thin,
        adapter_type: AdapterType::LsiLogic,
        capacity_kb: 1024,
        profile: None,
    };
    // Creating it again is the fault the simulator gives, with the file named.
    let err = client.create_virtual_disk(&dc, &thin, &spec).await.unwrap_err();
    assert_eq!(fault_type(&err), "FileAlreadyExists", "{err}");
    assert!(err.to_string().contains("v-thin"), "{err}");

    // The folder lists what the simulator holds, with sizes; a missing
    // folder is NotFound.
    client
        .write_datastore_file(&dc, &folder.join("v.vmfd").unwrap(), b"{}\n")
        .await
        .unwrap();
    let listed = client.list_datastore_folder(&dc, &folder).await.unwrap();
    let mut names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    let mut want = sim.files("dockvols/_DEFAULT");
    want.sort();
    assert_eq!(names, want.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(listed.iter().find(|e| e.name == "v.vmfd").unwrap().size, 3);
    assert!(listed.iter().all(|e| !e.is_folder));
    let err = client
        .list_datastore_folder(&dc, &ds_path(&sim, "dockvols/nowhere"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    client
        .delete_datastore_file(&dc, &folder.join("v.vmfd").unwrap())
        .await
        .unwrap();

    let uuid = client.query_virtual_disk_uuid(&dc, &thin).await.unwrap();
    assert_eq!(uuid.len(), 36, "{uuid}");
    assert_eq!(client.query_virtual_disk_uuid(&dc, &thin).await.unwrap(), uuid);

    // Copy, then delete the copy.
    let copy = folder.join("copy.vmdk").unwrap();
    client.copy_virtual_disk(&dc, &thin, &copy, false).await.unwrap();
    let files = sim.files("dockvols/_DEFAULT");
    assert!(
        files.contains(&"copy.vmdk".into()) && files.contains(&"copy-flat.vmdk".into()),
        "{files:?}"
    );
    client.delete_virtual_disk(&dc, &copy).await.unwrap();
    let files = sim.files("dockvols/_DEFAULT");
    assert!(!files.iter().any(|f| f.starts_with("copy")), "{files:?}");

    // A sidecar through the datastore file API: written, read back, bounded, deleted.
    let sidecar = folder.join("v-thin.vmfd").unwrap();
    let contents = br#"{"status":"detached","name":"v-thin"}"#;
    client.write_datastore_file(&dc, &sidecar, contents).await.unwrap();
    let listing = sim.inspect(&[
        "files",
        "--datastore",
        sidecar.datastore(),
        "--path",
        "dockvols/_DEFAULT",
    ]);
    let entry = listing["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "v-thin.vmfd")
        .unwrap_or_else(|| panic!("{listing}"));
    assert_eq!(entry["size"].as_u64(), Some(contents.len() as u64));
    assert_eq!(client.read_datastore_file(&dc, &sidecar, 4096).await.unwrap(), contents);
    let err = client.read_datastore_file(&dc, &sidecar, 8).await.unwrap_err();
    assert!(matches!(&err, Error::TooLarge { limit: 8, .. }), "{err:?}");
    client.write_datastore_file(&dc, &sidecar, b"{}").await.unwrap();
    assert_eq!(client.read_datastore_file(&dc, &sidecar, 4096).await.unwrap(), b"{}");
    client.delete_datastore_file(&dc, &sidecar).await.unwrap();
    assert!(!sim.files("dockvols/_DEFAULT").contains(&"v-thin.vmfd".into()));
    let err = client.read_datastore_file(&dc, &sidecar, 4096).await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { what } if what.contains("v-thin.vmfd")),
        "{err:?}"
    );
    let err = client.delete_datastore_file(&dc, &sidecar).await.unwrap_err();
    assert_eq!(fault_type(&err), "FileNotFound", "{err}");

    // A disk in a folder that does not exist: the task's fault names the file.
    let err = client
        .create_virtual_disk(&dc, &ds_path(&sim, "nodir/x.vmdk"), &spec)
        .await
        .unwrap_err();
    match &err {
        Error::Fault {
            method,
            fault_type,
            message,
            ..
        } => {
            assert_eq!(method, "CreateVirtualDisk_Task");
            assert_eq!(fault_type, "FileNotFound");
            assert!(message.contains("nodir/x"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // A missing datastore, for every kind of call.
    let missing = DatastorePath::new("NoSuchDS", "dockvols/_DEFAULT/x.vmdk").unwrap();
    let err = client.create_virtual_disk(&dc, &missing, &spec).await.unwrap_err();
    assert_eq!(fault_type(&err), "InvalidDatastore", "{err}");
    assert!(err.to_string().contains("NoSuchDS"), "{err}");
    let err = client
        .make_directory(&dc, &DatastorePath::new("NoSuchDS", "dockvols").unwrap(), true)
        .await
        .unwrap_err();
    assert_eq!(fault_type(&err), "InvalidDatastore", "{err}");
    let err = client.read_datastore_file(&dc, &missing, 4096).await.unwrap_err();
    assert!(matches!(&err, Error::NotFound { .. }), "{err:?}");

    // Failed tasks left the session working.
    client.delete_virtual_disk(&dc, &thin).await.unwrap();
    assert!(!sim.files("dockvols/_DEFAULT").iter().any(|f| f.starts_with("v-thin")));
}

#[tokio::test]
async fn vpx_files_and_disks() {
    let _t = timed("vpx_files_and_disks");
    files_and_disks(Model::Vpx).await;
}

#[tokio::test]
async fn esx_files_and_disks() {
    let _t = timed("esx_files_and_disks");
    files_and_disks(Model::Esx).await;
}

// ---------------------------------------------------------------------------
// Attach and detach

async fn attach_and_detach(model: Model) {
    let sim = Sim::start(model, &[]);
    let client = sim.client().await;
    let dc = client.datacenter(None).await.unwrap();
    let uuid_text = sim.vm(0)["uuid"].as_str().unwrap().to_owned();
    let uuid: BiosUuid = uuid_text.parse().unwrap();
    let vm = client.find_vm_by_bios_uuid(Some(&dc), &uuid).await.unwrap();
    let folder = ds_path(&sim, "dockvols/_DEFAULT");
    client.make_directory(&dc, &folder, true).await.unwrap();
    let disk = folder.join("vol1.vmdk").unwrap();
    let spec = DiskSpec {
        disk_type: DiskType::Thin,
        adapter_type: AdapterType::LsiLogic,
        capacity_kb: 1024,
        profile: None,
    };
    client.create_virtual_disk(&dc, &disk, &spec).await.unwrap();

    let before = sim.devices(&uuid_text);
    assert_eq!(before["controllers"].as_array().unwrap().len(), 1);

    // A new PVSCSI controller on bus 1 and the disk on it, in one reconfiguration.
    client
        .reconfigure_vm(
            &vm,
            &[
                DeviceChange::AddPvscsiController {
                    temp_key: -100,
                    bus_number: 1,
                },
                DeviceChange::AttachDisk {
                    temp_key: -101,
                    controller_key: -100,
                    unit_number: 0,
                    file: disk.clone(),
                    disk_mode: DiskMode::IndependentPersistent,
                    profile: None,
                },
            ],
            &[],
        )
        .await
        .unwrap();
    let after = sim.devices(&uuid_text);
    let bus1 = after["controllers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["busNumber"] == 1)
        .unwrap_or_else(|| panic!("no controller on bus 1: {after}"));
    assert_eq!(bus1["type"], "ParaVirtualSCSIController");
    assert_eq!(bus1["sharedBus"], "noSharing");
    let attached = after["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["fileName"] == disk.to_string().as_str())
        .unwrap_or_else(|| panic!("the disk is not attached: {after}"));
    assert_eq!(attached["controllerKey"], bus1["key"]);
    assert_eq!(attached["unitNumber"], 0);
    assert_eq!(attached["diskMode"], "independent_persistent");
    // Our reading agrees.
    let info = client.vm_info(&vm).await.unwrap();
    let ours = info
        .disks
        .iter()
        .find(|d| d.file_name.as_deref() == Some(disk.to_string().as_str()))
        .unwrap()
        .clone();
    assert_eq!(i64::from(ours.key), attached["key"].as_i64().unwrap());
    assert_eq!(ours.disk_mode, Some(DiskMode::IndependentPersistent));
    let ctl = info.controllers.iter().find(|c| c.bus_number == 1).unwrap();
    assert_eq!(Some(ctl.key), ours.controller_key);
    assert_eq!(ctl.kind, ScsiControllerKind::ParaVirtual);

    // Attaching a file that does not exist: a typed fault, nothing added.
    let err = client
        .reconfigure_vm(
            &vm,
            &[DeviceChange::AttachDisk {
                temp_key: -1,
                controller_key: ctl.key,
                unit_number: 1,
                file: folder.join("missing.vmdk").unwrap(),
                disk_mode: DiskMode::Persistent,
                profile: None,
            }],
            &[],
        )
        .await
        .unwrap_err();
    match &err {
        Error::Fault {
            method,
            object,
            fault_type,
            message,
        } => {
            assert_eq!(method, "ReconfigVM_Task");
            assert_eq!(object, &vm.value);
            assert_eq!(fault_type, "FileNotFound");
            assert!(message.contains("missing"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.devices(&uuid_text)["disks"], after["disks"]);

    // Detach: the device goes, the files stay.
    client
        .reconfigure_vm(&vm, &[DeviceChange::RemoveDisk(ours)], &[])
        .await
        .unwrap();
    let detached = sim.devices(&uuid_text);
    assert!(
        !detached["disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["fileName"] == disk.to_string().as_str()),
        "{detached}"
    );
    let files = sim.files("dockvols/_DEFAULT");
    assert!(
        files.contains(&"vol1.vmdk".into()) && files.contains(&"vol1-flat.vmdk".into()),
        "{files:?}"
    );

    // Four PVSCSI controllers (buses 0-3): the simulator takes them.
    client
        .reconfigure_vm(
            &vm,
            &[
                DeviceChange::AddPvscsiController {
                    temp_key: -200,
                    bus_number: 2,
                },
                DeviceChange::AddPvscsiController {
                    temp_key: -201,
                    bus_number: 3,
                },
            ],
            &[],
        )
        .await
        .unwrap();
    let four = sim.devices(&uuid_text);
    let mut buses: Vec<i64> = four["controllers"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|c| assert_eq!(c["type"], "ParaVirtualSCSIController"))
        .map(|c| c["busNumber"].as_i64().unwrap())
        .collect();
    buses.sort();
    assert_eq!(buses, vec![0, 1, 2, 3]);
    // A fifth, or unit 7, is refused by the client before any call (the
    // simulator would take them).
    let err = client
        .reconfigure_vm(
            &vm,
            &[DeviceChange::AddPvscsiController {
                temp_key: -300,
                bus_number: 4,
            }],
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { what, .. } if what.contains("bus number 4")),
        "{err:?}"
    );
    let err = client
        .reconfigure_vm(
            &vm,
            &[DeviceChange::AttachDisk {
                temp_key: -301,
                controller_key: ctl.key,
                unit_number: 7,
                file: disk.clone(),
                disk_mode: DiskMode::Persistent,
                profile: None,
            }],
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { what, .. } if what.contains("unit number 7")),
        "{err:?}"
    );
    assert_eq!(sim.devices(&uuid_text), four);

    // extraConfig (disk.EnableUUID) is set.
    client
        .reconfigure_vm(&vm, &[], &[("disk.EnableUUID".into(), "TRUE".into())])
        .await
        .unwrap();
    let extra = sim.inspect(&["extra-config", "--vm-uuid", &uuid_text]);
    assert_eq!(extra["disk.EnableUUID"], "TRUE", "{extra}");
    let info = client.vm_info(&vm).await.unwrap();
    assert!(info.extra_config.contains(&("disk.EnableUUID".into(), "TRUE".into())));
}

#[tokio::test]
async fn vpx_attach_and_detach() {
    let _t = timed("vpx_attach_and_detach");
    attach_and_detach(Model::Vpx).await;
}

#[tokio::test]
async fn esx_attach_and_detach() {
    let _t = timed("esx_attach_and_detach");
    attach_and_detach(Model::Esx).await;
}

// ---------------------------------------------------------------------------
// Storage policies

#[tokio::test]
async fn vpx_storage_policies() {
    let _t = timed("vpx_storage_policies");
    let sim = Sim::start(Model::Vpx, &[]);
    let client = sim.client().await;
    let theirs = sim.inspect(&["profiles"]);
    let mut names: Vec<String> = client
        .pbm_profiles()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    names.sort();
    let their_names: Vec<&str> = theirs
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, their_names);
    assert!(names.contains(&"vSAN Default Storage Policy".to_string()));

    let rules = [
        VsanRule {
            capability: "stripeWidth".into(),
            value: RuleValue::Int(2),
        },
        VsanRule {
            capability: "hostFailuresToTolerate".into(),
            value: RuleValue::Int(1),
        },
        VsanRule {
            capability: "forceProvisioning".into(),
            value: RuleValue::Bool(true),
        },
    ];
    let id = client
        .pbm_create_vsan_profile("vmdk SW=2", "created by the vmdk tests", &rules)
        .await
        .unwrap();
    let theirs = sim.inspect(&["profiles"]);
    let created = theirs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "vmdk SW=2")
        .unwrap_or_else(|| panic!("{theirs}"));
    assert_eq!(created["id"], id.0.as_str());
    let got: Vec<(String, String, Value)> = created["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["namespace"].as_str().unwrap().to_owned(),
                r["id"].as_str().unwrap().to_owned(),
                r["value"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("VSAN".into(), "stripeWidth".into(), Value::from(2)),
            ("VSAN".into(), "hostFailuresToTolerate".into(), Value::from(1)),
            ("VSAN".into(), "forceProvisioning".into(), Value::from(true)),
        ]
    );
    let by_name = client.pbm_profile_by_name("vmdk SW=2").await.unwrap().unwrap();
    assert_eq!(by_name.id, id);
    assert_eq!(by_name.description.as_deref(), Some("created by the vmdk tests"));
    assert!(client.pbm_profile_by_name("no such policy").await.unwrap().is_none());

    // A disk created with the profile (the simulator accepts and ignores it).
    let dc = client.datacenter(None).await.unwrap();
    let folder = ds_path(&sim, "dockvols/_DEFAULT");
    client.make_directory(&dc, &folder, true).await.unwrap();
    let spec = DiskSpec {
        disk_type: DiskType::Thin,
        adapter_type: AdapterType::LsiLogic,
        capacity_kb: 1024,
        profile: Some(id.clone()),
    };
    client
        .create_virtual_disk(&dc, &folder.join("gold.vmdk").unwrap(), &spec)
        .await
        .unwrap();
    assert!(sim.files("dockvols/_DEFAULT").contains(&"gold.vmdk".into()));

    // PBM calls log in again too.
    sim.inspect(&["terminate-others"]);
    assert!(client.pbm_profile_by_name("vmdk SW=2").await.unwrap().is_some());

    client.pbm_delete_profiles(std::slice::from_ref(&id)).await.unwrap();
    let theirs = sim.inspect(&["profiles"]);
    assert!(
        !theirs.as_array().unwrap().iter().any(|p| p["name"] == "vmdk SW=2"),
        "{theirs}"
    );

    let err = client.pbm_create_vsan_profile("empty", "", &[]).await.unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
}

#[tokio::test]
async fn esx_has_no_storage_policies() {
    let _t = timed("esx_has_no_storage_policies");
    let sim = Sim::start(Model::Esx, &[]);
    let client = sim.client().await;
    let err = client.pbm_profiles().await.unwrap_err();
    match &err {
        Error::NotSupported { what, server } => {
            assert!(what.contains("/pbm"), "{what}");
            assert!(server.contains("ESXi"), "{server}");
        }
        other => panic!("{other:?}"),
    }
    let err = client
        .pbm_create_vsan_profile(
            "x",
            "",
            &[VsanRule {
                capability: "stripeWidth".into(),
                value: RuleValue::Int(1),
            }],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotSupported { .. }), "{err:?}");
    // The session is fine afterwards.
    client.datacenter(None).await.unwrap();
}

// ---------------------------------------------------------------------------
// Credentials and TLS

#[tokio::test]
async fn wrong_password_is_refused_and_never_shown() {
    let _t = timed("wrong_password_is_refused_and_never_shown");
    let sim = Sim::start(Model::Esx, &["-username", "vmdk-admin", "-password", "Right-Pa55"]);
    assert_eq!(sim.user(), "vmdk-admin");
    let mut config = sim.config(TlsTrust::Thumbprint(sim.sha256()));
    config.password = Password::new("Wr0ng-secret");
    let err = Client::connect(config.clone()).await.unwrap_err();
    match &err {
        Error::Auth { user, url, message } => {
            assert_eq!(user, "vmdk-admin");
            assert_eq!(url, sim.url());
            assert!(!message.is_empty());
        }
        other => panic!("{other:?}"),
    }
    for shown in [err.to_string(), format!("{err:?}"), format!("{config:?}")] {
        assert!(!shown.contains("Wr0ng-secret"), "{shown}");
    }
    config.username = "someone-else".into();
    config.password = Password::new("Right-Pa55");
    assert!(matches!(Client::connect(config.clone()).await, Err(Error::Auth { .. })));
    config.username = "vmdk-admin".into();
    let client = Client::connect(config).await.unwrap();
    client.datacenter(None).await.unwrap();
}

#[tokio::test]
async fn tls_pinning_ca_file_and_insecure() {
    let _t = timed("tls_pinning_ca_file_and_insecure");
    let sim = Sim::start(Model::Vpx, &["-vms", "1"]);
    let check = |client: Client| async move {
        client.datacenter(None).await.unwrap();
    };

    // The SHA-256 and SHA-1 fingerprints both pin.
    check(sim.client().await).await;
    let sha1: Thumbprint = sim.info["thumbprint_sha1"].as_str().unwrap().parse().unwrap();
    check(Client::connect(sim.config(TlsTrust::Thumbprint(sha1))).await.unwrap()).await;

    // A different fingerprint: refused, naming what the server presented.
    let mut wrong = sim.info["thumbprint_sha256"].as_str().unwrap().to_owned();
    let last = if wrong.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(wrong.len() - 1.., last);
    let err = Client::connect(sim.config(TlsTrust::Thumbprint(wrong.parse().unwrap())))
        .await
        .unwrap_err();
    match &err {
        Error::Tls {
            failure:
                TlsFailure::ThumbprintMismatch {
                    algorithm,
                    expected,
                    presented,
                },
            ..
        } => {
            assert_eq!(*algorithm, "SHA-256");
            assert_eq!(expected, &wrong);
            assert_eq!(presented, sim.info["thumbprint_sha256"].as_str().unwrap());
        }
        other => panic!("{other:?}"),
    }

    // The fingerprint as the docs say to get it, with openssl.
    let host_port = sim
        .url()
        .trim_start_matches("https://")
        .trim_end_matches("/sdk")
        .to_owned();
    let openssl = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {host_port} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .expect("running openssl");
    let line = String::from_utf8_lossy(&openssl.stdout).trim().to_owned();
    assert_eq!(line.parse::<Thumbprint>().unwrap(), sim.sha256(), "{line}");

    // A CA file with the simulator's CA works; one without it does not.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, sim.info["ca_pem"].as_str().unwrap()).unwrap();
    check(Client::connect(sim.config(TlsTrust::CaFile(ca))).await.unwrap()).await;
    let other = dir.path().join("other.pem");
    std::fs::write(&other, sim.info["cert_pem"].as_str().unwrap()).unwrap();
    let err = Client::connect(sim.config(TlsTrust::CaFile(other))).await.unwrap_err();
    assert!(
        matches!(&err, Error::Tls { failure: TlsFailure::Other(m), .. } if m.contains("UnknownIssuer") || m.contains("issuer")),
        "{err:?}"
    );

    // Insecure accepts anything.
    check(Client::connect(sim.config(TlsTrust::Insecure)).await.unwrap()).await;
}

#[tokio::test]
async fn pinning_checks_the_handshake_signature() {
    let _t = timed("pinning_checks_the_handshake_signature");
    // The simulator presents its certificate but signs the handshake with
    // another key, as a server replaying a pinned certificate would.
    let sim = Sim::start(Model::Esx, &["-vms", "1", "-impostor"]);
    for trust in [TlsTrust::Thumbprint(sim.sha256()), TlsTrust::Insecure] {
        let err = Client::connect(sim.config(trust.clone())).await.unwrap_err();
        assert!(
            matches!(&err, Error::Tls { failure: TlsFailure::Other(m), .. } if m.contains("BadSignature")),
            "{trust:?}: {err:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// A server that dies or stalls

// Two workers: the test blocks on the simulator's stderr while the call runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_killed_mid_operation_is_a_typed_error() {
    let _t = timed("simulator_killed_mid_operation_is_a_typed_error");
    let mut sim = Sim::start(
        Model::Vpx,
        &[
            "-vms",
            "1",
            "-announce",
            "ReconfigVM_Task",
            "-method-delay",
            "ReconfigVM_Task:60000",
        ],
    );
    let client = sim.client().await;
    let uuid: BiosUuid = sim.vm(0)["uuid"].as_str().unwrap().parse().unwrap();
    let vm = client.find_vm_by_bios_uuid(None, &uuid).await.unwrap();
    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .reconfigure_vm(
                    &vm,
                    &[DeviceChange::AddPvscsiController {
                        temp_key: -1,
                        bus_number: 1,
                    }],
                    &[],
                )
                .await
        })
    };
    // The call is in the simulator (held by the delay); kill it.
    sim.wait_stderr("vcsim: received ReconfigVM_Task");
    sim.kill();
    let err = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call hung after the simulator died")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Http { what, .. } if what.contains("ReconfigVM_Task")),
        "{err:?}"
    );
    // Later calls fail at once too: the connection is refused.
    let err = tokio::time::timeout(Duration::from_secs(20), client.datacenters())
        .await
        .expect("a call hung against a dead simulator")
        .unwrap_err();
    assert!(matches!(err, Error::Http { .. }), "{err:?}");
}

#[tokio::test]
async fn task_wait_is_bounded_by_the_task_timeout() {
    let _t = timed("task_wait_is_bounded_by_the_task_timeout");
    // Every RetrieveProperties (the task poll) stalls for a minute.
    let mut sim = Sim::start(Model::Esx, &["-vms", "1", "-method-delay", "RetrieveProperties:60000"]);
    let mut config = sim.config(TlsTrust::Thumbprint(sim.sha256()));
    config.task_timeout = Duration::from_millis(500);
    let client = Client::connect(config).await.unwrap();
    // On ESX the datacenter argument is left out, so no inventory call is needed.
    let dc = vmdk_vsphere::Datacenter {
        moref: Moref::new("Datacenter", "ha-datacenter"),
        name: "ha-datacenter".into(),
        path: "ha-datacenter".into(),
    };
    let spec = DiskSpec {
        disk_type: DiskType::Thin,
        adapter_type: AdapterType::LsiLogic,
        capacity_kb: 1024,
        profile: None,
    };
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        client.create_virtual_disk(&dc, &ds_path(&sim, "t.vmdk"), &spec),
    )
    .await
    .expect("the task wait was not bounded")
    .unwrap_err();
    match &err {
        Error::Timeout { what, after } => {
            assert!(what.contains("CreateVirtualDisk_Task"), "{what}");
            assert_eq!(*after, Duration::from_millis(500));
        }
        other => panic!("{other:?}"),
    }
    sim.kill();
}
