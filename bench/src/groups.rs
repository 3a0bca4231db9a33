//! The groups that need no Docker Engine: mount, create, control (with
//! memory, start-up and scaling), concurrency.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::http::Conn;
use crate::proc::{self, BusyWriter, Hand, PluginPaths};
use crate::report::{Report, Stats};
use crate::Opts;

/// A Docker-style mount ID (64 hex digits).
pub fn mount_id(tag: &str, i: usize) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}{:048x}", i)
}

fn body(name: &str) -> String {
    json!({ "Name": name }).to_string()
}

fn create_body(name: &str, size: &str) -> String {
    json!({ "Name": name, "Opts": {"size": size} }).to_string()
}

fn mount_body(name: &str, id: &str) -> String {
    json!({ "Name": name, "ID": id }).to_string()
}

/// A fresh scratch directory for a group, with nothing mounted below it.
pub fn scratch(o: &Opts, group: &str) -> anyhow::Result<PathBuf> {
    let d = o.work.join(group);
    if d.exists() {
        cleanup(&d)?;
    }
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Unmounts what is mounted below `dir` (a crashed earlier run), detaches
/// loop devices backed by files below it, and deletes it.
pub fn cleanup(dir: &Path) -> anyhow::Result<()> {
    let prefix = proc::path(dir).to_owned();
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut mounted: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    mounted.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in &mounted {
        proc::run("umount", &[m])?;
    }
    let loops = proc::run("losetup", &["-n", "-O", "NAME,BACK-FILE", "-l"]).unwrap_or_default();
    for l in loops.lines() {
        let mut w = l.split_whitespace();
        if let (Some(dev), Some(file)) = (w.next(), w.next()) {
            if file.starts_with(&prefix) {
                let _ = proc::run("losetup", &["-d", dev]);
            }
        }
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))
}

// ----- mount -------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Cycle {
    create: Vec<Duration>,
    fresh: Vec<Duration>,
    create_fresh: Vec<Duration>,
    last_unmount: Vec<Duration>,
    remount: Vec<Duration>,
}

fn hand_cycle(dir: &Path, i: usize, size: &str, t: &mut Cycle) -> anyhow::Result<()> {
    let mut h = Hand::new(dir, &format!("h{i}"))?;
    let c = h.create(size)?;
    let f = h.fresh_mount(&format!("h{i}"))?;
    t.create.push(c);
    t.fresh.push(f);
    t.create_fresh.push(c + f);
    t.last_unmount.push(h.unmount()?);
    t.remount.push(h.remount()?);
    t.last_unmount.push(h.unmount()?);
    h.remove()
}

fn plugin_cycle(conn: &mut Conn, name: &str, size: &str, t: &mut Cycle) -> anyhow::Result<()> {
    let c = conn.timed("VolumeDriver.Create", &create_body(name, size))?;
    let f = conn.timed("VolumeDriver.Mount", &mount_body(name, &mount_id(name, 1)))?;
    t.create.push(c);
    t.fresh.push(f);
    t.create_fresh.push(c + f);
    t.last_unmount
        .push(conn.timed("VolumeDriver.Unmount", &mount_body(name, &mount_id(name, 1)))?);
    t.remount
        .push(conn.timed("VolumeDriver.Mount", &mount_body(name, &mount_id(name, 2)))?);
    t.last_unmount
        .push(conn.timed("VolumeDriver.Unmount", &mount_body(name, &mount_id(name, 2)))?);
    conn.ok("VolumeDriver.Remove", &body(name))?;
    Ok(())
}

/// Fresh mount, remount and last unmount against the same work by hand,
/// quiet and with a busy disk; fresh mounts at 100 GiB and 2 TiB.
pub fn mount(o: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    const G: &str = "mount";
    let dir = scratch(o, G)?;
    let hand_dir = dir.join("hand");
    std::fs::create_dir_all(&hand_dir)?;
    let paths = PluginPaths::under(&dir);
    let _plugin = proc::start_plugin(&o.plugin, &paths)?;
    let mut conn = Conn::open(&paths.socket)?;
    // 40 rounds: on a shared host one op in ten takes several times the
    // median, and 15 rounds let that move a median by 30%.
    let rounds = o.reps(3, 40);
    for cond in ["quiet", "busy"] {
        let writer = if cond == "busy" {
            Some(BusyWriter::start(dir.join("busy.dat"))?)
        } else {
            None
        };
        let (mut hand, mut ours) = (Cycle::default(), Cycle::default());
        for i in 0..rounds {
            // Interleaved, so both see the same machine; alternate who goes first.
            if i % 2 == 0 {
                hand_cycle(&hand_dir, i, "1G", &mut hand)?;
                plugin_cycle(&mut conn, &format!("m{cond}{i}"), "1gb", &mut ours)?;
            } else {
                plugin_cycle(&mut conn, &format!("m{cond}{i}"), "1gb", &mut ours)?;
                hand_cycle(&hand_dir, i, "1G", &mut hand)?;
            }
        }
        let fsyncs = writer.map(BusyWriter::finish);
        println!(
            " 1 GiB thin ext4, {cond}{}:",
            fsyncs.map_or(String::new(), |f| format!(" (writer: {f:.0} fsyncs/s)"))
        );
        if let Some(f) = fsyncs {
            rep.info(G, "busy writer fsyncs/s", f, "/s", json!({}));
        }
        rep.ratio(
            G,
            &format!("fresh mount 1GiB, {cond}"),
            Stats::of(&hand.fresh),
            Stats::of(&ours.fresh),
            Some(1.10),
        );
        rep.ratio(
            G,
            &format!("create+fresh mount 1GiB, {cond}"),
            Stats::of(&hand.create_fresh),
            Stats::of(&ours.create_fresh),
            None,
        );
        rep.ratio(
            G,
            &format!("remount, {cond}"),
            Stats::of(&hand.remount),
            Stats::of(&ours.remount),
            Some(1.05),
        );
        rep.ratio(
            G,
            &format!("last unmount, {cond}"),
            Stats::of(&hand.last_unmount),
            Stats::of(&ours.last_unmount),
            Some(1.10),
        );
    }
    for (size, hsize) in [("100gb", "100G"), ("2tb", "2T")] {
        let (mut hand, mut ours) = (Cycle::default(), Cycle::default());
        for i in 0..o.reps(1, 3) {
            hand_cycle(&hand_dir, 100 + i, hsize, &mut hand)?;
            plugin_cycle(&mut conn, &format!("big{size}{i}"), size, &mut ours)?;
        }
        rep.ratio(
            G,
            &format!("fresh mount {size} thin"),
            Stats::of(&hand.fresh),
            Stats::of(&ours.fresh),
            None,
        );
        rep.target(
            G,
            &format!("create+fresh mount {size} thin, median"),
            Stats::of(&ours.create_fresh).median,
            "ms",
            1000.0,
            json!({"note": "a thin volume must not take seconds"}),
        );
    }
    drop(conn);
    drop(_plugin);
    cleanup(&dir)
}

// ----- create ------------------------------------------------------------------------

/// Create of thin volumes of several sizes: median < 5 ms, p99 < 20 ms.
pub fn create(o: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    const G: &str = "create";
    let dir = scratch(o, G)?;
    let paths = PluginPaths::under(&dir);
    let _plugin = proc::start_plugin(&o.plugin, &paths)?;
    let mut conn = Conn::open(&paths.socket)?;
    let n = o.reps(30, 200);
    for size in ["1gb", "100gb", "2tb"] {
        let mut t = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("c{size}{i}");
            t.push(conn.timed("VolumeDriver.Create", &create_body(&name, size))?);
            conn.ok("VolumeDriver.Remove", &body(&name))?;
        }
        rep.stats(G, &format!("Create {size} thin"), Stats::of(&t), Some(5.0), Some(20.0));
    }
    drop(conn);
    drop(_plugin);
    cleanup(&dir)
}

// ----- control, memory, start-up, scaling ---------------------------------------------

/// Volumes the 8 parallel mount/unmount cycles use.
const CYCLERS: usize = 8;

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Control calls, memory, start-up and scaling at each volume count.
pub fn control(o: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    const G: &str = "control";
    let dir = scratch(o, G)?;
    let paths = PluginPaths::under(&dir);
    let mut plugin = proc::start_plugin(&o.plugin, &paths)?;
    // Real volumes for the parallel cycles and the first mount after a
    // restart, formatted once so their later mounts are remounts.
    {
        let mut c = Conn::open(&paths.socket)?;
        for k in 0..=CYCLERS {
            let name = format!("cyc{k}");
            c.ok("VolumeDriver.Create", &create_body(&name, "1gb"))?;
            c.ok("VolumeDriver.Mount", &mount_body(&name, &mount_id("f", k)))?;
            c.ok("VolumeDriver.Unmount", &mount_body(&name, &mount_id("f", k)))?;
        }
    }
    let probe = format!("cyc{CYCLERS}");
    let agent_sock = dir.join("agent.sock");
    let cfg = proc::agent_config(&dir, &paths.datastore, &agent_sock)?;
    let mut have = 0usize;
    let mut scaling = Vec::new();
    let mut idle_rss = Vec::new();
    for &count in &o.counts {
        println!(" -- {count} volumes --");
        let n = count.saturating_sub(CYCLERS + 1);
        if n > have {
            let t = proc::populate(&paths.datastore, "v", have, n)?;
            rep.info(
                G,
                &format!(
                    "[{count}] populate {} volumes (testkit, no fsync), per volume",
                    n - have
                ),
                t.as_secs_f64() * 1e6 / (n - have) as f64,
                "us",
                json!({}),
            );
            have = n;
        }
        let big = count >= 10_000;
        let at10k = count == 10_000;

        // Start-up: restart → socket served, then the first Mount.
        let (mut served, mut first, mut steady) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..o.reps(1, 3) {
            plugin.stop();
            plugin = proc::start_plugin(&o.plugin, &paths)?;
            served.push(plugin.served_after);
            let mut c = Conn::open(&paths.socket)?;
            let id = mount_id("restart", r);
            first.push(c.timed("VolumeDriver.Mount", &mount_body(&probe, &id))?);
            c.ok("VolumeDriver.Unmount", &mount_body(&probe, &id))?;
            steady.push(c.timed("VolumeDriver.Mount", &mount_body(&probe, &id))?);
            c.ok("VolumeDriver.Unmount", &mount_body(&probe, &id))?;
        }
        let s = Stats::of(&served);
        rep.target(
            G,
            &format!("[{count}] restart -> socket served, median"),
            s.median,
            "ms",
            20.0,
            json!({"max": s.max}),
        );
        let (f, st) = (Stats::of(&first), Stats::of(&steady));
        rep.info(
            G,
            &format!("[{count}] first Mount after restart, median"),
            f.median,
            "ms",
            json!({"max": f.max}),
        );
        let wait = f.median - st.median;
        if count <= 10_000 {
            rep.target(
                G,
                &format!("[{count}] first Mount waits for recovery (first - steady remount)"),
                wait,
                "ms",
                100.0,
                json!({"steady_median_ms": st.median}),
            );
        } else {
            rep.info(
                G,
                &format!("[{count}] first Mount waits for recovery"),
                wait,
                "ms",
                json!({}),
            );
        }

        // Memory: idle, then after 100 Lists (fewer above 10,000).
        std::thread::sleep(Duration::from_millis(300));
        let (rss, hwm) = plugin.rss_kib()?;
        idle_rss.push((count, rss));
        let detail = json!({"hwm_mib": mib(hwm)});
        if count <= 10_000 {
            rep.target(G, &format!("[{count}] plugin RSS idle"), mib(rss), "MiB", 15.0, detail);
        } else {
            rep.info(G, &format!("[{count}] plugin RSS idle"), mib(rss), "MiB", detail);
        }
        let mut c = Conn::open(&paths.socket)?;
        let k = o.reps(300, 3000);
        let (mut get, mut path, mut caps) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..k {
            let name = format!("v{:06}", i % n.max(1));
            get.push(c.timed("VolumeDriver.Get", &body(&name))?);
            path.push(c.timed("VolumeDriver.Path", &body(&name))?);
            caps.push(c.timed("VolumeDriver.Capabilities", "{}")?);
        }
        let lists = if count <= 10_000 { 100 } else { o.reps(3, 10) };
        let mut list = Vec::new();
        for _ in 0..lists {
            list.push(c.timed("VolumeDriver.List", "{}")?);
        }
        let (rss2, hwm2) = plugin.rss_kib()?;
        let detail = json!({"hwm_mib": mib(hwm2), "lists": lists});
        if count <= 10_000 {
            rep.target(
                G,
                &format!("[{count}] plugin RSS after 100 Lists"),
                mib(rss2),
                "MiB",
                20.0,
                detail,
            );
        } else {
            rep.info(
                G,
                &format!("[{count}] plugin RSS after {lists} Lists"),
                mib(rss2),
                "MiB",
                detail,
            );
        }
        let (gq, lq) = (Stats::of(&get), Stats::of(&list));
        rep.stats(G, &format!("[{count}] quiet Get"), gq, None, None);
        rep.stats(G, &format!("[{count}] quiet Path"), Stats::of(&path), None, None);
        rep.stats(
            G,
            &format!("[{count}] quiet Capabilities"),
            Stats::of(&caps),
            None,
            None,
        );
        rep.stats(G, &format!("[{count}] quiet List"), lq, None, None);

        // Scaling: Create through the plugin at this count.
        let mut creates = Vec::new();
        for i in 0..o.reps(10, 30) {
            let name = format!("s{count}x{i}");
            creates.push(c.timed("VolumeDriver.Create", &create_body(&name, "1gb"))?);
            c.ok("VolumeDriver.Remove", &body(&name))?;
        }
        let cs = Stats::of(&creates);
        rep.stats(G, &format!("[{count}] Create 1gb"), cs, Some(5.0), Some(20.0));

        // Under load: 8 mount/unmount cycles in parallel.
        let (g, p, cp, l, cycles) = under_load(
            &paths,
            &mut c,
            n,
            o.reps(300, 3000),
            if big { o.reps(3, 10) } else { 20 },
        )?;
        let limit = |t: f64| if big { Some(t) } else { None };
        rep.info(
            G,
            &format!("[{count}] mount/unmount cycles done meanwhile"),
            cycles as f64,
            "",
            json!({}),
        );
        rep.stats(G, &format!("[{count}] loaded Get"), Stats::of(&g), None, limit(1.0));
        rep.stats(G, &format!("[{count}] loaded Path"), Stats::of(&p), None, limit(1.0));
        rep.stats(
            G,
            &format!("[{count}] loaded Capabilities"),
            Stats::of(&cp),
            None,
            limit(1.0),
        );
        let ls = Stats::of(&l);
        let list_max = match count {
            10_000 => Some(20.0),
            100_000 => Some(200.0),
            _ => None,
        };
        rep.stats(G, &format!("[{count}] loaded List"), ls, list_max, None);

        // The admin CLI, as an administrator runs it on this host: the
        // plugin serving these datastores answers it from its catalog (its
        // socket is the bench's, given as --plugin-socket where a real host
        // uses the default). And reading every file itself (--direct).
        let mut ls_t = Vec::new();
        let mut direct_t = Vec::new();
        for _ in 0..o.reps(1, 3) {
            for direct in [false, true] {
                let t = Instant::now();
                let mut cmd = std::process::Command::new(&o.agent);
                cmd.arg("--config")
                    .arg(&cfg)
                    .arg("ls")
                    .arg("--plugin-socket")
                    .arg(&paths.socket);
                if direct {
                    cmd.arg("--direct");
                }
                let out = cmd.output()?;
                let took = t.elapsed();
                anyhow::ensure!(
                    out.status.success(),
                    "vmdk-agent ls: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let lines = out.stdout.iter().filter(|b| **b == b'\n').count();
                anyhow::ensure!(
                    lines >= count,
                    "vmdk-agent ls printed {lines} lines for {count} volumes"
                );
                if direct {
                    direct_t.push(took)
                } else {
                    ls_t.push(took)
                }
            }
        }
        let lss = Stats::of(&ls_t);
        if at10k {
            rep.target(
                G,
                &format!("[{count}] `vmdk-agent ls`, median"),
                lss.median,
                "ms",
                500.0,
                json!({"n": lss.n}),
            );
        } else {
            rep.info(
                G,
                &format!("[{count}] `vmdk-agent ls`, median"),
                lss.median,
                "ms",
                json!({"n": lss.n}),
            );
        }
        let ds = Stats::of(&direct_t);
        rep.info(
            G,
            &format!("[{count}] `vmdk-agent ls --direct` (reads every file), median"),
            ds.median,
            "ms",
            json!({"n": ds.n}),
        );

        // The agent as a service: RSS idle and after Lists over its API.
        {
            let agent = proc::start_agent(&o.agent, &cfg, &agent_sock, &dir.join("agent.log"))?;
            let mut ac = Conn::open(&agent_sock)?;
            std::thread::sleep(Duration::from_millis(300));
            let (a_idle, _) = agent.rss_kib()?;
            let mut al = Vec::new();
            for _ in 0..if big { o.reps(2, 5) } else { 20 } {
                let t = Instant::now();
                let (s, b) = ac.request("GET", "/v1/volumes", "VM-Id: bench-vm\r\n", None)?;
                al.push(t.elapsed());
                anyhow::ensure!(s == 200, "agent GET /v1/volumes: {s} {b}");
            }
            let (a_rss, a_hwm) = agent.rss_kib()?;
            rep.info(G, &format!("[{count}] agent RSS idle"), mib(a_idle), "MiB", json!({}));
            let d = json!({"hwm_mib": mib(a_hwm), "lists": al.len()});
            if count <= 10_000 {
                rep.target(
                    G,
                    &format!("[{count}] agent RSS after Lists"),
                    mib(a_rss),
                    "MiB",
                    30.0,
                    d,
                );
            } else {
                rep.info(G, &format!("[{count}] agent RSS after Lists"), mib(a_rss), "MiB", d);
            }
            rep.stats(
                G,
                &format!("[{count}] agent API GET /v1/volumes"),
                Stats::of(&al),
                None,
                None,
            );
        }
        scaling.push((count, cs.median, gq.median, lq.median));
    }
    plugin.stop();

    // Bytes per volume, from the idle RSS at the smallest and largest counts.
    if let (Some(&(c0, r0)), Some(&(c1, r1))) = (idle_rss.first(), idle_rss.last()) {
        if c1 > c0 {
            rep.info(
                G,
                &format!("plugin idle RSS per volume ({c0} -> {c1})"),
                (r1 as f64 - r0 as f64) * 1024.0 / (c1 - c0) as f64,
                "B",
                json!({}),
            );
        }
    }
    println!(" scaling (medians, ms):");
    println!(
        "   {:>8} {:>10} {:>10} {:>10} {:>14}",
        "volumes", "Create", "Get", "List", "List us/volume"
    );
    for (count, c, g, l) in &scaling {
        println!(
            "   {count:>8} {c:>10.3} {g:>10.3} {l:>10.3} {:>14.3}",
            l * 1e3 / *count as f64
        );
    }
    for w in scaling.windows(2) {
        let ((c0, cr0, g0, l0), (c1, cr1, g1, l1)) = (w[0], w[1]);
        let grow = c1 as f64 / c0 as f64;
        // Linear means List grows by at most the count's factor; allow 1.5x
        // for noise. Per-call costs (Create, Get) stay within 3x.
        rep.check(
            G,
            &format!("List grows at most linearly {c0} -> {c1}"),
            l1 / l0 <= grow * 1.5,
            json!({"list_factor": l1 / l0, "count_factor": grow}),
        );
        rep.check(
            G,
            &format!("Get stays flat {c0} -> {c1}"),
            g1 / g0 <= 3.0,
            json!({"factor": g1 / g0}),
        );
        rep.check(
            G,
            &format!("Create stays flat {c0} -> {c1}"),
            cr1 / cr0 <= 3.0,
            json!({"factor": cr1 / cr0}),
        );
    }
    cleanup(&dir)
}

type Loaded = (Vec<Duration>, Vec<Duration>, Vec<Duration>, Vec<Duration>, u64);

/// Get, Path, Capabilities (`k` each) and List (`lists`) on `c` while 8
/// threads mount and unmount their own volumes.
fn under_load(paths: &PluginPaths, c: &mut Conn, n: usize, k: usize, lists: usize) -> anyhow::Result<Loaded> {
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..CYCLERS {
        let (stop, cycles, sock) = (stop.clone(), cycles.clone(), paths.socket.clone());
        threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut c = Conn::open(&sock)?;
            let name = format!("cyc{t}");
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = mount_id("load", i);
                c.ok("VolumeDriver.Mount", &mount_body(&name, &id))?;
                c.ok("VolumeDriver.Unmount", &mount_body(&name, &id))?;
                cycles.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok(())
        }));
    }
    // Let the cycles get going.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cycles.load(Ordering::Relaxed) < CYCLERS as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = (|| -> anyhow::Result<Loaded> {
        let (mut g, mut p, mut cp, mut l) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..k {
            let name = format!("v{:06}", (i * 7919) % n.max(1));
            g.push(c.timed("VolumeDriver.Get", &body(&name))?);
            p.push(c.timed("VolumeDriver.Path", &body(&name))?);
            cp.push(c.timed("VolumeDriver.Capabilities", "{}")?);
            if i % (k / lists.max(1)).max(1) == 0 && l.len() < lists {
                l.push(c.timed("VolumeDriver.List", "{}")?);
            }
        }
        while l.len() < lists {
            l.push(c.timed("VolumeDriver.List", "{}")?);
        }
        Ok((g, p, cp, l, 0))
    })();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("a cycle thread panicked"))??;
    }
    let mut r = r?;
    r.4 = cycles.load(Ordering::Relaxed);
    Ok(r)
}

// ----- concurrency -------------------------------------------------------------------

/// 8 concurrent fresh mounts against the same 8 in sequence; 64 concurrent
/// full lifecycles.
pub fn concurrency(o: &Opts, rep: &mut Report) -> anyhow::Result<()> {
    const G: &str = "concurrency";
    let dir = scratch(o, G)?;
    let paths = PluginPaths::under(&dir);
    let _plugin = proc::start_plugin(&o.plugin, &paths)?;
    let mut c = Conn::open(&paths.socket)?;
    let (mut seq, mut par) = (Vec::new(), Vec::new());
    for r in 0..o.reps(1, 3) {
        for mode in ["seq", "par"] {
            let names: Vec<String> = (0..8).map(|i| format!("{mode}{r}x{i}")).collect();
            for n in &names {
                c.ok("VolumeDriver.Create", &create_body(n, "1gb"))?;
            }
            let t = Instant::now();
            if mode == "seq" {
                for n in &names {
                    c.ok("VolumeDriver.Mount", &mount_body(n, &mount_id(n, 0)))?;
                }
                seq.push(t.elapsed());
            } else {
                let hs: Vec<_> = names
                    .iter()
                    .map(|n| {
                        let (n, s) = (n.clone(), paths.socket.clone());
                        std::thread::spawn(move || -> anyhow::Result<()> {
                            Conn::open(&s)?.ok("VolumeDriver.Mount", &mount_body(&n, &mount_id(&n, 0)))?;
                            Ok(())
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().map_err(|_| anyhow::anyhow!("mount thread panicked"))??;
                }
                par.push(t.elapsed());
            }
            for n in &names {
                c.ok("VolumeDriver.Unmount", &mount_body(n, &mount_id(n, 0)))?;
                c.ok("VolumeDriver.Remove", &body(n))?;
            }
        }
    }
    rep.ratio_of(
        G,
        "8 fresh mounts",
        ("in sequence", "concurrent"),
        Stats::of(&seq),
        Stats::of(&par),
        Some(0.6),
    );

    let t = Instant::now();
    let hs: Vec<_> = (0..64)
        .map(|i| {
            let (s, mp) = (paths.socket.clone(), paths.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut c = Conn::open(&s)?;
                let n = format!("life{i}");
                let id = mount_id(&n, 0);
                c.ok("VolumeDriver.Create", &create_body(&n, "1gb"))?;
                c.ok("VolumeDriver.Mount", &mount_body(&n, &id))?;
                std::fs::write(mp.mountpoint(&n).join("data/hello"), n.as_bytes())?;
                c.ok("VolumeDriver.Unmount", &mount_body(&n, &id))?;
                c.ok("VolumeDriver.Remove", &body(&n))?;
                Ok(())
            })
        })
        .collect();
    let mut errors = Vec::new();
    for h in hs {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push("panicked".into()),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    rep.check(
        G,
        "64 concurrent lifecycles (create, mount, write, unmount, remove) all succeed",
        errors.is_empty(),
        json!({"seconds": secs, "errors": errors}),
    );
    rep.info(G, "64 concurrent lifecycles, wall time", secs * 1e3, "ms", json!({}));
    drop(c);
    drop(_plugin);
    cleanup(&dir)
}
