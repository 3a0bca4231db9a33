# vmdk-plugin %post: reload systemd, enable on first install (enable=yes).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ] && [ "yes" = yes ]; then
    systemctl enable vmdk-plugin.socket vmdk-plugin.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl start vmdk-plugin.socket >/dev/null 2>&1 || :
    fi
fi
