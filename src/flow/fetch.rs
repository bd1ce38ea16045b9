//! Reads the images `Bus Publish` saved from ComfyUI's `/view` and publishes their bytes on
//! `flow/<subject…>/image`. Its own task, so a slow read never holds up events.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::warn;

use crate::bus::{Bus, Class, Outbound, Route};
use crate::comfy::http::ComfyHttp;

/// Images waiting to be read; more are dropped and counted (`comfy_bridge_flow_images_total{outcome="dropped"}`).
pub const WAITING: usize = 16;

/// An image to read and publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetch {
    /// `flow/<subject…>/image`.
    pub route: Route,
    /// As ComfyUI's outputs name it.
    pub filename: String,
    /// Its subfolder.
    pub subfolder: String,
    /// `temp`, `output` or `input`.
    pub kind: String,
    /// For NATS: `Content-Type`, `Comfy-Prompt-Id`, `Comfy-Node-Id`.
    pub headers: Vec<(&'static str, String)>,
}

/// Hands `fetch` to the task, or counts it dropped when [`WAITING`] images wait already.
pub fn offer(tx: &mpsc::Sender<Fetch>, fetch: Fetch) {
    if tx.try_send(fetch).is_err() {
        super::image_counted("dropped");
        warn!("a Bus Publish image was dropped: too many images wait to be read from comfyui");
    }
}

/// Reads each image and publishes it on every bus, until the router drops its sender.
pub async fn run(http: ComfyHttp, mut rx: mpsc::Receiver<Fetch>, buses: Vec<(Bus, mpsc::Sender<Arc<Outbound>>)>) {
    while let Some(fetch) = rx.recv().await {
        let bytes = match http.view(&fetch.filename, &fetch.subfolder, &fetch.kind).await {
            Ok(bytes) => bytes,
            Err(e) => {
                super::image_counted("failed");
                warn!(error = %e, filename = %fetch.filename, "cannot read a Bus Publish image from comfyui");
                continue;
            }
        };
        super::image_counted("published");
        let message = Arc::new(Outbound {
            route: fetch.route,
            payload: bytes,
            qos: 1,
            retain: false,
            class: Class::Lifecycle,
            headers: fetch.headers,
            reply: None,
            reply_to: None,
        });
        for (_, tx) in &buses {
            let _ = tx.send(message.clone()).await;
        }
    }
}
