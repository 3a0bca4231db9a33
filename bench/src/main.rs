//! `vmdk-bench`: the benchmark suite of issue 10 ("Performance").
//!
//! Run it through `bash bench/run.sh` (root), which builds the release
//! binaries and passes their paths. It drives `vmdk-plugin serve` over its
//! unix socket with the bytes dockerd sends (see `examples/docker_call.rs`),
//! `vmdk-agent` as an administrator does, and the Docker CLI, and times the
//! same work done by hand (`losetup`, `mkfs.ext4`, `mount`, ...) in the same
//! run, interleaved. Each figure is printed next to its target with PASS or
//! FAIL and saved to `target/bench/results.json`. See docs/performance.md.
//!
//! It is not a test: nothing here runs under `cargo test`.

mod docker;
mod groups;
mod http;
mod proc;
mod report;

use std::path::PathBuf;

use anyhow::{bail, Context};

/// Everything the groups need to know.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Smaller counts for a smoke run.
    pub quick: bool,
    /// `vmdk-plugin` (release).
    pub plugin: PathBuf,
    /// `vmdk-agent` (release).
    pub agent: PathBuf,
    /// Scratch directory (datastores, mount points, logs).
    pub work: PathBuf,
    /// Volume counts of the control/scaling group.
    pub counts: Vec<usize>,
    /// Busybox image for the Docker group.
    pub image: Option<String>,
    /// Volumes of each kind in the Docker group.
    pub docker_volumes: usize,
}

impl Opts {
    /// `quick` or `full` repetition count.
    pub fn reps(&self, quick: usize, full: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

const GROUPS: &[&str] = &["mount", "create", "control", "concurrency", "docker"];

const USAGE: &str = "usage: vmdk-bench --plugin BIN --agent BIN --work DIR --out FILE [--quick] \
[--groups g1,g2] [--counts 100,1000,...] [--image TAG] [--docker-volumes N] [--machine JSON]\n\
groups: mount, create, control, concurrency, docker";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut plugin, mut agent, mut work, mut out, mut machine) = (None, None, None, None, None);
    let mut quick = false;
    let mut groups: Vec<String> = GROUPS.iter().map(|s| s.to_string()).collect();
    let mut counts: Option<Vec<usize>> = None;
    let mut image = None;
    let mut docker_volumes = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--quick" => quick = true,
            "--plugin" => plugin = Some(PathBuf::from(val()?)),
            "--agent" => agent = Some(PathBuf::from(val()?)),
            "--work" => work = Some(PathBuf::from(val()?)),
            "--out" => out = Some(PathBuf::from(val()?)),
            "--machine" => machine = Some(val()?),
            "--image" => image = Some(val()?),
            "--groups" => {
                groups = val()?.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect();
                for g in &groups {
                    if !GROUPS.contains(&g.as_str()) {
                        bail!("unknown group {g:?}; the groups are {}", GROUPS.join(", "));
                    }
                }
            }
            "--counts" => {
                counts = Some(
                    val()?
                        .split(',')
                        .map(|s| s.parse().with_context(|| format!("--counts: {s:?} is not a number")))
                        .collect::<anyhow::Result<_>>()?,
                )
            }
            "--docker-volumes" => docker_volumes = Some(val()?.parse().context("--docker-volumes")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => bail!("unknown argument {a:?}\n{USAGE}"),
        }
    }
    let (Some(plugin), Some(agent), Some(work), Some(out)) = (plugin, agent, work, out) else {
        bail!("{USAGE}");
    };
    if unsafe_geteuid() != 0 {
        bail!("vmdk-bench needs root (loop devices, mkfs, mount)");
    }
    let opts = Opts {
        quick,
        plugin,
        agent,
        work,
        counts: counts.unwrap_or_else(|| {
            if quick {
                vec![100, 1_000]
            } else {
                vec![100, 1_000, 10_000, 100_000]
            }
        }),
        image,
        docker_volumes: docker_volumes.unwrap_or(if quick { 1_000 } else { 10_000 }),
    };
    std::fs::create_dir_all(&opts.work)?;
    let mut rep = report::Report::new(machine.as_deref(), quick);
    for g in &groups {
        println!("\n=== group {g} ===");
        let start = std::time::Instant::now();
        let r = match g.as_str() {
            "mount" => groups::mount(&opts, &mut rep),
            "create" => groups::create(&opts, &mut rep),
            "control" => groups::control(&opts, &mut rep),
            "concurrency" => groups::concurrency(&opts, &mut rep),
            "docker" => docker::docker_group(&opts, &mut rep),
            _ => unreachable!("checked above"),
        };
        let secs = start.elapsed().as_secs_f64();
        rep.group_done(g, secs, r.as_ref().err().map(|e| format!("{e:#}")));
        if let Err(e) = r {
            println!("group {g} FAILED after {secs:.1} s: {e:#}");
        } else {
            println!("group {g} took {secs:.1} s");
        }
        rep.save(&out)?;
    }
    rep.summary();
    rep.save(&out)?;
    println!("\nresults: {}", out.display());
    Ok(())
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
