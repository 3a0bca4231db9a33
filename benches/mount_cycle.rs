//! Mount-path benchmark: the plugin's create → first mount (attach, mkfs,
//! mount) → unmount → second mount → unmount → remove, against the same
//! work done by hand in the same run (`truncate`, `losetup`, `mkfs.ext4`,
//! `mount`, `umount`, `losetup -d`). Prints medians and ratios.
//!
//! `cargo bench --bench mount_cycle` (root). Under `cargo test` it runs one
//! quick round as a smoke test.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmdk_agent::backend::local::LocalBackend;
use vmdk_agent::backend::loopdev::LinuxLoops;
use vmdk_agent::config::AgentConfig;
use vmdk_agent::VolumeService;
use vmdk_plugin::agent_client::AgentClient;
use vmdk_plugin::sys::LinuxSystem;
use vmdk_plugin::volume::{ManagerConfig, VolumeManager};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[derive(Default)]
struct Times {
    create: Vec<Duration>,
    first_mount: Vec<Duration>,
    unmount: Vec<Duration>,
    second_mount: Vec<Duration>,
}

fn raw_cycle(dir: &Path, i: usize, t: &mut Times) {
    let file = dir.join(format!("raw{i}.img"));
    let mnt = dir.join(format!("rawmnt{i}"));
    std::fs::create_dir_all(&mnt).unwrap();
    let (f, m) = (file.to_str().unwrap(), mnt.to_str().unwrap());
    let s = Instant::now();
    run("truncate", &["-s", "1G", f]);
    t.create.push(s.elapsed());
    let s = Instant::now();
    let dev = run("losetup", &["-f", "--show", f]);
    run("mkfs.ext4", &["-F", "-q", "-E", "nodiscard", "-L", "raw", &dev]);
    run("mount", &[&dev, m]);
    std::fs::create_dir(mnt.join("data")).unwrap();
    t.first_mount.push(s.elapsed());
    let s = Instant::now();
    run("umount", &[m]);
    run("losetup", &["-d", &dev]);
    t.unmount.push(s.elapsed());
    let s = Instant::now();
    let dev = run("losetup", &["-f", "--show", f]);
    run("mount", &[&dev, m]);
    t.second_mount.push(s.elapsed());
    run("umount", &[m]);
    run("losetup", &["-d", &dev]);
    std::fs::remove_file(&file).unwrap();
}

async fn plugin_cycle(m: &std::sync::Arc<VolumeManager>, i: usize, t: &mut Times) {
    let name = format!("bench{i}");
    let s = Instant::now();
    m.create(&name, [("size".to_string(), "1gb".to_string())].into())
        .await
        .unwrap();
    t.create.push(s.elapsed());
    let s = Instant::now();
    m.mount(&name, "a").await.unwrap();
    t.first_mount.push(s.elapsed());
    let s = Instant::now();
    m.unmount(&name, "a").await.unwrap();
    t.unmount.push(s.elapsed());
    let s = Instant::now();
    m.mount(&name, "b").await.unwrap();
    t.second_mount.push(s.elapsed());
    m.unmount(&name, "b").await.unwrap();
    m.remove(&name).await.unwrap();
}

#[tokio::main]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the mount benchmark needs root"
    );
    let rounds = if bench { 15 } else { 1 };
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let mut cfg = AgentConfig::default();
    cfg.add_datastore_flag(&format!("local={}", ds.display())).unwrap();
    let svc = VolumeService::new(&cfg, Arc::new(LocalBackend::new(Arc::new(LinuxLoops::default())))).unwrap();
    let m = VolumeManager::new(
        AgentClient::Embedded(Arc::new(svc)),
        Arc::new(LinuxSystem),
        ManagerConfig {
            vm_id: "bench".into(),
            mount_root: dir.path().join("mnt"),
            state_dir: dir.path().join("state"),
            docker_socket: dir.path().join("no-docker.sock"),
            detach_grace: std::time::Duration::ZERO,
        },
    )
    .unwrap();
    m.recover().await;
    let (mut raw, mut ours) = (Times::default(), Times::default());
    for i in 0..rounds {
        // Interleave so both see the same machine state.
        raw_cycle(dir.path(), i, &mut raw);
        plugin_cycle(&m, i, &mut ours).await;
    }
    println!("mount cycle, 1 GiB thin ext4 volume, {rounds} rounds, medians:");
    println!("{:<14} {:>12} {:>12} {:>8}", "step", "by hand", "vmdk", "ratio");
    for (label, r, o) in [
        ("create", &mut raw.create, &mut ours.create),
        ("first mount", &mut raw.first_mount, &mut ours.first_mount),
        ("unmount", &mut raw.unmount, &mut ours.unmount),
        ("second mount", &mut raw.second_mount, &mut ours.second_mount),
    ] {
        let (r, o) = (median(r), median(o));
        println!(
            "{label:<14} {:>10.2}ms {:>10.2}ms {:>7.2}x",
            r.as_secs_f64() * 1e3,
            o.as_secs_f64() * 1e3,
            o.as_secs_f64() / r.as_secs_f64()
        );
    }
}
