//! comfy-bridge: a ComfyUI server as an actor on MQTT and NATS.
