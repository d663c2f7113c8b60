//! Builders for hclspec schemas (what ConfigSchema and TaskConfigSchema
//! return). Nomad turns them into hcldec specs, so two rules matter: an
//! `Attr` inside a `Default` needs an explicit name, and a `Literal` is an HCL
//! expression (strings carry their quotes).

use microvm_proto::hclspec::{self, Spec, spec::Block};

fn spec(block: Block) -> Spec {
    Spec { block: Some(block) }
}

/// The root object: keys are the HCL names (and the msgpack keys we decode).
pub fn object<'a>(attrs: impl IntoIterator<Item = (&'a str, Spec)>) -> Spec {
    spec(Block::Object(hclspec::Object { attributes: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect() }))
}

/// An attribute of an HCL type expression (`string`, `bool`, `list(string)`…).
pub fn attr(name: &str, ty: &str, required: bool) -> Spec {
    spec(Block::Attr(hclspec::Attr { name: name.to_string(), r#type: ty.to_string(), required }))
}

/// An optional attribute that takes `default` (an HCL expression) when unset.
pub fn attr_or(name: &str, ty: &str, default: &str) -> Spec {
    spec(Block::Default(Box::new(hclspec::Default {
        primary: Some(Box::new(attr(name, ty, false))),
        default: Some(Box::new(literal(default))),
    })))
}

pub fn literal(expr: &str) -> Spec {
    spec(Block::Literal(hclspec::Literal { value: expr.to_string() }))
}

/// An HCL string literal for `s` (HCL's quoted-string escapes agree with
/// JSON's; `${` and `%{` would start a template, so they are escaped too).
pub fn quote(s: &str) -> String {
    let json = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
    json.replace("${", "$${").replace("%{", "%%{")
}

/// An HCL list literal of strings.
pub fn quote_list(items: &[&str]) -> String {
    let inner: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", inner.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_or_names_the_inner_attr() {
        let s = attr_or("state_dir", "string", "\"/var/lib/x\"");
        let Some(Block::Default(d)) = s.block else { panic!("not a default: {s:?}") };
        let Some(Block::Attr(a)) = d.primary.and_then(|p| p.block) else { panic!("no attr") };
        assert_eq!(a.name, "state_dir");
        assert_eq!(a.r#type, "string");
        assert!(!a.required);
        let Some(Block::Literal(l)) = d.default.and_then(|p| p.block) else { panic!("no literal") };
        assert_eq!(l.value, "\"/var/lib/x\"");
    }

    #[test]
    fn quoting_makes_hcl_literals() {
        assert_eq!(quote("br0"), "\"br0\"");
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(quote("${x}"), "\"$${x}\"");
        assert_eq!(quote_list(&["/nix/store", "/srv"]), "[\"/nix/store\", \"/srv\"]");
        assert_eq!(quote_list(&[]), "[]");
    }

    #[test]
    fn object_keeps_every_key() {
        let s = object([("a", attr("a", "string", true)), ("b", attr("b", "bool", false))]);
        let Some(Block::Object(o)) = s.block else { panic!() };
        let mut keys: Vec<_> = o.attributes.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["a", "b"]);
    }
}
