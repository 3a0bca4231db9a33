//! Properties of the plugin's decoders of hostile bytes: Docker's
//! `VolumeDriver.*` bodies, the `mounts.json` state file, the kernel's
//! `/proc/self/mountinfo` and a disk's first 2 KiB. Each is a pure function
//! of its input: it never panics, and what it accepts means exactly what
//! the bytes said.

use std::collections::BTreeMap;
use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use vmdk_plugin::plugin::{decode_request, DockerRequest};
use vmdk_plugin::state::{MountRecord, PluginState, MAX_STATE_BYTES, STATE_VERSION};
use vmdk_plugin::sys::{classify_superblock, mountinfo, MountEntry};

/// Cases per property; the whole file stays within a few seconds in a
/// debug build.
const CASES: u32 = 512;

/// `base` with a few random byte edits (replace, insert, delete).
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let edit = (any::<prop::sample::Index>(), 0u8..3, any::<u8>());
    prop::collection::vec(edit, 0..6).prop_map(move |edits| {
        let mut b = base.clone();
        for (at, op, byte) in edits {
            let i = at.index(b.len() + 1);
            match op {
                0 if i < b.len() => b[i] = byte,
                1 => b.insert(i, byte),
                _ if i < b.len() => {
                    b.remove(i);
                }
                _ => b.insert(i, byte),
            }
        }
        b
    })
}

/// Text that names things: volume names with `@`, paths, quotes, escapes,
/// control characters and multi-byte Unicode.
fn hostile_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-zA-Z0-9._-]{1,8}",
        2 => prop::sample::select(vec![
            "@", "@local", "/", "..", "\\", "\"", "\\\"", "\0", "\n", "\t", " ", "\u{7f}", "\u{85}", "é", "€", "你",
            "😀", "\u{feff}", "\u{2028}",
        ])
        .prop_map(str::to_string),
        1 => any::<char>().prop_map(String::from),
    ];
    prop_oneof![
        4 => prop::collection::vec(piece, 0..6).prop_map(|v| v.concat()),
        1 => any::<String>(),
    ]
}

// ---------------------------------------------------------------- Docker

/// A request as Docker builds it (`Name`, `Opts`, `ID`, any subset; `Opts`
/// may be `null`), plus fields Docker does not send.
fn docker_request() -> impl Strategy<Value = (Value, DockerRequest)> {
    let opts = prop::collection::btree_map(
        prop_oneof![
            3 => prop::sample::select(vec!["size", "fstype", "diskformat", "clone-from", "access", "attach-as", "vsan-policy-name"])
                .prop_map(str::to_string),
            1 => hostile_text(),
        ],
        hostile_text(),
        0..5,
    );
    (
        prop::option::of(hostile_text()),
        prop::option::of(prop::option::of(opts)),
        prop::option::of(hostile_text()),
        any::<bool>(),
    )
        .prop_map(|(name, opts, id, extra)| {
            let mut body = Map::new();
            if let Some(n) = &name {
                body.insert("Name".into(), json!(n));
            }
            if let Some(o) = &opts {
                body.insert("Opts".into(), json!(o));
            }
            if let Some(i) = &id {
                body.insert("ID".into(), json!(i));
            }
            if extra {
                body.insert("Extra".into(), json!({"nested": [1, null, "x"]}));
            }
            let want = DockerRequest {
                name: name.unwrap_or_default(),
                opts: opts.flatten(),
                id: id.unwrap_or_default(),
            };
            (Value::Object(body), want)
        })
}

const DOCKER_BODIES: &[&str] = &[
    r#"{"Name":"vsanvol1","Opts":{"size":"50gb"}}"#,
    r#"{"Name":"plain","Opts":null}"#,
    r#"{"Name":"v","Opts":{"clone-from":"a","size":"1gb"}}"#,
    r#"{"Name":"db","ID":"2c6ce3c9d0a5d1b7b6b0f0a7f1d2e6a1c1b7e0d9f3a4b5c6d7e8f9a0b1c2d3e4"}"#,
    "",
    "\n",
];

/// JSON object text with one key written twice, at the top level or in
/// `Opts`, with the same or different values.
fn body_with_a_duplicate_key() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec!["size", "fstype", "clone-from", "access"]);
    (key, "[a-z0-9]{0,4}", "[a-z0-9]{0,4}", any::<bool>()).prop_map(|(k, a, b, in_opts)| {
        if in_opts {
            format!(r#"{{"Name":"v","Opts":{{"{k}":"{a}","{k}":"{b}"}}}}"#)
        } else {
            format!(r#"{{"Name":"{a}","Opts":{{}},"Name":"{b}"}}"#)
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn docker_bodies_never_panic(bytes in prop_oneof![
        prop::sample::select(DOCKER_BODIES.to_vec()).prop_flat_map(|b| mutated(b.as_bytes().to_vec())),
        prop::collection::vec(any::<u8>(), 0..64),
    ]) {
        match decode_request(&bytes) {
            Ok(r) => {
                if bytes.iter().all(u8::is_ascii_whitespace) {
                    prop_assert_eq!(r, DockerRequest::default());
                }
            }
            Err(e) => prop_assert!(e.contains("expected JSON like"), "{}", e),
        }
    }

    #[test]
    fn docker_bodies_decode_to_what_they_say((body, want) in docker_request(), pretty in any::<bool>()) {
        let bytes = if pretty { serde_json::to_vec_pretty(&body) } else { serde_json::to_vec(&body) }.unwrap();
        prop_assert_eq!(decode_request(&bytes), Ok(want));
    }

    /// A key given twice has no single meaning; taking the last one
    /// silently (`{"size":"1gb","size":"100gb"}`) is refused instead.
    #[test]
    fn docker_bodies_with_a_duplicate_key_are_refused(body in body_with_a_duplicate_key()) {
        let got = decode_request(body.as_bytes());
        prop_assert!(got.is_err(), "{} decoded to {:?}", body, got);
        let e = got.unwrap_err();
        prop_assert!(e.contains("duplicate field") || e.contains("is given more than once"), "{}", e);
    }
}

// ------------------------------------------------------------ mounts.json

fn plugin_state() -> impl Strategy<Value = PluginState> {
    let record = (
        prop::collection::btree_map(hostile_text(), any::<u64>(), 0..4),
        prop::collection::btree_map(hostile_text(), any::<u32>(), 0..3),
        hostile_text(),
        hostile_text(),
        any::<bool>(),
    )
        .prop_map(|(ids, nested, device, fstype, read_only)| MountRecord {
            ids,
            nested,
            device,
            fstype,
            read_only,
        });
    prop::collection::btree_map(hostile_text(), record, 0..4).prop_map(|mounts| PluginState {
        version: STATE_VERSION,
        mounts,
    })
}

fn real_state() -> Vec<u8> {
    let mut s = PluginState::default();
    s.mounts.insert(
        "db@local".into(),
        MountRecord {
            ids: BTreeMap::from([
                ("2c6ce3c9d0a5".to_string(), 1_767_225_600),
                ("recovered:web".to_string(), 7),
            ]),
            nested: BTreeMap::from([("2c6ce3c9d0a5".to_string(), 1)]),
            device: "/dev/loop3".into(),
            fstype: "ext4".into(),
            read_only: false,
        },
    );
    s.encode()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn state_files_never_panic(bytes in prop_oneof![mutated(real_state()), prop::collection::vec(any::<u8>(), 0..128)]) {
        match PluginState::decode(&bytes) {
            Ok(s) => {
                prop_assert_eq!(s.version, STATE_VERSION);
                prop_assert!(bytes.len() as u64 <= MAX_STATE_BYTES);
            }
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }

    #[test]
    fn state_files_round_trip(state in plugin_state()) {
        prop_assert_eq!(PluginState::decode(&state.encode()), Ok(state));
    }
}

// -------------------------------------------------------------- mountinfo

/// The kernel's escaping in mountinfo (`mangle()` in `fs/proc_namespace.c`):
/// space, tab, newline and backslash as three octal digits.
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

fn path_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-zA-Z0-9._@-]{1,8}",
        2 => prop::sample::select(vec![
            "/", " ", "\t", "\n", "\\", "\\040", "\\134", "\\777", " - ", "-", "é", "你", "😀", "\r", "\u{85}",
        ])
        .prop_map(str::to_string),
        1 => any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 1..8).prop_map(|v| format!("/{}", v.concat()))
}

/// One mount as the kernel lists it, and what it must parse to.
fn mountinfo_line() -> impl Strategy<Value = (String, MountEntry)> {
    (
        (1u32..5000, 1u32..5000, 0u32..300, 0u32..300),
        path_text(),
        path_text(),
        any::<bool>(),
        prop::collection::vec(
            prop::sample::select(vec!["shared:1", "master:2", "propagate_from:3", "unbindable"]),
            0..3,
        ),
        prop::sample::select(vec!["ext4", "xfs", "tmpfs", "fuse.sshfs", "overlay"]),
        prop_oneof![
            path_text(),
            Just("none".to_string()),
            hostile_text().prop_filter("source", |s| !s.is_empty())
        ],
        prop::sample::select(vec!["rw", "ro", "rw,attr2,inode64", "rw,errors=remount-ro"]),
    )
        .prop_map(
            |((id, parent, major, minor), root, target, ro, optional, fstype, source, superopts)| {
                let opts = if ro { "ro,relatime" } else { "rw,nosuid,relatime" };
                let mut fields = vec![
                    id.to_string(),
                    parent.to_string(),
                    format!("{major}:{minor}"),
                    kernel_escape(&root),
                    kernel_escape(&target),
                    opts.to_string(),
                ];
                fields.extend(optional.iter().map(|s| s.to_string()));
                let line = format!("{} - {fstype} {} {superopts}", fields.join(" "), kernel_escape(&source));
                let entry = MountEntry {
                    target: PathBuf::from(target),
                    source,
                    fstype: fstype.to_string(),
                    read_only: ro,
                };
                (line, entry)
            },
        )
}

const REAL_MOUNTINFO: &str = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
    91 22 7:0 / /mnt/vmdk/vol\\0401@local rw,relatime - ext4 /dev/loop0 rw\n\
    92 22 7:1 / /mnt/vmdk/ro@local ro,relatime shared:5 master:1 - xfs /dev/loop1 ro,attr2\n\
    30 22 0:26 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=1635688k,mode=755\n";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn mountinfo_never_panics(text in prop_oneof![
        mutated(REAL_MOUNTINFO.as_bytes().to_vec()).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        prop::collection::vec(prop_oneof![
            3 => mountinfo_line().prop_map(|(l, _)| l),
            1 => "[0-9 /:\\\\-]{0,30}",
            1 => hostile_text(),
        ], 0..6).prop_map(|l| l.join("\n")),
        any::<String>(),
    ]) {
        let entries = mountinfo::parse(&text);
        prop_assert!(entries.len() <= text.lines().count());
    }

    /// Every mount the kernel lists is found, with its mount point, source
    /// and read-only flag as they are, whatever characters they hold.
    #[test]
    fn mountinfo_lines_parse_to_what_the_kernel_meant(lines in prop::collection::vec(mountinfo_line(), 1..6)) {
        let text: String = lines.iter().map(|(l, _)| format!("{l}\n")).collect();
        let want: Vec<MountEntry> = lines.into_iter().map(|(_, e)| e).collect();
        prop_assert_eq!(mountinfo::parse(&text), want, "{}", text);
    }
}

// ------------------------------------------------------------- superblock

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn superblocks_are_classified_by_their_magic(
        mut bytes in prop::collection::vec(any::<u8>(), 2048),
        xfs in any::<bool>(),
        ext in any::<bool>(),
    ) {
        if xfs {
            bytes[..4].copy_from_slice(b"XFSB");
        }
        if ext {
            bytes[1024 + 56] = 0x53;
            bytes[1024 + 57] = 0xEF;
        }
        let buf: [u8; 2048] = bytes.clone().try_into().unwrap();
        let want = if &bytes[..4] == b"XFSB" {
            Some("xfs")
        } else if bytes[1024 + 56..1024 + 58] == [0x53, 0xEF] && bytes[1024 + 0x60] & 0x40 != 0 {
            Some("ext4")
        } else {
            None
        };
        prop_assert_eq!(classify_superblock(&buf), want);
    }
}
