# vmdk-agent %preun: on erase (not upgrade), stop and disable the units.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop vmdk-agent.socket vmdk-agent.service >/dev/null 2>&1 || :
    fi
    systemctl disable vmdk-agent.socket vmdk-agent.service >/dev/null 2>&1 || :
fi
