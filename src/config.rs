//! Plugin settings and their defaults.

use std::path::{Path, PathBuf};

/// Default plugin socket; the file name makes the driver name `vmdk`.
pub const DEFAULT_SOCKET: &str = vmdk_protocol::DEFAULT_PLUGIN_SOCKET;
/// Default mount root.
pub const DEFAULT_MOUNT_ROOT: &str = "/mnt/vmdk";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmdk-plugin";

/// Where this VM's id came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmIdSource {
    /// `--vm-id`.
    Flag,
    /// `/sys/class/dmi/id/product_uuid`: the BIOS UUID, what vSphere
    /// knows the VM by.
    BiosUuid,
    /// `/etc/machine-id`: the OS installation's id. Good enough for the
    /// `local` backend; no hypervisor knows a VM by it.
    MachineId,
}

/// Finds this VM's id: `/sys/class/dmi/id/product_uuid`, else
/// `/etc/machine-id`.
pub fn detect_vm_id() -> Result<(String, VmIdSource), String> {
    detect_vm_id_from(
        Path::new("/sys/class/dmi/id/product_uuid"),
        Path::new("/etc/machine-id"),
    )
}

/// [`detect_vm_id`] with explicit paths (for tests).
pub fn detect_vm_id_from(product_uuid: &Path, machine_id: &Path) -> Result<(String, VmIdSource), String> {
    for (p, source) in [
        (product_uuid, VmIdSource::BiosUuid),
        (machine_id, VmIdSource::MachineId),
    ] {
        if let Ok(s) = std::fs::read_to_string(p) {
            let s = s.trim();
            if !s.is_empty() {
                return Ok((s.to_lowercase(), source));
            }
        }
    }
    Err(format!(
        "cannot determine the VM id: neither {} nor {} is readable; pass --vm-id",
        product_uuid.display(),
        machine_id.display()
    ))
}

/// The error when a hypervisor backend would be sent `/etc/machine-id`.
pub fn machine_id_refused(backend: &str) -> String {
    format!(
        "the {backend} backend finds this VM by its BIOS UUID, but /sys/class/dmi/id/product_uuid cannot be read (it is readable by root only; is this a VM?); /etc/machine-id is no VM identity; pass --vm-id with the VM's BIOS UUID"
    )
}

/// Everything `vmdk-plugin serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Plugin socket.
    pub socket: PathBuf,
    /// Agent URL; `None` runs the agent in-process.
    pub agent: Option<String>,
    /// The embedded agent's configuration file (`--agent-config`), e.g. a
    /// `vsphere` backend the plugin talks to directly.
    pub agent_config: Option<PathBuf>,
    /// Where `vm_id` came from.
    pub vm_id_source: VmIdSource,
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
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`), or off.
    pub admin_listen: vmdk_common::admin::AdminListen,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_id_falls_back_to_machine_id() {
        let d = tempfile::tempdir().unwrap();
        let mid = d.path().join("machine-id");
        std::fs::write(&mid, "ABCDEF\n").unwrap();
        assert_eq!(
            detect_vm_id_from(&d.path().join("none"), &mid).unwrap(),
            ("abcdef".to_owned(), VmIdSource::MachineId)
        );
        let pu = d.path().join("product_uuid");
        std::fs::write(&pu, "4C4C4544-0000\n").unwrap();
        assert_eq!(
            detect_vm_id_from(&pu, &mid).unwrap(),
            ("4c4c4544-0000".to_owned(), VmIdSource::BiosUuid)
        );
        assert!(detect_vm_id_from(&d.path().join("a"), &d.path().join("b")).is_err());
    }
}
