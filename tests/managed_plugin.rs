//! The managed (v2) plugin bundle (`packaging/managed-plugin/`): built from
//! Debian packages and this build's `vmdk-plugin`, installed with `docker
//! plugin create`, enabled, and used for a volume round trip by the real
//! Docker Engine, as a user would (docs/managed-plugin.md).
//!
//! Needs root and a running Docker Engine (fails, never skips, without
//! one); the harness holds the cross-binary Docker lock.

#[path = "common/docker.rs"]
mod docker;

use std::path::Path;
use std::process::Command;

use docker::*;

const NAME: &str = "vmdk-managed-test";

/// Disables and removes the test's plugin, also when the test fails.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = docker(&["volume", "rm", "-f", "managed-vol"]);
        let _ = docker(&["plugin", "disable", "-f", NAME]);
        let _ = docker(&["plugin", "rm", "-f", NAME]);
    }
}

fn build_bundle(out: &Path) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/managed-plugin/build.sh");
    let o = Command::new("bash")
        .arg(script)
        .arg("--binary")
        .arg(plugin_bin())
        .arg("--out")
        .arg(out)
        .output()
        .expect("run packaging/managed-plugin/build.sh");
    assert!(
        o.status.success(),
        "{script} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_managed_plugin_installs_enables_and_serves_a_volume_round_trip() {
    let h = Harness::new("managed");
    let busybox = image("busybox");
    let bundle = h.dir.join("bundle");
    h.step("building the bundle");
    build_bundle(&bundle);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["interface"]["types"],
        serde_json::json!(["docker.volumedriver/1.0"])
    );
    assert!(bundle.join("rootfs/usr/bin/vmdk-plugin").is_file());

    // A plugin left by a crashed run goes first.
    let _ = docker(&["plugin", "disable", "-f", NAME]);
    let _ = docker(&["plugin", "rm", "-f", NAME]);
    h.step("docker plugin create");
    docker_ok(&["plugin", "create", NAME, bundle.to_str().unwrap()]);
    let _installed = Installed;
    let (ds, state, etc) = (h.dir.join("m-ds"), h.dir.join("m-state"), h.dir.join("m-etc"));
    for d in [&ds, &state, &etc] {
        std::fs::create_dir_all(d).unwrap();
    }
    docker_ok(&[
        "plugin",
        "set",
        NAME,
        &format!("datastores.source={}", ds.display()),
        &format!("state.source={}", state.display()),
        &format!("config.source={}", etc.display()),
        "VMDK_VM_ID=managed-vm",
    ]);
    h.step("docker plugin enable");
    docker_ok(&["plugin", "enable", "--timeout", "120", NAME]);
    let inspect = docker_ok(&["plugin", "inspect", NAME]);
    let p: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let p = &p[0];
    assert_eq!(p["Enabled"], true, "{inspect}");
    assert_eq!(p["Config"]["PropagatedMount"], "/mnt/vmdk");
    assert!(
        p["Config"]["Linux"]["Capabilities"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("CAP_SYS_ADMIN")),
        "{inspect}"
    );

    h.step("volume round trip");
    docker_ok(&[
        "volume",
        "create",
        "-d",
        NAME,
        "--name",
        "managed-vol",
        "-o",
        "size=64mb",
    ]);
    let disk = ds.join("datastores/local/dockvols/_DEFAULT/managed-vol.vmdk");
    assert!(disk.is_file(), "the disk is on the datastore mounted into the plugin");
    let qemu = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(qemu.status.success(), "{qemu:?}");
    let info: serde_json::Value = serde_json::from_slice(&qemu.stdout).unwrap();
    assert_eq!(info["virtual-size"], 64 << 20);
    run_container(&[
        "--rm",
        "-v",
        "managed-vol:/d",
        &busybox,
        "sh",
        "-c",
        "echo managed > /d/f",
    ]);
    let back = run_container(&["--rm", "-v", "managed-vol:/d", &busybox, "cat", "/d/f"]);
    assert_eq!(back.trim(), "managed");
    let vi = docker_ok(&["volume", "inspect", "managed-vol"]);
    assert!(vi.contains("\"created by VM\": \"managed-vm\""), "{vi}");
    assert!(vi.contains("\"formatted\": \"ext4 on"), "{vi}");
    docker_ok(&["volume", "rm", "managed-vol"]);
    assert!(!disk.exists(), "docker volume rm removed the disk");
}
