//! Byte sizes as people write them. One rule everywhere: KB, MB, GB, TB are powers of 1000 (as Hugging Face's
//! `max_shard_size="5GB"` means 5·10⁹ bytes); KiB, MiB, GiB, TiB are powers of 1024. Printing uses GB.

/// Parses `5GB`, `500MB`, `1.5GiB` or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let expected = "expected a size such as 5GB, 500MB, 8GiB or 1048576 (KB/MB/GB/TB: powers of 1000; KiB/MiB/GiB/TiB: powers of 1024)";
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => return Err(format!("`{text}`: unknown unit; {expected}")),
    };
    let number = number.trim();
    let valid = !number.is_empty() && number.chars().all(|c| c.is_ascii_digit() || c == '.');
    let value: f64 = match number.parse() {
        Ok(v) if valid => v,
        _ => return Err(format!("`{text}`: {expected}")),
    };
    let bytes = value * scale;
    if bytes >= u64::MAX as f64 {
        return Err(format!("`{text}`: larger than any size bake can use"));
    }
    Ok(bytes as u64)
}

/// `1234567890` → `1.23 GB`.
pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..=999 => format!("{bytes} B"),
        1_000..=999_999 => format!("{:.1} KB", b / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_and_binary_units_follow_one_rule() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size(" 500 mb "), Ok(500_000_000));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("12B"), Ok(12));
    }

    #[test]
    fn signs_strange_units_and_overflow_are_refused() {
        for bad in ["-1", "-5GB", "+5GB", "5XB", "5G", "GB", "", "1e3", "99999999999TB", "18446744073709551616"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bytes_print_in_decimal_units() {
        assert_eq!(format_bytes(999), "999 B");
        assert_eq!(format_bytes(122_143_104), "122.1 MB");
        assert_eq!(format_bytes(8_589_934_592), "8.59 GB");
    }
}
