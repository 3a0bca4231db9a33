//! Agent configuration: datastores, listeners and backend.
//!
//! Read from a TOML file (`--config`) and extended by command-line flags
//! (`--datastore NAME=DIR`, `--socket`, `--tcp`). Every key is documented
//! in `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default unix socket of `vmdk-agent serve`.
pub const DEFAULT_SOCKET: &str = "/run/vmdk/agent.sock";

/// The agent's configuration file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Unix socket for the API (root-only permissions).
    pub socket: Option<PathBuf>,
    /// Optional TCP listener; a loopback address such as `127.0.0.1:7981`
    /// (see [`check_tcp_address`]).
    pub tcp: Option<SocketAddr>,
    /// Disk backend; only `local` exists so far.
    #[serde(default)]
    pub backend: BackendKind,
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
}

/// One datastore.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DatastoreConfig {
    /// Name used in `vol@name`.
    pub name: String,
    /// Directory holding `dockvols/`.
    pub path: PathBuf,
    /// Whether this datastore is VSAN (VSAN policies may be used on it).
    #[serde(default)]
    pub vsan: bool,
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
}

impl AgentConfig {
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
            path: PathBuf::from(dir),
            vsan,
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
        if self.datastores.is_empty() {
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
        assert!(cfg.datastores[0].vsan);
        let mut cfg = cfg;
        cfg.add_datastore_flag("nfs1=/srv/nfs").unwrap();
        cfg.validate().unwrap();
        assert!(cfg.add_datastore_flag("nodir").is_err());
        cfg.add_datastore_flag("vsan2=/srv/v2,vsan").unwrap();
        let last = cfg.datastores.last().unwrap();
        assert!(last.vsan && last.path == Path::new("/srv/v2"), "{last:?}");
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
}
