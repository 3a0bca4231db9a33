//! Shared pieces of the plugin's integration tests: Docker-shaped requests,
//! a recording fake of the kernel seam, and plugin fixtures.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use vmdk_agent::backend::local::LocalBackend;
use vmdk_agent::backend::loopdev::{FakeLoops, LinuxLoops, LoopDevices};
use vmdk_agent::config::AgentConfig;
use vmdk_agent::VolumeService;
use vmdk_plugin::agent_client::AgentClient;
use vmdk_plugin::sys::{LinuxSystem, MountEntry, SysError, System};
use vmdk_plugin::volume::{ManagerConfig, VolumeManager};
use vmdk_protocol::FsType;

/// Sends a request exactly as Docker does: POST, no Content-Type, the
/// `Accept` header Docker uses, and a JSON body with a trailing newline
/// (or no body at all).
pub async fn docker_call(app: &axum::Router, endpoint: &str, body: Option<&str>) -> (StatusCode, Value) {
    let req = Request::builder()
        .method("POST")
        .uri(format!("/{endpoint}"))
        .header("Host", "plugin.moby.localhost")
        .header("Accept", "application/vnd.docker.plugins.v1.2+json")
        .body(match body {
            Some(b) => Body::from(format!("{b}\n")),
            None => Body::empty(),
        })
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("{endpoint}: non-JSON body {:?}", String::from_utf8_lossy(&bytes)));
    (status, v)
}

/// Asserts a success reply and returns it.
pub async fn ok(app: &axum::Router, endpoint: &str, body: &str) -> Value {
    let (s, v) = docker_call(app, endpoint, Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{endpoint} {body}: {v}");
    assert!(v.get("Err").is_none_or(|e| e == ""), "{endpoint} {body}: {v}");
    v
}

/// Asserts an error reply and returns its `Err` text.
pub async fn err(app: &axum::Router, endpoint: &str, body: &str) -> String {
    let (s, v) = docker_call(app, endpoint, Some(body)).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{endpoint} {body}: {v}");
    let e = v["Err"].as_str().unwrap_or_default().to_owned();
    assert!(!e.is_empty(), "{endpoint} {body}: {v}");
    e
}

/// One call the fake kernel saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SysCall {
    Mkfs {
        device: PathBuf,
        fstype: FsType,
        label: String,
    },
    Mount {
        device: PathBuf,
        target: PathBuf,
        fstype: String,
        read_only: bool,
    },
    Remount {
        target: PathBuf,
        read_only: bool,
    },
    Unmount {
        target: PathBuf,
    },
    ReadHead {
        device: PathBuf,
        len: usize,
    },
    ReadTail {
        device: PathBuf,
        len: usize,
    },
}

/// A recording fake of [`System`]: devices hold the filesystem made on
/// them, mounts live in a table, and failures can be scripted.
#[derive(Debug, Default)]
pub struct FakeSys {
    pub calls: Mutex<Vec<SysCall>>,
    pub filesystems: Mutex<HashMap<PathBuf, String>>,
    pub mounted: Mutex<BTreeMap<PathBuf, MountEntry>>,
    pub with_data: Mutex<std::collections::HashSet<PathBuf>>,
    /// Resolves devices to their backing files, so a filesystem stays with
    /// its disk whatever device it is attached as next time.
    pub loops: Mutex<Option<Arc<dyn LoopDevices>>>,
    pub fail_mkfs: Mutex<bool>,
    pub fail_mount: Mutex<bool>,
    pub no_xfs: bool,
}

impl FakeSys {
    fn disk_of(&self, device: &Path) -> PathBuf {
        if let Some(loops) = self.loops.lock().unwrap().as_ref() {
            if let Some((_, backing)) = loops.list().unwrap().into_iter().find(|(d, _)| d == device) {
                return backing;
            }
        }
        device.to_owned()
    }
    pub fn calls(&self) -> Vec<SysCall> {
        self.calls.lock().unwrap().clone()
    }
    pub fn count(&self, pred: impl Fn(&SysCall) -> bool) -> usize {
        self.calls().iter().filter(|c| pred(c)).count()
    }
}

impl System for FakeSys {
    fn mount(&self, device: &Path, target: &Path, fstype: &str, read_only: bool) -> Result<(), SysError> {
        self.calls.lock().unwrap().push(SysCall::Mount {
            device: device.into(),
            target: target.into(),
            fstype: fstype.into(),
            read_only,
        });
        if *self.fail_mount.lock().unwrap() {
            return Err(SysError::Io {
                op: "mount",
                path: target.into(),
                source: std::io::Error::from_raw_os_error(libc_einval()),
            });
        }
        if self.with_data.lock().unwrap().contains(&self.disk_of(device)) {
            let _ = std::fs::create_dir_all(target.join("data"));
        }
        self.mounted.lock().unwrap().insert(
            target.into(),
            MountEntry {
                target: target.into(),
                source: device.display().to_string(),
                fstype: fstype.into(),
                read_only,
            },
        );
        Ok(())
    }
    fn remount(&self, target: &Path, read_only: bool) -> Result<(), SysError> {
        self.calls.lock().unwrap().push(SysCall::Remount {
            target: target.into(),
            read_only,
        });
        Ok(())
    }
    fn unmount(&self, target: &Path) -> Result<(), SysError> {
        self.calls
            .lock()
            .unwrap()
            .push(SysCall::Unmount { target: target.into() });
        if let Some(m) = self.mounted.lock().unwrap().remove(target) {
            // What was written under the mount lives on the "device": take
            // it away with the mount, and bring it back at the next mount.
            let data = target.join("data");
            if data.is_dir() {
                let _ = std::fs::remove_dir_all(&data);
                let disk = self.disk_of(Path::new(&m.source));
                self.with_data.lock().unwrap().insert(disk);
            }
        }
        Ok(())
    }
    fn mounts(&self) -> Result<Vec<MountEntry>, SysError> {
        Ok(self.mounted.lock().unwrap().values().cloned().collect())
    }
    fn probe_fs(&self, device: &Path) -> Result<Option<String>, SysError> {
        Ok(self.filesystems.lock().unwrap().get(&self.disk_of(device)).cloned())
    }
    fn mkfs(&self, device: &Path, fstype: FsType, label: &str) -> Result<(), SysError> {
        self.calls.lock().unwrap().push(SysCall::Mkfs {
            device: device.into(),
            fstype,
            label: label.into(),
        });
        if *self.fail_mkfs.lock().unwrap() {
            return Err(SysError::Command {
                program: "mkfs.ext4".into(),
                args: device.display().to_string(),
                status: "exit status: 1".into(),
                stderr: "scripted failure".into(),
            });
        }
        let disk = self.disk_of(device);
        self.filesystems.lock().unwrap().insert(disk, fstype.to_string());
        Ok(())
    }
    fn mkfs_available(&self, fstype: FsType) -> bool {
        !(self.no_xfs && fstype == FsType::Xfs)
    }
    /// Loop devices are where the (fake) agent says; a SCSI disk is
    /// beyond a recording fake (tests/guest_kernel.rs proves those).
    fn locate(&self, location: &vmdk_protocol::DiskLocation, _timeout: Duration) -> Result<PathBuf, SysError> {
        match location {
            vmdk_protocol::DiskLocation::Device { path } => Ok(PathBuf::from(path)),
            other => Err(SysError::Io {
                op: "locate",
                path: PathBuf::new(),
                source: std::io::Error::other(format!("the fake kernel has no SCSI disks: {other:?}")),
            }),
        }
    }
    /// The start of the disk's backing file (the extent, through the fake
    /// loops); a device with no file behind it is a blank disk.
    fn read_head(&self, device: &Path, len: usize) -> Result<Vec<u8>, SysError> {
        self.calls.lock().unwrap().push(SysCall::ReadHead {
            device: device.into(),
            len,
        });
        let disk = self.disk_of(device);
        if disk.is_file() {
            return vmdk_plugin::sys::read_head(&disk, len);
        }
        Ok(vec![0; len])
    }
    /// The end of the disk's backing file, as `read_head`.
    fn read_tail(&self, device: &Path, len: usize) -> Result<(u64, Vec<u8>), SysError> {
        self.calls.lock().unwrap().push(SysCall::ReadTail {
            device: device.into(),
            len,
        });
        let disk = self.disk_of(device);
        if disk.is_file() {
            return vmdk_plugin::sys::read_tail(&disk, len);
        }
        Ok((0, vec![0; len]))
    }
}

fn libc_einval() -> i32 {
    22
}

/// A plugin wired to an embedded agent on a temp datastore.
pub struct Plugin {
    pub dir: tempfile::TempDir,
    pub svc: Arc<VolumeService>,
    pub manager: Arc<VolumeManager>,
    pub app: axum::Router,
    pub sys: Arc<dyn System>,
    pub loops: Arc<dyn LoopDevices>,
}

impl Plugin {
    pub fn datastore(&self) -> PathBuf {
        self.dir.path().join("ds")
    }
    pub fn mount_root(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn docker_socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// A new manager on the same directories, as after a plugin restart
    /// (the agent and its datastore are the same).
    pub async fn restart(&mut self) {
        self.restart_with_grace(Duration::ZERO).await;
    }

    /// [`Plugin::restart`] with a detach grace period.
    pub async fn restart_with_grace(&mut self, grace: Duration) {
        self.manager = new_manager(&self.dir, &self.svc, self.sys.clone(), grace);
        self.app = vmdk_plugin::plugin::router(self.manager.clone());
        self.manager.recover().await;
    }
}

fn new_manager(
    dir: &tempfile::TempDir,
    svc: &Arc<VolumeService>,
    sys: Arc<dyn System>,
    detach_grace: Duration,
) -> Arc<VolumeManager> {
    VolumeManager::new(
        AgentClient::Embedded(svc.clone()),
        sys,
        ManagerConfig {
            vm_id: "vm-test".into(),
            mount_root: dir.path().join("mnt"),
            state_dir: dir.path().join("state"),
            docker_socket: dir.path().join("docker.sock"),
            detach_grace,
        },
    )
    .unwrap()
}

/// A plugin with the given kernel seams, recovered and ready.
pub async fn plugin_with(sys: Arc<dyn System>, loops: Arc<dyn LoopDevices>) -> Plugin {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let mut cfg = AgentConfig::default();
    cfg.add_datastore_flag(&format!("local={}", ds.display())).unwrap();
    let svc = Arc::new(VolumeService::new(&cfg, Arc::new(LocalBackend::new(loops.clone()))).unwrap());
    let manager = new_manager(&dir, &svc, sys.clone(), Duration::ZERO);
    manager.recover().await;
    Plugin {
        app: vmdk_plugin::plugin::router(manager.clone()),
        dir,
        svc,
        manager,
        sys,
        loops,
    }
}

/// A plugin on fakes (no root needed).
pub async fn fake_plugin(sys: Arc<FakeSys>) -> Plugin {
    let loops: Arc<dyn LoopDevices> = Arc::new(FakeLoops::default());
    *sys.loops.lock().unwrap() = Some(loops.clone());
    plugin_with(sys, loops).await
}

/// A plugin on the real kernel (root only).
pub async fn real_plugin() -> Plugin {
    require_root();
    plugin_with(Arc::new(LinuxSystem), Arc::new(LinuxLoops::default())).await
}

/// Root-only tests fail, never skip, when not run as root.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (loop devices, mkfs, mount); run it with tests/run.sh as root"
    );
}

/// A stand-in for Docker's API socket that reports the given running
/// containers (id → mount sources).
pub async fn fake_docker(socket: &Path, containers: Vec<(&str, Vec<String>)>) -> tokio::task::JoinHandle<()> {
    let body: Vec<Value> = containers
        .into_iter()
        .map(|(id, sources)| {
            serde_json::json!({
                "Id": id,
                "State": "running",
                "Mounts": sources.iter().map(|s| serde_json::json!({"Type": "volume", "Source": s, "Driver": "vmdk"})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let body = Value::Array(body).to_string();
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let app = axum::Router::new().route(
        "/v1.24/containers/json",
        axum::routing::get(move || {
            let b = body.clone();
            async move { b }
        }),
    );
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    })
}

/// Unmounts and unbinds everything a root-only test left under its temp
/// dir, even when the test failed.
pub struct KernelCleanup(pub PathBuf);

impl Drop for KernelCleanup {
    fn drop(&mut self) {
        let sys = LinuxSystem;
        if let Ok(mounts) = sys.mounts() {
            for m in mounts.iter().rev() {
                if m.target.starts_with(&self.0) {
                    let _ = nix::mount::umount2(&m.target, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        let loops = LinuxLoops::default();
        if let Ok(list) = loops.list() {
            for (dev, backing) in list {
                if backing.starts_with(&self.0) {
                    if let Ok(Some(id)) = loops.backing(&dev) {
                        let _ = loops.detach(&dev, id);
                    }
                }
            }
        }
    }
}

/// Mounts of `target` in /proc/self/mountinfo.
pub fn mounts_at(target: &Path) -> Vec<MountEntry> {
    LinuxSystem
        .mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.target == target)
        .collect()
}

/// Loop devices bound to files under `dir`.
pub fn loops_under(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    LinuxLoops::default()
        .list()
        .unwrap()
        .into_iter()
        .filter(|(_, b)| b.starts_with(dir))
        .collect()
}

/// xorshift64: reproducible pseudo-random choices for stress tests,
/// without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An agent service on a fresh datastore `name` under `dir`, with fake
/// loop devices.
pub fn fake_agent(dir: &Path, name: &str) -> (Arc<VolumeService>, Arc<dyn LoopDevices>) {
    let ds = dir.join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let mut cfg = AgentConfig::default();
    cfg.add_datastore_flag(&format!("{name}={}", ds.display())).unwrap();
    let loops: Arc<dyn LoopDevices> = Arc::new(FakeLoops::default());
    let svc = Arc::new(VolumeService::new(&cfg, Arc::new(LocalBackend::new(loops.clone()))).unwrap());
    (svc, loops)
}

/// What the [`agent_proxy`] does with one request to the agent.
#[derive(Debug, Clone)]
pub enum ProxyAction {
    /// Forward it unchanged.
    Pass,
    /// Answer with this status and an agent error body of this code and
    /// message, without forwarding.
    Fail(StatusCode, &'static str, &'static str),
    /// Signal `arrived`, wait for `release`, then forward.
    Hold {
        arrived: Arc<tokio::sync::Notify>,
        release: Arc<tokio::sync::Notify>,
    },
    /// Forward, then replace `from` by `to` in the response body (a
    /// hostile or broken agent).
    Rewrite { from: String, to: String },
}

/// Decides the [`ProxyAction`] from the method and path.
pub type ProxyHook = Arc<dyn Fn(&axum::http::Method, &str) -> ProxyAction + Send + Sync>;

/// The agent's real HTTP API for `svc`, served on `socket` behind a hook
/// that can hold, fail or rewrite requests: the plugin talks to it as to a
/// remote agent.
pub async fn agent_proxy(svc: Arc<VolumeService>, socket: &Path, hook: ProxyHook) -> tokio::task::JoinHandle<()> {
    let inner = vmdk_agent::api::router(svc);
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let (inner, hook) = (inner.clone(), hook.clone());
        async move {
            let action = hook(req.method(), req.uri().path());
            match action {
                ProxyAction::Pass => inner.oneshot(req).await.unwrap(),
                ProxyAction::Fail(status, code, message) => axum::response::IntoResponse::into_response((
                    status,
                    [("content-type", "application/json")],
                    serde_json::json!({"code": code, "message": message}).to_string(),
                )),
                ProxyAction::Hold { arrived, release } => {
                    arrived.notify_one();
                    release.notified().await;
                    inner.oneshot(req).await.unwrap()
                }
                ProxyAction::Rewrite { from, to } => {
                    let resp = inner.oneshot(req).await.unwrap();
                    let (mut parts, body) = resp.into_parts();
                    let bytes = body.collect().await.unwrap().to_bytes();
                    let text = String::from_utf8_lossy(&bytes).replace(&from, &to);
                    parts.headers.remove("content-length");
                    axum::response::Response::from_parts(parts, Body::from(text))
                }
            }
        }
    });
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    })
}

/// A plugin on fakes whose agent is reached over HTTP through an
/// [`agent_proxy`] with `hook`.
pub async fn proxied_plugin(hook: ProxyHook) -> (Plugin, Arc<FakeSys>, tokio::task::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let (svc, loops) = fake_agent(dir.path(), "local");
    let sys = Arc::new(FakeSys::default());
    *sys.loops.lock().unwrap() = Some(loops.clone());
    let sock = dir.path().join("agent.sock");
    let server = agent_proxy(svc.clone(), &sock, hook).await;
    let manager = VolumeManager::new(
        AgentClient::Http(vmdk_plugin::http1::Endpoint::Unix(sock)),
        sys.clone(),
        ManagerConfig {
            vm_id: "vm-test".into(),
            mount_root: dir.path().join("mnt"),
            state_dir: dir.path().join("state"),
            docker_socket: dir.path().join("docker.sock"),
            detach_grace: Duration::ZERO,
        },
    )
    .unwrap();
    manager.recover().await;
    let plugin = Plugin {
        app: vmdk_plugin::plugin::router(manager.clone()),
        dir,
        svc,
        manager,
        sys: sys.clone(),
        loops,
    };
    (plugin, sys, server)
}
