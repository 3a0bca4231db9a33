# vmdk-plugin %preun: on erase (not upgrade), stop and disable the units.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop vmdk-plugin.socket vmdk-plugin.service >/dev/null 2>&1 || :
    fi
    systemctl disable vmdk-plugin.socket vmdk-plugin.service >/dev/null 2>&1 || :
fi
