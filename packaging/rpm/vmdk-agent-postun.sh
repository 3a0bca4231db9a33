# vmdk-agent %postun: reload systemd; on upgrade restart the service with the new
# binary (if it runs). Volumes and data (/var/lib/vmdk) stay.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart vmdk-agent.service >/dev/null 2>&1 || :
    fi
fi
