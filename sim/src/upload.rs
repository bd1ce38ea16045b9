//! `POST /upload/image`: a small `multipart/form-data` parser and an in-memory upload folder.

use serde_json::json;

use super::http::{self, Response};
use super::server::Request;
use super::Shared;

/// Store an upload in memory and answer like ComfyUI: without `overwrite`, a name taken by different bytes
/// becomes `name (1).ext`, `name (2).ext`, ...; identical bytes reuse the name.
pub(crate) fn upload(shared: &Shared, req: &Request) -> Response {
    let Some(parts) = multipart_parts(req) else {
        return Response::text(400, "400: Bad Request");
    };
    let field = |name: &str| parts.iter().find(|p| p.name == name && p.filename.is_none()).map(|p| p.text());
    let Some(image) = parts.iter().find(|p| p.name == "image" && p.filename.as_deref().is_some_and(|f| !f.is_empty()))
    else {
        return Response::text(400, "400: Bad Request");
    };
    let kind = field("type").unwrap_or_else(|| "input".into());
    if !matches!(kind.as_str(), "input" | "temp" | "output") {
        return http::internal_error();
    }
    let subfolder = field("subfolder").unwrap_or_default();
    let filename = image.filename.clone().unwrap_or_default();
    let escapes = |p: &str| p.starts_with('/') || p.split(['/', '\\']).any(|c| c == "..");
    if escapes(&subfolder) || escapes(&filename) {
        return Response::text(400, "400: Bad Request");
    }
    let overwrite = field("overwrite").is_some_and(|v| v == "true" || v == "1");
    let mut st = shared.lock();
    let key = |name: &str| format!("{kind}/{subfolder}/{name}");
    let (stem, ext) = match filename.rfind('.') {
        Some(dot) if dot > 0 => filename.split_at(dot),
        _ => (filename.as_str(), ""),
    };
    let mut name = filename.clone();
    let mut i = 1;
    while !overwrite && st.uploads.get(&key(&name)).is_some_and(|old| *old != image.data) {
        name = format!("{stem} ({i}){ext}");
        i += 1;
    }
    st.uploads.insert(key(&name), image.data.clone());
    Response::json(200, &json!({"name": name, "subfolder": subfolder, "type": kind}))
}

/// One part of a `multipart/form-data` body.
#[derive(Debug)]
struct Part {
    name: String,
    filename: Option<String>,
    data: Vec<u8>,
}

impl Part {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Split a `multipart/form-data` body into its parts; `None` if it is not one.
fn multipart_parts(req: &Request) -> Option<Vec<Part>> {
    let content_type = req.header("content-type")?;
    let boundary = content_type.split(';').find_map(|p| p.trim().strip_prefix("boundary="))?.trim_matches('"');
    let delimiter = format!("\r\n--{boundary}").into_bytes();
    // With a CRLF in front, the first delimiter looks like all the others.
    let body = [b"\r\n".as_slice(), &req.body].concat();
    let mut rest = &body[find(&body, &delimiter)? + delimiter.len()..];
    let mut parts = Vec::new();
    while !rest.starts_with(b"--") {
        rest = rest.strip_prefix(b"\r\n")?;
        let end = find(rest, &delimiter)?;
        let part = &rest[..end];
        rest = &rest[end + delimiter.len()..];
        let head_end = find(part, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&part[..head_end]);
        let disposition = head.split("\r\n").find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))?;
        parts.push(Part {
            name: disposition_param(disposition, "name")?,
            filename: disposition_param(disposition, "filename"),
            data: part[head_end + 4..].to_vec(),
        });
    }
    Some(parts)
}

/// A quoted parameter of a `Content-Disposition` line, backslash escapes undone.
fn disposition_param(line: &str, key: &str) -> Option<String> {
    let needle = format!("{key}=\"");
    let start =
        line.match_indices(&needle).find(|(i, _)| line[..*i].ends_with([' ', ';'])).map(|(i, _)| i + needle.len())?;
    let mut out = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
}
