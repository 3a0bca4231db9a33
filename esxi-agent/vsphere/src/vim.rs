//! vim25 request bodies and response parsers: pure functions, unit-tested
//! against recorded responses in `tests/fixtures/`.
//!
//! Elements are written in the order of the vim25 XSD `sequence`s (real
//! hostd and vpxd refuse other orders; the simulator does not care).

use crate::types::{
    About, ApiType, Datacenter, Datastore, DatastorePath, DeviceChange, DiskMode, DiskSpec, Moref, OtherDevice,
    PowerState, ProfileId, ScsiController, ScsiControllerKind, VirtualDisk,
};
use crate::xml::{Node, Writer};

pub(crate) const VIM_NS: &str = "urn:vim25";

/// The managed objects the client uses, from `RetrieveServiceContent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceContent {
    pub about: About,
    pub root_folder: Moref,
    pub property_collector: Moref,
    pub session_manager: Moref,
    pub search_index: Moref,
    pub file_manager: Option<Moref>,
    pub virtual_disk_manager: Option<Moref>,
}

/// Opens the method element with the vim25 namespace.
fn method(name: &str, this: &Moref) -> Writer {
    let mut w = Writer::new();
    w.open_ns(name, VIM_NS);
    w.moref("_this", &this.kind, &this.value);
    w
}

fn finish(mut w: Writer, name: &str) -> String {
    w.close(name);
    w.finish()
}

fn datacenter(w: &mut Writer, name: &str, dc: Option<&Moref>) {
    if let Some(dc) = dc {
        w.moref(name, &dc.kind, &dc.value);
    }
}

pub(crate) fn retrieve_service_content() -> String {
    finish(
        method(
            "RetrieveServiceContent",
            &Moref::new("ServiceInstance", "ServiceInstance"),
        ),
        "RetrieveServiceContent",
    )
}

pub(crate) fn login(session_manager: &Moref, user: &str, password: &str) -> String {
    let mut w = method("Login", session_manager);
    w.text("userName", user).text("password", password);
    finish(w, "Login")
}

pub(crate) fn logout(session_manager: &Moref) -> String {
    finish(method("Logout", session_manager), "Logout")
}

/// Which objects a `RetrieveProperties` starts from.
#[derive(Debug, Clone)]
pub(crate) enum Objects<'a> {
    /// Exactly these objects.
    List(&'a [Moref]),
    /// Every object reachable from this folder through `Folder.childEntity`
    /// (datacenters, and folders holding datacenters).
    FolderTree(&'a Moref),
    /// The objects one property of `from` (of type `kind`) refers to, e.g. a
    /// datacenter's `datastore` list; `from` itself is skipped.
    Traverse {
        from: &'a Moref,
        kind: &'a str,
        path: &'a str,
    },
}

/// `RetrieveProperties` of `paths` on objects of type `kind` (one
/// `PropertySpec` per `(kind, paths)`).
pub(crate) fn retrieve_properties(pc: &Moref, specs: &[(&str, &[&str])], objects: Objects<'_>) -> String {
    let mut w = method("RetrieveProperties", pc);
    w.open("specSet");
    // PropertyFilterSpec: propSet, objectSet, reportMissingObjectsInResults
    for (kind, paths) in specs {
        // PropertySpec: type, all, pathSet
        w.open("propSet").text("type", kind);
        for p in *paths {
            w.text("pathSet", p);
        }
        w.close("propSet");
    }
    match objects {
        Objects::List(list) => {
            for obj in list {
                // ObjectSpec: obj, skip, selectSet
                w.open("objectSet")
                    .moref("obj", &obj.kind, &obj.value)
                    .close("objectSet");
            }
        }
        Objects::FolderTree(root) => {
            w.open("objectSet")
                .moref("obj", &root.kind, &root.value)
                .value("skip", false)
                // TraversalSpec: name (SelectionSpec), type, path, skip, selectSet
                .open_typed("selectSet", "TraversalSpec")
                .text("name", "folderTraversal")
                .text("type", "Folder")
                .text("path", "childEntity")
                .value("skip", false)
                .open("selectSet")
                .text("name", "folderTraversal")
                .close("selectSet")
                .close("selectSet")
                .close("objectSet");
        }
        Objects::Traverse { from, kind, path } => {
            w.open("objectSet")
                .moref("obj", &from.kind, &from.value)
                .value("skip", true)
                .open_typed("selectSet", "TraversalSpec")
                .text("name", "traverse")
                .text("type", kind)
                .text("path", path)
                .value("skip", false)
                .close("selectSet")
                .close("objectSet");
        }
    }
    w.close("specSet");
    finish(w, "RetrieveProperties")
}

pub(crate) fn find_by_uuid(search_index: &Moref, dc: Option<&Moref>, uuid: &str) -> String {
    let mut w = method("FindByUuid", search_index);
    datacenter(&mut w, "datacenter", dc);
    w.text("uuid", uuid)
        .value("vmSearch", true)
        .value("instanceUuid", false);
    finish(w, "FindByUuid")
}

pub(crate) fn make_directory(fm: &Moref, name: &DatastorePath, dc: Option<&Moref>, parents: bool) -> String {
    let mut w = method("MakeDirectory", fm);
    w.text("name", &name.to_string());
    datacenter(&mut w, "datacenter", dc);
    w.value("createParentDirectories", parents);
    finish(w, "MakeDirectory")
}

/// `HostDatastoreBrowser.SearchDatastore_Task` listing one folder with the
/// files' types and sizes. HostDatastoreBrowserSearchSpec: query, details,
/// searchCaseInsensitive, matchPattern, sortFoldersFirst; FileQueryFlags:
/// fileType, fileSize, modification, fileOwner.
pub(crate) fn search_datastore(browser: &Moref, folder: &DatastorePath) -> String {
    let mut w = method("SearchDatastore_Task", browser);
    w.text("datastorePath", &folder.to_string());
    w.open("searchSpec")
        .open("details")
        .value("fileType", true)
        .value("fileSize", true)
        .value("modification", false)
        .value("fileOwner", false)
        .close("details")
        // Every file: the simulator returns nothing without a pattern.
        .text("matchPattern", "*")
        .close("searchSpec");
    finish(w, "SearchDatastore_Task")
}

/// The files of a `HostDatastoreBrowserSearchResults` (a task's result).
pub(crate) fn parse_search_results(result: &Node) -> Result<Vec<crate::types::FolderEntry>, String> {
    let mut out = Vec::new();
    for f in result.children_named("file") {
        let name = f.child_text("path").ok_or("a file without a path")?.to_owned();
        let size = parse_num::<u64>(f, "fileSize")?.unwrap_or(0);
        let is_folder = f.type_name() == "FolderFileInfo";
        out.push(crate::types::FolderEntry { name, size, is_folder });
    }
    Ok(out)
}

pub(crate) fn delete_datastore_file(fm: &Moref, name: &DatastorePath, dc: Option<&Moref>) -> String {
    let mut w = method("DeleteDatastoreFile_Task", fm);
    w.text("name", &name.to_string());
    datacenter(&mut w, "datacenter", dc);
    finish(w, "DeleteDatastoreFile_Task")
}

pub(crate) fn create_virtual_disk(vdm: &Moref, name: &DatastorePath, dc: Option<&Moref>, spec: &DiskSpec) -> String {
    let mut w = method("CreateVirtualDisk_Task", vdm);
    w.text("name", &name.to_string());
    datacenter(&mut w, "datacenter", dc);
    // VirtualDiskSpec: diskType, adapterType; FileBackedVirtualDiskSpec:
    // capacityKb, profile, crypto.
    w.open_typed("spec", "FileBackedVirtualDiskSpec")
        .text("diskType", spec.disk_type.as_str())
        .text("adapterType", spec.adapter_type.as_str())
        .value("capacityKb", spec.capacity_kb);
    if let Some(profile) = &spec.profile {
        // VirtualMachineDefinedProfileSpec: profileId, replicationSpec, profileData, profileParams
        w.open_typed("profile", "VirtualMachineDefinedProfileSpec")
            .text("profileId", &profile.0)
            .close("profile");
    }
    w.close("spec");
    finish(w, "CreateVirtualDisk_Task")
}

pub(crate) fn delete_virtual_disk(vdm: &Moref, name: &DatastorePath, dc: Option<&Moref>) -> String {
    let mut w = method("DeleteVirtualDisk_Task", vdm);
    w.text("name", &name.to_string());
    datacenter(&mut w, "datacenter", dc);
    finish(w, "DeleteVirtualDisk_Task")
}

pub(crate) fn copy_virtual_disk(
    vdm: &Moref,
    source: &DatastorePath,
    dest: &DatastorePath,
    dc: Option<&Moref>,
    force: bool,
) -> String {
    let mut w = method("CopyVirtualDisk_Task", vdm);
    // sourceName, sourceDatacenter, destName, destDatacenter, destSpec, force
    w.text("sourceName", &source.to_string());
    datacenter(&mut w, "sourceDatacenter", dc);
    w.text("destName", &dest.to_string());
    datacenter(&mut w, "destDatacenter", dc);
    w.value("force", force);
    finish(w, "CopyVirtualDisk_Task")
}

pub(crate) fn query_virtual_disk_uuid(vdm: &Moref, name: &DatastorePath, dc: Option<&Moref>) -> String {
    let mut w = method("QueryVirtualDiskUuid", vdm);
    w.text("name", &name.to_string());
    datacenter(&mut w, "datacenter", dc);
    finish(w, "QueryVirtualDiskUuid")
}

/// `ReconfigVM_Task` with `deviceChange` (in the given order) and then
/// `extraConfig` string options.
pub(crate) fn reconfig_vm(vm: &Moref, changes: &[DeviceChange], extra_config: &[(String, String)]) -> String {
    let mut w = method("ReconfigVM_Task", vm);
    w.open("spec");
    for change in changes {
        // VirtualDeviceConfigSpec: operation, fileOperation, device, profile, backing
        w.open("deviceChange");
        match change {
            DeviceChange::AddPvscsiController { temp_key, bus_number } => {
                w.text("operation", "add");
                // VirtualDevice: key, deviceInfo, backing, connectable, slotInfo,
                // controllerKey, unitNumber; VirtualController: busNumber,
                // device; VirtualSCSIController: hotAddRemove, sharedBus,
                // scsiCtlrUnitNumber.
                w.open_typed("device", "ParaVirtualSCSIController")
                    .value("key", temp_key)
                    .value("busNumber", bus_number)
                    .text("sharedBus", "noSharing")
                    .close("device");
            }
            DeviceChange::AttachDisk {
                temp_key,
                controller_key,
                unit_number,
                file,
                disk_mode,
                profile,
            } => {
                w.text("operation", "add");
                w.open_typed("device", "VirtualDisk").value("key", temp_key);
                // VirtualDeviceFileBackingInfo: fileName, datastore,
                // backingObjectId; VirtualDiskFlatVer2BackingInfo: diskMode, ...
                w.open_typed("backing", "VirtualDiskFlatVer2BackingInfo")
                    .text("fileName", &file.to_string())
                    .text("diskMode", disk_mode.as_str())
                    .close("backing");
                w.value("controllerKey", controller_key)
                    .value("unitNumber", unit_number)
                    // VirtualDisk: capacityInKB (required; ignored for an existing file).
                    .value("capacityInKB", 0)
                    .close("device");
                if let Some(profile) = profile {
                    device_profile(&mut w, profile);
                }
            }
            DeviceChange::SetDiskProfile { disk, profile } => {
                w.text("operation", "edit");
                existing_disk(&mut w, disk);
                device_profile(&mut w, profile);
            }
            DeviceChange::RemoveDisk(disk) => {
                w.text("operation", "remove");
                existing_disk(&mut w, disk);
            }
        }
        w.close("deviceChange");
    }
    for (key, value) in extra_config {
        w.open("extraConfig")
            .text("key", key)
            .typed_text("value", "xsd:string", value)
            .close("extraConfig");
    }
    w.close("spec");
    finish(w, "ReconfigVM_Task")
}

/// A disk the VM has, as read back (the key is what matters to the server).
fn existing_disk(w: &mut Writer, disk: &VirtualDisk) {
    w.open_typed("device", "VirtualDisk").value("key", disk.key);
    // Description: label, summary (both required when deviceInfo is sent).
    if let Some(label) = &disk.label {
        w.open("deviceInfo")
            .text("label", label)
            .text("summary", disk.summary.as_deref().unwrap_or_default())
            .close("deviceInfo");
    }
    if let Some(file) = &disk.file_name {
        let backing = disk.backing_type.as_deref().unwrap_or("VirtualDiskFlatVer2BackingInfo");
        w.open_typed("backing", backing).text("fileName", file);
        if let Some(mode) = &disk.disk_mode {
            w.text("diskMode", mode.as_str());
        }
        w.close("backing");
    }
    if let Some(c) = disk.controller_key {
        w.value("controllerKey", c);
    }
    if let Some(u) = disk.unit_number {
        w.value("unitNumber", u);
    }
    w.value("capacityInKB", disk.capacity_kb.unwrap_or(0));
    w.close("device");
}

/// `VirtualDeviceConfigSpec.profile` (after `device`): a
/// `VirtualMachineDefinedProfileSpec` with the profile's id.
fn device_profile(w: &mut Writer, profile: &ProfileId) {
    w.open_typed("profile", "VirtualMachineDefinedProfileSpec")
        .text("profileId", &profile.0)
        .close("profile");
}

// ---------------------------------------------------------------------------
// Responses

/// The SOAP body's content: the `XxxResponse` element, or the fault.
pub(crate) enum Body<'a> {
    Response(&'a Node),
    Fault { fault_type: String, message: String },
}

/// Reads an envelope's body.
pub(crate) fn body(envelope: &Node) -> Result<Body<'_>, String> {
    if envelope.name != "Envelope" {
        return Err(format!("the root element is <{}>, not a SOAP Envelope", envelope.name));
    }
    let body = envelope.child("Body").ok_or("no SOAP Body")?;
    let first = body.children.first().ok_or("an empty SOAP Body")?;
    if first.name == "Fault" {
        let (fault_type, message) = soap_fault(first);
        return Ok(Body::Fault { fault_type, message });
    }
    Ok(Body::Response(first))
}

/// A SOAP fault's type (the `detail`'s `xsi:type`, e.g. `InvalidLogin`) and
/// its `faultstring`.
fn soap_fault(fault: &Node) -> (String, String) {
    let detail_type = fault.child("detail").and_then(|d| d.children.first()).map(|f| {
        f.xsi_type
            .clone()
            .unwrap_or_else(|| f.name.strip_suffix("Fault").unwrap_or(&f.name).to_owned())
    });
    let fault_type = detail_type
        .or_else(|| fault.child_text("faultcode").map(str::to_owned))
        .unwrap_or_else(|| "SoapFault".to_owned());
    let mut message = fault.child_text("faultstring").unwrap_or_default().to_owned();
    if let Some(detail) = fault.child("detail").and_then(|d| d.children.first()) {
        let extra = fault_details(detail);
        if !extra.is_empty() {
            message = join_message(&message, &extra);
        }
    }
    if message.is_empty() {
        message = fault_type.clone();
    }
    (fault_type, message)
}

/// The fields of a fault that name what failed (`file`, `name`, `obj`...),
/// as `field=value` pairs.
fn fault_details(fault: &Node) -> String {
    const NAMING: &[&str] = &[
        "file",
        "name",
        "datastore",
        "obj",
        "invalidProperty",
        "property",
        "text",
        "reason",
    ];
    fault
        .children
        .iter()
        .filter(|c| NAMING.contains(&c.name.as_str()) && !c.trimmed().is_empty())
        .map(|c| format!("{}={}", c.name, c.trimmed()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn join_message(message: &str, extra: &str) -> String {
    if message.is_empty() {
        extra.to_owned()
    } else if message.contains(extra) {
        message.to_owned()
    } else {
        format!("{message} ({extra})")
    }
}

/// A `LocalizedMethodFault` (a task's `info.error`, a missing property's
/// fault): the fault's type and a message naming what failed.
pub(crate) fn localized_fault(node: &Node) -> (String, String) {
    let fault = node.child("fault");
    let fault_type = fault
        .map(|f| f.type_name().to_owned())
        .unwrap_or_else(|| "MethodFault".to_owned());
    let localized = node.child_text("localizedMessage").unwrap_or_default();
    // The simulator's localizedMessage is the Go type name (`*types.FileNotFound`).
    let localized = if localized.starts_with("*types.") {
        ""
    } else {
        localized
    };
    let details = fault.map(fault_details).unwrap_or_default();
    let mut message = join_message(localized, &details);
    if message.is_empty() {
        message = fault_type.clone();
    }
    (fault_type, message)
}

fn moref_of(node: &Node) -> Result<Moref, String> {
    let kind = node
        .mo_type
        .clone()
        .ok_or_else(|| format!("<{}> is not a managed object reference (no type)", node.name))?;
    let value = node.trimmed();
    if value.is_empty() {
        return Err(format!("<{}> is an empty managed object reference", node.name));
    }
    Ok(Moref::new(kind, value))
}

/// A property value that is a managed object reference.
pub(crate) fn parse_moref_node(node: &Node) -> Result<Moref, String> {
    moref_of(node)
}

fn child_moref(node: &Node, name: &str) -> Result<Moref, String> {
    moref_of(node.child(name).ok_or_else(|| format!("no <{name}>"))?)
}

fn parse_num<T: std::str::FromStr>(node: &Node, name: &str) -> Result<Option<T>, String> {
    match node.child_text(name) {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("<{name}> is {s:?}, not a number")),
    }
}

fn parse_bool(node: &Node, name: &str) -> Result<Option<bool>, String> {
    match node.child_text(name) {
        None | Some("") => Ok(None),
        Some("true") | Some("1") => Ok(Some(true)),
        Some("false") | Some("0") => Ok(Some(false)),
        Some(s) => Err(format!("<{name}> is {s:?}, not a boolean")),
    }
}

pub(crate) fn parse_service_content(resp: &Node) -> Result<ServiceContent, String> {
    let rv = resp.child("returnval").ok_or("no <returnval>")?;
    let about = rv.child("about").ok_or("no <about>")?;
    let text = |name: &str| about.child_text(name).unwrap_or_default().to_owned();
    let api_type = match about.child_text("apiType") {
        Some("VirtualCenter") => ApiType::VirtualCenter,
        Some("HostAgent") => ApiType::HostAgent,
        other => ApiType::Other(other.unwrap_or_default().to_owned()),
    };
    let api_version = text("apiVersion");
    if api_version.is_empty() || !api_version.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!("about.apiVersion {api_version:?} is not a version"));
    }
    let optional = |name: &str| rv.child(name).map(moref_of).transpose();
    Ok(ServiceContent {
        about: About {
            name: text("name"),
            full_name: text("fullName"),
            api_type,
            version: text("version"),
            build: text("build"),
            api_version,
            instance_uuid: about
                .child_text("instanceUuid")
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        },
        root_folder: child_moref(rv, "rootFolder")?,
        property_collector: child_moref(rv, "propertyCollector")?,
        session_manager: child_moref(rv, "sessionManager")?,
        search_index: child_moref(rv, "searchIndex")?,
        file_manager: optional("fileManager")?,
        virtual_disk_manager: optional("virtualDiskManager")?,
    })
}

/// A `returnval` that is a managed object reference (a task), required.
pub(crate) fn parse_moref_returnval(resp: &Node) -> Result<Moref, String> {
    child_moref(resp, "returnval")
}

/// A `returnval` that may be absent (FindByUuid finding nothing).
pub(crate) fn parse_optional_moref_returnval(resp: &Node) -> Result<Option<Moref>, String> {
    resp.child("returnval").map(moref_of).transpose()
}

pub(crate) fn parse_string_returnval(resp: &Node) -> Result<String, String> {
    Ok(resp.child_text("returnval").ok_or("no <returnval>")?.to_owned())
}

/// One object of a `RetrieveProperties` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObjectContent {
    pub obj: Moref,
    pub props: Vec<(String, Node)>,
    /// Properties the server could not read: path, fault type, message.
    pub missing: Vec<(String, String, String)>,
}

impl ObjectContent {
    pub fn prop(&self, name: &str) -> Option<&Node> {
        self.props.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

pub(crate) fn parse_object_contents(resp: &Node) -> Result<Vec<ObjectContent>, String> {
    resp.children_named("returnval")
        .map(|rv| {
            let obj = child_moref(rv, "obj")?;
            let mut props = Vec::new();
            for ps in rv.children_named("propSet") {
                let name = ps.child_text("name").ok_or("a <propSet> without <name>")?;
                let val = ps.child("val").cloned().unwrap_or_default();
                props.push((name.to_owned(), val));
            }
            let missing = rv
                .children_named("missingSet")
                .map(|m| {
                    let path = m.child_text("path").unwrap_or_default().to_owned();
                    let (ty, msg) = m.child("fault").map(localized_fault).unwrap_or_default();
                    (path, ty, msg)
                })
                .collect();
            Ok(ObjectContent { obj, props, missing })
        })
        .collect()
}

/// A task's state as `info.state`, `info.error` and `info.result` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TaskState {
    Queued,
    /// `info.progress`: the percentage done, when the server reports it.
    Running {
        progress: Option<u8>,
    },
    Success {
        result: Option<Node>,
    },
    Error {
        fault_type: String,
        message: String,
    },
}

pub(crate) fn parse_task(obj: &ObjectContent) -> Result<TaskState, String> {
    let state = obj
        .prop("info.state")
        .map(|n| n.trimmed().to_owned())
        .ok_or("no info.state")?;
    Ok(match state.as_str() {
        "queued" => TaskState::Queued,
        "running" => TaskState::Running {
            // Bounded: a hostile or odd server's value is clamped to 0..=100,
            // and anything that is not a number is no progress at all.
            progress: obj
                .prop("info.progress")
                .and_then(|n| n.trimmed().parse::<i64>().ok())
                .map(|p| p.clamp(0, 100) as u8),
        },
        "success" => TaskState::Success {
            result: obj.prop("info.result").cloned(),
        },
        "error" => {
            let (fault_type, message) = obj
                .prop("info.error")
                .map(localized_fault)
                .unwrap_or_else(|| ("MethodFault".into(), "the task failed without info.error".into()));
            TaskState::Error { fault_type, message }
        }
        other => return Err(format!("info.state is {other:?}")),
    })
}

/// Datacenters and their inventory paths from the objects of a folder-tree
/// `RetrieveProperties` (`name` and `parent` of datacenters and folders).
/// A path is the names of the folders between the root folder and the
/// datacenter, then its name, joined with `/`.
pub(crate) fn parse_datacenters(objs: &[ObjectContent], root: &Moref) -> Result<Vec<Datacenter>, String> {
    let name_of = |o: &ObjectContent| o.prop("name").map(|n| n.trimmed().to_owned()).unwrap_or_default();
    let parent_of = |o: &ObjectContent| {
        o.prop("parent")
            .and_then(|p| Some(Moref::new(p.mo_type.clone()?, p.trimmed())))
    };
    let mut out = Vec::new();
    for dc in objs.iter().filter(|o| o.obj.kind == "Datacenter") {
        let name = name_of(dc);
        if name.is_empty() {
            return Err(format!("datacenter {} has no name", dc.obj.value));
        }
        let mut path = vec![name.clone()];
        let mut parent = parent_of(dc);
        let mut hops = 0;
        while let Some(p) = parent.filter(|p| p != root) {
            let folder = objs
                .iter()
                .find(|o| o.obj == p)
                .ok_or_else(|| format!("datacenter {name}'s folder {p} is not in the answer"))?;
            path.push(name_of(folder));
            parent = parent_of(folder);
            hops += 1;
            if hops > 64 {
                return Err(format!("datacenter {name}'s folders form a loop"));
            }
        }
        path.reverse();
        out.push(Datacenter {
            moref: dc.obj.clone(),
            name,
            path: path.join("/"),
        });
    }
    Ok(out)
}

/// A datastore's `summary`.
pub(crate) fn parse_datastore(obj: &ObjectContent) -> Result<Datastore, String> {
    let s = obj.prop("summary").ok_or("no summary")?;
    let name = s.child_text("name").ok_or("summary without a name")?.to_owned();
    Ok(Datastore {
        moref: obj.obj.clone(),
        name,
        url: s.child_text("url").unwrap_or_default().to_owned(),
        capacity: parse_num(s, "capacity")?.unwrap_or(0),
        free_space: parse_num(s, "freeSpace")?.unwrap_or(0),
        kind: s.child_text("type").unwrap_or_default().to_owned(),
        accessible: parse_bool(s, "accessible")?.unwrap_or(false),
    })
}

/// Morefs in an `ArrayOfManagedObjectReference` value.
pub(crate) fn parse_moref_array(val: &Node) -> Result<Vec<Moref>, String> {
    val.children.iter().map(moref_of).collect()
}

pub(crate) fn parse_power_state(val: &Node) -> Result<PowerState, String> {
    match val.trimmed() {
        "poweredOn" => Ok(PowerState::PoweredOn),
        "poweredOff" => Ok(PowerState::PoweredOff),
        "suspended" => Ok(PowerState::Suspended),
        other => Err(format!("runtime.powerState is {other:?}")),
    }
}

/// The devices of an `ArrayOfVirtualDevice`, sorted.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Devices {
    pub controllers: Vec<ScsiController>,
    pub disks: Vec<VirtualDisk>,
    pub others: Vec<OtherDevice>,
}

/// The SCSI controllers, disks and other devices in an `ArrayOfVirtualDevice`.
pub(crate) fn parse_devices(val: &Node) -> Result<Devices, String> {
    let mut controllers = Vec::new();
    let mut disks = Vec::new();
    let mut others = Vec::new();
    for dev in &val.children {
        let ty = dev.type_name();
        let key: i32 = parse_num(dev, "key")?.ok_or_else(|| format!("a {ty} without a key"))?;
        if let Some(kind) = ScsiControllerKind::from_type(ty) {
            let bus_number =
                parse_num(dev, "busNumber")?.ok_or_else(|| format!("SCSI controller {key} without a busNumber"))?;
            let pci_slot_number = match dev.child("slotInfo") {
                Some(slot) => parse_num(slot, "pciSlotNumber")?,
                None => None,
            };
            let devices = dev
                .children_named("device")
                .map(|d| {
                    d.trimmed()
                        .parse()
                        .map_err(|_| format!("controller {key} lists device {:?}", d.trimmed()))
                })
                .collect::<Result<_, _>>()?;
            controllers.push(ScsiController {
                key,
                bus_number,
                kind,
                pci_slot_number,
                scsi_ctlr_unit_number: parse_num(dev, "scsiCtlrUnitNumber")?,
                devices,
            });
        } else if ty == "VirtualDisk" {
            let backing = dev.child("backing");
            let info = dev.child("deviceInfo");
            disks.push(VirtualDisk {
                key,
                label: info.and_then(|i| i.child_text("label")).map(str::to_owned),
                summary: info.and_then(|i| i.child_text("summary")).map(str::to_owned),
                controller_key: parse_num(dev, "controllerKey")?,
                unit_number: parse_num(dev, "unitNumber")?,
                file_name: backing.and_then(|b| b.child_text("fileName")).map(str::to_owned),
                backing_type: backing.and_then(|b| b.xsi_type.clone()),
                disk_mode: backing
                    .and_then(|b| b.child_text("diskMode"))
                    .filter(|m| !m.is_empty())
                    .map(DiskMode::parse),
                uuid: backing
                    .and_then(|b| b.child_text("uuid"))
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned),
                capacity_kb: parse_num(dev, "capacityInKB")?,
            });
        } else {
            others.push(OtherDevice {
                key,
                type_name: ty.to_owned(),
                controller_key: parse_num(dev, "controllerKey")?,
                unit_number: parse_num(dev, "unitNumber")?,
            });
        }
    }
    Ok(Devices {
        controllers,
        disks,
        others,
    })
}

/// `config.extraConfig`: `OptionValue`s with string values.
pub(crate) fn parse_extra_config(val: &Node) -> Vec<(String, String)> {
    val.children
        .iter()
        .filter_map(|o| Some((o.child_text("key")?.to_owned(), o.child("value")?.text.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{AdapterType, DiskType, ProfileId};
    use crate::xml::parse;

    fn fixture(name: &str) -> Node {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        parse(&std::fs::read(&path).unwrap()).unwrap()
    }

    fn response(name: &str) -> Node {
        match body(&fixture(name)).unwrap() {
            Body::Response(r) => r.clone(),
            Body::Fault { fault_type, message } => panic!("{name}: {fault_type}: {message}"),
        }
    }

    fn ds(s: &str) -> DatastorePath {
        s.parse().unwrap()
    }

    #[test]
    fn service_content_of_vcenter_and_esx() {
        let vc = parse_service_content(&response("service_content_vpx.xml")).unwrap();
        assert_eq!(vc.about.api_type, ApiType::VirtualCenter);
        assert_eq!(vc.about.api_version, "6.5");
        assert_eq!(vc.root_folder, Moref::new("Folder", "group-d1"));
        assert_eq!(
            vc.property_collector,
            Moref::new("PropertyCollector", "propertyCollector")
        );
        assert_eq!(vc.session_manager, Moref::new("SessionManager", "SessionManager"));
        assert_eq!(
            vc.virtual_disk_manager,
            Some(Moref::new("VirtualDiskManager", "virtualDiskManager"))
        );
        let esx = parse_service_content(&response("service_content_esx.xml")).unwrap();
        assert_eq!(esx.about.api_type, ApiType::HostAgent);
        assert_eq!(esx.root_folder, Moref::new("Folder", "ha-folder-root"));
        assert_eq!(esx.session_manager, Moref::new("SessionManager", "ha-sessionmgr"));
        assert_eq!(esx.search_index, Moref::new("SearchIndex", "ha-searchindex"));
    }

    #[test]
    fn soap_faults_are_typed() {
        match body(&fixture("fault_invalid_login.xml")).unwrap() {
            Body::Fault { fault_type, message } => {
                assert_eq!(fault_type, "InvalidLogin");
                assert_eq!(message, "Login failure");
            }
            Body::Response(_) => panic!("not a fault"),
        }
        match body(&fixture("fault_not_authenticated.xml")).unwrap() {
            Body::Fault { fault_type, message } => {
                assert_eq!(fault_type, "NotAuthenticated");
                assert_eq!(message, "NotAuthenticated");
            }
            Body::Response(_) => panic!("not a fault"),
        }
        match body(&fixture("fault_managed_object_not_found.xml")).unwrap() {
            Body::Fault { fault_type, message } => {
                assert_eq!(fault_type, "ManagedObjectNotFound");
                assert!(message.contains("has already been deleted"), "{message}");
                assert!(message.contains("obj=task-121"), "{message}");
            }
            Body::Response(_) => panic!("not a fault"),
        }
        assert!(body(&parse(b"<html><body>502</body></html>").unwrap()).is_err());
    }

    #[test]
    fn a_failed_task_reads_its_fault_type_and_names_the_file() {
        let objs = parse_object_contents(&response("task_error_file_not_found.xml")).unwrap();
        assert_eq!(objs.len(), 1);
        assert_eq!(objs[0].obj, Moref::new("Task", "task-68"));
        match parse_task(&objs[0]).unwrap() {
            TaskState::Error { fault_type, message } => {
                assert_eq!(fault_type, "FileNotFound");
                assert!(message.contains("nodir/x-flat.vmdk"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // A real ESXi error: a localized message worth keeping.
        let objs = parse_object_contents(&response("task_error_esxi.xml")).unwrap();
        match parse_task(&objs[0]).unwrap() {
            TaskState::Error { fault_type, message } => {
                assert_eq!(fault_type, "FileAlreadyExists");
                assert!(
                    message.starts_with("Cannot complete the operation because the file or folder"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        let objs = parse_object_contents(&response("task_running.xml")).unwrap();
        match parse_task(&objs[0]).unwrap() {
            TaskState::Running { progress } => assert_eq!(progress, Some(42)),
            other => panic!("{other:?}"),
        }
        let objs = parse_object_contents(&response("task_success.xml")).unwrap();
        match parse_task(&objs[0]).unwrap() {
            TaskState::Success { result: Some(r) } => assert_eq!(r.trimmed(), "[LocalDS_0] dockvols/_DEFAULT/v.vmdk"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_properties_carry_their_fault() {
        let objs = parse_object_contents(&response("missing_set_not_authenticated.xml")).unwrap();
        assert_eq!(objs[0].missing.len(), 1);
        assert_eq!(objs[0].missing[0].0, "info.state");
        assert_eq!(objs[0].missing[0].1, "NotAuthenticated");
    }

    #[test]
    fn vm_devices_power_state_datastores_and_extra_config() {
        let objs = parse_object_contents(&response("vm_properties.xml")).unwrap();
        let vm = &objs[0];
        let Devices {
            controllers,
            disks,
            others,
        } = parse_devices(vm.prop("config.hardware.device").unwrap()).unwrap();
        // The simulator's CD-ROM sits on the PVSCSI controller, unit 0.
        let cdrom = others.iter().find(|d| d.type_name == "VirtualCdrom").unwrap();
        assert_eq!((cdrom.controller_key, cdrom.unit_number), (Some(202), Some(0)));
        assert_eq!(others.len(), 11);
        assert_eq!(
            controllers,
            vec![ScsiController {
                key: 202,
                bus_number: 0,
                kind: ScsiControllerKind::ParaVirtual,
                pci_slot_number: None,
                scsi_ctlr_unit_number: Some(7),
                devices: vec![],
            }]
        );
        assert_eq!(
            disks,
            vec![VirtualDisk {
                key: 255511522,
                label: Some("disk-202-0".into()),
                summary: Some("1,024 KB".into()),
                controller_key: Some(202),
                unit_number: Some(0),
                file_name: Some("[LocalDS_0] DC0_H0_VM0/disk1.vmdk".into()),
                backing_type: Some("VirtualDiskFlatVer2BackingInfo".into()),
                disk_mode: Some(DiskMode::Persistent),
                uuid: None,
                capacity_kb: Some(1024),
            }]
        );
        assert_eq!(
            parse_power_state(vm.prop("runtime.powerState").unwrap()).unwrap(),
            PowerState::PoweredOn
        );
        let stores = parse_moref_array(vm.prop("datastore").unwrap()).unwrap();
        assert_eq!(stores.len(), 1);
        assert_eq!(stores[0].kind, "Datastore");
        assert_eq!(
            parse_extra_config(vm.prop("config.extraConfig").unwrap()),
            vec![("govcsim".to_string(), "TRUE".to_string())]
        );
    }

    #[test]
    fn esxi_devices_with_pci_slots_and_other_controllers() {
        let objs = parse_object_contents(&response("vm_devices_esxi.xml")).unwrap();
        let Devices { controllers, disks, .. } =
            parse_devices(objs[0].prop("config.hardware.device").unwrap()).unwrap();
        assert_eq!(controllers.len(), 2);
        assert_eq!(controllers[0].kind, ScsiControllerKind::LsiLogic);
        assert_eq!(controllers[1].kind, ScsiControllerKind::ParaVirtual);
        assert_eq!(controllers[1].pci_slot_number, Some(224));
        assert_eq!(controllers[1].devices, vec![2016]);
        assert_eq!(disks[1].uuid.as_deref(), Some("6000C29d-1c5e-6d8b-6f5b-8b2d8e2e5a0b"));
        assert_eq!(disks[1].disk_mode, Some(DiskMode::IndependentPersistent));
    }

    #[test]
    fn datacenters_and_their_folder_paths() {
        let root = Moref::new("Folder", "group-d1");
        let objs = parse_object_contents(&response("datacenters_vpx.xml")).unwrap();
        let dcs = parse_datacenters(&objs, &root).unwrap();
        assert_eq!(dcs.len(), 1);
        assert_eq!(dcs[0].name, "DC0");
        assert_eq!(dcs[0].path, "DC0");
        assert_eq!(dcs[0].moref, Moref::new("Datacenter", "datacenter-2"));
        // A datacenter in nested folders, and one whose folder loops.
        let objs = parse_object_contents(&response("datacenters_nested.xml")).unwrap();
        let dcs = parse_datacenters(&objs, &root).unwrap();
        let paths: Vec<_> = dcs.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, ["Europe/Berlin/DC-B", "DC-A"]);
        // Europe's parent made Berlin: the walk up never reaches the root.
        let mut looping = objs.clone();
        let europe = looping.iter_mut().find(|o| o.obj.value == "group-d7").unwrap();
        europe.props.retain(|(n, _)| n != "parent");
        europe.props.push((
            "parent".into(),
            Node {
                name: "val".into(),
                mo_type: Some("Folder".into()),
                text: "group-d9".into(),
                ..Node::default()
            },
        ));
        assert!(parse_datacenters(&looping, &root).unwrap_err().contains("loop"));
    }

    #[test]
    fn datastore_summary() {
        let objs = parse_object_contents(&response("datastore_summary.xml")).unwrap();
        let d = parse_datastore(&objs[0]).unwrap();
        assert_eq!(d.name, "vsanDatastore");
        assert!(d.is_vsan());
        assert_eq!(d.capacity, 4398046511104);
        assert_eq!(d.free_space, 1099511627776);
        assert!(d.accessible);
    }

    #[test]
    fn create_disk_body_keeps_xsd_order_and_escapes() {
        let vdm = Moref::new("VirtualDiskManager", "virtualDiskManager");
        let dc = Moref::new("Datacenter", "datacenter-2");
        let body = create_virtual_disk(
            &vdm,
            &ds("[LocalDS_0] dockvols/_DEFAULT/a&b.vmdk"),
            Some(&dc),
            &DiskSpec {
                disk_type: DiskType::EagerZeroedThick,
                adapter_type: AdapterType::LsiLogic,
                capacity_kb: 1048576,
                profile: Some(ProfileId("aa6d5a82".into())),
            },
        );
        assert_eq!(
            body,
            "<CreateVirtualDisk_Task xmlns=\"urn:vim25\">\
             <_this type=\"VirtualDiskManager\">virtualDiskManager</_this>\
             <name>[LocalDS_0] dockvols/_DEFAULT/a&amp;b.vmdk</name>\
             <datacenter type=\"Datacenter\">datacenter-2</datacenter>\
             <spec xsi:type=\"FileBackedVirtualDiskSpec\"><diskType>eagerZeroedThick</diskType>\
             <adapterType>lsiLogic</adapterType><capacityKb>1048576</capacityKb>\
             <profile xsi:type=\"VirtualMachineDefinedProfileSpec\"><profileId>aa6d5a82</profileId></profile>\
             </spec></CreateVirtualDisk_Task>"
        );
        // Without a datacenter (ESXi) the element is left out.
        let body = delete_virtual_disk(&vdm, &ds("[ds] v.vmdk"), None);
        assert!(!body.contains("datacenter"), "{body}");
    }

    #[test]
    fn reconfig_body_keeps_xsd_order() {
        let vm = Moref::new("VirtualMachine", "vm-57");
        let body = reconfig_vm(
            &vm,
            &[
                DeviceChange::AddPvscsiController {
                    temp_key: -100,
                    bus_number: 1,
                },
                DeviceChange::AttachDisk {
                    temp_key: -101,
                    controller_key: -100,
                    unit_number: 0,
                    file: ds("[LocalDS_0] dockvols/_DEFAULT/v.vmdk"),
                    disk_mode: DiskMode::IndependentPersistent,
                    profile: Some(ProfileId("p-1".into())),
                },
                DeviceChange::SetDiskProfile {
                    disk: VirtualDisk {
                        key: 2002,
                        label: Some("Hard disk 3".into()),
                        summary: Some("4,096 KB".into()),
                        controller_key: Some(1000),
                        unit_number: Some(2),
                        file_name: Some("[LocalDS_0] dockvols/_DEFAULT/x.vmdk".into()),
                        backing_type: None,
                        disk_mode: None,
                        uuid: None,
                        capacity_kb: None,
                    },
                    profile: ProfileId("p-2".into()),
                },
                DeviceChange::RemoveDisk(VirtualDisk {
                    key: 2001,
                    label: None,
                    summary: None,
                    controller_key: Some(1000),
                    unit_number: Some(1),
                    file_name: Some("[LocalDS_0] dockvols/_DEFAULT/w.vmdk".into()),
                    backing_type: Some("VirtualDiskFlatVer2BackingInfo".into()),
                    disk_mode: Some(DiskMode::Persistent),
                    uuid: None,
                    capacity_kb: Some(4096),
                }),
            ],
            &[("disk.EnableUUID".into(), "TRUE".into())],
        );
        assert_eq!(
            body,
            "<ReconfigVM_Task xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">vm-57</_this><spec>\
             <deviceChange><operation>add</operation><device xsi:type=\"ParaVirtualSCSIController\">\
             <key>-100</key><busNumber>1</busNumber><sharedBus>noSharing</sharedBus></device></deviceChange>\
             <deviceChange><operation>add</operation><device xsi:type=\"VirtualDisk\"><key>-101</key>\
             <backing xsi:type=\"VirtualDiskFlatVer2BackingInfo\"><fileName>[LocalDS_0] dockvols/_DEFAULT/v.vmdk</fileName>\
             <diskMode>independent_persistent</diskMode></backing><controllerKey>-100</controllerKey>\
             <unitNumber>0</unitNumber><capacityInKB>0</capacityInKB></device>\
             <profile xsi:type=\"VirtualMachineDefinedProfileSpec\"><profileId>p-1</profileId></profile></deviceChange>\
             <deviceChange><operation>edit</operation><device xsi:type=\"VirtualDisk\"><key>2002</key>\
             <deviceInfo><label>Hard disk 3</label><summary>4,096 KB</summary></deviceInfo><backing xsi:type=\"VirtualDiskFlatVer2BackingInfo\"><fileName>[LocalDS_0] dockvols/_DEFAULT/x.vmdk</fileName></backing>\
             <controllerKey>1000</controllerKey><unitNumber>2</unitNumber><capacityInKB>0</capacityInKB></device>\
             <profile xsi:type=\"VirtualMachineDefinedProfileSpec\"><profileId>p-2</profileId></profile></deviceChange>\
             <deviceChange><operation>remove</operation><device xsi:type=\"VirtualDisk\"><key>2001</key>\
             <backing xsi:type=\"VirtualDiskFlatVer2BackingInfo\"><fileName>[LocalDS_0] dockvols/_DEFAULT/w.vmdk</fileName>\
             <diskMode>persistent</diskMode></backing><controllerKey>1000</controllerKey><unitNumber>1</unitNumber>\
             <capacityInKB>4096</capacityInKB></device></deviceChange>\
             <extraConfig><key>disk.EnableUUID</key><value xsi:type=\"xsd:string\">TRUE</value></extraConfig>\
             </spec></ReconfigVM_Task>"
        );
        assert!(!body.contains("fileOperation"));
    }

    #[test]
    fn other_bodies() {
        let fm = Moref::new("FileManager", "FileManager");
        let dc = Moref::new("Datacenter", "datacenter-2");
        assert_eq!(
            make_directory(&fm, &ds("[ds] dockvols/_DEFAULT"), Some(&dc), true),
            "<MakeDirectory xmlns=\"urn:vim25\"><_this type=\"FileManager\">FileManager</_this>\
             <name>[ds] dockvols/_DEFAULT</name><datacenter type=\"Datacenter\">datacenter-2</datacenter>\
             <createParentDirectories>true</createParentDirectories></MakeDirectory>"
        );
        let si = Moref::new("SearchIndex", "SearchIndex");
        assert_eq!(
            find_by_uuid(&si, None, "265104de-1472-547c-b873-6dc7883fb6cb"),
            "<FindByUuid xmlns=\"urn:vim25\"><_this type=\"SearchIndex\">SearchIndex</_this>\
             <uuid>265104de-1472-547c-b873-6dc7883fb6cb</uuid><vmSearch>true</vmSearch>\
             <instanceUuid>false</instanceUuid></FindByUuid>"
        );
        let vdm = Moref::new("VirtualDiskManager", "vdm");
        assert_eq!(
            copy_virtual_disk(&vdm, &ds("[a] x.vmdk"), &ds("[b] y.vmdk"), Some(&dc), false),
            "<CopyVirtualDisk_Task xmlns=\"urn:vim25\"><_this type=\"VirtualDiskManager\">vdm</_this>\
             <sourceName>[a] x.vmdk</sourceName><sourceDatacenter type=\"Datacenter\">datacenter-2</sourceDatacenter>\
             <destName>[b] y.vmdk</destName><destDatacenter type=\"Datacenter\">datacenter-2</destDatacenter>\
             <force>false</force></CopyVirtualDisk_Task>"
        );
        let pc = Moref::new("PropertyCollector", "pc");
        let root = Moref::new("Folder", "group-d1");
        assert_eq!(
            retrieve_properties(&pc, &[("Datacenter", &["name", "parent"])], Objects::FolderTree(&root)),
            "<RetrieveProperties xmlns=\"urn:vim25\"><_this type=\"PropertyCollector\">pc</_this><specSet>\
             <propSet><type>Datacenter</type><pathSet>name</pathSet><pathSet>parent</pathSet></propSet>\
             <objectSet><obj type=\"Folder\">group-d1</obj><skip>false</skip>\
             <selectSet xsi:type=\"TraversalSpec\"><name>folderTraversal</name><type>Folder</type>\
             <path>childEntity</path><skip>false</skip><selectSet><name>folderTraversal</name></selectSet>\
             </selectSet></objectSet></specSet></RetrieveProperties>"
        );
    }

    #[test]
    fn login_body_escapes_the_password() {
        let sm = Moref::new("SessionManager", "ha-sessionmgr");
        let body = login(&sm, "root", "p<&>\"'");
        assert!(
            body.contains("<password>p&lt;&amp;&gt;&quot;&apos;</password>"),
            "{body}"
        );
    }
}
