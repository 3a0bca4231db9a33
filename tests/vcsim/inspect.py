#!/usr/bin/env python3
"""An independent checker for the vSphere client's tests.

Reads the simulator's state through pyvmomi (VMware's Python SDK), so tests
verify the effects of our client without our own code. Every subcommand
prints one JSON document on stdout; errors go to stderr with exit status 1.

TLS verification is off: this is a checker talking to a simulator on the
loopback interface.

    inspect.py devices  --url U [--user U --password P] --vm-uuid X
    inspect.py power    --url U --vm-uuid X
    inspect.py files    --url U --datastore DS --path dockvols/_DEFAULT
    inspect.py datastores --url U
    inspect.py profiles --url U                  (vCenter only)
    inspect.py disk-profiles --url U --vm-uuid X (vCenter only: each disk's
                                                  profiles, PbmQueryAssociatedProfile)
    inspect.py profile-create --url U --name N --description D
                                                 (vCenter only: a profile of
                                                  someone else, rule stripeWidth=1)
    inspect.py power-off --url U --vm-uuid X     (PowerOffVM_Task)
    inspect.py power-on --url U --vm-uuid X      (PowerOnVM_Task)
    inspect.py sessions --url U
    inspect.py terminate-others --url U          (ends every other session)
    inspect.py extra-config --url U --vm-uuid X
"""

import argparse
import json
import ssl
import sys
import urllib.parse

try:
    from pyVim.connect import Disconnect, SmartConnect
    from pyVim.task import WaitForTask
    from pyVmomi import SoapStubAdapter, pbm, vim
except ImportError as err:  # pragma: no cover
    sys.exit(f"inspect.py: pyvmomi is missing ({err}); run: python3 -m pip install pyvmomi")


def connect(args):
    url = urllib.parse.urlsplit(args.url)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    si = SmartConnect(
        host=url.hostname,
        port=url.port or 443,
        user=args.user,
        pwd=args.password,
        sslContext=ctx,
    )
    return si, url, ctx


def find_vm(si, uuid):
    content = si.RetrieveContent()
    vm = content.searchIndex.FindByUuid(None, uuid, True, False)
    if vm is None:
        sys.exit(f"inspect.py: no VM with BIOS UUID {uuid}")
    return vm


def find_datastore(si, name):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datastore], True)
    try:
        for ds in view.view:
            if ds.name == name:
                return ds
    finally:
        view.Destroy()
    sys.exit(f"inspect.py: no datastore named {name}")


def cmd_devices(si, args):
    vm = find_vm(si, args.vm_uuid)
    controllers, disks = [], []
    for dev in vm.config.hardware.device:
        if isinstance(dev, vim.vm.device.VirtualSCSIController):
            slot = dev.slotInfo
            controllers.append(
                {
                    "key": dev.key,
                    "busNumber": dev.busNumber,
                    "type": type(dev).__name__.split(".")[-1],
                    "sharedBus": dev.sharedBus,
                    "scsiCtlrUnitNumber": dev.scsiCtlrUnitNumber,
                    "pciSlotNumber": getattr(slot, "pciSlotNumber", None) if slot else None,
                    "device": list(dev.device or []),
                }
            )
        elif isinstance(dev, vim.vm.device.VirtualDisk):
            backing = dev.backing
            disks.append(
                {
                    "key": dev.key,
                    "controllerKey": dev.controllerKey,
                    "unitNumber": dev.unitNumber,
                    "fileName": getattr(backing, "fileName", None),
                    "diskMode": getattr(backing, "diskMode", None),
                    "uuid": getattr(backing, "uuid", None),
                    "capacityInKB": dev.capacityInKB,
                }
            )
    cdroms = [
        {"key": dev.key, "controllerKey": dev.controllerKey, "unitNumber": dev.unitNumber}
        for dev in vm.config.hardware.device
        if isinstance(dev, vim.vm.device.VirtualCdrom)
    ]
    return {"vm": vm.name, "moref": vm._moId, "controllers": controllers, "disks": disks, "cdroms": cdroms}


def cmd_power(si, args):
    vm = find_vm(si, args.vm_uuid)
    return {"vm": vm.name, "powerState": str(vm.runtime.powerState)}


def cmd_extra_config(si, args):
    vm = find_vm(si, args.vm_uuid)
    return {opt.key: opt.value for opt in (vm.config.extraConfig or [])}


def cmd_files(si, args):
    ds = find_datastore(si, args.datastore)
    spec = vim.host.DatastoreBrowser.SearchSpec()
    spec.details = vim.host.DatastoreBrowser.FileInfo.Details(fileSize=True, fileType=True)
    spec.matchPattern = ["*"]
    path = f"[{args.datastore}] {args.path}"
    task = ds.browser.SearchDatastore_Task(datastorePath=path, searchSpec=spec)
    try:
        WaitForTask(task, si=si)
    except vim.fault.FileNotFound:
        return {"path": path, "error": "FileNotFound", "files": []}
    files = [
        # The simulator leaves out a size of 0 (Go's omitempty).
        {"name": f.path, "size": f.fileSize or 0, "type": type(f).__name__.split(".")[-1]}
        for f in (task.info.result.file or [])
    ]
    files.sort(key=lambda f: f["name"])
    return {"path": path, "files": files}


def cmd_datastores(si, args):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datastore], True)
    try:
        out = []
        for ds in view.view:
            s = ds.summary
            out.append(
                {
                    "name": s.name,
                    "moref": ds._moId,
                    "url": s.url,
                    "type": s.type,
                    "capacity": s.capacity,
                    "freeSpace": s.freeSpace,
                    "accessible": s.accessible,
                }
            )
    finally:
        view.Destroy()
    out.sort(key=lambda d: d["name"])
    return out


def pbm_manager(si, args):
    """The PBM profile manager, on the session of `si`."""
    _, url, ctx = args.conn
    cookie = si._stub.cookie  # 'vmware_soap_session="..."; Path=/; ...'
    session = cookie.split('"')[1] if '"' in cookie else cookie.split("=", 1)[1].split(";")[0]
    # vcsim serves PBM at /pbm (pyvmomi's default is /pbm/sdk).
    stub = SoapStubAdapter(
        host=url.hostname,
        port=url.port or 443,
        path="/pbm",
        version="pbm.version.version11",
        sslContext=ctx,
        requestContext={"vcSessionCookie": session},
    )
    stub.cookie = cookie
    return pbm.ServiceInstance("ServiceInstance", stub).RetrieveContent().profileManager


def cmd_profiles(si, args):
    manager = pbm_manager(si, args)
    ids = manager.PbmQueryProfile(
        resourceType=pbm.profile.ResourceType(resourceType="STORAGE"),
        profileCategory="REQUIREMENT",
    )
    out = []
    for profile in manager.PbmRetrieveContent(profileIds=ids) if ids else []:
        rules = []
        constraints = profile.constraints
        for sub in getattr(constraints, "subProfiles", None) or []:
            for cap in sub.capability or []:
                for c in cap.constraint or []:
                    for prop in c.propertyInstance or []:
                        rules.append(
                            {"namespace": cap.id.namespace, "id": cap.id.id, "property": prop.id, "value": prop.value}
                        )
        out.append(
            {
                "name": profile.name,
                "id": profile.profileId.uniqueId,
                "description": profile.description,
                "rules": rules,
            }
        )
    out.sort(key=lambda p: p["name"])
    return out


def cmd_disk_profiles(si, args):
    vm = find_vm(si, args.vm_uuid)
    manager = pbm_manager(si, args)
    out = []
    for dev in vm.config.hardware.device:
        if not isinstance(dev, vim.vm.device.VirtualDisk):
            continue
        entity = pbm.ServerObjectRef(objectType="virtualDiskId", key=f"{vm._moId}:{dev.key}")
        ids = manager.PbmQueryAssociatedProfile(entity=entity) or []
        out.append(
            {
                "key": dev.key,
                "fileName": getattr(dev.backing, "fileName", None),
                "profiles": [p.uniqueId for p in ids],
            }
        )
    return out


def cmd_profile_create(si, args):
    manager = pbm_manager(si, args)
    rule = pbm.capability.CapabilityInstance(
        id=pbm.capability.CapabilityMetadata.UniqueId(namespace="VSAN", id="stripeWidth"),
        constraint=[
            pbm.capability.ConstraintInstance(propertyInstance=[pbm.capability.PropertyInstance(id="stripeWidth", value=1)])
        ],
    )
    spec = pbm.profile.CapabilityBasedProfileCreateSpec(
        name=args.name,
        description=args.description,
        category="REQUIREMENT",
        resourceType=pbm.profile.ResourceType(resourceType="STORAGE"),
        constraints=pbm.profile.SubProfileCapabilityConstraints(
            subProfiles=[pbm.profile.SubProfileCapabilityConstraints.SubProfile(name="someone else's", capability=[rule])]
        ),
    )
    return {"id": manager.PbmCreate(createSpec=spec).uniqueId}


def cmd_power_off(si, args):
    vm = find_vm(si, args.vm_uuid)
    WaitForTask(vm.PowerOffVM_Task(), si=si)
    return {"vm": vm.name, "powerState": str(vm.runtime.powerState)}


def cmd_power_on(si, args):
    vm = find_vm(si, args.vm_uuid)
    WaitForTask(vm.PowerOnVM_Task(), si=si)
    return {"vm": vm.name, "powerState": str(vm.runtime.powerState)}


def cmd_sessions(si, args):
    sm = si.content.sessionManager
    return {
        "current": sm.currentSession.key,
        "sessions": sorted(s.key for s in sm.sessionList or []),
    }


def cmd_terminate_others(si, args):
    sm = si.content.sessionManager
    me = sm.currentSession.key
    others = sorted(s.key for s in sm.sessionList or [] if s.key != me)
    if others:
        sm.TerminateSession(sessionId=others)
    return {"terminated": others}


COMMANDS = {
    "devices": cmd_devices,
    "power": cmd_power,
    "extra-config": cmd_extra_config,
    "files": cmd_files,
    "datastores": cmd_datastores,
    "profiles": cmd_profiles,
    "disk-profiles": cmd_disk_profiles,
    "profile-create": cmd_profile_create,
    "power-off": cmd_power_off,
    "power-on": cmd_power_on,
    "sessions": cmd_sessions,
    "terminate-others": cmd_terminate_others,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--url", required=True, help="https://127.0.0.1:PORT/sdk")
    parser.add_argument("--user", default="user")
    parser.add_argument("--password", default="pass")
    parser.add_argument("--vm-uuid")
    parser.add_argument("--datastore")
    parser.add_argument("--path", default="")
    parser.add_argument("--name")
    parser.add_argument("--description", default="")
    args = parser.parse_args()
    if args.command in ("devices", "power", "extra-config", "disk-profiles", "power-off", "power-on") and not args.vm_uuid:
        parser.error(f"{args.command} needs --vm-uuid")
    if args.command == "files" and not args.datastore:
        parser.error("files needs --datastore")
    if args.command == "profile-create" and not args.name:
        parser.error("profile-create needs --name")
    args.conn = connect(args)
    si = args.conn[0]
    try:
        result = COMMANDS[args.command](si, args)
    finally:
        Disconnect(si)
    json.dump(result, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
