//! Start-up checks: attachments against metadata, and the files of
//! volumes whose create or remove was cut off by a crash.

use std::collections::BTreeMap;
use std::path::Path;

use vmdk_protocol::{AttachStatus, VolumeInfo};

use super::{Target, VolumeService};
use crate::datastore::{VolumeFile, VolumeFiles, VolumeFolder, DEFAULT_VMGROUP, DOCKVOLS};
use crate::error::AgentError;
use crate::store::FileId;

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
    /// Everything the agent checks when it starts, before it serves: makes
    /// each datastore's folders private and fills its space reserve,
    /// releases unrecorded attachments, then deletes what cut-off creates
    /// and removes left behind (only files the agent marked as its own).
    /// The last two only touch volumes whose lock is free or that they
    /// hold, so another agent on a shared datastore is never disturbed.
    pub async fn recover_on_start(&self) -> StartupRecovery {
        let released = self.recover_attachments_on_start().await;
        let collected = self.collect_incomplete_volumes().await;
        StartupRecovery { released, collected }
    }

    /// The part of [`VolumeService::recover_on_start`] that comes before
    /// any attach or detach: prepares each datastore and releases
    /// unrecorded attachments. It costs the same at any number of volumes
    /// (it looks only at what is attached). The rest,
    /// [`VolumeService::collect_incomplete_volumes`], lists every folder,
    /// and may run beside operations: it only touches names that are no
    /// volume, under locks it takes without waiting. Returns the volumes
    /// released.
    pub async fn recover_attachments_on_start(&self) -> Vec<String> {
        for ds in self.datastores.iter().filter(|d| d.root.is_some()) {
            let d = ds.clone();
            match vmdk_common::runtime::spawn_blocking(move || d.prepare()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(datastore = %ds.name, error = %crate::error::error_chain(&e), "cannot prepare the datastore")
                }
                Err(e) => tracing::warn!(datastore = %ds.name, error = %e, "cannot prepare the datastore"),
            }
        }
        self.release_unrecorded_attachments().await
    }

    /// Deletes what creates and removes cut off by a crash left: the files
    /// of a name that has no metadata but carries the agent's
    /// `<vol>.creating` or `<vol>.removing` marker (made before any disk
    /// file is made or any is deleted, so such a name never was, or no
    /// longer is, a volume). Also drops temp files of atomic writes whose
    /// writer is gone, markers of operations whose volume is intact, and
    /// lone lock files.
    ///
    /// Files without metadata and without a marker (a disk the original
    /// vDVS or an administrator put there) are never deleted, only logged;
    /// nor is anything that is not a regular file. A name whose lock
    /// another process holds is skipped: an operation is under way there.
    /// So is an extent that is still bound to a device. Returns the names
    /// collected (`vol@ds`).
    pub async fn collect_incomplete_volumes(&self) -> Vec<String> {
        let mut collected = Vec::new();
        for ds in &self.datastores {
            let folder = match self.backend.folder(ds, DEFAULT_VMGROUP, false).await {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(datastore = %ds.name, error = %crate::error::error_chain(&e), "cannot look for unfinished creates and removes");
                    continue;
                }
            };
            if let Err(e) = folder.remove_stale_temp_files().await {
                tracing::warn!(datastore = %ds.name, error = %crate::error::error_chain(&e), "cannot remove leftover temp files");
            }
            let entries = match folder.list().await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(datastore = %ds.name, error = %crate::error::error_chain(&e), "cannot list volumes");
                    continue;
                }
            };
            // Which kinds of file each name has, from the listing alone: a
            // volume with its sidecar and no marker (nearly all of them)
            // needs no lock and no further look.
            let mut kinds: BTreeMap<String, Vec<VolumeFile>> = BTreeMap::new();
            for e in entries {
                if let Some((stem, kind)) = VolumeFiles::volume_of_file(&e.name) {
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
                    volume: stem.clone(),
                };
                match self.collect_one(&t, &*folder).await {
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

    async fn collect_one(&self, t: &Target<'_>, folder: &dyn VolumeFolder) -> Result<bool, String> {
        let files = t.files();
        let chain = |e: &dyn std::error::Error| crate::error::error_chain(e);
        let lock_existed = folder.entry(&files.lock).await.map_err(|e| chain(&e))?.is_some();
        let lock = match folder.try_lock(&t.volume).await {
            Ok(Some(lock)) => lock,
            Ok(None) => return Ok(false),
            Err(e) => return Err(chain(&e)),
        };
        // Temp files of writes that never reached their rename (the lock is
        // ours, so no write is under way).
        folder.remove_legacy_temps(&t.volume).await.map_err(|e| chain(&e))?;
        let marked = folder.marked(&t.volume).await.map_err(|e| chain(&e))?;
        if folder.entry(&files.meta).await.map_err(|e| chain(&e))?.is_some() {
            if folder.entry(&files.removing).await.map_err(|e| chain(&e))?.is_some() {
                tracing::warn!(volume = %t.full, "a remove stopped before it deleted anything; the volume stays");
            }
            folder.clear_markers(&t.volume).await.map_err(|e| chain(&e))?;
            if !lock_existed {
                // Made by this check (a foreign file named like metadata).
                let _ = lock.unlink();
            }
            return Ok(false);
        }
        let mut has_disk = false;
        for f in [&files.descriptor, &files.flat] {
            has_disk |= folder.entry(f).await.map_err(|e| chain(&e))?.is_some();
        }
        if has_disk && !marked {
            tracing::warn!(volume = %t.full, folder = %folder.shown(""), "files without vmdk metadata (not a vmdk volume); left alone");
            let _ = lock.unlink();
            return Ok(false);
        }
        if has_disk {
            match self.backend.attachment(&t.disk(), None).await {
                Ok(None) => {}
                Ok(Some(att)) => {
                    return Err(format!(
                        "its extent has no metadata but is attached ({}); leaving it",
                        att.device().unwrap_or_default()
                    ))
                }
                Err(e) => return Err(chain(&e)),
            }
            self.backend.delete_disk(&t.disk()).await.map_err(|e| chain(&e))?;
        }
        folder.clear_markers(&t.volume).await.map_err(|e| chain(&e))?;
        lock.unlink().map_err(|e| chain(&e))?;
        Ok(has_disk)
    }

    /// Releases attachments that no metadata records: a device bound to a
    /// volume whose sidecar says it is detached (the agent was killed
    /// between binding the device and writing the sidecar), or to the
    /// extent of a create or remove that a crash cut off (marked as ours).
    /// A device bound to a file that is not a vmdk volume is left alone.
    /// Runs under each volume's lock, so an attach in progress in another
    /// process is never undone. Returns the volumes released.
    pub async fn release_unrecorded_attachments(&self) -> Vec<String> {
        let extents = match self.backend.attached_extents().await {
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
            let res = async {
                let folder = self.existing_folder(&t).await?;
                let _lock = Self::lock(&t, &*folder).await?;
                let meta = Self::load_meta(&t, &*folder).await?;
                let recorded = meta.as_ref().is_some_and(|m| m.status == AttachStatus::Attached);
                if recorded {
                    return Ok(false);
                }
                // No metadata and no marker of ours: not a vmdk volume, and
                // its device is not ours to release.
                if meta.is_none() && !folder.marked(&t.volume).await.map_err(Self::store_err(&t))? {
                    tracing::warn!(volume = %t.full, device = ?att.device(), "a device is bound to a file that is not a vmdk volume; left alone");
                    return Ok(false);
                }
                let vm = meta.and_then(|m| m.attached_vm).unwrap_or_default();
                self.backend
                    .detach(&vm, &t.disk())
                    .await
                    .map_err(Self::backend_err(&t))?;
                Ok::<_, crate::error::AgentError>(true)
            }
            .await;
            match res {
                Ok(true) => {
                    tracing::warn!(volume = %t.full, device = ?att.device(), "released an attachment no metadata recorded");
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

    /// The volumes live-attached to the calling VM whose sidecars say so:
    /// what a restarted guest checks for attachments it no longer holds.
    /// Looks only at what is attached (the `local` backend: the loop devices
    /// bound to extents in a datastore folder; `vsphere`: the VM's own
    /// disks, one hypervisor call) and reads only those volumes' files, so
    /// it costs the same at any number of volumes on the datastores. A
    /// sidecar that claims an attachment the backend does not have is not
    /// listed: nothing is attached to release, and the next attach heals the
    /// claim. A volume whose files cannot be read is skipped (and logged).
    pub async fn attached_here(&self, caller: &super::Caller) -> Result<Vec<VolumeInfo>, AgentError> {
        let vm = caller.vm_id()?;
        let mut targets: BTreeMap<String, Target<'_>> = BTreeMap::new();
        let backend_err = |source| AgentError::Backend {
            name: "*".into(),
            source,
        };
        match self.backend.disks_of_vm(vm).await.map_err(backend_err)? {
            Some(files) => {
                for file in files {
                    if let Some(t) = self.target_of_datastore_path(&file) {
                        targets.insert(t.full.clone(), t);
                    }
                }
            }
            None => {
                for (extent, _) in self.backend.attached_extents().await.map_err(backend_err)? {
                    if let Some(t) = self.target_of_extent(&extent) {
                        targets.insert(t.full.clone(), t);
                    }
                }
            }
        }
        let mut out = Vec::new();
        for t in targets.values() {
            let res = async {
                let Some(folder) = self.folder(t, false).await? else {
                    return Ok(None);
                };
                let Some(meta) = Self::load_meta(t, &*folder).await? else {
                    return Ok(None);
                };
                if super::attached_vm(&meta) != Some(vm) {
                    return Ok(None);
                }
                self.info(t, &meta).await.map(Some)
            }
            .await;
            match res {
                Ok(Some(info)) => out.push(info),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "cannot read an attached volume")
                }
            }
        }
        Ok(out)
    }

    /// The volume a hypervisor's disk backing (`[ds] dockvols/_DEFAULT/
    /// vol.vmdk`) is, if it is a volume's descriptor on a configured
    /// datastore.
    fn target_of_datastore_path(&self, file: &str) -> Option<Target<'_>> {
        let (ds, path) = file.strip_prefix('[')?.split_once("] ")?;
        let name = path.strip_prefix(&format!("{DOCKVOLS}/{DEFAULT_VMGROUP}/"))?;
        let volume = name.strip_suffix(".vmdk")?;
        vmdk_protocol::name::validate_volume(volume).ok()?;
        if VolumeFiles::new(volume).descriptor != name {
            return None;
        }
        let ds = self.datastores.iter().find(|d| d.name == ds)?;
        Some(Target {
            full: format!("{volume}@{}", ds.name),
            ds,
            volume: volume.to_owned(),
        })
    }

    /// The volume an extent path (as the kernel shows it) belongs to, if it
    /// lies in the default vmgroup folder of a configured datastore. The
    /// folder is recognised by identity (device and inode), not by a path
    /// comparison; the backend then acts only on the extent's own inode.
    fn target_of_extent(&self, extent: &Path) -> Option<Target<'_>> {
        let file = extent.file_name()?.to_str()?;
        let volume = file.strip_suffix("-flat.vmdk")?;
        vmdk_protocol::name::validate_volume(volume).ok()?;
        let parent = std::fs::metadata(extent.parent()?).ok()?;
        let parent = FileId {
            dev: std::os::unix::fs::MetadataExt::dev(&parent),
            ino: std::os::unix::fs::MetadataExt::ino(&parent),
        };
        for ds in &self.datastores {
            let Ok(Some(folder)) = ds.folder(DEFAULT_VMGROUP, false) else {
                continue;
            };
            if folder.dir().stat_self().is_ok_and(|s| s.id == parent) {
                return Some(Target {
                    full: format!("{volume}@{}", ds.name),
                    ds,
                    volume: volume.to_owned(),
                });
            }
        }
        None
    }
}
