//! The wire protocol between the authority service and the node agent's client.
//!
//! Transport: TLS 1.3 only, ALPN [`ALPN_AUTHORITY`].
//!
//! Protocol: newline-delimited JSON, one request line → one response line, in order.
//!
//! ```text
//! {"op":"sign","identity":"spiffe://td/ns/default/sa/a","csr_pem":"-----BEGIN ...","lifetime_secs":3600}
//!     → {"ok":true,"cert_chain_pem":"-----BEGIN CERTIFICATE-----...","root":"<root-id>"}
//!                                                         (leaf, then issuing; the root it chains to)
//! {"op":"bundle"}       → {"ok":true,"bundle_pem":"-----BEGIN CERTIFICATE-----...","active_root":"<root-id>"}
//! {"op":"revocations"}  → {"ok":true,"revoked":["4f3a…", …]}            (hex serials)
//! {"op":"checkpoint","checkpoint":{"v":1,"node":"n1","seq":41,"head":"…","time":"…","key":"…","sig":"…"}}
//!                       → {"ok":true}          (a signed audit checkpoint, kept by the authority)
//! {"op":"state","after":12,"wait_ms":25000,"active":{"version":11,"digest":"sha256:…",
//!      "refused":{"version":12,"digest":"sha256:…","reason":"unknown_signer: …"}}}   (refused: optional)
//!                       → {"ok":true,"state":{"schema":1,"version":13,"digest":"sha256:…",…}}
//!                         as soon as the published version differs from `after` (none: at
//!                         once), else after `wait_ms` (at most 30 s): {"ok":true,"unchanged":true}
//! anything refused      → {"ok":false,"error":"…"}
//! ```

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::ca::RootId;
use crate::audit::checkpoint::Checkpoint;
use crate::tls::Serial;

/// ALPN protocol of the authority service.
pub const ALPN_AUTHORITY: &[u8] = b"mesh-authority/1";

/// Longest response line the client accepts (bundles with several roots fit easily).
pub(crate) const MAX_RESPONSE_LINE: usize = 1024 * 1024;

/// Longest `state` response line the client accepts (the snapshot, JSON-escaped).
pub(crate) const MAX_STATE_LINE: usize = 2 * crate::state::MAX_SNAPSHOT_BYTES;

/// Longest wait for a new state version the authority grants (below its idle timeout).
pub(crate) const MAX_STATE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum Request {
    Sign {
        identity: String,
        csr_pem: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lifetime_secs: Option<u64>,
    },
    // Struct variants (not unit variants) so that unknown fields are refused here too.
    Bundle {},
    Revocations {},
    /// A signed audit checkpoint of the sending node's chain head.
    Checkpoint {
        checkpoint: Checkpoint,
    },
    /// The mesh state ([`crate::state::Snapshot`]) once its version differs from `after`.
    State {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_ms: Option<u64>,
        /// What the agent runs: the version it applied and its digest (intended vs active).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        active: Option<Active>,
    },
}

/// The state version an agent has applied, as it reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Active {
    pub version: u64,
    pub digest: String,
    /// The last version the agent refused to apply, if any (a canary's refusal halts a
    /// rollout). Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refused>,
}

/// A version an agent refused to apply, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refused {
    pub version: u64,
    pub digest: String,
    /// The refusal label (`unknown_signer`, `rollback`, …, or `state` / `maps`) and detail,
    /// at most [`MAX_REFUSED_REASON`] bytes.
    pub reason: String,
}

/// Longest refusal reason an agent sends (longer ones are cut).
pub const MAX_REFUSED_REASON: usize = 512;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Response {
    pub(crate) ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cert_chain_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) bundle_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) revoked: Option<Vec<Serial>>,
    /// With `cert_chain_pem`: the root the certificate chains to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) root: Option<RootId>,
    /// With `bundle_pem`: the root new certificates are issued under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) active_root: Option<RootId>,
    /// The answer to `state`: a newer version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) state: Option<Box<crate::state::Snapshot>>,
    /// The answer to `state`: nothing newer within the wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) unchanged: Option<bool>,
}

impl Response {
    pub(crate) fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            ..Self::default()
        }
    }

    pub(crate) fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"ok":false,"error":"internal error: unserialisable response"}"#.to_vec()
        });
        line.push(b'\n');
        line
    }
}

pub(crate) enum LineRead {
    Line,
    Eof,
    TooLong,
}

/// Reads one line of at most `max` bytes (newline and a preceding CR excluded) into `buf`.
/// Never buffers more than `max + 1` bytes of an oversize line. A final line without a newline
/// counts as a line.
pub(crate) async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    let n = (&mut *r)
        .take(max as u64 + 1)
        .read_until(b'\n', buf)
        .await?;
    if n == 0 {
        return Ok(LineRead::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(LineRead::Line);
    }
    if buf.len() > max {
        return Ok(LineRead::TooLong);
    }
    Ok(LineRead::Line)
}

/// Writes one line and flushes it.
pub(crate) async fn write_line<S>(stream: &mut BufReader<S>, line: &[u8]) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + AsyncWriteExt + Unpin,
{
    let w = stream.get_mut();
    w.write_all(line).await?;
    w.flush().await
}
