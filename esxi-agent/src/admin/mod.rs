//! What the admin CLI shows: `ls` columns, tables, sizes, and the parsing
//! of its arguments. Pure functions over the service's results, so the
//! binary only wires flags to them and prints.
//!
//! Column names, choice words and error texts follow the original admin
//! CLI (`vmdkops_admin.py`), so its users feel at home.

pub mod probe;

use std::collections::BTreeMap;

use serde_json::{json, Value};
use vmdk_protocol::VolumeInfo;

/// One `ls` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Column {
    /// Volume name (without `@ds`).
    Volume,
    /// Datastore.
    Datastore,
    /// Vmgroup folder.
    VmGroup,
    /// Virtual size.
    Capacity,
    /// Space the extent really occupies.
    Used,
    /// Filesystem.
    Filesystem,
    /// VSAN policy.
    Policy,
    /// Allocation format.
    DiskFormat,
    /// VM the volume is attached to.
    AttachedTo,
    /// Access mode.
    Access,
    /// Disk mode.
    AttachAs,
    /// Creating VM.
    CreatedBy,
    /// Creation time.
    Created,
}

/// Every column in the original's order: (column, header, `-c` word).
pub const COLUMNS: &[(Column, &str, &str)] = &[
    (Column::Volume, "Volume", "volume"),
    (Column::Datastore, "Datastore", "datastore"),
    (Column::VmGroup, "VMGroup", "vmgroup"),
    (Column::Capacity, "Capacity", "capacity"),
    (Column::Used, "Used", "used"),
    (Column::Filesystem, "Filesystem", "fstype"),
    (Column::Policy, "Policy", "policy"),
    (Column::DiskFormat, "Disk Format", "disk-format"),
    (Column::AttachedTo, "Attached-to", "attached-to"),
    (Column::Access, "Access", "access"),
    (Column::AttachAs, "Attach-as", "attach-as"),
    (Column::CreatedBy, "Created By", "created-by"),
    (Column::Created, "Created Date", "created"),
];

impl Column {
    fn entry(self) -> &'static (Column, &'static str, &'static str) {
        COLUMNS
            .iter()
            .find(|(c, _, _)| *c == self)
            .expect("every column is listed")
    }

    /// Table header.
    pub fn header(self) -> &'static str {
        self.entry().1
    }

    /// The `-c` word, also the key in `--format json`.
    pub fn word(self) -> &'static str {
        self.entry().2
    }

    /// The table cell of `info` on a datastore that is (`vsan`) or is not
    /// VSAN. Missing data shows as `N/A`, like the original.
    pub fn cell(self, info: &VolumeInfo, vsan: bool) -> String {
        let na = |s: &str| if s.is_empty() { "N/A".to_owned() } else { s.to_owned() };
        match self {
            Self::Volume => info.volume.clone(),
            Self::Datastore => info.datastore.clone(),
            Self::VmGroup => na(&info.vmgroup),
            Self::Capacity => human_size(info.capacity_bytes),
            Self::Used => human_size(info.allocated_bytes),
            Self::Filesystem => na(&info.fstype),
            Self::Policy => match (&info.vsan_policy, &info.vsan_policy_state) {
                // Said plainly when the storage does not follow it (yet).
                (Some(p), Some(vmdk_protocol::PolicyState::Recorded { .. })) => format!("{p} (recorded, not applied)"),
                (Some(p), Some(vmdk_protocol::PolicyState::Pending { .. })) => format!("{p} (applied at next attach)"),
                (Some(p), _) => p.clone(),
                (None, _) if vsan => "[VSAN default]".into(),
                (None, _) => "N/A".into(),
            },
            Self::DiskFormat => info.disk_format.to_string(),
            Self::AttachedTo => match &info.creating {
                Some(c) if c.failed.is_some() => "create failed".into(),
                Some(c) => format!("creating: {} {}%", c.step, c.percent),
                None => info.attached_to.clone().unwrap_or_else(|| "detached".into()),
            },
            Self::Access => info.access.to_string(),
            Self::AttachAs => info.attach_as.to_string(),
            Self::CreatedBy => na(&info.created_by),
            Self::Created => na(&info.created),
        }
    }

    /// The JSON value: sizes in bytes, absent values `null`.
    pub fn json(self, info: &VolumeInfo) -> Value {
        match self {
            Self::Capacity => json!(info.capacity_bytes),
            Self::Used => json!(info.allocated_bytes),
            Self::Policy => json!(info.vsan_policy),
            Self::AttachedTo => json!(info.attached_to),
            other => json!(other.cell(info, false)),
        }
    }
}

/// A bad `-c` list; the text is the original's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid choices: {} (choices must be a comma separated list of only the following words \n [{}])", .bad.join(","), COLUMNS.iter().map(|(_, _, w)| format!("'{w}'")).collect::<Vec<_>>().join(", "))]
pub struct ColumnsError {
    /// The words that are not columns.
    pub bad: Vec<String>,
}

/// Parses `-c volume,policy`; columns come out in canonical order.
pub fn parse_columns(list: &str) -> Result<Vec<Column>, ColumnsError> {
    let mut cols = Vec::new();
    let mut bad = Vec::new();
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match COLUMNS.iter().find(|(_, _, w)| *w == word) {
            Some((c, _, _)) => cols.push(*c),
            None => bad.push(word.to_owned()),
        }
    }
    if !bad.is_empty() || cols.is_empty() {
        return Err(ColumnsError { bad });
    }
    cols.sort();
    cols.dedup();
    Ok(cols)
}

/// All columns, in order.
pub fn all_columns() -> Vec<Column> {
    COLUMNS.iter().map(|(c, _, _)| *c).collect()
}

/// `ls` as a table: headers, dashes, rows; two spaces between columns.
/// `vsan(datastore)` says whether a datastore is VSAN.
pub fn volume_table(volumes: &[VolumeInfo], cols: &[Column], vsan: impl Fn(&str) -> bool) -> String {
    let headers: Vec<&str> = cols.iter().map(|c| c.header()).collect();
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            let is_vsan = vsan(&v.datastore);
            cols.iter().map(|c| c.cell(v, is_vsan)).collect()
        })
        .collect();
    render_table(&headers, &rows)
}

/// `ls --format json`: an array of objects keyed by the `-c` words.
pub fn volume_json(volumes: &[VolumeInfo], cols: &[Column]) -> Value {
    Value::Array(
        volumes
            .iter()
            .map(|v| {
                let mut o: serde_json::Map<String, Value> =
                    cols.iter().map(|c| (c.word().to_owned(), c.json(v))).collect();
                if let Some(c) = &v.creating {
                    o.insert("creating".into(), json!(c));
                }
                Value::Object(o)
            })
            .collect(),
    )
}

pub use vmdk_common::table::render_table;

/// `20GB`, `13.39MB`, `1.5KB`, `0B`: the largest unit the size reaches,
/// at most two decimals (units of 1024, named like the original's).
pub fn human_size(bytes: u64) -> String {
    const UNITS: &[(&str, u64)] = &[("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= *size {
            let v = format!("{:.2}", bytes as f64 / *size as f64);
            return format!("{}{unit}", v.trim_end_matches('0').trim_end_matches('.'));
        }
    }
    format!("{bytes}B")
}

/// A bad `set --options` string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsArgError {
    /// An item is not `key=value`.
    #[error("invalid option {item:?}: expected key=value, e.g. --options=\"access=read-only\"")]
    Malformed {
        /// The item.
        item: String,
    },
    /// A key is given twice.
    #[error("option {key:?} is given twice")]
    Duplicate {
        /// The key.
        key: String,
    },
    /// Nothing was given.
    #[error("no options given; e.g. --options=\"access=read-only\" (editable: access, attach-as)")]
    Empty,
}

/// Parses `set --options "access=read-only,attach-as=persistent"`. Spaces
/// are ignored, as in the original.
pub fn parse_options_arg(arg: &str) -> Result<BTreeMap<String, String>, OptionsArgError> {
    let compact: String = arg.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = BTreeMap::new();
    for item in compact.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .ok_or_else(|| OptionsArgError::Malformed { item: item.to_owned() })?;
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(OptionsArgError::Duplicate { key: k.to_owned() });
        }
    }
    if out.is_empty() {
        return Err(OptionsArgError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_like_cli_table() {
        let t = render_table(
            &["Volume", "Used"],
            &[vec!["vol1", "13MB"], vec!["a-longer-name", "0B"]],
        );
        assert_eq!(
            t,
            "Volume         Used\n------         ----\nvol1           13MB\na-longer-name  0B\n"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(100 << 20), "100MB");
        assert_eq!(human_size(20 << 30), "20GB");
        assert_eq!(human_size((13 << 20) + (400 << 10)), "13.39MB");
        assert_eq!(human_size(62 << 40), "62TB");
        assert_eq!(human_size(1536), "1.5KB");
        assert_eq!(human_size((512 << 20) + 4096), "512MB");
    }

    #[test]
    fn columns() {
        assert_eq!(
            parse_columns("policy,volume").unwrap(),
            vec![Column::Volume, Column::Policy]
        );
        assert_eq!(
            parse_columns("created, used").unwrap(),
            vec![Column::Used, Column::Created]
        );
        let e = parse_columns("volume,size").unwrap_err().to_string();
        assert!(e.starts_with("invalid choices: size (choices must be"), "{e}");
        assert!(e.contains("'disk-format', 'attached-to'"), "{e}");
        assert!(parse_columns("").is_err());
        assert_eq!(all_columns().len(), 13);
    }

    #[test]
    fn options_arg() {
        let o = parse_options_arg(" access = read-only , attach-as=persistent").unwrap();
        assert_eq!(o["access"], "read-only");
        assert_eq!(o["attach-as"], "persistent");
        assert!(matches!(
            parse_options_arg("access"),
            Err(OptionsArgError::Malformed { .. })
        ));
        assert!(matches!(
            parse_options_arg("access=,x=y"),
            Err(OptionsArgError::Malformed { .. })
        ));
        assert!(matches!(
            parse_options_arg("access=a,access=b"),
            Err(OptionsArgError::Duplicate { .. })
        ));
        assert_eq!(parse_options_arg(" , "), Err(OptionsArgError::Empty));
    }
}
