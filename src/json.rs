//! JSON as the bridge writes it by hand on the event path: byte for byte what serde_json writes, without
//! its per-field machinery; and the one table of bytes a JSON string cannot hold as they are.

/// The bytes serde_json escapes in a string: `"`, `\` and the control characters.
pub const ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// `s` as a JSON string, as serde_json writes it: verbatim between quotes unless it holds `"`, `\` or a
/// control character, which serde_json escapes.
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    if !s.bytes().any(|b| ESCAPED[usize::from(b)]) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// `n` in decimal.
pub fn json_u64(out: &mut Vec<u8>, mut n: u64) {
    // Two digits per division (a 13-digit timestamp is most of the number writing per event).
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819202122232425262728293031323334353637383940414243444546474849\
                                5051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899";
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[n as usize * 2..n as usize * 2 + 2]);
    } else {
        at -= 1;
        digits[at] = b'0' + n as u8;
    }
    out.extend_from_slice(&digits[at..]);
}
