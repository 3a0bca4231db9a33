# What the two packages hold and say about themselves, read by
# packaging/build.sh (sourced: plain shell assignments and one function per
# package). One manifest for both formats; where the .deb and the .rpm
# differ (systemd's unit directory, the install guide), the file line says so.
#
# A file line:   file KIND MODE SOURCE DESTINATION [deb|rpm]
#   KIND         bin (stripped of debug info), file, config (a conffile /
#                %config(noreplace): an upgrade keeps the administrator's
#                copy), doc (%doc in the .rpm)
#   SOURCE       relative to the repository; @BIN@ is the binaries' directory
#   DESTINATION  absolute; @UNITDIR@ is /lib/systemd/system in the .deb and
#                /usr/lib/systemd/system in the .rpm
#   deb|rpm      only in that format (default: both)

maintainer="vmdk developers <vmdk@example.invalid>"
license="Apache-2.0"
homepage="https://example.invalid/vmdk"

# vmdk-plugin depends on vmdk-agent, which owns the shared
# /etc/vmdk/agent.toml and is the admin CLI.
package_vmdk_plugin() {
    summary="Docker volume plugin vmdk: VMDK disks for containers"
    description="The vmdk Docker volume plugin (driver \`vmdk\`) with its agent embedded:
VMDK disks as Docker volumes. Socket-activated by vmdk-plugin.socket
(/run/docker/plugins/vmdk.sock), enabled on install."
    # The shared-library dependencies of the binary are added to these
    # (dpkg-shlibdeps for the .deb, rpm's ELF dependency generator for the .rpm).
    deb_depends="vmdk-agent, e2fsprogs, util-linux"
    deb_recommends="docker.io | docker-ce, xfsprogs"
    rpm_requires="vmdk-agent e2fsprogs util-linux"
    file bin 755 @BIN@/vmdk-plugin /usr/bin/vmdk-plugin
    file file 644 packaging/systemd/vmdk-plugin.socket @UNITDIR@/vmdk-plugin.socket
    file file 644 packaging/systemd/vmdk-plugin.service @UNITDIR@/vmdk-plugin.service
    file config 644 packaging/default/vmdk-plugin /etc/default/vmdk-plugin
    file doc 644 README.md /usr/share/doc/vmdk-plugin/README.md
    file doc 644 docs/install-debian.md /usr/share/doc/vmdk-plugin/install-debian.md deb
    file doc 644 docs/install-photon.md /usr/share/doc/vmdk-plugin/install-photon.md rpm
    file doc 644 docs/configuration.md /usr/share/doc/vmdk-plugin/configuration.md
    file doc 644 docs/troubleshooting.md /usr/share/doc/vmdk-plugin/troubleshooting.md
}

package_vmdk_agent() {
    summary="vmdk host agent, admin CLI and shared agent configuration"
    description="The vmdk host agent and admin CLI (\`vmdk-agent ls\`, \`policy\`, \`status\`),
and the shared agent configuration /etc/vmdk/agent.toml. vmdk-agent.socket
(/run/vmdk/agent.sock) is installed but not enabled: vmdk-plugin embeds
its agent by default."
    deb_depends="util-linux"
    deb_recommends=""
    rpm_requires="util-linux"
    file bin 755 @BIN@/vmdk-agent /usr/bin/vmdk-agent
    file file 644 packaging/systemd/vmdk-agent.socket @UNITDIR@/vmdk-agent.socket
    file file 644 packaging/systemd/vmdk-agent.service @UNITDIR@/vmdk-agent.service
    file config 644 packaging/default/vmdk-agent /etc/default/vmdk-agent
    file config 644 packaging/etc/agent.toml /etc/vmdk/agent.toml
    file doc 644 docs/admin-cli.md /usr/share/doc/vmdk-agent/admin-cli.md
    file doc 644 docs/configuration.md /usr/share/doc/vmdk-agent/configuration.md
    file doc 644 docs/vsphere.md /usr/share/doc/vmdk-agent/vsphere.md
    file doc 644 docs/install-debian.md /usr/share/doc/vmdk-agent/install-debian.md deb
    file doc 644 docs/install-photon.md /usr/share/doc/vmdk-agent/install-photon.md rpm
}
