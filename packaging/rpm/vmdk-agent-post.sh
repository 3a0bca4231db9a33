# vmdk-agent %post: reload systemd, enable on first install (enable=no).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ] && [ "no" = yes ]; then
    systemctl enable vmdk-agent.socket vmdk-agent.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl start vmdk-agent.socket >/dev/null 2>&1 || :
    fi
fi
