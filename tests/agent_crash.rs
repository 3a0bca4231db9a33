//! Root-only: `vmdk-agent serve` killed with SIGKILL, again and again, while
//! clients create, clone, attach, detach and remove volumes on real loop
//! devices.
//!
//! After every kill a new agent starts on the same datastore, as after a
//! host crash, and the test checks what the project promises: no
//! acknowledged operation is lost, no loop device is bound that the
//! metadata does not record, every volume the agent lists is a disk
//! `qemu-img` reads, and at the end everything can be detached and removed
//! with nothing left behind.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{loops_under, require_root, KernelCleanup, Rng};
use vmdk_plugin::agent_client::{AgentCallError, AgentClient};
use vmdk_plugin::http1::Endpoint;
use vmdk_protocol::{AttachStatus, CreateRequest, ErrorCode};

const ROUNDS: u64 = 12;
const WORKERS: usize = 3;
const VOLUMES_PER_WORKER: usize = 3;
const VMS: [&str; 2] = ["vm-a", "vm-b"];

/// What the clients know for certain about a volume: `None` while an
/// operation on it was cut off by the kill (it may or may not have
/// happened).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    exists: bool,
    attached_to: Option<String>,
}

type Ledger = Arc<Mutex<BTreeMap<String, Option<Known>>>>;

/// Operations the agent acknowledged (successes and refusals), over all
/// rounds: proof that the kills landed among real work.
static ACKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn agent_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_vmdk-plugin")).with_file_name("vmdk-agent");
    assert!(p.is_file(), "{} is missing: run `cargo test --workspace`", p.display());
    p
}

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_agent(ds: &Path, sock: &Path) -> (Agent, AgentClient) {
    let child = Command::new(agent_bin())
        .args([
            "--datastore",
            &format!("local={}", ds.display()),
            "serve",
            "--admin-listen",
            "off",
            "--socket",
        ])
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vmdk-agent");
    let agent = Agent(child);
    let client = AgentClient::Http(Endpoint::Unix(sock.to_owned()));
    for _ in 0..3000 {
        if client.version("probe").await.is_ok() {
            return (agent, client);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("vmdk-agent did not answer on {}", sock.display());
}

/// Loads what the agent says into the ledger (all certain again).
async fn resync(client: &AgentClient, ledger: &Ledger) {
    let listed = client.list("check").await.expect("list");
    let mut l = ledger.lock().unwrap();
    for (name, known) in l.iter_mut() {
        let v = listed.iter().find(|v| &v.volume == name);
        *known = Some(Known {
            exists: v.is_some(),
            attached_to: v.and_then(|v| v.attached_to.clone()),
        });
    }
}

/// The invariants that must hold whenever an agent has just started.
async fn check(round: u64, client: &AgentClient, ledger: &Ledger, ds: &Path) {
    let listed = client.list("check").await.expect("list");
    let flat_dir = ds.join("dockvols/_DEFAULT");
    let loops = loops_under(ds);
    // Every bound device is one the metadata records, to the VM it names.
    for (dev, backing) in &loops {
        let vol = backing
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_suffix("-flat.vmdk"))
            .unwrap_or_else(|| panic!("round {round}: {dev:?} backs {backing:?}"));
        let v = listed
            .iter()
            .find(|v| v.volume == vol)
            .unwrap_or_else(|| panic!("round {round}: {dev:?} is bound to {vol}, which is not a volume"));
        assert_eq!(
            v.status,
            AttachStatus::Attached,
            "round {round}: {dev:?} is bound to {vol}, recorded as {:?}",
            v.status
        );
    }
    // Nothing but the files of listed volumes: what a create or remove cut
    // off by the kill left was collected when this agent started.
    if let Ok(entries) = std::fs::read_dir(&flat_dir) {
        for e in entries.flatten() {
            let f = e.file_name().into_string().unwrap();
            let owner = ["-flat.vmdk", ".vmdk", ".vmfd", ".lck"]
                .iter()
                .find_map(|s| f.strip_suffix(s));
            // (`<vol>.vmdk.tmp` strips to `<vol>.vmdk`, which no volume is.)
            assert!(
                owner.is_some_and(|o| listed.iter().any(|v| v.volume == o)),
                "round {round}: {f} is left in the datastore, and no volume owns it"
            );
        }
    }
    assert!(
        loops
            .iter()
            .map(|(_, b)| b)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            == loops.len(),
        "round {round}: one extent bound twice: {loops:?}"
    );
    for (name, known) in ledger.lock().unwrap().iter() {
        let v = listed.iter().find(|v| &v.volume == name);
        if let Some(k) = known {
            assert_eq!(
                v.is_some(),
                k.exists,
                "round {round}: {name}: acknowledged state {k:?}, agent lists {v:?}"
            );
            if let Some(v) = v {
                assert_eq!(
                    v.attached_to, k.attached_to,
                    "round {round}: {name}: acknowledged {k:?}"
                );
            }
        }
        if let Some(v) = v {
            // Attached means a live device; detached means none.
            let bound = loops
                .iter()
                .any(|(_, b)| b == &flat_dir.join(format!("{name}-flat.vmdk")));
            if v.status == AttachStatus::Detached {
                assert!(!bound, "round {round}: {name} is detached but bound: {loops:?}");
            }
            // A listed volume is a whole disk that qemu-img reads.
            let out = Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(flat_dir.join(format!("{name}.vmdk")))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "round {round}: {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(info["virtual-size"], v.capacity_bytes, "round {round}: {name}");
        }
    }
}

/// One client: random operations on its own volumes, recording what was
/// acknowledged. Runs until the agent stops answering (or it is aborted).
async fn worker(client: AgentClient, ledger: Ledger, names: Vec<String>, seed: u64) {
    let mut rng = Rng(seed | 1);
    loop {
        let name = names[rng.below(names.len() as u64) as usize].clone();
        let vm = VMS[rng.below(2) as usize];
        let before = ledger.lock().unwrap().get(&name).cloned().flatten();
        ledger.lock().unwrap().insert(name.clone(), None);
        let op = rng.below(5);
        let others: Vec<&String> = names.iter().filter(|n| **n != name).collect();
        let source = others[rng.below(others.len() as u64) as usize].clone();
        let res: Result<(), AgentCallError> = match op {
            0 => {
                let format = ["thin", "zeroedthick", "eagerzeroedthick"][rng.below(3) as usize];
                let req = CreateRequest {
                    name: name.clone(),
                    opts: [("size", "16mb"), ("diskformat", format)]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                };
                client.create(vm, req).await.map(|_| ())
            }
            1 => client.attach(vm, &name).await.map(|_| ()),
            2 => client.detach(vm, &name).await,
            3 => client.remove(vm, &name).await,
            _ => {
                // A full copy of another (detached) volume of this client.
                let req = CreateRequest {
                    name: name.clone(),
                    opts: [("clone-from".to_owned(), source.clone())].into_iter().collect(),
                };
                client.create(vm, req).await.map(|_| ())
            }
        };
        let after = match (&res, &before) {
            (Err(AgentCallError::Transport(_)), _) | (_, None) => None,
            (Ok(()), Some(b)) => Some(match op {
                0 | 4 => Known {
                    exists: true,
                    attached_to: None,
                },
                1 => Known {
                    exists: true,
                    attached_to: Some(vm.to_owned()),
                },
                2 => Known {
                    exists: b.exists,
                    attached_to: b.attached_to.clone().filter(|holder| holder != vm),
                },
                // 3: remove
                _ => Known {
                    exists: false,
                    attached_to: None,
                },
            }),
            (Err(e), Some(b)) => {
                let expected = matches!(
                    e.code(),
                    Some(
                        ErrorCode::NotFound
                            | ErrorCode::AlreadyExists
                            | ErrorCode::InUse
                            | ErrorCode::AttachedElsewhere
                    )
                ) || (op == 4 && e.code() == Some(ErrorCode::InvalidOption));
                assert!(expected, "{name}: op {op} by {vm} from {b:?} failed unexpectedly: {e}");
                Some(b.clone())
            }
        };
        let lost = matches!(res, Err(AgentCallError::Transport(_)));
        if !lost {
            ACKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        ledger.lock().unwrap().insert(name, after);
        if lost {
            return;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_agent_loses_no_acknowledged_operation_and_leaks_no_device() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let _cleanup = KernelCleanup(root.clone());
    let ds = root.join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let sock = root.join("agent.sock");
    let ledger: Ledger = Arc::new(Mutex::new(
        (0..WORKERS * VOLUMES_PER_WORKER)
            .map(|i| {
                (
                    format!("crash{i}"),
                    Some(Known {
                        exists: false,
                        attached_to: None,
                    }),
                )
            })
            .collect(),
    ));
    let mut rng = Rng(0x5eed_cafe);
    for round in 0..ROUNDS {
        let (mut agent, client) = start_agent(&ds, &sock).await;
        check(round, &client, &ledger, &ds).await;
        resync(&client, &ledger).await;
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let names = (0..VOLUMES_PER_WORKER)
                    .map(|i| format!("crash{}", w * VOLUMES_PER_WORKER + i))
                    .collect();
                tokio::spawn(worker(client.clone(), ledger.clone(), names, rng.next()))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50 + rng.below(250))).await;
        agent.0.kill().unwrap();
        agent.0.wait().unwrap();
        for w in workers {
            w.abort();
            if let Err(e) = w.await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    }

    // A last agent: the invariants hold, and everything can be released
    // and removed, leaving no device and no file behind.
    let (_agent, client) = start_agent(&ds, &sock).await;
    check(ROUNDS, &client, &ledger, &ds).await;
    let acked = ACKED.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{ROUNDS} kills among {acked} acknowledged operations");
    assert!(
        acked >= 5 * ROUNDS as usize,
        "too little work between kills: {acked} operations"
    );
    for v in client.list("check").await.unwrap() {
        if let Some(vm) = &v.attached_to {
            client.detach(vm, &v.volume).await.unwrap();
        }
        client.remove("check", &v.volume).await.unwrap();
    }
    assert!(loops_under(&ds).is_empty(), "{:?}", loops_under(&ds));
    let left: Vec<_> = std::fs::read_dir(ds.join("dockvols/_DEFAULT"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "files left in the datastore: {left:?}");
}
