//! Errors that point into the file: `FILE:LINE:COLUMN: SUBJECT: field `FIELD`: MESSAGE`.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// What kind of problem a config has; tests and callers match on this, people read the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not valid TOML.
    Syntax,
    /// Valid TOML that does not fit the schema: unknown key, wrong type, missing key, bad
    /// enum value.
    Schema,
    /// Two groups/partitions with one name.
    DuplicateName,
    /// A `group` or `parent` that names nothing.
    UnknownName,
    /// A value outside what it may be (0 vCPUs, a pCPU the machine lacks, a bad port range).
    InvalidValue,
    /// Memory that does not fit the machine or overlaps another partition's.
    Memory,
    /// An I/O port, IRQ or serial port claimed by two partitions, or one the hypervisor keeps.
    DeviceConflict,
    /// The reservation tree cannot be admitted (over-admitted pCPU, child beyond its parent,
    /// period not dividing the major frame, cycle, ...).
    Admission,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based.
    pub line: u32,
    /// 1-based, in characters.
    pub column: u32,
    /// E.g. `partition "web"`, `group "batch"`, `[hypervisor]`; `None` at file level.
    pub subject: Option<String>,
    /// Dotted key path inside the subject, e.g. `pcpus`, `memory.base`, `devices.irqs`.
    pub field: Option<String>,
    pub kind: ErrorKind,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if let Some(subject) = &self.subject {
            write!(f, "{subject}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// 1-based line and character column of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (u32, u32) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line as u32, column as u32)
}

/// Longest name, key or file name an error repeats, and longest message (characters).
const MAX_ECHO: usize = 80;
const MAX_MESSAGE: usize = 400;

/// `text` fit for one line of an error: control characters escaped (a name or key with a
/// newline in it stays on the line), at most `max` characters (the rest elided).
fn one_line(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// serde's "invalid type: FOUND, expected EXPECTED" in TOML's words ("invalid type: expected
/// an integer, found a date or time"); `value` is the text the error points at (serde sees dates and
/// tables alike as maps). Other messages are kept as they are.
fn in_toml_words(message: &str, value: &str) -> String {
    let Some((found, expected)) = message.strip_prefix("invalid type: ").and_then(|m| m.split_once(", expected "))
    else {
        return message.to_string();
    };
    let value = value.trim_start();
    let found = match found.split_once(' ') {
        _ if found == "map" && value.starts_with("[[") => "an array of tables".to_string(),
        _ if found == "map" && value.starts_with('{') => "an inline table".to_string(),
        _ if found == "map" && value.starts_with(|c: char| c.is_ascii_digit()) => {
            format!("a date or time ({})", value.split_whitespace().next().unwrap_or(""))
        }
        _ if found == "map" => "a table".to_string(),
        _ if found == "sequence" => "an array".to_string(),
        Some(("string", text)) => format!("a string ({text})"),
        Some(("integer", text)) => format!("an integer ({})", text.trim_matches('`')),
        Some(("floating", text)) => format!("a float ({})", text.trim_start_matches("point ").trim_matches('`')),
        Some(("boolean", text)) => format!("a boolean ({})", text.trim_matches('`')),
        _ => found.to_string(),
    };
    let expected = match expected {
        // A `[[key]]` header where `[key]` belongs: serde names the first field's type.
        _ if value.starts_with("[[") => "a table",
        "u8" | "u16" | "u32" | "u64" | "i8" | "i16" | "i32" | "i64" | "usize" => "an integer",
        "a boolean" | "bool" => "a boolean",
        "a sequence" => "an array",
        e if e.starts_with("struct ") || e == "a map" => "a table",
        e => e,
    };
    format!("invalid type: expected {expected}, found {found}")
}

/// Builds errors for one file.
pub(crate) struct Reporter<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl Reporter<'_> {
    pub fn at(
        &self,
        span: Range<usize>,
        subject: Option<String>,
        field: Option<&str>,
        kind: ErrorKind,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_column(self.text, span.start);
        ConfigError {
            // The path is kept whole (editors and CI follow it); only control characters go.
            file: one_line(self.file, usize::MAX),
            line,
            column,
            subject: subject.map(|s| one_line(&s, MAX_ECHO)),
            field: field.map(|f| one_line(f, MAX_ECHO)),
            kind,
            message: one_line(&message.into(), MAX_MESSAGE),
        }
    }

    /// A TOML syntax error.
    pub fn syntax(&self, error: &toml::de::Error) -> ConfigError {
        let span = error.span().unwrap_or(0..0);
        self.at(span, None, None, ErrorKind::Syntax, error.message().trim_end().to_string())
    }

    /// A serde (schema) error: finds which table and key the error's span falls in, so the
    /// message names the partition and the field like the semantic errors do.
    pub fn schema(&self, error: &toml::de::Error, document: &Spanned<DeTable<'_>>) -> ConfigError {
        let span = error.span().unwrap_or(0..0);
        let mut path = Vec::new();
        locate_in_table(document.get_ref(), span.start, &mut path);
        let message = in_toml_words(error.message().trim_end(), self.text.get(span.clone()).unwrap_or(""));
        // "missing field `x`" points at the table: name the missing key as the field.
        let missing =
            message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next()).map(str::to_owned);
        let (subject, mut keys) = subject_of(document.get_ref(), &path);
        keys.extend(missing);
        let field = if keys.is_empty() { None } else { Some(keys.join(".")) };
        let mut error = self.at(span, subject, None, ErrorKind::Schema, message);
        error.field = field;
        error
    }
}

enum Step {
    Key(String),
    Index(usize),
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.contains(&offset) || (span.is_empty() && span.start == offset)
}

fn locate_in_table(table: &DeTable<'_>, offset: usize, path: &mut Vec<Step>) -> bool {
    for (key, value) in table.iter() {
        if contains(&key.span(), offset) {
            path.push(Step::Key(key.get_ref().to_string()));
            return true;
        }
        path.push(Step::Key(key.get_ref().to_string()));
        if locate_in_value(value, offset, path) {
            return true;
        }
        path.pop();
    }
    false
}

fn locate_in_value(value: &Spanned<DeValue<'_>>, offset: usize, path: &mut Vec<Step>) -> bool {
    match value.get_ref() {
        DeValue::Table(table) => locate_in_table(table, offset, path) || contains(&value.span(), offset),
        DeValue::Array(array) => {
            for (i, item) in array.iter().enumerate() {
                path.push(Step::Index(i));
                if locate_in_value(item, offset, path) {
                    return true;
                }
                path.pop();
            }
            contains(&value.span(), offset)
        }
        _ => contains(&value.span(), offset),
    }
}

/// Turns a key path into (`partition "web"`, [`pcpus`]) form.
fn subject_of(root: &DeTable<'_>, path: &[Step]) -> (Option<String>, Vec<String>) {
    let mut keys = Vec::new();
    let mut subject = None;
    let mut rest = path;
    if let [Step::Key(section), Step::Index(i), tail @ ..] = path {
        if section == "partition" || section == "group" {
            let name = root
                .get(section.as_str())
                .and_then(|v| v.get_ref().as_array())
                .and_then(|a| a.get(*i))
                .and_then(|t| t.get_ref().get("name"))
                .and_then(|n| n.get_ref().as_str().map(str::to_owned));
            subject = Some(match name {
                Some(name) => format!("{section} \"{name}\""),
                None => format!("{section} #{}", i + 1),
            });
            rest = tail;
        }
    } else if let [Step::Key(section), tail @ ..] = path {
        if section == "hypervisor" {
            subject = Some("[hypervisor]".to_owned());
            rest = tail;
        }
    }
    for step in rest {
        match step {
            Step::Key(k) => keys.push(k.clone()),
            Step::Index(_) => {}
        }
    }
    (subject, keys)
}
