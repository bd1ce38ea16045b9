//! `status`: ComfyUI's queue, reachability and version, and the bridge's version.

use serde_json::{json, Value};

use super::fields::Body;
use super::response::Failure;
use super::{Applied, Context, Spec};
use crate::comfy::http::ComfyHttp;
use crate::comfy::queue::QueueItem;

/// `status` takes no fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Status;

impl Spec for Status {
    const NAME: &'static str = "status";
    const FIELDS: &'static [&'static str] = &[];

    fn parse(_: &mut Body, _: usize) -> Result<Self, Failure> {
        Ok(Status)
    }

    fn apply(self, cx: &mut Context<'_>) -> Applied {
        let http = cx.http.clone();
        Applied::call(move || async move { Ok(status(&http).await) })
    }
}

/// Never an error: an unreachable ComfyUI is part of the status. `comfyui.tap` is the tap extension's version
/// when it is active on the bridge's WebSocket, else null.
async fn status(http: &ComfyHttp) -> Value {
    let (queue, stats) = tokio::join!(http.queue(), http.system_stats());
    let tap = http.tap().version();
    let bridge = json!({ "version": env!("CARGO_PKG_VERSION") });
    let ids = |items: &[QueueItem]| items.iter().map(|i| i.prompt_id.clone()).collect::<Vec<_>>();
    match (queue, stats) {
        (Ok(queue), stats) => json!({
            "comfyui": {
                "reachable": true,
                "version": stats.ok().and_then(|s| s.pointer("/system/comfyui_version").cloned()),
                "tap": tap,
            },
            "queue": { "running": ids(&queue.running), "pending": ids(&queue.pending) },
            "bridge": bridge,
        }),
        (Err(e), _) => json!({
            "comfyui": { "reachable": false, "error": e.to_string(), "tap": tap },
            "bridge": bridge,
        }),
    }
}
