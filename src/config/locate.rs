//! Where in a TOML text a problem is: the 1-based line of a byte offset, and the line a
//! syntax error really belongs to (the parser notices an unclosed value only lines later). Used
//! by the configuration file's reader and by the policy loader alike.

use toml::de::DeTable;

/// Where a TOML syntax error found at byte `offset` really is, and its message worded for it.
///
/// The parser notices a missing `]`, `}` or closing `"""` only at the next token, which may be
/// several lines later (past blank lines, at the next table header, at the end of the file).
/// When the error is the first thing on its line, the lines before it are re-parsed alone: while
/// they still end inside an unfinished value, the value began earlier, and the line it began on
/// is the one reported, the message adding where the parser stopped.
pub fn syntax_error_at(text: &str, offset: usize, message: &str) -> (usize, String) {
    let offset = offset.min(text.len());
    let stopped = line_at(text, offset);
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    if !text[line_start..offset].trim().is_empty() {
        return (stopped, message.to_owned());
    }
    // `end`: the start of a line; `text[..end]` the lines before it.
    let mut end = line_start;
    let mut opened = None;
    for _ in 0..MAX_LINES_BACK {
        if end == 0 || !unfinished(&text[..end]) {
            break;
        }
        end = text[..end - 1].rfind('\n').map_or(0, |i| i + 1);
        opened = Some(line_at(text, end));
    }
    match opened {
        Some(line) if line != stopped => {
            let at = if offset == text.len() {
                "the end of the file".to_owned()
            } else {
                format!("line {stopped}")
            };
            let message = format!(
                "{message} (the value begun on this line is still open at {at}: is a closing \
                 bracket, brace or quote missing?)"
            );
            (line, message)
        }
        _ => (stopped, message.to_owned()),
    }
}

/// How far back [`syntax_error_at`] looks for the start of an unfinished value.
const MAX_LINES_BACK: usize = 500;

/// Whether `text` (whole lines) ends inside a value: it fails to parse, at its very end.
fn unfinished(text: &str) -> bool {
    match DeTable::parse(text) {
        Ok(_) => false,
        Err(e) => e.span().is_some_and(|s| s.start >= text.trim_end().len()),
    }
}

/// The 1-based line of a byte offset, for `file:line:` messages.
pub fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_counted_from_one_and_an_offset_past_the_end_is_the_last_line() {
        let text = "a = 1\nb = 2\n\nc = 3";
        assert_eq!(line_at(text, 0), 1);
        assert_eq!(line_at(text, 5), 1, "the newline ends its own line");
        assert_eq!(line_at(text, 6), 2);
        assert_eq!(line_at(text, text.find('c').expect("c")), 4);
        assert_eq!(line_at(text, 10_000), 4);
    }

    #[test]
    fn a_syntax_error_is_located_where_the_unfinished_value_begins() {
        // An unclosed array, a multi-line array missing its `]`, an unclosed multi-line string:
        // the parser stops lines later; the line reported is where the value began.
        for (text, line, stopped) in [
            ("a = 1\nb = [\"x\"\n\n[t]\nc = 2\n", 2, "line 4"),
            ("a = 1\nb = [\n  \"x\",\n  \"y\"\n\n[t]\n", 2, "line 6"),
            ("a = 1\nb = \"\"\"x\ny\n\nc = 2\n", 2, "the end of the file"),
        ] {
            let table = toml::de::DeTable::parse(text).expect_err("broken");
            let offset = table.span().map_or(0, |s| s.start);
            let (at, message) = syntax_error_at(text, offset, table.message());
            assert_eq!(at, line, "{text:?}: {message}");
            assert!(message.contains(stopped), "{text:?}: {message}");
        }
        // An error on its own line stays there; so does a duplicate key at a line's start.
        for (text, line) in [
            ("a = 1\nb \"x\"\n", 2),
            ("a = 1\nb = \"x\" y\n", 2),
            ("a = 1\n\na = 2\n", 3),
        ] {
            let e = toml::de::DeTable::parse(text).expect_err("broken");
            let (at, message) = syntax_error_at(text, e.span().map_or(0, |s| s.start), e.message());
            assert_eq!((at, message.as_str()), (line, e.message()), "{text:?}");
        }
    }
}
