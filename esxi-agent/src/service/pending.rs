//! Creates that run on after their answer.
//!
//! Docker gives a socket plugin's Create 2 minutes (a managed plugin's 30
//! s) and holds its per-name lock meanwhile, so `docker volume inspect`
//! cannot even show progress during a create. An eagerzeroedthick create
//! writes every byte of the disk and a clone copies one: minutes for large
//! volumes. So a create whose long part has begun answers after
//! [`super::VolumeService::with_answer_within`] and finishes in the
//! background, where:
//!
//! * Get and List show it with `creating: {step, percent}` (the plugin puts
//!   that in `docker volume inspect`'s Status), and the `.creating` marker
//!   on the datastore carries the percentage for `vmdk-agent ls` in other
//!   processes;
//! * its progress is logged every 10%;
//! * a Create retried with the same options is answered with its state;
//! * Attach (Mount) waits for it (bounded) and then proceeds;
//! * Remove cancels it (the create removes what it wrote) and succeeds;
//! * a failure after the answer is kept (in memory) and shown by Get, and
//!   Attach fails with it, until the volume is removed or created again.
//!
//! The record is in memory: after an agent restart an unfinished create is
//! collected by the start-up recovery like any interrupted create (its
//! marker says so), and the volume does not exist.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use vmdk_protocol::{CreateProgress, VolumeInfo};

use crate::backend::DiskBackend;
use crate::datastore::{Datastore, DEFAULT_VMGROUP};
use crate::error::AgentError;
use crate::progress::Progress;

/// A create answered early.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The long step (`zeroing`, `copying`).
    pub step: &'static str,
    /// The request's options, to tell a retry from another create.
    pub opts: BTreeMap<String, String>,
    /// What Get shows, without `creating`.
    pub preview: VolumeInfo,
    pub progress: Progress,
    /// `Some(cause)` once it failed.
    failed: Mutex<Option<String>>,
    /// `true` once it ended, either way.
    done: watch::Sender<bool>,
}

/// What a finished wait found.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The create finished and its volume exists.
    Created,
    /// It failed; the cause.
    Failed(String),
    /// Still running after the wait.
    Running {
        /// The step.
        step: &'static str,
        /// Percent done.
        percent: u8,
    },
}

impl Pending {
    /// The wire view, with `creating` filled in.
    pub fn info(&self) -> VolumeInfo {
        let mut v = self.preview.clone();
        v.creating = Some(CreateProgress {
            step: self.step.to_owned(),
            percent: self.progress.percent(),
            started: self.preview.created.clone(),
            failed: self.failed(),
        });
        v
    }

    /// The failure, once it failed.
    pub fn failed(&self) -> Option<String> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits up to `limit` for the create to end.
    pub async fn wait(&self, limit: Duration) -> Outcome {
        let mut rx = self.done.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|d| *d)).await;
        if !*rx.borrow() {
            return Outcome::Running {
                step: self.step,
                percent: self.progress.percent(),
            };
        }
        match self.failed() {
            Some(cause) => Outcome::Failed(cause),
            None => Outcome::Created,
        }
    }
}

/// The creates answered early, by canonical name.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    map: Mutex<HashMap<String, Arc<Pending>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Pending>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record of `name`, running or failed.
    pub fn get(&self, name: &str) -> Option<Arc<Pending>> {
        self.lock().get(name).cloned()
    }

    /// Every record, sorted by name.
    pub fn all(&self) -> Vec<Arc<Pending>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| a.preview.name.cmp(&b.preview.name));
        v
    }

    /// Forgets `name`'s record (after a remove, or before a new create of a
    /// name whose create failed).
    pub fn forget(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Registers a create answered early and follows `task` to its end:
    /// logs progress, notes it on the datastore, and records the outcome.
    #[allow(clippy::too_many_arguments)]
    pub fn follow(
        self: &Arc<Self>,
        step: &'static str,
        opts: BTreeMap<String, String>,
        preview: VolumeInfo,
        progress: Progress,
        task: JoinHandle<Result<VolumeInfo, AgentError>>,
        ds: Datastore,
        backend: Arc<dyn DiskBackend>,
    ) -> Arc<Pending> {
        let (done, _) = watch::channel(false);
        let name = preview.name.clone();
        let volume = preview.volume.clone();
        let pending = Arc::new(Pending {
            step,
            opts,
            preview,
            progress,
            failed: Mutex::new(None),
            done,
        });
        self.lock().insert(name.clone(), pending.clone());
        tracing::info!(volume = %name, step, percent = pending.progress.percent(), "create answered; it continues in the background");
        let me = self.clone();
        let p = pending.clone();
        tokio::spawn(async move {
            let mut task = task;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let (mut logged, mut noted) = (p.progress.percent() / 10, None);
            let result = loop {
                tokio::select! {
                    joined = &mut task => break joined,
                    _ = tick.tick() => {
                        let pct = p.progress.percent();
                        if pct / 10 > logged {
                            logged = pct / 10;
                            tracing::info!(volume = %name, step, percent = pct, "create progress");
                        }
                        if noted != Some(pct) {
                            noted = Some(pct);
                            note_progress(&*backend, &ds, &volume, step, pct).await;
                        }
                    }
                }
            };
            match result
                .map_err(|e| format!("the create task failed: {e}"))
                .and_then(|r| r.map_err(|e| crate::error::error_chain(&e)))
            {
                Ok(_) => {
                    me.lock().remove(&name);
                    tracing::info!(volume = %name, step, "created volume (in the background)");
                }
                Err(cause) => {
                    tracing::warn!(volume = %name, step, error = %cause, "a create answered earlier failed; the volume does not exist");
                    *p.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(cause);
                }
            }
            p.done.send_replace(true);
        });
        pending
    }
}

/// Writes the percentage into the volume's `.creating` marker, where
/// `vmdk-agent ls` in another process finds it. A hint: failures are
/// logged at debug level only.
async fn note_progress(backend: &dyn DiskBackend, ds: &Datastore, volume: &str, step: &str, percent: u8) {
    let folder = match backend.folder(ds, DEFAULT_VMGROUP, false).await {
        Ok(Some(f)) => f,
        _ => return,
    };
    if let Err(e) = folder.note_progress(volume, step, percent).await {
        tracing::debug!(volume, error = %crate::error::error_chain(&e), "cannot note the create's progress");
    }
}
