//! VMDK descriptors in ESXi's own form (`createType="vmfs"`).
//!
//! A volume on a datastore is a text descriptor `<vol>.vmdk` plus a raw
//! extent `<vol>-flat.vmdk`, exactly what ESXi keeps on VMFS and NFS. Thin
//! versus thick is an allocation state of the extent; only thin shows in the
//! descriptor (`ddb.thinProvisioned = "1"`).
//!
//! Writing follows ESXi (DDB keys sorted, geometry from the SCSI rule);
//! reading is tolerant: unknown keys, comments, other create types and extra
//! extents are accepted, because descriptors written by ESXi or other tools
//! must still list.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Bytes per VMDK sector.
pub const SECTOR: u64 = 512;
/// Descriptors larger than this are not descriptors (the original's rule).
pub const MAX_DESCRIPTOR_BYTES: u64 = 5000;
/// Largest capacity a descriptor may declare: ESXi's largest virtual disk
/// (62 TB).
pub const MAX_CAPACITY_BYTES: u64 = vmdk_protocol::size::MAX_SIZE_MB * vmdk_protocol::size::MIB;

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// `CID` in hex.
    pub cid: String,
    /// `createType`, e.g. `vmfs`.
    pub create_type: String,
    /// Extents in order.
    pub extents: Vec<Extent>,
    /// Disk database (`ddb.*` keys, values unquoted).
    pub ddb: BTreeMap<String, String>,
}

/// One extent line: `RW 204800 VMFS "x-flat.vmdk"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub access: String,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// `VMFS`, `FLAT`, `SPARSE`, ...
    pub kind: String,
    /// File name relative to the descriptor.
    pub file: String,
}

/// Why a descriptor could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// The file does not start like a descriptor and has no extent.
    #[error("not a VMDK descriptor: {0}")]
    NotADescriptor(&'static str),
    /// An extent line is malformed.
    #[error("malformed extent line {line:?}")]
    BadExtent {
        /// The line.
        line: String,
    },
    /// The extents add up to nothing, or to more than any VMDK can be.
    #[error("the extents declare {sectors} sectors; a VMDK holds 1 to {} sectors (62 TB)", MAX_CAPACITY_BYTES / SECTOR)]
    BadCapacity {
        /// The declared total, saturated at `u64::MAX`.
        sectors: u64,
    },
    /// The bytes are not UTF-8 text.
    #[error("not a VMDK descriptor: not UTF-8 text")]
    NotText,
}

impl Descriptor {
    /// A new ESXi-style descriptor for a disk of `capacity_bytes`.
    pub fn new_vmfs(flat_file: &str, capacity_bytes: u64, thin: bool, uuid: &[u8; 16], cid: u32) -> Self {
        let sectors = capacity_bytes.div_ceil(SECTOR);
        let heads = 255u64;
        let cylinders = (sectors * SECTOR) / (heads * 63 * SECTOR);
        let mut ddb = BTreeMap::new();
        ddb.insert("ddb.adapterType".into(), "lsilogic".into());
        ddb.insert("ddb.deletable".into(), "true".into());
        ddb.insert("ddb.encoding".into(), "UTF-8".into());
        ddb.insert("ddb.geometry.cylinders".into(), cylinders.to_string());
        ddb.insert("ddb.geometry.heads".into(), heads.to_string());
        ddb.insert("ddb.geometry.sectors".into(), "63".into());
        ddb.insert(
            "ddb.longContentID".into(),
            format!("{:024x}{cid:08x}", u128::from_be_bytes(*uuid) >> 32),
        );
        if thin {
            ddb.insert("ddb.thinProvisioned".into(), "1".into());
        }
        ddb.insert("ddb.toolsVersion".into(), "0".into());
        ddb.insert("ddb.uuid".into(), format_ddb_uuid(uuid));
        ddb.insert("ddb.virtualHWVersion".into(), "13".into());
        Self {
            cid: format!("{cid:08x}"),
            create_type: "vmfs".into(),
            extents: vec![Extent {
                access: "RW".into(),
                sectors,
                kind: "VMFS".into(),
                file: flat_file.into(),
            }],
            ddb,
        }
    }

    /// Virtual size: the sum of the extents. [`Descriptor::parse`] refuses
    /// descriptors whose sum is 0 or over [`MAX_CAPACITY_BYTES`]; for
    /// others built by hand the sum saturates instead of wrapping.
    pub fn capacity_bytes(&self) -> u64 {
        self.total_sectors().saturating_mul(SECTOR)
    }

    fn total_sectors(&self) -> u64 {
        self.extents.iter().fold(0u64, |acc, e| acc.saturating_add(e.sectors))
    }

    /// Whether the disk is thin (`ddb.thinProvisioned = "1"`).
    pub fn is_thin(&self) -> bool {
        self.ddb.get("ddb.thinProvisioned").map(String::as_str) == Some("1")
    }

    /// `ddb.uuid`, if present.
    pub fn uuid(&self) -> Option<&str> {
        self.ddb.get("ddb.uuid").map(String::as_str)
    }

    /// Renders the descriptor text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\n");
        let _ = writeln!(s, "CID={}", self.cid);
        s.push_str("parentCID=ffffffff\nisNativeSnapshot=\"no\"\n");
        let _ = writeln!(s, "createType=\"{}\"", self.create_type);
        s.push_str("\n# Extent description\n");
        for e in &self.extents {
            let _ = writeln!(s, "{} {} {} \"{}\"", e.access, e.sectors, e.kind, e.file);
        }
        s.push_str("\n# The Disk Data Base\n#DDB\n\n");
        for (k, v) in &self.ddb {
            let _ = writeln!(s, "{k} = \"{v}\"");
        }
        s
    }

    /// Parses descriptor bytes (see [`Descriptor::parse`]).
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, DescriptorError> {
        if bytes.len() as u64 > MAX_DESCRIPTOR_BYTES {
            return Err(DescriptorError::NotADescriptor("larger than 5000 bytes"));
        }
        Self::parse(std::str::from_utf8(bytes).map_err(|_| DescriptorError::NotText)?)
    }

    /// Parses descriptor text tolerantly: unknown keys, comments, other
    /// create types and several extents are accepted. A pure function that
    /// never panics; the declared capacity must be 1 sector to 62 TB.
    pub fn parse(text: &str) -> Result<Self, DescriptorError> {
        let mut d = Descriptor::default();
        let mut saw_header = false;
        for raw in text.lines() {
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with('#') {
                if line.eq_ignore_ascii_case("# Disk DescriptorFile") {
                    saw_header = true;
                }
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or("");
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                d.extents.push(parse_extent(line)?);
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                let key = k.trim();
                let value = unquote(v.trim());
                if key.starts_with("ddb.") {
                    d.ddb.insert(key.to_owned(), value.to_owned());
                } else {
                    match key {
                        // A content ID is hex; anything else is ignored.
                        "CID" if value.bytes().all(|b| b.is_ascii_hexdigit()) => d.cid = value.to_owned(),
                        "createType" => d.create_type = value.to_owned(),
                        "version" => saw_header = true,
                        _ => {}
                    }
                }
            }
        }
        if d.extents.is_empty() {
            return Err(DescriptorError::NotADescriptor(if saw_header {
                "no extent line"
            } else {
                "no header and no extent line"
            }));
        }
        let sectors = d.total_sectors();
        if sectors == 0 || sectors > MAX_CAPACITY_BYTES / SECTOR {
            return Err(DescriptorError::BadCapacity { sectors });
        }
        Ok(d)
    }
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
}

fn parse_extent(line: &str) -> Result<Extent, DescriptorError> {
    let bad = || DescriptorError::BadExtent { line: line.to_owned() };
    let mut it = line.splitn(3, char::is_whitespace);
    let access = it.next().ok_or_else(bad)?.to_owned();
    let rest = it.next().ok_or_else(bad)?;
    let sectors: u64 = rest.parse().map_err(|_| bad())?;
    let tail = it.next().ok_or_else(bad)?.trim_start();
    let (kind, after) = tail.split_once(char::is_whitespace).unwrap_or((tail, ""));
    if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(bad());
    }
    let after = after.trim_start();
    let file = match after.strip_prefix('"') {
        Some(q) => q.split_once('"').map(|(f, _)| f).ok_or_else(bad)?,
        None => after.split_whitespace().next().unwrap_or(""),
    };
    if file.contains('"') {
        return Err(bad());
    }
    Ok(Extent {
        access,
        sectors,
        kind: kind.to_owned(),
        file: file.to_owned(),
    })
}

/// Formats 16 bytes as `60 00 c2 9a bc de f0 12-34 56 78 9a bc de f0 12`.
pub fn format_ddb_uuid(u: &[u8; 16]) -> String {
    let hex: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}", hex[..8].join(" "), hex[8..].join(" "))
}

/// A new random disk UUID in ESXi's form: NAA-6 with VMware's OUI
/// (`60 00 C2 9x ...`).
pub fn new_disk_uuid(random: [u8; 16]) -> [u8; 16] {
    let mut u = random;
    u[0] = 0x60;
    u[1] = 0x00;
    u[2] = 0xc2;
    u[3] = 0x90 | (u[3] & 0x0f);
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    const ESXI_SAMPLE: &str = r#"# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=05e9aba7
parentCID=ffffffff
isNativeSnapshot="no"
createType="vmfs"

# Extent description
RW 75497472 VMFS "gerrit-flat.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.deletable = "true"
ddb.geometry.cylinders = "4699"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "8c6d2b3cbb9f0b7a2a3f4e9105e9aba7"
ddb.thinProvisioned = "1"
ddb.uuid = "60 00 C2 9d 6f 0c 2a 4e-9b 55 4a 9b 27 18 3e 61"
ddb.virtualHWVersion = "13"
ddb.sidecars = "docker-volume-vsphere","gerrit-1a2b.vmfd"
"#;

    #[test]
    fn parses_an_esxi_descriptor() {
        let d = Descriptor::parse(ESXI_SAMPLE).unwrap();
        assert_eq!(d.create_type, "vmfs");
        assert_eq!(d.capacity_bytes(), 75497472 * 512);
        assert!(d.is_thin());
        assert_eq!(d.extents[0].file, "gerrit-flat.vmdk");
        assert_eq!(d.uuid(), Some("60 00 C2 9d 6f 0c 2a 4e-9b 55 4a 9b 27 18 3e 61"));
    }

    #[test]
    fn round_trips_and_uses_the_scsi_geometry() {
        let uuid = new_disk_uuid([0xab; 16]);
        let d = Descriptor::new_vmfs("v 1-flat.vmdk", 1 << 30, true, &uuid, 0x1234abcd);
        let text = d.render();
        assert!(text.contains("createType=\"vmfs\""));
        assert!(text.contains("RW 2097152 VMFS \"v 1-flat.vmdk\"\n"));
        assert!(text.contains("ddb.geometry.cylinders = \"130\""));
        assert!(text.contains("ddb.uuid = \"60 00 c2 9b ab ab ab ab-ab ab ab ab ab ab ab ab\""));
        assert_eq!(Descriptor::parse(&text).unwrap(), d);
        let thick = Descriptor::new_vmfs("x-flat.vmdk", 100 << 20, false, &uuid, 1);
        assert!(!thick.is_thin());
        assert_eq!(thick.ddb["ddb.geometry.cylinders"], "12");
    }

    #[test]
    fn tolerates_other_shapes_and_refuses_junk() {
        let flat = "version=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"a-flat.vmdk\" 0\n";
        let d = Descriptor::parse(flat).unwrap();
        assert_eq!(d.capacity_bytes(), 2048 * 512);
        assert!(Descriptor::parse("hello world").is_err());
        assert!(Descriptor::parse("RW notanumber VMFS \"x\"").is_err());
    }

    #[test]
    fn absurd_sizes_are_refused_not_wrapped() {
        // 2^55 sectors * 512 wraps u64 to 0: it once became a 0-byte disk.
        let wraps = format!("RW {} VMFS \"x-flat.vmdk\"\n", 1u64 << 55);
        assert!(matches!(
            Descriptor::parse(&wraps),
            Err(DescriptorError::BadCapacity { .. })
        ));
        let two = format!("RW {0} VMFS \"a\"\nRW {0} VMFS \"b\"\n", u64::MAX);
        assert!(matches!(
            Descriptor::parse(&two),
            Err(DescriptorError::BadCapacity { sectors: u64::MAX })
        ));
        assert!(matches!(
            Descriptor::parse("RW 0 VMFS \"x-flat.vmdk\"\n"),
            Err(DescriptorError::BadCapacity { sectors: 0 })
        ));
        let max = MAX_CAPACITY_BYTES / SECTOR;
        assert_eq!(
            Descriptor::parse(&format!("RW {max} VMFS \"x\"\n"))
                .unwrap()
                .capacity_bytes(),
            MAX_CAPACITY_BYTES
        );
        assert!(Descriptor::parse(&format!("RW {} VMFS \"x\"\n", max + 1)).is_err());
        assert!(matches!(
            Descriptor::parse_bytes(&[0xff, 0xfe]),
            Err(DescriptorError::NotText)
        ));
    }
}
