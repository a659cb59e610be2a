//! One JSON object written as it is built, to any `fmt::Write`: the console's records
//! (`console::Record`) and the control channel's replies (`control`) are both this. Written by
//! hand rather than with serde_json: the records are built field by field straight into the
//! console's locked line, with no allocation and no intermediate value.

use core::fmt::Write;

pub struct JsonObject<W: Write> {
    out: W,
    empty: bool,
}

impl<W: Write> JsonObject<W> {
    /// `{` written to `out`; the fields follow.
    pub fn begin(mut out: W) -> Self {
        let _ = out.write_str("{");
        JsonObject { out, empty: true }
    }

    /// The object closed; what it was written to.
    pub fn end(mut self) -> W {
        let _ = self.out.write_str("}");
        self.out
    }

    fn key(&mut self, key: &str) {
        if !core::mem::take(&mut self.empty) {
            let _ = self.out.write_str(",");
        }
        write_str_value(&mut self.out, key);
        let _ = self.out.write_str(":");
    }

    pub fn u64(mut self, key: &str, value: u64) -> Self {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    pub fn bool(mut self, key: &str, value: bool) -> Self {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    pub fn str(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        write_str_value(&mut self.out, value);
        self
    }

    /// A string value produced by formatting (escaped like any string).
    pub fn fmt(mut self, key: &str, value: core::fmt::Arguments) -> Self {
        self.key(key);
        let _ = self.out.write_str("\"");
        let _ = JsonEscaper(&mut self.out).write_fmt(value);
        let _ = self.out.write_str("\"");
        self
    }

    /// `"key":[v0,v1,...]`
    pub fn u64_list(mut self, key: &str, values: impl IntoIterator<Item = u64>) -> Self {
        self.key(key);
        let _ = self.out.write_str("[");
        for (i, v) in values.into_iter().enumerate() {
            let _ = write!(self.out, "{}{v}", if i == 0 { "" } else { "," });
        }
        let _ = self.out.write_str("]");
        self
    }

    /// `"key":["a","b",...]`
    pub fn str_list<'a>(mut self, key: &str, values: impl IntoIterator<Item = &'a str>) -> Self {
        self.key(key);
        let _ = self.out.write_str("[");
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                let _ = self.out.write_str(",");
            }
            write_str_value(&mut self.out, v);
        }
        let _ = self.out.write_str("]");
        self
    }

    /// `"key":` followed by JSON that is already written (an object, a list of them).
    pub fn raw(mut self, key: &str, json: &str) -> Self {
        self.key(key);
        let _ = self.out.write_str(json);
        self
    }
}

fn write_str_value(out: &mut impl Write, s: &str) {
    let _ = out.write_str("\"");
    let _ = JsonEscaper(out).write_str(s);
    let _ = out.write_str("\"");
}

struct JsonEscaper<'a, W: Write>(&'a mut W);

impl<W: Write> Write for JsonEscaper<'_, W> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for c in s.chars() {
            match c {
                '"' => self.0.write_str("\\\"")?,
                '\\' => self.0.write_str("\\\\")?,
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c if (c as u32) < 0x20 => write!(self.0, "\\u{:04x}", c as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}
