//! `clear`: delete every pending prompt (the running one is left alone).

use serde_json::json;

use super::fields::Body;
use super::response::{http_failure, Failure, Outcome};
use super::{Applied, Context, Spec};
use crate::comfy::http::ComfyHttp;

/// `clear` takes no fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Clear;

impl Spec for Clear {
    const NAME: &'static str = "clear";
    const FIELDS: &'static [&'static str] = &[];

    fn parse(_: &mut Body, _: usize) -> Result<Self, Failure> {
        Ok(Clear)
    }

    fn apply(self, cx: &mut Context<'_>) -> Applied {
        let http = cx.http.clone();
        Applied::call(move || clear(http))
    }
}

async fn clear(http: ComfyHttp) -> Outcome {
    let pending = http.queue().await.map_err(http_failure)?.pending.len();
    http.clear_pending().await.map_err(http_failure)?;
    Ok(json!({ "cleared": pending }))
}
