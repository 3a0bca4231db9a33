//! Properties of the protocol's decoders of hostile text: volume names,
//! `-o` options, sizes and the agent API bodies. Every one is a pure
//! function of what Docker or a guest sent, so none may panic, and what
//! they accept must keep the promises the rest of the code relies on (a
//! name is a safe file name stem, a size is exact).

use std::collections::BTreeMap;

use proptest::prelude::*;
use vmdk_protocol::name::{validate_volume, MAX_DATASTORE_CHARS, MAX_VOLUME_BYTES, MAX_VOLUME_CHARS};
use vmdk_protocol::options::VALID_OPTIONS;
use vmdk_protocol::size::{parse_size_mb, MAX_SIZE_MB};
use vmdk_protocol::{
    AccessMode, AttachAs, AttachStatus, CreateRequest, DiskFormat, ErrorBody, ErrorCode, FormatRecord,
    FormattedRequest, VolumeInfo, VolumeOptions, VolumeRef,
};

/// Cases per property: the whole file stays well under a few seconds in a
/// debug build.
const CASES: u32 = 512;

/// Characters a hostile name is made of: the grammar's own (`@`, `-`,
/// digits, the reserved suffixes), path syntax, quotes, NUL and other
/// control characters, and multi-byte Unicode.
fn name_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9._ ]{1,8}",
        2 => Just("@".to_string()),
        1 => Just("@@".to_string()),
        1 => "-[0-9]{6}",
        1 => prop::sample::select(vec!["-flat", "-delta", "-ctk", "-digest", "-sesparse", ".vmdk", ".vmfd"])
            .prop_map(str::to_string),
        1 => prop::sample::select(vec![".", "..", "/", "\\", "\"", "\0", "\n", "\r", "\t", "\u{7f}", "\u{85}", "\u{1b}"])
            .prop_map(str::to_string),
        1 => prop::sample::select(vec!["你好", "é", "€", "😀", "\u{200b}", "\u{feff}", "\u{2028}", "\u{10ffff}"])
            .prop_map(str::to_string),
        1 => any::<char>().prop_map(String::from),
    ]
}

/// Names biased toward the grammar, and sometimes long enough to hit the
/// length limits (100 characters, 240 bytes).
fn hostile_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec(name_piece(), 0..8).prop_map(|v| v.concat()),
        1 => (prop::collection::vec(name_piece(), 0..4), "[a-z€你]{90,130}", prop::collection::vec(name_piece(), 0..3))
            .prop_map(|(a, b, c)| format!("{}{b}{}", a.concat(), c.concat())),
        1 => any::<String>(),
    ]
}

fn bad_char(c: char) -> bool {
    matches!(c, '/' | '\\' | '"' | '\0') || c.is_control()
}

/// What every accepted volume part must be: a single, ordinary file name
/// stem that cannot reach outside the vmgroup folder.
fn assert_safe_volume_part(volume: &str) {
    assert!(!volume.is_empty(), "empty volume part accepted");
    assert!(!volume.contains('/'), "{volume:?} contains '/'");
    assert!(!volume.contains('\0'), "{volume:?} contains NUL");
    assert!(
        !volume.chars().any(bad_char),
        "{volume:?} contains an illegal character"
    );
    assert!(volume != "." && volume != "..", "{volume:?} is a dot name");
    assert!(volume.chars().count() <= MAX_VOLUME_CHARS, "{volume:?} is too long");
    assert!(volume.len() <= MAX_VOLUME_BYTES, "{volume:?} has too many bytes");
    for suffix in ["-flat", "-delta", "-ctk", "-digest", "-sesparse"] {
        assert!(!volume.ends_with(suffix), "{volume:?} ends with the reserved {suffix}");
    }
}

/// The size grammar `<digits>(mb|gb|tb)` in any case, with digit strings
/// long enough to overflow `u64` once multiplied, and near misses.
fn size_text() -> impl Strategy<Value = String> {
    let unit = prop::sample::select(vec![
        "mb", "MB", "Mb", "mB", "gb", "GB", "gB", "tb", "TB", "Tb", "kb", "b", "", "m", "€", "mb ", " mb", "bb",
    ]);
    prop_oneof![
        4 => ("[0-9]{1,30}", unit).prop_map(|(d, u)| format!("{d}{u}")),
        1 => ("[-+ ]?[0-9]{0,5}[.,]?[0-9]{0,3}", "[a-zA-Z€é😀]{0,3}").prop_map(|(d, u)| format!("{d}{u}")),
        1 => prop::collection::vec(name_piece(), 0..4).prop_map(|v| v.concat()),
        1 => any::<String>(),
    ]
}

/// What `parse_size_mb` must return, computed without any chance of
/// wrapping: the exact MiB count, or `None` when the text is not of the
/// form or the count does not fit in a `u64`.
fn reference_size_mb(text: &str) -> Option<u64> {
    if !text.is_ascii() || text.len() < 3 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 2);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mul: u128 = match unit.to_ascii_lowercase().as_str() {
        "mb" => 1,
        "gb" => 1024,
        "tb" => 1024 * 1024,
        _ => return None,
    };
    // 39 digits always exceed u64; below that u128 holds n * mul exactly.
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return None;
    }
    let n: u128 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    u64::try_from(n * mul).ok()
}

fn option_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => size_text(),
        2 => prop::sample::select(vec![
            "thin", "zeroedthick", "eagerzeroedthick", "persistent", "independent_persistent", "read-write",
            "read-only", "ext4", "xfs", "", "src", "src@local", "10gb", "300mb", "1mb", "0mb", "62tb", "63tb",
        ])
        .prop_map(str::to_string),
        1 => hostile_name(),
    ]
}

fn option_key() -> impl Strategy<Value = String> {
    let valid: Vec<String> = VALID_OPTIONS.iter().map(|(k, _)| k.to_string()).collect();
    prop_oneof![
        6 => prop::sample::select(valid),
        1 => prop::sample::select(vec!["Size", "sizes", "", " size", "size\0", "fstype\n", "clone_from"])
            .prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

fn option_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(option_key(), option_value(), 0..6)
}

fn short_text() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[a-z0-9@._-]{0,12}", 1 => any::<String>(), 1 => hostile_name()]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::InvalidRequest,
        ErrorCode::UnknownRoute,
        ErrorCode::InvalidName,
        ErrorCode::InvalidOption,
        ErrorCode::UnknownDatastore,
        ErrorCode::InvalidPolicy,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::InUse,
        ErrorCode::AttachedElsewhere,
        ErrorCode::MissingVmId,
        ErrorCode::Backend,
        ErrorCode::Io,
        ErrorCode::Internal,
    ])
}

fn volume_info() -> impl Strategy<Value = VolumeInfo> {
    let strings = prop::collection::vec(short_text(), 11);
    let numbers = (any::<u64>(), any::<u64>());
    let enums = (
        prop::sample::select(vec![
            DiskFormat::Thin,
            DiskFormat::ZeroedThick,
            DiskFormat::EagerZeroedThick,
        ]),
        prop::sample::select(vec![AccessMode::ReadWrite, AccessMode::ReadOnly]),
        prop::sample::select(vec![AttachAs::IndependentPersistent, AttachAs::Persistent]),
        prop::sample::select(vec![AttachStatus::Detached, AttachStatus::Attached]),
    );
    let optionals = (
        prop::option::of(short_text()),
        prop::option::of(short_text()),
        prop::option::of(short_text()),
        prop::option::of((short_text(), short_text(), short_text())),
    );
    (strings, numbers, enums, optionals, option_map()).prop_map(
        |(s, (capacity_bytes, allocated_bytes), (disk_format, access, attach_as, status), o, options)| VolumeInfo {
            name: s[0].clone(),
            volume: s[1].clone(),
            datastore: s[2].clone(),
            vmgroup: s[3].clone(),
            capacity_bytes,
            allocated_bytes,
            disk_format,
            fstype: s[4].clone(),
            vsan_policy: o.0.clone(),
            access,
            attach_as,
            status,
            attached_to: o.1.clone(),
            created: s[5].clone(),
            created_by: s[6].clone(),
            clone_from: o.2,
            disk_uuid: s[7].clone(),
            options,
            formatted: o.3.map(|(fstype, at, by)| FormatRecord { fstype, at, by }),
            creating: o.0.clone().map(|step| vmdk_protocol::CreateProgress {
                step,
                percent: (capacity_bytes % 101) as u8,
                started: s[5].clone(),
                failed: o.1.clone(),
            }),
            vsan_policy_state: o
                .0
                .clone()
                .map(|reason| vmdk_protocol::PolicyState::Recorded { reason }),
        },
    )
}

/// JSON-ish bytes: fragments of the API bodies, so the decoder gets past
/// the first byte most of the time.
fn json_ish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => prop::sample::select(vec![
            "{", "}", "[", "]", ":", ",", "\"", "null", "true", "1", "-0", "1e999", "\"name\"", "\"opts\"",
            "\"fstype\"", "\"code\"", "\"message\"", "\"capacity_bytes\"", "\"formatted\"", "\"status\"",
            "\"attached\"", "\"in_use\"", "\"v@local\"", "\"\\u0000\"", "\"\\ud800\"", "18446744073709551616",
            " ", "\n",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..4),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn names_never_panic_and_accepted_ones_are_safe_file_names(name in hostile_name()) {
        let parsed = VolumeRef::parse(&name);
        let volume_only = validate_volume(&name);
        if let Ok(r) = &parsed {
            assert_safe_volume_part(&r.volume);
            match &r.datastore {
                Some(ds) => {
                    prop_assert_eq!(format!("{}@{ds}", r.volume), name.clone());
                    prop_assert!(!ds.is_empty() && !ds.contains('@') && !ds.chars().any(bad_char), "{:?}", ds);
                    prop_assert!(ds != "." && ds != "..");
                    prop_assert!(ds.chars().count() <= MAX_DATASTORE_CHARS);
                }
                None => prop_assert_eq!(&r.volume, &name),
            }
        }
        if volume_only.is_ok() {
            assert_safe_volume_part(&name);
        }
        // The error texts are shown to users: rendering them is part of
        // decoding and must not panic either.
        let _ = parsed.map_err(|e| e.to_string());
        let _ = volume_only.map_err(|e| e.to_string());
    }

    #[test]
    fn an_accepted_name_survives_its_canonical_form(name in hostile_name(), ds in "[a-zA-Z0-9_. -]{1,20}") {
        if let Ok(r) = VolumeRef::parse(&name) {
            // Display gives back what was parsed.
            prop_assert_eq!(VolumeRef::parse(&r.to_string()), Ok(r.clone()));
            // full_name -> parse names the same volume on the given datastore.
            if ds != "." && ds != ".." {
                let full = r.full_name(&ds);
                let again = VolumeRef::parse(&full);
                prop_assert_eq!(
                    again,
                    Ok(VolumeRef { volume: r.volume.clone(), datastore: Some(ds.clone()) }),
                    "full name {:?}", full
                );
            }
        }
    }

    #[test]
    fn sizes_are_exact_or_refused_never_wrapped(text in size_text()) {
        prop_assert_eq!(parse_size_mb(&text), reference_size_mb(&text), "{:?}", text);
    }

    #[test]
    fn options_never_panic_and_accepted_ones_are_in_range(opts in option_map()) {
        match VolumeOptions::parse(&opts) {
            Ok(o) => {
                prop_assert!(opts.keys().all(|k| VALID_OPTIONS.iter().any(|(v, _)| v == k)));
                match o.size_mb {
                    Some(mb) => prop_assert!((1..=MAX_SIZE_MB).contains(&mb), "size {}", mb),
                    None => prop_assert!(o.clone_from.is_some(), "only a clone inherits its size"),
                }
                if let Some(src) = &o.clone_from {
                    prop_assert!(!src.is_empty());
                    prop_assert!(!opts.contains_key("size") && !opts.contains_key("fstype"));
                }
                if let Some(p) = &o.vsan_policy {
                    prop_assert!(!p.is_empty());
                }
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn api_bodies_never_panic_on_any_bytes(bytes in prop_oneof![json_ish(), prop::collection::vec(any::<u8>(), 0..64)]) {
        let _ = serde_json::from_slice::<CreateRequest>(&bytes);
        let _ = serde_json::from_slice::<FormattedRequest>(&bytes);
        let _ = serde_json::from_slice::<VolumeInfo>(&bytes);
        let _ = serde_json::from_slice::<ErrorBody>(&bytes);
    }

    #[test]
    fn api_bodies_round_trip(
        name in short_text(),
        opts in option_map(),
        fstype in short_text(),
        info in volume_info(),
        code in error_code(),
        message in short_text(),
    ) {
        let create = CreateRequest { name, opts };
        prop_assert_eq!(serde_json::from_slice::<CreateRequest>(&serde_json::to_vec(&create).unwrap()).unwrap(), create);
        let formatted = FormattedRequest { fstype };
        prop_assert_eq!(
            serde_json::from_slice::<FormattedRequest>(&serde_json::to_vec(&formatted).unwrap()).unwrap(),
            formatted
        );
        prop_assert_eq!(serde_json::from_slice::<VolumeInfo>(&serde_json::to_vec(&info).unwrap()).unwrap(), info);
        let body = ErrorBody::new(code, message);
        prop_assert_eq!(serde_json::from_slice::<ErrorBody>(&serde_json::to_vec(&body).unwrap()).unwrap(), body);
    }
}
