"""comfy_bridge_tap: the ComfyUI side of comfy-bridge.

Copy this folder into ComfyUI's ``custom_nodes/`` and restart ComfyUI.

* The tap (``tap.py``) lets a bridge socket see every prompt's events, whoever
  queued it, and announces ``"comfy_bridge_tap": "<version>"`` in the server's
  feature flags.
* ``Bus Publish`` and ``Bus Ask`` (``bus_nodes.py``) let a workflow publish to
  MQTT/NATS and wait for an answer through the bridge.

Pure Python: standard library plus what ComfyUI already imports. Importing this
package outside ComfyUI installs nothing (the unit tests rely on that).
"""

from .bus_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .version import VERSION
from . import tap as _tap

_tap.install_into_comfyui()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "VERSION"]
