#!/usr/bin/env bash
# Builds the images the Docker Engine tests (and docs/harbor-walkthrough.md)
# use, from Debian packages installed on this host: nothing is pulled.
#
#   build-image.sh busybox  TAG            busybox-static as a tiny base image
#   build-image.sh copyup   TAG            busybox + /srv/app owned by 1234:2345
#   build-image.sh app      TAG MARKER     busybox + /marker containing MARKER
#   build-image.sh registry TAG            Debian's docker-registry (distribution 2.8)
#   build-image.sh postgres TAG            Debian's postgresql (15 on Debian 12), as user postgres
#
# Each image is a root filesystem put together in a temp dir and loaded with
# `docker import`. Binaries come with the shared libraries `ldd` says they
# need, so the images run without a distribution inside.
set -euo pipefail
# Modes in the images must not depend on the caller's umask: the postgres
# image runs as a non-root user that needs to read and run everything.
umask 022

kind=${1:?usage: build-image.sh busybox|copyup|app|registry|postgres TAG [MARKER]}
tag=${2:?missing image tag}

root=$(mktemp -d /tmp/vmdk-image.XXXXXX)
trap 'rm -rf "$root"' EXIT

need() {
    command -v "$1" >/dev/null 2>&1 || [[ -e $1 ]] || {
        echo "build-image.sh: $1 is missing; install the Debian package $2" >&2
        exit 1
    }
}

# busybox-static with a symlink per applet, plus the files every image needs.
base() {
    need /bin/busybox busybox-static
    mkdir -p "$root"/{bin,sbin,etc,tmp,root,proc,sys,dev,run,var/tmp,usr/bin,usr/sbin}
    chmod 1777 "$root/tmp" "$root/var/tmp"
    cp /bin/busybox "$root/bin/busybox"
    local applet
    for applet in $(/bin/busybox --list); do
        [[ -e $root/bin/$applet ]] || ln -s busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
}

# Copies files with their directories, and the shared libraries they load.
copy_with_libs() {
    local f lib
    for f in "$@"; do
        mkdir -p "$root$(dirname "$f")"
        cp -a "$f" "$root$f"
    done
    for f in "$@"; do
        [[ -f $f && ! -L $f ]] || continue
        # ldd prints "name => /path (addr)" and "/lib64/ld-linux... (addr)".
        for lib in $(ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
            [[ -e $root$lib ]] && continue
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    done
}

import() {
    # Debian's /lib64 etc. are symlinks into /usr; mirror them so the
    # dynamic loader path in every binary resolves.
    local l
    for l in lib lib64; do
        if [[ -d $root/usr/$l && ! -e $root/$l ]]; then
            ln -s "usr/$l" "$root/$l"
        elif [[ -d $root/$l && -d $root/usr/$l ]]; then
            cp -a "$root/$l/." "$root/usr/$l/" && rm -rf "${root:?}/$l" && ln -s "usr/$l" "$root/$l"
        fi
    done
    tar --numeric-owner -C "$root" -c . | docker import "$@" - "$tag" >/dev/null
    echo "built $tag"
}

case $kind in
busybox)
    base
    import --change 'CMD ["/bin/sh"]'
    ;;
copyup)
    # Content owned by a non-root user at the mount target, like a database
    # image's data directory: Docker copies it, owner and mode included,
    # into an empty volume mounted there.
    base
    mkdir -p "$root/srv/app/conf.d"
    echo "seeded by the image" >"$root/srv/app/config.txt"
    echo "nested" >"$root/srv/app/conf.d/nested.txt"
    chown -R 1234:2345 "$root/srv/app"
    chmod 0750 "$root/srv/app"
    chmod 0640 "$root/srv/app/config.txt"
    chmod 0755 "$root/srv/app/conf.d"
    chmod 0644 "$root/srv/app/conf.d/nested.txt"
    import --change 'CMD ["/bin/sh"]'
    ;;
app)
    marker=${3:?app images need a MARKER}
    base
    printf '%s\n' "$marker" >"$root/marker"
    # Labelled so the tests can find and remove what a crashed run left.
    import --change 'CMD ["cat", "/marker"]' --change 'LABEL io.vmdk.e2e.app=1'
    ;;
registry)
    need /usr/bin/docker-registry docker-registry
    base
    copy_with_libs /usr/bin/docker-registry
    mkdir -p "$root/etc/docker/registry" "$root/storage"
    # Harbor's registry keeps its blobs in /storage; so does this one.
    cat >"$root/etc/docker/registry/config.yml" <<'EOF'
version: 0.1
log:
  level: info
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: /storage
  delete:
    enabled: true
http:
  addr: :5000
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
EOF
    import --change 'EXPOSE 5000' \
        --change 'ENTRYPOINT ["/usr/bin/docker-registry"]' \
        --change 'CMD ["serve", "/etc/docker/registry/config.yml"]'
    ;;
postgres)
    # The newest server installed (Debian 12's `postgresql` is 15).
    pg=$(ls -d /usr/lib/postgresql/*/bin/postgres 2>/dev/null | sort -V | tail -n 1)
    pg=${pg%/bin/postgres}
    [[ -n $pg ]] || need /usr/lib/postgresql/VERSION/bin/postgres postgresql
    base
    # Server, initdb and clients; every loadable module except the LLVM JIT
    # (100+ MB of libLLVM for an optional optimisation).
    files=()
    for b in postgres initdb pg_ctl psql pg_isready; do files+=("$pg/bin/$b"); done
    for m in "$pg"/lib/*.so; do
        [[ $m == */llvmjit* ]] || files+=("$m")
    done
    copy_with_libs "${files[@]}"
    mkdir -p "$root/usr/share"
    cp -a /usr/share/postgresql "$root/usr/share/"
    cp -a /usr/share/zoneinfo "$root/usr/share/"
    echo 'postgres:x:999:999:PostgreSQL:/var/lib/postgresql:/bin/sh' >>"$root/etc/passwd"
    echo 'postgres:x:999:' >>"$root/etc/group"
    # The data directory's parent belongs to postgres in the image, so a
    # fresh volume mounted there gets that owner by copy-up, as with the
    # official image.
    mkdir -p "$root/var/lib/postgresql" "$root/var/run/postgresql"
    chown 999:999 "$root/var/lib/postgresql" "$root/var/run/postgresql"
    chmod 0700 "$root/var/lib/postgresql"
    mkdir -p "$root/usr/local/bin"
    cat >"$root/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
# Initializes the cluster on first start (trust auth: a test image), then
# runs the server in the foreground so `docker stop` shuts it down cleanly.
set -e
PGDATA=${PGDATA:-/var/lib/postgresql/data}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    initdb -D "$PGDATA" -U postgres --auth=trust --encoding=UTF8 --locale=C --no-instructions >/dev/null
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    echo "host all all 0.0.0.0/0 trust" >>"$PGDATA/pg_hba.conf"
    echo "initialized $PGDATA"
fi
exec postgres -D "$PGDATA" -c jit=off "$@"
EOF
    chmod 0755 "$root/usr/local/bin/docker-entrypoint.sh"
    import --change 'USER postgres' \
        --change 'ENV PGDATA=/var/lib/postgresql/data' \
        --change "ENV PATH=$pg/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" \
        --change 'EXPOSE 5432' \
        --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]'
    ;;
*)
    echo "build-image.sh: unknown image kind $kind" >&2
    exit 2
    ;;
esac
