//! Properties of the agent's decoders of hostile bytes: request bodies from
//! guests, VSAN policy expressions from administrators, and the VMDK
//! descriptors and `.vmfd` sidecars found on a datastore (shared ground that
//! anyone with write access can fill). Each is a pure function of its input:
//! it never panics, what it accepts keeps the promises the agent relies on,
//! and what the agent writes reads back as written.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vmdk_agent::api::json_body;
use vmdk_agent::meta::{VolumeMeta, MAX_META_BYTES, META_VERSION};
use vmdk_agent::policy::expr::{Rule, Value};
use vmdk_agent::policy::{validate_name, PolicyExpr};
use vmdk_agent::vmdk::{new_disk_uuid, Descriptor, SECTOR};
use vmdk_protocol::name::validate_volume;
use vmdk_protocol::size::MIB;
use vmdk_protocol::{AttachStatus, CreateRequest, FormatRecord, FormattedRequest};

/// Cases per property; the whole file stays within a few seconds in a
/// debug build.
const CASES: u32 = 512;

/// `base` with a few random byte edits (replace, insert, delete): inputs
/// that are nearly valid, so a decoder gets deep before it fails.
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

/// As [`mutated`], for text decoders: edits are whole characters.
fn mutated_text(base: &'static str) -> impl Strategy<Value = String> {
    let edit = (any::<prop::sample::Index>(), 0u8..3, odd_char());
    prop::collection::vec(edit, 0..6).prop_map(move |edits| {
        let mut c: Vec<char> = base.chars().collect();
        for (at, op, ch) in edits {
            let i = at.index(c.len() + 1);
            match op {
                0 if i < c.len() => c[i] = ch,
                1 => c.insert(i, ch),
                _ if i < c.len() => {
                    c.remove(i);
                }
                _ => c.insert(i, ch),
            }
        }
        c.into_iter().collect()
    })
}

/// Characters that break parsers: quotes, escapes, separators, line
/// breaks, control characters, Unicode whitespace and multi-byte text.
fn odd_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => prop::sample::select(vec![
            '"', '\\', '(', ')', '=', '#', ' ', '\t', '\n', '\r', '\0', '\u{7f}', '\u{85}', '\u{a0}', '\u{2028}',
            '\u{3000}', 'é', '€', '你', '😀', '0', '9', '-', '+', 'i', 'l', 'R', 'W',
        ]),
        1 => any::<char>(),
    ]
}

// ---------------------------------------------------------------- bodies

fn create_request() -> impl Strategy<Value = CreateRequest> {
    (
        any::<String>(),
        prop::collection::btree_map(any::<String>(), any::<String>(), 0..5),
    )
        .prop_map(|(name, opts)| CreateRequest { name, opts })
}

const CREATE_BODY: &str = r#"{"name":"vol1@local","opts":{"size":"10gb","fstype":"xfs","clone-from":"src"}}"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn request_bodies_never_panic(bytes in prop_oneof![
        mutated(CREATE_BODY.as_bytes().to_vec()),
        mutated(br#"{"fstype":"ext4"}"#.to_vec()),
        prop::collection::vec(any::<u8>(), 0..64),
    ]) {
        let create = json_body::<CreateRequest>(&bytes);
        let formatted = json_body::<FormattedRequest>(&bytes);
        if bytes.iter().all(u8::is_ascii_whitespace) {
            prop_assert_eq!(create.unwrap(), CreateRequest::default());
            prop_assert_eq!(formatted.unwrap(), FormattedRequest::default());
        } else {
            let _ = create.map_err(|e| e.to_string());
            let _ = formatted.map_err(|e| e.to_string());
        }
    }

    /// `{"opts":{"size":"1gb","size":"100gb"}}` is refused, not read as
    /// the last value.
    #[test]
    fn request_bodies_with_a_duplicate_option_are_refused(
        key in "[a-z-]{1,10}",
        a in "[a-z0-9]{0,4}",
        b in "[a-z0-9]{0,4}",
    ) {
        let body = format!(r#"{{"name":"v","opts":{{"{key}":"{a}","x{key}":"","{key}":"{b}"}}}}"#);
        let e = json_body::<CreateRequest>(body.as_bytes()).expect_err(&body).to_string();
        prop_assert!(e.contains("is given more than once"), "{}: {}", body, e);
    }

    #[test]
    fn request_bodies_round_trip(req in create_request(), fstype in any::<String>()) {
        let bytes = serde_json::to_vec(&req).unwrap();
        prop_assert_eq!(json_body::<CreateRequest>(&bytes).unwrap(), req);
        let f = FormattedRequest { fstype };
        prop_assert_eq!(json_body::<FormattedRequest>(&serde_json::to_vec(&f).unwrap()).unwrap(), f);
    }
}

// -------------------------------------------------------------- policies

const CAPABILITY_NAMES: &[&str] = &[
    "hostFailuresToTolerate",
    "stripeWidth",
    "forceProvisioning",
    "proportionalCapacity",
    "cacheReservation",
    "iopsLimit",
    "checksumDisabled",
    "replicaPreference",
    "someFutureCapability",
];

/// Token soup over the policy grammar: mostly well-formed pieces in random
/// order, with escapes, signs, huge integers and odd characters.
fn policy_soup() -> impl Strategy<Value = String> {
    let mut tokens: Vec<String> = [
        "(",
        "(",
        "(",
        ")",
        ")",
        ")",
        "((",
        "))",
        " ",
        "  ",
        "\t",
        "\u{a0}",
        "\"",
        "\"\"",
        "\\\"",
        "\\\\",
        "\\n",
        "\\",
        "i",
        "l",
        "i1",
        "i0",
        "i2",
        "l2",
        "i-1",
        "l+0",
        "i99999999999999999999",
        "i-9223372036854775808",
        "\"RAID-5/6 (Erasure Coding) - Capacity\"",
        "\"\"",
        "x",
        "é",
        "你",
        "😀",
        "\u{1}",
        "\u{7f}",
        "\n",
        "\r",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    tokens.extend(CAPABILITY_NAMES.iter().map(|c| format!("\"{c}\"")));
    let token = prop_oneof![
        6 => prop::sample::select(tokens),
        1 => odd_char().prop_map(String::from),
        1 => "[0-9]{1,20}",
    ];
    prop::collection::vec(token, 0..24).prop_map(|v| v.concat())
}

/// A well-formed rule with an arbitrary value, written with arbitrary
/// spacing, so that many soups parse.
fn policy_text() -> impl Strategy<Value = String> {
    let capability = prop_oneof![
        3 => prop::sample::select(CAPABILITY_NAMES.to_vec()).prop_map(str::to_string),
        1 => "[a-zA-Z\"\\\\ é]{1,12}".prop_map(|s| s.replace('\\', "\\\\").replace('"', "\\\"")),
    ];
    let value = prop_oneof![
        "[il][+-]?[0-9]{1,3}",
        "[il]-?[0-9]{18,21}",
        "[a-zA-Z0-9 ()/\\\\\"-]{0,12}".prop_map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))),
    ];
    let ws = "[ \t]{0,2}";
    let rule = (ws, capability, ws, value, ws).prop_map(|(a, c, b, v, d)| format!("{a}(\"{c}\"{b} {v}{d})"));
    (prop::collection::vec(rule, 1..5), ws).prop_map(|(rules, w)| format!("({}{w})", rules.concat()))
}

fn check_policy_error(input: &str, e: &vmdk_agent::policy::ContentError) {
    let text = e.to_string();
    assert!(e.column >= 1, "{input:?}: column {} in {text}", e.column);
    assert!(
        e.column <= input.chars().count() + 1,
        "{input:?}: column {} is past the end",
        e.column
    );
    assert!(text.contains('^'), "{input:?}: no caret in {text}");
}

/// A policy of rules with capabilities outside [`vmdk_agent::policy::expr::CAPABILITIES`]
/// (so no range applies) and any values.
fn policy_expr() -> impl Strategy<Value = PolicyExpr> {
    let capability = "[^\\p{Cc}]{1,16}".prop_filter("unknown capability", |c| !CAPABILITY_NAMES.contains(&c.as_str()));
    let value = prop_oneof![
        any::<i64>().prop_map(Value::Int),
        any::<i64>().prop_map(Value::Long),
        any::<String>().prop_map(Value::Str),
    ];
    prop::collection::btree_map(capability, value, 1..5).prop_map(|rules| PolicyExpr {
        rules: rules
            .into_iter()
            .map(|(capability, value)| Rule { capability, value })
            .collect(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn policies_never_panic_and_errors_point_into_the_text(input in prop_oneof![
        policy_soup(),
        policy_text(),
        mutated_text(r#"(("stripeWidth" i2)("hostFailuresToTolerate" i1))"#),
        mutated_text(r#"(("replicaPreference" "RAID-5/6 (Erasure Coding) - Capacity") ("iopsLimit" l+0))"#),
        any::<String>(),
    ]) {
        match PolicyExpr::parse(&input) {
            Ok(p) => {
                prop_assert!(!p.rules.is_empty());
                for (i, r) in p.rules.iter().enumerate() {
                    prop_assert!(!r.capability.is_empty());
                    prop_assert!(!r.capability.chars().any(char::is_control), "{:?}", r.capability);
                    prop_assert!(p.rules[..i].iter().all(|o| o.capability != r.capability), "duplicate accepted");
                }
                let _ = p.unknown_capabilities();
            }
            Err(e) => check_policy_error(&input, &e),
        }
    }

    /// The canonical form (`Display`) of an accepted policy is itself
    /// accepted and means the same policy.
    #[test]

    fn canonical_form_reparses_to_the_same_policy(input in prop_oneof![policy_soup(), policy_text()], expr in policy_expr()) {
        if let Ok(p) = PolicyExpr::parse(&input) {
            prop_assert_eq!(PolicyExpr::parse(&p.to_string()), Ok(p.clone()), "canonical {}", p);
        }
        prop_assert_eq!(PolicyExpr::parse(&expr.to_string()), Ok(expr.clone()), "canonical {}", expr);
    }

    /// The part of the property above that holds today: capability names
    /// without quotes or backslashes, any values.
    #[test]
    fn canonical_form_round_trips_for_plain_capability_names(
        input in prop_oneof![policy_soup(), policy_text()],
        expr in policy_expr(),
    ) {
        let plain = |p: &PolicyExpr| p.rules.iter().all(|r| !r.capability.contains(['"', '\\']));
        if let Ok(p) = PolicyExpr::parse(&input) {
            if plain(&p) {
                prop_assert_eq!(PolicyExpr::parse(&p.to_string()), Ok(p.clone()), "canonical {}", p);
            }
        }
        if plain(&expr) {
            prop_assert_eq!(PolicyExpr::parse(&expr.to_string()), Ok(expr.clone()), "canonical {}", expr);
        }
    }

    /// Policy names become file names in the policies folder.
    #[test]
    fn accepted_policy_names_are_plain_file_names(name in prop_oneof![
        "[a-zA-Z0-9 ./\\\\\"=-]{0,12}",
        mutated_text("RAID-5 fast.tmp"),
        any::<String>(),
    ]) {
        if validate_name(&name).is_ok() {
            prop_assert!(!name.is_empty() && !name.contains(['/', '\\', '\0']) && !name.starts_with('.'));
            prop_assert!(name != "." && name != "..");
            prop_assert!(!name.chars().any(char::is_control));
        }
    }
}

// ----------------------------------------------------------- descriptors

/// ESXi's own descriptor (as in `vmdk.rs`' tests).
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

/// Sector counts: ordinary, zero, and large enough that `sectors * 512`
/// or the sum of two extents leaves `u64`; also digit strings past `u64`.
fn sector_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (1u64..1 << 32).prop_map(|n| n.to_string()),
        1 => Just("0".to_string()),
        2 => prop::sample::select(vec![
            (1u64 << 54).to_string(),
            (1u64 << 55).to_string(),
            ((1u64 << 55) - 1).to_string(),
            (u64::MAX / 512).to_string(),
            (u64::MAX / 512 + 1).to_string(),
            u64::MAX.to_string(),
            "18446744073709551616".to_string(),
            "-1".to_string(),
            "+5".to_string(),
            "0x10".to_string(),
            "".to_string(),
        ]),
        1 => any::<u64>().prop_map(|n| n.to_string()),
    ]
}

fn descriptor_line() -> impl Strategy<Value = String> {
    let sep = prop::sample::select(vec![" ", " ", " ", "\t", "  ", "\u{a0}"]);
    let access = prop::sample::select(vec!["RW", "RW", "RDONLY", "NOACCESS", "rw", "RW\u{a0}"]);
    let kind = prop::sample::select(vec!["VMFS", "FLAT", "SPARSE", "VMFSSPARSE", "", "\"", "é"]);
    let file = prop_oneof![
        "[a-zA-Z0-9 _.-]{0,12}".prop_map(|f| format!("\"{f}-flat.vmdk\"")),
        "[a-zA-Z0-9\"é_.-]{0,12}",
        Just("\"unterminated".to_string()),
    ];
    let extent = (
        access,
        sep.clone(),
        sector_text(),
        sep.clone(),
        kind,
        sep,
        file,
        "( 0)?",
    )
        .prop_map(|(a, s1, n, s2, k, s3, f, off)| format!("{a}{s1}{n}{s2}{k}{s3}{f}{off}"));
    let ddb = (
        prop::sample::select(vec![
            "ddb.uuid",
            "ddb.thinProvisioned",
            "ddb.adapterType",
            "ddb.geometry.cylinders",
            "ddb.",
            "ddb.x y",
        ]),
        "[ =]{0,2}",
        "\"?[a-zA-Z0-9 \"=é-]{0,12}\"?",
    )
        .prop_map(|(k, eq, v)| format!("{k} ={eq}{v}"));
    prop_oneof![
        4 => extent,
        3 => ddb,
        1 => prop::sample::select(vec![
            "# Disk DescriptorFile", "# disk descriptorfile", "version=1", "encoding=\"UTF-8\"", "CID=05e9aba7",
            "CID=\"\"x\"\"", "CID=", "parentCID=ffffffff", "createType=\"vmfs\"", "createType=\"monolithicFlat\"",
            "createType=", "#DDB", "", "   ", "=", "==", "\"", "RW", "RW ",
        ])
        .prop_map(str::to_string),
        1 => "[a-zA-Z0-9 =\"#.]{0,16}",
        1 => any::<String>(),
    ]
}

fn descriptor_text() -> impl Strategy<Value = String> {
    let eol = prop::sample::select(vec!["\n", "\n", "\r\n", "\r"]);
    prop_oneof![
        3 => (prop::collection::vec(descriptor_line(), 0..12), eol).prop_map(|(lines, eol)| lines.join(eol)),
        2 => mutated_text(ESXI_SAMPLE),
        1 => any::<String>(),
    ]
}

/// The exact capacity of a parsed descriptor, without wrapping.
fn exact_capacity(d: &Descriptor) -> u128 {
    d.extents
        .iter()
        .map(|e| u128::from(e.sectors) * u128::from(SECTOR))
        .sum()
}

/// A flat extent name the agent could write: a valid volume name.
fn flat_file() -> impl Strategy<Value = String> {
    "[^/\\\\\"\\p{Cc}]{1,24}"
        .prop_filter("valid volume name", |v| validate_volume(v).is_ok())
        .prop_map(|v| format!("{v}-flat.vmdk"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn descriptors_never_panic(text in descriptor_text()) {
        match Descriptor::parse(&text) {
            Ok(d) => {
                prop_assert!(!d.extents.is_empty());
                let _ = (d.is_thin(), d.uuid());
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// `capacity_bytes` is the exact size of what was accepted: a
    /// descriptor whose size does not fit in 64 bits is refused by `parse`,
    /// never wrapped (a release build would wrap it, to 0 bytes for 2^55
    /// sectors) and never a panic (a debug build would overflow).
    #[test]

    fn capacity_of_an_accepted_descriptor_is_exact(text in descriptor_text()) {
        if let Ok(d) = Descriptor::parse(&text) {
            let exact = exact_capacity(&d);
            prop_assert!(exact <= u128::from(u64::MAX), "accepted a descriptor of {} bytes: {:?}", exact, text);
            let got = std::panic::catch_unwind(|| d.capacity_bytes());
            prop_assert!(got.is_ok(), "capacity_bytes panicked on {:?}", text);
            prop_assert_eq!(u128::from(got.unwrap()), exact);
        }
    }

    /// A descriptor that is accepted describes a disk: not zero bytes
    /// (what `clone-from` then copied without error).
    #[test]

    fn an_accepted_descriptor_describes_a_disk(text in descriptor_text()) {
        if let Ok(d) = Descriptor::parse(&text) {
            prop_assert!(exact_capacity(&d) > 0, "accepted a 0-byte disk: {:?}", text);
        }
    }

    /// What the agent writes reads back as written, at every size it
    /// creates (1 MiB to 62 TiB, any byte count).
    #[test]
    fn written_descriptors_round_trip(
        flat in flat_file(),
        capacity in 1u64..=(62 * MIB * MIB),
        thin in any::<bool>(),
        random in any::<[u8; 16]>(),
        cid in any::<u32>(),
    ) {
        let uuid = new_disk_uuid(random);
        let d = Descriptor::new_vmfs(&flat, capacity, thin, &uuid, cid);
        let text = d.render();
        let back = Descriptor::parse(&text);
        prop_assert_eq!(back.as_ref(), Ok(&d), "{}", text);
        let back = back.unwrap();
        prop_assert!(back.capacity_bytes() >= capacity && back.capacity_bytes() - capacity < SECTOR);
        prop_assert_eq!(back.is_thin(), thin);
        prop_assert_eq!(back.extents[0].file.as_str(), flat.as_str());
    }

    /// `render` is a faithful encoder of whatever `parse` accepted (or
    /// `parse` refuses what `render` could not write back).
    #[test]

    fn parsed_descriptors_render_and_parse_back(text in descriptor_text()) {
        if let Ok(d) = Descriptor::parse(&text) {
            let rendered = d.render();
            prop_assert_eq!(Descriptor::parse(&rendered), Ok(d), "rendered:\n{}", rendered);
        }
    }
}

// -------------------------------------------------------------- sidecars

fn volume_meta() -> impl Strategy<Value = VolumeMeta> {
    let opt = || prop::option::of(any::<String>());
    (
        prop::sample::select(vec![AttachStatus::Detached, AttachStatus::Attached]),
        prop::collection::btree_map(any::<String>(), any::<String>(), 0..6),
        (any::<String>(), any::<String>()),
        (opt(), opt(), opt()),
        prop::option::of((any::<String>(), any::<String>(), any::<String>())),
    )
        .prop_map(
            |(status, vol_opts, (created, created_by), (attached_vm, attached_device, attached_at), formatted)| {
                VolumeMeta {
                    version: META_VERSION,
                    status,
                    vol_opts,
                    created,
                    created_by,
                    attached_vm,
                    attached_device,
                    attached_at,
                    formatted: formatted.map(|(fstype, at, by)| FormatRecord { fstype, at, by }),
                    policy_state: None,
                }
            },
        )
}

fn real_sidecar() -> Vec<u8> {
    VolumeMeta {
        version: META_VERSION,
        status: AttachStatus::Attached,
        vol_opts: BTreeMap::from([
            ("size".to_string(), "10gb".to_string()),
            ("diskformat".to_string(), "thin".to_string()),
            ("fstype".to_string(), "ext4".to_string()),
        ]),
        created: "2026-01-01T00:00:00Z".into(),
        created_by: "vm-1".into(),
        attached_vm: Some("vm-1".into()),
        attached_device: Some("/dev/loop3".into()),
        attached_at: Some("2026-01-01T00:01:00Z".into()),
        formatted: Some(FormatRecord {
            fstype: "ext4".into(),
            at: "2026-01-01T00:01:02Z".into(),
            by: "vm-1".into(),
        }),
        policy_state: None,
    }
    .encode()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn sidecars_never_panic(bytes in prop_oneof![
        mutated(real_sidecar()),
        prop::collection::vec(any::<u8>(), 0..128),
    ]) {
        match VolumeMeta::decode(&bytes) {
            Ok(m) => {
                prop_assert_eq!(m.version, META_VERSION);
                prop_assert!(bytes.len() as u64 <= MAX_META_BYTES);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn sidecars_round_trip(meta in volume_meta()) {
        let bytes = meta.encode();
        prop_assert_eq!(VolumeMeta::decode(&bytes).unwrap(), meta);
    }
}

#[test]
fn oversized_sidecars_are_refused_before_parsing() {
    let mut big = real_sidecar();
    big.pop(); // the trailing newline
    big.pop(); // the closing brace
    big.extend_from_slice(b",\"pad\":\"");
    big.resize(MAX_META_BYTES as usize + 1 - 2, b'x');
    big.extend_from_slice(b"\"}");
    assert_eq!(big.len() as u64, MAX_META_BYTES + 1);
    assert!(VolumeMeta::decode(&big).is_err());
}
