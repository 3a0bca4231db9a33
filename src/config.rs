//! Plugin settings and their defaults.

use std::path::{Path, PathBuf};

/// Default plugin socket; the file name makes the driver name `vmdk`.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/vmdk.sock";
/// Default mount root.
pub const DEFAULT_MOUNT_ROOT: &str = "/mnt/vmdk";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmdk-plugin";
/// Default embedded datastore.
pub const DEFAULT_DATASTORE: &str = "local=/var/lib/vmdk/datastores/local";

/// Finds this VM's id: `/sys/class/dmi/id/product_uuid`, else
/// `/etc/machine-id`.
pub fn detect_vm_id() -> Result<String, String> {
    detect_vm_id_from(
        Path::new("/sys/class/dmi/id/product_uuid"),
        Path::new("/etc/machine-id"),
    )
}

/// [`detect_vm_id`] with explicit paths (for tests).
pub fn detect_vm_id_from(product_uuid: &Path, machine_id: &Path) -> Result<String, String> {
    for p in [product_uuid, machine_id] {
        if let Ok(s) = std::fs::read_to_string(p) {
            let s = s.trim();
            if !s.is_empty() {
                return Ok(s.to_lowercase());
            }
        }
    }
    Err(format!(
        "cannot determine the VM id: neither {} nor {} is readable; pass --vm-id",
        product_uuid.display(),
        machine_id.display()
    ))
}

/// Everything `vmdk-plugin serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Plugin socket.
    pub socket: PathBuf,
    /// Agent URL; `None` runs the agent in-process.
    pub agent: Option<String>,
    /// Embedded datastores as `NAME=DIR`.
    pub datastores: Vec<String>,
    /// This VM's id.
    pub vm_id: String,
    /// Mount root.
    pub mount_root: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Docker API socket, for recovery.
    pub docker_socket: PathBuf,
    /// Seconds between reconcile passes (0 disables them).
    pub reconcile_interval: u64,
    /// Seconds a volume stays mounted after its last Unmount (0: none).
    pub detach_grace: u64,
    /// Limits of the plugin socket (timeouts, connections, body size).
    pub limits: vmdk_common::server::ServeLimits,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_id_falls_back_to_machine_id() {
        let d = tempfile::tempdir().unwrap();
        let mid = d.path().join("machine-id");
        std::fs::write(&mid, "ABCDEF\n").unwrap();
        assert_eq!(detect_vm_id_from(&d.path().join("none"), &mid).unwrap(), "abcdef");
        let pu = d.path().join("product_uuid");
        std::fs::write(&pu, "4C4C4544-0000\n").unwrap();
        assert_eq!(detect_vm_id_from(&pu, &mid).unwrap(), "4c4c4544-0000");
        assert!(detect_vm_id_from(&d.path().join("a"), &d.path().join("b")).is_err());
    }
}
