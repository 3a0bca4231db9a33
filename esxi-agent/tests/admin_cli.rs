//! The admin CLI (`vmdk-agent ls|set|policy|status`), run as a binary on
//! temp datastores, the way an administrator runs it. Volumes are created
//! through the library's `VolumeService` on the same directories (what the
//! service does for `docker volume create`), with loop devices faked.
//! Assertions are on what a user sees: output, exit codes, files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use vmdk_agent::backend::local::LocalBackend;
use vmdk_agent::backend::loopdev::FakeLoops;
use vmdk_agent::config::AgentConfig;
use vmdk_agent::lock::VolumeLock;
use vmdk_agent::service::Caller;
use vmdk_agent::{AgentError, VolumeService};
use vmdk_protocol::{AccessMode, AttachAs, CreateRequest, ErrorCode};

const BIN: &str = env!("CARGO_BIN_EXE_vmdk-agent");
const SW2: &str = r#"(("stripeWidth" i2))"#;

struct Env {
    dir: tempfile::TempDir,
    vsan: PathBuf,
    plain: PathBuf,
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let vsan = dir.path().join("vsanDatastore");
        let plain = dir.path().join("nfs1");
        std::fs::create_dir_all(&vsan).unwrap();
        std::fs::create_dir_all(&plain).unwrap();
        Env { dir, vsan, plain }
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--datastore".into(),
            format!("vsanDatastore={},vsan", self.vsan.display()),
            "--datastore".into(),
            format!("nfs1={}", self.plain.display()),
        ]
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(self.flags())
            .args(args)
            .env_remove("VMDK_AGENT_CONFIG")
            .env_remove("VMDK_LOG");
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        self.cmd(args).output().unwrap().into()
    }

    fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, 0, "vmdk-agent {args:?} failed: {r:?}");
        r
    }

    fn fails(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, 2, "vmdk-agent {args:?} should fail with 2: {r:?}");
        assert!(r.stderr.lines().any(|l| l.starts_with("ERROR: ")), "{r:?}");
        r
    }

    fn svc(&self) -> VolumeService {
        let mut cfg = AgentConfig::default();
        for f in self.flags().iter().skip(1).step_by(2) {
            cfg.add_datastore_flag(f).unwrap();
        }
        VolumeService::new(&cfg, Arc::new(LocalBackend::new(Arc::new(FakeLoops::default())))).unwrap()
    }

    async fn create(&self, name: &str, opts: &[(&str, &str)]) -> Result<vmdk_protocol::VolumeInfo, AgentError> {
        self.svc()
            .create(
                &Caller::vm("vm-1").unwrap(),
                &CreateRequest {
                    name: name.into(),
                    opts: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                },
            )
            .await
    }

    fn policy_file(&self, name: &str) -> PathBuf {
        self.vsan.join("dockvols/policies").join(name)
    }

    fn vol_file(&self, ds: &Path, file: &str) -> PathBuf {
        ds.join("dockvols/_DEFAULT").join(file)
    }

    /// Every file under the temp dir with its content (flat extents by size).
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                if e.file_type().unwrap().is_dir() {
                    out.insert(p.clone(), b"<dir>".to_vec());
                    walk(&p, out);
                } else if p.to_string_lossy().ends_with("-flat.vmdk") {
                    out.insert(p.clone(), e.metadata().unwrap().len().to_le_bytes().to_vec());
                } else {
                    out.insert(p.clone(), std::fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.dir.path(), &mut out);
        out
    }
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// The issue's flow: policy create, volume create with it, both views show
/// it, and the policy cannot be removed while the volume exists.
#[tokio::test]
async fn seed_flow_policy_on_a_volume() {
    let env = Env::new();
    let r = env.ok(&["policy", "create", "--name", "SW=2", "--content", SW2]);
    assert_eq!(r.stdout, "Successfully created policy: SW=2\n");
    assert_eq!(
        std::fs::read_to_string(env.policy_file("SW=2")).unwrap(),
        format!("{SW2}\n")
    );

    let info = env
        .create("vsanvol3", &[("size", "20gb"), ("vsan-policy-name", "SW=2")])
        .await
        .unwrap();
    assert_eq!(info.vsan_policy.as_deref(), Some("SW=2"));
    assert_eq!(info.name, "vsanvol3@vsanDatastore");
    let meta = std::fs::read_to_string(env.vol_file(&env.vsan, "vsanvol3.vmfd")).unwrap();
    assert!(meta.contains(r#""vsan-policy-name": "SW=2""#), "{meta}");

    let ls = env.ok(&["ls"]);
    let lines: Vec<&str> = ls.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{ls:?}");
    for h in [
        "Volume",
        "Datastore",
        "VMGroup",
        "Capacity",
        "Used",
        "Filesystem",
        "Policy",
        "Disk Format",
        "Attached-to",
        "Access",
        "Attach-as",
        "Created By",
        "Created Date",
    ] {
        assert!(lines[0].contains(h), "header lacks {h}: {ls:?}");
    }
    let row: Vec<&str> = lines[2].split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(
        &row[..11],
        &[
            "vsanvol3",
            "vsanDatastore",
            "_DEFAULT",
            "20GB",
            "0B",
            "ext4",
            "SW=2",
            "thin",
            "detached",
            "read-write",
            "independent_persistent"
        ],
        "{ls:?}"
    );
    assert_eq!(row[11], "vm-1");

    let j = json(&env.ok(&["ls", "-c", "policy,volume", "--format", "json"]).stdout);
    assert_eq!(j, serde_json::json!([{"volume": "vsanvol3", "policy": "SW=2"}]));

    let pls = env.ok(&["policy", "ls"]);
    assert!(
        pls.stdout.lines().any(|l| l.starts_with("SW=2")
            && l.contains(SW2)
            && l.contains("In use by 1 volume")
            && l.contains("vsanvol3@vsanDatastore")),
        "{pls:?}"
    );

    let before = env.snapshot();
    let rm = env.fails(&["policy", "rm", "--name", "SW=2"]);
    assert!(
        rm.stderr
            .contains("Cannot remove. Policy SW=2 is in use by vsanvol3@vsanDatastore"),
        "{rm:?}"
    );
    assert_eq!(env.snapshot(), before, "a refused rm changed files");

    env.svc()
        .remove(&Caller::vm("vm-1").unwrap(), "vsanvol3")
        .await
        .unwrap();
    let rm = env.ok(&["policy", "rm", "--name", "SW=2"]);
    assert_eq!(rm.stdout, "Successfully removed policy: SW=2\n");
    assert!(!env.policy_file("SW=2").exists());
    let pls = env.ok(&["policy", "ls", "--format", "json"]);
    assert_eq!(json(&pls.stdout), serde_json::json!([]));
}

#[test]
fn malformed_expressions_are_refused_and_change_nothing() {
    let env = Env::new();
    let before = env.snapshot();
    let cases: &[(&str, &str)] = &[
        (r#"(("stripeWidth" i2)"#, "at column 20"),
        (r#"(("stripeWidth" i2)))"#, "at column 21"),
        (r#"(("wrongKey" i50)"#, "found end of input"),
        (r#"((stripeWidth i2))"#, "expected a quoted capability name"),
        (r#"(("stripeWidth i2))"#, "string is not closed"),
        (
            r#"(("stripeWidth" 2))"#,
            "expected a value: i<int>, l<int> or a quoted string, found '2' at column 17",
        ),
        (r#"(("stripeWidth" two))"#, "found 'two'"),
        (r#"(("stripeWidth" i))"#, "expected digits"),
        ("()", "the policy has no rules"),
        ("", "expected '(' to start the policy, found end of input"),
        ("stripeWidth=2", "found 'stripeWidth'"),
        (
            r#"(("stripeWidth" i2) ("stripeWidth" i3))"#,
            "\"stripeWidth\" is given twice",
        ),
    ];
    for (content, want) in cases {
        let r = env.fails(&["policy", "create", "--name", "bad", "--content", content]);
        assert!(
            r.stderr.contains("invalid policy content") && r.stderr.contains(want),
            "{content:?}: want {want:?} in {r:?}"
        );
        assert!(r.stderr.contains('^'), "no caret for {content:?}: {r:?}");
    }
    assert_eq!(env.snapshot(), before, "a refused create changed files");
    assert!(!env.vsan.join("dockvols").exists());
}

#[test]
fn out_of_range_values_are_refused() {
    let env = Env::new();
    let cases: &[(&str, &str)] = &[
        (
            r#"(("hostFailuresToTolerate" i4))"#,
            "\"hostFailuresToTolerate\" takes an integer from 0 to 3, found i4",
        ),
        (
            r#"(("stripeWidth" i13))"#,
            "\"stripeWidth\" takes an integer from 1 to 12, found i13",
        ),
        (r#"(("stripeWidth" i0))"#, "found i0"),
        (
            r#"(("forceProvisioning" i2))"#,
            "\"forceProvisioning\" takes i0 or i1, found i2",
        ),
        (r#"(("proportionalCapacity" i101))"#, "from 0 to 100"),
        (
            r#"(("cacheReservation" i-1))"#,
            "\"cacheReservation\" takes an integer >= 0",
        ),
        (
            r#"(("iopsLimit" l-5))"#,
            "\"iopsLimit\" takes an integer >= 0, found l-5",
        ),
        (r#"(("checksumDisabled" "no"))"#, "takes i0 or i1, found a string"),
        (
            r#"(("replicaPreference" i1))"#,
            "takes a quoted string, found an integer",
        ),
    ];
    let before = env.snapshot();
    for (content, want) in cases {
        let r = env.fails(&["policy", "create", "--name", "x", "--content", content]);
        assert!(r.stderr.contains(want), "{content}: want {want:?} in {r:?}");
    }
    assert_eq!(env.snapshot(), before);
    env.ok(&[
        "policy",
        "create",
        "--name",
        "edge",
        "--content",
        r#"(("hostFailuresToTolerate" i3) ("stripeWidth" i12) ("forceProvisioning" i1) ("proportionalCapacity" i100) ("iopsLimit" l0) ("replicaPreference" "RAID-5/6 (Erasure Coding) - Capacity"))"#,
    ]);
    // Unknown capabilities are kept, with a warning that catches typos.
    let r = env.ok(&[
        "policy",
        "create",
        "--name",
        "typo",
        "--content",
        r#"(("hostFailuresToTolarate" i1))"#,
    ]);
    assert!(r.stderr.contains("did you mean \"hostFailuresToTolerate\"?"), "{r:?}");
}

#[test]
fn duplicate_and_bad_names() {
    let env = Env::new();
    env.ok(&["policy", "create", "--name", "SW=2", "--content", SW2]);
    let before = env.snapshot();
    let r = env.fails(&[
        "policy",
        "create",
        "--name",
        "SW=2",
        "--content",
        r#"(("stripeWidth" i3))"#,
    ]);
    assert!(r.stderr.contains("Policy SW=2 already exists"), "{r:?}");
    for bad in ["a/b", "..", ".", "", ".hidden", "x.tmp", "../../etc/passwd"] {
        let r = env.fails(&["policy", "create", "--name", bad, "--content", SW2]);
        assert!(r.stderr.contains("invalid policy name"), "{bad:?}: {r:?}");
    }
    assert_eq!(env.snapshot(), before, "refused creates changed files");
    assert_eq!(
        std::fs::read_to_string(env.policy_file("SW=2")).unwrap(),
        format!("{SW2}\n")
    );

    let r = env.fails(&["policy", "rm", "--name", "nope"]);
    assert!(
        r.stderr
            .contains("Policy nope does not exist. Available policies are: ['SW=2']"),
        "{r:?}"
    );
    let r = env.fails(&["policy", "update", "--name", "nope", "--content", SW2]);
    assert!(r.stderr.contains("Policy nope does not exist."), "{r:?}");
}

#[tokio::test]
async fn volume_create_checks_the_policy() {
    let env = Env::new();
    // No policy at all yet.
    let e = env.create("v1", &[("vsan-policy-name", "gold")]).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidPolicy);
    assert_eq!(e.to_string(), "Policy gold does not exist.");
    env.ok(&["policy", "create", "--name", "SW=2", "--content", SW2]);
    env.ok(&[
        "policy",
        "create",
        "--name",
        "silver",
        "--content",
        r#"(("hostFailuresToTolerate" i1))"#,
    ]);
    let before = env.snapshot();
    let e = env.create("v1", &[("vsan-policy-name", "gold")]).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "Policy gold does not exist. Available policies are: ['SW=2', 'silver']"
    );
    let e = env
        .create("v1@nfs1", &[("vsan-policy-name", "SW=2")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidPolicy);
    assert!(
        e.to_string()
            .starts_with("Cannot use a VSAN policy on a non-VSAN datastore"),
        "{e}"
    );
    let e = env.create("v1", &[("vsan-policy-name", "../x")]).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidPolicy);
    assert_eq!(env.snapshot(), before, "a refused create left files behind");

    // A clone takes the policy given for it.
    env.create("src", &[("size", "10mb")]).await.unwrap();
    let c = env
        .create("dst", &[("clone-from", "src"), ("vsan-policy-name", "silver")])
        .await
        .unwrap();
    assert_eq!(c.vsan_policy.as_deref(), Some("silver"));
}

#[tokio::test]
async fn update_reapplies_reports_and_rolls_back() {
    let env = Env::new();
    env.ok(&["policy", "create", "--name", "gold", "--content", SW2]);
    env.create("a", &[("vsan-policy-name", "gold")]).await.unwrap();
    env.create("b", &[("vsan-policy-name", "gold")]).await.unwrap();
    env.create("c", &[]).await.unwrap();

    let v2 = r#"(("stripeWidth" i3))"#;
    let r = env.ok(&["policy", "update", "--name", "gold", "--content", v2]);
    assert_eq!(
        r.stdout,
        "Successfully updated policy gold\nRe-applied to 2 of 2 volumes using it.\n"
    );
    assert_eq!(
        std::fs::read_to_string(env.policy_file("gold")).unwrap(),
        format!("{v2}\n")
    );

    let r = env.fails(&[
        "policy",
        "update",
        "--name",
        "gold",
        "--content",
        r#"( ("stripeWidth"  i3) )"#,
    ]);
    assert!(
        r.stderr.contains("New policy is identical to old policy. Ignoring."),
        "{r:?}"
    );

    let before = env.snapshot();
    let r = env.fails(&[
        "policy",
        "update",
        "--name",
        "gold",
        "--content",
        r#"(("stripeWidth" i99))"#,
    ]);
    assert!(r.stderr.contains("found i99"), "{r:?}");
    assert_eq!(env.snapshot(), before);

    // A volume whose disk is gone cannot take the policy: partial failure.
    let b_desc = env.vol_file(&env.vsan, "b.vmdk");
    let b_saved = std::fs::read(&b_desc).unwrap();
    std::fs::remove_file(&b_desc).unwrap();
    let v3 = r#"(("stripeWidth" i4))"#;
    let r = env.fails(&["policy", "update", "--name", "gold", "--content", v3]);
    assert!(r.stdout.contains("Re-applied to 1 of 2 volumes using it."), "{r:?}");
    assert!(r.stderr.contains("Failed to update b@vsanDatastore"), "{r:?}");
    assert!(
        r.stderr.contains(
            "could not be re-applied to 1 of 2 volumes (run the same update again to retry them): b@vsanDatastore"
        ),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read_to_string(env.policy_file("gold")).unwrap(),
        format!("{v3}\n")
    );
    // The failure is recorded on the datastore and shown by `policy ls`.
    let record = json(&std::fs::read_to_string(env.policy_file(".failed_volume_updates/gold")).unwrap());
    assert_eq!(record["version"], 1);
    assert_eq!(record["content"], v3);
    assert_eq!(record["failed"][0]["volume"], "b@vsanDatastore");
    assert!(
        record["failed"][0]["error"].as_str().unwrap().contains("b.vmdk"),
        "{record}"
    );
    let ls = json(&env.ok(&["policy", "ls", "--format", "json"]).stdout);
    assert_eq!(ls[0]["failed_updates"], serde_json::json!(["b@vsanDatastore"]));
    let table = env.ok(&["policy", "ls"]).stdout;
    assert!(table.contains("In use by 2 volumes (1 not updated)"), "{table}");

    // Once the disk is back, the same update retries just that volume
    // (instead of "identical, ignoring") and clears the record.
    std::fs::write(&b_desc, &b_saved).unwrap();
    let r = env.ok(&["policy", "update", "--name", "gold", "--content", v3]);
    assert_eq!(
        r.stdout,
        "Policy gold is unchanged; retried the 1 volume its last update failed on.\nRe-applied to 1 of 1 volume.\n"
    );
    assert!(!env.policy_file(".failed_volume_updates/gold").exists());
    let ls = json(&env.ok(&["policy", "ls", "--format", "json"]).stdout);
    assert_eq!(ls[0]["failed_updates"], serde_json::json!([]));
    assert!(env.ok(&["policy", "ls"]).stdout.contains("In use by 2 volumes  "));
    let r = env.fails(&["policy", "update", "--name", "gold", "--content", v3]);
    assert!(
        r.stderr.contains("New policy is identical to old policy. Ignoring."),
        "{r:?}"
    );
    std::fs::remove_file(&b_desc).unwrap();

    // Every volume fails: the old content comes back.
    std::fs::remove_file(env.vol_file(&env.vsan, "a.vmdk")).unwrap();
    let r = env.fails(&[
        "policy",
        "update",
        "--name",
        "gold",
        "--content",
        r#"(("stripeWidth" i5))"#,
    ]);
    assert!(
        r.stderr.contains("Failed to update policy gold: it could not be applied to any of the 2 volumes using it; the old policy content was restored."),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("a@vsanDatastore: ") && r.stderr.contains("b@vsanDatastore: "),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read_to_string(env.policy_file("gold")).unwrap(),
        format!("{v3}\n")
    );
}

#[tokio::test]
async fn set_changes_settings_under_the_volume_lock() {
    let env = Env::new();
    env.create("v", &[]).await.unwrap();
    let meta = env.vol_file(&env.vsan, "v.vmfd");

    let r = env.ok(&["set", "--volume=v@vsanDatastore", "--options=access=read-only"]);
    assert_eq!(r.stdout, "Successfully updated settings for v@vsanDatastore\n");
    let info = env.svc().get(&Caller::Admin, "v").await.unwrap();
    assert_eq!(info.access, AccessMode::ReadOnly);
    assert_eq!(info.attach_as, AttachAs::IndependentPersistent);
    env.ok(&[
        "set",
        "--volume",
        "v",
        "--options",
        "attach-as=persistent, access=read-write",
    ]);
    let info = env.svc().get(&Caller::Admin, "v").await.unwrap();
    assert_eq!(
        (info.access, info.attach_as),
        (AccessMode::ReadWrite, AttachAs::Persistent)
    );
    let ls = env.ok(&["ls", "-c", "volume,access,attach-as"]);
    assert!(
        ls.stdout.lines().nth(2).unwrap().contains("read-write  persistent"),
        "{ls:?}"
    );

    let before = std::fs::read(&meta).unwrap();
    let r = env.fails(&["set", "--volume=v@vsanDatastore", "--options=size=1gb"]);
    assert!(
        r.stderr.contains("Failed to update size=1gb for v@vsanDatastore: Invalid options: ['size'] \nOptions that can be edited: ['access', 'attach-as']"),
        "{r:?}"
    );
    let r = env.fails(&["set", "--volume=v@vsanDatastore", "--options=access=write-only"]);
    assert!(
        r.stderr
            .contains("Access type 'write-only' is not supported. Valid options are: ['read-write', 'read-only']"),
        "{r:?}"
    );
    let r = env.fails(&["set", "--volume=v", "--options=attach-as=x"]);
    assert!(
        r.stderr
            .contains("Valid options are: ['independent_persistent', 'persistent']"),
        "{r:?}"
    );
    let r = env.fails(&["set", "--volume=v", "--options=access"]);
    assert!(r.stderr.contains("expected key=value"), "{r:?}");
    let r = env.fails(&["set", "--volume=nope@vsanDatastore", "--options=access=read-only"]);
    assert!(r.stderr.contains("Volume nope@vsanDatastore not found"), "{r:?}");
    let r = env.fails(&["set", "--volume=v@nods", "--options=access=read-only"]);
    assert!(r.stderr.contains("Invalid datastore 'nods'"), "{r:?}");
    assert_eq!(
        std::fs::read(&meta).unwrap(),
        before,
        "refused set changed the metadata"
    );
    assert!(!env.vol_file(&env.vsan, "nope.lck").exists());

    // While the service holds the volume's lock, set waits for it.
    let lock = VolumeLock::acquire(&env.vol_file(&env.vsan, "v.lck")).unwrap();
    let mut child = env
        .cmd(&["set", "--volume=v", "--options=access=read-only"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "set did not wait for the volume lock"
    );
    assert_eq!(std::fs::read(&meta).unwrap(), before);
    drop(lock);
    let out: Run = child.wait_with_output().unwrap().into();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        env.svc().get(&Caller::Admin, "v").await.unwrap().access,
        AccessMode::ReadOnly
    );
}

#[test]
fn ls_on_thousands_of_volumes() {
    let env = Env::new();
    const N: usize = 3000;
    for i in 0..N {
        let extra: &[(&str, &str)] = if i % 3 == 0 {
            &[("vsan-policy-name", "SW=2")]
        } else {
            &[]
        };
        vmdk_agent::testkit::write_volume(&env.vsan, &format!("vol{i:04}"), 1 << 30, 8192, extra).unwrap();
    }
    vmdk_agent::testkit::write_volume(&env.plain, "onnfs", 100 << 20, 0, &[]).unwrap();
    // A broken volume is skipped, not fatal.
    std::fs::write(env.vol_file(&env.vsan, "broken.vmfd"), "{garbage").unwrap();

    let r = env.ok(&["ls"]);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), N + 1 + 2, "{}", &r.stdout[..500]);
    assert!(lines[2].starts_with("onnfs "), "sorted by name: {}", lines[2]);
    assert!(lines[2].contains("100MB") && lines[2].contains("N/A"), "{}", lines[2]);
    let v1 = lines.iter().find(|l| l.starts_with("vol0001 ")).unwrap();
    assert!(
        v1.contains("1GB") && v1.contains("8KB") && v1.contains("[VSAN default]"),
        "{v1}"
    );
    let v3 = lines.iter().find(|l| l.starts_with("vol0003 ")).unwrap();
    assert!(v3.contains("SW=2"), "{v3}");

    let j = json(&env.ok(&["ls", "--format", "json"]).stdout);
    let arr = j.as_array().unwrap();
    assert_eq!(arr.len(), N + 1);
    let v = arr.iter().find(|v| v["volume"] == "vol2999").unwrap();
    assert_eq!(v["datastore"], "vsanDatastore");
    assert_eq!(v["capacity"], 1u64 << 30);
    assert_eq!(v["used"], 8192);
    assert_eq!(v["policy"], Value::Null);
    assert_eq!(v["attached-to"], Value::Null);
    assert_eq!(v.as_object().unwrap().len(), 13);

    let r = env.fails(&["ls", "-c", "volume,size"]);
    assert!(
        r.stderr
            .contains("invalid choices: size (choices must be a comma separated list of only the following words"),
        "{r:?}"
    );

    let pls = json(&env.ok(&["policy", "ls", "--format", "json"]).stdout);
    assert_eq!(pls, serde_json::json!([]), "no policy files yet");
    env.ok(&["policy", "create", "--name", "SW=2", "--content", SW2]);
    let r = env.ok(&["policy", "ls"]);
    assert!(
        r.stdout.contains("In use by 1000 volumes") && r.stdout.contains("and 997 more"),
        "{r:?}"
    );
    let r = env.fails(&["policy", "rm", "--name", "SW=2"]);
    assert!(
        r.stderr
            .contains("is in use by vol0000@vsanDatastore and 999 more volumes"),
        "{}",
        &r.stderr[..300]
    );
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn status_reports_service_datastores_and_policies() {
    let env = Env::new();
    let sock = env.dir.path().join("agent.sock");
    let sock_s = sock.to_str().unwrap();
    env.ok(&["policy", "create", "--name", "SW=2", "--content", SW2]);
    env.create("v", &[("vsan-policy-name", "SW=2")]).await.unwrap();

    let r = env.ok(&["status", "--socket", sock_s]);
    assert!(r.stdout.starts_with("=== Service:\nVersion: "), "{r:?}");
    assert!(r.stdout.contains("Status: Stopped\n"), "{r:?}");
    let ds = r.stdout.lines().find(|l| l.starts_with("vsanDatastore ")).unwrap();
    assert!(
        ds.contains(" yes ") && ds.split_whitespace().nth(3) == Some("1"),
        "{ds}"
    );
    assert!(
        r.stdout.lines().any(|l| l.starts_with("nfs1 ") && l.contains(" no ")),
        "{r:?}"
    );
    assert!(r.stdout.contains("=== Policies:\n"), "{r:?}");
    assert!(
        r.stdout.lines().any(|l| l.starts_with("SW=2") && l.ends_with(" 1")),
        "{r:?}"
    );

    let child = env
        .cmd(&["serve", "--admin-listen", "off", "--socket", sock_s])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _serve = Serve(child);
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let r = env.ok(&["status", "--socket", sock_s]);
    assert!(r.stdout.contains("Status: Running\n"), "{r:?}");
    assert!(r.stdout.contains("Serving datastores: vsanDatastore, nfs1"), "{r:?}");
    let j = json(&env.ok(&["status", "--socket", sock_s, "--format", "json"]).stdout);
    assert_eq!(j["service"]["status"], "running");
    assert_eq!(j["service"]["agent"]["backend"], "local");
    assert_eq!(j["datastores"][0]["volumes"], 1);
    assert!(j["datastores"][0]["free_bytes"].as_u64().unwrap() > 0);
    assert_eq!(j["policies"][0]["volumes"], serde_json::json!(["v@vsanDatastore"]));

    // Admin commands work while the service runs, on the same files.
    env.ok(&["set", "--volume=v", "--options=access=read-only"]);

    // With an unusable configuration the service state is still reported,
    // next to what is wrong with the configuration.
    let missing = env.dir.path().join("missing.toml");
    let r: Run = Command::new(BIN)
        .args(["status", "--socket", sock_s, "--config"])
        .arg(&missing)
        .env_remove("VMDK_AGENT_CONFIG")
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("Status: Running")
            && r.stdout
                .contains(&format!("cannot read config file {}", missing.display())),
        "{r:?}"
    );
}

#[test]
fn help_at_every_level_and_clear_usage_errors() {
    for args in [
        &["--help"][..],
        &["ls", "--help"],
        &["set", "--help"],
        &["status", "--help"],
        &["serve", "--help"],
        &["policy", "--help"],
        &["policy", "create", "--help"],
        &["policy", "rm", "--help"],
        &["policy", "ls", "--help"],
        &["policy", "update", "--help"],
    ] {
        let r: Run = Command::new(BIN).args(args).output().unwrap().into();
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
        assert!(r.stdout.contains("Usage: vmdk-agent"), "{args:?}: {r:?}");
    }
    let r: Run = Command::new(BIN).arg("policy").output().unwrap().into();
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("Usage: vmdk-agent policy"), "{r:?}");
    let r: Run = Command::new(BIN)
        .args(["policy", "create", "--name", "x"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("--content <CONTENT>"), "{r:?}");

    // A configured datastore must exist (only the built-in one is made).
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("agent.toml");
    let gone = cfg_dir.path().join("unmounted-share");
    std::fs::write(&cfg, format!("[[datastore]]\nname = \"nfs9\"\npath = {:?}\n", gone)).unwrap();
    let r: Run = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "ls"])
        .env_remove("VMDK_AGENT_CONFIG")
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains(&format!("{} (datastore nfs9)", gone.display())) && !gone.exists(),
        "{r:?}"
    );

    // One directory under two datastore names is refused.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let r: Run = Command::new(BIN)
        .args([
            "--datastore",
            &format!("a={d}"),
            "--datastore",
            &format!("b={d}/"),
            "ls",
        ])
        .output()
        .unwrap()
        .into();
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("datastores a and b are the same directory"), "{r:?}");

    let env = Env::new();
    let no_vsan: Run = Command::new(BIN)
        .args(["--datastore", &format!("nfs1={}", env.plain.display()), "policy", "ls"])
        .output()
        .unwrap()
        .into();
    assert_eq!(no_vsan.code, 2);
    assert!(no_vsan.stderr.contains("VSAN datastore does not exist"), "{no_vsan:?}");
}

/// A volume create using a policy holds the policy lock shared until its
/// metadata is written; `policy rm` waits for it rather than removing the
/// policy under it.
#[test]
fn policy_rm_waits_for_a_create_using_the_policy() {
    let env = Env::new();
    env.ok(&["policy", "create", "--name", "SW=2", "--content", SW2]);
    let store = env.svc().policy_store().unwrap();
    let in_flight = store.lock_shared().unwrap().expect("the policy folder exists");
    let mut child = env
        .cmd(&["policy", "rm", "--name", "SW=2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "policy rm did not wait for the policy lock"
    );
    assert!(env.policy_file("SW=2").exists());
    // The create finishes: its volume now uses the policy.
    vmdk_agent::testkit::write_volume(&env.vsan, "late", 1 << 20, 0, &[("vsan-policy-name", "SW=2")]).unwrap();
    drop(in_flight);
    let out: Run = child.wait_with_output().unwrap().into();
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("in use by late@vsanDatastore"), "{out:?}");
    assert!(env.policy_file("SW=2").exists());
}
