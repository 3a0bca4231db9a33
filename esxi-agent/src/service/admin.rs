//! The administrator's operations on the volume service: VSAN policies,
//! volume settings, the inventory behind `vmdk-agent ls`, datastore usage.
//!
//! They follow the service's rules: input is validated before anything
//! touches the disk, a volume is changed only under its lock, and the
//! policy lock (see [`crate::policy`]) is taken before any volume lock.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::stream::{self, StreamExt};
use serde::Serialize;
use vmdk_protocol::options::{self as opt, VolumeOptions};
use vmdk_protocol::{AccessMode, AttachAs, AttachStatus, PolicyState, VolumeInfo};

use super::{Caller, Target, VolumeService};
use crate::backend::PolicySpec;
use crate::datastore::{Datastore, VolumeFolder, DEFAULT_VMGROUP};
use crate::error::AgentError;
use crate::meta::VolumeMeta;
use crate::policy::{self, PolicyError, PolicyExpr, PolicyFiles, PolicyLock, PolicyStore};

/// Keys `vmdk-agent set` may change.
pub const EDITABLE_OPTIONS: &[&str] = &[opt::ACCESS, opt::ATTACH_AS];

/// A policy with the volumes that use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyInfo {
    /// Policy name.
    pub name: String,
    /// Policy expression as stored.
    pub content: String,
    /// Volumes (`vol@ds`) whose metadata names this policy, sorted.
    pub volumes: Vec<String>,
    /// Volumes the current content could not be applied to by the last
    /// `policy update` (run the same update again to retry them).
    pub failed_updates: Vec<String>,
}

/// What `policy update` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyUpdate {
    /// The policy.
    pub name: String,
    /// Whether the content was unchanged and only the volumes of an
    /// earlier, partly failed update were retried.
    pub retried: bool,
    /// Volumes the new content was applied to.
    pub updated: Vec<String>,
    /// Volumes it could not be applied to, with the reason.
    pub failed: Vec<(String, String)>,
}

/// A datastore's space and volume count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatastoreUsage {
    /// Datastore name.
    pub name: String,
    /// Its directory (datastores this host reaches as directories).
    pub path: Option<PathBuf>,
    /// Whether it is VSAN.
    pub vsan: bool,
    /// Volumes in `dockvols/_DEFAULT`.
    pub volumes: usize,
    /// Bytes available to the agent, if the file system could be read.
    pub free_bytes: Option<u64>,
    /// File system size, if it could be read.
    pub total_bytes: Option<u64>,
}

/// How many volumes are read at once when listing: file reads of many small
/// files (or requests to a hypervisor) overlap well.
const LIST_CONCURRENCY: usize = 16;

impl VolumeService {
    /// The policy folder (on the first VSAN datastore), as a directory on
    /// this host. Errors when no datastore is VSAN.
    pub fn policy_store(&self) -> Result<PolicyStore, AgentError> {
        Ok(PolicyStore::of(&self.datastores)?)
    }

    /// The policy folder wherever it is: the backend's (`vsphere`: the
    /// datastore file API) or a directory on this host. Errors when no
    /// datastore is VSAN.
    pub fn policy_files(&self) -> Result<Arc<dyn PolicyFiles>, AgentError> {
        let store = self.policy_store()?;
        let ds = self
            .datastores
            .iter()
            .find(|d| d.name == store.datastore())
            .expect("the store is on one of the datastores");
        Ok(self.backend.policy_files(ds).unwrap_or_else(|| Arc::new(store)))
    }

    /// Checks that policy `name` may be used for a new volume on `ds` and
    /// returns the shared policy lock to hold until the volume's metadata is
    /// written.
    pub(super) async fn use_policy(&self, ds: &Datastore, name: &str) -> Result<Option<PolicyLock>, AgentError> {
        if !ds.vsan {
            return Err(PolicyError::NotVsan {
                datastore: ds.name.clone(),
            }
            .into());
        }
        policy::validate_name(name)?;
        let files = self.policy_files()?;
        let lock = files.lock_shared().await?;
        if lock.is_none() || files.read(name).await?.is_none() {
            return Err(PolicyError::NotFound {
                name: name.to_owned(),
                available: files.names().await?,
            }
            .into());
        }
        Ok(lock)
    }

    /// The create options' policy with its content, if they name one.
    pub(super) async fn new_policy(&self, opts: &VolumeOptions) -> Result<Option<(String, String)>, AgentError> {
        let Some(name) = &opts.vsan_policy else {
            return Ok(None);
        };
        let content = self
            .policy_files()?
            .read(name)
            .await?
            .ok_or_else(|| PolicyError::NotFound {
                name: name.clone(),
                available: Vec::new(),
            })?;
        Ok(Some((name.clone(), content)))
    }

    /// The policy an attach hands to the backend: the volume's, unless it
    /// is only recorded (the backend cannot apply it). A policy that cannot
    /// be read is logged and left out: the disk keeps the profile it has.
    pub(super) async fn attach_policy(&self, t: &Target<'_>, meta: &VolumeMeta) -> Option<(String, String)> {
        let name = meta.opt(opt::VSAN_POLICY_NAME)?;
        if matches!(meta.policy_state, Some(PolicyState::Recorded { .. })) {
            return None;
        }
        let read = async { self.policy_files()?.read(name).await.map_err(AgentError::from) };
        match read.await {
            Ok(Some(content)) => Some((name.to_owned(), content)),
            Ok(None) => {
                tracing::warn!(volume = %t.full, policy = name, "the volume's VSAN policy no longer exists; attaching without it");
                None
            }
            Err(e) => {
                tracing::warn!(volume = %t.full, policy = name, error = %crate::error::error_chain(&e), "cannot read the volume's VSAN policy; attaching without it");
                None
            }
        }
    }

    /// Every volume on every datastore: a target per `<vol>.vmfd` entry,
    /// with its folder (opened once per datastore, shared by the threads).
    #[allow(clippy::type_complexity)]
    async fn volume_targets(&self) -> Result<Vec<(Target<'_>, Arc<dyn VolumeFolder>)>, AgentError> {
        Ok(self.folder_scan().await?.0)
    }

    /// [`VolumeService::volume_targets`], and the volumes with a
    /// `.creating` marker but no sidecar (a create under way, or one that
    /// crashed).
    #[allow(clippy::type_complexity)]
    async fn folder_scan(
        &self,
    ) -> Result<
        (
            Vec<(Target<'_>, Arc<dyn VolumeFolder>)>,
            Vec<(Target<'_>, Arc<dyn VolumeFolder>)>,
        ),
        AgentError,
    > {
        let mut out = Vec::new();
        let mut creating = Vec::new();
        for ds in &self.datastores {
            let opened = self.backend.folder(ds, DEFAULT_VMGROUP, false).await;
            let folder: Arc<dyn VolumeFolder> = match opened {
                Ok(Some(f)) => Arc::from(f),
                Ok(None) => continue,
                Err(source) => {
                    return Err(AgentError::Store {
                        name: format!("*@{}", ds.name),
                        source,
                    })
                }
            };
            let entries = folder.list().await.map_err(|source| AgentError::Store {
                name: format!("*@{}", ds.name),
                source,
            })?;
            let names: std::collections::HashSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            for entry in &entries {
                if let Some(volume) = entry.name.strip_suffix(".creating") {
                    if !names.contains(format!("{volume}.vmfd").as_str())
                        && vmdk_protocol::name::validate_volume(volume).is_ok()
                    {
                        creating.push((
                            Target {
                                full: format!("{volume}@{}", ds.name),
                                ds,
                                volume: volume.to_owned(),
                            },
                            folder.clone(),
                        ));
                    }
                    continue;
                }
                let Some(volume) = entry.name.strip_suffix(".vmfd") else {
                    continue;
                };
                if vmdk_protocol::name::validate_volume(volume).is_err() {
                    continue;
                }
                out.push((
                    Target {
                        full: format!("{volume}@{}", ds.name),
                        ds,
                        volume: volume.to_owned(),
                    },
                    folder.clone(),
                ));
            }
        }
        Ok((out, creating))
    }

    /// A create answered early and still running, perhaps in another
    /// process: its `.creating` marker notes progress and its lock is held.
    /// `None` for a marker without a note (an ordinary create under way, or
    /// a crashed one the next start collects).
    async fn creating_info(&self, t: &Target<'_>, folder: &dyn VolumeFolder) -> Option<VolumeInfo> {
        let (step, percent) = folder.noted_progress(&t.volume).await.ok()??;
        // Held: someone is creating it; free: a leftover of a crash.
        if folder.try_lock(&t.volume).await.ok()?.is_some() {
            return None;
        }
        Some(VolumeInfo {
            name: t.full.clone(),
            volume: t.volume.clone(),
            datastore: t.ds.name.clone(),
            vmgroup: DEFAULT_VMGROUP.to_owned(),
            capacity_bytes: 0,
            allocated_bytes: 0,
            disk_format: vmdk_protocol::DiskFormat::Thin,
            fstype: String::new(),
            vsan_policy: None,
            access: vmdk_protocol::AccessMode::ReadWrite,
            attach_as: vmdk_protocol::AttachAs::IndependentPersistent,
            status: vmdk_protocol::AttachStatus::Detached,
            attached_to: None,
            created: String::new(),
            created_by: String::new(),
            clone_from: None,
            disk_uuid: String::new(),
            options: Default::default(),
            formatted: None,
            vsan_policy_state: None,
            creating: Some(vmdk_protocol::CreateProgress {
                step,
                percent,
                started: String::new(),
                failed: None,
            }),
        })
    }

    /// Every volume's metadata, read in parallel; unreadable ones are
    /// logged and skipped.
    async fn all_metadata(&self) -> Result<Vec<(Target<'_>, VolumeMeta)>, AgentError> {
        let targets = self.volume_targets().await?;
        let reads: Vec<_> = targets.iter().map(|(t, f)| Self::load_meta(t, &**f)).collect();
        let metas: Vec<_> = stream::iter(reads).buffered(LIST_CONCURRENCY).collect().await;
        Ok(targets
            .into_iter()
            .zip(metas)
            .filter_map(|((t, _), m)| match m {
                Ok(Some(m)) => Some((t, m)),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "skipping unreadable volume");
                    None
                }
            })
            .collect())
    }

    /// Volumes whose metadata names each policy.
    async fn policy_users(&self) -> Result<BTreeMap<String, Vec<String>>, AgentError> {
        let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (t, meta) in self.all_metadata().await? {
            if let Some(p) = meta.opt(opt::VSAN_POLICY_NAME) {
                users.entry(p.to_owned()).or_default().push(t.full);
            }
        }
        for v in users.values_mut() {
            v.sort();
        }
        Ok(users)
    }

    /// Like [`VolumeService::list`], reading the volumes in parallel; what
    /// `vmdk-agent ls` shows. Sorted by name; unreadable volumes are logged
    /// and skipped. Volumes whose holder the hypervisor reports powered off
    /// are released first (see [`VolumeService::get`]); each holder's power
    /// state is read once.
    pub async fn inventory(&self) -> Result<Vec<VolumeInfo>, AgentError> {
        if let Some(listed) = self.catalog_inventory(None).await {
            return listed;
        }
        let (targets, creating) = self.folder_scan().await?;
        let reads: Vec<_> = targets.iter().map(|(t, f)| Self::load_meta(t, &**f)).collect();
        let metas: Vec<_> = stream::iter(reads).buffered(LIST_CONCURRENCY).collect().await;
        let mut power: BTreeMap<String, Option<bool>> = BTreeMap::new();
        let mut loaded = Vec::with_capacity(targets.len());
        for ((t, f), m) in targets.iter().zip(metas) {
            let meta = match m {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "skipping unreadable volume");
                    continue;
                }
            };
            // Only a powered-off holder costs more than its one lookup: a
            // list does not check every attachment (a get does).
            let meta = match super::attached_vm(&meta).map(str::to_owned) {
                Some(holder) => {
                    let off = match power.get(&holder) {
                        Some(off) => *off,
                        None => {
                            let off = self.holder_powered_off(t, &holder).await;
                            power.insert(holder, off);
                            off
                        }
                    };
                    match off {
                        Some(true) => self.recheck_unlocked(t, &**f, true).await.unwrap_or(meta),
                        _ => meta,
                    }
                }
                None => meta,
            };
            loaded.push((t, meta));
        }
        let reads: Vec<_> = loaded.iter().map(|(t, m)| self.info(t, m)).collect();
        let infos: Vec<_> = stream::iter(reads).buffered(LIST_CONCURRENCY).collect().await;
        let mut out: Vec<VolumeInfo> = loaded
            .iter()
            .zip(infos)
            .filter_map(|((t, _), r)| match r {
                Ok(info) => Some(info),
                Err(e) => {
                    tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "skipping unreadable volume");
                    None
                }
            })
            .collect();
        for (t, f) in &creating {
            out.extend(self.creating_info(t, &**f).await);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// [`VolumeService::inventory`] from the catalog (see
    /// `service::catalog`); `None` when a datastore is not served by one.
    pub(super) async fn catalog_inventory(&self, only_vm: Option<&str>) -> Option<Result<Vec<VolumeInfo>, AgentError>> {
        if self.backend.kind() != "local" || self.datastores.iter().any(|d| d.root.is_none()) {
            return None;
        }
        let mut loaded: Vec<(Target<'_>, VolumeMeta, crate::backend::DiskInfo)> = Vec::new();
        let mut creating = Vec::new();
        for (i, ds) in self.datastores.iter().enumerate() {
            match self.catalog_scan(i, ds, only_vm).await {
                Ok(Some((vols, made))) => {
                    loaded.extend(vols);
                    creating.extend(made);
                }
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
        }
        let mut power: BTreeMap<String, Option<bool>> = BTreeMap::new();
        let mut out = Vec::with_capacity(loaded.len() + creating.len());
        for (t, meta, disk) in loaded {
            let meta = match super::attached_vm(&meta).map(str::to_owned) {
                Some(holder) => {
                    let off = match power.get(&holder) {
                        Some(off) => *off,
                        None => {
                            let off = self.holder_powered_off(&t, &holder).await;
                            power.insert(holder, off);
                            off
                        }
                    };
                    match (off, self.catalog_folder(t.ds)) {
                        (Some(true), Some((_, f))) => self.recheck_unlocked(&t, &f, true).await.unwrap_or(meta),
                        _ => meta,
                    }
                }
                None => meta,
            };
            out.push(super::build_info(&t.full, t.ds, DEFAULT_VMGROUP, &meta, &disk));
        }
        for (t, f) in &creating {
            out.extend(self.creating_info(t, f).await);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Some(Ok(out))
    }

    /// The volumes of datastore `i` from its catalog, brought up to date
    /// when its folder changed since the last scan (unless only this agent
    /// changed it lately, see `service::catalog`); and the names being
    /// created. `None` when the datastore has no volume folder.
    #[allow(clippy::type_complexity)]
    async fn catalog_scan<'a>(
        &'a self,
        i: usize,
        ds: &'a Datastore,
        only_vm: Option<&str>,
    ) -> Result<
        Option<(
            Vec<(Target<'a>, VolumeMeta, crate::backend::DiskInfo)>,
            Vec<(Target<'a>, crate::datastore::LocalFolder)>,
        )>,
        AgentError,
    > {
        let store_err = |source| AgentError::Store {
            name: format!("*@{}", ds.name),
            source,
        };
        let Some(folder) = ds.folder(DEFAULT_VMGROUP, false).map_err(store_err)? else {
            return Ok(None);
        };
        let uncached = self.catalog_current(i, &folder).await?;
        let (mut vols, creating) = self.catalog_contents(i, ds, &folder, only_vm);
        vols.extend(
            uncached
                .into_iter()
                .filter(|(_, m, _)| only_vm.is_none() || super::attached_vm(m) == only_vm)
                .map(|(volume, m, d)| {
                    let t = Target {
                        full: format!("{volume}@{}", ds.name),
                        ds,
                        volume,
                    };
                    (t, m, d)
                }),
        );
        Ok(Some((vols, creating)))
    }

    /// Brings catalog `i` (whose folder is `folder`) up to date unless List
    /// may answer from it as it is (see `service::catalog`), starting a
    /// background verification when the catalog asks for one. Returns what
    /// a scan read but could not keep.
    pub(super) async fn catalog_current(
        &self,
        i: usize,
        folder: &crate::datastore::LocalFolder,
    ) -> Result<super::catalog::Uncached, AgentError> {
        use super::catalog::Answer;
        let usable = || -> Result<bool, AgentError> {
            let st = folder.dir().stat_self().map_err(|source| AgentError::Store {
                name: format!("*@{}", self.datastores[i].name),
                source,
            })?;
            Ok(match self.catalog.answer(i, &st) {
                Answer::Stale => false,
                Answer::Tolerated { verify: true } => {
                    self.spawn_verify(i);
                    true
                }
                _ => true,
            })
        };
        if usable()? {
            return Ok(Vec::new());
        }
        let _scanning = self.catalog.scanning[i].lock().await;
        if usable()? {
            return Ok(Vec::new());
        }
        self.refresh(i).await
    }

    /// Scans catalog `i`'s folder on the blocking pool (the caller holds
    /// its `scanning` lock).
    pub(super) async fn refresh(&self, i: usize) -> Result<super::catalog::Uncached, AgentError> {
        let ds = self.datastores[i].clone();
        let name = format!("*@{}", ds.name);
        let store_err = |source| AgentError::Store {
            name: name.clone(),
            source,
        };
        let Some(folder) = ds.folder(DEFAULT_VMGROUP, false).map_err(store_err)? else {
            return Ok(Vec::new());
        };
        let (catalog, backend) = (self.catalog.clone(), self.backend.clone());
        vmdk_common::runtime::spawn_blocking(move || catalog.refresh_blocking(i, &ds, &folder, &*backend))
            .await
            .map_err(|e| AgentError::Internal(format!("the folder scan failed: {e}")))?
            .map_err(store_err)
    }

    /// Verifies catalog `i` against its folder in the background (see
    /// `service::catalog`); the catalog has marked it as running.
    pub(super) fn spawn_verify(&self, i: usize) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.catalog.verified(i);
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            {
                let _scanning = me.catalog.scanning[i].lock().await;
                if let Err(e) = me.refresh(i).await {
                    tracing::warn!(datastore = %me.datastores[i].name, error = %crate::error::error_chain(&e), "cannot verify the volume catalog");
                }
            }
            me.catalog.verified(i);
        });
    }

    /// Every entry of catalog `i` (only those the records say `only_vm`
    /// holds, if given), and the names being created.
    #[allow(clippy::type_complexity)]
    fn catalog_contents<'a>(
        &'a self,
        i: usize,
        ds: &'a Datastore,
        folder: &crate::datastore::LocalFolder,
        only_vm: Option<&str>,
    ) -> (
        Vec<(Target<'a>, VolumeMeta, crate::backend::DiskInfo)>,
        Vec<(Target<'a>, crate::datastore::LocalFolder)>,
    ) {
        let cat = self.catalog.folders[i].read().unwrap();
        let target = |volume: &str| Target {
            full: format!("{volume}@{}", ds.name),
            ds,
            volume: volume.to_owned(),
        };
        let vols = cat
            .vols
            .iter()
            .filter(|(_, e)| only_vm.is_none() || e.holder() == only_vm)
            .map(|(v, e)| (target(v), e.meta(), e.disk(None)))
            .collect();
        let creating = cat.creating.iter().map(|c| (target(c), folder.clone())).collect();
        (vols, creating)
    }

    /// `policy create`: validates name and content, refuses an existing
    /// name, then writes the policy file.
    pub async fn policy_create(&self, name: &str, content: &str) -> Result<PolicyExpr, AgentError> {
        policy::validate_name(name)?;
        let content = content.trim();
        let expr = policy::parse_content(name, content)?;
        let store = self.policy_files()?;
        let _lock = store.lock_exclusive().await?;
        if store.read(name).await?.is_some() {
            return Err(PolicyError::AlreadyExists {
                name: name.to_owned(),
                path: store.path(name).to_string(),
            }
            .into());
        }
        // A record left by a policy of this name that is gone (a crash in
        // `policy rm`) is not about this one.
        store.clear_failed_updates(name).await?;
        store.write(name, content).await?;
        tracing::info!(policy = name, content, "created policy");
        Ok(expr)
    }

    /// The store after checking that policy `name` exists in it; errors
    /// name the available policies. Creates nothing.
    async fn existing_policy(&self, name: &str) -> Result<(Arc<dyn PolicyFiles>, PolicyLock, String), AgentError> {
        policy::validate_name(name)?;
        let store = self.policy_files()?;
        let not_found = |available: Vec<String>| -> AgentError {
            PolicyError::NotFound {
                name: name.to_owned(),
                available,
            }
            .into()
        };
        if store.lock_shared().await?.is_none() {
            // No policy folder: nothing to find, and nothing is created.
            return Err(not_found(store.names().await?));
        }
        let lock = store.lock_exclusive().await?;
        match store.read(name).await? {
            Some(old) => Ok((store, lock, old)),
            None => Err(not_found(store.names().await?)),
        }
    }

    /// `policy update`: writes the new content, then re-applies the policy
    /// to every volume using it. When it cannot be applied to any of them,
    /// the old content is restored and the update fails. When it fails on
    /// some, they are recorded (see [`PolicyStore::failed_updates`]); the
    /// same update run again then retries just those volumes instead of
    /// being refused as identical.
    pub async fn policy_update(&self, name: &str, content: &str) -> Result<(PolicyExpr, PolicyUpdate), AgentError> {
        policy::validate_name(name)?;
        let content = content.trim();
        let expr = policy::parse_content(name, content)?;
        let (store, _lock, old) = self.existing_policy(name).await?;
        let same = match PolicyExpr::parse(&old) {
            Ok(old_expr) => old_expr == expr,
            Err(_) => old.trim() == content,
        };
        let retry = if same {
            match store.failed_updates(name).await? {
                Some(previous) => Some(previous.failed.into_iter().map(|f| f.volume).collect::<Vec<_>>()),
                None => return Err(PolicyError::Identical { name: name.to_owned() }.into()),
            }
        } else {
            None
        };
        // On a retry the file keeps its text: `content` may differ from it
        // in spacing only.
        let content = if same { old.trim() } else { content };
        if retry.is_none() {
            store.write(name, content).await?;
        }
        let users: Vec<Target<'_>> = self
            .all_metadata()
            .await?
            .into_iter()
            .filter(|(t, m)| {
                m.opt(opt::VSAN_POLICY_NAME) == Some(name) && retry.as_ref().is_none_or(|r| r.contains(&t.full))
            })
            .map(|(t, _)| t)
            .collect();
        let mut report = PolicyUpdate {
            name: name.to_owned(),
            retried: retry.is_some(),
            updated: Vec::new(),
            failed: Vec::new(),
        };
        for t in &users {
            let applied = async {
                let folder = self.existing_folder(t).await?;
                let _lock = Self::lock(t, &*folder).await?;
                let mut meta = Self::existing_meta(t, &*folder).await?;
                if meta.opt(opt::VSAN_POLICY_NAME) != Some(name) {
                    return Ok(false);
                }
                let holder = match meta.status {
                    AttachStatus::Attached => meta.attached_vm.clone(),
                    AttachStatus::Detached => None,
                };
                let state = self
                    .backend
                    .apply_policy(&t.disk(), PolicySpec { name, content }, holder.as_deref())
                    .await
                    .map_err(Self::backend_err(t))?;
                super::log_policy_state(t, name, state.as_ref());
                if meta.policy_state != state {
                    meta.policy_state = state;
                    self.store_meta(t, &*folder, &meta).await?;
                }
                Ok::<_, AgentError>(true)
            }
            .await;
            match applied {
                Ok(true) => report.updated.push(t.full.clone()),
                Ok(false) => {}
                Err(e) => report.failed.push((t.full.clone(), crate::error::error_chain(&e))),
            }
        }
        report.updated.sort();
        report.failed.sort();
        if retry.is_none() && report.updated.is_empty() && !report.failed.is_empty() {
            // Nothing took the new content: put the old one back. A record
            // of earlier failures stays, because it is about that content.
            store.write(name, &old).await?;
            tracing::warn!(
                policy = name,
                "policy update failed on every volume; old content restored"
            );
            return Err(PolicyError::UpdateFailed {
                name: name.to_owned(),
                failures: report.failed,
            }
            .into());
        }
        if report.failed.is_empty() {
            store.clear_failed_updates(name).await?;
        } else {
            let record = policy::FailedUpdates {
                version: policy::FAILED_UPDATES_VERSION,
                content: content.to_owned(),
                at: super::now_rfc3339(),
                failed: report
                    .failed
                    .iter()
                    .map(|(volume, error)| policy::FailedVolume {
                        volume: volume.clone(),
                        error: error.clone(),
                    })
                    .collect(),
            };
            store.record_failed_updates(name, &record).await?;
        }
        tracing::info!(
            policy = name,
            content,
            retry = report.retried,
            updated = report.updated.len(),
            failed = report.failed.len(),
            "updated policy"
        );
        Ok((expr, report))
    }

    /// `policy rm`: refused while any volume uses the policy.
    pub async fn policy_remove(&self, name: &str) -> Result<(), AgentError> {
        let (store, _lock, _) = self.existing_policy(name).await?;
        if let Some(volumes) = self.policy_users().await?.remove(name) {
            return Err(PolicyError::InUse {
                name: name.to_owned(),
                volumes,
            }
            .into());
        }
        store.remove(name).await?;
        tracing::info!(policy = name, "removed policy");
        Ok(())
    }

    /// `policy ls`: every policy with the volumes using it.
    pub async fn policies(&self) -> Result<Vec<PolicyInfo>, AgentError> {
        let store = self.policy_files()?;
        let list = store.list().await?;
        let mut users = if list.is_empty() {
            BTreeMap::new()
        } else {
            self.policy_users().await?
        };
        let mut out = Vec::with_capacity(list.len());
        for (name, content) in list {
            let volumes = users.remove(&name).unwrap_or_default();
            // Volumes removed or moved to another policy since are no
            // longer behind.
            let failed_updates = store
                .failed_updates(&name)
                .await?
                .map(|r| {
                    r.failed
                        .into_iter()
                        .map(|f| f.volume)
                        .filter(|v| volumes.contains(v))
                        .collect()
                })
                .unwrap_or_default();
            out.push(PolicyInfo {
                volumes,
                failed_updates,
                name,
                content,
            });
        }
        Ok(out)
    }

    /// `vmdk-agent set`: changes `access` and `attach-as` of a volume, under
    /// its lock. They take effect at the next attach (mount).
    pub async fn set_options(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<VolumeInfo, AgentError> {
        let t = self.resolve(&Caller::Admin, name).await?;
        let bad: Vec<String> = opts
            .keys()
            .filter(|k| !EDITABLE_OPTIONS.contains(&k.as_str()))
            .cloned()
            .collect();
        if !bad.is_empty() {
            return Err(AgentError::NotEditable { keys: bad });
        }
        if opts.is_empty() {
            return Err(AgentError::InvalidRequest(
                "no options given; editable options are access and attach-as".into(),
            ));
        }
        let access = opts.get(opt::ACCESS).map(|v| v.parse::<AccessMode>()).transpose()?;
        let attach_as = opts.get(opt::ATTACH_AS).map(|v| v.parse::<AttachAs>()).transpose()?;
        let folder = self.existing_folder(&t).await?;
        let _lock = Self::lock(&t, &*folder).await?;
        let mut meta = Self::existing_meta(&t, &*folder).await?;
        if let Some(a) = access {
            meta.vol_opts.insert(opt::ACCESS.into(), a.to_string());
        }
        if let Some(a) = attach_as {
            meta.vol_opts.insert(opt::ATTACH_AS.into(), a.to_string());
        }
        self.store_meta(&t, &*folder, &meta).await?;
        tracing::info!(volume = %t.full, ?access, ?attach_as, "updated volume settings");
        self.info(&t, &meta).await
    }

    /// Free space and volume count of every datastore.
    pub fn datastore_usage(&self) -> Vec<DatastoreUsage> {
        self.datastores
            .iter()
            .map(|ds| {
                let volumes = match ds.folder(DEFAULT_VMGROUP, false) {
                    Ok(Some(f)) => f
                        .dir()
                        .entries()
                        .map(|entries| {
                            entries
                                .iter()
                                .filter(|e| {
                                    e.name
                                        .strip_suffix(".vmfd")
                                        .is_some_and(|v| vmdk_protocol::name::validate_volume(v).is_ok())
                                })
                                .count()
                        })
                        .unwrap_or(0),
                    _ => 0,
                };
                let fs = ds.root.as_deref().and_then(|r| nix::sys::statvfs::statvfs(r).ok());
                DatastoreUsage {
                    name: ds.name.clone(),
                    path: ds.root.clone(),
                    vsan: ds.vsan,
                    volumes,
                    free_bytes: fs.as_ref().map(|s| s.blocks_available() * s.fragment_size()),
                    total_bytes: fs.as_ref().map(|s| s.blocks() * s.fragment_size()),
                }
            })
            .collect()
    }
}
