//! Root-only: `vmdk-plugin doctor` against a real plugin in a scratch
//! directory, first healthy (every check OK, exit 0), then with each part
//! broken on purpose: doctor must name the problem and the fix, and exit 1
//! when a check fails.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{require_root, KernelCleanup};

struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs doctor; (exit code, stdout).
fn doctor(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmdk-plugin"))
        .arg("doctor")
        .args(args)
        .env_remove("DOCKER_HOST")
        .env_remove("VMDK_AGENT_URL")
        .env_remove("VMDK_AGENT_CONFIG")
        .env_remove("VMDK_PLUGIN_SOCKET")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// The line of check `name` and its fix line, if any.
fn check<'a>(report: &'a str, name: &str) -> (&'a str, &'a str) {
    let mut lines = report.lines();
    while let Some(l) = lines.next() {
        if l.get(6..).is_some_and(|rest| rest.starts_with(&format!("{name}: "))) {
            // The detail may go on over indented lines; then maybe a fix.
            let fix = lines
                .take_while(|f| f.starts_with("      "))
                .find(|f| f.trim_start().starts_with("fix: "))
                .unwrap_or("");
            return (l, fix);
        }
    }
    panic!("no check {name:?} in:\n{report}");
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

#[test]
fn doctor_passes_on_a_healthy_plugin_and_names_each_broken_part() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let _cleanup = KernelCleanup(d.clone());
    let plugins = d.join("run/plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(d.join("mnt")).unwrap();
    std::fs::create_dir_all(d.join("ds")).unwrap();
    // The mount root sits on a mount of its own, shared as on a systemd host.
    let mnt = d.join("mnt").display().to_string();
    sh(&format!("mount --bind '{mnt}' '{mnt}' && mount --make-shared '{mnt}'"));
    let sock = plugins.join("vmdk-doc.sock");
    let sock_s = sock.display().to_string();
    let mount_root = d.join("mnt/vmdk").display().to_string();
    let ds = format!("local={}", d.join("ds").display());
    let mut plugin = Plugin(
        Command::new(env!("CARGO_BIN_EXE_vmdk-plugin"))
            .args([
                "serve",
                "--admin-listen",
                "off",
                "--vm-id",
                "doc-vm",
                "--socket",
                &sock_s,
            ])
            .args(["--mount-root", &mount_root, "--datastore", &ds])
            .arg("--state-dir")
            .arg(d.join("state"))
            .arg("--docker-socket")
            .arg(d.join("no-docker.sock"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(plugin.0.try_wait().unwrap().is_none(), "the plugin exited");
        assert!(Instant::now() < deadline, "the plugin socket never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let base = ["--socket", &sock_s, "--mount-root", &mount_root, "--datastore", &ds];

    // Healthy. The Docker Engine here may be restarted by another test:
    // wait for it to answer.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (code, report) = loop {
        let (code, report) = doctor(&base, &[]);
        if !check(&report, "Docker API").0.starts_with("FAIL") || Instant::now() > deadline {
            break (code, report);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(code, 0, "{report}");
    for name in [
        "socket directory",
        "plugin socket",
        "mount propagation",
        "configuration",
        "agent connection",
        "mkfs.ext4",
        "mkfs.xfs",
        "blkid",
        "Docker API",
    ] {
        assert!(check(&report, name).0.starts_with("OK"), "{name}:\n{report}");
    }
    assert!(report.contains("All checks passed."), "{report}");
    assert!(
        check(&report, "agent connection")
            .0
            .contains("embedded agent answers /v1/version"),
        "{report}"
    );

    // Broken: private propagation, no mkfs tools, no Docker, a bad
    // configuration file.
    sh(&format!("mount --make-private '{mnt}'"));
    let empty = d.join("emptybin");
    std::fs::create_dir_all(&empty).unwrap();
    let bad = d.join("bad.toml");
    std::fs::write(&bad, "backend = [not toml\n").unwrap();
    let none = format!("unix://{}", d.join("none.sock").display());
    let mut args = base.to_vec();
    let empty_s = empty.display().to_string();
    let bad_s = bad.display().to_string();
    args.extend(["--tool-path", &empty_s, "--agent-config", &bad_s]);
    let (code, report) = doctor(&args, &[("DOCKER_HOST", &none)]);
    assert_eq!(code, 1, "{report}");
    let (l, fix) = check(&report, "mount propagation");
    assert!(l.starts_with("WARN") && l.contains("private propagation"), "{report}");
    assert!(fix.contains(&format!("mount --make-rshared {mnt}")), "{report}");
    let (l, fix) = check(&report, "mkfs.ext4");
    assert!(l.starts_with("FAIL") && l.contains(&empty_s), "{report}");
    assert!(fix.contains("install e2fsprogs"), "{report}");
    let (l, fix) = check(&report, "blkid");
    assert!(l.starts_with("FAIL") && fix.contains("util-linux"), "{report}");
    let (l, fix) = check(&report, "mkfs.xfs");
    assert!(l.starts_with("WARN") && fix.contains("xfsprogs"), "{report}");
    let (l, fix) = check(&report, "Docker API");
    assert!(
        l.starts_with("FAIL") && l.contains(&d.join("none.sock").display().to_string()),
        "{report}"
    );
    assert!(fix.contains("systemctl start docker"), "{report}");
    let (l, fix) = check(&report, "configuration");
    assert!(l.starts_with("FAIL") && l.contains(&bad_s), "{report}");
    assert!(fix.contains("docs/configuration.md"), "{report}");

    // Broken: the socket directory is writable by anyone.
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, report) = doctor(&base, &[]);
    assert_eq!(code, 1, "{report}");
    let (l, fix) = check(&report, "socket directory");
    assert!(
        l.starts_with("FAIL") && l.contains("writable by others (mode 0777)"),
        "{report}"
    );
    assert!(fix.contains(&format!("chmod 755 {}", plugins.display())), "{report}");
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o755)).unwrap();

    // Broken: the plugin was killed (its socket file stays), and the
    // separate agent named does not answer.
    let _ = plugin.0.kill();
    let _ = plugin.0.wait();
    assert!(sock.exists());
    let mut args = base.to_vec();
    args.extend(["--agent", &none]);
    let (code, report) = doctor(&args, &[]);
    assert_eq!(code, 1, "{report}");
    let (l, fix) = check(&report, "plugin socket");
    assert!(l.starts_with("FAIL") && l.contains("stale socket file"), "{report}");
    assert!(
        fix.contains("start the plugin") && fix.contains(&format!("rm {sock_s}")),
        "{report}"
    );
    let (l, fix) = check(&report, "agent connection");
    assert!(l.starts_with("FAIL") && l.contains("does not answer"), "{report}");
    assert!(fix.contains("systemctl start vmdk-agent"), "{report}");

    // Broken: no socket directory at all.
    let gone = d.join("nodir/vmdk.sock").display().to_string();
    let (code, report) = doctor(
        &["--socket", &gone, "--mount-root", &mount_root, "--datastore", &ds],
        &[],
    );
    assert_eq!(code, 1, "{report}");
    let (l, fix) = check(&report, "socket directory");
    assert!(l.starts_with("FAIL") && l.contains("does not exist"), "{report}");
    assert!(fix.contains("systemctl start vmdk-plugin"), "{report}");
    let (l, _) = check(&report, "plugin socket");
    assert!(l.contains("the plugin is not running"), "{report}");
    let _ = Path::new(&gone);
}
