//! How long `vmdk-agent ls` takes on a datastore with many volumes.
//!
//! ```sh
//! cargo run --release -p vmdk-agent --example ls_bench -- [VOLUMES] [DIR]
//! ```
//!
//! Builds VOLUMES (default 10000) volumes in a temp datastore (or DIR),
//! then times the sequential `VolumeService::list`, the parallel
//! `VolumeService::inventory` behind `ls`, rendering the table, and the
//! `vmdk-agent ls` binary end to end when it is built beside this example.
//! Prints the figures; asserts nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmdk_agent::admin;
use vmdk_agent::backend::local::LocalBackend;
use vmdk_agent::backend::loopdev::FakeLoops;
use vmdk_agent::config::AgentConfig;
use vmdk_agent::VolumeService;

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..runs {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed());
        out = Some(r);
    }
    (best, out.expect("at least one run"))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(10_000, |s| s.parse().expect("VOLUMES is a number"));
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = args.next().map_or_else(|| tmp.path().join("vsan"), Into::into);
    std::fs::create_dir_all(&root).expect("datastore dir");

    let t = Instant::now();
    for i in 0..n {
        let policy = if i % 10 == 0 {
            &[("vsan-policy-name", "SW=2")][..]
        } else {
            &[]
        };
        vmdk_agent::testkit::write_volume(&root, &format!("vol{i:05}"), 1 << 30, 4096, policy).expect("write volume");
    }
    println!("built {n} volumes in {:?}", t.elapsed());

    let mut cfg = AgentConfig::default();
    cfg.add_datastore_flag(&format!("vsan={},vsan", root.display()))
        .unwrap();
    let svc = VolumeService::new(&cfg, Arc::new(LocalBackend::new(Arc::new(FakeLoops::default())))).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let caller = vmdk_agent::service::Caller::Admin;
    let (seq, listed) = best_of(3, || rt.block_on(svc.list(&caller)).unwrap().len());
    println!("VolumeService::list: {listed} volumes in {seq:?}");
    let (par, vols) = best_of(5, || rt.block_on(svc.inventory()).unwrap());
    println!(
        "VolumeService::inventory ({} cpus): {} volumes in {par:?}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        vols.len()
    );
    let cols = admin::all_columns();
    let (render, table) = best_of(5, || admin::volume_table(&vols, &cols, |_| true));
    println!("table rendering: {} lines in {render:?}", table.lines().count());

    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("vmdk-agent"))
        .filter(|p| p.exists());
    match bin {
        Some(bin) => {
            let (wall, out) = best_of(3, || {
                std::process::Command::new(&bin)
                    .arg("--datastore")
                    .arg(format!("vsan={},vsan", root.display()))
                    .arg("ls")
                    .output()
                    .expect("run vmdk-agent ls")
            });
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            println!(
                "`vmdk-agent ls` end to end ({}): {} lines in {wall:?}",
                bin.display(),
                out.stdout.iter().filter(|b| **b == b'\n').count()
            );
        }
        None => println!("(build the vmdk-agent binary in the same profile to time it end to end)"),
    }
}
