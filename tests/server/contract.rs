//! `api/openapi.yaml` as a test oracle: every response a test sees is checked against the
//! schema the contract gives for its route, method and status.

use serde_json::Value;

pub struct Contract {
    doc: Value,
}

/// Escapes one JSON-pointer segment.
fn esc(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

impl Contract {
    pub fn load() -> Self {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml"))
                .expect("api/openapi.yaml");
        let doc: Value = serde_yaml_ng::from_str(&text).expect("openapi.yaml parses");
        Self { doc }
    }

    /// `(method, path)` of every operation in the document.
    pub fn operations(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                    out.push((method.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    /// Follows a `$ref` inside the document; returns the pointer of the object reached.
    fn deref(&self, pointer: String) -> String {
        let v = self
            .doc
            .pointer(&pointer)
            .unwrap_or_else(|| panic!("no {pointer} in the contract"));
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => self.deref(r.trim_start_matches('#').to_string()),
            None => pointer,
        }
    }

    /// Panics unless `(method, path, status)` is documented and `body` (JSON, unless the
    /// documented content type is something else) validates against its schema.
    pub fn check(&self, method: &str, path: &str, status: u16, content_type: &str, body: &[u8]) {
        let op = format!("/paths/{}/{}", esc(path), method.to_ascii_lowercase());
        assert!(
            self.doc.pointer(&op).is_some(),
            "{method} {path} is not in api/openapi.yaml"
        );
        let resp = self.deref(format!("{op}/responses/{status}"));
        let media = content_type.split(';').next().unwrap_or_default().trim();
        let content = format!("{resp}/content/{}", esc(media));
        assert!(
            self.doc.pointer(&content).is_some(),
            "{method} {path} {status}: content type {media:?} is not documented"
        );
        if media != "application/json" {
            return;
        }
        let instance: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "{method} {path} {status}: body is not JSON ({e}): {}",
                String::from_utf8_lossy(body)
            )
        });
        self.validate(
            &format!("{content}/schema"),
            &instance,
            &format!("{method} {path} {status}"),
        );
    }

    /// Validates `instance` against the schema at `pointer`.
    pub fn validate(&self, pointer: &str, instance: &Value, what: &str) {
        let mut root = self.doc.clone();
        // A URI fragment: `{` and `}` (path templates) must be percent-encoded.
        let fragment = pointer.replace('{', "%7B").replace('}', "%7D");
        root["$ref"] = Value::String(format!("#{fragment}"));
        let validator =
            jsonschema::draft202012::new(&root).expect("the contract's schemas compile");
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(
            errors.is_empty(),
            "{what}: response does not match the contract: {errors:#?}\n{instance}"
        );
    }

    /// Whether `instance` is valid for the schema at `pointer` (a request body, say).
    pub fn is_valid(&self, pointer: &str, instance: &Value) -> bool {
        let mut root = self.doc.clone();
        let fragment = pointer.replace('{', "%7B").replace('}', "%7D");
        root["$ref"] = Value::String(format!("#{fragment}"));
        jsonschema::draft202012::new(&root)
            .expect("the contract's schemas compile")
            .is_valid(instance)
    }

    /// Validates one streamed chunk against the `Completion` schema.
    pub fn check_chunk(&self, chunk: &Value) {
        self.validate("/components/schemas/Completion", chunk, "stream chunk");
    }
}

/// The route template (from `routes`) that `path` matches, `{x}` matching one segment.
pub fn template_of<'a>(routes: &[(&'a str, &'a str)], method: &str, path: &str) -> Option<&'a str> {
    let path = path.split('?').next().unwrap_or(path);
    let segs: Vec<&str> = path.split('/').collect();
    routes
        .iter()
        .filter(|(m, _)| *m == method)
        .map(|(_, t)| *t)
        .find(|t| {
            let ts: Vec<&str> = t.split('/').collect();
            ts.len() == segs.len()
                && ts
                    .iter()
                    .zip(&segs)
                    .all(|(a, b)| (a.starts_with('{') && a.ends_with('}')) || a == b)
        })
}
