//! A call's disposition: what the CRM records about it after (or during) the call — a wrap-up
//! code, notes and custom fields (`PATCH /api/v1/calls/{callId}`). Each request is a JSON Merge
//! Patch (RFC 7396) of the stored object, so a CRM sends only what changes and `null` removes
//! a member. The checks here keep every value small and printable.

use serde_json::{Map, Value};

/// Most bytes of a wrap-up code.
pub const MAX_CODE: usize = 64;
/// Most bytes of the notes.
pub const MAX_NOTES: usize = 4096;
/// Most custom fields a call keeps.
pub const MAX_FIELDS: usize = 32;
/// Most bytes of a custom field's value.
pub const MAX_FIELD_VALUE: usize = 256;

/// Checks a disposition patch: an object of `code` (1-64 bytes, no control characters),
/// `notes` (up to 4096 bytes; line breaks and tabs allowed) and `fields` (up to 32 names of
/// 1-32 letters, digits or `_`, each a string of up to 256 bytes without control characters),
/// each of them or a field `null` to remove it. Returns the patch, or why it is refused.
pub fn check(patch: &Value) -> Result<&Map<String, Value>, String> {
    let obj = patch
        .as_object()
        .ok_or("the body must be an object of code, notes and fields")?;
    if obj.is_empty() {
        return Err("nothing to change: give code, notes or fields".into());
    }
    for (key, value) in obj {
        match (key.as_str(), value) {
            (_, Value::Null) => {}
            ("code", Value::String(c)) => {
                if c.is_empty() || c.len() > MAX_CODE || c.chars().any(char::is_control) {
                    return Err(format!(
                        "code must be 1-{MAX_CODE} bytes without control characters"
                    ));
                }
            }
            ("notes", Value::String(n)) => {
                if n.len() > MAX_NOTES || n.chars().any(|c| c.is_control() && !"\n\r\t".contains(c))
                {
                    return Err(format!(
                        "notes must be at most {MAX_NOTES} bytes, without control characters but line breaks and tabs"
                    ));
                }
            }
            ("fields", Value::Object(fields)) => check_fields(fields)?,
            ("code" | "notes", _) => return Err(format!("{key} must be a string or null")),
            ("fields", _) => return Err("fields must be an object or null".into()),
            _ => {
                return Err(format!(
                    "unknown member {key:?}: a disposition has code, notes and fields"
                ));
            }
        }
    }
    Ok(obj)
}

fn check_fields(fields: &Map<String, Value>) -> Result<(), String> {
    if fields.len() > MAX_FIELDS {
        return Err(format!("at most {MAX_FIELDS} fields"));
    }
    for (name, value) in fields {
        let name_ok = (1..=32).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(format!("field name {name:?}: 1 to 32 letters, digits or _"));
        }
        match value {
            Value::Null => {}
            Value::String(v) if v.len() <= MAX_FIELD_VALUE && !v.chars().any(char::is_control) => {}
            _ => {
                return Err(format!(
                    "field {name:?} must be a string of at most {MAX_FIELD_VALUE} bytes without control characters, or null"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_patch_of_code_notes_and_fields_passes_and_anything_else_is_refused() {
        let good = [
            json!({"code": "sale", "notes": "Called back.\nWants the yearly plan.\t(ok)"}),
            json!({"fields": {"orderId": "O-1", "old_field": null}}),
            json!({"notes": null}),
        ];
        for p in &good {
            assert!(check(p).is_ok(), "{p}");
        }
        let bad = [
            json!("sale"),
            json!({}),
            json!({"code": ""}),
            json!({"code": "a\u{1b}b"}),
            json!({"code": "x".repeat(MAX_CODE + 1)}),
            json!({"code": 7}),
            json!({"notes": "a\u{0}b"}),
            json!({"notes": "x".repeat(MAX_NOTES + 1)}),
            json!({"fields": ["a"]}),
            json!({"fields": {"bad name": "x"}}),
            json!({"fields": {"n": 5}}),
            json!({"fields": {"n": "a\r\nVia: x"}}),
            json!({"fields": {"n": "x".repeat(MAX_FIELD_VALUE + 1)}}),
            json!({"disposition": "sale"}),
        ];
        for p in &bad {
            assert!(check(p).is_err(), "{p}");
        }
        let many: Map<String, Value> = (0..=MAX_FIELDS)
            .map(|i| (format!("f{i}"), json!("v")))
            .collect();
        assert!(check(&json!({ "fields": many })).is_err());
    }
}
