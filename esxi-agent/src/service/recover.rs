//! Start-up checks: attachments against metadata, and the files of
//! volumes whose create or remove was cut off by a crash.

use std::collections::BTreeMap;
use std::path::Path;

use vmdk_protocol::AttachStatus;

use super::{Target, VolumeService};
use crate::datastore::{DiskPaths, VolumeFile, DEFAULT_VMGROUP};
use crate::error::AgentError;
use crate::lock::VolumeLock;

/// What [`VolumeService::recover_on_start`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StartupRecovery {
    /// Volumes whose device was bound but not recorded, now detached.
    pub released: Vec<String>,
    /// Names whose files were left by a create or remove that a crash cut
    /// off (no metadata, so never a volume), now deleted.
    pub collected: Vec<String>,
}

impl VolumeService {
    /// Everything the agent checks when it starts, before it serves:
    /// releases unrecorded attachments, then deletes what cut-off creates
    /// and removes left behind (only files the agent marked as its own).
    /// Both only touch volumes whose lock is free or that they hold, so
    /// another agent on a shared datastore is never disturbed.
    pub fn recover_on_start(&self) -> StartupRecovery {
        let released = self.release_unrecorded_attachments();
        let collected = self.collect_incomplete_volumes();
        StartupRecovery { released, collected }
    }

    /// Deletes what creates and removes cut off by a crash left: the files
    /// of a name that has no metadata but carries the agent's
    /// `<vol>.creating` or `<vol>.removing` marker (written before any
    /// disk file is made or any is deleted, so such a name never was, or no
    /// longer is, a volume). Also drops stale `<vol>.vmfd.tmp` and
    /// `<vol>.vmdk.tmp` files of writes that never reached their rename,
    /// markers of operations whose volume is intact, and lone lock files.
    ///
    /// Files without metadata and without a marker (a disk the original
    /// vDVS or an administrator put there) are never deleted, only logged.
    /// A name whose lock another process holds is skipped: an operation is
    /// under way there. So is an extent that is still bound to a device.
    /// Returns the names collected (`vol@ds`).
    pub fn collect_incomplete_volumes(&self) -> Vec<String> {
        let mut collected = Vec::new();
        for ds in &self.datastores {
            let dir = ds.group_dir(DEFAULT_VMGROUP);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            // Which kinds of file each name has, from the listing alone: a
            // volume with its sidecar and no marker or temp file (nearly
            // all of them) needs no lock and no further look.
            let mut kinds: BTreeMap<String, Vec<VolumeFile>> = BTreeMap::new();
            for e in entries.flatten() {
                let Ok(file) = e.file_name().into_string() else {
                    continue;
                };
                if let Some((stem, kind)) = DiskPaths::volume_of_file(&file) {
                    if vmdk_protocol::name::validate_volume(stem).is_ok() {
                        kinds.entry(stem.to_owned()).or_default().push(kind);
                    }
                }
            }
            let suspect = |k: &Vec<VolumeFile>| {
                !k.contains(&VolumeFile::Meta) || k.iter().any(|f| matches!(f, VolumeFile::Marker | VolumeFile::Temp))
            };
            for stem in kinds.iter().filter(|(_, k)| suspect(k)).map(|(stem, _)| stem) {
                let t = Target {
                    full: format!("{stem}@{}", ds.name),
                    ds,
                    disk: DiskPaths::new(&dir, stem),
                };
                match self.collect_one(&t) {
                    Ok(true) => {
                        tracing::warn!(volume = %t.full, "deleted the files of a create or remove that did not finish");
                        collected.push(t.full.clone());
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(volume = %t.full, error = %e, "cannot check for unfinished create or remove")
                    }
                }
            }
        }
        collected
    }

    fn collect_one(&self, t: &Target<'_>) -> Result<bool, String> {
        let d = &t.disk;
        let chain = |e: AgentError| crate::error::error_chain(&e);
        let lock_existed = d.lock.exists();
        let lock = match VolumeLock::try_acquire(&d.lock) {
            Ok(Some(lock)) => lock,
            Ok(None) => return Ok(false),
            Err(e) => return Err(format!("lock {}: {e}", d.lock.display())),
        };
        // Temp files of atomic writes that never reached their rename (the
        // lock is ours, so no write is under way).
        for tmp in d.temp_files() {
            crate::fsutil::remove_if_exists(&tmp).map_err(|e| format!("delete {}: {e}", tmp.display()))?;
        }
        let marked = d.marked();
        if d.meta.exists() {
            if d.removing.exists() {
                tracing::warn!(volume = %t.full, "a remove stopped before it deleted anything; the volume stays");
            }
            Self::clear_markers(d).map_err(chain)?;
            if !lock_existed {
                // Made by this check (a foreign file named like metadata).
                let _ = lock.unlink();
            }
            return Ok(false);
        }
        let has_disk = d.existing_disk_file().is_some();
        if has_disk && !marked {
            tracing::warn!(volume = %t.full, dir = %d.dir.display(), "files without vmdk metadata (not a vmdk volume); left alone");
            let _ = lock.unlink();
            return Ok(false);
        }
        if has_disk {
            match self.backend.attachment(d) {
                Ok(None) => {}
                Ok(Some(att)) => {
                    return Err(format!(
                        "its extent has no metadata but is attached ({}); leaving it",
                        att.device.unwrap_or_default()
                    ))
                }
                Err(e) => return Err(crate::error::error_chain(&e)),
            }
            self.backend.delete_disk(d).map_err(|e| crate::error::error_chain(&e))?;
        }
        Self::clear_markers(d).map_err(chain)?;
        lock.unlink().map_err(|e| format!("delete {}: {e}", d.lock.display()))?;
        Ok(has_disk)
    }

    /// Releases attachments that no metadata records: a device bound to a
    /// volume whose sidecar says it is detached (the agent was killed
    /// between binding the device and writing the sidecar), or to the
    /// extent of a create or remove that a crash cut off (marked as ours).
    /// A device bound to a file that is not a vmdk volume is left alone.
    /// Runs under each volume's lock, so an attach in progress in another
    /// process is never undone. Returns the volumes released.
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
                let recorded = meta.as_ref().is_some_and(|m| m.status == AttachStatus::Attached);
                if recorded {
                    return Ok(false);
                }
                // No metadata and no marker of ours: not a vmdk volume, and
                // its device is not ours to release.
                if meta.is_none() && !t.disk.marked() {
                    tracing::warn!(volume = %t.full, device = ?att.device, "a device is bound to a file that is not a vmdk volume; left alone");
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
