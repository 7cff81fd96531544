//! The one strict YAML loader for the mesh's input files (the workload registry, policies):
//! serde-saphyr with parser budgets, so a hostile file cannot make the agent allocate without
//! bound, and errors that carry a 1-based `line`/`column` for `file:line: problem` messages.
//! Unknown fields are refused by the types themselves (`#[serde(deny_unknown_fields)]`).

use serde::de::DeserializeOwned;
use serde_saphyr::{MessageFormatter, Spanned, UserMessageFormatter};

/// Parser budget: nodes (scalars, sequences, mappings) per file. Generous enough for tens of
/// thousands of workloads or far more than a 16 MiB policy file holds.
pub const MAX_NODES: usize = 4_000_000;
/// Parser budget: events (scalars, collection starts and ends) per file.
pub const MAX_EVENTS: usize = 16_000_000;

/// The parser options: the budgets above, and at most `max_documents` documents (`None`:
/// the parser's default).
pub fn options(max_documents: Option<usize>) -> serde_saphyr::Options {
    match max_documents {
        None => serde_saphyr::options! {
            budget: serde_saphyr::budget! {
                max_nodes: MAX_NODES,
                max_events: MAX_EVENTS,
            },
        },
        Some(max_documents) => serde_saphyr::options! {
            budget: serde_saphyr::budget! {
                max_nodes: MAX_NODES,
                max_events: MAX_EVENTS,
                max_documents: max_documents,
            },
        },
    }
}

/// One document.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, options(None))
}

/// Every document of a multi-document file, at most `max_documents`.
pub fn from_multiple<T: DeserializeOwned>(
    text: &str,
    max_documents: usize,
) -> Result<Vec<T>, serde_saphyr::Error> {
    serde_saphyr::from_multiple_with_options(text, options(Some(max_documents)))
}

/// A parse error as a file position and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based; an error without a location is about the document as a whole (line 1).
    pub line: usize,
    /// 1-based.
    pub column: usize,
    /// The parser's message, without the source snippet, control characters escaped (the text
    /// may quote the input and ends up in logs).
    pub message: String,
}

impl SyntaxError {
    pub fn of(e: &serde_saphyr::Error) -> Self {
        let (line, column) = position(e);
        let message = UserMessageFormatter.format_message(e.without_snippet());
        let message = if message.chars().any(char::is_control) {
            message.escape_debug().to_string()
        } else {
            message.into_owned()
        };
        Self {
            line,
            column,
            message,
        }
    }
}

/// Where `e` is, 1-based (line 1, column 1 when the parser recorded no location).
pub fn position(e: &serde_saphyr::Error) -> (usize, usize) {
    let (line, column) = e
        .without_snippet()
        .location()
        .map(|l| (to_line(l.line()), to_line(l.column())))
        .unwrap_or((0, 0));
    (line.max(1), column.max(1))
}

/// A parser line or column as `usize` (0 when unknown).
pub fn to_line(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The line of a spanned value, or `fallback` if the parser did not record one.
pub fn line_of<T>(v: &Spanned<T>, fallback: usize) -> usize {
    match to_line(v.referenced.line()) {
        0 => fallback,
        l => l,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        a: u32,
    }

    #[test]
    fn errors_carry_a_line_and_column() {
        let e = from_str::<Doc>("a: 1\nb: 2\n").unwrap_err();
        let s = SyntaxError::of(&e);
        assert_eq!(s.line, 2, "{s:?}");
        assert!(s.message.contains('b'), "{s:?}");
    }

    #[test]
    fn the_document_budget_is_enforced() {
        assert!(from_multiple::<Doc>("a: 1\n---\na: 2\n", 2).is_ok());
        assert!(from_multiple::<Doc>("a: 1\n---\na: 2\n---\na: 3\n", 2).is_err());
    }
}
