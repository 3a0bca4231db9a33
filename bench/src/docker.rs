//! Docker's own view: `docker volume ls` and `docker run -v` with vmdk
//! volumes against `local` volumes on the same engine.
//!
//! Serves the plugin on `/run/docker/plugins/vmdk.sock` and holds the lock
//! the Docker Engine tests hold (`/run/lock/vmdk-docker-tests.lock`, see
//! tests/common/docker.rs), so it never runs beside them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::groups::{cleanup, scratch};
use crate::http::Conn;
use crate::proc::{self, PluginPaths};
use crate::report::{Report, Stats};
use crate::Opts;

const LOCK_FILE: &str = "/run/lock/vmdk-docker-tests.lock";
const SOCKET: &str = "/run/docker/plugins/vmdk.sock";
const DOCKER: &str = "/var/run/docker.sock";
const API: &str = "/v1.41";

fn docker(args: &[&str]) -> anyhow::Result<(Duration, String)> {
    let t = Instant::now();
    let out = Command::new("docker").args(args).output().context("run docker")?;
    let el = t.elapsed();
    if !out.status.success() {
        bail!("docker {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok((el, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// `docker volume ls` and `docker volume ls -f driver=DRIVER`, interleaved,
/// `reps` times each; checks they list more than `want` and `want_driver`
/// lines. The
/// filtered form asks only that driver, so a driver dockerd cannot reach
/// does not delay it.
fn volume_ls(
    reps: usize,
    want: usize,
    want_driver: usize,
    driver: &str,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut all, mut only) = (Vec::new(), Vec::new());
    let filter = format!("driver={driver}");
    for _ in 0..reps {
        for filtered in [false, true] {
            let args: &[&str] = if filtered {
                &["volume", "ls", "-f", &filter]
            } else {
                &["volume", "ls"]
            };
            let (d, out) = docker(args)?;
            let lines = out.lines().count();
            let want = if filtered { want_driver } else { want };
            anyhow::ensure!(
                lines > want,
                "docker {args:?} listed {lines} lines, expected over {want}"
            );
            if filtered {
                only.push(d)
            } else {
                all.push(d)
            }
        }
    }
    Ok((all, only))
}

fn local_volumes(c: &mut Conn, n: usize, create: bool) -> anyhow::Result<Duration> {
    let t = Instant::now();
    for i in 0..n {
        let name = format!("bench-local-{i:06}");
        let (s, b) = if create {
            c.request(
                "POST",
                &format!("{API}/volumes/create"),
                "",
                Some(&json!({"Name": name, "Driver": "local"}).to_string()),
            )?
        } else {
            c.request("DELETE", &format!("{API}/volumes/{name}"), "", None)?
        };
        let gone = s == 404 && !create;
        if !(200..300).contains(&s) && !gone {
            bail!(
                "docker API {} volume {name}: {s} {b}",
                if create { "create" } else { "delete" }
            );
        }
    }
    Ok(t.elapsed())
}

/// The Docker group.
pub fn docker_group(o: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    const G: &str = "docker";
    let image = o
        .image
        .clone()
        .context("the docker group needs --image (bench/run.sh builds busybox with tests/images/build-image.sh)")?;
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .with_context(|| format!("open {LOCK_FILE}"))?;
    println!(" waiting for {LOCK_FILE} (held while Docker Engine tests run)");
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("flock {LOCK_FILE}: {}", std::io::Error::last_os_error());
    }
    if std::os::unix::net::UnixStream::connect(SOCKET).is_ok() {
        bail!("{SOCKET} is already served (an installed vmdk plugin?); stop it first");
    }
    let dir = scratch(o, G)?;
    let mut paths = PluginPaths::under(&dir);
    paths.socket = SOCKET.into();
    paths.docker_socket = DOCKER.into();
    let mut empty = paths.clone();
    empty.datastore = dir.join("ds-empty");
    // A driver dockerd knows but cannot reach (a plugin another program
    // served and stopped, as the Docker Engine tests do) makes every
    // `docker volume ls` wait for its retries, about 15 s, and hides both
    // sides of the comparison. So the baseline is taken with the plugin
    // serving an empty datastore, as every figure below is; a slow
    // baseline then means another unreachable driver.
    let mut plugin = proc::start_plugin(&o.plugin, &empty)?;
    let (base, _) = docker(&["volume", "ls"])?;
    plugin.stop();
    let base_ms = base.as_secs_f64() * 1e3;
    rep.target(
        G,
        "docker volume ls before the bench's volumes (engine baseline)",
        base_ms,
        "ms",
        2000.0,
        json!({"note": "over 2 s with the vmdk plugin serving: dockerd is retrying another unreachable plugin (see its log); the ls figures below are not comparable"}),
    );
    let n = o.docker_volumes;
    let reps = o.reps(3, 7);
    let t = proc::populate(&paths.datastore, "dv", 0, n)?;
    rep.info(
        G,
        &format!("populate {n} vmdk volumes (testkit)"),
        t.as_secs_f64() * 1e3,
        "ms",
        json!({}),
    );
    let mut dc = Conn::open(Path::new(DOCKER))?;
    let r = (|| -> anyhow::Result<()> {
        let mut plugin = proc::start_plugin(&o.plugin, &paths)?;
        // docker run -v on an existing formatted volume.
        docker(&["volume", "create", "-d", "vmdk", "-o", "size=1gb", "bench-run-vmdk"])?;
        docker(&["volume", "create", "-d", "local", "bench-run-local"])?;
        for v in ["bench-run-vmdk", "bench-run-local"] {
            docker(&["run", "--rm", "-v", &format!("{v}:/x"), &image, "true"])?;
        }
        let (mut tv, mut tl) = (Vec::new(), Vec::new());
        for i in 0..o.reps(3, 10) {
            let order = if i % 2 == 0 { [true, false] } else { [false, true] };
            for vmdk in order {
                let v = if vmdk { "bench-run-vmdk" } else { "bench-run-local" };
                let (d, _) = docker(&["run", "--rm", "-v", &format!("{v}:/x"), &image, "true"])?;
                if vmdk {
                    tv.push(d)
                } else {
                    tl.push(d)
                }
            }
        }
        rep.ratio_of(
            G,
            &format!("docker run --rm -v vol:/x busybox true ({n} vmdk volumes)"),
            ("local", "vmdk"),
            Stats::of(&tl),
            Stats::of(&tv),
            Some(1.3),
        );
        docker(&["volume", "rm", "bench-run-vmdk", "bench-run-local"])?;

        // docker volume ls: N vmdk volumes (no bench local ones), then N
        // local volumes with the plugin serving an empty datastore (a
        // stopped plugin would make dockerd retry its socket).
        let (v, vf) = volume_ls(reps, n, n, "vmdk")?;
        plugin.stop();
        plugin = proc::start_plugin(&o.plugin, &empty)?;
        let t = local_volumes(&mut dc, n, true)?;
        rep.info(
            G,
            &format!("create {n} local volumes (API), per volume"),
            t.as_secs_f64() * 1e3 / n as f64,
            "ms",
            json!({}),
        );
        let (l, lf) = volume_ls(reps, n, n, "local")?;
        // With an unreachable driver in dockerd the unfiltered form is not
        // comparable (see the baseline); the per-driver form still is.
        let clean = base_ms <= 2000.0;
        rep.ratio_of(
            G,
            &format!("docker volume ls, {n} volumes"),
            ("local", "vmdk"),
            Stats::of(&l),
            Stats::of(&v),
            clean.then_some(1.2),
        );
        rep.ratio_of(
            G,
            &format!("docker volume ls -f driver=..., {n} volumes"),
            ("local", "vmdk"),
            Stats::of(&lf),
            Stats::of(&vf),
            (!clean).then_some(1.2),
        );
        // Both kinds at once, for the record.
        plugin.stop();
        let _plugin = proc::start_plugin(&o.plugin, &paths)?;
        let (b, _) = volume_ls(reps, 2 * n, n, "vmdk")?;
        rep.stats(
            G,
            &format!("docker volume ls, {n} vmdk + {n} local volumes"),
            Stats::of(&b),
            None,
            None,
        );
        Ok(())
    })();
    let t = local_volumes(&mut dc, n, false);
    let _ = std::fs::remove_file(SOCKET);
    cleanup(&dir)?;
    r?;
    rep.info(
        G,
        &format!("remove {n} local volumes (API)"),
        t?.as_secs_f64() * 1e3,
        "ms",
        json!({}),
    );
    Ok(())
}
