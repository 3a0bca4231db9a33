//! VSAN storage policies end to end, through a real Docker Engine: the
//! administrator creates a policy with `vmdk-agent policy create`, a user
//! creates a volume with `-o vsan-policy-name=`, `docker volume inspect` and
//! `vmdk-agent ls` show the policy, and the policy cannot be removed while
//! the volume exists.
//!
//! It uses the Docker Engine harness of `tests/docker_engine.rs`: the plugin
//! runs with its agent embedded on two temp datastores, `local` marked VSAN
//! and `nfs1` not; the admin CLI works on the same directories, as it does
//! on a host while the service runs. Like every Docker-using test binary, it
//! holds `/run/lock/vmdk-docker-tests.lock`, fails (never skips) when Docker
//! is unreachable, and cleans up what it started.

#[path = "common/docker.rs"]
mod docker;

use std::fs;
use std::path::Path;

use docker::*;

const SW2: &str = r#"(("stripeWidth" i2))"#;

/// `docker volume create` that may fail (the harness's `create_volume`
/// asserts success).
fn try_create(name: &str, opts: &[&str]) -> Output {
    let driver = format!("--driver={}", driver());
    let name_arg = format!("--name={name}");
    let mut args = vec!["volume", "create", &driver, &name_arg];
    for o in opts {
        args.extend(["-o", o]);
    }
    docker(&args)
}

/// Files of `vol` on a datastore.
fn files_of(ds: &Path, vol: &str) -> Vec<String> {
    fs::read_dir(ds.join("dockvols/_DEFAULT"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{vol}.")) || n.starts_with(&format!("{vol}-")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn vsan_policy_flow_through_docker() {
    let mut h = Harness::new("policy");

    let out = h.admin(&["policy", "create", "--name", "SW=2", "--content", SW2]);
    assert_eq!(out, "Successfully created policy: SW=2\n");
    let policy_file = h.datastore.join("dockvols/policies/SW=2");
    assert_eq!(fs::read_to_string(&policy_file).unwrap(), format!("{SW2}\n"));

    let created = h.create_volume("vsanvol3", &["size=20gb", "vsan-policy-name=SW=2"]);
    assert_eq!(created, "vsanvol3");

    let v = inspect_volume("vsanvol3");
    assert_eq!(v["Driver"], driver(), "{v:#}");
    assert_eq!(v["Status"]["vsan-policy-name"], "SW=2", "{v:#}");
    assert_eq!(v["Status"]["datastore"], DATASTORE, "{v:#}");

    let ls = h.admin(&["ls"]);
    let row = ls
        .lines()
        .find(|l| l.starts_with("vsanvol3 "))
        .unwrap_or_else(|| panic!("no vsanvol3 row: {ls}"));
    let cells: Vec<&str> = row.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(&cells[..4], &["vsanvol3", DATASTORE, "_DEFAULT", "20GB"], "{ls}");
    assert_eq!(cells[6], "SW=2", "{ls}");
    assert_eq!(cells[11], VM_ID, "{ls}");
    let j: serde_json::Value =
        serde_json::from_str(&h.admin(&["ls", "-c", "volume,policy", "--format", "json"])).unwrap();
    assert_eq!(j, serde_json::json!([{"volume": "vsanvol3", "policy": "SW=2"}]));

    let rm = h.try_admin(&["policy", "rm", "--name", "SW=2"]);
    assert!(!rm.success(), "{rm}");
    assert!(
        rm.stderr
            .contains(&format!("Cannot remove. Policy SW=2 is in use by vsanvol3@{DATASTORE}")),
        "{rm}"
    );
    assert!(policy_file.exists(), "a refused rm removed the policy");

    // A policy that does not exist: the original's message, nothing created.
    let r = try_create("vsanvol4", &["vsan-policy-name=gold"]);
    assert!(!r.success(), "{r}");
    assert!(
        r.stderr
            .contains("Policy gold does not exist. Available policies are: ['SW=2']"),
        "{r}"
    );
    assert!(
        files_of(&h.datastore, "vsanvol4").is_empty(),
        "{:?}",
        files_of(&h.datastore, "vsanvol4")
    );

    // A policy on a datastore that is not VSAN: refused, nothing created.
    let plain = format!("plainvol@{PLAIN_DATASTORE}");
    let r = try_create(&plain, &["vsan-policy-name=SW=2"]);
    assert!(!r.success(), "{r}");
    assert!(
        r.stderr.contains("Cannot use a VSAN policy on a non-VSAN datastore"),
        "{r}"
    );
    assert!(
        files_of(&h.plain_datastore, "plainvol").is_empty(),
        "{:?}",
        files_of(&h.plain_datastore, "plainvol")
    );
    let names = docker_ok(&["volume", "ls", "-q"]);
    assert!(
        !names.lines().any(|n| n == "vsanvol4" || n == plain),
        "refused volumes are listed: {names}"
    );

    // Once the volume is gone, the policy can go.
    docker_ok(&["volume", "rm", "vsanvol3"]);
    assert!(files_of(&h.datastore, "vsanvol3").is_empty());
    let out = h.admin(&["policy", "rm", "--name", "SW=2"]);
    assert_eq!(out, "Successfully removed policy: SW=2\n");
    assert!(!policy_file.exists());
}
