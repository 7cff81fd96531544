//! Lower-case hex, strictly: one spelling per value, so that no byte of a key id, key or
//! signature can change without changing what it decodes to (`A` for `a` or a `+` sign, which
//! `u8::from_str_radix` would take, are refused).

/// `bytes` as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    crate::audit::record::hex(bytes)
}

/// Exactly `2 * N` lower-case hex digits → `N` bytes.
pub fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (digit(b[2 * i])? << 4) | digit(b[2 * i + 1])?;
    }
    Some(out)
}

/// `#[serde(with = "hex::serde_array")]` for `[u8; N]` fields.
pub mod serde_array {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::decode(&s)
            .ok_or_else(|| D::Error::custom(format!("expected {} lower-case hex digits", 2 * N)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_per_value() {
        assert_eq!(decode::<2>("0aff"), Some([0x0a, 0xff]));
        assert_eq!(encode(&[0x0a, 0xff]), "0aff");
        for bad in ["0AFF", "+aff", "0af", "0afff", "0a f", "0agg", "０a"] {
            assert_eq!(decode::<2>(bad), None, "{bad:?}");
        }
    }
}
