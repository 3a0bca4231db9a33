//! govmomi's simulator for tests (vcsim 0.24.2 from Debian's
//! golang-github-vmware-govmomi-dev, built by tests/vcsim/build.sh, with
//! ESXi-like disks), and the independent checker tests/vcsim/inspect.py
//! (pyvmomi). Shared by the test suites that need a vSphere:
//! `#[path = ".../tests/support/vcsim.rs"] mod vcsim;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmdk_vsphere::{Client, Config, Password, Thumbprint, TlsTrust};

/// The repository's root: the nearest directory above this crate's that
/// holds tests/vcsim/build.sh.
pub fn repo() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("tests/vcsim/build.sh").exists() {
        assert!(
            dir.pop(),
            "tests/vcsim/build.sh not found above {}",
            env!("CARGO_MANIFEST_DIR")
        );
    }
    dir
}

/// Builds the simulator once per test binary (installing Go and govmomi
/// from Debian's packages when missing).
pub fn vcsim_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(repo().join("tests/vcsim/build.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running tests/vcsim/build.sh");
        assert!(
            out.status.success(),
            "the vSphere simulator could not be built: tests/vcsim/build.sh needs Debian's golang-go and \
             golang-github-vmware-govmomi-dev (it installs them when run as root); see its output above"
        );
        let path = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .lines()
            .last()
            .unwrap()
            .to_owned();
        eprintln!("vcsim built in {:?}: {path}", started.elapsed());
        PathBuf::from(path)
    })
}

/// Makes sure pyvmomi is importable (tests/vcsim/pyvmomi.sh installs it
/// from PyPI when it is not).
pub fn pyvmomi() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let status = Command::new("bash")
            .arg(repo().join("tests/vcsim/pyvmomi.sh"))
            .status()
            .expect("running tests/vcsim/pyvmomi.sh");
        assert!(
            status.success(),
            "pyvmomi (PyPI) is needed by tests/vcsim/inspect.py and tests/vcsim/pyvmomi.sh could not install it"
        );
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    Vpx,
    Esx,
}

/// One running simulator. Dropping it closes its stdin, which makes it
/// remove its temporary datastores and exit.
pub struct Sim {
    child: Child,
    stdin: Option<ChildStdin>,
    /// The simulator's inventory line.
    pub info: Value,
    stderr: Receiver<String>,
}

impl Sim {
    pub fn start(model: Model, extra: &[&str]) -> Sim {
        let mut cmd = Command::new(vcsim_binary());
        cmd.args(["-listen", "127.0.0.1:0"]);
        if model == Model::Esx {
            cmd.arg("-esx");
        }
        cmd.args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting the simulator");
        let stdin = child.stdin.take();
        let (tx, stderr) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[vcsim] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (tx_line, rx_line) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx_line.send(line);
        });
        let line = rx_line
            .recv_timeout(Duration::from_secs(60))
            .expect("the simulator printed no inventory line within 60 s");
        let info: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the simulator's first line is not JSON ({e}): {line:?}"));
        Sim {
            child,
            stdin,
            info,
            stderr,
        }
    }

    pub fn url(&self) -> &str {
        self.info["url"].as_str().unwrap()
    }

    pub fn user(&self) -> &str {
        self.info["username"].as_str().unwrap()
    }

    pub fn password(&self) -> &str {
        self.info["password"].as_str().unwrap()
    }

    pub fn sha256(&self) -> Thumbprint {
        self.info["thumbprint_sha256"].as_str().unwrap().parse().unwrap()
    }

    pub fn config(&self, tls: TlsTrust) -> Config {
        let mut c = Config::new(self.url(), self.user(), Password::new(self.password()), tls);
        c.request_timeout = Duration::from_secs(30);
        c.task_timeout = Duration::from_secs(60);
        c
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.config(TlsTrust::Thumbprint(self.sha256())))
            .await
            .expect("connecting to the simulator")
    }

    pub fn datastore(&self) -> &Value {
        &self.info["datastores"][0]
    }

    pub fn vm(&self, i: usize) -> &Value {
        &self.info["vms"][i]
    }

    /// Runs tests/vcsim/inspect.py with the simulator's URL and credentials.
    pub fn inspect(&self, args: &[&str]) -> Value {
        pyvmomi();
        let out = Command::new("python3")
            .arg(repo().join("tests/vcsim/inspect.py"))
            .args(args)
            .args([
                "--url",
                self.url(),
                "--user",
                self.user(),
                "--password",
                self.password(),
            ])
            .output()
            .expect("running inspect.py");
        assert!(
            out.status.success(),
            "inspect.py {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "inspect.py {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The names of the files in a datastore folder, as pyvmomi lists them.
    pub fn files(&self, path: &str) -> Vec<String> {
        let ds = self.datastore()["name"].as_str().unwrap();
        let listing = self.inspect(&["files", "--datastore", ds, "--path", path]);
        listing["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn devices(&self, vm_uuid: &str) -> Value {
        self.inspect(&["devices", "--vm-uuid", vm_uuid])
    }

    /// Waits for a line on the simulator's stderr (see its -announce flag).
    pub fn wait_stderr(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(_) => panic!("the simulator did not print {needle:?} within 30 s"),
            }
        }
    }

    /// Kills the simulator at once (SIGKILL): no cleanup of its own.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        // Closing stdin asks for a clean exit (model.Remove()).
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        self.kill();
        // A killed simulator leaves its temporary datastores behind.
        for ds in self.info["datastores"].as_array().into_iter().flatten() {
            if let Some(path) = ds["path"].as_str().filter(|p| p.starts_with("/tmp/govcsim-")) {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }
}
