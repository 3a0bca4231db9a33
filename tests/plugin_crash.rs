//! Root-only: `vmdk-plugin serve` (embedded agent, real loop devices, mkfs
//! and mount) killed with SIGKILL, again and again, while clients Mount and
//! Unmount volumes the way Docker does, and write data into them.
//!
//! A stand-in for Docker's API reports, as Docker would, a running
//! container for every volume that holds an acknowledged mount. After
//! every restart the test checks what the project promises: volumes in use
//! stay mounted exactly once, volumes no container uses are unmounted and
//! detached, nothing else is mounted or bound, and no acknowledged write is
//! lost (a volume is never formatted twice).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use support::{loops_under, require_root, KernelCleanup, Rng};
use vmdk_plugin::http1::{self, Endpoint};
use vmdk_plugin::sys::{LinuxSystem, MountEntry, System};

fn mounts_under(root: &Path) -> Vec<MountEntry> {
    LinuxSystem
        .mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.target.starts_with(root))
        .collect()
}

const ROUNDS: u64 = 8;
const VOLUMES: usize = 4;

/// What the clients know of one volume. Docker's view of an operation the
/// kill cut off: a Mount that got no answer failed (no container holds
/// it), an Unmount that got no answer happened (its container stopped).
#[derive(Debug, Default, Clone)]
struct Vol {
    /// Mount IDs acknowledged and not unmounted.
    held: Vec<String>,
    /// The last counter value written to `seq` and synced, if any.
    seq: Option<u64>,
    /// A Mount or Unmount got no answer: the plugin may hold an ID that
    /// Docker does not (Docker sends no Unmount for it). Only a reconcile
    /// with no container using the volume releases such an ID.
    maybe_stray_id: bool,
}

type Ledger = Arc<Mutex<BTreeMap<String, Vol>>>;

/// The daemons of one "boot": the plugin, and the agent when it runs on
/// its own. Dropping them kills them.
struct Daemons {
    plugin: Child,
    agent: Option<Child>,
}
impl Daemons {
    /// SIGKILL, as a crash of the VM (and, remote, of its host) would.
    fn kill(mut self) {
        self.kill_all();
    }
    fn kill_all(&mut self) {
        for c in std::iter::once(&mut self.plugin).chain(self.agent.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
impl Drop for Daemons {
    fn drop(&mut self) {
        self.kill_all();
    }
}

struct Dirs {
    root: PathBuf,
    /// The agent runs as its own `vmdk-agent serve` process (and is killed
    /// with the plugin) instead of inside the plugin.
    remote: bool,
}
impl Dirs {
    fn agent_sock(&self) -> PathBuf {
        self.root.join("agent.sock")
    }
    fn ds(&self) -> PathBuf {
        self.root.join("ds")
    }
    fn mnt(&self) -> PathBuf {
        self.root.join("mnt")
    }
    fn sock(&self) -> PathBuf {
        self.root.join("plugin.sock")
    }
    fn docker(&self) -> PathBuf {
        self.root.join("docker.sock")
    }
}

/// Docker's `/containers/json`, made from the ledger: one running
/// container per volume that holds an acknowledged mount.
async fn fake_docker(socket: PathBuf, ledger: Ledger, mnt: PathBuf) {
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let app = axum::Router::new().route(
        "/v1.24/containers/json",
        axum::routing::get(move || {
            let containers: Vec<Value> = ledger
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, v)| !v.held.is_empty())
                .map(|(name, _)| {
                    serde_json::json!({
                        "Id": format!("c-{name}"),
                        "State": "running",
                        "Mounts": [{"Type": "volume", "Name": name, "Driver": "vmdk",
                                    "Source": mnt.join(format!("{name}@local/data"))}],
                    })
                })
                .collect();
            async move { Value::Array(containers).to_string() }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

async fn call(sock: &Path, endpoint: &str, body: Value) -> Result<Value, String> {
    let (status, bytes) = http1::request(
        &Endpoint::Unix(sock.to_owned()),
        hyper::Method::POST,
        &format!("/{endpoint}"),
        &[("Accept", "application/vnd.docker.plugins.v1.2+json")],
        Some(format!("{body}\n").into_bytes()),
        Duration::from_secs(60),
    )
    .await
    .map_err(|e| format!("transport: {e}"))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("bad JSON: {e}"))?;
    match v["Err"].as_str() {
        Some(e) if !e.is_empty() || !status.is_success() => panic!("{endpoint} {body}: {status} {e}"),
        _ => Ok(v),
    }
}

async fn start_plugin(d: &Dirs) -> Daemons {
    let agent = d.remote.then(|| {
        Command::new(PathBuf::from(env!("CARGO_BIN_EXE_vmdk-plugin")).with_file_name("vmdk-agent"))
            .args([
                "--datastore",
                &format!("local={}", d.ds().display()),
                "serve",
                "--admin-listen",
                "off",
                "--socket",
            ])
            .arg(d.agent_sock())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vmdk-agent (built by `cargo test --workspace`)")
    });
    if d.remote {
        for _ in 0..3000 {
            if std::os::unix::net::UnixStream::connect(d.agent_sock()).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmdk-plugin"));
    cmd.args(["serve", "--admin-listen", "off"])
        .arg("--socket")
        .arg(d.sock());
    if d.remote {
        cmd.arg("--agent").arg(format!("unix://{}", d.agent_sock().display()));
    } else {
        cmd.arg("--datastore").arg(format!("local={}", d.ds().display()));
    }
    let child = cmd
        .args(["--vm-id", "crash-vm", "--reconcile-interval", "0"])
        .arg("--mount-root")
        .arg(d.mnt())
        .arg("--state-dir")
        .arg(d.root.join("state"))
        .arg("--docker-socket")
        .arg(d.docker())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vmdk-plugin");
    let daemons = Daemons { plugin: child, agent };
    for _ in 0..3000 {
        // Unmount waits for the recovery pass; an unknown ID succeeds.
        if call(
            &d.sock(),
            "VolumeDriver.Unmount",
            serde_json::json!({"Name": "vol0", "ID": "probe"}),
        )
        .await
        .is_ok()
        {
            return daemons;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("vmdk-plugin did not answer on {}", d.sock().display());
}

/// The invariants that must hold once a restarted plugin has recovered.
fn check(round: u64, d: &Dirs, ledger: &Ledger) {
    let mounts = mounts_under(&d.mnt());
    let loops = loops_under(&d.ds());
    let ledger = ledger.lock().unwrap();
    let in_use: Vec<&String> = ledger
        .iter()
        .filter(|(_, v)| !v.held.is_empty())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        mounts.len(),
        in_use.len(),
        "round {round}: mounts {mounts:?}, volumes in use {in_use:?}"
    );
    assert_eq!(
        loops.len(),
        in_use.len(),
        "round {round}: loops {loops:?}, volumes in use {in_use:?}"
    );
    for name in in_use {
        let target = d.mnt().join(format!("{name}@local"));
        let m = mounts
            .iter()
            .find(|m| m.target == target)
            .unwrap_or_else(|| panic!("round {round}: {name} is in use but not mounted: {mounts:?}"));
        let flat = d.ds().join(format!("dockvols/_DEFAULT/{name}-flat.vmdk"));
        assert!(
            loops
                .iter()
                .any(|(dev, b)| *b == flat && dev.display().to_string() == m.source),
            "round {round}: {name} mounted from {:?}, loops {loops:?}",
            m.source
        );
        let seq = std::fs::read_to_string(target.join("data/seq")).ok();
        assert_eq!(
            seq.map(|s| s.parse::<u64>().unwrap()),
            ledger[name].seq,
            "round {round}: {name} lost an acknowledged write"
        );
    }
}

/// One client per volume: Mounts with fresh IDs and Unmounts held ones,
/// writing a counter into the volume while it holds a mount. Runs until
/// the plugin stops answering.
async fn worker(sock: PathBuf, ledger: Ledger, name: String, seed: u64) {
    let mut rng = Rng(seed | 1);
    loop {
        let held = ledger.lock().unwrap()[&name].held.clone();
        let mount = held.is_empty() || (held.len() < 3 && rng.below(2) == 0);
        if mount {
            let id = format!("{name}-{:016x}", rng.next());
            // Docker records the ID only when Mount succeeds.
            let Ok(v) = call(&sock, "VolumeDriver.Mount", serde_json::json!({"Name": name, "ID": id})).await else {
                ledger.lock().unwrap().get_mut(&name).unwrap().maybe_stray_id = true;
                return;
            };
            let data = PathBuf::from(v["Mountpoint"].as_str().unwrap());
            let next = {
                let mut l = ledger.lock().unwrap();
                let vol = l.get_mut(&name).unwrap();
                vol.held.push(id);
                vol.seq.map_or(1, |s| s + 1)
            };
            let f = data.join("seq");
            let tmp = data.join("seq.tmp");
            std::fs::write(&tmp, next.to_string()).unwrap();
            std::fs::File::open(&tmp).unwrap().sync_all().unwrap();
            std::fs::rename(&tmp, &f).unwrap();
            std::fs::File::open(&data).unwrap().sync_all().unwrap();
            ledger.lock().unwrap().get_mut(&name).unwrap().seq = Some(next);
        } else {
            let id = held[rng.below(held.len() as u64) as usize].clone();
            // Docker forgets the ID whether or not Unmount gets an answer.
            ledger.lock().unwrap().get_mut(&name).unwrap().held.retain(|h| *h != id);
            if call(
                &sock,
                "VolumeDriver.Unmount",
                serde_json::json!({"Name": name, "ID": id}),
            )
            .await
            .is_err()
            {
                ledger.lock().unwrap().get_mut(&name).unwrap().maybe_stray_id = true;
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_plugin_keeps_volumes_in_use_releases_the_rest_and_loses_no_write() {
    crash_rounds(false).await;
}

/// The same with the agent as its own process, killed with the plugin
/// every time (the VM and its host crash together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_plugin_and_remote_agent_keep_volumes_and_lose_no_write() {
    crash_rounds(true).await;
}

async fn crash_rounds(remote: bool) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = Dirs {
        root: std::fs::canonicalize(dir.path()).unwrap(),
        remote,
    };
    let _cleanup = KernelCleanup(d.root.clone());
    std::fs::create_dir_all(d.ds()).unwrap();
    let names: Vec<String> = (0..VOLUMES).map(|i| format!("vol{i}")).collect();
    let ledger: Ledger = Arc::new(Mutex::new(names.iter().map(|n| (n.clone(), Vol::default())).collect()));
    fake_docker(d.docker(), ledger.clone(), d.mnt()).await;
    {
        let _p = start_plugin(&d).await;
        for n in &names {
            call(
                &d.sock(),
                "VolumeDriver.Create",
                serde_json::json!({"Name": n, "Opts": {"size": "64mb"}}),
            )
            .await
            .unwrap();
        }
    }
    let mut rng = Rng(0xfeed_f00d);
    for round in 0..ROUNDS {
        let daemons = start_plugin(&d).await;
        check(round, &d, &ledger);
        let workers: Vec<_> = names
            .iter()
            .map(|n| tokio::spawn(worker(d.sock(), ledger.clone(), n.clone(), rng.next())))
            .collect();
        tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        daemons.kill();
        for w in workers {
            if let Err(e) = w.await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }

    // Release everything the way Docker would. Volumes stay mounted only
    // where the plugin may hold an ID Docker never learned of; a restart
    // with no container running releases those too. Nothing may stay
    // mounted or bound, and every volume keeps its last acknowledged write.
    let daemons = start_plugin(&d).await;
    check(ROUNDS, &d, &ledger);
    let held: Vec<(String, String)> = ledger
        .lock()
        .unwrap()
        .iter()
        .flat_map(|(n, v)| v.held.iter().map(move |id| (n.clone(), id.clone())))
        .collect();
    for (name, id) in held {
        call(
            &d.sock(),
            "VolumeDriver.Unmount",
            serde_json::json!({"Name": name, "ID": id}),
        )
        .await
        .unwrap();
        ledger.lock().unwrap().get_mut(&name).unwrap().held.retain(|h| *h != id);
    }
    for m in mounts_under(&d.mnt()) {
        let name = m
            .target
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches("@local")
            .to_owned();
        assert!(
            ledger.lock().unwrap()[&name].maybe_stray_id,
            "{name} is still mounted after Docker unmounted every ID it holds"
        );
    }
    daemons.kill();
    let _daemons = start_plugin(&d).await;
    assert!(mounts_under(&d.mnt()).is_empty(), "{:?}", mounts_under(&d.mnt()));
    assert!(loops_under(&d.ds()).is_empty(), "{:?}", loops_under(&d.ds()));
    let writes: usize = ledger
        .lock()
        .unwrap()
        .values()
        .filter_map(|v| v.seq)
        .map(|s| s as usize)
        .sum();
    eprintln!("{ROUNDS} plugin kills among {writes} acknowledged writes");
    assert!(
        writes >= ROUNDS as usize,
        "too little work between kills: {writes} writes"
    );
    for name in &names {
        let v = call(
            &d.sock(),
            "VolumeDriver.Mount",
            serde_json::json!({"Name": name, "ID": "final"}),
        )
        .await
        .unwrap();
        let data = PathBuf::from(v["Mountpoint"].as_str().unwrap());
        let seq = std::fs::read_to_string(data.join("seq"))
            .ok()
            .map(|s| s.parse::<u64>().unwrap());
        assert_eq!(
            seq,
            ledger.lock().unwrap()[name].seq,
            "{name} lost an acknowledged write"
        );
        call(
            &d.sock(),
            "VolumeDriver.Unmount",
            serde_json::json!({"Name": name, "ID": "final"}),
        )
        .await
        .unwrap();
        call(&d.sock(), "VolumeDriver.Remove", serde_json::json!({"Name": name}))
            .await
            .unwrap();
    }
    assert!(loops_under(&d.ds()).is_empty());
    assert!(mounts_under(&d.mnt()).is_empty());
}
