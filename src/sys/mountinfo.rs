//! Parsing `/proc/self/mountinfo`.

use std::path::PathBuf;

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point.
    pub target: PathBuf,
    /// Mount source (the device for block filesystems).
    pub source: String,
    /// Filesystem type.
    pub fstype: String,
    /// Whether the mount is read-only.
    pub read_only: bool,
}

/// Decodes the kernel's octal escapes (`\040` for space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (oct[0] - b'0') as u32 * 64 + (oct[1] - b'0') as u32 * 8 + (oct[2] - b'0') as u32;
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 2 {
            continue;
        }
        let opts = l[5];
        out.push(MountEntry {
            target: PathBuf::from(unescape(l[4])),
            source: unescape(r[1]),
            fstype: r[0].to_owned(),
            read_only: opts.split(',').any(|o| o == "ro"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fixture() {
        let text = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    91 22 7:0 / /mnt/vmdk/vol\\0401@local rw,relatime - ext4 /dev/loop0 rw\n\
                    92 22 7:1 / /mnt/vmdk/ro@local ro,relatime shared:5 master:1 - xfs /dev/loop1 ro,attr2\n\
                    garbage line\n";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].target, PathBuf::from("/mnt/vmdk/vol 1@local"));
        assert_eq!(m[1].source, "/dev/loop0");
        assert!(!m[1].read_only);
        assert_eq!(m[2].fstype, "xfs");
        assert!(m[2].read_only);
    }
}
