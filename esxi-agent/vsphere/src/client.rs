//! The client: one HTTPS connection pool, one vSphere session (its cookie
//! kept and renewed once when the server says `NotAuthenticated`), and the
//! typed calls the vsphere backend makes.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, CONTENT_TYPE, COOKIE, SET_COOKIE};
use reqwest::{StatusCode, Url};

use crate::error::{Error, Result};
use crate::pbm;
use crate::tls::{self, TlsTrust};
use crate::types::{
    About, ApiType, BiosUuid, Datacenter, Datastore, DatastorePath, DeviceChange, DiskSpec, FolderEntry, Moref,
    Profile, ProfileId, VmInfo, VsanRule,
};
use crate::vim::{self, Body, ObjectContent, Objects, ServiceContent, TaskState};
use crate::xml::{self, Node};

/// The session cookie vSphere sets on `Login`.
const SESSION_COOKIE: &str = "vmware_soap_session";
/// The largest SOAP response accepted (a VM's devices are tens of KiB).
const MAX_RESPONSE: u64 = 64 << 20;
/// The longest a task poll waits before asking again.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Called with a running task's percentage done (0–100) each time a poll
/// reads one.
pub type OnProgress<'a> = &'a (dyn Fn(u8) + Send + Sync);

/// A password that never shows in `Debug` output, errors or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// How to reach and log in to vCenter or ESXi.
#[derive(Debug, Clone)]
pub struct Config {
    /// `https://host/sdk` (a bare `https://host` gets `/sdk`).
    pub url: String,
    pub username: String,
    pub password: Password,
    pub tls: TlsTrust,
    /// The longest one HTTP request may take (connect, send, answer).
    pub request_timeout: Duration,
    /// The longest a task (create, copy, reconfigure...) may take.
    pub task_timeout: Duration,
}

impl Config {
    /// A configuration with a 60 s request timeout and a 10 min task timeout.
    pub fn new(url: impl Into<String>, username: impl Into<String>, password: Password, tls: TlsTrust) -> Self {
        Config {
            url: url.into(),
            username: username.into(),
            password,
            tls,
            request_timeout: Duration::from_secs(60),
            task_timeout: Duration::from_secs(600),
        }
    }
}

/// A logged-in vSphere client. Cheap to clone; clones share the session.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.sdk.as_str())
            .field("user", &self.inner.user)
            .field("api_type", &self.inner.content.about.api_type)
            .finish_non_exhaustive()
    }
}

struct Inner {
    http: reqwest::Client,
    sdk: Url,
    pbm: Url,
    user: String,
    password: Password,
    content: ServiceContent,
    vim_action: String,
    pbm_action: String,
    session: Mutex<Session>,
    login: tokio::sync::Mutex<()>,
    profile_manager: Mutex<Option<Moref>>,
    request_timeout: Duration,
    task_timeout: Duration,
}

#[derive(Debug, Default)]
struct Session {
    /// The cookie value exactly as the server set it (ESXi quotes it).
    cookie: Option<String>,
    /// Counts logins, so concurrent callers that all saw the session expire
    /// log in once.
    generation: u64,
}

/// Which SOAP endpoint a call goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Vim,
    Pbm,
}

/// An HTTP answer before interpretation.
struct Raw {
    status: StatusCode,
    set_cookie: Option<String>,
    body: Vec<u8>,
}

fn sdk_url(url: &str) -> Result<Url> {
    let invalid = |reason: &str| {
        Error::invalid(
            format!("vSphere URL {url:?}"),
            format!("{reason}; expected https://host/sdk or https://host:port/sdk"),
        )
    };
    let mut u = Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    if u.scheme() != "https" {
        return Err(invalid("the scheme is not https"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(invalid("there is no host"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(invalid("credentials belong in the credentials file, not in the URL"));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(invalid("it has a query or fragment"));
    }
    if u.path() == "/" || u.path().is_empty() {
        u.set_path("/sdk");
    }
    Ok(u)
}

/// The value of the session cookie in a `Set-Cookie` header.
fn session_cookie(set_cookie: &str) -> Option<String> {
    let first = set_cookie.split(';').next()?.trim();
    let (name, value) = first.split_once('=')?;
    (name.trim() == SESSION_COOKIE && !value.trim().is_empty()).then(|| value.trim().to_owned())
}

fn envelope(header: Option<&str>, body: &str) -> String {
    let mut s = String::with_capacity(body.len() + 400);
    s.push_str(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">",
    );
    if let Some(h) = header {
        s.push_str("<soapenv:Header>");
        s.push_str(h);
        s.push_str("</soapenv:Header>");
    }
    s.push_str("<soapenv:Body>");
    s.push_str(body);
    s.push_str("</soapenv:Body></soapenv:Envelope>");
    s
}

/// The whole chain of an error's messages, `a: b: c`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

impl Client {
    /// Connects, reads the service content and logs in.
    pub async fn connect(config: Config) -> Result<Client> {
        let sdk = sdk_url(&config.url)?;
        let mut pbm = sdk.clone();
        pbm.set_path("/pbm");
        let tls = tls::client_config(&config.tls)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(30)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("vmdk-vsphere/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::invalid("HTTP client", chain(&e)))?;

        // The service content comes before any session; its apiVersion then
        // names the SOAPAction of every later call.
        let probe = Probe {
            http: &http,
            url: &sdk,
            timeout: config.request_timeout,
        };
        let raw = probe
            .send(
                "urn:vim25/6.5",
                &envelope(None, &vim::retrieve_service_content()),
                "RetrieveServiceContent",
            )
            .await?;
        let resp = interpret(&raw, "RetrieveServiceContent", sdk.as_str())?;
        let content = vim::parse_service_content(&resp).map_err(|m| Error::xml("RetrieveServiceContent", m))?;
        let api = content.about.api_version.clone();
        let client = Client {
            inner: Arc::new(Inner {
                http,
                sdk,
                pbm,
                user: config.username,
                password: config.password,
                vim_action: format!("urn:vim25/{api}"),
                pbm_action: format!("urn:pbm/{api}"),
                content,
                session: Mutex::new(Session::default()),
                login: tokio::sync::Mutex::new(()),
                profile_manager: Mutex::new(None),
                request_timeout: config.request_timeout,
                task_timeout: config.task_timeout,
            }),
        };
        client.login().await?;
        Ok(client)
    }

    /// What the server says it is.
    pub fn about(&self) -> &About {
        &self.inner.content.about
    }

    /// True for vCenter (PBM, several datacenters), false for a standalone host.
    pub fn is_vcenter(&self) -> bool {
        self.about().api_type == ApiType::VirtualCenter
    }

    /// The SDK URL this client talks to.
    pub fn url(&self) -> &str {
        self.inner.sdk.as_str()
    }

    /// Ends the session. Later calls log in again.
    pub async fn logout(&self) -> Result<()> {
        let body = vim::logout(&self.inner.content.session_manager);
        let sm = self.inner.content.session_manager.value.clone();
        let result = self.call_once(Endpoint::Vim, "Logout", &sm, &body, &|_| Ok(())).await;
        self.inner.session.lock().unwrap_or_else(|e| e.into_inner()).cookie = None;
        result
    }

    // ------------------------------------------------------------------
    // Session

    fn generation(&self) -> u64 {
        self.inner.session.lock().unwrap_or_else(|e| e.into_inner()).generation
    }

    fn cookie(&self) -> Option<String> {
        self.inner
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cookie
            .clone()
    }

    async fn login(&self) -> Result<()> {
        let inner = &self.inner;
        let body = vim::login(&inner.content.session_manager, &inner.user, inner.password.expose());
        let raw = self.send(Endpoint::Vim, "Login", &envelope(None, &body), None).await?;
        match interpret(&raw, "Login", &inner.content.session_manager.value) {
            Ok(_) => {}
            Err(Error::Fault {
                fault_type, message, ..
            }) if fault_type == "InvalidLogin" => {
                return Err(Error::Auth {
                    url: inner.sdk.to_string(),
                    user: inner.user.clone(),
                    message,
                })
            }
            Err(e) => return Err(e),
        }
        let cookie = raw.set_cookie.ok_or_else(|| Error::Http {
            what: format!("Login to {}", inner.sdk),
            message: format!("the server set no {SESSION_COOKIE} cookie"),
        })?;
        let mut session = inner.session.lock().unwrap_or_else(|e| e.into_inner());
        session.cookie = Some(cookie);
        session.generation += 1;
        tracing::debug!(url = %inner.sdk, user = %inner.user, "logged in to vSphere");
        Ok(())
    }

    /// Logs in again unless another caller already did since `generation`.
    async fn relogin(&self, generation: u64) -> Result<()> {
        let _one_at_a_time = self.inner.login.lock().await;
        if self.generation() != generation {
            return Ok(());
        }
        tracing::info!(url = %self.inner.sdk, "the vSphere session expired; logging in again");
        self.inner.session.lock().unwrap_or_else(|e| e.into_inner()).cookie = None;
        self.login().await
    }

    /// Runs `attempt`; when it fails with `NotAuthenticated`, logs in again
    /// once and runs it again.
    async fn with_session<T, F, Fut>(&self, attempt: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let generation = self.generation();
        match attempt().await {
            Err(e) if e.is_not_authenticated() => {
                self.relogin(generation).await?;
                attempt().await
            }
            other => other,
        }
    }

    // ------------------------------------------------------------------
    // Transport

    async fn send(&self, endpoint: Endpoint, method: &str, envelope: &str, cookie: Option<&str>) -> Result<Raw> {
        let (url, action) = match endpoint {
            Endpoint::Vim => (&self.inner.sdk, &self.inner.vim_action),
            Endpoint::Pbm => (&self.inner.pbm, &self.inner.pbm_action),
        };
        let probe = Probe {
            http: &self.inner.http,
            url,
            timeout: self.inner.request_timeout,
        };
        probe.send_with_cookie(action, envelope, method, cookie).await
    }

    /// One call without re-login: sends, reads the answer, parses it.
    async fn call_once<T>(
        &self,
        endpoint: Endpoint,
        method: &str,
        object: &str,
        body: &str,
        parse: &(dyn Fn(&Node) -> Result<T> + Sync),
    ) -> Result<T> {
        let cookie = self.cookie();
        let header = match (endpoint, &cookie) {
            // PBM on vCenter wants the vim session id in a SOAP header.
            (Endpoint::Pbm, Some(c)) => Some(format!(
                "<vcSessionCookie>{}</vcSessionCookie>",
                xml::escape(c.trim_matches('"'))
            )),
            _ => None,
        };
        let started = Instant::now();
        let raw = self
            .send(endpoint, method, &envelope(header.as_deref(), body), cookie.as_deref())
            .await?;
        if endpoint == Endpoint::Pbm && raw.status == StatusCode::NOT_FOUND {
            return Err(Error::NotSupported {
                what: format!("storage policies (no PBM service at {}, {method})", self.inner.pbm),
                server: self.about().full_name.clone(),
            });
        }
        let resp = interpret(&raw, method, object)?;
        tracing::debug!(method, object, elapsed = ?started.elapsed(), "vSphere call");
        parse(&resp)
    }

    async fn call<T>(
        &self,
        endpoint: Endpoint,
        method: &str,
        object: &str,
        body: String,
        parse: impl Fn(&Node) -> Result<T> + Sync,
    ) -> Result<T> {
        self.with_session(|| self.call_once(endpoint, method, object, &body, &parse))
            .await
    }

    async fn vim<T>(
        &self,
        method: &str,
        object: &str,
        body: String,
        parse: impl Fn(&Node) -> Result<T> + Sync,
    ) -> Result<T> {
        self.call(Endpoint::Vim, method, object, body, parse).await
    }

    /// `RetrieveProperties`. A property refused with `NotAuthenticated`
    /// (how the simulator answers without a session) counts as the call's
    /// fault, so the session is renewed.
    async fn retrieve(
        &self,
        object: &str,
        specs: &[(&str, &[&str])],
        objects: Objects<'_>,
    ) -> Result<Vec<ObjectContent>> {
        let body = vim::retrieve_properties(&self.inner.content.property_collector, specs, objects);
        self.vim("RetrieveProperties", object, body, |resp| {
            let objs = vim::parse_object_contents(resp).map_err(|m| Error::xml("RetrieveProperties", m))?;
            for o in &objs {
                if let Some((path, ty, msg)) = o.missing.iter().find(|(_, ty, _)| ty == "NotAuthenticated") {
                    return Err(Error::Fault {
                        method: "RetrieveProperties".into(),
                        object: format!("{} {path}", o.obj.value),
                        fault_type: ty.clone(),
                        message: msg.clone(),
                    });
                }
            }
            Ok(objs)
        })
        .await
    }

    /// Waits for a task by polling `info.state` (backing off up to 1 s
    /// between polls) until it succeeds, fails or the task timeout passes.
    /// Returns `info.result`.
    async fn wait_task(
        &self,
        task: &Moref,
        method: &str,
        object: &str,
        on_progress: OnProgress<'_>,
    ) -> Result<Option<Node>> {
        let timeout = self.inner.task_timeout;
        let deadline = Instant::now() + timeout;
        let timed_out = || Error::Timeout {
            what: format!("{method} on {object} (task {})", task.value),
            after: timeout,
        };
        let mut interval = Duration::from_millis(20);
        let tasks = [task.clone()];
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(timed_out());
            }
            let poll = self.retrieve(
                &task.value,
                &[("Task", &["info.state", "info.error", "info.result", "info.progress"])],
                Objects::List(&tasks),
            );
            let objs = tokio::time::timeout(remaining, poll).await.map_err(|_| timed_out())??;
            let obj = objs.first().ok_or_else(|| Error::NotFound {
                what: format!("task {} of {method} on {object}", task.value),
            })?;
            let state = vim::parse_task(obj).map_err(|m| Error::xml(format!("task {}", task.value), m))?;
            match state {
                TaskState::Success { result } => return Ok(result),
                TaskState::Error { fault_type, message } => {
                    return Err(Error::Fault {
                        method: method.to_owned(),
                        object: object.to_owned(),
                        fault_type,
                        message,
                    })
                }
                TaskState::Queued | TaskState::Running { .. } => {
                    if let TaskState::Running { progress: Some(p) } = state {
                        on_progress(p);
                    }
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(interval.min(remaining)).await;
                    interval = (interval * 2).min(MAX_POLL_INTERVAL);
                }
            }
        }
    }

    /// Starts a task method and waits for it.
    async fn run_task(&self, method: &str, object: &str, body: String) -> Result<Option<Node>> {
        self.run_task_reporting(method, object, body, &|_| {}).await
    }

    /// [`Client::run_task`], calling `on_progress` with each percentage the
    /// server reports while the task runs.
    async fn run_task_reporting(
        &self,
        method: &str,
        object: &str,
        body: String,
        on_progress: OnProgress<'_>,
    ) -> Result<Option<Node>> {
        let task = self
            .vim(method, object, body, |resp| {
                vim::parse_moref_returnval(resp).map_err(|m| Error::xml(method, m))
            })
            .await?;
        self.wait_task(&task, method, object, on_progress).await
    }

    /// The datacenter argument of FileManager and VirtualDiskManager calls:
    /// required by vCenter, left out on a standalone host.
    fn dc_arg<'a>(&self, dc: &'a Datacenter) -> Option<&'a Moref> {
        self.is_vcenter().then_some(&dc.moref)
    }

    fn file_manager(&self) -> Result<&Moref> {
        self.inner
            .content
            .file_manager
            .as_ref()
            .ok_or_else(|| Error::NotSupported {
                what: "FileManager".into(),
                server: self.about().full_name.clone(),
            })
    }

    fn disk_manager(&self) -> Result<&Moref> {
        self.inner
            .content
            .virtual_disk_manager
            .as_ref()
            .ok_or_else(|| Error::NotSupported {
                what: "VirtualDiskManager".into(),
                server: self.about().full_name.clone(),
            })
    }

    // ------------------------------------------------------------------
    // Inventory

    /// Every datacenter, with its inventory path.
    pub async fn datacenters(&self) -> Result<Vec<Datacenter>> {
        let root = &self.inner.content.root_folder;
        let objs = self
            .retrieve(
                &root.value,
                &[("Datacenter", &["name", "parent"]), ("Folder", &["name", "parent"])],
                Objects::FolderTree(root),
            )
            .await?;
        vim::parse_datacenters(&objs, root).map_err(|m| Error::xml("RetrieveProperties (datacenters)", m))
    }

    /// The datacenter to use: the named one (by name or path), or the only
    /// one when no name is given.
    pub async fn datacenter(&self, name: Option<&str>) -> Result<Datacenter> {
        let all = self.datacenters().await?;
        let names = || all.iter().map(|d| d.path.as_str()).collect::<Vec<_>>().join(", ");
        match name {
            Some(n) => all
                .iter()
                .find(|d| d.name == n || d.path == n)
                .cloned()
                .ok_or_else(|| Error::NotFound {
                    what: format!("datacenter {n:?} (the server has: {})", names()),
                }),
            None => match all.len() {
                1 => Ok(all[0].clone()),
                0 => Err(Error::NotFound {
                    what: "any datacenter".into(),
                }),
                n => Err(Error::invalid(
                    "datacenter",
                    format!("none configured and the server has {n} ({}): name one", names()),
                )),
            },
        }
    }

    /// Every datastore of a datacenter, as `summary` describes it.
    pub async fn datastores(&self, dc: &Datacenter) -> Result<Vec<Datastore>> {
        // Datacenter.datastore -> each Datastore's summary, in one call.
        let objs = self
            .retrieve(
                &dc.moref.value,
                &[("Datastore", &["summary"])],
                Objects::Traverse {
                    from: &dc.moref,
                    kind: "Datacenter",
                    path: "datastore",
                },
            )
            .await?;
        objs.iter()
            .filter(|o| o.obj.kind == "Datastore")
            .map(|o| vim::parse_datastore(o).map_err(|m| Error::xml(format!("datastore {}", o.obj.value), m)))
            .collect()
    }

    /// The datastore with this name.
    pub async fn datastore(&self, dc: &Datacenter, name: &str) -> Result<Datastore> {
        let all = self.datastores(dc).await?;
        all.iter()
            .find(|d| d.name == name)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                what: format!(
                    "datastore {name:?} in datacenter {} (it has: {})",
                    dc.path,
                    all.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
                ),
            })
    }

    /// The VM with this BIOS UUID, tried as given and then with its first
    /// three fields byte-swapped (how Linux shows `product_uuid` on older
    /// virtual hardware). `dc` narrows the search on vCenter.
    pub async fn find_vm_by_bios_uuid(&self, dc: Option<&Datacenter>, uuid: &BiosUuid) -> Result<Moref> {
        let si = &self.inner.content.search_index;
        let dc = dc.map(|d| &d.moref);
        let mut tried = Vec::new();
        for candidate in [*uuid, uuid.swapped()] {
            let text = candidate.to_string();
            if tried.contains(&text) {
                continue;
            }
            let body = vim::find_by_uuid(si, dc, &text);
            let found = self
                .vim("FindByUuid", &text, body, |resp| {
                    vim::parse_optional_moref_returnval(resp).map_err(|m| Error::xml("FindByUuid", m))
                })
                .await?;
            if let Some(vm) = found {
                if vm.kind != "VirtualMachine" {
                    return Err(Error::xml(
                        "FindByUuid",
                        format!("it returned a {}, not a VirtualMachine", vm.kind),
                    ));
                }
                return Ok(vm);
            }
            tried.push(text);
        }
        Err(Error::NotFound {
            what: format!("a VM with BIOS UUID {}", tried.join(" or ")),
        })
    }

    /// A VM's name, BIOS UUID, power state, SCSI controllers, disks,
    /// datastores and extraConfig.
    pub async fn vm_info(&self, vm: &Moref) -> Result<VmInfo> {
        const PATHS: &[&str] = &[
            "name",
            "config.uuid",
            "config.hardware.device",
            "runtime.powerState",
            "datastore",
            "config.extraConfig",
        ];
        let objs = match self
            .retrieve(
                &vm.value,
                &[("VirtualMachine", PATHS)],
                Objects::List(std::slice::from_ref(vm)),
            )
            .await
        {
            Err(Error::Fault { fault_type, .. }) if fault_type == "ManagedObjectNotFound" => {
                return Err(Error::NotFound {
                    what: format!("VM {}", vm.value),
                })
            }
            other => other?,
        };
        let obj = objs.into_iter().find(|o| &o.obj == vm).ok_or_else(|| Error::NotFound {
            what: format!("VM {}", vm.value),
        })?;
        let xml_err = |m: String| Error::xml(format!("properties of VM {}", vm.value), m);
        let devices = match obj.prop("config.hardware.device") {
            Some(devs) => vim::parse_devices(devs).map_err(xml_err)?,
            None => vim::Devices::default(),
        };
        let power_state = vim::parse_power_state(
            obj.prop("runtime.powerState")
                .ok_or_else(|| xml_err("no runtime.powerState".into()))?,
        )
        .map_err(xml_err)?;
        Ok(VmInfo {
            moref: vm.clone(),
            name: obj.prop("name").map(|n| n.trimmed().to_owned()).unwrap_or_default(),
            bios_uuid: obj
                .prop("config.uuid")
                .map(|n| n.trimmed().to_owned())
                .filter(|u| !u.is_empty()),
            power_state,
            controllers: devices.controllers,
            disks: devices.disks,
            other_devices: devices.others,
            datastores: match obj.prop("datastore") {
                Some(v) => vim::parse_moref_array(v).map_err(xml_err)?,
                None => Vec::new(),
            },
            extra_config: obj
                .prop("config.extraConfig")
                .map(vim::parse_extra_config)
                .unwrap_or_default(),
        })
    }

    /// `ReconfigVM_Task` with these device changes and `extraConfig`
    /// options, waiting for the task. Refuses, without calling the server,
    /// a temporary key that is not negative, a bus number outside 0–3 and a
    /// unit outside 0–15 or equal to 7 (the controller's own).
    pub async fn reconfigure_vm(
        &self,
        vm: &Moref,
        changes: &[DeviceChange],
        extra_config: &[(String, String)],
    ) -> Result<()> {
        if changes.is_empty() && extra_config.is_empty() {
            return Err(Error::invalid("VM reconfiguration", "it changes nothing"));
        }
        for change in changes {
            match change {
                DeviceChange::AddPvscsiController { temp_key, bus_number } => {
                    if *temp_key >= 0 {
                        return Err(Error::invalid(
                            format!("temporary device key {temp_key}"),
                            "a new device's key must be negative",
                        ));
                    }
                    if !(0..=3).contains(bus_number) {
                        return Err(Error::invalid(
                            format!("SCSI bus number {bus_number}"),
                            "a VM has at most four SCSI controllers, buses 0 to 3",
                        ));
                    }
                }
                DeviceChange::AttachDisk {
                    temp_key, unit_number, ..
                } => {
                    if *temp_key >= 0 {
                        return Err(Error::invalid(
                            format!("temporary device key {temp_key}"),
                            "a new device's key must be negative",
                        ));
                    }
                    if !(0..=15).contains(unit_number) || *unit_number == 7 {
                        return Err(Error::invalid(
                            format!("SCSI unit number {unit_number}"),
                            "units are 0 to 15 and never 7 (the controller's own)",
                        ));
                    }
                }
                DeviceChange::SetDiskProfile { .. } | DeviceChange::RemoveDisk(_) => {}
            }
        }
        let body = vim::reconfig_vm(vm, changes, extra_config);
        self.run_task("ReconfigVM_Task", &vm.value, body).await.map(drop)
    }

    // ------------------------------------------------------------------
    // Files and disks

    /// `FileManager.MakeDirectory`. Fails with the fault `FileAlreadyExists`
    /// when the directory exists.
    pub async fn make_directory(&self, dc: &Datacenter, path: &DatastorePath, create_parents: bool) -> Result<()> {
        let body = vim::make_directory(self.file_manager()?, path, self.dc_arg(dc), create_parents);
        self.vim("MakeDirectory", &path.to_string(), body, |_| Ok(())).await
    }

    /// `VirtualDiskManager.CreateVirtualDisk_Task`; returns the path the
    /// server reports.
    pub async fn create_virtual_disk(
        &self,
        dc: &Datacenter,
        path: &DatastorePath,
        spec: &DiskSpec,
    ) -> Result<DatastorePath> {
        self.create_virtual_disk_reporting(dc, path, spec, &|_| {}).await
    }

    /// [`Client::create_virtual_disk`], calling `on_progress` with the
    /// task's percentage done whenever a poll reads one (an eagerZeroedThick
    /// disk is zeroed by that task, which may take minutes).
    pub async fn create_virtual_disk_reporting(
        &self,
        dc: &Datacenter,
        path: &DatastorePath,
        spec: &DiskSpec,
        on_progress: OnProgress<'_>,
    ) -> Result<DatastorePath> {
        if spec.capacity_kb == 0 {
            return Err(Error::invalid("disk capacity 0 KB", "a disk has at least 1 KB"));
        }
        let body = vim::create_virtual_disk(self.disk_manager()?, path, self.dc_arg(dc), spec);
        let result = self
            .run_task_reporting("CreateVirtualDisk_Task", &path.to_string(), body, on_progress)
            .await?;
        match result.as_ref().map(|r| r.trimmed()).filter(|r| !r.is_empty()) {
            Some(r) => r.parse(),
            None => Ok(path.clone()),
        }
    }

    /// `VirtualDiskManager.DeleteVirtualDisk_Task` (the descriptor and its extents).
    pub async fn delete_virtual_disk(&self, dc: &Datacenter, path: &DatastorePath) -> Result<()> {
        let body = vim::delete_virtual_disk(self.disk_manager()?, path, self.dc_arg(dc));
        self.run_task("DeleteVirtualDisk_Task", &path.to_string(), body)
            .await
            .map(drop)
    }

    /// `VirtualDiskManager.CopyVirtualDisk_Task` within one datacenter;
    /// `force` overwrites an existing destination.
    pub async fn copy_virtual_disk(
        &self,
        dc: &Datacenter,
        source: &DatastorePath,
        dest: &DatastorePath,
        force: bool,
    ) -> Result<()> {
        self.copy_virtual_disk_reporting(dc, source, dest, force, &|_| {}).await
    }

    /// [`Client::copy_virtual_disk`], calling `on_progress` with the task's
    /// percentage done whenever a poll reads one.
    pub async fn copy_virtual_disk_reporting(
        &self,
        dc: &Datacenter,
        source: &DatastorePath,
        dest: &DatastorePath,
        force: bool,
        on_progress: OnProgress<'_>,
    ) -> Result<()> {
        let body = vim::copy_virtual_disk(self.disk_manager()?, source, dest, self.dc_arg(dc), force);
        self.run_task_reporting(
            "CopyVirtualDisk_Task",
            &format!("{source} -> {dest}"),
            body,
            on_progress,
        )
        .await
        .map(drop)
    }

    /// `VirtualDiskManager.QueryVirtualDiskUuid`.
    pub async fn query_virtual_disk_uuid(&self, dc: &Datacenter, path: &DatastorePath) -> Result<String> {
        let body = vim::query_virtual_disk_uuid(self.disk_manager()?, path, self.dc_arg(dc));
        self.vim("QueryVirtualDiskUuid", &path.to_string(), body, |resp| {
            vim::parse_string_returnval(resp).map_err(|m| Error::xml("QueryVirtualDiskUuid", m))
        })
        .await
    }

    /// The files and folders directly in datastore folder `folder`
    /// (`HostDatastoreBrowser.SearchDatastore_Task`); [`Error::NotFound`]
    /// when the folder does not exist.
    pub async fn list_datastore_folder(&self, dc: &Datacenter, folder: &DatastorePath) -> Result<Vec<FolderEntry>> {
        let ds = self.datastore(dc, folder.datastore()).await?;
        let objs = self
            .retrieve(
                &ds.moref.value,
                &[("Datastore", &["browser"])],
                Objects::List(std::slice::from_ref(&ds.moref)),
            )
            .await?;
        let browser = objs
            .iter()
            .find_map(|o| o.prop("browser"))
            .ok_or_else(|| Error::xml("RetrieveProperties", "the datastore has no browser"))
            .and_then(|n| vim::parse_moref_node(n).map_err(|m| Error::xml("RetrieveProperties", m)))?;
        let body = vim::search_datastore(&browser, folder);
        match self.run_task("SearchDatastore_Task", &folder.to_string(), body).await {
            Ok(Some(result)) => vim::parse_search_results(&result).map_err(|m| Error::xml("SearchDatastore_Task", m)),
            Ok(None) => Ok(Vec::new()),
            Err(Error::Fault { fault_type, .. }) if fault_type == "FileNotFound" => Err(Error::NotFound {
                what: format!("datastore folder {folder}"),
            }),
            Err(e) => Err(e),
        }
    }

    /// `FileManager.DeleteDatastoreFile_Task` (a file or a directory).
    pub async fn delete_datastore_file(&self, dc: &Datacenter, path: &DatastorePath) -> Result<()> {
        let body = vim::delete_datastore_file(self.file_manager()?, path, self.dc_arg(dc));
        self.run_task("DeleteDatastoreFile_Task", &path.to_string(), body)
            .await
            .map(drop)
    }

    /// The datastore file API URL: `https://host/folder/<path>?dcPath=&dsName=`.
    fn folder_url(&self, dc: &Datacenter, path: &DatastorePath) -> Result<Url> {
        if path.path().is_empty() {
            return Err(Error::invalid(
                format!("datastore file {path}"),
                "it names the datastore, not a file",
            ));
        }
        let mut url = self.inner.sdk.clone();
        url.set_path("/folder");
        url.path_segments_mut()
            .map_err(|_| Error::invalid("vSphere URL", "it cannot have a path"))?
            .extend(path.path().split('/'));
        url.query_pairs_mut()
            .append_pair("dcPath", &dc.path)
            .append_pair("dsName", path.datastore());
        Ok(url)
    }

    /// Reads a small file through the datastore file API, refusing one
    /// larger than `limit` bytes.
    pub async fn read_datastore_file(&self, dc: &Datacenter, path: &DatastorePath, limit: u64) -> Result<Vec<u8>> {
        let url = self.folder_url(dc, path)?;
        let what = format!("GET {path}");
        self.with_session(|| async {
            let mut req = self.inner.http.get(url.clone()).timeout(self.inner.request_timeout);
            if let Some(c) = self.cookie() {
                req = req.header(COOKIE, cookie_header(&c)?);
            }
            let resp = req.send().await.map_err(|e| self.request_error(&what, e))?;
            match resp.status() {
                StatusCode::OK => read_bounded(resp, limit, &what, self.inner.request_timeout).await,
                StatusCode::NOT_FOUND => Err(Error::NotFound {
                    what: format!("datastore file {path}"),
                }),
                StatusCode::UNAUTHORIZED => Err(not_authenticated(&what)),
                s => Err(Error::Http {
                    what: what.clone(),
                    message: format!("HTTP status {s}"),
                }),
            }
        })
        .await
    }

    /// Writes (creates or replaces) a small file through the datastore file API.
    pub async fn write_datastore_file(&self, dc: &Datacenter, path: &DatastorePath, contents: &[u8]) -> Result<()> {
        let url = self.folder_url(dc, path)?;
        let what = format!("PUT {path}");
        self.with_session(|| async {
            let mut req = self
                .inner
                .http
                .put(url.clone())
                .timeout(self.inner.request_timeout)
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(contents.to_vec());
            if let Some(c) = self.cookie() {
                req = req.header(COOKIE, cookie_header(&c)?);
            }
            let resp = req.send().await.map_err(|e| self.request_error(&what, e))?;
            match resp.status() {
                s if s.is_success() => Ok(()),
                StatusCode::UNAUTHORIZED => Err(not_authenticated(&what)),
                StatusCode::NOT_FOUND => Err(Error::NotFound {
                    what: format!("datastore or folder of {path}"),
                }),
                s => Err(Error::Http {
                    what: what.clone(),
                    message: format!("HTTP status {s}"),
                }),
            }
        })
        .await
    }

    fn request_error(&self, what: &str, e: reqwest::Error) -> Error {
        request_error(what, &self.inner.sdk, self.inner.request_timeout, e)
    }

    // ------------------------------------------------------------------
    // Storage policies (PBM, vCenter only)

    async fn profile_manager(&self) -> Result<Moref> {
        if let Some(pm) = self
            .inner
            .profile_manager
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(pm);
        }
        let pm = self
            .call(
                Endpoint::Pbm,
                "PbmRetrieveServiceContent",
                "ServiceInstance",
                pbm::retrieve_service_content(),
                |resp| pbm::parse_profile_manager(resp).map_err(|m| Error::xml("PbmRetrieveServiceContent", m)),
            )
            .await?;
        *self.inner.profile_manager.lock().unwrap_or_else(|e| e.into_inner()) = Some(pm.clone());
        Ok(pm)
    }

    /// Every storage requirement profile. `NotSupported` without vCenter.
    pub async fn pbm_profiles(&self) -> Result<Vec<Profile>> {
        let pm = self.profile_manager().await?;
        let ids = self
            .call(
                Endpoint::Pbm,
                "PbmQueryProfile",
                &pm.value,
                pbm::query_profile(&pm),
                |resp| pbm::parse_profile_ids(resp).map_err(|m| Error::xml("PbmQueryProfile", m)),
            )
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.call(
            Endpoint::Pbm,
            "PbmRetrieveContent",
            &pm.value,
            pbm::retrieve_content(&pm, &ids),
            |resp| pbm::parse_profiles(resp).map_err(|m| Error::xml("PbmRetrieveContent", m)),
        )
        .await
    }

    /// The profile with this name, if any.
    pub async fn pbm_profile_by_name(&self, name: &str) -> Result<Option<Profile>> {
        Ok(self.pbm_profiles().await?.into_iter().find(|p| p.name == name))
    }

    /// Creates a requirement profile of VSAN rules; returns its id.
    pub async fn pbm_create_vsan_profile(
        &self,
        name: &str,
        description: &str,
        rules: &[VsanRule],
    ) -> Result<ProfileId> {
        if name.trim().is_empty() {
            return Err(Error::invalid("storage profile name", "it is empty"));
        }
        if rules.is_empty() {
            return Err(Error::invalid(format!("storage profile {name:?}"), "it has no rule"));
        }
        let pm = self.profile_manager().await?;
        self.call(
            Endpoint::Pbm,
            "PbmCreate",
            name,
            pbm::create(&pm, name, description, rules),
            |resp| pbm::parse_created(resp).map_err(|m| Error::xml("PbmCreate", m)),
        )
        .await
    }

    /// Deletes profiles; fails naming the first one the server kept.
    pub async fn pbm_delete_profiles(&self, ids: &[ProfileId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let pm = self.profile_manager().await?;
        let object = ids.iter().map(|i| i.0.as_str()).collect::<Vec<_>>().join(", ");
        let failures = self
            .call(Endpoint::Pbm, "PbmDelete", &object, pbm::delete(&pm, ids), |resp| {
                Ok(pbm::parse_delete_failures(resp))
            })
            .await?;
        match failures.into_iter().next() {
            None => Ok(()),
            Some((id, fault_type, message)) => Err(Error::Fault {
                method: "PbmDelete".into(),
                object: id,
                fault_type,
                message,
            }),
        }
    }
}

/// A request before there is a client (the service content) or with an
/// explicit cookie.
struct Probe<'a> {
    http: &'a reqwest::Client,
    url: &'a Url,
    timeout: Duration,
}

impl Probe<'_> {
    async fn send(&self, action: &str, envelope: &str, method: &str) -> Result<Raw> {
        self.send_with_cookie(action, envelope, method, None).await
    }

    async fn send_with_cookie(&self, action: &str, envelope: &str, method: &str, cookie: Option<&str>) -> Result<Raw> {
        let what = format!("{method} at {}", self.url);
        let mut req = self
            .http
            .post(self.url.clone())
            .timeout(self.timeout)
            .header(CONTENT_TYPE, "text/xml; charset=\"utf-8\"")
            .header("SOAPAction", format!("\"{action}\""))
            .body(envelope.to_owned());
        if let Some(c) = cookie {
            req = req.header(COOKIE, cookie_header(c)?);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| request_error(&what, self.url, self.timeout, e))?;
        let status = resp.status();
        let set_cookie = resp
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(session_cookie);
        let body = read_bounded(resp, MAX_RESPONSE, &what, self.timeout).await?;
        Ok(Raw {
            status,
            set_cookie,
            body,
        })
    }
}

fn cookie_header(cookie: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(&format!("{SESSION_COOKIE}={cookie}"))
        .map_err(|_| Error::xml("Login", "the session cookie is not a valid header value"))
}

/// The datastore file API's HTTP 401, as the fault that renews the session.
fn not_authenticated(what: &str) -> Error {
    Error::Fault {
        method: "datastore file API".into(),
        object: what.to_owned(),
        fault_type: "NotAuthenticated".into(),
        message: "HTTP status 401 Unauthorized".into(),
    }
}

fn request_error(what: &str, url: &Url, timeout: Duration, e: reqwest::Error) -> Error {
    if let Some(failure) = tls::classify(&e) {
        return Error::Tls {
            url: url.to_string(),
            failure,
        };
    }
    if e.is_timeout() {
        return Error::Timeout {
            what: what.to_owned(),
            after: timeout,
        };
    }
    Error::Http {
        what: what.to_owned(),
        message: chain(&e),
    }
}

/// Reads a response body, refusing more than `limit` bytes.
async fn read_bounded(mut resp: reqwest::Response, limit: u64, what: &str, timeout: Duration) -> Result<Vec<u8>> {
    let url = resp.url().clone();
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(Error::TooLarge {
            what: what.to_owned(),
            limit,
        });
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| request_error(what, &url, timeout, e))? {
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Err(Error::TooLarge {
                what: what.to_owned(),
                limit,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Turns an HTTP answer into the SOAP response element, or the typed fault.
fn interpret(raw: &Raw, method: &str, object: &str) -> Result<Node> {
    if raw.status != StatusCode::OK && raw.status != StatusCode::INTERNAL_SERVER_ERROR {
        return Err(Error::Http {
            what: format!("{method} on {object}"),
            message: format!("HTTP status {}", raw.status),
        });
    }
    let env = xml::parse(&raw.body).map_err(|m| {
        Error::xml(
            method,
            if raw.status == StatusCode::OK {
                m
            } else {
                format!("HTTP status {} and {m}", raw.status)
            },
        )
    })?;
    match vim::body(&env).map_err(|m| Error::xml(method, m))? {
        Body::Response(r) => Ok(r.clone()),
        Body::Fault { fault_type, message } => Err(Error::Fault {
            method: method.to_owned(),
            object: object.to_owned(),
            fault_type,
            message,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_urls_are_https_without_credentials() {
        assert_eq!(
            sdk_url("https://vc.example").unwrap().as_str(),
            "https://vc.example/sdk"
        );
        assert_eq!(
            sdk_url("https://10.0.0.1:8989/sdk").unwrap().as_str(),
            "https://10.0.0.1:8989/sdk"
        );
        for bad in [
            "http://vc/sdk",
            "https://u:p@vc/sdk",
            "vc/sdk",
            "https://",
            "https://vc/sdk?x=1",
        ] {
            let err = sdk_url(bad).unwrap_err().to_string();
            assert!(err.contains("https://host/sdk"), "{bad}: {err}");
            assert!(!err.contains(":p@") || bad.contains(":p@"), "{err}");
        }
    }

    #[test]
    fn session_cookies_from_vcsim_and_esxi() {
        assert_eq!(
            session_cookie("vmware_soap_session=b0cd6010-698a; Path=/; HttpOnly").as_deref(),
            Some("b0cd6010-698a")
        );
        assert_eq!(
            session_cookie("vmware_soap_session=\"52a1c3\"; Path=/; HttpOnly; Secure;").as_deref(),
            Some("\"52a1c3\"")
        );
        assert_eq!(session_cookie("other=1; Path=/"), None);
        assert_eq!(session_cookie("vmware_soap_session=; Path=/"), None);
    }

    /// The backend calls the client from axum handlers: every future must be Send.
    #[allow(dead_code)]
    fn futures_are_send(client: Client, dc: Datacenter, path: DatastorePath, vm: Moref, uuid: BiosUuid) {
        fn send<T: Send>(_: T) {}
        let spec = DiskSpec {
            disk_type: crate::DiskType::Thin,
            adapter_type: crate::AdapterType::LsiLogic,
            capacity_kb: 1,
            profile: None,
        };
        send(Client::connect(Config::new(
            "https://x/sdk",
            "u",
            Password::new("p"),
            TlsTrust::Insecure,
        )));
        send(client.datacenters());
        send(client.datastores(&dc));
        send(client.find_vm_by_bios_uuid(None, &uuid));
        send(client.vm_info(&vm));
        send(client.reconfigure_vm(&vm, &[], &[]));
        send(client.make_directory(&dc, &path, true));
        send(client.create_virtual_disk(&dc, &path, &spec));
        send(client.delete_virtual_disk(&dc, &path));
        send(client.copy_virtual_disk(&dc, &path, &path, false));
        send(client.query_virtual_disk_uuid(&dc, &path));
        send(client.delete_datastore_file(&dc, &path));
        send(client.read_datastore_file(&dc, &path, 1));
        send(client.write_datastore_file(&dc, &path, b""));
        send(client.pbm_profiles());
        send(client.pbm_create_vsan_profile("n", "d", &[]));
        send(client.pbm_delete_profiles(&[]));
        send(client.logout());
    }

    #[test]
    fn passwords_do_not_show() {
        let config = Config::new("https://vc/sdk", "root", Password::new("s3cret"), TlsTrust::Insecure);
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn http_statuses_and_non_xml_answers_are_typed() {
        let raw = |status: u16, body: &str| Raw {
            status: StatusCode::from_u16(status).unwrap(),
            set_cookie: None,
            body: body.as_bytes().to_vec(),
        };
        assert!(matches!(
            interpret(&raw(503, "busy"), "Login", "x"),
            Err(Error::Http { .. })
        ));
        assert!(matches!(
            interpret(&raw(200, "<html>"), "Login", "x"),
            Err(Error::Xml { .. })
        ));
        let fault = std::fs::read_to_string(format!(
            "{}/tests/fixtures/fault_invalid_login.xml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        match interpret(&raw(500, &fault), "Login", "SessionManager") {
            Err(Error::Fault {
                method,
                object,
                fault_type,
                message,
            }) => {
                assert_eq!((method.as_str(), object.as_str()), ("Login", "SessionManager"));
                assert_eq!(fault_type, "InvalidLogin");
                assert_eq!(message, "Login failure");
            }
            other => panic!("{other:?}"),
        }
    }
}
