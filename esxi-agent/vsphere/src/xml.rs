//! The two halves of our XML: a writer for request bodies (elements in the
//! order the XSD `sequence` demands, text escaped) and a bounded reader that
//! turns a response into a small tree the typed parsers walk.
//!
//! The tree is internal: every response is turned into typed values right
//! away (see `vim.rs` and `pbm.rs`), nothing outside this crate sees it.

use quick_xml::events::Event;
use quick_xml::Reader;

/// The deepest element nesting a response may have. vim25 responses nest
/// about a dozen levels (a device's backing's parent's ...); anything deeper
/// is not a response we asked for.
const MAX_DEPTH: usize = 64;
/// The most elements one response may have. A VM with 60 disks and four
/// controllers is a few thousand.
const MAX_NODES: usize = 500_000;

/// One element: its local name (without a namespace prefix), its `xsi:type`
/// (without a prefix), its unprefixed `type` attribute (a managed object
/// reference's type), its text and its child elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Node {
    pub name: String,
    pub xsi_type: Option<String>,
    pub mo_type: Option<String>,
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    /// The first child element with this local name.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child element with this local name, in document order.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Walks down by local names, first match at every step.
    pub fn path(&self, names: &[&str]) -> Option<&Node> {
        names.iter().try_fold(self, |node, name| node.child(name))
    }

    /// The trimmed text of a child element.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }

    /// The trimmed text of this element.
    pub fn trimmed(&self) -> &str {
        self.text.trim()
    }

    /// The type an element declares with `xsi:type`, or else its own name.
    pub fn type_name(&self) -> &str {
        self.xsi_type.as_deref().unwrap_or(&self.name)
    }
}

/// Strips a namespace prefix: `vim25:FileNotFound` -> `FileNotFound`.
fn local(name: &str) -> &str {
    name.rsplit_once(':').map_or(name, |(_, l)| l)
}

/// Parses a whole document into its root element, bounded in depth and size.
pub(crate) fn parse(bytes: &[u8]) -> Result<Node, String> {
    let mut reader = Reader::from_reader(bytes);
    // The stack of open elements; the bottom is a synthetic document node.
    let mut stack: Vec<Node> = vec![Node::default()];
    let mut nodes = 0usize;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("at byte {}: {e}", reader.buffer_position()))?;
        match event {
            Event::Start(e) => {
                nodes += 1;
                if nodes > MAX_NODES {
                    return Err(format!("more than {MAX_NODES} elements"));
                }
                if stack.len() > MAX_DEPTH {
                    return Err(format!("elements nested deeper than {MAX_DEPTH}"));
                }
                stack.push(element(&e, &reader)?);
            }
            Event::Empty(e) => {
                nodes += 1;
                if nodes > MAX_NODES {
                    return Err(format!("more than {MAX_NODES} elements"));
                }
                let node = element(&e, &reader)?;
                push_child(&mut stack, node)?;
            }
            Event::End(_) => {
                // quick-xml checks that end tags match their start tags.
                let node = stack.pop().ok_or("an end tag without a start tag")?;
                if stack.is_empty() {
                    return Err("an end tag without a start tag".into());
                }
                push_child(&mut stack, node)?;
            }
            Event::Text(t) => {
                let text = t.xml10_content().map_err(|e| format!("text is not UTF-8: {e}"))?;
                append_text(&mut stack, &text)?;
            }
            Event::CData(t) => {
                let text = t.decode().map_err(|e| format!("CDATA is not UTF-8: {e}"))?;
                append_text(&mut stack, &text)?;
            }
            Event::GeneralRef(r) => {
                let text = match r.resolve_char_ref().map_err(|e| e.to_string())? {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.decode().map_err(|e| e.to_string())?;
                        match &*name {
                            "amp" => "&".into(),
                            "lt" => "<".into(),
                            "gt" => ">".into(),
                            "quot" => "\"".into(),
                            "apos" => "'".into(),
                            other => return Err(format!("unknown entity &{other};")),
                        }
                    }
                };
                append_text(&mut stack, &text)?;
            }
            Event::DocType(_) => return Err("a DOCTYPE (not allowed in SOAP)".into()),
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
            Event::Eof => break,
        }
    }
    if stack.len() != 1 {
        return Err("the document ends inside an element".into());
    }
    let mut doc = stack.pop().unwrap_or_default();
    match doc.children.len() {
        1 => Ok(doc.children.remove(0)),
        0 => Err("no root element".into()),
        _ => Err("more than one root element".into()),
    }
}

fn element(e: &quick_xml::events::BytesStart<'_>, reader: &Reader<&[u8]>) -> Result<Node, String> {
    let name = std::str::from_utf8(e.name().as_ref())
        .map_err(|_| "an element name is not UTF-8".to_string())?
        .to_owned();
    let mut node = Node {
        name: local(&name).to_owned(),
        ..Node::default()
    };
    for attr in e.attributes() {
        let attr = attr.map_err(|e| format!("bad attribute in <{name}>: {e}"))?;
        let key = std::str::from_utf8(attr.key.as_ref())
            .map_err(|_| format!("an attribute name in <{name}> is not UTF-8"))?;
        let value = || {
            attr.decoded_and_normalized_value(quick_xml::XmlVersion::Implicit1_0, reader.decoder())
                .map(|v| v.into_owned())
                .map_err(|e| format!("bad attribute {key} in <{name}>: {e}"))
        };
        match key.split_once(':') {
            // xsi:type (whatever the prefix is called): a polymorphic value's type.
            Some((prefix, "type")) if prefix != "xmlns" => node.xsi_type = Some(local(&value()?).to_owned()),
            None if key == "type" => node.mo_type = Some(value()?),
            _ => {}
        }
    }
    Ok(node)
}

fn push_child(stack: &mut [Node], node: Node) -> Result<(), String> {
    let parent = stack.last_mut().ok_or("no parent element")?;
    parent.children.push(node);
    Ok(())
}

fn append_text(stack: &mut [Node], text: &str) -> Result<(), String> {
    let node = stack.last_mut().ok_or("text outside the root element")?;
    node.text.push_str(text);
    Ok(())
}

/// Escapes text for element content and attribute values.
pub(crate) fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(text)
}

/// Builds a request body. Callers write elements in XSD order.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    out: String,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    /// `<name>text</name>`
    pub fn text(&mut self, name: &str, text: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(name);
        self.out.push('>');
        self.out.push_str(&escape(text));
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push('>');
        self
    }

    /// `<name>value</name>` for anything that displays as its XML text
    /// (numbers, booleans).
    pub fn value(&mut self, name: &str, value: impl std::fmt::Display) -> &mut Self {
        self.text(name, &value.to_string())
    }

    /// `<name xsi:type="ty">text</name>`
    pub fn typed_text(&mut self, name: &str, ty: &str, text: &str) -> &mut Self {
        self.open_typed(name, ty);
        self.out.push_str(&escape(text));
        self.close(name)
    }

    /// A managed object reference: `<name type="Kind">value</name>`.
    pub fn moref(&mut self, name: &str, kind: &str, value: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(name);
        self.out.push_str(" type=\"");
        self.out.push_str(&escape(kind));
        self.out.push_str("\">");
        self.out.push_str(&escape(value));
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push('>');
        self
    }

    pub fn open(&mut self, name: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(name);
        self.out.push('>');
        self
    }

    /// `<name xmlns="ns">`: a method element and its namespace.
    pub fn open_ns(&mut self, name: &str, ns: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(name);
        self.out.push_str(" xmlns=\"");
        self.out.push_str(&escape(ns));
        self.out.push_str("\">");
        self
    }

    /// `<name xsi:type="ty">`
    pub fn open_typed(&mut self, name: &str, ty: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(name);
        self.out.push_str(" xsi:type=\"");
        self.out.push_str(&escape(ty));
        self.out.push_str("\">");
        self
    }

    pub fn close(&mut self, name: &str) -> &mut Self {
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push('>');
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_types_text_and_entities() {
        let doc = br#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <soapenv:Body><R xmlns="urn:vim25"><returnval type="Task">task-1</returnval>
 <val xsi:type="vim25:FileNotFound"><file>[ds] a &amp; b&#x2F;c</file></val><e/><![CDATA[<raw>]]></R></soapenv:Body>
</soapenv:Envelope>"#;
        let root = parse(doc).unwrap();
        assert_eq!(root.name, "Envelope");
        let r = root.path(&["Body", "R"]).unwrap();
        let ret = r.child("returnval").unwrap();
        assert_eq!(ret.mo_type.as_deref(), Some("Task"));
        assert_eq!(ret.trimmed(), "task-1");
        let val = r.child("val").unwrap();
        assert_eq!(val.xsi_type.as_deref(), Some("FileNotFound"));
        assert_eq!(val.child_text("file"), Some("[ds] a & b/c"));
        assert!(r.child("e").unwrap().children.is_empty());
        assert!(r.text.contains("<raw>"));
    }

    #[test]
    fn refuses_malformed_deep_and_doctype_documents() {
        assert!(parse(b"<a><b></a>").is_err());
        assert!(parse(b"<a>").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b"<a/><b/>").is_err());
        assert!(parse(b"<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>").is_err());
        assert!(parse(b"<a>&unknown;</a>").is_err());
        let deep = "<a>".repeat(MAX_DEPTH + 2) + &"</a>".repeat(MAX_DEPTH + 2);
        assert!(parse(deep.as_bytes()).unwrap_err().contains("deeper"));
        assert!(parse(b"<a>\xff</a>").is_err());
    }

    #[test]
    fn writer_escapes_text_and_attributes() {
        let mut w = Writer::new();
        w.moref("_this", "Folder", "a<b")
            .open_typed("spec", "X&Y")
            .text("name", "[ds] \"q\" & <t>")
            .value("n", -7)
            .close("spec");
        assert_eq!(
            w.finish(),
            "<_this type=\"Folder\">a&lt;b</_this><spec xsi:type=\"X&amp;Y\">\
             <name>[ds] &quot;q&quot; &amp; &lt;t&gt;</name><n>-7</n></spec>"
        );
    }
}
