//! ComfyUI's URLs that the bridge hands out (not requests it makes: those are in `http.rs`).

use reqwest::Url;
use serde_json::Value;

use super::percent_encode;

/// `{public_base}/view?filename=..&subfolder=..&type=..` for an output image
/// (`{"filename", "subfolder", "type"}`); `None` without a filename or with a base that is not a URL.
pub fn view_url(public_base: &str, image: &Value) -> Option<String> {
    let filename = image.get("filename")?.as_str().filter(|f| !f.is_empty())?;
    let field = |key: &str, default: &'static str| image.get(key).and_then(Value::as_str).unwrap_or(default);
    let mut url = Url::parse(public_base).ok()?;
    url.path_segments_mut().ok()?.pop_if_empty().push("view");
    // Keep the base's own query (a proxy's `?token=…`) in front.
    let kept = url.query().map(|q| format!("{q}&")).unwrap_or_default();
    let query = format!(
        "{kept}filename={}&subfolder={}&type={}",
        percent_encode(filename),
        percent_encode(field("subfolder", "")),
        percent_encode(field("type", "output")),
    );
    url.set_query(Some(&query));
    url.set_fragment(None);
    Some(url.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn view_url_encodes_every_query_value() {
        let image = json!({"filename": "my cat & dog=ü.png", "subfolder": "a b/c", "type": "temp"});
        let url = view_url("https://example.com/comfy/", &image).expect("url");
        assert_eq!(
            url,
            "https://example.com/comfy/view?filename=my%20cat%20%26%20dog%3D%C3%BC.png&subfolder=a%20b%2Fc&type=temp"
        );
        let parsed = Url::parse(&url).expect("parses");
        let pairs: Vec<(String, String)> =
            parsed.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        assert_eq!(pairs[0], ("filename".into(), "my cat & dog=ü.png".into()));
        assert_eq!(
            view_url("https://proxy/comfy?token=t", &json!({"filename": "x.png"})).as_deref(),
            Some("https://proxy/comfy/view?token=t&filename=x.png&subfolder=&type=output"),
            "a proxy's token stays"
        );
        assert_eq!(
            view_url("http://127.0.0.1:8188", &json!({"filename": "x.png"})).as_deref(),
            Some("http://127.0.0.1:8188/view?filename=x.png&subfolder=&type=output")
        );
        assert_eq!(view_url("http://h", &json!({"subfolder": "s"})), None);
        assert_eq!(view_url("not a url", &json!({"filename": "x.png"})), None);
    }
}
