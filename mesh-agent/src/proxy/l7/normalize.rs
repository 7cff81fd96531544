//! Request targets before L7 policy: split into authority, path and query, validated, and
//! the path normalized — in one place for HTTP/1.1 and h2c. The normalized path is both what
//! policy matches and what the pod receives, so a policy and the pod cannot disagree on which
//! resource a request names.
//!
//! Modes follow Istio's `meshConfig.pathNormalization` ([`PathNormalization`]); this mesh's
//! default is the strictest, `DECODE_AND_MERGE_SLASHES` (Istio's default is `BASE`). In every
//! mode but `NONE`, in this order:
//! 1. every `%HH` is checked (invalid or truncated: refused), decoded once when it encodes an
//!    unreserved character (`A-Z a-z 0-9 - . _ ~`, hex digits in either case; no double
//!    decoding: `%252e` stays `%252e`), decoded when it is `%2F`/`%5C` in
//!    `DECODE_AND_MERGE_SLASHES`, and otherwise kept with its hex digits upper-cased;
//! 2. `\` becomes `/`;
//! 3. dot segments are removed (RFC 3986 §5.2.4), never above the root;
//! 4. `MERGE_SLASHES` and `DECODE_AND_MERGE_SLASHES` merge runs of `/` into one.
//!
//! Refused in every mode, `NONE` included (answered `400`): `%00`, invalid percent-encoding,
//! bytes outside visible ASCII (controls, space, DEL, non-ASCII), a fragment (`#`), a target
//! that is neither origin-form (`/…`), absolute-form (`http://host/…`), nor `*` with
//! `OPTIONS`, and absolute-form with user information or an invalid authority.
//!
//! h2c: the `http` crate drops a `#fragment` from `:path` before the agent sees it; what is
//! left is matched and forwarded, so the two still agree.
//!
//! Not done (as in Istio): case folding (`/ADMIN` is not `/admin`) and `;` path parameters
//! (`/admin;x` is a segment of its own, though some servers read it as `/admin`). The query
//! string is not normalized, not matched, and forwarded as sent.

use std::{fmt, str::FromStr};

/// How request paths are normalized before policy matching and forwarding (Istio's
/// `meshConfig.pathNormalization.normalization`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum PathNormalization {
    /// No transformation: paths are matched and forwarded as sent (still validated).
    /// Vulnerable to CVE-2021-31920: policies on paths can be bypassed.
    #[value(name = "NONE")]
    None,
    /// RFC 3986 dot segments, unreserved percent-encodings decoded, `\` to `/`.
    #[value(name = "BASE")]
    Base,
    /// `BASE`, then runs of `/` merged.
    #[value(name = "MERGE_SLASHES")]
    MergeSlashes,
    /// `%2F` and `%5C` decoded (to `/`), then `MERGE_SLASHES`. This mesh's default.
    #[default]
    #[value(name = "DECODE_AND_MERGE_SLASHES")]
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    pub const ALL: [Self; 4] = [
        Self::None,
        Self::Base,
        Self::MergeSlashes,
        Self::DecodeAndMergeSlashes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Base => "BASE",
            Self::MergeSlashes => "MERGE_SLASHES",
            Self::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }

    fn merges(self) -> bool {
        matches!(self, Self::MergeSlashes | Self::DecodeAndMergeSlashes)
    }
}

impl fmt::Display for PathNormalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PathNormalization {
    type Err = NormalizeError;

    /// Istio's names, case-insensitive, `-` accepted for `_`.
    fn from_str(s: &str) -> Result<Self, NormalizeError> {
        Self::ALL
            .into_iter()
            .find(|m| {
                m.as_str().len() == s.len()
                    && m.as_str()
                        .bytes()
                        .zip(s.bytes())
                        .all(|(a, b)| a.eq_ignore_ascii_case(&b) || (a == b'_' && b == b'-'))
            })
            .ok_or(NormalizeError::UnknownMode)
    }
}

/// Why a request target cannot be normalized safely (answered `400`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    #[error("%00 in the path")]
    EncodedNul,
    #[error("invalid percent-encoding")]
    InvalidPercent,
    #[error("byte outside visible ASCII in the request target")]
    InvalidByte,
    #[error("fragment in the request target")]
    Fragment,
    #[error("request target is not origin-form, absolute-form or OPTIONS *")]
    InvalidForm,
    #[error("absolute-form with a scheme other than http or https")]
    UnsupportedScheme,
    #[error("absolute-form with an empty or invalid authority")]
    InvalidAuthority,
    #[error("absolute-form with user information")]
    UserInfo,
    #[error(
        "unknown path normalization mode (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)"
    )]
    UnknownMode,
}

impl NormalizeError {
    /// The constant text of a `400`'s cause (for [`super::L7Error::BadRequest`]).
    pub fn detail(self) -> &'static str {
        match self {
            Self::EncodedNul => "%00 in the path",
            Self::InvalidPercent => "invalid percent-encoding in the path",
            Self::InvalidByte => "invalid byte in the request target",
            Self::Fragment => "fragment in the request target",
            Self::InvalidForm => "request target is not origin-form, absolute-form or OPTIONS *",
            Self::UnsupportedScheme => "absolute-form with an unsupported scheme",
            Self::InvalidAuthority => "absolute-form with an invalid authority",
            Self::UserInfo => "absolute-form with user information",
            Self::UnknownMode => "unknown path normalization mode",
        }
    }
}

/// A request target split into its parts, not yet normalized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// From an absolute-form target (RFC 9112 §3.2.2): it overrides `Host`.
    pub authority: Option<&'a str>,
    /// The path as sent: starts with `/`, or is `*` (`OPTIONS *`).
    pub path: &'a str,
    /// After `?`, as sent.
    pub query: Option<&'a str>,
}

impl Target<'_> {
    pub fn is_asterisk(&self) -> bool {
        self.path == "*"
    }
}

/// Splits an HTTP/1.x request target (or an h2 `:path`): origin-form, absolute-form with an
/// `http`/`https` scheme, or `*` for `OPTIONS`. Anything else (authority-form included: only
/// `CONNECT` uses it, and `CONNECT` is not proxied) is refused.
pub fn split_target<'a>(target: &'a str, method: &str) -> Result<Target<'a>, NormalizeError> {
    let bytes = target.as_bytes();
    if let Some(&b) = bytes.iter().find(|&&b| !is_visible(b) || b == b'#') {
        return Err(if b == b'#' {
            NormalizeError::Fragment
        } else {
            NormalizeError::InvalidByte
        });
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok(Target {
                authority: None,
                path: "*",
                query: None,
            })
        } else {
            Err(NormalizeError::InvalidForm)
        };
    }
    let (authority, rest) = if target.starts_with('/') {
        (None, target)
    } else {
        let (scheme, rest) = target
            .split_once("://")
            .ok_or(NormalizeError::InvalidForm)?;
        if !is_scheme(scheme) {
            return Err(NormalizeError::InvalidForm);
        }
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Err(NormalizeError::UnsupportedScheme);
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, rest) = rest.split_at(end);
        if authority.contains('@') {
            return Err(NormalizeError::UserInfo);
        }
        if authority.is_empty() || !authority.bytes().all(is_authority_byte) {
            return Err(NormalizeError::InvalidAuthority);
        }
        (Some(authority), rest)
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    // `http://host` and `http://host?q` name the root.
    let path = if path.is_empty() { "/" } else { path };
    Ok(Target {
        authority,
        path,
        query,
    })
}

/// Normalizes paths into buffers it keeps, so that a connection allocates for its first
/// unusual path only. Paths without `%`, `\`, `//` or `/.` are returned as they are.
#[derive(Debug, Default)]
pub struct Normalizer {
    decoded: Vec<u8>,
    out: String,
}

impl Normalizer {
    /// Normalizes `path` (a [`Target::path`]: starting with `/`, or `*`, returned as is; a
    /// `?` is not special here: split the query off first).
    pub fn normalize<'a>(
        &'a mut self,
        path: &'a str,
        mode: PathNormalization,
    ) -> Result<&'a str, NormalizeError> {
        let bytes = path.as_bytes();
        if path == "*" {
            return Ok(path);
        }
        if bytes.first() != Some(&b'/') {
            return Err(NormalizeError::InvalidForm);
        }
        // One pass over the bytes for the common case.
        if !scan(bytes)? || mode == PathNormalization::None {
            return Ok(path);
        }
        self.decode(bytes, mode)?;
        self.resolve(mode.merges());
        Ok(&self.out)
    }

    /// Step 1 and 2: percent-decoding and `\` into `self.decoded`.
    fn decode(&mut self, bytes: &[u8], mode: PathNormalization) -> Result<(), NormalizeError> {
        let decoded = &mut self.decoded;
        decoded.clear();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'#' {
                return Err(NormalizeError::Fragment);
            }
            if !is_visible(b) {
                return Err(NormalizeError::InvalidByte);
            }
            match b {
                b'%' => {
                    let v = percent(bytes, i)?;
                    if v == 0 {
                        return Err(NormalizeError::EncodedNul);
                    }
                    if is_unreserved(v) {
                        decoded.push(v);
                    } else if (v == b'/' || v == b'\\')
                        && mode == PathNormalization::DecodeAndMergeSlashes
                    {
                        decoded.push(b'/');
                    } else {
                        decoded.extend_from_slice(&[
                            b'%',
                            HEX[usize::from(v >> 4)],
                            HEX[usize::from(v & 15)],
                        ]);
                    }
                    i += 3;
                }
                b'\\' => {
                    decoded.push(b'/');
                    i += 1;
                }
                _ => {
                    decoded.push(b);
                    i += 1;
                }
            }
        }
        Ok(())
    }

    /// Steps 3 and 4: dot segments and (`merge`) empty segments, `self.decoded` (starting
    /// with `/`) into `self.out`.
    fn resolve(&mut self, merge: bool) {
        let out = &mut self.out;
        out.clear();
        // Starts with `/`: the first piece of the split is empty.
        let mut segments = self.decoded.split(|&b| b == b'/').skip(1).peekable();
        while let Some(seg) = segments.next() {
            let last = segments.peek().is_none();
            match seg {
                b"." => {}
                b".." => {
                    let cut = out.rfind('/').unwrap_or(0);
                    out.truncate(cut);
                }
                b"" if merge => {}
                _ => {
                    out.push('/');
                    // Only visible ASCII reaches here (checked in `decode`).
                    out.extend(seg.iter().map(|&b| char::from(b)));
                    continue;
                }
            }
            // A dot segment (or a merged empty one) at the end names a directory.
            if last && !out.ends_with('/') {
                out.push('/');
            }
        }
        if out.is_empty() {
            out.push('/');
        }
    }
}

/// [`Normalizer::normalize`] into a new string (for tools and tests).
pub fn normalize(path: &str, mode: PathNormalization) -> Result<String, NormalizeError> {
    Normalizer::default()
        .normalize(path, mode)
        .map(str::to_owned)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The checks of every mode — visible ASCII, no fragment, valid percent-encoding, no `%00`
/// — and whether the path has anything to normalize (`%`, `\`, `//` or `/.`).
fn scan(bytes: &[u8]) -> Result<bool, NormalizeError> {
    let mut work = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'#' => return Err(NormalizeError::Fragment),
            b if !is_visible(b) => return Err(NormalizeError::InvalidByte),
            b'%' => {
                if percent(bytes, i)? == 0 {
                    return Err(NormalizeError::EncodedNul);
                }
                work = true;
                i += 3;
                continue;
            }
            b'\\' => work = true,
            b'/' => work |= matches!(bytes.get(i + 1), Some(b'/' | b'.')),
            _ => {}
        }
        i += 1;
    }
    Ok(work)
}

/// The byte encoded by the `%HH` at `bytes[i]`.
fn percent(bytes: &[u8], i: usize) -> Result<u8, NormalizeError> {
    let hex = |j: usize| {
        bytes
            .get(j)
            .and_then(|&c| char::from(c).to_digit(16))
            .ok_or(NormalizeError::InvalidPercent)
    };
    let v = hex(i + 1)? * 16 + hex(i + 2)?;
    u8::try_from(v).map_err(|_| NormalizeError::InvalidPercent)
}

/// `!`..=`~`: no controls, space, DEL or non-ASCII.
fn is_visible(b: u8) -> bool {
    (0x21..0x7f).contains(&b)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_scheme(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
}

/// reg-name, IPv4, bracketed IPv6 and a port; no percent-encoding or sub-delims.
fn is_authority_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'[' | b']')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use PathNormalization::{Base, DecodeAndMergeSlashes, MergeSlashes};

    fn n(path: &str, mode: PathNormalization) -> Result<String, NormalizeError> {
        normalize(path, mode)
    }

    /// The bypass forms of issue 9, each with what the default mode makes of it: none may
    /// match `/public/*`, and each that names the admin area matches `/admin` or `/admin/*`.
    const BYPASS: &[(&str, &str)] = &[
        ("/public/../admin", "/admin"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/.%2e/admin", "/admin"),
        ("/public/%2E%2E/admin", "/admin"),
        ("/./admin", "/admin"),
        ("//admin", "/admin"),
        ("/public/..%2fadmin", "/admin"),
        ("/public/..%2Fadmin", "/admin"),
        ("/admin%2fx", "/admin/x"),
        ("/public/..\\admin", "/admin"),
        ("/public/..%5cadmin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/%61%64%6D%69%6E/secret.txt", "/admin/secret.txt"),
        ("/public/../admin/secret.txt", "/admin/secret.txt"),
        ("/public//..//admin/./secret.txt", "/admin/secret.txt"),
        ("/public/x/../../admin/", "/admin/"),
        ("/public/..", "/"),
    ];

    #[test]
    fn bypass_forms_name_the_admin_area_by_default() {
        let deny = |p: &str| p == "/admin" || p.starts_with("/admin/");
        for (raw, want) in BYPASS {
            let got = n(raw, PathNormalization::default()).unwrap();
            assert_eq!(got, *want, "{raw}");
            assert!(!got.starts_with("/public/"), "{raw} → {got}");
            if want.starts_with("/admin") {
                assert!(deny(&got), "{raw} → {got}");
            }
        }
    }

    #[test]
    fn table_per_mode() {
        // (input, NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
        let cases: &[(&str, [&str; 4])] = &[
            ("/", ["/", "/", "/", "/"]),
            ("/a/b", ["/a/b", "/a/b", "/a/b", "/a/b"]),
            ("/a/./b", ["/a/./b", "/a/b", "/a/b", "/a/b"]),
            ("/a/../b", ["/a/../b", "/b", "/b", "/b"]),
            ("/..", ["/..", "/", "/", "/"]),
            ("/../..", ["/../..", "/", "/", "/"]),
            ("/../../a", ["/../../a", "/a", "/a", "/a"]),
            ("/a/.", ["/a/.", "/a/", "/a/", "/a/"]),
            ("/a/..", ["/a/..", "/", "/", "/"]),
            ("/a/b/..", ["/a/b/..", "/a/", "/a/", "/a/"]),
            ("/.", ["/.", "/", "/", "/"]),
            ("/a/", ["/a/", "/a/", "/a/", "/a/"]),
            ("//a//b//", ["//a//b//", "//a//b//", "/a/b/", "/a/b/"]),
            ("/a//../b", ["/a//../b", "/a/b", "/b", "/b"]),
            ("/a%2fb", ["/a%2fb", "/a%2Fb", "/a%2Fb", "/a/b"]),
            ("/a%5Cb", ["/a%5Cb", "/a%5Cb", "/a%5Cb", "/a/b"]),
            ("/a\\b", ["/a\\b", "/a/b", "/a/b", "/a/b"]),
            ("\\", ["", "", "", ""]),
            ("/%2E%2e/x", ["/%2E%2e/x", "/x", "/x", "/x"]),
            (
                "/%252e%252e/x",
                [
                    "/%252e%252e/x",
                    "/%252e%252e/x",
                    "/%252e%252e/x",
                    "/%252e%252e/x",
                ],
            ),
            ("/%25", ["/%25", "/%25", "/%25", "/%25"]),
            (
                "/%7e%5F%2D%30",
                ["/%7e%5F%2D%30", "/~_-0", "/~_-0", "/~_-0"],
            ),
            ("/%20x%3b", ["/%20x%3b", "/%20x%3B", "/%20x%3B", "/%20x%3B"]),
            ("/a;b/c", ["/a;b/c", "/a;b/c", "/a;b/c", "/a;b/c"]),
            ("/Admin", ["/Admin", "/Admin", "/Admin", "/Admin"]),
            (
                "/.well-known/x",
                [
                    "/.well-known/x",
                    "/.well-known/x",
                    "/.well-known/x",
                    "/.well-known/x",
                ],
            ),
            ("/...", ["/...", "/...", "/...", "/..."]),
            ("/a/..b", ["/a/..b", "/a/..b", "/a/..b", "/a/..b"]),
            ("*", ["*", "*", "*", "*"]),
        ];
        for (raw, wants) in cases {
            for (mode, want) in PathNormalization::ALL.into_iter().zip(wants) {
                let got = n(raw, mode);
                if want.is_empty() {
                    assert!(got.is_err(), "{raw} {mode}: {got:?}");
                } else {
                    assert_eq!(got.as_deref(), Ok(*want), "{raw} {mode}");
                }
            }
        }
    }

    #[test]
    fn refused_in_every_mode() {
        let cases: &[(&str, NormalizeError)] = &[
            ("/admin%00", NormalizeError::EncodedNul),
            ("/a/%00/b", NormalizeError::EncodedNul),
            ("/a%zz", NormalizeError::InvalidPercent),
            ("/a%4", NormalizeError::InvalidPercent),
            ("/a%", NormalizeError::InvalidPercent),
            ("/a%g1", NormalizeError::InvalidPercent),
            ("/a%+1", NormalizeError::InvalidPercent),
            ("/a b", NormalizeError::InvalidByte),
            ("/a\tb", NormalizeError::InvalidByte),
            ("/a\x7f", NormalizeError::InvalidByte),
            ("/a\u{e9}", NormalizeError::InvalidByte),
            ("/a#frag", NormalizeError::Fragment),
            ("", NormalizeError::InvalidForm),
            ("admin", NormalizeError::InvalidForm),
        ];
        for (raw, want) in cases {
            for mode in PathNormalization::ALL {
                assert_eq!(n(raw, mode), Err(*want), "{raw:?} {mode}");
            }
        }
    }

    #[test]
    fn long_paths_and_many_segments() {
        let long = format!("/{}", "a".repeat(60_000));
        assert_eq!(n(&long, DecodeAndMergeSlashes).unwrap(), long);
        let many = "/x/..".repeat(10_000) + "/admin";
        assert_eq!(n(&many, Base).unwrap(), "/admin");
        let deep = "/..".repeat(20_000);
        assert_eq!(n(&deep, MergeSlashes).unwrap(), "/");
        let slashes = "/".repeat(30_000) + "admin";
        assert_eq!(n(&slashes, DecodeAndMergeSlashes).unwrap(), "/admin");
        let encoded = "/%2e%2e".repeat(5_000) + "/%61dmin";
        assert_eq!(n(&encoded, Base).unwrap(), "/admin");
    }

    #[test]
    fn the_buffer_is_reused_and_plain_paths_are_not_copied() {
        let mut norm = Normalizer::default();
        let plain = "/api/v1/items";
        let got = norm.normalize(plain, DecodeAndMergeSlashes).unwrap();
        assert!(std::ptr::eq(got, plain), "a plain path is returned as is");
        assert_eq!(norm.normalize("/a/../b", Base).unwrap(), "/b");
        let cap = norm.out.capacity();
        assert_eq!(norm.normalize("/c/./d", Base).unwrap(), "/c/d");
        assert_eq!(norm.out.capacity(), cap);
    }

    #[test]
    fn targets() {
        let t = |s, m| split_target(s, m);
        let origin = t("/a/b?x=1&y=%00", "GET").unwrap();
        assert_eq!(
            (origin.authority, origin.path, origin.query),
            (None, "/a/b", Some("x=1&y=%00"))
        );
        let abs = t("http://b1/admin", "GET").unwrap();
        assert_eq!(
            (abs.authority, abs.path, abs.query),
            (Some("b1"), "/admin", None)
        );
        let abs = t("HTTPS://b1.default:8080?q", "GET").unwrap();
        assert_eq!(
            (abs.authority, abs.path, abs.query),
            (Some("b1.default:8080"), "/", Some("q"))
        );
        let abs = t("http://[fd00::1]:80/a/../b", "GET").unwrap();
        assert_eq!((abs.authority, abs.path), (Some("[fd00::1]:80"), "/a/../b"));
        assert!(t("*", "OPTIONS").unwrap().is_asterisk());
        for (raw, method, want) in [
            ("*", "GET", NormalizeError::InvalidForm),
            ("b1:80", "GET", NormalizeError::InvalidForm),
            ("b1:80", "CONNECT", NormalizeError::InvalidForm),
            ("admin", "GET", NormalizeError::InvalidForm),
            ("ftp://b1/admin", "GET", NormalizeError::UnsupportedScheme),
            ("1http://b1/admin", "GET", NormalizeError::InvalidForm),
            ("http:///admin", "GET", NormalizeError::InvalidAuthority),
            ("http://b%31/admin", "GET", NormalizeError::InvalidAuthority),
            ("http://u:p@b1/admin", "GET", NormalizeError::UserInfo),
            ("/a#b", "GET", NormalizeError::Fragment),
            ("/a?b#c", "GET", NormalizeError::Fragment),
            ("/a?b c", "GET", NormalizeError::InvalidByte),
        ] {
            assert_eq!(t(raw, method), Err(want), "{raw} {method}");
        }
    }

    #[test]
    fn modes_parse_by_istio_name() {
        assert_eq!(
            "decode_and_merge_slashes".parse(),
            Ok(DecodeAndMergeSlashes)
        );
        assert_eq!("MERGE-SLASHES".parse(), Ok(MergeSlashes));
        assert_eq!("base".parse(), Ok(Base));
        assert_eq!("NONE".parse(), Ok(PathNormalization::None));
        assert_eq!(
            "merge".parse::<PathNormalization>(),
            Err(NormalizeError::UnknownMode)
        );
        assert_eq!(PathNormalization::default(), DecodeAndMergeSlashes);
    }

    /// Characters that make paths interesting.
    fn path_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("\\".to_owned()),
            Just("%2e".to_owned()),
            Just("%2F".to_owned()),
            Just("%5c".to_owned()),
            Just("%25".to_owned()),
            Just("%61".to_owned()),
            Just(";".to_owned()),
            "[a-z]{1,3}",
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|v| format!("/{}", v.concat()))
    }

    proptest! {
        /// Normalizing a normalized path changes nothing (in the merging modes, where the
        /// result has no `%2F`, `\`, dot or empty segments left to act on).
        #[test]
        fn idempotent(path in path_strategy()) {
            for mode in [MergeSlashes, DecodeAndMergeSlashes] {
                let once = n(&path, mode).unwrap();
                prop_assert_eq!(n(&once, mode).unwrap(), once.clone());
            }
        }

        /// The result is rooted and has no dot segments, backslashes or unreserved escapes;
        /// in the merging modes no empty segment, in the default mode no encoded slash.
        #[test]
        fn result_is_canonical(path in path_strategy()) {
            for mode in [Base, MergeSlashes, DecodeAndMergeSlashes] {
                let out = n(&path, mode).unwrap();
                prop_assert!(out.starts_with('/'));
                prop_assert!(!out.contains('\\'));
                let segs: Vec<&str> = out[1..].split('/').collect();
                prop_assert!(!segs.iter().any(|s| *s == "." || *s == ".."), "{}", out);
                prop_assert!(!out.to_ascii_lowercase().contains("%2e"));
                prop_assert!(!out.to_ascii_lowercase().contains("%61"));
                if mode != Base {
                    prop_assert!(!out.contains("//"), "{}", out);
                }
                if mode == DecodeAndMergeSlashes {
                    let lower = out.to_ascii_lowercase();
                    prop_assert!(!lower.contains("%2f") && !lower.contains("%5c"), "{}", out);
                }
            }
        }

        /// Whatever the input, no panic, and an accepted path is visible ASCII.
        #[test]
        fn arbitrary_input(path in "\\PC{0,64}") {
            for mode in PathNormalization::ALL {
                if let Ok(out) = n(&path, mode) {
                    prop_assert!(out.bytes().all(is_visible));
                }
            }
        }
    }
}
