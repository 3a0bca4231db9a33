//! Volume names, `-o` options and sizes (`vmdk_protocol`).
//!
//! Input: the first line is a volume name, each further line `key=value`
//! is an option; the whole input is also tried as one name and one size.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use vmdk_protocol::name::{validate_volume, MAX_DATASTORE_CHARS, MAX_VOLUME_BYTES, MAX_VOLUME_CHARS};
use vmdk_protocol::options::VALID_OPTIONS;
use vmdk_protocol::size::{parse_size_mb, MAX_SIZE_MB};
use vmdk_protocol::{VolumeOptions, VolumeRef};

fn bad_char(c: char) -> bool {
    matches!(c, '/' | '\\' | '"' | '\0') || c.is_control()
}

fn assert_safe_volume_part(v: &str) {
    assert!(!v.is_empty());
    assert!(!v.chars().any(bad_char), "{v:?}");
    assert!(v != "." && v != "..", "{v:?}");
    assert!(
        v.chars().count() <= MAX_VOLUME_CHARS && v.len() <= MAX_VOLUME_BYTES,
        "{v:?}"
    );
    for s in ["-flat", "-delta", "-ctk", "-digest", "-sesparse"] {
        assert!(!v.ends_with(s), "{v:?}");
    }
}

fn check_name(name: &str) {
    if validate_volume(name).is_ok() {
        assert_safe_volume_part(name);
    }
    match VolumeRef::parse(name) {
        Ok(r) => {
            assert_safe_volume_part(&r.volume);
            if let Some(ds) = &r.datastore {
                assert!(
                    !ds.is_empty() && !ds.contains('@') && !ds.chars().any(bad_char),
                    "{ds:?}"
                );
                assert!(ds != "." && ds != ".." && ds.chars().count() <= MAX_DATASTORE_CHARS);
            }
            assert_eq!(r.to_string(), name);
            assert_eq!(VolumeRef::parse(&r.to_string()).as_ref(), Ok(&r));
            let full = r.full_name("local");
            let again = VolumeRef::parse(&full).expect("full name parses");
            assert_eq!(
                (again.volume.as_str(), again.datastore.as_deref()),
                (r.volume.as_str(), Some("local"))
            );
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The exact MiB count of `<digits>(mb|gb|tb)`, or `None`; never wraps.
fn reference_size_mb(text: &str) -> Option<u64> {
    if !text.is_ascii() || text.len() < 3 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 2);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mul: u128 = match unit.to_ascii_lowercase().as_str() {
        "mb" => 1,
        "gb" => 1024,
        "tb" => 1 << 20,
        _ => return None,
    };
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return None;
    }
    let n: u128 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    u64::try_from(n * mul).ok()
}

fn check_size(text: &str) {
    assert_eq!(parse_size_mb(text), reference_size_mb(text), "{text:?}");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check_name(&text);
    check_size(&text);
    let mut lines = text.split('\n');
    let name = lines.next().unwrap_or("");
    check_name(name);
    let mut opts = BTreeMap::new();
    for line in lines {
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        check_size(v);
        opts.insert(k.to_owned(), v.to_owned());
    }
    match VolumeOptions::parse(&opts) {
        Ok(o) => {
            assert!(opts.keys().all(|k| VALID_OPTIONS.iter().any(|(v, _)| v == k)));
            match o.size_mb {
                Some(mb) => assert!((1..=MAX_SIZE_MB).contains(&mb)),
                None => assert!(o.clone_from.is_some()),
            }
            if let Some(src) = &o.clone_from {
                assert!(!src.is_empty() && !opts.contains_key("size") && !opts.contains_key("fstype"));
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
