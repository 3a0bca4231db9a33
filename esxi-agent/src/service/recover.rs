//! Start-up check of attachments against metadata.

use std::path::Path;

use vmdk_protocol::AttachStatus;

use super::{Target, VolumeService};
use crate::datastore::DiskPaths;

impl VolumeService {
    /// Releases attachments that no metadata records: a device bound to a
    /// volume whose sidecar says it is detached (the agent was killed
    /// between binding the device and writing the sidecar), or to an extent
    /// whose volume no longer exists. Runs under each volume's lock, so an
    /// attach in progress in another process is never undone. Returns the
    /// volumes released.
    pub fn release_unrecorded_attachments(&self) -> Vec<String> {
        let extents = match self.backend.attached_extents() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot list attachments");
                return Vec::new();
            }
        };
        let mut released = Vec::new();
        for (extent, att) in extents {
            let Some(t) = self.target_of_extent(&extent) else {
                continue;
            };
            let res = self.locked(&t, |_| {
                let meta = Self::load_meta(&t)?;
                let recorded = meta.is_some_and(|m| m.status == AttachStatus::Attached);
                if recorded {
                    return Ok(false);
                }
                self.backend.detach(&t.disk).map_err(Self::backend_err(&t))?;
                Ok(true)
            });
            match res {
                Ok(true) => {
                    tracing::warn!(volume = %t.full, device = ?att.device, "released an attachment no metadata recorded");
                    released.push(t.full.clone());
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "cannot check attachment")
                }
            }
        }
        released
    }

    /// The volume an extent path belongs to, if it lies in a vmgroup folder
    /// of a configured datastore.
    fn target_of_extent(&self, extent: &Path) -> Option<Target<'_>> {
        let file = extent.file_name()?.to_str()?;
        let volume = file.strip_suffix("-flat.vmdk")?;
        vmdk_protocol::name::validate_volume(volume).ok()?;
        let group_dir = extent.parent()?;
        let group = group_dir.file_name()?.to_str()?.to_owned();
        let dockvols = group_dir.parent()?;
        for ds in &self.datastores {
            let ours = std::fs::canonicalize(ds.dockvols()).ok();
            if ours.as_deref() == Some(dockvols) || ds.dockvols() == dockvols {
                return Some(Target {
                    full: format!("{volume}@{}", ds.name),
                    ds,
                    disk: DiskPaths::new(&ds.group_dir(&group), volume),
                });
            }
        }
        None
    }
}
