//! The credentials XML inside a token: parse (strict, bounded) and build.
//!
//! Accepted: any root element name; fields as attributes of the root and/or as its child elements
//! (`<login>1001</login>`); child text is trimmed, attribute values are kept as written. Unknown
//! attributes and elements are ignored. Refused: DTDs (so no external or custom entities, no
//! "billion laughs"), entities beyond the five XML predefines them, more than one root, text outside
//! the root, a field given twice, a known field holding elements.

use quick_xml::Reader;
use quick_xml::escape::{escape, resolve_predefined_entity};
use quick_xml::events::{BytesStart, Event};

use super::{Field, TokenError};
use crate::secret::SecretString;

/// Elements deeper than this are refused (the token size limit bounds the rest).
const MAX_DEPTH: usize = 16;
/// At most this many elements in one document.
const MAX_ELEMENTS: usize = 256;

/// Field values as found in the XML, before validation.
#[derive(Default)]
pub(crate) struct RawFields {
    values: [Option<String>; Field::ALL.len()],
    password: Option<SecretString>,
}

impl RawFields {
    pub(crate) fn get(&self, field: Field) -> Option<String> {
        self.values.get(field.index()).cloned().flatten()
    }

    pub(crate) fn take_password(&mut self) -> Option<SecretString> {
        self.password.take()
    }

    fn set(&mut self, field: Field, value: String) -> Result<(), TokenError> {
        let duplicate = if field == Field::Password {
            self.password.replace(SecretString::new(value)).is_some()
        } else {
            match self.values.get_mut(field.index()) {
                Some(slot) => slot.replace(value).is_some(),
                None => false,
            }
        };
        if duplicate {
            return Err(TokenError::InvalidField {
                field,
                why: "is given more than once",
            });
        }
        Ok(())
    }
}

const NOT_XML: TokenError = TokenError::BadPlaintext(
    "the decrypted token is not well-formed XML (wrong key or IV, or broken XML)",
);

/// Parses the credentials XML.
pub(crate) fn parse(text: &str) -> Result<RawFields, TokenError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = Reader::from_str(text);
    let mut fields = RawFields::default();
    let mut depth = 0usize;
    let mut elements = 0usize;
    let mut root_done = false;
    // The known field whose child element is open (at depth 2), with its text so far.
    let mut capture: Option<(Field, String)> = None;

    loop {
        let event = reader.read_event().map_err(|_| NOT_XML)?;
        match event {
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
            Event::DocType(_) => {
                return Err(TokenError::BadPlaintext(
                    "the token XML has a DTD; DTDs and custom entities are not allowed",
                ));
            }
            Event::Start(ref e) | Event::Empty(ref e) => {
                let is_empty = matches!(event, Event::Empty(_));
                elements += 1;
                if elements > MAX_ELEMENTS || depth >= MAX_DEPTH {
                    return Err(TokenError::BadPlaintext(
                        "the token XML is too large or too deeply nested",
                    ));
                }
                if depth == 0 {
                    if root_done {
                        return Err(TokenError::BadPlaintext(
                            "the token XML has more than one root element",
                        ));
                    }
                    root_attributes(e, &mut fields)?;
                    if is_empty {
                        root_done = true;
                    }
                } else if let Some((field, _)) = &capture {
                    return Err(TokenError::InvalidField {
                        field: *field,
                        why: "must hold text, not elements",
                    });
                } else if depth == 1 {
                    if let Some(field) = Field::from_xml_name(e.name().as_ref()) {
                        if is_empty {
                            fields.set(field, String::new())?;
                        } else {
                            capture = Some((field, String::new()));
                        }
                    }
                }
                if !is_empty {
                    depth += 1;
                }
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                if depth == 1 {
                    if let Some((field, value)) = capture.take() {
                        fields.set(field, value.trim().to_owned())?;
                    }
                } else if depth == 0 {
                    root_done = true;
                }
            }
            Event::Text(t) => {
                let s = t.decode().map_err(|_| NOT_XML)?;
                if depth == 0 && !s.trim().is_empty() {
                    return Err(TokenError::BadPlaintext(
                        "the token XML has text outside the root element",
                    ));
                }
                if let Some((_, value)) = &mut capture {
                    value.push_str(&s);
                }
            }
            Event::CData(c) => {
                let s = c.decode().map_err(|_| NOT_XML)?;
                if let Some((_, value)) = &mut capture {
                    value.push_str(&s);
                }
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => {
                        let name = r.decode().map_err(|_| NOT_XML)?;
                        resolve_predefined_entity(&name)
                            .ok_or(TokenError::BadPlaintext(
                                "the token XML uses an entity other than &lt; &gt; &amp; &quot; &apos;",
                            ))?
                            .to_owned()
                    }
                    Err(_) => return Err(NOT_XML),
                };
                if depth == 0 {
                    return Err(TokenError::BadPlaintext(
                        "the token XML has text outside the root element",
                    ));
                }
                if let Some((_, value)) = &mut capture {
                    value.push_str(&resolved);
                }
            }
            Event::Eof => break,
        }
    }
    if depth != 0 || !root_done {
        return Err(if elements == 0 {
            TokenError::BadPlaintext("the decrypted token holds no XML element (wrong key or IV?)")
        } else {
            NOT_XML
        });
    }
    Ok(fields)
}

fn root_attributes(e: &BytesStart<'_>, fields: &mut RawFields) -> Result<(), TokenError> {
    for attr in e.attributes() {
        let attr = attr.map_err(|_| NOT_XML)?;
        if let Some(field) = Field::from_xml_name(attr.key.as_ref()) {
            let value = attr.unescape_value().map_err(|_| {
                TokenError::BadPlaintext(
                    "the token XML uses an entity other than &lt; &gt; &amp; &quot; &apos;",
                )
            })?;
            fields.set(field, value.into_owned())?;
        }
    }
    Ok(())
}

/// Builds the credentials XML: one `<account .../>` element with a field per attribute.
pub(crate) fn build(pairs: &[(Field, &str)]) -> String {
    let mut out = String::from("<account");
    for (field, value) in pairs {
        out.push(' ');
        out.push_str(field.xml_name());
        out.push_str("=\"");
        out.push_str(&escape(*value));
        out.push('"');
    }
    out.push_str("/>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(xml: &str) -> Result<Vec<(Field, String)>, TokenError> {
        let mut raw = parse(xml)?;
        let mut out: Vec<_> = Field::ALL
            .into_iter()
            .filter_map(|f| raw.get(f).map(|v| (f, v)))
            .collect();
        if let Some(p) = raw.take_password() {
            out.push((Field::Password, p.expose_secret().to_owned()));
        }
        Ok(out)
    }

    #[test]
    fn attributes_and_children_mix() {
        let got = fields(
            "<?xml version=\"1.0\"?>\n<root login=\"1001\" domain=\"sip.example.com\">\n  \
             <password> p&amp;ss&#x21; </password>\n  <unknown><deep/></unknown>\n  <port>5080</port>\n</root>\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(got.contains(&(Field::Login, "1001".into())));
        assert!(got.contains(&(Field::Port, "5080".into())));
        assert!(got.contains(&(Field::Password, "p&ss!".into())));
    }

    #[test]
    fn attribute_values_are_not_trimmed_and_unescape() {
        let got = fields(r#"<a password=" x&lt;&quot;y "/>"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, vec![(Field::Password, " x<\"y ".into())]);
    }

    #[test]
    fn cdata_is_text() {
        let got =
            fields("<a><password><![CDATA[<&>]]></password></a>").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, vec![(Field::Password, "<&>".into())]);
    }

    #[test]
    fn refusals() {
        let cases = [
            (
                "<!DOCTYPE a [<!ENTITY x \"y\">]><a login=\"&x;\"/>",
                "bad_plaintext",
            ),
            ("<a><login>&x;</login></a>", "bad_plaintext"),
            ("<a login=\"&x;\"/>", "bad_plaintext"),
            ("<a/><b/>", "bad_plaintext"),
            ("junk<a/>", "bad_plaintext"),
            ("<a>", "bad_plaintext"),
            ("<a></b>", "bad_plaintext"),
            ("", "bad_plaintext"),
            ("\u{1}\u{2}garbage", "bad_plaintext"),
            ("<a login=\"1\"><login>2</login></a>", "invalid_field:login"),
            ("<a><login><b/></login></a>", "invalid_field:login"),
            ("<a login=\"1\" login=\"2\"/>", "bad_plaintext"),
        ];
        for (xml, code) in cases {
            match parse(xml) {
                Ok(_) => panic!("accepted {xml:?}"),
                Err(e) => assert_eq!(e.code(), code, "{xml:?}: {e}"),
            }
        }
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let xml = format!("<a>{}{}</a>", "<b>".repeat(100), "</b>".repeat(100));
        assert_eq!(
            parse(&xml).err().map(|e| e.code()),
            Some("bad_plaintext".into())
        );
    }

    #[test]
    fn build_escapes() {
        let xml = build(&[(Field::Login, "1001"), (Field::Password, "a\"<&>'b")]);
        let got = fields(&xml).unwrap_or_else(|e| panic!("{e}"));
        assert!(got.contains(&(Field::Password, "a\"<&>'b".into())));
    }
}
