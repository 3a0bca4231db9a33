//! End-to-end scenarios against the real Docker Engine (issue 4).
//!
//! Each test drives `docker`/`docker-compose` the way a user would, through
//! `vmdk-plugin` on `/run/docker/plugins/vmdk.sock`, and checks what a user
//! would check: file contents, checksums, owners, image digests, database
//! rows, and that `losetup` and `/proc/self/mountinfo` show nothing left
//! behind. The harness (`common/docker.rs`) serializes the scenarios, holds
//! the cross-binary Docker lock, and cleans up after failures.
//!
//! Needs root, a running Docker Engine (the tests fail, not skip, without
//! one), `docker-compose`, and the Debian packages named in `tests/run.sh`.

#[path = "common/docker.rs"]
mod docker;

use std::fs;

use docker::*;

/// Options of vsanvol3, the log volume: the seed's
/// `-o vsan-policy-name=SW=2` (a VSAN policy with stripe width 2, created
/// with `vmdk-agent policy create` on the VSAN test datastore).
const VSANVOL3_OPTS: &[&str] = &["size=1gb", "vsan-policy-name=SW=2"];

fn mount_line<'a>(proc_mounts: &'a str, target: &str) -> &'a str {
    proc_mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(target))
        .unwrap_or_else(|| panic!("no mount at {target} in:\n{proc_mounts}"))
}

/// Scenario 1: the volume CLI, named and anonymous volumes via `docker run`.
#[test]
fn volume_cli() {
    let mut h = Harness::new("volume-cli");
    let busybox = image("busybox");

    // create, ls, inspect, rm
    assert_eq!(h.create_volume("vsanvol1", &["size=50gb"]), "vsanvol1");
    assert!(
        volume_ls().contains(&(driver().to_owned(), "vsanvol1".to_owned())),
        "docker volume ls: {:?}",
        volume_ls()
    );
    assert!(h.descriptor("vsanvol1").is_file(), "no disk in the datastore");
    let v = inspect_volume("vsanvol1");
    assert_eq!(v["Name"], "vsanvol1");
    assert_eq!(v["Driver"], driver());
    assert_eq!(v["Scope"], "global");
    assert_eq!(
        v["Mountpoint"],
        h.mount_root.join("vsanvol1@local/data").display().to_string()
    );
    let st = &v["Status"];
    assert_eq!(st["capacity"]["size"], "50GB", "{v:#}");
    assert_eq!(st["datastore"], DATASTORE, "{v:#}");
    assert_eq!(st["diskformat"], "thin", "{v:#}");
    assert_eq!(st["fstype"], "ext4", "{v:#}");
    assert_eq!(st["access"], "read-write", "{v:#}");
    assert_eq!(st["status"], "detached", "{v:#}");
    assert_eq!(st["created by VM"], VM_ID, "{v:#}");
    assert_eq!(docker_ok(&["volume", "rm", "vsanvol1"]).trim(), "vsanvol1");
    assert!(!volume_ls().iter().any(|(_, n)| n == "vsanvol1"));
    let gone = docker_fails(&["volume", "inspect", "vsanvol1"]);
    assert!(gone.stderr.contains("no such volume"), "{gone}");
    assert!(!h.descriptor("vsanvol1").exists() && !h.flat_file("vsanvol1").exists());

    // `docker run -v NAME:/p --volume-driver=vmdk` with a name Docker has
    // not seen creates the volume; --rm keeps named volumes.
    h.track_volume("e2e-fresh");
    let out = run_container(&[
        "--rm",
        "-v",
        "e2e-fresh:/p",
        &format!("--volume-driver={}", driver()),
        &busybox,
        "sh",
        "-c",
        "echo hello > /p/hello && cat /proc/mounts",
    ]);
    let line = mount_line(&out, "/p");
    assert!(line.starts_with("/dev/loop") && line.contains(" ext4 "), "{line}");
    let v = inspect_volume("e2e-fresh");
    assert_eq!(v["Driver"], driver());
    assert_eq!(v["Status"]["capacity"]["size"], "100MB", "default size: {v:#}");
    h.wait_released("e2e-fresh");
    let back = run_container(&["--rm", "-v", "e2e-fresh:/q", &busybox, "cat", "/q/hello"]);
    assert_eq!(back.trim(), "hello");
    docker_ok(&["volume", "rm", "e2e-fresh"]);
    assert!(!h.descriptor("e2e-fresh").exists());

    // An anonymous volume: created by `run`, removed by --rm.
    let before = docker_ok(&["volume", "ls", "-q", "--filter", &format!("driver={}", driver())]);
    let out = run_container(&[
        "--rm",
        "-v",
        "/p",
        &format!("--volume-driver={}", driver()),
        &busybox,
        "sh",
        "-c",
        "echo x > /p/x && cat /proc/mounts",
    ]);
    let line = mount_line(&out, "/p");
    assert!(line.starts_with("/dev/loop") && line.contains(" ext4 "), "{line}");
    wait_for("the anonymous volume to be removed", WAIT, || {
        let now = docker_ok(&["volume", "ls", "-q", "--filter", &format!("driver={}", driver())]);
        let disks: Vec<_> = fs::read_dir(h.datastore.join("dockvols/_DEFAULT"))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        if now == before && disks.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "volumes {now:?} (before: {before:?}), datastore files {disks:?}"
            ))
        }
    });
    h.wait_nothing_left();
}

/// Scenario 2: data written by one container is read back by the next.
#[test]
fn persistence() {
    let mut h = Harness::new("persistence");
    let busybox = image("busybox");
    h.create_volume("e2e-persist", &["size=1gb"]);
    let sums = run_container(&[
        "--name",
        "e2e-writer",
        "-v",
        "e2e-persist:/data",
        &busybox,
        "sh",
        "-c",
        "echo 'hello from the first container' > /data/greeting.txt && \
         head -c 10485760 /dev/urandom > /data/random.bin && \
         sha256sum /data/greeting.txt /data/random.bin",
    ]);
    let written: Vec<&str> = sums.lines().collect();
    assert_eq!(written.len(), 2, "{sums}");
    docker_ok(&["rm", "e2e-writer"]);
    h.wait_released("e2e-persist");

    let out = run_container(&[
        "--rm",
        "-v",
        "e2e-persist:/again",
        &busybox,
        "sh",
        "-c",
        "cat /again/greeting.txt && wc -c < /again/random.bin && cd /again && \
         sha256sum greeting.txt random.bin",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "hello from the first container");
    assert_eq!(lines[1].trim(), "10485760");
    assert_eq!(first_word(lines[2]), first_word(written[0]), "greeting.txt checksum");
    assert_eq!(first_word(lines[3]), first_word(written[1]), "random.bin checksum");
    h.wait_nothing_left();
}

/// Scenario 3: image content and its non-root owner are copied into a
/// fresh volume mounted over it.
#[test]
fn copy_up_keeps_content_and_owner() {
    let mut h = Harness::new("copy-up");
    let busybox = image("busybox");
    let seeded = image("copyup");
    h.create_volume("e2e-copyup", &["size=1gb"]);
    let inside = run_container(&[
        "--rm",
        "-v",
        "e2e-copyup:/srv/app",
        &seeded,
        "sh",
        "-c",
        "ls -A /srv/app",
    ]);
    assert_eq!(inside.split_whitespace().collect::<Vec<_>>(), ["conf.d", "config.txt"]);
    h.wait_released("e2e-copyup");

    // The volume on its own, in an image with nothing at the mount point.
    let out = run_container(&[
        "--rm",
        "-v",
        "e2e-copyup:/check",
        &busybox,
        "sh",
        "-c",
        "stat -c '%u:%g %a %n' /check /check/config.txt /check/conf.d /check/conf.d/nested.txt && \
         cat /check/config.txt /check/conf.d/nested.txt && ls -A /check",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..4],
        [
            "1234:2345 750 /check",
            "1234:2345 640 /check/config.txt",
            "1234:2345 755 /check/conf.d",
            "1234:2345 644 /check/conf.d/nested.txt",
        ],
        "{out}"
    );
    assert_eq!(&lines[4..6], ["seeded by the image", "nested"]);
    // The filesystem's lost+found stays out of sight.
    assert_eq!(lines[6..].join(" "), "conf.d config.txt");

    // A volume with content is not copied over again.
    run_container(&[
        "--rm",
        "-v",
        "e2e-copyup:/check",
        &busybox,
        "sh",
        "-c",
        "echo changed > /check/config.txt",
    ]);
    let again = run_container(&[
        "--rm",
        "-v",
        "e2e-copyup:/srv/app",
        &seeded,
        "cat",
        "/srv/app/config.txt",
    ]);
    assert_eq!(again.trim(), "changed");
    h.wait_nothing_left();
}

/// Scenario 4: two containers share a volume; it stays mounted until both
/// stop; `docker cp` into a running container works.
#[test]
fn sharing_on_one_vm() {
    let mut h = Harness::new("sharing");
    let busybox = image("busybox");
    h.create_volume("e2e-shared", &["size=1gb"]);
    for c in ["e2e-share-a", "e2e-share-b"] {
        run_container(&[
            "-d",
            "--name",
            c,
            "-v",
            "e2e-shared:/shared",
            &busybox,
            "sh",
            "-c",
            LOOP_CMD,
        ]);
    }
    exec_sh("e2e-share-a", "echo from-a > /shared/a.txt");
    assert_eq!(exec_sh("e2e-share-b", "cat /shared/a.txt").trim(), "from-a");
    h.assert_mounted_once("e2e-shared");
    let st = &inspect_volume("e2e-shared")["Status"];
    assert_eq!(st["status"], "attached");
    assert_eq!(st["attached to VM"], VM_ID);
    assert_eq!(st["mounts"], 2, "two containers hold it: {st:#}");

    // docker cp into a running container lands on the shared volume.
    let src = h.dir.join("copied.txt");
    fs::write(&src, "copied in with docker cp\n").unwrap();
    docker_ok(&["cp", &src.display().to_string(), "e2e-share-b:/shared/copied.txt"]);
    assert_eq!(
        exec_sh("e2e-share-a", "cat /shared/copied.txt").trim(),
        "copied in with docker cp"
    );

    docker_ok(&["stop", "e2e-share-a"]);
    h.assert_mounted_once("e2e-shared");
    exec_sh("e2e-share-b", "echo from-b > /shared/b.txt && cat /shared/a.txt");
    assert_eq!(inspect_volume("e2e-shared")["Status"]["mounts"], 1);

    docker_ok(&["stop", "e2e-share-b"]);
    h.wait_released("e2e-shared");
    docker_ok(&["rm", "e2e-share-a", "e2e-share-b"]);
    let all = run_container(&[
        "--rm",
        "-v",
        "e2e-shared:/s",
        &busybox,
        "sh",
        "-c",
        "cat /s/a.txt /s/copied.txt /s/b.txt",
    ]);
    assert_eq!(all, "from-a\ncopied in with docker cp\nfrom-b\n");
    h.wait_nothing_left();
}

/// Scenario 5: a read-only volume refuses writes with the kernel's EROFS.
#[test]
fn read_only_volume() {
    let mut h = Harness::new("read-only");
    let busybox = image("busybox");
    h.create_volume("e2e-ro", &["size=1gb", "access=read-only"]);
    assert_eq!(inspect_volume("e2e-ro")["Status"]["access"], "read-only");
    let out = try_run_container(&[
        "--rm",
        "-v",
        "e2e-ro:/ro",
        &busybox,
        "sh",
        "-c",
        "grep ' /ro ' /proc/mounts; ls -A /ro; echo listed; touch /ro/file",
    ]);
    assert!(!out.success(), "a write to a read-only volume succeeded:\n{out}");
    let line = mount_line(&out.stdout, "/ro");
    assert!(
        line.split_whitespace().nth(3).unwrap().split(',').any(|o| o == "ro"),
        "{line}"
    );
    assert!(out.stdout.contains("listed"), "reading should work:\n{out}");
    // strerror(EROFS), as the kernel reported it to touch.
    assert!(
        out.stderr.contains("touch: /ro/file: Read-only file system"),
        "expected EROFS:\n{out}"
    );
    h.wait_nothing_left();
}

/// Scenario 6: SIGKILL the plugin while containers use volumes, restart it.
#[test]
fn plugin_restart_keeps_running_containers() {
    let mut h = Harness::new("plugin-restart");
    let busybox = image("busybox");
    h.create_volume("e2e-restart-a", &["size=1gb"]);
    h.create_volume("e2e-restart-b", &["size=1gb"]);
    let containers = [
        ("e2e-rs-a1", "e2e-restart-a"),
        ("e2e-rs-a2", "e2e-restart-a"),
        ("e2e-rs-b", "e2e-restart-b"),
    ];
    for (c, v) in containers {
        run_container(&[
            "-d",
            "--name",
            c,
            "-v",
            &format!("{v}:/data"),
            &busybox,
            "sh",
            "-c",
            LOOP_CMD,
        ]);
    }
    let sum_a = exec_sh(
        "e2e-rs-a1",
        "head -c 1048576 /dev/urandom > /data/blob && sha256sum /data/blob",
    );
    exec_sh("e2e-rs-b", "echo before-kill > /data/note");

    h.kill_plugin();
    // The kernel keeps the filesystems mounted; the containers go on.
    h.assert_mounted_once("e2e-restart-a");
    h.assert_mounted_once("e2e-restart-b");
    assert_eq!(exec_sh("e2e-rs-a2", "sha256sum /data/blob"), sum_a);
    // While the plugin is down Docker lists the names it knows (after its
    // ~15 s of retries).
    let names: Vec<String> = volume_ls().into_iter().map(|(_, n)| n).collect();
    assert!(
        names.contains(&"e2e-restart-a".to_owned()) && names.contains(&"e2e-restart-b".to_owned()),
        "{names:?}"
    );

    // Straight after the restart, while recovery may still run.
    h.start_plugin_no_wait(None);
    assert!(volume_ls().contains(&(driver().to_owned(), "e2e-restart-a".to_owned())));
    assert_eq!(inspect_volume("e2e-restart-b")["Driver"], driver());
    h.wait_plugin_recovered();

    h.assert_mounted_once("e2e-restart-a");
    h.assert_mounted_once("e2e-restart-b");
    assert_eq!(exec_sh("e2e-rs-a1", "sha256sum /data/blob"), sum_a);
    assert_eq!(
        exec_sh("e2e-rs-b", "cat /data/note && echo after-restart >> /data/note"),
        "before-kill\n"
    );
    let st = &inspect_volume("e2e-restart-a")["Status"];
    assert_eq!(st["status"], "attached", "{st:#}");
    assert_eq!(st["mounts"], 2, "both containers' mounts survive the restart: {st:#}");

    // Stopping later still unmounts and detaches, only when the last goes.
    docker_ok(&["stop", "e2e-rs-a1"]);
    h.assert_mounted_once("e2e-restart-a");
    assert_eq!(exec_sh("e2e-rs-a2", "sha256sum /data/blob"), sum_a);
    docker_ok(&["stop", "e2e-rs-a2"]);
    h.wait_released("e2e-restart-a");
    docker_ok(&["stop", "e2e-rs-b"]);
    h.wait_released("e2e-restart-b");
    h.wait_nothing_left();
    assert_eq!(
        run_container(&["--rm", "-v", "e2e-restart-b:/d", &busybox, "cat", "/d/note"]),
        "before-kill\nafter-restart\n"
    );
    assert!(volume_ls().contains(&(driver().to_owned(), "e2e-restart-b".to_owned())));
    h.wait_nothing_left();
}

/// Scenario 7: restart the Docker daemon with a `--restart=always`
/// container using a volume.
#[test]
fn docker_daemon_restart() {
    let mut h = Harness::new("dockerd-restart");
    let busybox = image("busybox");
    h.create_volume("e2e-always", &["size=1gb"]);
    let script = format!("echo boot >> /data/boots; {LOOP_CMD}");
    run_container(&[
        "-d",
        "--name",
        "e2e-always",
        "--restart=always",
        "-v",
        "e2e-always:/data",
        &busybox,
        "sh",
        "-c",
        &script,
    ]);
    let sum = exec_sh(
        "e2e-always",
        "head -c 4194304 /dev/urandom > /data/blob && sha256sum /data/blob",
    );
    let started = docker_ok(&["inspect", "--format", "{{.State.StartedAt}}", "e2e-always"]);

    h.restart_dockerd();

    wait_for("the restart=always container to run again", WAIT, || {
        let now = docker_ok(&["inspect", "--format", "{{.State.StartedAt}}", "e2e-always"]);
        if is_running("e2e-always") && now != started {
            Ok(())
        } else {
            Err(format!("running={} started={now}", is_running("e2e-always")))
        }
    });
    assert_eq!(exec_sh("e2e-always", "sha256sum /data/blob"), sum);
    assert_eq!(exec_sh("e2e-always", "cat /data/boots"), "boot\nboot\n");
    h.assert_mounted_once("e2e-always");
    assert_eq!(inspect_volume("e2e-always")["Status"]["mounts"], 1);

    docker_ok(&["rm", "-f", "e2e-always"]);
    h.wait_released("e2e-always");
    h.wait_nothing_left();
}

const ROWS_QUERY: &str = "SELECT id || ' ' || name || ' ' || digest FROM artifacts ORDER BY id";

const PSQL: &[&str] = &[
    "psql",
    "-U",
    "postgres",
    "-X",
    "-A",
    "-t",
    "-v",
    "ON_ERROR_STOP=1",
    "-c",
];

fn psql(c: &Compose, sql: &str) -> String {
    let mut cmd = PSQL.to_vec();
    cmd.push(sql);
    c.exec("postgresql", &cmd)
}

fn wait_harbor_ready(c: &Compose, port: u16) {
    wait_for("the registry to answer /v2/", WAIT, || {
        match http_status(port, "/v2/") {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    wait_for("PostgreSQL to accept queries", WAIT, || {
        let mut args = vec!["exec", "-T", "postgresql"];
        args.extend_from_slice(PSQL);
        args.push("SELECT 1");
        let out = c.run(&args);
        if out.success() && out.stdout.trim() == "1" {
            Ok(())
        } else {
            Err(out.to_string())
        }
    });
}

/// Scenario 8: the seed's step 7, Harbor's shape on three external vmdk
/// volumes, through `down`/`up` and a simulated VM failover to another host.
#[test]
fn harbor_compose_with_failover() {
    let mut h = Harness::new("harbor");
    let busybox = image("busybox");
    let registry = image("registry");
    let postgres = image("postgres");

    h.step("images ready");
    // "Host A" runs the agent as its own process.
    h.stop_plugin();
    let host_a = h.start_agent("host-a");
    h.start_plugin(Some(&host_a));

    h.create_volume("vsanvol1", &["size=50gb"]);
    h.create_volume("vsanvol2", &["size=10gb"]);
    h.admin(&[
        "policy",
        "create",
        "--name",
        "SW=2",
        "--content",
        r#"(("stripeWidth" i2))"#,
    ]);
    h.create_volume("vsanvol3", VSANVOL3_OPTS);
    let v = inspect_volume("vsanvol3");
    assert_eq!(v["Status"]["vsan-policy-name"], "SW=2", "{v:#}");
    assert!(h.admin(&["ls", "-c", "volume,policy"]).contains("SW=2"));

    let port = free_port();
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/images/harbor/docker-compose.yml");
    let c = h.compose(
        "vmdke2eharbor",
        &file,
        &[
            ("LOG_IMAGE", busybox.clone()),
            ("REGISTRY_IMAGE", registry),
            ("POSTGRES_IMAGE", postgres),
            ("REGISTRY_PORT", port.to_string()),
        ],
    );
    h.step("volumes created");
    c.ok(&["up", "-d"]);
    wait_harbor_ready(&c, port);
    for v in ["vsanvol1", "vsanvol2", "vsanvol3"] {
        h.assert_mounted_once(v);
    }
    // Copy-up gave the database volume the image's postgres owner.
    assert_eq!(
        c.exec("postgresql", &["stat", "-c", "%U %a", "/var/lib/postgresql"])
            .trim(),
        "postgres 700"
    );

    h.step("harbor up");
    // Push two images; remember what the registry calls them.
    let nonce = h.dir.file_name().unwrap().to_string_lossy().into_owned();
    let mut pushed = Vec::new();
    for n in ["one", "two"] {
        let local = h.app_image(
            &format!("vmdk-e2e/harbor-app-{n}:{}", std::process::id()),
            &format!("image {n} {nonce}"),
        );
        let id = docker_ok(&["image", "inspect", "--format", "{{.Id}}", &local])
            .trim()
            .to_owned();
        let remote = format!("localhost:{port}/library/app-{n}:v1");
        docker_ok(&["tag", &local, &remote]);
        h.track_image(&remote);
        let out = docker_ok(&["push", &remote]);
        let digest = out
            .split_whitespace()
            .skip_while(|w| *w != "digest:")
            .nth(1)
            .unwrap_or_else(|| panic!("no digest in push output:\n{out}"))
            .to_owned();
        assert!(digest.starts_with("sha256:"), "{digest}");
        pushed.push((n, local, remote, id, digest));
    }

    h.step("images pushed");
    // Rows in PostgreSQL: the two artifacts plus a hundred more.
    psql(
        &c,
        "CREATE TABLE artifacts (id int PRIMARY KEY, name text NOT NULL, digest text NOT NULL)",
    );
    for (i, (n, _, _, _, digest)) in pushed.iter().enumerate() {
        psql(
            &c,
            &format!(
                "INSERT INTO artifacts VALUES ({}, 'library/app-{n}', '{digest}')",
                i + 1
            ),
        );
    }
    psql(
        &c,
        "INSERT INTO artifacts SELECT g, 'generated/' || g, md5(g::text) FROM generate_series(3, 102) g",
    );
    let rows = psql(&c, ROWS_QUERY);
    assert_eq!(rows.lines().count(), 102);
    c.exec("log", &["sh", "-c", "echo 'job 1 finished' >> /var/log/jobs/jobs.log"]);

    h.step("rows written");
    // down and up again: containers go, volumes stay (external).
    c.ok(&["down"]);
    h.wait_nothing_left();
    for v in ["vsanvol1", "vsanvol2", "vsanvol3"] {
        assert_eq!(inspect_volume(v)["Status"]["status"], "detached");
    }
    c.ok(&["up", "-d"]);
    wait_harbor_ready(&c, port);
    assert_eq!(psql(&c, ROWS_QUERY), rows);

    h.step("down and up again");
    // Failover: host A and the plugin die with the VM, the containers die.
    let ids = c.ok(&["ps", "-q"]);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    h.kill_plugin();
    h.kill_agent();
    // Docker cannot reach the plugin to unmount: the kills wait out
    // Docker's ~15 s of retries (in parallel).
    let mut kill = vec!["kill"];
    kill.extend(&ids);
    docker_ok(&kill);
    for id in &ids {
        assert!(!is_running(id), "container {id} still runs after kill");
    }
    h.step("killed plugin, agent and containers");
    // The VM comes up against host B, on the same datastore, same VM id.
    let host_b = h.start_agent("host-b");
    h.start_plugin(Some(&host_b));
    // No container runs: recovery released every volume.
    h.wait_nothing_left();
    for v in ["vsanvol1", "vsanvol2", "vsanvol3"] {
        assert_eq!(inspect_volume(v)["Status"]["status"], "detached", "{v}");
    }
    // Docker starts the containers again.
    c.ok(&["up", "-d"]);
    wait_harbor_ready(&c, port);
    let mounts = h.mounts();
    assert_eq!(mounts.len(), 3, "exactly the three volumes are mounted: {mounts:#?}");
    assert_eq!(h.loops().len(), 3, "exactly three disks attached: {:?}", h.loops());
    for v in ["vsanvol1", "vsanvol2", "vsanvol3"] {
        h.assert_mounted_once(v);
        assert_eq!(inspect_volume(v)["Status"]["attached to VM"], VM_ID);
    }

    h.step("up again after failover");
    // Pull both images back by digest: the same images.
    for (_, local, remote, _, _) in &pushed {
        docker_ok(&["rmi", remote, local]);
    }
    for (n, _, remote, id, digest) in &pushed {
        let repo = remote.rsplit_once(':').unwrap().0;
        let by_digest = format!("{repo}@{digest}");
        docker_ok(&["pull", &by_digest]);
        h.track_image(&by_digest);
        let pulled = docker_ok(&["image", "inspect", "--format", "{{.Id}}", &by_digest]);
        assert_eq!(
            pulled.trim(),
            id,
            "image {n} pulled by digest differs from the one pushed"
        );
        let marker = run_container(&["--rm", &by_digest]);
        assert_eq!(marker.trim(), format!("image {n} {nonce}"));
    }
    // The rows, and the log volume's history of three starts and one job.
    assert_eq!(psql(&c, ROWS_QUERY), rows);
    let log = c.exec("log", &["cat", "/var/log/jobs/jobs.log"]);
    assert_eq!(log.matches("log service started").count(), 3, "{log}");
    assert_eq!(log.matches("job 1 finished").count(), 1, "{log}");

    h.step("data checked");
    c.ok(&["down"]);
    h.wait_nothing_left();
    for v in ["vsanvol1", "vsanvol2", "vsanvol3"] {
        docker_ok(&["volume", "rm", v]);
        assert!(!h.descriptor(v).exists(), "{v} still on the datastore");
    }
}

/// Scenario 8, last part: `docker-compose down -v` removes the vmdk
/// volumes a project owns.
#[test]
fn compose_down_v_removes_project_volumes() {
    let mut h = Harness::new("compose-owned");
    let busybox = image("busybox");
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/images/owned-volume/docker-compose.yml");
    let c = h.compose(
        "vmdke2eowned",
        &file,
        &[("BUSYBOX_IMAGE", busybox), ("VOLUME_DRIVER", driver().to_owned())],
    );
    let vol = "vmdke2eowned_scratch";
    h.track_volume(vol);
    c.ok(&["up", "-d"]);
    let v = inspect_volume(vol);
    assert_eq!(v["Driver"], driver());
    assert_eq!(v["Status"]["capacity"]["size"], "1GB", "{v:#}");
    assert_eq!(v["Labels"]["com.docker.compose.project"], "vmdke2eowned", "{v:#}");
    c.exec("app", &["sh", "-c", "echo scratch > /scratch/file"]);
    h.assert_mounted_once(vol);

    c.ok(&["down", "-v"]);
    h.wait_nothing_left();
    assert!(!volume_ls().iter().any(|(_, n)| n == vol), "{:?}", volume_ls());
    assert!(
        !h.descriptor(vol).exists() && !h.flat_file(vol).exists(),
        "the disk is still on the datastore"
    );
    let gone = docker_fails(&["volume", "inspect", vol]);
    assert!(gone.stderr.contains("no such volume"), "{gone}");
}

/// `vol@datastore` names through Docker, the original's way to pick a
/// datastore: a volume on the second datastore (`nfs1`) lives in that
/// directory, is listed, inspected, mounted and removed by its long name,
/// and is a different disk from the same short name on the default one.
#[test]
fn volumes_on_a_second_datastore() {
    let mut h = Harness::new("second-ds");
    let busybox = image("busybox");
    let long = format!("logs@{PLAIN_DATASTORE}");
    assert_eq!(h.create_volume(&long, &["size=200mb"]), long);
    assert_eq!(h.create_volume("logs", &[]), "logs");
    let nfs_disk = h.plain_datastore.join("dockvols/_DEFAULT/logs.vmdk");
    assert!(nfs_disk.is_file() && h.descriptor("logs").is_file());
    let names = docker_ok(&["volume", "ls", "-q", "--filter", &format!("driver={}", driver())]);
    assert!(
        names.lines().any(|n| n == long) && names.lines().any(|n| n == "logs"),
        "{names}"
    );
    let v = inspect_volume(&long);
    assert_eq!(v["Name"], long.as_str());
    assert_eq!(v["Status"]["datastore"], PLAIN_DATASTORE, "{v:#}");
    assert_eq!(v["Status"]["capacity"]["size"], "200MB", "{v:#}");
    assert_eq!(inspect_volume("logs")["Status"]["capacity"]["size"], "100MB");

    // Mounted from its own datastore, at <mount-root>/logs@nfs1.
    run_container(&[
        "-d",
        "--name",
        "e2e-nfs-user",
        "-v",
        &format!("{long}:/p"),
        &busybox,
        "sh",
        "-c",
        LOOP_CMD,
    ]);
    exec_sh("e2e-nfs-user", "echo on-nfs1 > /p/where");
    let mounts = h.mounts();
    assert_eq!(mounts.len(), 1, "{mounts:#?}");
    assert_eq!(mounts[0].target, h.mount_root.join(&long));
    let flat = h.plain_datastore.join("dockvols/_DEFAULT/logs-flat.vmdk");
    let loops = loops_under(&h.plain_datastore);
    assert_eq!(loops.len(), 1, "{loops:?}");
    assert_eq!(
        (loops[0].0.as_str(), loops[0].1.as_str()),
        (mounts[0].source.as_str(), flat.to_str().unwrap())
    );
    run_container(&[
        "--rm",
        "-v",
        "logs:/p",
        &busybox,
        "sh",
        "-c",
        "echo on-local > /p/where",
    ]);
    docker_ok(&["rm", "-f", "e2e-nfs-user"]);
    wait_for("logs@nfs1 to be released", WAIT, || {
        let (m, l) = (h.mounts(), loops_under(&h.plain_datastore));
        if m.is_empty() && l.is_empty() {
            Ok(())
        } else {
            Err(format!("mounts {m:?}, loops {l:?}"))
        }
    });
    let back = |name: &str| run_container(&["--rm", "-v", &format!("{name}:/p"), &busybox, "cat", "/p/where"]);
    assert_eq!(back(&long).trim(), "on-nfs1");
    assert_eq!(back("logs").trim(), "on-local");

    // An unknown datastore is refused with the known ones, and nothing is made.
    let r = docker(&["volume", "create", &format!("--driver={}", driver()), "--name=x@nosuch"]);
    assert!(!r.success(), "{r}");
    assert!(
        r.stderr.contains("Invalid datastore 'nosuch'") && r.stderr.contains("Known datastores: local, nfs1"),
        "{r}"
    );
    assert!(!docker_ok(&["volume", "ls", "-q"]).lines().any(|n| n == "x@nosuch"));

    docker_ok(&["volume", "rm", &long]);
    assert!(!nfs_disk.exists() && !flat.exists());
    assert!(h.descriptor("logs").is_file(), "removing logs@nfs1 touched logs@local");
    docker_ok(&["volume", "rm", "logs"]);
    h.wait_nothing_left();
}

/// Docker mounts a fresh volume twice for a container whose image has
/// content at the mount target (copy-up, then the container), with an
/// Unmount in between. Without a grace that detaches and attaches the disk
/// again; with `--detach-grace` the container reuses the first attach, and
/// the volume is released once the grace has passed.
#[test]
fn detach_grace_spares_the_copy_up_reattach() {
    let mut h = Harness::new("detach-grace");
    let seeded = image("copyup");
    let attaches = |h: &Harness, vol: &str| {
        h.plugin_logs()
            .matches(&format!("attached volume volume={vol}@{DATASTORE} "))
            .count()
    };
    let run_seeded = |vol: &str| {
        let out = run_container(&[
            "--rm",
            "-v",
            &format!("{vol}:/srv/app"),
            &seeded,
            "ls",
            "-A",
            "/srv/app",
        ]);
        assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["conf.d", "config.txt"]);
    };

    h.create_volume("e2e-nograce", &[]);
    run_seeded("e2e-nograce");
    h.wait_released("e2e-nograce");
    assert_eq!(
        attaches(&h, "e2e-nograce"),
        2,
        "Docker's Mount/Unmount/Mount, each Mount attaching"
    );

    h.stop_plugin();
    h.plugin_args = vec!["--detach-grace".into(), "5".into()];
    h.start_plugin(None);
    h.create_volume("e2e-grace", &[]);
    run_seeded("e2e-grace");
    assert_eq!(attaches(&h, "e2e-grace"), 1, "{}", h.plugin_logs());
    // Still attached right after the container is gone, released later.
    assert_eq!(inspect_volume("e2e-grace")["Status"]["status"], "attached");
    h.wait_released("e2e-grace");
    docker_ok(&["volume", "rm", "e2e-grace", "e2e-nograce"]);
    h.wait_nothing_left();
}

/// moby's `TestExternalVolumeDriverRetryNotImmediatelyExists`, on the real
/// engine: `docker run` is issued while the plugin is down, and the plugin
/// comes up two seconds later. Docker retries, and the plugin serves its
/// socket at once (recovery runs in the background), so the run succeeds
/// and its data is on the volume.
#[test]
fn docker_run_issued_before_the_plugin_starts() {
    let mut h = Harness::new("late-plugin");
    let busybox = image("busybox");
    h.stop_plugin();
    h.track_volume("e2e-late");
    let run = std::thread::spawn({
        let busybox = busybox.clone();
        move || {
            try_run_container(&[
                "--rm",
                "-v",
                "e2e-late:/p",
                &format!("--volume-driver={}", driver()),
                &busybox,
                "sh",
                "-c",
                "echo written-while-late > /p/x && cat /p/x",
            ])
        }
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    h.start_plugin_no_wait(None);
    let out = run.join().unwrap();
    assert!(out.success(), "docker run failed though the plugin came up: {out}");
    assert_eq!(out.stdout.trim(), "written-while-late");
    h.wait_released("e2e-late");
    let back = run_container(&["--rm", "-v", "e2e-late:/q", &busybox, "cat", "/q/x"]);
    assert_eq!(back.trim(), "written-while-late");
    docker_ok(&["volume", "rm", "e2e-late"]);
    h.wait_nothing_left();
}

/// moby's `TestExternalVolumeDriverOutOfBandDelete`, on the real engine: a
/// volume removed behind this Docker's back (by another VM on the shared
/// datastore) is answered with `{"Volume": null}`, so Docker forgets it
/// instead of erroring forever, and the name can be created again.
#[test]
fn a_volume_removed_out_of_band_is_forgotten_and_can_be_created_again() {
    let mut h = Harness::new("out-of-band");
    let busybox = image("busybox");
    h.create_volume("e2e-oob", &["size=200mb"]);
    assert_eq!(inspect_volume("e2e-oob")["Status"]["capacity"]["size"], "200MB");
    // Another VM's agent removes it: sidecar first, then the disk.
    for f in ["e2e-oob.vmfd", "e2e-oob.vmdk", "e2e-oob-flat.vmdk"] {
        fs::remove_file(h.datastore.join("dockvols/_DEFAULT").join(f)).unwrap();
    }
    let gone = docker_fails(&["volume", "inspect", "e2e-oob"]);
    assert!(gone.stderr.contains("no such volume"), "{gone}");
    assert!(!volume_ls().iter().any(|(_, n)| n == "e2e-oob"), "{:?}", volume_ls());
    h.create_volume("e2e-oob", &["size=300mb"]);
    assert_eq!(inspect_volume("e2e-oob")["Status"]["capacity"]["size"], "300MB");
    let out = run_container(&[
        "--rm",
        "-v",
        "e2e-oob:/p",
        &busybox,
        "sh",
        "-c",
        "echo again > /p/x && cat /p/x",
    ]);
    assert_eq!(out.trim(), "again");
    h.wait_released("e2e-oob");
    docker_ok(&["volume", "rm", "e2e-oob"]);
    h.wait_nothing_left();
}
