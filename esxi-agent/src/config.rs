//! Agent configuration: datastores, listeners and backend.
//!
//! Read from a TOML file and extended by command-line flags (`--datastore
//! NAME=DIR`, `--socket`, `--tcp`). Every key is documented in
//! `docs/configuration.md`.
//!
//! One configuration serves both programs: `vmdk-agent` and the agent
//! embedded in `vmdk-plugin` find it the same way ([`AgentConfig::load`]):
//! the file given (`--config` / `--agent-config`, or `VMDK_AGENT_CONFIG`),
//! else [`DEFAULT_CONFIG`] when it exists; and when neither names a
//! datastore, both use the same built-in one ([`DEFAULT_DATASTORE_NAME`] at
//! [`DEFAULT_DATASTORE_DIR`], VSAN-capable). So the admin commands work on
//! exactly the volumes the plugin serves, with no flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default unix socket of `vmdk-agent serve`.
pub const DEFAULT_SOCKET: &str = "/run/vmdk/agent.sock";
/// Where both programs look for the agent configuration when none is given.
pub const DEFAULT_CONFIG: &str = "/etc/vmdk/agent.toml";
/// The built-in datastore's name, used when no datastore is configured.
pub const DEFAULT_DATASTORE_NAME: &str = "local";
/// The built-in datastore's directory (created 0700 when missing).
pub const DEFAULT_DATASTORE_DIR: &str = "/var/lib/vmdk/datastores/local";

/// Where a loaded configuration came from, for logs and `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// The file given with `--config` / `--agent-config` /
    /// `VMDK_AGENT_CONFIG`.
    Given(PathBuf),
    /// [`DEFAULT_CONFIG`] (or the default path passed to
    /// [`AgentConfig::load`]), which exists.
    Default(PathBuf),
    /// No file: built-in settings.
    BuiltIn,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Given(p) => write!(f, "{}", p.display()),
            Self::Default(p) => write!(f, "{} (default location)", p.display()),
            Self::BuiltIn => write!(f, "no configuration file ({DEFAULT_CONFIG} does not exist)"),
        }
    }
}

/// The agent's configuration file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Unix socket for the API (root-only permissions).
    pub socket: Option<PathBuf>,
    /// Optional TCP listener; a loopback address such as `127.0.0.1:7981`
    /// (see [`check_tcp_address`]).
    pub tcp: Option<SocketAddr>,
    /// Disk backend: `local` (default) or `vsphere`.
    #[serde(default)]
    pub backend: BackendKind,
    /// How to reach vSphere (`backend = "vsphere"` only).
    pub vsphere: Option<VsphereConfig>,
    /// Datastores, in order; the first is the default for short names.
    #[serde(default, rename = "datastore")]
    pub datastores: Vec<DatastoreConfig>,
    /// Whether `tcp` came from the `--tcp` flag (for error messages).
    #[serde(skip)]
    tcp_from_flag: bool,
}

/// Which disk backend serves attach and detach.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Datastores are directories; attach binds a loop device.
    #[default]
    Local,
    /// VMDKs on ESXi or vCenter datastores, hot-added to the calling VM.
    Vsphere,
}

/// One datastore.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DatastoreConfig {
    /// Name used in `vol@name` (for `vsphere`, the datastore's name in
    /// vSphere).
    pub name: String,
    /// Directory holding `dockvols/` (`local` only; required there).
    pub path: Option<PathBuf>,
    /// Whether this datastore is VSAN (VSAN policies may be used on it).
    /// `local` only: with `vsphere`, vSphere says which datastores are
    /// VSAN. The type is recorded on the datastore itself
    /// (`dockvols/.vmdk-datastore`), so every process using it agrees:
    /// unset, the recorded type applies (not VSAN when none is recorded);
    /// set, it is recorded there.
    #[serde(default)]
    pub vsan: Option<bool>,
}

impl DatastoreConfig {
    /// The built-in datastore: [`DEFAULT_DATASTORE_NAME`] at
    /// [`DEFAULT_DATASTORE_DIR`], VSAN-capable so that VSAN policies work
    /// right after install (on the `local` backend a policy is recorded with
    /// the volume, not applied).
    pub fn built_in() -> Self {
        Self {
            name: DEFAULT_DATASTORE_NAME.to_owned(),
            path: Some(PathBuf::from(DEFAULT_DATASTORE_DIR)),
            vsan: Some(true),
        }
    }

    /// Whether this is the built-in datastore (its directory may be
    /// created; a configured one must exist).
    pub fn is_built_in(&self) -> bool {
        *self == Self::built_in()
    }
}

/// `[vsphere]`: how the agent reaches ESXi or vCenter.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsphereConfig {
    /// `https://host/sdk`.
    pub url: String,
    /// A TOML file with `user = "..."` and `password = "..."`, readable by
    /// its owner only (mode 0600 or stricter).
    pub credentials: PathBuf,
    /// The server certificate's SHA-256 (or SHA-1) fingerprint, as
    /// colon-separated hex (what vSphere and `openssl x509 -fingerprint`
    /// show).
    pub thumbprint: Option<String>,
    /// A PEM file of the CA that signed the server certificate.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate (a warning is logged at every start).
    #[serde(default)]
    pub insecure: bool,
    /// The datacenter; needed only when the server has more than one.
    pub datacenter: Option<String>,
}

/// The user and password of `[vsphere] credentials`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// The vSphere user, e.g. `svc-vmdk@vsphere.local`.
    pub user: String,
    /// Its password (never logged or shown).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

impl VsphereConfig {
    /// Reads the credentials file: refused unless only its owner may read
    /// it (mode 0600 or stricter), and unless it holds exactly `user` and
    /// `password`.
    pub fn load_credentials(&self) -> Result<Credentials, ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        let path = &self.credentials;
        let read = |source| ConfigError::Read {
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ConfigError::CredentialsMode {
                path: path.clone(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        toml::from_str(&text).map_err(|e| ConfigError::Credentials {
            path: path.clone(),
            // The TOML error may quote the file; it holds a password.
            reason: e.message().to_owned(),
        })
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// A `--datastore` flag is not `NAME=DIR[,vsan]`.
    #[error(
        "invalid --datastore {0:?}: expected NAME=DIR or NAME=DIR,vsan, e.g. local=/var/lib/vmdk/datastores/local"
    )]
    DatastoreFlag(String),
    /// Two datastores share a name (names compare case-insensitively).
    #[error("datastore {0:?} is configured twice (names are case-insensitive)")]
    Duplicate(String),
    /// A datastore name is not usable in `vol@name`.
    #[error("invalid datastore name {name:?}: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The TCP address is not a loopback address.
    #[error(
        "refusing {origin} {addr}: the agent API has no authentication yet (a later release adds TLS client certificates); listen on a loopback address such as 127.0.0.1:{port} or [::1]:{port}",
        port = addr.port()
    )]
    TcpNotLoopback {
        /// The address.
        addr: SocketAddr,
        /// Where it was given: `--tcp` or `tcp =` (the config file).
        origin: &'static str,
    },
    /// No datastore is configured.
    #[error("no datastore configured; give --datastore NAME=DIR or [[datastore]] in --config")]
    NoDatastore,
    /// The backend's settings do not fit together.
    #[error("{0}")]
    Backend(String),
    /// The credentials file may be read by others.
    #[error("credentials file {path} has mode {mode:04o}; it holds a password, so only its owner may read it: chmod 600 {path}", path = path.display())]
    CredentialsMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The credentials file is not `user = "..."` and `password = "..."`.
    #[error("credentials file {path} is not valid: {reason}; it must hold exactly user = \"...\" and password = \"...\"", path = path.display())]
    Credentials {
        /// The file.
        path: PathBuf,
        /// What is wrong (never its content).
        reason: String,
    },
}

impl AgentConfig {
    /// The configuration both programs use: `given` (which must exist),
    /// else `default_path` when it exists, else built-in settings; then the
    /// `--datastore` flags, added after the file's datastores; then, for the
    /// `local` backend with no datastore at all, the built-in one
    /// ([`DEFAULT_DATASTORE_NAME`] at [`DEFAULT_DATASTORE_DIR`], VSAN).
    /// Validated.
    pub fn load(
        given: Option<&Path>,
        default_path: &Path,
        datastore_flags: &[String],
    ) -> Result<(Self, ConfigSource), ConfigError> {
        let (mut cfg, source) = match given {
            Some(p) => (Self::from_file(p)?, ConfigSource::Given(p.to_owned())),
            None => match std::fs::metadata(default_path) {
                Ok(_) => (
                    Self::from_file(default_path)?,
                    ConfigSource::Default(default_path.to_owned()),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Self::default(), ConfigSource::BuiltIn),
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: default_path.to_owned(),
                        source,
                    })
                }
            },
        };
        for d in datastore_flags {
            cfg.add_datastore_flag(d)?;
        }
        if cfg.datastores.is_empty() && cfg.backend == BackendKind::Local {
            cfg.datastores.push(DatastoreConfig::built_in());
        }
        cfg.validate()?;
        Ok((cfg, source))
    }

    /// Loads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Adds a datastore from a `NAME=DIR` flag; `NAME=DIR,vsan` marks it
    /// VSAN (like `vsan = true` in the file).
    pub fn add_datastore_flag(&mut self, flag: &str) -> Result<(), ConfigError> {
        let (name, dir) = flag
            .split_once('=')
            .filter(|(n, d)| !n.is_empty() && !d.is_empty())
            .ok_or_else(|| ConfigError::DatastoreFlag(flag.to_owned()))?;
        let (dir, vsan) = match dir.strip_suffix(",vsan") {
            Some("") => return Err(ConfigError::DatastoreFlag(flag.to_owned())),
            Some(d) => (d, true),
            None => (dir, false),
        };
        self.datastores.push(DatastoreConfig {
            name: name.to_owned(),
            path: Some(PathBuf::from(dir)),
            vsan: vsan.then_some(true),
        });
        Ok(())
    }

    /// Sets the TCP listener from the `--tcp` flag (it overrides `tcp` in
    /// the file); [`AgentConfig::validate`] checks it.
    pub fn set_tcp_flag(&mut self, addr: SocketAddr) {
        self.tcp = Some(addr);
        self.tcp_from_flag = true;
    }

    /// Checks the TCP listener ([`check_tcp_address`]) and the datastore
    /// names: present, unique, usable after `@`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(addr) = self.tcp {
            check_tcp_address(addr, if self.tcp_from_flag { "--tcp" } else { "tcp =" })?;
        }
        self.validate_backend()?;
        if self.datastores.is_empty() && self.backend == BackendKind::Local {
            return Err(ConfigError::NoDatastore);
        }
        let mut seen: Vec<String> = Vec::new();
        for ds in &self.datastores {
            let reason = if ds.name.is_empty() {
                Some("it is empty")
            } else if ds.name.contains('@') {
                Some("it contains '@'")
            } else if ds
                .name
                .chars()
                .any(|c| matches!(c, '/' | '\\' | '"' | '\0') || c.is_control())
            {
                Some("it contains '/', '\\', '\"', NUL or control characters")
            } else if ds.name.chars().count() > vmdk_protocol::name::MAX_DATASTORE_CHARS {
                Some("it is longer than 100 characters")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(ConfigError::BadName {
                    name: ds.name.clone(),
                    reason,
                });
            }
            let lower = ds.name.to_lowercase();
            if seen.contains(&lower) {
                return Err(ConfigError::Duplicate(ds.name.clone()));
            }
            seen.push(lower);
        }
        Ok(())
    }
}

impl AgentConfig {
    fn validate_backend(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Backend(m));
        match (self.backend, &self.vsphere) {
            (BackendKind::Local, Some(_)) => {
                return bad(
                    "[vsphere] is set but backend is local; add backend = \"vsphere\" or remove [vsphere]".into(),
                )
            }
            (BackendKind::Local, None) => {
                if let Some(ds) = self.datastores.iter().find(|d| d.path.is_none()) {
                    return bad(format!(
                        "datastore {} has no path; the local backend keeps each datastore in a directory (path = \"/srv/...\")",
                        ds.name
                    ));
                }
            }
            (BackendKind::Vsphere, None) => {
                return bad("backend = \"vsphere\" needs a [vsphere] table with url and credentials".into())
            }
            (BackendKind::Vsphere, Some(v)) => {
                if !(v.url.starts_with("https://") && v.url.len() > "https://".len()) {
                    return bad(format!(
                        "[vsphere] url {:?} must be https://host/sdk (vSphere serves its API over TLS)",
                        v.url
                    ));
                }
                let trusts =
                    usize::from(v.thumbprint.is_some()) + usize::from(v.ca_file.is_some()) + usize::from(v.insecure);
                if trusts != 1 {
                    return bad(format!(
                        "[vsphere] must say how to trust the server's certificate with exactly one of thumbprint = \"AA:BB:...\" (its SHA-256 fingerprint), ca_file = \"/path/ca.pem\" or insecure = true; {trusts} are set"
                    ));
                }
                if let Some(ds) = self.datastores.iter().find(|d| d.path.is_some() || d.vsan.is_some()) {
                    return bad(format!(
                        "datastore {}: with backend = \"vsphere\" a [[datastore]] has only a name (its files are on the vSphere datastore of that name, and vSphere says whether it is VSAN)",
                        ds.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The one rule for the agent's TCP listener: loopback addresses only
/// (`127.0.0.0/8`, `::1`, or `::ffff:127.x.y.z`), because the API does not
/// authenticate its callers yet; a guest-facing listener needs TLS client
/// certificates, which a later release adds. `origin` names where the
/// address was given, for the error.
pub fn check_tcp_address(addr: SocketAddr, origin: &'static str) -> Result<(), ConfigError> {
    if addr.ip().to_canonical().is_loopback() {
        Ok(())
    } else {
        Err(ConfigError::TcpNotLoopback { addr, origin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_and_flags() {
        let cfg: AgentConfig = toml::from_str(
            r#"
            socket = "/tmp/a.sock"
            tcp = "127.0.0.1:7981"
            [[datastore]]
            name = "vsanDatastore"
            path = "/srv/vsan"
            vsan = true
            "#,
        )
        .unwrap();
        assert_eq!(cfg.datastores[0].vsan, Some(true));
        let mut cfg = cfg;
        cfg.add_datastore_flag("nfs1=/srv/nfs").unwrap();
        cfg.validate().unwrap();
        assert!(cfg.add_datastore_flag("nodir").is_err());
        cfg.add_datastore_flag("vsan2=/srv/v2,vsan").unwrap();
        let last = cfg.datastores.last().unwrap();
        assert!(
            last.vsan == Some(true) && last.path.as_deref() == Some(Path::new("/srv/v2")),
            "{last:?}"
        );
        assert!(cfg.add_datastore_flag("v=,vsan").is_err());
        cfg.add_datastore_flag("NFS1=/x").unwrap();
        assert!(matches!(cfg.validate(), Err(ConfigError::Duplicate(_))));
        assert!(toml::from_str::<AgentConfig>("bogus = 1").is_err());
        let mut bad = AgentConfig::default();
        bad.add_datastore_flag("a@b=/x").unwrap();
        assert!(matches!(bad.validate(), Err(ConfigError::BadName { .. })));
        assert!(matches!(
            AgentConfig::default().validate(),
            Err(ConfigError::NoDatastore)
        ));
    }

    #[test]
    fn both_programs_load_the_same_configuration() {
        let d = tempfile::tempdir().unwrap();
        let default = d.path().join("agent.toml");
        // No file anywhere: the built-in datastore, VSAN.
        let (cfg, src) = AgentConfig::load(None, &default, &[]).unwrap();
        assert_eq!(src, ConfigSource::BuiltIn);
        assert_eq!(cfg.datastores, vec![DatastoreConfig::built_in()]);
        assert_eq!(cfg.datastores[0].vsan, Some(true));
        assert_eq!(
            cfg.datastores[0].path.as_deref(),
            Some(Path::new(DEFAULT_DATASTORE_DIR))
        );
        // Flags replace the built-in datastore.
        let (cfg, _) = AgentConfig::load(None, &default, &["a=/srv/a".into()]).unwrap();
        assert_eq!(cfg.datastores.len(), 1);
        assert_eq!((cfg.datastores[0].name.as_str(), cfg.datastores[0].vsan), ("a", None));
        // The default file, when it exists, is read; flags come after its
        // datastores.
        std::fs::write(&default, "[[datastore]]\nname = \"f\"\npath = \"/srv/f\"\n").unwrap();
        let (cfg, src) = AgentConfig::load(None, &default, &["a=/srv/a".into()]).unwrap();
        assert_eq!(src, ConfigSource::Default(default.clone()));
        let names: Vec<_> = cfg.datastores.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["f", "a"]);
        // A file with settings but no datastore gets the built-in one.
        std::fs::write(&default, "socket = \"/run/x.sock\"\n").unwrap();
        let (cfg, _) = AgentConfig::load(None, &default, &[]).unwrap();
        assert_eq!(cfg.datastores, vec![DatastoreConfig::built_in()]);
        // A given file must exist, and is used instead of the default.
        let given = d.path().join("given.toml");
        let e = AgentConfig::load(Some(&given), &default, &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        std::fs::write(&given, "[[datastore]]\nname = \"g\"\npath = \"/srv/g\"\nvsan = false\n").unwrap();
        let (cfg, src) = AgentConfig::load(Some(&given), &default, &[]).unwrap();
        assert_eq!(src, ConfigSource::Given(given.clone()));
        assert_eq!(
            (cfg.datastores[0].name.as_str(), cfg.datastores[0].vsan),
            ("g", Some(false))
        );
        // A broken default file is an error, not silently skipped.
        std::fs::write(&default, "bogus = 1\n").unwrap();
        let e = AgentConfig::load(None, &default, &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        // The vsphere backend has no built-in datastore: without any, every
        // datastore the account sees is used.
        std::fs::write(
            &default,
            "backend = \"vsphere\"\n[vsphere]\nurl = \"https://h/sdk\"\ncredentials = \"/c\"\ninsecure = true\n",
        )
        .unwrap();
        let (cfg, _) = AgentConfig::load(None, &default, &[]).unwrap();
        assert!(cfg.datastores.is_empty());
    }

    #[test]
    fn tcp_listens_on_loopback_only() {
        let mut cfg = AgentConfig::default();
        cfg.add_datastore_flag("local=/srv/local").unwrap();
        for ok in ["127.0.0.1:7981", "127.3.4.5:1", "[::1]:7981", "[::ffff:127.0.0.1]:7981"] {
            cfg.set_tcp_flag(ok.parse().unwrap());
            cfg.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "0.0.0.0:7981",
            "[::]:7981",
            "10.0.0.5:7981",
            "[::ffff:10.0.0.5]:80",
            "[fe80::1]:7981",
        ] {
            cfg.set_tcp_flag(bad.parse().unwrap());
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.starts_with(&format!("refusing --tcp {bad}: ")), "{e}");
            assert!(e.contains("no authentication"), "{e}");
        }
        let e = AgentConfig::default().validate().unwrap_err();
        assert!(matches!(e, ConfigError::NoDatastore), "{e}");
        let mut file: AgentConfig = toml::from_str(
            r#"
            tcp = "0.0.0.0:7981"
            [[datastore]]
            name = "local"
            path = "/srv/local"
            "#,
        )
        .unwrap();
        assert_eq!(
            file.validate().unwrap_err().to_string(),
            "refusing tcp = 0.0.0.0:7981: the agent API has no authentication yet (a later release adds \
             TLS client certificates); listen on a loopback address such as 127.0.0.1:7981 or [::1]:7981"
        );
        file.set_tcp_flag("127.0.0.1:7981".parse().unwrap());
        file.validate().unwrap();
    }

    #[test]
    fn vsphere_settings_are_checked_together() {
        let ok: AgentConfig = toml::from_str(
            r#"
            backend = "vsphere"
            [vsphere]
            url = "https://vc.example.com/sdk"
            credentials = "/etc/vmdk/vsphere.toml"
            thumbprint = "AA:BB"
            [[datastore]]
            name = "vsanDatastore"
            "#,
        )
        .unwrap();
        ok.validate().unwrap();
        let none: AgentConfig = toml::from_str(
            "backend = \"vsphere\"\n[vsphere]\nurl = \"https://h/sdk\"\ncredentials = \"/c\"\ninsecure = true\n",
        )
        .unwrap();
        none.validate()
            .expect("without [[datastore]] every datastore is usable");
        let cases = [
            ("backend = \"vsphere\"\n", "needs a [vsphere] table"),
            (
                "[vsphere]\nurl = \"https://h/sdk\"\ncredentials = \"/c\"\ninsecure = true\n[[datastore]]\nname = \"a\"\npath = \"/a\"\n",
                "backend is local",
            ),
            (
                "backend = \"vsphere\"\n[vsphere]\nurl = \"http://h/sdk\"\ncredentials = \"/c\"\ninsecure = true\n",
                "must be https://host/sdk",
            ),
            (
                "backend = \"vsphere\"\n[vsphere]\nurl = \"https://h/sdk\"\ncredentials = \"/c\"\n",
                "0 are set",
            ),
            (
                "backend = \"vsphere\"\n[vsphere]\nurl = \"https://h/sdk\"\ncredentials = \"/c\"\ninsecure = true\nthumbprint = \"AA\"\n",
                "2 are set",
            ),
            (
                "backend = \"vsphere\"\n[vsphere]\nurl = \"https://h/sdk\"\ncredentials = \"/c\"\ninsecure = true\n[[datastore]]\nname = \"a\"\nvsan = true\n",
                "has only a name",
            ),
            ("[[datastore]]\nname = \"a\"\n", "has no path"),
        ];
        for (text, want) in cases {
            let cfg: AgentConfig = toml::from_str(text).unwrap();
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn credentials_must_be_private_and_never_echoed() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("creds.toml");
        std::fs::write(&path, "user = \"svc\"\npassword = \"s3cret-pw\"\n").unwrap();
        let v = VsphereConfig {
            url: "https://h/sdk".into(),
            credentials: path.clone(),
            thumbprint: None,
            ca_file: None,
            insecure: true,
            datacenter: None,
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = v.load_credentials().unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = v.load_credentials().unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("svc", "s3cret-pw"));
        assert!(!format!("{c:?}").contains("s3cret"));
        std::fs::write(&path, "user = \"svc\"\npassword = \"s3cret-pw\"\nextra = 1\n").unwrap();
        let e = v.load_credentials().unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
