//! `/proc/self/mountinfo` (`vmdk_plugin::sys::mountinfo::parse`) and a
//! disk's first 2 KiB (`vmdk_plugin::sys::classify_superblock`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmdk_plugin::sys::{classify_superblock, mountinfo};

/// The kernel's escaping (`mangle()` in fs/proc_namespace.c).
fn kernel_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let entries = mountinfo::parse(&text);
    assert!(entries.len() <= text.lines().count());
    // Each mount, listed again the way the kernel lists it, parses back to
    // the same mount.
    for e in &entries {
        let target = e.target.to_str().expect("parsed from a string");
        let line = format!(
            "36 35 98:0 / {} {} shared:1 - {} {} rw\n",
            kernel_escape(target),
            if e.read_only { "ro,relatime" } else { "rw,relatime" },
            e.fstype,
            kernel_escape(&e.source),
        );
        assert_eq!(mountinfo::parse(&line).as_slice(), std::slice::from_ref(e), "{line:?}");
    }

    if let Some(head) = data.first_chunk::<2048>() {
        let want = if &head[..4] == b"XFSB" {
            Some("xfs")
        } else if head[1024 + 56..1024 + 58] == [0x53, 0xEF] && head[1024 + 0x60] & 0x40 != 0 {
            Some("ext4")
        } else {
            None
        };
        assert_eq!(classify_superblock(head), want);
    }
});
