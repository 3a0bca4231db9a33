//! Volume sizes in the original's `X[mMgGtT]b` form.

/// One mebibyte; the original counts `1gb` as 1024 MB.
pub const MIB: u64 = 1024 * 1024;
/// Largest virtual disk ESXi supports (62 TB).
pub const MAX_SIZE_MB: u64 = 62 * 1024 * 1024;

/// Parses `<int>mb|gb|tb` (unit case-insensitive) into mebibytes.
///
/// Returns `None` when the text is not of that form or overflows.
pub fn parse_size_mb(text: &str) -> Option<u64> {
    // The form is all ASCII; anything else is refused before the unit is
    // split off by byte offset (which would cut a multi-byte character).
    if !text.is_ascii() || text.len() < 3 {
        return None;
    }
    let lower = text.to_ascii_lowercase();
    let (digits, unit) = lower.split_at(lower.len() - 2);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let mul = match unit {
        "mb" => 1,
        "gb" => 1024,
        "tb" => 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Formats a byte count the way `vmdk-agent ls` and `docker volume inspect`
/// show it: whole `KB`, `MB`, `GB` or `TB` when exact, else one decimal.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)];
    for (unit, scale) in UNITS {
        if bytes >= scale {
            if bytes % scale == 0 {
                return format!("{}{}", bytes / scale, unit);
            }
            return format!("{:.1}{}", bytes as f64 / scale as f64, unit);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size_mb("100mb"), Some(100));
        assert_eq!(parse_size_mb("10GB"), Some(10 * 1024));
        assert_eq!(parse_size_mb("10Gb"), Some(10 * 1024));
        assert_eq!(parse_size_mb("1tb"), Some(1024 * 1024));
        for bad in [
            "100",
            "mb",
            "100mbb",
            "100gbEE",
            "-1gb",
            "1.5gb",
            "1 gb",
            "",
            "99999999999999999999tb",
            "1kb",
            "18014398509481984tb",
            // Multi-byte characters where the unit would be (found by the
            // property tests; these once panicked on a char boundary).
            "éA",
            "€",
            "1€",
            "10g\u{e9}",
        ] {
            assert_eq!(parse_size_mb(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(human_bytes(100 * MIB), "100MB");
        assert_eq!(human_bytes(50 << 30), "50GB");
        assert_eq!(human_bytes(1536 * 1024), "1.5MB");
        assert_eq!(human_bytes(0), "0B");
    }
}
